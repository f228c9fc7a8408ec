r"""Train-step benchmark on synthetic batches (no seqio/TensorFlow needed).

  python benchmarks/train_step.py --model=tiny --image_text_batch=32 --text_batch=8
  python benchmarks/train_step.py --model=base --mesh=-1,1,1 --gin.ModelConfig.dtype="'bfloat16'"

Prints the step time (the best of `--rounds` rounds' medians over `--steps` steps, after
`--warmup`), examples/s, tokens/s, the model FLOPs per step (counted analytically from the
dimensions, `simvlm_jax.flops`, and XLA's own count from the compiled step's cost analysis), a peak
measured in the same run (a large matmul in the compute dtype, once per round, interleaved with
the steps: the best round) and the MFU against it, each with its spread over the rounds (on a
shared machine the load moves both), and on a device with a known datasheet bf16 peak
(`simvlm_jax.flops.NOMINAL_BF16_PEAK`) the MFU against that too. The last line is `key=value`
pairs.

With `scan_layers=True` XLA's cost analysis counts a scanned loop body once, so its FLOPs fall
short of the model count by about the depth; compare the two on unscanned runs.

  python benchmarks/train_step.py --pipeline=shapes [--data_dir=/tmp/shapes_tfds] [--steps=60]

times the train loop itself (`simvlm_jax.train.train` with `gin/runs/demo_pretrain.gin`: the
shapes world's tf.data pipeline, host-to-device transfer, logging, checkpoint checks) instead of
the bare step: the median time between requests for consecutive batches from the pipeline (by
the loop, or with `train.prefetch_batches` > 0 by the prefetch thread, which the loop paces),
after the first windows of steps. `--gin.train.prefetch_batches=0` times the loop without device
prefetching. It needs TensorFlow and seqio, and builds the shapes data if absent.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from simvlm_jax import gin_utils  # noqa: E402
from simvlm_jax.flops import batch_flops, matmul_peak, nominal_peak  # noqa: E402
from simvlm_jax.data.synthetic import synthetic_batch  # noqa: E402
from simvlm_jax.models import ModelConfig  # noqa: E402
from simvlm_jax.partitioning import Partitioner  # noqa: E402
from simvlm_jax.trainer import Trainer  # noqa: E402


class _TimedIterator:
  """A data iterator that records when each batch is asked for (the loop's step boundaries)."""

  def __init__(self, inner):
    self._inner, self.times = inner, []

  def __next__(self):
    self.times.append(time.perf_counter())
    return next(self._inner)

  def __getattr__(self, name):  # save, restore, counters, vocabulary, element_spec
    return getattr(self._inner, name)


def pipeline_step_time(args, bindings) -> None:
  """The train loop's steady-state step time on the shapes pipeline (see the module docstring)."""
  # pylint: disable=import-outside-toplevel
  import tempfile
  data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "simvlm_shapes_tfds")
  os.environ["SIMVLM_DATA_DIR"] = data_dir  # before the tasks register their data directory
  from simvlm_jax import console, train
  from simvlm_jax.data import pipeline
  from tasks import build
  console.quiet_native()
  console.quiet_python()
  build.main(["--data_dir", data_dir, "shapes", "--train", "2000", "--validation", "64",
              "--compositional", "64", "--text_train", "4000", "--text_validation", "64"])
  steps = args.warmup * 10 + args.steps
  gin_utils.parse_gin(["runs/demo_pretrain.gin"], [
      f"train.total_steps = {steps}", "train.log_every = 10", f"train.checkpoint_every = {steps}",
      "train.eval_iterator_fn = None", *bindings])
  iterators = []

  def timed(**kwargs):
    iterators.append(_TimedIterator(pipeline.make_pretrain_iterator(**kwargs)))
    return iterators[-1]
  with tempfile.TemporaryDirectory() as model_dir:
    train.train(model_dir=model_dir, train_iterator_fn=timed)
  gaps = np.diff(iterators[0].times)[args.warmup * 10:]  # after the first windows (compilation)
  step_s = statistics.median(gaps)
  print(f"shapes pipeline, train loop: median step {step_s * 1e3:.1f} ms over {len(gaps)} steps "
        f"(mean {np.mean(gaps) * 1e3:.1f} ms)")
  print(f"pipeline=shapes step_s={step_s:.4f} mean_step_s={np.mean(gaps):.4f} steps={len(gaps)}")


def setup(args, bindings):
  """(config, partitioner, trainer, initial state, batch shapes, two sharded synthetic batches)
  for `--model`, `--mesh` and the batch flags (`add_batch_flags`)."""
  gin_utils.parse_gin([f"models/simvlm_{args.model}.gin"], bindings)
  config = ModelConfig()
  partitioner = Partitioner(tuple(int(x) for x in args.mesh.split(",")))
  trainer = Trainer(config, partitioner, total_steps=1000)
  state = trainer.init_state()
  shapes = dict(image_text_batch=args.image_text_batch, image_text_length=args.image_text_length,
                text_batch=args.text_batch, text_length=args.text_length,
                image_size=config.image_size, vocab_size=config.vocab_size)
  batches = [partitioner.shard_batch(synthetic_batch(0, i, **shapes)) for i in range(2)]
  return config, partitioner, trainer, state, shapes, batches


