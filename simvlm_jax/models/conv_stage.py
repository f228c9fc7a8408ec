"""Image patchifiers: the ResNet conv stage of SimVLM, and the linear patch projection (ablation).

Both map `images: [batch, H, W, 3]` (float, normalised) to `[batch, (H/p)*(W/p), embed]`.
"""
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


def _conv(features: int, kernel: int, stride: int = 1, use_bias: bool = False, dtype=jnp.float32,
          name=None):
  if kernel == 1:
    return PointwiseConv(features, stride, use_bias, dtype, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
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
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
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
