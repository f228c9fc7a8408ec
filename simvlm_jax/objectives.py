"""Pretraining objectives: turn whole token sequences into (prefix, decoder input, target).

Every function maps `tokens: int32 [batch, length]` (EOS-terminated, 0-padded) to a dict of
`[batch, length]` arrays:
  prefix_tokens          text the encoder sees (after the image tokens, if any), 0-padded
  decoder_input_tokens   targets shifted right, starting with 0 (T5's decoder start id)
  decoder_target_tokens  what the decoder must predict
  decoder_positions      text position of each target (so the decoder continues the prefix)
  loss_weights           1.0 on real target tokens, 0.0 on padding
The random draws are pure functions of (seed, step, example index): `row_keys` builds them.
"""
import functools
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp

from simvlm_jax.errors import UserError

Array = jax.Array


def row_keys(seed: int, step: Array, example_index: Array) -> Array:
  """One PRNG key per row: fold_in(fold_in(key(seed), step), example_index). `[batch]` keys."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(example_index)


def num_tokens(tokens: Array) -> Array:
  """Real (non-pad) tokens per row, EOS included. `[batch]`."""
  return jnp.sum(tokens > 0, axis=-1).astype(jnp.int32)


def draw_prefix_lengths(keys: Array, tokens: Array, min_prefix: int) -> Array:
  """Uniform k in [min_prefix, n - 1] per row (n = real tokens), so at least one target remains.

  Rows too short for `min_prefix` get the longest prefix that still leaves one target.
  """
  hi = num_tokens(tokens) - 1  # inclusive upper bound.
  lo = jnp.minimum(min_prefix, jnp.maximum(hi, 0))
  draw = jax.vmap(lambda k, a, b: jax.random.randint(k, (), a, b + 1))
  return draw(keys, lo, jnp.maximum(hi, lo))


def split_at(tokens: Array, prefix_len: Array) -> dict:
  """Splits each row after its first `prefix_len[i]` tokens (see module docstring)."""
  length = tokens.shape[1]
  pos = jnp.arange(length)[None, :]
  k = prefix_len[:, None]
  prefix = jnp.where(pos < k, tokens, 0)
  src = k + pos
  targets = jnp.where(src < length, jnp.take_along_axis(tokens, jnp.minimum(src, length - 1), 1), 0)
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return dict(prefix_tokens=prefix, decoder_input_tokens=decoder_inputs,
              decoder_target_tokens=targets, decoder_positions=jnp.minimum(src, length - 1),
              loss_weights=(targets > 0).astype(jnp.float32))


def seq2seq(prefix_tokens: Array, target_tokens: Array) -> dict:
  """A given split (finetuning): the encoder reads `prefix_tokens` (e.g. a question), the decoder
  predicts `target_tokens` (e.g. the answer, EOS-terminated), continuing the text positions."""
  length = target_tokens.shape[1]
  start = jnp.sum(prefix_tokens > 0, axis=1, keepdims=True).astype(jnp.int32)
  return dict(prefix_tokens=prefix_tokens,
              decoder_input_tokens=jnp.pad(target_tokens[:, :-1], ((0, 0), (1, 0))),
              decoder_target_tokens=target_tokens,
              decoder_positions=start + jnp.arange(length)[None],
              loss_weights=(target_tokens > 0).astype(jnp.float32))


@gin.configurable
def prefix_lm(tokens: Array, keys: Array, with_image: bool,
              image_text_no_prefix_rate: float = 0.0) -> dict:
  """SimVLM's PrefixLM: image rows keep k in [0, n-1] text tokens; text rows k in [1, n-1].

  The paper samples k per example without saying from what. Uniform k leaves a caption's early
  words (its objects' colours and shapes) in the prefix, unpredicted, most of the time;
  `image_text_no_prefix_rate` gives that share of image rows k = 0 (the whole caption predicted
  from the image alone), the rest uniform k as before.
  """
  if not 0.0 <= image_text_no_prefix_rate <= 1.0:
    raise UserError(f"image_text_no_prefix_rate must be in [0, 1], got {image_text_no_prefix_rate}")
  k = draw_prefix_lengths(keys, tokens, 0 if with_image else 1)
  if with_image and image_text_no_prefix_rate > 0:
    # Keys of their own (fold_in), so the uniform draws stay what they were at rate 0.
    coin = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1)))(keys)
    k = jnp.where(coin < image_text_no_prefix_rate, 0, k)
  return split_at(tokens, k)


@gin.configurable
def plain_lm(tokens: Array, keys: Array, with_image: bool) -> dict:
  """Ablation: no text prefix; the decoder predicts every text token (given the image, if any)."""
  del keys, with_image
  return split_at(tokens, jnp.zeros(tokens.shape[:1], jnp.int32))


def random_spans_noise_mask(key: Array, length: Array, max_length: int, noise_density: float,
                            mean_span_length: float, max_spans: Optional[int] = None) -> Array:
  """T5's span noise mask for one row of `length` real tokens, `[max_length]` bool.

  The number of noise tokens and spans follow T5 (round(length * density), >= 1 each, at most
  `max_spans`: one sentinel id per span); the span lengths are a random composition drawn by
  choosing span boundaries without replacement.
  """
  lengthf = length.astype(jnp.float32)
  num_noise = jnp.clip(jnp.round(lengthf * noise_density).astype(jnp.int32), 1, length - 1)
  num_spans = jnp.maximum(jnp.round(num_noise / mean_span_length).astype(jnp.int32), 1)
  num_nonnoise = length - num_noise
  num_spans = jnp.minimum(num_spans, jnp.minimum(num_noise, num_nonnoise))
  if max_spans is not None:
    num_spans = jnp.minimum(num_spans, max_spans)
  k1, k2 = jax.random.split(key)

  def composition(k, total):
    # Random split of `total` items into `num_spans` non-empty segments: choose num_spans - 1 cut
    # points among total - 1 gaps. Returns a [max_length] one-hot of segment starts.
    scores = jax.random.uniform(k, (max_length,))
    scores = jnp.where(jnp.arange(max_length) < total - 1, scores, 2.0)
    rank = jnp.argsort(jnp.argsort(scores))
    cuts = (rank < num_spans - 1) & (jnp.arange(max_length) < total - 1)
    starts = jnp.pad(cuts, (1, 0))[:max_length]  # a cut after item i starts a segment at i + 1.
    return starts.at[0].set(True)

  noise_starts = composition(k1, num_noise)
  nonnoise_starts = composition(k2, num_nonnoise)
  noise_seg = jnp.cumsum(noise_starts) - 1  # segment id per noise item.
  nonnoise_seg = jnp.cumsum(nonnoise_starts) - 1
  noise_len = jnp.zeros(max_length, jnp.int32).at[noise_seg].add(jnp.arange(max_length) < num_noise)
  nonnoise_len = jnp.zeros(max_length, jnp.int32).at[nonnoise_seg].add(
      jnp.arange(max_length) < num_nonnoise)
  # Interleave nonnoise_0, noise_0, nonnoise_1, noise_1, ... and mark the noise runs.
  seg_lens = jnp.stack([nonnoise_len, noise_len], 1).reshape(-1)
  ends = jnp.cumsum(seg_lens)
  seg_of_pos = jnp.searchsorted(ends, jnp.arange(max_length), side="right")
  return (seg_of_pos % 2 == 1) & (jnp.arange(max_length) < length)


def _replace_spans(tokens: Array, spans: Array, sentinel_base: int) -> Array:
  """Keeps tokens outside `spans` and one sentinel per span (left-aligned, 0-padded). `[length]`."""
  length = tokens.shape[0]
  starts = spans & ~jnp.pad(spans, (1, 0))[:length]
  sentinel = sentinel_base - (jnp.cumsum(starts) - 1)
  values = jnp.where(spans, sentinel, tokens)
  keep = (~spans | starts) & (tokens > 0)
  dest = jnp.where(keep, jnp.cumsum(keep) - 1, length)
  return jnp.zeros(length + 1, tokens.dtype).at[dest].set(values)[:length]


@gin.configurable
def span_corruption(tokens: Array, keys: Array, with_image: bool, first_sentinel: int,
                    num_sentinels: int, noise_density: float = 0.15,
                    mean_span_length: float = 3.0) -> dict:
  """Ablation: T5 span corruption of the text; the image (if any) stays whole in the encoder.

  The sentinels are the vocabulary's extra ids, as in T5: <extra_id_0> = `first_sentinel` (the
  vocabulary's size - 1), then downwards; `for_vocabulary` binds both from the run's vocabulary.
  At most `num_sentinels` spans per row. Decoder positions start at 0: the target is a sequence
  of its own (sentinel, span, sentinel, ...), not a continuation of the encoder's text.
  """
  del with_image
  length = tokens.shape[1]
  n = num_tokens(tokens)
  body = jnp.where(jnp.arange(length)[None] < (n - 1)[:, None], tokens, 0)  # without EOS.
  mask_fn = functools.partial(random_spans_noise_mask, max_length=length,
                              noise_density=noise_density, mean_span_length=mean_span_length,
                              max_spans=num_sentinels)
  noise = jax.vmap(mask_fn)(keys, jnp.maximum(n - 1, 2))
  noise &= body > 0

  def corrupt(row, spans):
    inputs = _replace_spans(row, spans, first_sentinel)
    targets = _replace_spans(row, ~spans & (row > 0), first_sentinel)
    return inputs, targets

  inputs, targets = jax.vmap(corrupt)(body, noise)
  eos = lambda x: x.at[jnp.arange(x.shape[0]), jnp.minimum(num_tokens(x), length - 1)].set(1)
  inputs, targets = eos(inputs), eos(targets)
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
  return dict(prefix_tokens=inputs, decoder_input_tokens=decoder_inputs,
              decoder_target_tokens=targets, decoder_positions=positions,
              loss_weights=(targets > 0).astype(jnp.float32))


def for_vocabulary(objective: Callable, vocabulary: Any) -> Callable:
  """`objective` with what it takes from the run's vocabulary (the data iterator's): span
  corruption's sentinel ids. The others need nothing."""
  if objective is not span_corruption:
    return objective
  extra_ids = getattr(vocabulary, "extra_ids", 0)  # 0 for None (synthetic data) too
  if not extra_ids:
    raise UserError("span corruption needs sentinel ids, the vocabulary's extra ids, and this "
                    "run's vocabulary has none: bind sentencepiece_vocabulary.extra_ids (T5: 100) "
                    "and a VOCAB_SIZE that holds them (gin/ablations/span_corruption.gin)")
  return functools.partial(span_corruption, first_sentinel=vocabulary.vocab_size - 1,
                           num_sentinels=extra_ids)
