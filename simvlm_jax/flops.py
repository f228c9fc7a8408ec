"""Model FLOPs of a train step, counted from the dimensions (forward multiply-adds x 2, training
3x the forward pass), and the nominal peaks MFU is measured against.

The counts are for this code's static shapes (prefix and targets each padded to the row length),
checked against XLA's cost analysis in `benchmarks/train_step.py` and worked out for Base and Huge
in `docs/scaling.md`.
"""
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

from simvlm_jax.memory import batch_parts
from simvlm_jax.models import ModelConfig

# Dense bfloat16 peak FLOP/s per JAX device, from the datasheets, by `device_kind` prefix.
NOMINAL_BF16_PEAK = (
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v6", 918e12), ("NVIDIA H100", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100", 312e12), ("NVIDIA L4", 121e12),
)


def nominal_peak(device_kind: str) -> Optional[float]:
  """The datasheet bf16 peak of a device kind, or None (e.g. CPU: measure one instead)."""
  for prefix, peak in NOMINAL_BF16_PEAK:
    if device_kind.startswith(prefix):
      return peak
  return None


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


def batch_flops(c: ModelConfig, host_batch: Any, processes: int = 1) -> float:
  """Model FLOPs of one train step on the global batch of which `host_batch` is this process's
  share (`memory.batch_parts`: pretraining, finetuning and image-pair rows)."""
  total = 0.0
  for rows, prefix, target, images in batch_parts(host_batch, processes, 1, 1):
    total += rows * (transformer_flops(c, prefix + c.num_image_tokens * images, target)
                     + conv_stage_flops(c) * images)
  return 3.0 * total
