"""Pre-LayerNorm Transformer layers and stacks.

Shapes: `x: [batch, length, embed]`; masks `[batch, q_len, kv_len]` with True = may attend.

A stack runs its layers in a Python loop (parameters `layer_0`, `layer_1`, ...) or, with
`scan_layers`, under `nn.scan` (parameters stacked along a leading `layers` axis), which keeps
compile time flat in depth. Each layer's stochastic-depth rate is an argument, not an attribute, so
scanned layers can differ in it.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simvlm_jax.models import layers
from simvlm_jax.models.config import REMAT_POLICIES

Array = jax.Array


class EncoderLayer(nn.Module):
  """Self-attention (mask given: bidirectional, prefix-LM or causal) + MLP.

  `with_image`: the queries start with `image_grid_size**2` image tokens. `cache_length > 0`
  (decoder-only decoding): keys/values go to a self-attention cache of that length and `mask` is
  `[batch, q_len, cache_length]`.
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  image_grid_size: int = 0  # > 0: learn a 2D relative position bias among the image tokens.
  dtype: Any = jnp.float32
  attention: str = "plain"
  with_image: bool = False
  deterministic: bool = True
  cache_length: int = 0
  scanned: bool = False  # return (x, None), as nn.scan wants.

  @nn.compact
  def __call__(self, x: Array, mask: Array, drop_path_rate) -> Array:
    bias = None
    if self.image_grid_size and self.with_image:
      bias = layers.ImageRelativePositionBias(self.image_grid_size, self.num_heads,
                                              name="image_relpos")(x.shape[1], mask.shape[-1])
    det = self.deterministic
    drop = lambda y: layers.DropPath()(nn.Dropout(self.dropout_rate)(y, deterministic=det),
                                       drop_path_rate, det)
    h = layers.LayerNorm(dtype=self.dtype, name="pre_attention_norm")(x)
    h = layers.MultiHeadAttention(self.num_heads, self.head_dim, self.dropout_rate, self.dtype,
                                  self.attention, name="self_attention")(
                                      h, h, mask, bias, det,
                                      cache="self" if self.cache_length else None,
                                      cache_length=self.cache_length)
    x = x + drop(h)
    h = layers.LayerNorm(dtype=self.dtype, name="pre_mlp_norm")(x)
    h = layers.MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(h, det)
    x = layers.constrain(x + drop(h), ("batch", "length", "embed"))
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Causal self-attention + cross-attention to the encoder + MLP.

  `cache_length > 0`: decode with caches (self-attention of that length, cross-attention
  keys/values projected once); `self_mask` is then `[batch, q_len, cache_length]`.
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention: str = "plain"
  deterministic: bool = True
  cache_length: int = 0
  scanned: bool = False

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
               drop_path_rate) -> Array:
    decode, det = self.cache_length > 0, self.deterministic
    drop = lambda z: layers.DropPath()(nn.Dropout(self.dropout_rate)(z, deterministic=det),
                                       drop_path_rate, det)
    attn = lambda name: layers.MultiHeadAttention(self.num_heads, self.head_dim, self.dropout_rate,
                                                  self.dtype, self.attention, name=name)
    h = layers.LayerNorm(dtype=self.dtype, name="pre_self_attention_norm")(y)
    y = y + drop(attn("self_attention")(h, h, self_mask, None, det,
                                        cache="self" if decode else None,
                                        cache_length=self.cache_length))
    h = layers.LayerNorm(dtype=self.dtype, name="pre_cross_attention_norm")(y)
    y = y + drop(attn("encoder_decoder_attention")(h, encoded, cross_mask, None, det,
                                                   cache="cross" if decode else None))
    h = layers.LayerNorm(dtype=self.dtype, name="pre_mlp_norm")(y)
    y = y + drop(layers.MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(h, det))
    y = layers.constrain(y, ("batch", "length", "embed"))
    return (y, None) if self.scanned else y


def _drop_path_rates(rate: float, depth: int):
  # Linearly increasing with depth, as in the stochastic depth paper.
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


def rematerialised(layer_cls, remat: str):
  """`layer_cls` as is (`remat="none"`), or rematerialised: its backward pass keeps what
  `REMAT_POLICIES[remat]` keeps of the forward pass and recomputes the rest."""
  return layer_cls if remat == "none" else nn.remat(layer_cls, policy=REMAT_POLICIES[remat])


def _run_layers(layer_cls, num_layers: int, remat: str, scan: bool, rate: float, carry,
                broadcast_args, **layer_kwargs):
  """Applies `num_layers` layers to `carry` (looped or scanned, optionally rematerialised)."""
  cls = rematerialised(layer_cls, remat)
  rates = _drop_path_rates(rate, num_layers)
  if scan:
    stack = nn.scan(cls, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(broadcast_args) + (0,), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    carry, _ = stack(scanned=True, name="layers", **layer_kwargs)(
        carry, *broadcast_args, jnp.asarray(rates, jnp.float32))
    return carry
  for i in range(num_layers):
    carry = cls(name=f"layer_{i}", **layer_kwargs)(carry, *broadcast_args, rates[i])
  return carry


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
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array, with_image: bool, deterministic: bool,
               cache_length: int = 0) -> Array:
    x = _run_layers(EncoderLayer, self.num_layers, self.remat, self.scan_layers,
                    self.drop_path_rate, x, (mask,), num_heads=self.num_heads,
                    head_dim=self.head_dim, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                    image_grid_size=self.image_grid_size, dtype=self.dtype,
                    attention=self.attention, with_image=with_image, deterministic=deterministic,
                    cache_length=cache_length)
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
  scan_layers: bool = False

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
               deterministic: bool, cache_length: int = 0) -> Array:
    y = _run_layers(DecoderLayer, self.num_layers, self.remat, self.scan_layers,
                    self.drop_path_rate, y, (encoded, self_mask, cross_mask),
                    num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
                    dropout_rate=self.dropout_rate, dtype=self.dtype, attention=self.attention,
                    deterministic=deterministic, cache_length=cache_length)
    return layers.LayerNorm(dtype=self.dtype, name="final_norm")(y)
