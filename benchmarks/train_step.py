r"""Train-step benchmark on synthetic batches (no seqio/TensorFlow needed).

  python benchmarks/train_step.py --model=tiny --image_text_batch=32 --text_batch=8
  python benchmarks/train_step.py --model=base --mesh=-1,1,1 --gin.ModelConfig.dtype="'bfloat16'"

Prints the median step time over `--steps` steps after `--warmup`, examples/s, tokens/s, the model
FLOPs per step (counted analytically from the dimensions, and XLA's own count from the compiled
step's cost analysis), a peak measured in the same run (a large matmul in the compute dtype) and the
MFU against it. The last line is `key=value` pairs.

With `scan_layers=True` XLA's cost analysis counts a scanned loop body once, so its FLOPs fall
short of the model count by about the depth; compare the two on unscanned runs.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simvlm_jax import gin_utils  # noqa: E402
from simvlm_jax.data.synthetic import synthetic_batch  # noqa: E402
from simvlm_jax.models import ModelConfig  # noqa: E402
from simvlm_jax.partitioning import Partitioner  # noqa: E402
from simvlm_jax.trainer import Trainer  # noqa: E402


def conv_stage_flops(c: ModelConfig) -> float:
  """Forward multiply-add FLOPs (x2) of the patchifier for one image."""
  if c.patchifier == "linear":
    return 2.0 * c.num_image_tokens * c.patch_size ** 2 * 3 * c.emb_dim
  flops, size, cin = 0.0, c.image_size // 2, 3
  flops += 2.0 * size * size * 49 * cin * c.resnet_stem_width
  size //= 2
  cin = c.resnet_stem_width
  for s, (width, blocks) in enumerate(zip(c.resnet_stage_widths, c.resnet_stage_blocks)):
    mid = width // 4
    for b in range(blocks):
      stride = 2 if (s > 0 and b == 0) else 1
      out = size // stride
      flops += 2.0 * size * size * cin * mid  # 1x1 (before the stride)
      flops += 2.0 * out * out * 9 * mid * mid
      flops += 2.0 * out * out * mid * width
      if cin != width or stride != 1:
        flops += 2.0 * out * out * cin * width
      size, cin = out, width
  rest = c.patch_size // (4 * 2 ** max(len(c.resnet_stage_widths) - 1, 0))
  flops += 2.0 * c.num_image_tokens * rest * rest * cin * c.emb_dim
  return flops


def transformer_flops(c: ModelConfig, enc_len: int, dec_len: int) -> float:
  """Forward FLOPs of the Transformer and the logits for one row (static, padded lengths)."""
  d, hd, f = c.emb_dim, c.num_heads * c.head_dim, c.mlp_dim
  if c.architecture == "decoder_only":
    n = enc_len + dec_len
    per_layer = 8 * n * d * hd + 4 * n * n * hd + 4 * n * d * f
    return (c.num_encoder_layers + c.num_decoder_layers) * per_layer + 2.0 * dec_len * d * c.vocab_size
  enc = 8 * enc_len * d * hd + 4 * enc_len ** 2 * hd + 4 * enc_len * d * f
  dec = (8 * dec_len * d * hd + 4 * dec_len ** 2 * hd  # self-attention
         + 4 * dec_len * d * hd + 4 * enc_len * d * hd + 4 * dec_len * enc_len * hd  # cross
         + 4 * dec_len * d * f)
  return c.num_encoder_layers * enc + c.num_decoder_layers * dec + 2.0 * dec_len * d * c.vocab_size


def train_step_flops(c: ModelConfig, it_batch: int, it_len: int, txt_batch: int, txt_len: int):
  """Model FLOPs of one train step: 3x the forward pass (forward + backward)."""
  image_text = it_batch * (conv_stage_flops(c) + transformer_flops(c, c.num_image_tokens + it_len,
                                                                   it_len))
  text = txt_batch * transformer_flops(c, txt_len, txt_len)
  return 3.0 * (image_text + text)


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n matmul in `dtype`: the peak to measure MFU against."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / min(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny", help="tiny | base | large | huge")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,model")
  p.add_argument("--image_text_batch", type=int, default=32)
  p.add_argument("--image_text_length", type=int, default=32)
  p.add_argument("--text_batch", type=int, default=8)
  p.add_argument("--text_length", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--matmul_size", type=int, default=0, help="0: 2048 on CPU, 8192 on GPU/TPU")
  args, rest = p.parse_known_args()
  bindings = [a[len("--gin_bindings="):] for a in gin_utils.rewrite_gin_args(rest)
              if a.startswith("--gin_bindings=")]
  gin_utils.parse_gin([f"models/simvlm_{args.model}.gin"], bindings)
  config = ModelConfig()
  mesh = tuple(int(x) for x in args.mesh.split(","))
  partitioner = Partitioner(mesh)
  trainer = Trainer(config, partitioner, total_steps=1000)
  state = trainer.init_state()
  shapes = dict(image_text_batch=args.image_text_batch, image_text_length=args.image_text_length,
                text_batch=args.text_batch, text_length=args.text_length,
                image_size=config.image_size, vocab_size=config.vocab_size)
  batches = [partitioner.shard_batch(synthetic_batch(0, i, **shapes)) for i in range(2)]
  t = time.perf_counter()
  with partitioner.activate():
    compiled = trainer._train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[i % 2])
    jax.block_until_ready(metrics["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  rows = args.image_text_batch + args.text_batch
  tokens = (args.image_text_batch * (config.num_image_tokens + args.image_text_length)
            + args.text_batch * args.text_length)
  flops = train_step_flops(config, args.image_text_batch, args.image_text_length,
                           args.text_batch, args.text_length)
  on_cpu = jax.devices()[0].platform == "cpu"
  n = args.matmul_size or (2048 if on_cpu else 8192)
  peak = matmul_peak(config.compute_dtype, n) * len(jax.devices())
  from simvlm_jax.models.param_count import count_params
  result = dict(model=args.model, device=jax.devices()[0].device_kind.replace(" ", "_"),
                devices=len(jax.devices()), mesh="x".join(map(str, partitioner.mesh.shape.values())),
                dtype=config.dtype, params=count_params(config), compile_s=round(compile_s, 2),
                step_s=round(step_s, 4), examples_per_s=round(rows / step_s, 2),
                tokens_per_s=round(tokens / step_s, 1), model_tflops_per_step=round(flops / 1e12, 4),
                xla_tflops_per_step=round(xla_flops / 1e12, 4),
                flops_ratio_xla_over_model=round(xla_flops / flops, 3),
                peak_tflops=round(peak / 1e12, 3), mfu=round(flops / step_s / peak, 4))
  print(f"{args.model}: median step {step_s * 1e3:.1f} ms over {args.steps} steps "
        f"(compile {compile_s:.1f} s), {rows / step_s:.1f} examples/s, {tokens / step_s:.0f} tokens/s")
  print(f"model FLOPs/step {flops / 1e12:.4f} TFLOP (XLA counts {xla_flops / 1e12:.4f}); "
        f"peak ({config.dtype} {n}^3 matmul x {len(jax.devices())} devices) "
        f"{peak / 1e12:.3f} TFLOP/s; MFU {result['mfu']:.3f}")
  print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
  main()
