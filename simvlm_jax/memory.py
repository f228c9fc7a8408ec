"""Bytes per device of a train step, known before compiling: parameters, optimizer state (from
their shardings), gradients and an estimate of the activations the backward pass keeps.

The activation estimate counts, per layer, the tensors a transformer layer saves for its gradient
(norm inputs and outputs, q/k/v, attention scores and probabilities, the attention context, the
MLP's hidden layer before and after its activation), the conv stage's feature maps (each conv's
output, its norm and its ReLU) and the logits with their softmax. Rematerialisation keeps only
each layer's input. `tests/test_memory.py` holds it against XLA's own buffer accounting on CPU.
"""
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from simvlm_jax.errors import UserError
from simvlm_jax.models import ModelConfig


def bytes_per_device(abstract_tree: Any) -> int:
  """The largest per-device share of a tree of `ShapeDtypeStruct`s carrying shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def _layer(c: ModelConfig, q: int, kv: int, cross: bool) -> int:
  """Elements one transformer layer keeps for a row of `q` queries over `kv` keys (self-attention
  over its own `q` positions, then cross-attention to `kv` when `cross`)."""
  heads = c.num_heads * c.head_dim
  attention = lambda s, t: 2 * s * c.emb_dim + s * heads + 2 * t * heads + 2 * c.num_heads * s * t \
      + s * heads + s * c.emb_dim  # noqa: E731 (norm in/out, q, k/v, scores/probs, context, out)
  elements = attention(q, q) + 3 * q * c.emb_dim + 2 * q * c.mlp_dim  # + MLP block
  return elements + (attention(q, kv) if cross else 0)


def _conv_stage(c: ModelConfig) -> int:
  """Elements the conv stage keeps per image (each conv's output, norm and ReLU: 3 maps)."""
  if c.patchifier == "linear":
    return c.num_image_tokens * c.emb_dim
  size = c.image_size // 2
  elements = 3 * size * size * c.resnet_stem_width
  size //= 2  # max pool
  elements += size * size * c.resnet_stem_width
  cin = c.resnet_stem_width
  for s, (width, blocks) in enumerate(zip(c.resnet_stage_widths, c.resnet_stage_blocks)):
    for b in range(blocks):
      mid = width // 4
      out = size // 2 if (s > 0 and b == 0) else size
      elements += 3 * size * size * mid + 3 * out * out * mid + 3 * out * out * width
      if cin != width or out != size:
        elements += 2 * out * out * width  # the projection and its norm
      cin, size = width, out
  return elements + c.num_image_tokens * c.emb_dim


def activation_bytes(c: ModelConfig, parts: Sequence[Tuple[int, int, int, int]]) -> int:
  """Estimated bytes of what one device keeps for the backward pass of one (micro)batch.

  `parts`: (rows on this device, encoder text length, decoder length, images per row) per
  sub-batch (`batch_parts`).
  """
  item = np.dtype(c.dtype).itemsize
  remat = c.remat != "none"
  total = 0
  for rows, prefix, target, images in parts:
    if not rows:
      continue
    enc = prefix + c.num_image_tokens * images
    if c.architecture == "decoder_only":
      seq = enc + target
      layers = (c.num_encoder_layers + c.num_decoder_layers) * (
          seq * c.emb_dim if remat else _layer(c, seq, 0, cross=False))
    else:
      layers = c.num_encoder_layers * (enc * c.emb_dim if remat else _layer(c, enc, 0, False))
      layers += c.num_decoder_layers * (target * c.emb_dim if remat else
                                        _layer(c, target, enc, cross=True))
    conv = _conv_stage(c) * images
    logits = 2 * target * c.vocab_size * 4  # float32 logits and their softmax
    total += rows * ((layers + conv) * item + logits)
  return total


def batch_parts(host_batch: Any, processes: int, batch_shards: int,
                num_microbatches: int) -> List[Tuple[int, int, int, int]]:
  """Per sub-batch of a host batch: (rows each device holds of one microbatch, encoder text
  length, decoder length, images per row). Pretraining rows (`text_tokens`) give their whole
  length to both; finetuning rows have `prefix_tokens` and `target_tokens` (a classifier decodes
  one position); NLVR2 rows hold an image pair (`images` `[rows, 2, H, W, 3]`)."""
  parts = []
  for sub in host_batch.values():
    if "text_tokens" in sub:
      rows, prefix = sub["text_tokens"].shape[:2]
      target = prefix
    else:
      rows, prefix = sub["prefix_tokens"].shape[:2]
      target = sub["target_tokens"].shape[1] if "target_tokens" in sub else 1
    images = sub.get("images")
    per_row = 0 if images is None else (images.shape[1] if images.ndim == 5 else 1)
    parts.append((math.ceil(rows * processes / batch_shards / num_microbatches), prefix, target,
                  per_row))
  return parts


def train_step_bytes(config: ModelConfig, abstract_state: Any, host_batch: Any, processes: int,
                     batch_shards: int, num_microbatches: int) -> Dict[str, int]:
  """Bytes per device of a train step: parameters, optimizer state, gradients (as the
  parameters) and the estimated activations."""
  params = bytes_per_device(abstract_state.params)
  return {"parameters": params, "optimizer state": bytes_per_device(abstract_state.opt_state),
          "gradients": params,
          "activations": activation_bytes(config, batch_parts(host_batch, processes, batch_shards,
                                                              num_microbatches))}


def device_memory() -> Optional[int]:
  """Bytes one local device can hold: the accelerator's limit, or on CPU this host's memory
  shared by its CPU devices. None when unknown."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
    except (ValueError, OSError):
      return None
  return None


def gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def check_fits(need: Dict[str, int], limit: Optional[int]) -> str:
  """The report line of `train_step_bytes`; raises UserError when the total exceeds `limit`."""
  total = sum(need.values())
  line = ("memory per device: " + " + ".join(f"{k} {gib(v)}" for k, v in need.items())
          + f" (estimated) = {gib(total)}" + (f" of {gib(limit)}" if limit else ""))
  if limit and total > limit:
    parts = ", ".join(f"{k} {gib(v)}" for k, v in need.items())
    raise UserError(
        f"the train step needs about {gib(total)} per device ({parts}) but a device holds "
        f"{gib(limit)}: "
        "shard the parameters and optimizer state (a larger fsdp axis of Partitioner.mesh_shape), "
        "take the batch in pieces (train.num_microbatches), rematerialise layers "
        "(ModelConfig.remat = 'full') or use Adafactor (gin/optimizers/adafactor.gin)")
  return line
