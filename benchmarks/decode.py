r"""Decoding benchmark: tokens/s of greedy and beam search with the KV cache.

  python benchmarks/decode.py --models=tiny,base

For each model (random weights: speed does not depend on them), method (greedy, beam 4) and batch
(1, 32), times the jitted decode of `--tokens` tokens (median of `--repeats` runs after compiling)
with early stopping disabled (EOS is masked out), and prints generated tokens/s. It also prints the
time ratio of decoding 64 tokens to decoding 8: with the cache the per-token cost stays flat, so the
ratio stays near 8, not near 64 as recomputing the prefix at every step would give.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simvlm_jax import decoding, gin_utils  # noqa: E402
from simvlm_jax.models import ModelConfig, SimVLM  # noqa: E402


def _never_eos(model: SimVLM) -> SimVLM:
  """The same model with EOS logits pushed down, so every run decodes the full length."""
  class NoEos(SimVLM):
    def decode(self, *args, **kwargs):
      logits = super().decode(*args, **kwargs)
      return logits.at[..., decoding.EOS_ID].set(-1e9)
  return NoEos(model.config)


def time_decode(model, params, batch: int, tokens: int, method: str, repeats: int) -> float:
  size = model.config.image_size
  images = jnp.zeros((batch, size, size, 3), jnp.uint8)
  prompt = jnp.tile(jnp.array([[5, 6, 7]], jnp.int32), (batch, 1))
  fn = jax.jit(decoding.make_decode_fn(model, method=method, max_decode_length=tokens,
                                       beam_size=4))
  jax.block_until_ready(fn(params, images, prompt).tokens)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(params, images, prompt).tokens)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="tiny,base")
  p.add_argument("--batches", default="1,32")
  p.add_argument("--tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  for name in args.models.split(","):
    gin_utils.parse_gin([f"models/simvlm_{name}.gin"], [])
    config = ModelConfig()
    model = _never_eos(SimVLM(config))
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, config.image_size, config.image_size, 3), jnp.uint8),
        jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype),
                          shapes["params"])
    for method in ("greedy", "beam"):
      for batch in (int(b) for b in args.batches.split(",")):
        t = time_decode(model, params, batch, args.tokens, method, args.repeats)
        print(f"model={name} method={method}{'4' if method == 'beam' else ''} batch={batch} "
              f"tokens={args.tokens} time_s={t:.3f} tokens_per_s={batch * args.tokens / t:.1f}",
              flush=True)
    t8 = time_decode(model, params, 1, 8, "greedy", args.repeats)
    t64 = time_decode(model, params, 1, 64, "greedy", args.repeats)
    print(f"model={name} greedy batch=1 time_64_over_8={t64 / t8:.2f} (8 = flat per-token cost)",
          flush=True)
    gin.clear_config()


if __name__ == "__main__":
  main()
