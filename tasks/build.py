r"""Builds the data the tasks read, and the default vocabulary.

  python -m tasks.build shapes                       # shapes_world/64px + shapes_world_text + vocab
  python -m tasks.build shapes --configs 64px 224px --train 50000 --text_train 200000
  python -m tasks.build folder --source_dir my_pairs/ --data_dir /data/my_pairs_tfds
  python -m tasks.build vocab                        # only the shapes SentencePiece model
  python -m tasks.build vocab --from 'cc3m/*.tar' more_text.txt --vocab_size 8000 \
      --output my_vocab.model                        # a SentencePiece model of your own text

Data goes to --data_dir (default: SIMVLM_DATA_DIR, else TFDS_DATA_DIR, else ~/tensorflow_datasets),
the vocabulary to SIMVLM_CACHE_DIR (default ~/.cache/simvlm_jax). A dataset that is already built
is kept unless --overwrite.

`vocab --from FILE...` trains a SentencePiece model with T5 ids (pad 0, eos 1, unk 2, no bos) and
byte fallback, so text it never saw still round-trips; the same input gives the same bytes.
  --from FILE...       files or globs, read in the order given (globs sorted), by extension:
                       .txt (a sentence a line), .jsonl (--field of each object), .tsv (first
                       column: CC3M's caption <TAB> url), .tar (WebDataset / img2dataset: the
                       --caption_ext members), .parquet (the --field column); other extensions
                       are read as .txt
  --vocab_size N       pieces in the model, the 3 special and 256 byte pieces included (> 259;
                       default 8000); the corpus must be large enough to learn the rest
  --output PATH        where to write the model (default: only the cache, path printed)
  --model_type TYPE    bpe (default) or unigram
  --field NAME         .jsonl key / .parquet column of the text (default: caption)
  --caption_ext EXT    caption member extension in .tar files (default: txt)
  --max_sentences N    train on the first N sentences only
Then use it for every task with gin (the model's vocab_size must match):
  sentencepiece_vocabulary.model_path = "my_vocab.model"
  VOCAB_SIZE = 8000
"""
import argparse
import itertools
import time

import tensorflow as tf
import tensorflow_datasets as tfds

from simvlm_jax import console
from simvlm_jax.data import paths, vocab
from simvlm_jax.errors import UserError, report_and_exit
from tasks import folder_builder, shapes_builders, vocabularies
from tasks.downstream import build as downstream_build

_MIN_VOCAB_SIZE = 259  # pad, eos, unk and the 256 byte-fallback pieces


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


def _own_vocab(args: argparse.Namespace) -> None:
  """Trains a SentencePiece model on the --from files; copies it to --output if given."""
  start = time.time()
  sentences = list(itertools.islice(
      vocabularies.corpus_sentences(args.sources, args.field, args.caption_ext),
      args.max_sentences))
  if not sentences:
    raise SystemExit(f"no text in {args.sources}")
  try:
    path = vocab.train_sentencepiece(sentences, args.vocab_size, name="own",
                                     model_type=args.model_type)
  except UserError as e:
    report_and_exit(e)
  if args.output:
    tf.io.gfile.copy(path, args.output, overwrite=True)
    path = args.output
  print(f"vocabulary: {path} ({args.vocab_size} pieces from {len(sentences)} sentences, "
        f"{time.time() - start:.1f}s)\nuse it with gin:\n"
        f"  sentencepiece_vocabulary.model_path = {path!r}\n  VOCAB_SIZE = {args.vocab_size}",
        flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tasks.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default=None, help="TFDS data directory")
  parser.add_argument("--overwrite", action="store_true", help="rebuild what exists")
  parser.add_argument(console.FLAG, action="store_true",
                      help="show the libraries' logging (see simvlm_jax.console)")
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

  own_vocab = commands.add_parser(
      "vocab", help="a SentencePiece model: the shapes world's, or of your own text (--from)")
  own_vocab.add_argument("--from", dest="sources", nargs="+", metavar="FILE",
                         help=".txt/.jsonl/.tsv/.tar/.parquet files or globs to train on")
  own_vocab.add_argument("--vocab_size", type=int, default=8000)
  own_vocab.add_argument("--output", default=None, help="where to write the model")
  own_vocab.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
  own_vocab.add_argument("--field", default="caption", help=".jsonl key / .parquet column")
  own_vocab.add_argument("--caption_ext", default="txt", help="caption member extension (.tar)")
  own_vocab.add_argument("--max_sentences", type=int, default=None)
  downstream_build.add_commands(commands)
  args = parser.parse_args(argv)
  console.quiet_python()
  if args.command == "vocab":
    changed = [f"--{k}" for k in ("vocab_size", "output", "model_type", "field", "caption_ext",
                                  "max_sentences") if getattr(args, k) != own_vocab.get_default(k)]
    if changed and not args.sources:
      parser.error(f"{', '.join(changed)} need --from (the shapes vocabulary is fixed)")
    if args.vocab_size <= _MIN_VOCAB_SIZE:
      parser.error(f"--vocab_size must be > {_MIN_VOCAB_SIZE} (3 special + 256 byte pieces)")

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
  elif args.sources:
    _own_vocab(args)
  else:
    _vocab()


if __name__ == "__main__":
  main()
