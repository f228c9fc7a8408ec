"""Model hyperparameters, set from gin (`gin/models/*.gin`)."""
import dataclasses
from typing import Sequence

import gin
import jax
import jax.numpy as jnp

from simvlm_jax.errors import UserError
from simvlm_jax.models.layers import ATTENTION_PRODUCTS, MLP_PRODUCTS

_policies = jax.checkpoint_policies
# What a rematerialised Transformer layer keeps from its forward pass for the backward pass; the
# rest is recomputed there from the layer's input. Kept by name (`layers.ATTENTION_PRODUCTS`,
# `layers.MLP_PRODUCTS`): the products are custom_vjps, invisible to the `dot_general` policies.
#   "none":            no rematerialisation: everything the backward pass needs is kept.
#   "full":            only the layer's input (and parameters); everything else is recomputed.
#   "dots_saveable":   every weight product (query/key/value projections, attention output, the
#                      MLP's two): the elementwise work (norms, GELU, softmax) and the attention
#                      score products (batched, quadratic in length) are recomputed, as with
#                      `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`.
#   "dots_except_mlp": the attention's weight products only; the MLP, the widest activations, is
#                      recomputed (MaxText's "save_dot_except_mlp").
# A product the backward pass never reads (e.g. "mlp_out", added to the residual) is not kept.
REMAT_POLICIES = {
    "none": None,
    "full": _policies.nothing_saveable,
    "dots_saveable": _policies.save_only_these_names(*ATTENTION_PRODUCTS, *MLP_PRODUCTS),
    "dots_except_mlp": _policies.save_only_these_names(*ATTENTION_PRODUCTS),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Dimensions and switches of a SimVLM model.

  `architecture` is "encoder_decoder" (the paper's main model) or "decoder_only" (one stack of
  `num_encoder_layers + num_decoder_layers` layers, bidirectional over the prefix and causal over the
  rest, so both variants have the same depth budget).
  """
  vocab_size: int = 32128
  emb_dim: int = 768
  num_heads: int = 12
  head_dim: int = 64
  mlp_dim: int = 3072
  num_encoder_layers: int = 12
  num_decoder_layers: int = 12
  architecture: str = "encoder_decoder"
  max_text_len: int = 128  # size of the learned 1D text position table.
  # Image side. Total stride of the patchifier is `patch_size`: image_size / patch_size tokens a side.
  image_size: int = 224
  patch_size: int = 16
  patchifier: str = "resnet"  # or "linear": a plain strided patch projection (the ablation).
  resnet_stem_width: int = 64
  resnet_stage_widths: Sequence[int] = (256, 512, 1024)
  resnet_stage_blocks: Sequence[int] = (3, 4, 6)
  image_relative_position: bool = True  # 2D relative position bias between image tokens.
  # Images per example (NLVR2's finetuning sets 2 for its pair). Above 1, each image's tokens get
  # a learned embedding of its index, so the decoder can tell "the left image" from "the right".
  max_images: int = 1
  # Regularisation (off in pretraining; the finetuning gin files switch it on).
  dropout_rate: float = 0.0
  stochastic_depth_rate: float = 0.0  # conv stage and encoder (and decoder-only stack).
  decoder_stochastic_depth_rate: float = 0.0
  num_classes: int = 0  # > 0: a classifier head on the decoder (SimVLM's VQA classifier).
  dtype: str = "float32"  # activations and matmuls ("bfloat16"); parameters stay float32.
  attention: str = "plain"  # or "fused": jax.nn.dot_product_attention (cuDNN flash on GPU, bf16).
  remat: str = "none"  # rematerialise each layer: a key of REMAT_POLICIES (what each keeps).
  scan_layers: bool = False  # nn.scan over layers: compile time flat in depth.

  def __post_init__(self):
    if self.architecture not in ("encoder_decoder", "decoder_only"):
      raise UserError(f"architecture must be 'encoder_decoder' or 'decoder_only', got {self.architecture!r}")
    if self.patchifier not in ("resnet", "linear"):
      raise UserError(f"patchifier must be 'resnet' or 'linear', got {self.patchifier!r}")
    if self.image_size % self.patch_size:
      raise UserError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.attention not in ("plain", "fused"):
      raise UserError(f"attention must be 'plain' or 'fused', got {self.attention!r}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    if self.max_images < 1:
      raise UserError(f"max_images must be at least 1, got {self.max_images}")
    if self.max_images > 1 and self.architecture != "encoder_decoder":
      raise UserError("several images per example (max_images > 1) need the encoder-decoder "
                      "architecture")
    if len(self.resnet_stage_widths) != len(self.resnet_stage_blocks):
      raise UserError("resnet_stage_widths and resnet_stage_blocks must have the same length")

  @property
  def grid_size(self) -> int:
    """Image tokens per side."""
    return self.image_size // self.patch_size

  @property
  def num_image_tokens(self) -> int:
    return self.grid_size ** 2

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)
