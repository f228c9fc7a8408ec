"""The SimVLM model: conv-stage image tokens + text tokens -> Transformer -> next-token logits.

Entry points (all shapes static):
  encode(images, prefix_tokens)      -> encoded [batch, Ti + Lp, embed], encoder_mask [batch, Ti + Lp]
  decode(encoded, encoder_mask, decoder_input_tokens, decoder_positions) -> logits [batch, Ld, vocab]
  __call__(...)                      -> both.
`images` is uint8 `[batch, H, W, 3]` (normalised here, on device) or None for text-only rows, in
which case the encoder sees only the text prefix (Ti = 0). Token id 0 is padding.
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax.models import conv_stage, layers, transformer
from simvlm_jax.models.config import ModelConfig

Array = jax.Array
# ImageNet statistics: the conv stage is a ResNet and expects inputs on that scale.
_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


class SimVLM(nn.Module):
  config: ModelConfig

  def setup(self):
    c = self.config
    dtype = c.compute_dtype
    self.token_embed = layers.Embed(c.vocab_size, c.emb_dim, dtype=dtype)
    self.text_positions = layers.PositionEmbedding(c.max_text_len, c.emb_dim, "text_pos")
    self.image_positions = layers.PositionEmbedding(c.num_image_tokens, c.emb_dim, "image_pos")
    if c.max_images > 1:  # zeros: a model loaded from a single-image checkpoint starts as it was
      self.image_index = layers.PositionEmbedding(c.max_images, c.emb_dim, "image_index",
                                                  init=nn.initializers.zeros)
    if c.patchifier == "resnet":
      self.patchify = conv_stage.ResNetStage(
          c.emb_dim, c.patch_size, c.resnet_stem_width, tuple(c.resnet_stage_widths),
          tuple(c.resnet_stage_blocks), c.stochastic_depth_rate, dtype)
    else:
      self.patchify = conv_stage.LinearPatchify(c.emb_dim, c.patch_size, dtype)
    self.embed_dropout = nn.Dropout(c.dropout_rate)
    if c.num_classes:
      self.classifier = layers.Dense((c.num_classes,), ("embed", "classes"), dtype=dtype)
    grid = c.grid_size if c.image_relative_position else 0
    stack = dict(num_heads=c.num_heads, head_dim=c.head_dim, mlp_dim=c.mlp_dim,
                 dropout_rate=c.dropout_rate, dtype=dtype, attention=c.attention, remat=c.remat,
                 scan_layers=c.scan_layers)
    if c.architecture == "encoder_decoder":
      self.encoder = transformer.Encoder(c.num_encoder_layers, drop_path_rate=c.stochastic_depth_rate,
                                         image_grid_size=grid, **stack)
      self.decoder = transformer.Decoder(c.num_decoder_layers,
                                         drop_path_rate=c.decoder_stochastic_depth_rate, **stack)
    else:
      self.stack = transformer.Encoder(c.num_encoder_layers + c.num_decoder_layers,
                                       drop_path_rate=c.stochastic_depth_rate,
                                       image_grid_size=grid, **stack)

  # --- embeddings -------------------------------------------------------------------------------
  def embed_images(self, images: Array, deterministic: bool) -> Array:
    """uint8 `[batch, H, W, 3]` -> image tokens `[batch, Ti, embed]`."""
    c = self.config
    if images.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"images are {images.shape[1:3]}, the model is configured for "
                       f"{c.image_size}x{c.image_size}")
    x = (images.astype(jnp.float32) - _MEAN) / _STD
    x = self.patchify(x.astype(c.compute_dtype), deterministic)
    x = x + self.image_positions(jnp.arange(c.num_image_tokens))[None].astype(x.dtype)
    return layers.constrain(x, ("batch", "length", "embed"))

  def embed_text(self, tokens: Array, positions: Array) -> Array:
    """`tokens, positions: [batch, length]` -> `[batch, length, embed]`."""
    x = self.token_embed(tokens) + self.text_positions(positions).astype(self.config.compute_dtype)
    return layers.constrain(x, ("batch", "length", "embed"))

  def _prefix_inputs(self, images: Optional[Array], prefix_tokens: Array, deterministic: bool,
                     image_index: Optional[int] = None) -> Tuple[Array, Array]:
    """Embedded `[image tokens; prefix text]` and its validity mask `[batch, Ti + Lp]`.

    `image_index`: which image of a multi-image example this is (its embedding is added to the
    image tokens); None for single-image examples.
    """
    batch, length = prefix_tokens.shape
    x = self.embed_text(prefix_tokens, jnp.broadcast_to(jnp.arange(length), (batch, length)))
    mask = prefix_tokens > 0
    if images is not None:
      img = self.embed_images(images, deterministic)
      if image_index is not None:
        img = img + self.image_index(jnp.array([image_index]))[None].astype(img.dtype)
      x = jnp.concatenate([img, x], axis=1)
      mask = jnp.concatenate([jnp.ones(img.shape[:2], bool), mask], axis=1)
    return self.embed_dropout(x, deterministic=deterministic), mask

  # --- encoder-decoder / decoder-only entry points ----------------------------------------------
  def encode(self, images: Optional[Array], prefix_tokens: Array,
             deterministic: bool = True) -> Tuple[Array, Array]:
    """Bidirectional encoding of the prefix. For decoder-only models this only embeds it.

    `images` may also be `[batch, n, H, W, 3]` (e.g. NLVR2's image pair): each (image, prefix) is
    encoded on its own, its image tokens marked with the image's index, and the n encodings are
    concatenated for the decoder to attend over.
    """
    if images is not None and images.ndim == 5:
      if self.config.architecture == "decoder_only":
        raise ValueError("several images per example need the encoder-decoder architecture")
      # max_images = 1: no index, as runs finetuned before it existed were (training refuses
      # that now: trainer.check_batch); evaluating them still works.
      indexed = self.config.max_images > 1
      if indexed and images.shape[1] > self.config.max_images:
        raise ValueError(f"{images.shape[1]} images per example, the model is configured for at "
                         f"most ModelConfig.max_images = {self.config.max_images}")
      parts = [self._encode_one(images[:, i], prefix_tokens, deterministic, i if indexed else None)
               for i in range(images.shape[1])]
      return (jnp.concatenate([p[0] for p in parts], axis=1),
              jnp.concatenate([p[1] for p in parts], axis=1))
    return self._encode_one(images, prefix_tokens, deterministic)

  def _encode_one(self, images: Optional[Array], prefix_tokens: Array, deterministic: bool,
                  image_index: Optional[int] = None) -> Tuple[Array, Array]:
    x, mask = self._prefix_inputs(images, prefix_tokens, deterministic, image_index)
    if self.config.architecture == "decoder_only":
      return x, mask
    attn_mask = jnp.broadcast_to(mask[:, None, :], (x.shape[0], x.shape[1], x.shape[1]))
    return self.encoder(x, attn_mask, images is not None, deterministic), mask

  def decode(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
             decoder_positions: Array, deterministic: bool = True, with_image: bool = True,
             decode_length: int = 0, decode_step: Optional[Array] = None,
             return_hidden: bool = False) -> Array:
    """Causal decoding of `decoder_input_tokens [batch, Ld]` at text positions `[batch, Ld]`.

    Teacher forcing when `decode_length == 0`. Otherwise one chunk of cached decoding (apply with
    `mutable=['cache']`): the tokens are decoder steps `decode_step, decode_step + 1, ...` of at
    most `decode_length`, keys/values are cached, and cross-attention keys/values are projected
    from `encoded` on the first step only. `with_image` (decoder-only teacher forcing): the prefix
    starts with image tokens. `return_hidden`: the final decoder states `[batch, Ld, embed]`
    instead of logits.
    """
    y = self.embed_text(decoder_input_tokens, decoder_positions)
    y = self.embed_dropout(y, deterministic=deterministic)
    batch, dec_len = decoder_input_tokens.shape
    enc_len = encoder_mask.shape[1]
    if decode_length:
      # Query i (step decode_step + i) sees decoder keys up to itself, over the whole cache.
      query_steps = decode_step + jnp.arange(dec_len)
      causal = jnp.arange(decode_length)[None, :] <= query_steps[:, None]
    else:
      causal = jnp.tril(jnp.ones((dec_len, dec_len), bool))
    if self.config.architecture == "encoder_decoder":
      self_mask = jnp.broadcast_to(causal, (batch,) + causal.shape)
      cross_mask = jnp.broadcast_to(encoder_mask[:, None, :], (batch, dec_len, enc_len))
      y = self.decoder(y, encoded, self_mask, cross_mask, deterministic, decode_length)
    elif decode_length:
      prefix_keys = jnp.broadcast_to(encoder_mask[:, None, :], (batch, dec_len, enc_len))
      mask = jnp.concatenate([prefix_keys, jnp.broadcast_to(causal, (batch,) + causal.shape)], -1)
      y = self.stack(y, mask, False, deterministic, enc_len + decode_length)
    else:
      y = self._decoder_only(encoded, encoder_mask, y, causal, with_image, deterministic)
    if return_hidden:
      return y
    logits = self.token_embed.attend(y)
    return layers.constrain(logits, ("batch", "length", "vocab"))

  def prefill(self, images: Optional[Array], prefix_tokens: Array,
              decode_length: int) -> Tuple[Array, Array]:
    """Starts cached decoding (apply with `mutable=['cache']`): encodes the prefix once.

    Decoder-only models also run their stack over the prefix here, filling the first `Ti + Lp`
    slots of each layer's cache (of length `Ti + Lp + decode_length`).
    """
    encoded, mask = self.encode(images, prefix_tokens)
    if self.config.architecture == "decoder_only":
      batch, p_len = mask.shape
      keys = jnp.concatenate([mask, jnp.zeros((batch, decode_length), bool)], axis=1)
      attn_mask = jnp.broadcast_to(keys[:, None, :], (batch, p_len, p_len + decode_length))
      self.stack(encoded, attn_mask, images is not None, True, p_len + decode_length)
    return encoded, mask

  def _decoder_only(self, prefix, prefix_mask, y, causal, with_image, deterministic):
    """One stack over `[prefix; decoder]`: prefix keys visible to all, decoder keys causally."""
    batch, p_len = prefix_mask.shape
    d_len = y.shape[1]
    prefix_keys = jnp.broadcast_to(prefix_mask[:, None, :], (batch, p_len + d_len, p_len))
    dec_keys = jnp.concatenate([jnp.zeros((p_len, d_len), bool), causal], axis=0)
    mask = jnp.concatenate([prefix_keys, jnp.broadcast_to(dec_keys, (batch,) + dec_keys.shape)], -1)
    out = self.stack(jnp.concatenate([prefix, y], axis=1), mask, with_image, deterministic)
    return out[:, p_len:]

  def classify(self, images: Optional[Array], prefix_tokens: Array,
               deterministic: bool = True) -> Array:
    """Class logits `[batch, num_classes]` from the decoder's state at its first (start) step, as
    SimVLM's VQA classifier: the decoder reads the encoding and a linear head scores the answers."""
    encoded, mask = self.encode(images, prefix_tokens, deterministic)
    batch = prefix_tokens.shape[0]
    start = jnp.zeros((batch, 1), jnp.int32)
    positions = jnp.sum(prefix_tokens > 0, axis=1, keepdims=True).astype(jnp.int32)
    hidden = self.decode(encoded, mask, start, positions, deterministic,
                         with_image=images is not None, return_hidden=True)
    return self.classifier(hidden[:, 0]).astype(jnp.float32)

  def __call__(self, images: Optional[Array], prefix_tokens: Array, decoder_input_tokens: Array,
               decoder_positions: Array, deterministic: bool = True) -> Array:
    """Teacher-forced logits `[batch, Ld, vocab]`."""
    encoded, mask = self.encode(images, prefix_tokens, deterministic)
    return self.decode(encoded, mask, decoder_input_tokens, decoder_positions, deterministic,
                       with_image=images is not None)
