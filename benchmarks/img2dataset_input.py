r"""Reading img2dataset shards in place: examples/s of the readers and of the whole pipeline.

  python benchmarks/img2dataset_input.py [--samples 512] [--shards 4] [--size 224]

Writes `--samples` JPEG-caption pairs (256x256, ~10-20 KB each, as img2dataset's default resize
gives) into `--shards` WebDataset tars and, separately, parquet files, in a temporary directory.
Then, per format, times (1) the SeqIO task alone (index or row-group reads, byte reads, caption
tokenization) over one shuffled epoch, and (2) `make_pretrain_iterator` batches (adds JPEG decode,
crop/resize to --size, drop counting, batching, numpy) after a warm-up. Prints examples/s and
examples per CPU-second (which holds up when other work shares the machine).
"""
import argparse
import io
import os
import resource
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import seqio  # noqa: E402

import tasks  # noqa: E402
from simvlm_jax.data import pipeline  # noqa: E402


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _samples(count: int) -> list[tuple[bytes, str]]:
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    coarse = rng.integers(0, 255, (16, 16, 3), np.uint8)  # smooth, photo-like file sizes
    image = io.BytesIO()
    Image.fromarray(coarse).resize((256, 256), Image.BICUBIC).save(image, format="JPEG",
                                                                    quality=95)
    out.append((image.getvalue(), f"photo number {i} of a {['red', 'blue'][i % 2]} thing"))
  return out


def _write(folder: str, samples: list, shards: int) -> None:
  for shard in range(shards):
    part = samples[shard::shards]
    with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
      for i, (image, caption) in enumerate(part):
        for ext, data in (("jpg", image), ("json", b"{}"), ("txt", caption.encode())):
          info = tarfile.TarInfo(f"{shard * 10**4 + i:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"caption": [c for _, c in part], "jpg": [i for i, _ in part]}),
                   os.path.join(folder, f"{shard:05d}.parquet"), row_group_size=100)


def _time(fn, count: int) -> tuple[float, float]:
  start, cpu_start = time.perf_counter(), _cpu_seconds()
  fn()
  return count / (time.perf_counter() - start), count / (_cpu_seconds() - cpu_start)


def measure(name: str, task: str, samples: int, size: int, batch_size: int) -> None:
  ds = seqio.get_mixture_or_task(task).get_dataset({"text": 64}, split="train", shuffle=True,
                                                   seed=0, num_epochs=1)
  rate, per_cpu = _time(lambda: sum(1 for _ in ds.as_numpy_iterator()), samples)
  print(f"{name:>8} task only      {rate:>8.0f} examples/s {per_cpu:>8.0f} examples/CPU-s")
  it = pipeline.make_pretrain_iterator(task, image_text_batch_size=batch_size, text_batch_size=0,
                                       image_text_length=32, text_length=8, image_size=size,
                                       shard_index=0, num_shards=1)
  for _ in range(3):  # warm-up: tracing, opening files, filling buffers
    next(it)
  batches = samples // batch_size
  rate, per_cpu = _time(lambda: [next(it) for _ in range(batches)], batches * batch_size)
  print(f"{name:>8} pipeline {size}px {rate:>8.0f} examples/s {per_cpu:>8.0f} examples/CPU-s")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--samples", type=int, default=512)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)
  with tempfile.TemporaryDirectory() as folder:
    samples = _samples(args.samples)
    _write(folder, samples, args.shards)
    mean_kb = sum(len(i) for i, _ in samples) / len(samples) / 1024
    print(f"{args.samples} samples ({mean_kb:.1f} KB JPEGs) in {args.shards} shards, "
          f"{len(os.sched_getaffinity(0))} cores")
    measure("tar", tasks.register_webdataset("bench_tar", f"{folder}/*.tar"), args.samples,
            args.size, args.batch_size)
    measure("parquet", tasks.register_image_text_parquet("bench_parquet", f"{folder}/*.parquet"),
            args.samples, args.size, args.batch_size)


if __name__ == "__main__":
  main()
