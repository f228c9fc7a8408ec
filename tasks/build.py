r"""Builds the data the tasks read, and the default vocabulary.

  python -m tasks.build shapes                       # shapes_world/64px + shapes_world_text + vocab
  python -m tasks.build shapes --configs 64px 224px --train 50000 --text_train 200000
  python -m tasks.build folder --source_dir my_pairs/ --data_dir /data/my_pairs_tfds
  python -m tasks.build vocab                        # only the shapes SentencePiece model

Data goes to --data_dir (default: SIMVLM_DATA_DIR, else TFDS_DATA_DIR, else ~/tensorflow_datasets),
the vocabulary to SIMVLM_CACHE_DIR (default ~/.cache/simvlm_jax). A dataset that is already built
is kept unless --overwrite.
"""
import argparse
import time

import tensorflow_datasets as tfds
from absl import logging

from simvlm_jax.data import paths
from tasks import folder_builder, shapes_builders, vocabularies
from tasks.downstream import build as downstream_build


def _prepare(builder: tfds.core.DatasetBuilder, overwrite: bool) -> None:
  start = time.time()
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  was_built = builder.is_prepared() and not overwrite
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  status = "already built" if was_built else f"built in {time.time() - start:.1f}s"
  print(f"{builder.info.full_name}: {status}, {sizes} -> {builder.data_path}", flush=True)


def _vocab() -> None:
  start = time.time()
  path = vocabularies.shapes_sentencepiece_model()
  print(f"vocabulary: {path} ({vocabularies.SHAPES_VOCAB_SIZE} pieces, "
        f"{time.time() - start:.1f}s)", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tasks.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default=None, help="TFDS data directory")
  parser.add_argument("--overwrite", action="store_true", help="rebuild what exists")
  commands = parser.add_subparsers(dest="command", required=True)

  shapes = commands.add_parser("shapes", help="the shapes world (image-text and text-only)")
  configs = [c.name for c in shapes_builders.ShapesWorld.BUILDER_CONFIGS]
  shapes.add_argument("--configs", nargs="+", default=["64px"], choices=configs,
                      help="shapes_world configs to build")
  for split, count in shapes_builders.ShapesWorld.DEFAULT_SPLIT_SIZES.items():
    shapes.add_argument(f"--{split}", type=int, default=count, help=f"images in {split}")
  for split, count in shapes_builders.ShapesWorldText.DEFAULT_SPLIT_SIZES.items():
    shapes.add_argument(f"--text_{split}", type=int, default=count, help=f"statements in {split}")
  shapes.add_argument("--seed", type=int, default=0)
  shapes.add_argument("--workers", type=int, default=None,
                      help="generator processes besides the writer (default: cores - 1)")

  folder = commands.add_parser("folder", help="your own image-text folder (JSONL / TSV)")
  folder.add_argument("--source_dir", required=True, help="folder with <split>.jsonl/.tsv files")

  commands.add_parser("vocab", help="the shapes-world SentencePiece model only")
  downstream_build.add_commands(commands)
  args = parser.parse_args(argv)

  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  data_dir = args.data_dir or paths.tfds_data_dir()
  if args.command == "shapes":
    for config in args.configs:
      sizes = {s: getattr(args, s) for s in shapes_builders.ShapesWorld.DEFAULT_SPLIT_SIZES}
      _prepare(shapes_builders.ShapesWorld(config=config, data_dir=data_dir, split_sizes=sizes,
                                           seed=args.seed, num_workers=args.workers),
               args.overwrite)
    sizes = {s: getattr(args, f"text_{s}")
             for s in shapes_builders.ShapesWorldText.DEFAULT_SPLIT_SIZES}
    _prepare(shapes_builders.ShapesWorldText(data_dir=data_dir, split_sizes=sizes, seed=args.seed,
                                             num_workers=args.workers), args.overwrite)
    _vocab()
  elif args.command == "folder":
    _prepare(folder_builder.ImageTextFolder(data_dir=data_dir, source_dir=args.source_dir),
             args.overwrite)
  elif args.command in downstream_build.COMMANDS:
    downstream_build.run(args, data_dir, _prepare)
  else:
    _vocab()


if __name__ == "__main__":
  main()
