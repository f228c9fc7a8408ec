"""Image patchifiers: the ResNet conv stage of SimVLM, and the linear patch projection (ablation).

Both map `images: [batch, H, W, 3]` (float, normalised) to `[batch, (H/p)*(W/p), embed]`.
"""
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from simvlm_jax.models import layers

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


class PointwiseConv(nn.Module):
  """A 1x1 convolution (stride s: every s-th pixel) as a product over channels,
  `[b, h, w, c] -> [b, h/s, w/s, features]`, with nn.Conv's parameters (`kernel: [1, 1, c,
  features]`, `bias`), so checkpoints are the same.

  Through `layers.contract`'s flat gradients: XLA's CPU backend takes a 1x1 convolution's kernel
  gradient through a transposed copy of its input (with the norm before it recomputed inside),
  which made Base's conv stage backward 3.6x PyTorch's (benchmarks/RESULTS.md, "Conv stage").
  """
  features: int
  stride: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.he_normal(),
                                                               CONV_AXES),
                        (1, 1, channels, self.features), jnp.float32)
    x = x[:, ::self.stride, ::self.stride].astype(self.dtype)
    y = layers.contract(x, kernel.reshape(channels, self.features).astype(self.dtype), 1)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
  """(output size, low pad, high pad) of a SAME convolution or pool along one axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return out, total // 2, total - total // 2


def space_to_depth(x, s: int):
  """`[b, h, w, c] -> [b, h/s, w/s, s*s*c]`, each s x s block of pixels as channels (dy, dx, c)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // s, w // s, s * s * c)


