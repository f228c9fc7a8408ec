r"""The `downstream` and `shapes_downstream` commands of `python -m tasks.build`.

  python -m tasks.build downstream --source_dir /data/raw    # every benchmark found in /data/raw:
      # coco/ nocaps/ vqa_v2/ nlvr2/ snli_ve/ (official files; see tasks/downstream/<reader>.py)
  python -m tasks.build downstream --benchmarks vqa_v2 --min_answer_count 9
  python -m tasks.build shapes_downstream                     # the shapes world's benchmarks
  python -m tasks.build shapes_downstream --out_dir /data/raw/shapes --train 20000 --eval 2000

shapes_downstream writes the raw files (default $SIMVLM_DOWNSTREAM_DIR/shapes) and builds their
TFDS datasets. Raw files written before with the same settings are kept (a `shapes_downstream.json`
next to them records the settings); rewriting them rebuilds the datasets.
"""
import json
import os
import time

import tensorflow_datasets as tfds

from tasks import shapes_downstream
from tasks.downstream import common
from tasks.downstream.registration import BENCHMARKS, tfds_name

COMMANDS = ("downstream", "shapes_downstream")
_SETTINGS_FILE = "shapes_downstream.json"


def add_commands(commands) -> None:
  """Adds both commands to the `python -m tasks.build` subparsers."""
  official = commands.add_parser("downstream", help="downstream benchmarks from official files")
  official.add_argument("--source_dir", default=None,
                        help=f"folder with a subfolder per benchmark (default: "
                             f"${common.SOURCE_DIR_ENV}, else ~/simvlm_downstream)")
  official.add_argument("--benchmarks", nargs="+", choices=list(BENCHMARKS), default=None,
                        help="default: every benchmark whose files are found")
  official.add_argument("--min_answer_count", type=int, default=9,
                        help="VQA answer vocabulary: answers seen at least this often (3,129)")
  official.add_argument("--max_answers", type=int, default=None,
                        help="VQA answer vocabulary: keep only the most frequent k")

  shapes = commands.add_parser("shapes_downstream",
                               help="generate and build the shapes world's downstream benchmarks")
  shapes.add_argument("--out_dir", default=None, help="where the raw files go (default: "
                      f"${common.SOURCE_DIR_ENV}/shapes, else ~/simvlm_downstream/shapes)")
  shapes.add_argument("--train", type=int, default=4000, help="training images per benchmark")
  shapes.add_argument("--eval", type=int, default=400, help="images per evaluation split")
  shapes.add_argument("--image_size", type=int, default=64)
  shapes.add_argument("--seed", type=int, default=0)
  shapes.add_argument("--workers", type=int, default=None,
                      help="processes that render and annotate (default: one per core)")


def run(args, data_dir: str, prepare) -> None:
  """Runs a command of COMMANDS; `prepare(builder, overwrite)` builds one TFDS dataset."""
  start = time.time()
  if args.command == "downstream":
    _official(args, data_dir, prepare)
  else:
    _shapes(args, data_dir, prepare)
  print(f"{args.command}: done in {time.time() - start:.1f}s", flush=True)


def _official(args, data_dir: str, prepare) -> None:
  root = args.source_dir or common.default_root("official")
  builders = {}
  for benchmark in args.benchmarks or BENCHMARKS:
    kwargs = ({"min_answer_count": args.min_answer_count, "max_answers": args.max_answers}
              if benchmark == "vqa_v2" else {})
    builders[benchmark] = tfds.builder(tfds_name(benchmark), data_dir=data_dir, source_root=root,
                                       **kwargs)
  if not args.benchmarks:
    builders = {b: builder for b, builder in builders.items() if builder.has_source()}
    if not builders:
      raise SystemExit(f"no benchmark files in {root}: expected some of coco/ nocaps/ vqa_v2/ "
                       "nlvr2/ snli_ve/ (see tasks/downstream/__init__.py)")
  for builder in builders.values():
    prepare(builder, args.overwrite)


def _shapes(args, data_dir: str, prepare) -> None:
  out_dir = args.out_dir or common.default_root("shapes")
  settings = {"seed": args.seed, "train": args.train, "eval": args.eval,
              "image_size": args.image_size}
  settings_path = os.path.join(out_dir, _SETTINGS_FILE)
  written = None
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      written = json.load(f)
  rewrite = args.overwrite or written != settings
  if rewrite:
    start = time.time()
    shapes_downstream.write_benchmarks(
        out_dir, seed=args.seed, sizes=shapes_downstream.default_sizes(args.train, args.eval),
        image_size=args.image_size, num_workers=args.workers)
    with open(settings_path, "w") as f:  # last: it marks a complete set of files
      json.dump(settings, f)
    print(f"shapes benchmarks: written in {time.time() - start:.1f}s -> {out_dir}", flush=True)
  else:
    print(f"shapes benchmarks: already written in {out_dir}", flush=True)
  for benchmark in BENCHMARKS:
    prepare(tfds.builder(tfds_name(benchmark, "shapes"), data_dir=data_dir, source_root=out_dir),
            rewrite)
