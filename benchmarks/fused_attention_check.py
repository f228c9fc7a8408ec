r"""Fused attention against the plain path, in bfloat16, on the device at hand (cuDNN on GPU).

  python benchmarks/fused_attention_check.py --model=base [--batch=8]

Computes a PrefixLM-shaped log-likelihood and its gradient for one set of weights three ways:
plain attention in float32 (the reference), plain and fused attention in bfloat16. Prints, for
each bf16 one, the relative error of the logits and of every gradient leaf (largest over leaves)
against the reference, and which `jax.nn.dot_product_attention` implementation "fused" picked.
Fused bf16 should be as close to the reference as plain bf16 is; a bug in the fused path (a wrong
mask, bias or layout) shows as an error of order 1. Rows cover an image-text batch and a
text-only one (an empty prefix: decoder queries with no valid key, which the model zeroes).
`--gin.ModelConfig.scan_layers=True` shortens the compiles.

The tests check the same on CPU (`tests/test_fast_step.py`, where fused runs through XLA); this
script is for the GPU, where the kernel is cuDNN's.
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simvlm_jax import gin_utils  # noqa: E402
from simvlm_jax.models import ModelConfig, SimVLM  # noqa: E402
from simvlm_jax.models.layers import fused_backend  # noqa: E402


def _inputs(config: ModelConfig, batch: int, length: int, text_only: bool):
  """(images or None, prefix, decoder inputs, positions): half the rows' text padded."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, config.image_size, config.image_size, 3)),
                       jnp.uint8)
  valid = np.where(np.arange(batch)[:, None] % 2 == 0, length, length // 2)
  tokens = lambda: np.where(np.arange(length)[None] < valid, rng.integers(
      2, config.vocab_size, (batch, length)), 0)
  prefix = tokens() * (0 if text_only else 1)  # text-only: an empty prefix
  dec = tokens()
  dec[:, 0] = 0  # the decoder's start token
  pos = np.broadcast_to(np.arange(length), (batch, length))
  return (None if text_only else images), jnp.asarray(prefix), jnp.asarray(dec), jnp.asarray(pos)


def logits_and_grads(config: ModelConfig, params, inputs):
  model = SimVLM(config)

  def loss(p):
    logits = model.apply({"params": p}, *inputs)
    return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 3]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return np.asarray(logits, np.float32), jax.tree.map(lambda g: np.asarray(g, np.float32), grads)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="tiny", help="tiny | base | large | huge")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=32)
  args, rest = p.parse_known_args()
  bindings = [a[len("--gin_bindings="):] for a in gin_utils.rewrite_gin_args(rest)
              if a.startswith("--gin_bindings=")]
  gin_utils.parse_gin([f"models/simvlm_{args.model}.gin"], bindings)
  base = dataclasses.replace(ModelConfig(), attention="plain", dtype="float32")  # the reference
  backend = fused_backend(jax.default_backend(), jnp.bfloat16, base.head_dim)
  print(f"device {jax.devices()[0].device_kind}; fused bf16 attention runs on "
        f"{backend or 'xla'}")
  # One set of weights for every case, initialised on the image-text rows.
  params = nn.meta.unbox(SimVLM(base).init(jax.random.PRNGKey(0), *_inputs(
      base, args.batch, args.length, False))["params"])
  worst = 0.0
  for text_only in (False, True):
    inputs = _inputs(base, args.batch, args.length, text_only)
    ref_logits, ref_grads = logits_and_grads(base, params, inputs)
    errors = {}
    for attention in ("plain", "fused"):
      config = dataclasses.replace(base, attention=attention, dtype="bfloat16")
      logits, grads = logits_and_grads(config, params, inputs)
      grad_err = max(jax.tree.leaves(jax.tree.map(rel_err, grads, ref_grads)))
      errors[attention] = (rel_err(logits, ref_logits), grad_err)
    kind = "text-only (empty prefix)" if text_only else "image-text"
    for attention, (logit_err, grad_err) in errors.items():
      print(f"{kind:25s} {attention:5s} bfloat16: logits rel. error {logit_err:.2e}, "
            f"gradients (worst leaf) {grad_err:.2e}")
    # Fused bf16 against plain bf16: each one's own rounding, the same order.
    worst = max(worst, errors["fused"][0] / max(errors["plain"][0], 1e-30))
  print(f"fused_backend={backend or 'xla'} fused_over_plain_bf16_logit_error={worst:.2f}")


if __name__ == "__main__":
  main()