def add_batch_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default="tiny", help="tiny | base | large | huge")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,model")
  p.add_argument("--image_text_batch", type=int, default=32)
  p.add_argument("--image_text_length", type=int, default=32)
  p.add_argument("--text_batch", type=int, default=8)
  p.add_argument("--text_length", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pipeline", choices=["synthetic", "shapes"], default="synthetic",
                 help="shapes: time the train loop on the shapes world's input pipeline")
  p.add_argument("--data_dir", default=None, help="--pipeline=shapes: TFDS data directory")
  add_batch_flags(p)
  p.add_argument("--rounds", type=int, default=3, help="rounds of steps and peak, interleaved")
  p.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU/TPU")
  args, rest = p.parse_known_args()
  bindings = [a[len("--gin_bindings="):] for a in gin_utils.rewrite_gin_args(rest)
              if a.startswith("--gin_bindings=")]
  if args.pipeline == "shapes":
    pipeline_step_time(args, bindings)
    return
  config, partitioner, trainer, state, shapes, batches = setup(args, bindings)
  t = time.perf_counter()
  with partitioner.activate():
    compiled = trainer._train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  on_cpu = jax.devices()[0].platform == "cpu"
  n = args.matmul_size or (2048 if on_cpu else 8192)
  # Rounds of (steps, then the matmul peak), interleaved: the load a shared machine puts on both
  # moves between rounds, so the figures are each one's best round, with the spread beside it.
  step_rounds, peak_rounds = [], []
  for _ in range(args.warmup):
    state, metrics = trainer.train_step(state, batches[0])
    jax.block_until_ready(metrics["loss"])
  for _ in range(args.rounds):
    times = []
    for i in range(args.steps):
      t = time.perf_counter()
      state, metrics = trainer.train_step(state, batches[i % 2])
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t)
    step_rounds.append(statistics.median(times))
    peak_rounds.append(matmul_peak(config.compute_dtype, n) * len(jax.devices()))
  step_s, peak = min(step_rounds), max(peak_rounds)
  rows = args.image_text_batch + args.text_batch
  tokens = (args.image_text_batch * (config.num_image_tokens + args.image_text_length)
            + args.text_batch * args.text_length)
  flops = batch_flops(config, synthetic_batch(0, 0, **shapes))  # the train loop's own count
  mfus = [flops / s / p for s, p in zip(step_rounds, peak_rounds)]
  from simvlm_jax.models.param_count import count_params
  result = dict(model=args.model, device=jax.devices()[0].device_kind.replace(" ", "_"),
                devices=len(jax.devices()), mesh="x".join(map(str, partitioner.mesh.shape.values())),
                dtype=config.dtype, params=count_params(config), compile_s=round(compile_s, 2),
                step_s=round(step_s, 4), examples_per_s=round(rows / step_s, 2),
                tokens_per_s=round(tokens / step_s, 1), model_tflops_per_step=round(flops / 1e12, 4),
                xla_tflops_per_step=round(xla_flops / 1e12, 4),
                flops_ratio_xla_over_model=round(xla_flops / flops, 3),
                peak_tflops=round(peak / 1e12, 3), mfu=round(flops / step_s / peak, 4),
                rounds=args.rounds,
                step_s_spread=f"{min(step_rounds):.4f}-{max(step_rounds):.4f}",
                peak_tflops_spread=f"{min(peak_rounds) / 1e12:.3f}-{max(peak_rounds) / 1e12:.3f}",
                mfu_spread=f"{min(mfus):.4f}-{max(mfus):.4f}")
  nominal = nominal_peak(jax.devices()[0].device_kind)
  if nominal:  # the datasheet's dense bf16 peak: the MFU docs/scaling.md's step times assume
    result.update(nominal_peak_tflops=round(nominal * len(jax.devices()) / 1e12, 1),
                  mfu_nominal=round(flops / step_s / (nominal * len(jax.devices())), 4))
  print(f"{args.model}: step {step_s * 1e3:.1f} ms (best of {args.rounds} rounds' medians over "
        f"{args.steps} steps; rounds {result['step_s_spread']} s; compile {compile_s:.1f} s), "
        f"{rows / step_s:.1f} examples/s, {tokens / step_s:.0f} tokens/s")
  print(f"model FLOPs/step {flops / 1e12:.4f} TFLOP (XLA counts {xla_flops / 1e12:.4f}); "
        f"peak ({config.dtype} {n}^3 matmul x {len(jax.devices())} devices, best round) "
        f"{peak / 1e12:.3f} TFLOP/s (rounds {result['peak_tflops_spread']}); MFU {result['mfu']:.3f}"
        f" (best step / best peak; per round {result['mfu_spread']})")
  if nominal:
    print(f"MFU against the nominal bf16 peak ({result['nominal_peak_tflops']:.0f} TFLOP/s): "
          f"{result['mfu_nominal']:.3f}")
  print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
  main()
