r"""Input pipeline throughput on the shapes world, through the real pipeline.

  python benchmarks/input_pipeline.py [--sizes 64 224] [--batch_size 64] [--batches 100]

For each resolution it builds a small JPEG-encoded shapes_world dataset (in a temporary directory,
or reuses --data_dir), then times `make_pretrain_iterator` batches: TFDS read, JPEG decode,
crop/resize, caption choice, tokenization, EOS/padding, drop counting, batching, numpy. Rows are
image-text plus text-only at 8 : 1. It prints examples/s, examples/s per core (wall rate divided
by the cores this process may use) and examples per CPU-second (rate over the CPU time the
process actually used, which holds up when other work shares the machine).
"""
import argparse
import os
import resource
import sys
import tempfile
import time

from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tasks  # noqa: E402
from simvlm_jax.data import pipeline  # noqa: E402
from tasks import shapes_builders  # noqa: E402


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(data_dir: str, size: int, batch_size: int, batches: int, images: int) -> dict:
  config = f"{size}px"
  shapes_builders.ShapesWorld(config=config, data_dir=data_dir,
                              split_sizes={"train": images, "validation": 0,
                                           "compositional": 0}).download_and_prepare()
  shapes_builders.ShapesWorldText(data_dir=data_dir, split_sizes={
      "train": 4 * images, "validation": 0}).download_and_prepare()
  mixture = tasks.register_shapes(config, data_dir=data_dir, prefix=f"bench{size}")
  text_batch = max(1, batch_size // 8)
  it = pipeline.make_pretrain_iterator(
      mixture, image_text_batch_size=batch_size, text_batch_size=text_batch,
      image_text_length=32, text_length=48, image_size=size, shard_index=0, num_shards=1)
  for _ in range(5):  # warm-up: tracing, file opening, filling buffers
    next(it)
  start, cpu_start = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
  examples = batches * (batch_size + text_batch)
  cores = len(os.sched_getaffinity(0))
  return {"size": size, "examples_per_s": examples / wall, "cores": cores,
          "per_core": examples / wall / cores, "per_cpu_s": examples / cpu,
          "image_text_per_s": batches * batch_size / wall}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
  parser.add_argument("--batch_size", type=int, default=64, help="image-text rows per batch")
  parser.add_argument("--batches", type=int, default=60)
  parser.add_argument("--images", type=int, default=1000, help="images to build per size")
  parser.add_argument("--data_dir", default=None, help="reuse/build here (default: a temp dir)")
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or tmp
    results = [measure(data_dir, size, args.batch_size, args.batches, args.images)
               for size in args.sizes]
  print(f"{'image':>9} {'examples/s':>11} {'image-text/s':>13} {'cores':>6} "
        f"{'examples/s/core':>16} {'examples/CPU-s':>15}")
  for r in results:
    print(f"{r['size']:>4}x{r['size']:<4} {r['examples_per_s']:>11.0f} "
          f"{r['image_text_per_s']:>13.0f} {r['cores']:>6d} {r['per_core']:>16.0f} "
          f"{r['per_cpu_s']:>15.0f}")


if __name__ == "__main__":
  main()
