"""Building blocks with logical axis names on every parameter.

Parameter axes: embed, mlp, heads, kv, vocab, relpos_buckets, image_pos, text_pos, conv_height,
conv_width, conv_in, conv_out. Activation axes: batch, length, embed, mlp, heads, kv, vocab.
`simvlm_jax/partitioning.py` maps these names to mesh axes; nothing here names a mesh axis.
"""
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import ad_checkpoint

Array = jax.Array
NEG_INF = -1e10  # finite, so a row with every key masked gives a uniform softmax, not NaN.

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

# The `jax.ad_checkpoint.checkpoint_name`s of a layer's weight products, which the remat policies
# (`config.REMAT_POLICIES`) keep or recompute by name: `_product` is a custom_vjp, so a policy
# that looks for `dot_general`s (`dots_with_no_batch_dims_saveable`) never sees one.
ATTENTION_PRODUCTS = ("query_proj", "key_proj", "value_proj", "attention_out")
MLP_PRODUCTS = ("mlp_in", "mlp_out")


def fused_backend(platform: str, dtype: Any, head_dim: int) -> Optional[str]:
  """The `implementation` of `jax.nn.dot_product_attention` for fused attention: "cudnn" (flash
  attention) on GPU where cuDNN takes the inputs (half precision, head_dim a multiple of 8 up to
  128), else None (XLA). JAX's own default, None, never picks cuDNN."""
  if (platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  return None


def constrain(x: Array, axes: Sequence[Optional[str]]) -> Array:
  """Annotates an activation with logical axis names (a no-op outside a mesh context)."""
  return nn.with_logical_constraint(x, tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _product(x: Array, w: Array, w_rows_out: bool) -> Array:
  """`x: [rows, in]` times `w: [in, out]`, or `w: [out, in]` when `w_rows_out`, -> `[rows, out]`,
  its gradients two plain matrix products (`dx = g w^T`, `dw = x^T g`). Left to autodiff, XLA's
  CPU backend fuses the derivative of what comes before into a transposed copy of an operand of
  the weight gradient: an MLP block's backward took 40% longer than its products, a 1x1
  convolution's 3x (benchmarks/RESULTS.md, "Dense gradients", "Conv stage")."""
  return jax.lax.dot_general(x, w, (((1,), (1 if w_rows_out else 0,)), ((), ())))


def _product_fwd(x, w, w_rows_out):
  return _product(x, w, w_rows_out), (x, w)


def _product_bwd(w_rows_out, residuals, g):
  x, w = residuals
  dx = jax.lax.dot_general(g, w, (((1,), (0 if w_rows_out else 1,)), ((), ())))
  dw = (jax.lax.dot_general(g, x, (((0,), (0,)), ((), ()))) if w_rows_out else
        jax.lax.dot_general(x, g, (((0,), (0,)), ((), ()))))
  return dx.astype(x.dtype), dw.astype(w.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def contract(x: Array, kernel: Array, in_axes: int) -> Array:
  """`x: [..., *in] . kernel: [*in, *out] -> [..., *out]`, the trailing `in_axes` dims contracted,
  as one flat product (`_product`'s gradients)."""
  size_in = int(np.prod(kernel.shape[:in_axes]))
  lead, out = x.shape[:x.ndim - in_axes], kernel.shape[in_axes:]
  y = _product(x.reshape(-1, size_in), kernel.reshape(size_in, -1), False)
  return y.reshape(lead + out)


def contract_rows(x: Array, table: Array) -> Array:
  """`x: [..., embed] . table: [rows, embed] -> [..., rows]` (the tied output layer's logits), as
  `contract` with no transposed copy of the table."""
  return _product(x.reshape(-1, x.shape[-1]), table, True).reshape(x.shape[:-1] + table.shape[:1])


class Dense(nn.Module):
  """A bias-free projection `[..., *in_dims] -> [..., *features]` with named kernel axes.

  `checkpoint_name`: the name a remat policy keeps (or recomputes) the output by.
  """
  features: Sequence[int]
  kernel_axes: Sequence[str]
  in_axes: int = 1  # how many trailing input dims are contracted.
  dtype: Any = jnp.float32
  kernel_init: Callable = default_kernel_init
  checkpoint_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = tuple(self.features)
    in_shape = x.shape[-self.in_axes:]
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self._init, tuple(self.kernel_axes)),
        tuple(in_shape) + features, jnp.float32)
    y = contract(x.astype(self.dtype), kernel.astype(self.dtype), self.in_axes)
    if self.checkpoint_name:
      y = ad_checkpoint.checkpoint_name(y, self.checkpoint_name)
    return y

  def _init(self, key, shape, dtype):
    # Fan-in is the product of the contracted dims, so reshape to 2D for the initializer.
    fan_in = int(np.prod(shape[:self.in_axes]))
    return self.kernel_init(key, (fan_in, int(np.prod(shape[self.in_axes:]))), dtype).reshape(shape)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, with scale and bias named `embed`."""
  dtype: Any = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (features,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (features,), jnp.float32)
    x32 = x.astype(jnp.float32)  # statistics in fp32 even under bf16 activations.
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per example. `x: [batch, ...]`.

  `rate` may be a traced scalar (layers under nn.scan each get their own).
  """

  @nn.compact
  def __call__(self, x: Array, rate, deterministic: bool) -> Array:
    if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
      return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class MlpBlock(nn.Module):
  """GELU MLP `[batch, length, embed] -> [batch, length, embed]`."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    emb_dim = x.shape[-1]
    h = Dense((self.mlp_dim,), ("embed", "mlp"), dtype=self.dtype, checkpoint_name="mlp_in",
              name="wi")(x)
    h = constrain(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return Dense((emb_dim,), ("mlp", "embed"), dtype=self.dtype, checkpoint_name="mlp_out",
                 name="wo")(h)


def relative_position_index(grid_size: int) -> np.ndarray:
  """`[grid**2, grid**2]` bucket ids of the 2D offset (dy, dx) between two image tokens."""
  coords = np.stack(np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij"), -1)
  coords = coords.reshape(-1, 2)
  delta = coords[:, None, :] - coords[None, :, :] + (grid_size - 1)  # in [0, 2g-2]
  return delta[..., 0] * (2 * grid_size - 1) + delta[..., 1]


class ImageRelativePositionBias(nn.Module):
  """Learned 2D relative position bias among image tokens, per head.

  Returns `[heads, q_len, kv_len]` with the bias in the leading `grid**2 x grid**2` block (image
  tokens come first in every sequence) and zeros elsewhere.
  """
  grid_size: int
  num_heads: int

  @nn.compact
  def __call__(self, q_len: int, kv_len: int) -> Array:
    num_buckets = (2 * self.grid_size - 1) ** 2
    table = self.param("rel_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                ("relpos_buckets", "heads")),
                       (num_buckets, self.num_heads), jnp.float32)
    n = self.grid_size ** 2
    bias = jnp.take(table, relative_position_index(self.grid_size), axis=0)  # [n, n, heads]
    bias = jnp.transpose(bias, (2, 0, 1))
    return jnp.pad(bias, ((0, 0), (0, q_len - n), (0, kv_len - n)))


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention, with a key/value cache for step-by-step decoding.

  `q_in: [batch, q_len, embed]`, `kv_in: [batch, kv_len, embed]`, `mask: [batch, q_len, kv_len]`
  (True = may attend), `bias: [heads, q_len, kv_len]` or None.

  Cache modes (the 'cache' collection, created by the first call with `mutable=['cache']`):
    "self":  keys/values of `kv_in` are written at `cache_index` into a `[batch, heads,
             cache_length, kv]` buffer and the queries attend over the whole buffer; `mask` then
             covers the buffer, `[batch, q_len, cache_length]`.
    "cross": keys/values of `kv_in` (the encoder output) are projected on the first call only and
             reused by every later step.

  `implementation`: "plain" (einsum + softmax) or "fused" (`jax.nn.dot_product_attention`: cuDNN
  flash attention on GPU where `fused_backend` allows, XLA elsewhere). Attention dropout needs the
  plain path, so "fused" falls back to it while dropout is active.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  implementation: str = "plain"

  @nn.compact
  def __call__(self, q_in: Array, kv_in: Array, mask: Array, bias: Optional[Array] = None,
               deterministic: bool = True, cache: Optional[str] = None,
               cache_length: int = 0) -> Array:
    emb_dim = q_in.shape[-1]
    proj = lambda name: Dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                              dtype=self.dtype, checkpoint_name=f"{name}_proj", name=name)
    q = proj("query")(q_in) / np.sqrt(self.head_dim).astype(self.dtype)
    q = constrain(q, ("batch", "length", "heads", "kv"))
    key_proj, value_proj = proj("key"), proj("value")
    # Cached keys/values are kept `[batch, heads, length, kv]` (heads-major), so each decoding
    # step's products read them in place: kept `[batch, length, heads, kv]`, XLA's CPU backend
    # transposed every layer's cache at every step (most of a batched Base beam search's time).
    # Training keeps the projections' own layout (a transpose there made the step slower).
    kv_axes, kv_names = (("bhkd", ("batch", "heads", "length", "kv")) if cache else
                         ("bkhd", ("batch", "length", "heads", "kv")))
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)
    if cache == "cross":
      k = self.variable("cache", "cross_key", lambda: heads_major(key_proj(kv_in))).value
      v = self.variable("cache", "cross_value", lambda: heads_major(value_proj(kv_in))).value
    elif cache == "self":
      k, v = self._update_cache(heads_major(key_proj(kv_in)), heads_major(value_proj(kv_in)),
                                cache_length)
    else:
      k, v = key_proj(kv_in), value_proj(kv_in)
    k, v = constrain(k, kv_names), constrain(v, kv_names)
    if self.implementation == "fused" and (deterministic or self.dropout_rate == 0.0):
      if cache:  # the kernel's [batch, length, heads, kv]
        k, v = heads_major(k), heads_major(v)
      out = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias[None].astype(q.dtype),
          mask=mask[:, None], scale=1.0,
          implementation=fused_backend(jax.default_backend(), q.dtype, self.head_dim))
      # As below: a query with no valid key reads nothing (the fused kernel would average).
      out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0).astype(self.dtype)
    else:
      logits = jnp.einsum(f"bqhd,{kv_axes}->bhqk", q, k).astype(jnp.float32)
      if bias is not None:
        logits = logits + bias[None]
      logits = jnp.where(mask[:, None], logits, NEG_INF)
      probs = jax.nn.softmax(logits, axis=-1)
      # A query with every key masked (e.g. cross-attention to an empty text-only prefix) would
      # get a uniform average over padding; zero it instead, so padding never contributes.
      probs = jnp.where(mask[:, None], probs, 0.0).astype(self.dtype)
      probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
      out = jnp.einsum(f"bhqk,{kv_axes}->bqhd", probs, v)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    return Dense((emb_dim,), ("heads", "kv", "embed"), in_axes=2, dtype=self.dtype,
                 checkpoint_name="attention_out", name="out")(out)

  def _update_cache(self, k: Array, v: Array, cache_length: int) -> Tuple[Array, Array]:
    """Writes `k, v: [batch, heads, q_len, kv]` at the cache index; returns the full buffers
    `[batch, heads, cache_length, kv]`."""
    shape = k.shape[:2] + (cache_length, k.shape[3])
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    start = (0, 0, index.value, 0)
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, start)
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, start)
    index.value = index.value + k.shape[2]
    return cached_k.value, cached_v.value


class Embed(nn.Module):
  """Token embedding `[batch, length] -> [batch, length, embed]`, also the tied output layer."""
  vocab_size: int
  emb_dim: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.vocab_size, self.emb_dim), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """Logits `[batch, length, vocab]` from `[batch, length, embed]` (scaled, as in T5 with tying)."""
    # Scaled before the product: a pass over `[batch, length, embed]`, not over the logits.
    x = x.astype(self.dtype) / np.sqrt(self.emb_dim).astype(self.dtype)
    return contract_rows(x, self.embedding.astype(self.dtype))


class PositionEmbedding(nn.Module):
  """A learned 1D position table `[num_positions, embed]`, looked up by position ids."""
  num_positions: int
  emb_dim: int
  axis_name: str
  init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, positions: Array) -> Array:
    table = self.param("embedding",
                       nn.with_logical_partitioning(self.init, (self.axis_name, "embed")),
                       (self.num_positions, self.emb_dim), jnp.float32)
    return jnp.take(table, positions, axis=0, mode="clip")