class StridedConv(nn.Module):
  """A k x k convolution with stride s > 1 and SAME padding, `[b, h, w, c] -> [b, h/s, w/s,
  features]`, run as the equal stride-1 convolution over the space-to-depth input (the kernel
  zero-padded to a multiple of s and folded the same way), with nn.Conv's parameters (`kernel:
  [k, k, c, features]`, `bias`), so checkpoints are the same.

  Why: XLA's CPU backend runs the strided 7x7 stem on 3 channels at a tenth of its matrix-product
  rate; over 4 * 3 channels at stride 1 the forward is 4x faster and the kernel gradient 1.7x
  (benchmarks/RESULTS.md, "The stem and the max pool"). A kernel no larger than its stride (the
  final projection, linear patches) becomes one product over channels.
  """
  features: int
  kernel_size: int
  stride: int
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.stride
    b, h, w, channels = x.shape
    if h % s or w % s:
      raise ValueError(f"a stride-{s} convolution needs sides divisible by {s}, got {h}x{w}")
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.he_normal(),
                                                               CONV_AXES),
                        (k, k, channels, self.features), jnp.float32)
    # Output pixel o reads input pixel o*s + i - low = s*(o + a) + d: tap i becomes block offset
    # a in [a_lo, a_hi] and pixel d within the block.
    _, low, _ = _same_padding(h, k, s)
    a_lo, a_hi = -low // s, (k - 1 - low) // s
    taps = a_hi - a_lo + 1
    front = -(s * a_lo + low)
    folded = jnp.pad(kernel, ((front, s * taps - k - front),) * 2 + ((0, 0), (0, 0)))
    folded = folded.reshape(taps, s, taps, s, channels, self.features)
    folded = folded.transpose(0, 2, 1, 3, 4, 5).reshape(taps, taps, s * s * channels,
                                                         self.features).astype(self.dtype)
    x = space_to_depth(x.astype(self.dtype), s)
    if taps == 1:
      y = layers.contract(x, folded[0, 0], 1)
    else:
      y = jax.lax.conv_general_dilated(x, folded, (1, 1), ((-a_lo, a_hi),) * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _pool_views(x, window: int, stride: int, pad_value):
  """The window's `window**2` shifted strided views of x padded SAME, each `[b, h/s, w/s, c]`."""
  (oh, hl, hh), (ow, wl, wh) = (_same_padding(n, window, stride) for n in x.shape[1:3])
  x = jnp.pad(x, ((0, 0), (hl, hh), (wl, wh), (0, 0)), constant_values=pad_value)
  return [x[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
          for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x, window: int = 3, stride: int = 2):
  """SAME max pooling, `[b, h, w, c] -> [b, h/stride, w/stride, c]`, the gradient going to the
  first maximum of each window as nn.max_pool's does.

  Why not nn.max_pool: XLA's CPU backend runs its gradient (select-and-scatter) slowly, and the
  gradient of a maximum over shifted views recomputes the views' producer (the stem's norm) for
  every comparison; this one keeps which view won (`int8`) and scatters the gradient by it
  (benchmarks/RESULTS.md, "The stem and the max pool")."""
  return functools.reduce(jnp.maximum, _pool_views(x, window, stride, -jnp.inf))


def _max_pool_fwd(x, window, stride):
  views = _pool_views(x, window, stride, -jnp.inf)
  y, winner = views[0], jnp.zeros(views[0].shape, jnp.int8)
  for t, view in enumerate(views[1:], 1):
    winner = jnp.where(view > y, jnp.int8(t), winner)  # strictly greater: the first maximum wins
    y = jnp.maximum(y, view)
  return y, (winner, x.shape)


def _max_pool_bwd(window, stride, res, g):
  winner, shape = res
  (oh, hl, hh), (ow, wl, wh) = (_same_padding(n, window, stride) for n in shape[1:3])
  full = (shape[1] + hl + hh, shape[2] + wl + wh)
  padded = 0
  for t in range(window * window):  # each view's gradient put back where it was read: one fusion
    ij = divmod(t, window)
    config = [(0, 0, 0)] + [(o, n - o - (m - 1) * stride - 1, stride - 1)
                            for o, n, m in zip(ij, full, (oh, ow))] + [(0, 0, 0)]
    padded = padded + jax.lax.pad(jnp.where(winner == t, g, 0), jnp.zeros((), g.dtype), config)
  return (padded[:, hl:hl + shape[1], wl:wl + shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _conv(features: int, kernel: int, stride: int = 1, use_bias: bool = False, dtype=jnp.float32,
          name=None):
  if kernel == 1:
    return PointwiseConv(features, stride, use_bias, dtype, name=name)
  if stride > 1:
    return StridedConv(features, kernel, stride, use_bias, dtype, name=name)
  return nn.Conv(features, (kernel, kernel), padding="SAME",
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def _norm(channels: int, dtype, name=None, zero_init: bool = False):
  # GroupNorm: per-example statistics, so it behaves the same at batch 1 and under any sharding.
  scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
  return nn.GroupNorm(num_groups=math.gcd(32, channels), dtype=dtype, param_dtype=jnp.float32,
                      name=name,
                      scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class BottleneckBlock(nn.Module):
  """ResNet v1.5 bottleneck (stride on the 3x3 conv), `[b, h, w, c] -> [b, h/s, w/s, width]`."""
  width: int
  stride: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    mid = self.width // 4
    y = nn.relu(_norm(mid, self.dtype, "norm1")(_conv(mid, 1, dtype=self.dtype, name="conv1")(x)))
    y = _conv(mid, 3, self.stride, dtype=self.dtype, name="conv2")(y)
    y = nn.relu(_norm(mid, self.dtype, "norm2")(y))
    # Zero-initialised last norm: each block starts as the identity, which keeps deep stacks stable.
    y = _norm(self.width, self.dtype, "norm3", zero_init=True)(
        _conv(self.width, 1, dtype=self.dtype, name="conv3")(y))
    if x.shape[-1] != self.width or self.stride != 1:
      x = _conv(self.width, 1, self.stride, dtype=self.dtype, name="proj")(x)
      x = _norm(self.width, self.dtype, "proj_norm")(x)
    y = layers.DropPath()(y, self.drop_path_rate, deterministic)
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """SimVLM's conv stage: ResNet stem + the first `len(stage_widths)` stages, projected to embed.

  The stem has stride 4 and every stage after the first halves the resolution; a final strided
  projection makes up the rest of `patch_size`, so any number of stages yields the same token grid.
  """
  emb_dim: int
  patch_size: int
  stem_width: int
  stage_widths: Sequence[int]
  stage_blocks: Sequence[int]
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool):
    stride = 4 * 2 ** max(len(self.stage_widths) - 1, 0)
    if self.patch_size % stride:
      raise ValueError(f"patch_size {self.patch_size} is not a multiple of the conv stride {stride} "
                       f"of {len(self.stage_widths)} ResNet stages")
    x = _conv(self.stem_width, 7, 2, dtype=self.dtype, name="stem_conv")(images)
    x = nn.relu(_norm(self.stem_width, self.dtype, "stem_norm")(x))
    x = max_pool(x)
    for s, (width, blocks) in enumerate(zip(self.stage_widths, self.stage_blocks)):
      for b in range(blocks):
        x = BottleneckBlock(width, stride=2 if (s > 0 and b == 0) else 1,
                            drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                            name=f"stage{s}_block{b}")(x, deterministic)
    rest = self.patch_size // stride
    x = _conv(self.emb_dim, rest, rest, use_bias=True, dtype=self.dtype, name="proj")(x)
    b, h, w, e = x.shape
    return x.reshape(b, h * w, e)


class LinearPatchify(nn.Module):
  """ViT's linear patch projection: one `patch_size x patch_size` conv with stride `patch_size`."""
  emb_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool):
    del deterministic
    x = _conv(self.emb_dim, self.patch_size, self.patch_size, use_bias=True, dtype=self.dtype,
              name="proj")(images)
    b, h, w, e = x.shape
    return x.reshape(b, h * w, e)
