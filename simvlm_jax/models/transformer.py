"""Pre-LayerNorm Transformer layers and stacks.

Shapes: `x: [batch, length, embed]`; masks `[batch, q_len, kv_len]` with True = may attend.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simvlm_jax.models import layers
from simvlm_jax.models.config import REMAT_POLICIES

Array = jax.Array


class EncoderLayer(nn.Module):
  """Self-attention (mask given: bidirectional, prefix-LM or causal) + MLP."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  image_grid_size: int = 0  # > 0: learn a 2D relative position bias among the image tokens.
  dtype: Any = jnp.float32
  attention: str = "plain"

  @nn.compact
  def __call__(self, x: Array, mask: Array, with_image: bool, deterministic: bool,
               cache_length: int = 0) -> Array:
    """`with_image`: the queries start with `image_grid_size**2` image tokens.

    `cache_length > 0` (decoder-only decoding): keys/values go to a self-attention cache of that
    length and `mask` is `[batch, q_len, cache_length]`.
    """
    bias = None
    if self.image_grid_size and with_image:
      bias = layers.ImageRelativePositionBias(self.image_grid_size, self.num_heads,
                                              name="image_relpos")(x.shape[1], mask.shape[-1])
    drop = lambda y: layers.DropPath(self.drop_path_rate)(
        nn.Dropout(self.dropout_rate)(y, deterministic=deterministic), deterministic)
    h = layers.LayerNorm(dtype=self.dtype, name="pre_attention_norm")(x)
    h = layers.MultiHeadAttention(self.num_heads, self.head_dim, self.dropout_rate, self.dtype,
                                  self.attention, name="self_attention")(
                                      h, h, mask, bias, deterministic,
                                      cache="self" if cache_length else None,
                                      cache_length=cache_length)
    x = x + drop(h)
    h = layers.LayerNorm(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = layers.MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(h, deterministic)
    x = x + drop(h)
    return layers.constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
  """Causal self-attention + cross-attention to the encoder + MLP."""
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "plain"

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
               deterministic: bool, cache_length: int = 0) -> Array:
    """`cache_length > 0`: decode with caches (self-attention of that length, cross-attention
    keys/values projected once); `self_mask` is then `[batch, q_len, cache_length]`."""
    decode = cache_length > 0
    drop = lambda z: layers.DropPath(self.drop_path_rate)(
        nn.Dropout(self.dropout_rate)(z, deterministic=deterministic), deterministic)
    attn = lambda name: layers.MultiHeadAttention(self.num_heads, self.head_dim, self.dropout_rate,
                                                  self.dtype, self.attention, name=name)
    h = layers.LayerNorm(dtype=self.dtype, name="pre_self_attention_norm")(y)
    y = y + drop(attn("self_attention")(h, h, self_mask, None, deterministic,
                                        cache="self" if decode else None,
                                        cache_length=cache_length))
    h = layers.LayerNorm(dtype=self.dtype, name="pre_cross_attention_norm")(y)
    y = y + drop(attn("encoder_decoder_attention")(h, encoded, cross_mask, None, deterministic,
                                                   cache="cross" if decode else None))
    h = layers.LayerNorm(dtype=self.dtype, name="pre_mlp_norm")(y)
    y = y + drop(layers.MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(
        h, deterministic))
    return layers.constrain(y, ("batch", "length", "embed"))


def _maybe_remat(layer_cls, remat: str):
  """The layer class, rematerialised under the named policy (`config.REMAT_POLICIES`)."""
  if remat == "none":
    return layer_cls
  # Static: the Python flags after the arrays (counting self as 0): with_image/deterministic/
  # cache_length for encoder layers, deterministic/cache_length for decoder layers.
  static = (3, 4, 5) if layer_cls is EncoderLayer else (5, 6)
  return nn.remat(layer_cls, policy=REMAT_POLICIES[remat], static_argnums=static)


def _drop_path_rates(rate: float, depth: int):
  # Linearly increasing with depth, as in the stochastic depth paper.
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


class Encoder(nn.Module):
  """A stack of EncoderLayers with a final LayerNorm (also the decoder-only stack)."""
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  image_grid_size: int = 0
  dtype: Any = jnp.float32
  attention: str = "plain"
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, mask: Array, with_image: bool, deterministic: bool,
               cache_length: int = 0) -> Array:
    for i, rate in enumerate(_drop_path_rates(self.drop_path_rate, self.num_layers)):
      x = _maybe_remat(EncoderLayer, self.remat)(
          self.num_heads, self.head_dim, self.mlp_dim, self.dropout_rate, rate,
          self.image_grid_size, self.dtype, self.attention, name=f"layer_{i}")(
                           x, mask, with_image, deterministic, cache_length)
    return layers.LayerNorm(dtype=self.dtype, name="final_norm")(x)


class Decoder(nn.Module):
  """A stack of DecoderLayers with a final LayerNorm."""
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "plain"
  remat: str = "none"

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
               deterministic: bool, cache_length: int = 0) -> Array:
    for i, rate in enumerate(_drop_path_rates(self.drop_path_rate, self.num_layers)):
      y = _maybe_remat(DecoderLayer, self.remat)(
          self.num_heads, self.head_dim, self.mlp_dim, self.dropout_rate, rate, self.dtype,
          self.attention, name=f"layer_{i}")(y, encoded, self_mask, cross_mask, deterministic,
                                              cache_length)
    return layers.LayerNorm(dtype=self.dtype, name="final_norm")(y)
