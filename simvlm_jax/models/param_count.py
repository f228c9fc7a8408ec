"""Parameter counts of the model sizes in `gin/models`, without allocating any parameters.

  python -m simvlm_jax.models.param_count [GIN_FILE ...]

prints one line per size, e.g.
  simvlm_base: 123,456,789 params (encoder ..., decoder ..., conv stage ..., embeddings ...)
Shapes come from `jax.eval_shape` on `SimVLM.init`, so even Huge costs no memory.
"""
import glob
import os
import sys
from typing import Dict, Optional, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax.models.config import ModelConfig
from simvlm_jax.models.simvlm import SimVLM

GIN_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "gin", "models")
_SIZE_ORDER = ("tiny", "base", "large", "huge")

# Top-level parameter collections of SimVLM -> the part they are reported under.
_PARTS = {"encoder": "encoder", "decoder": "decoder", "stack": "stack", "patchify": "conv stage",
          "token_embed": "embeddings", "text_positions": "embeddings",
          "image_positions": "embeddings"}


def abstract_params(config: ModelConfig):
  """The (unboxed) parameter tree of `SimVLM(config)` as ShapeDtypeStructs."""
  model = SimVLM(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)

  def init(rng, images, tokens):
    # With an image, so the image position table and the relative position bias are created too.
    return model.init(rng, images, tokens, tokens, tokens)["params"]

  return nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), images, tokens))


def _size(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def count_params_by_part(config: ModelConfig) -> Dict[str, int]:
  """Parameter counts per part: encoder, decoder (or stack), conv stage, embeddings."""
  counts: Dict[str, int] = {}
  for name, sub in abstract_params(config).items():
    part = _PARTS.get(name, name)
    counts[part] = counts.get(part, 0) + _size(sub)
  return counts


def count_params(config: ModelConfig) -> int:
  """Total number of parameters of `SimVLM(config)` (via `jax.eval_shape`; nothing allocated)."""
  return _size(abstract_params(config))


def config_from_gin(path: str) -> ModelConfig:
  """The ModelConfig a model gin file defines, parsed in isolation (gin is cleared before/after)."""
  gin.clear_config()
  try:
    gin.parse_config_file(path, skip_unknown=True)
    return ModelConfig()
  finally:
    gin.clear_config()


def _gin_files(directory: str = GIN_MODELS_DIR) -> Sequence[str]:
  def order(path):
    name = os.path.splitext(os.path.basename(path))[0]
    size = name.rsplit("_", 1)[-1]
    return (_SIZE_ORDER.index(size) if size in _SIZE_ORDER else len(_SIZE_ORDER), name)
  return sorted(glob.glob(os.path.join(directory, "*.gin")), key=order)


def format_counts(name: str, counts: Dict[str, int]) -> str:
  total = sum(counts.values())
  parts = ", ".join(f"{part} {n:,}" for part, n in counts.items())
  return f"{name}: {total:,} params ({parts})"


def _ordered(counts: Dict[str, int]) -> Dict[str, int]:
  keys = [k for k in ("encoder", "decoder", "stack", "conv stage", "embeddings") if k in counts]
  keys += [k for k in counts if k not in keys]
  return {k: counts[k] for k in keys}


def main(argv: Optional[Sequence[str]] = None) -> None:
  paths = list(argv if argv is not None else sys.argv[1:]) or _gin_files()
  if not paths:
    raise SystemExit(f"no gin files found in {GIN_MODELS_DIR}")
  for path in paths:
    name = os.path.splitext(os.path.basename(path))[0]
    print(format_counts(name, _ordered(count_params_by_part(config_from_gin(path)))), flush=True)


if __name__ == "__main__":
  main()
