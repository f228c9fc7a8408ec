"""Task examples -> model batches (the t5x feature-converter step, for PrefixLM pretraining).

Task features, as SeqIO tasks deliver them:
  image-text: {"image": tf.string [] (encoded JPEG/PNG/...), "text": int32 [n]}
  text-only:  {"text": int32 [n]}
  `text` may or may not end in EOS; the converter makes it end in exactly one.

Model batch (the batch contract; numpy once the iterator has it):
  {"image_text": {"images": uint8 [B_it, H, W, 3], "text_tokens": int32 [B_it, L_it]},
   "text":       {"text_tokens": int32 [B_t, L_t]}}
  text_tokens are EOS(1)-terminated and 0-padded; longer text is cut to L - 1 tokens plus EOS. The
  PrefixLM prefix/target split happens later, on device. Both sub-batches are always present with
  these static shapes (a batch size of 0 gives an empty sub-batch). Only the last batches of a
  finite (eval) stream hold padding rows: all-zero images and all-zero tokens, which carry no
  target tokens and so no loss.

Bad inputs never stop the stream: an image no decoder accepts, or a caption/text that is empty
after tokenization, is dropped and counted. An error of the input stream itself (a damaged or
truncated file) is no bad input: it stops the stream (see `map_catching_errors`). Each sub-batch
also carries "drop_counts" (int64 [R], cumulative over the stream, names in IMAGE_TEXT_DROPS /
TEXT_DROPS), which the iterator moves into its counters. Counting lives inside the tf.data graph
(a `scan`), so it is saved and restored with the iterator position and is exact across a resume.
"""
import dataclasses
from typing import Callable, Optional

import tensorflow as tf

from simvlm_jax.data import image_ops
from simvlm_jax.data.vocab import EOS_ID

IMAGE_TEXT_DROPS = ("bad_image", "empty_caption")
TEXT_DROPS = ("empty_text",)
DROP_COUNTS = "drop_counts"
_AUTOTUNE = tf.data.AUTOTUNE
_CATCH_GROUP = 16  # examples per dataset in `map_catching_errors`


def finish_tokens(tokens: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor]:
  """int [n] -> (int32 [length] EOS-terminated and 0-padded, bool: had any token besides EOS)."""
  tokens = tf.cast(tokens, tf.int32)
  ends_with_eos = tf.reduce_any(tf.equal(tokens[-1:], EOS_ID))
  body = tokens[:tf.size(tokens) - tf.cast(ends_with_eos, tf.int32)]
  out = tf.concat([body[:length - 1], [EOS_ID]], axis=0)
  out = tf.pad(out, [[0, length - tf.size(out)]])
  return tf.ensure_shape(out, [length]), tf.size(body) > 0


@dataclasses.dataclass(frozen=True)
class PretrainFeatureConverter:
  """Turns an image-text stream and a text-only stream into zipped, fixed-shape batches.

  Attributes:
    image_text_batch_size, text_batch_size: rows per sub-batch on this host (B_it, B_t; >= 0).
    image_text_length, text_length: tokens per row (L_it, L_t), EOS included.
    image_size: (H, W) of every image.
    train: True: random crops (and flips if `flip`), endless stream, full batches only.
      False: centre crops; the streams are finite, the last batches are padded with zero rows, and
      the batch stream ends when both sub-streams are exhausted.
    crop_min_area: smallest fraction of the largest crop window a random crop covers.
    flip: random left-right flips in training (off by default: captions say "left of").
    seed: random crops are a function of (seed, position in the stream).
  """
  image_text_batch_size: int
  text_batch_size: int
  image_text_length: int
  text_length: int
  image_size: tuple[int, int]
  train: bool
  crop_min_area: float = 1.0
  flip: bool = False
  seed: int = 0

  def __post_init__(self):
    for name in ("image_text_batch_size", "text_batch_size"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    if self.image_text_batch_size + self.text_batch_size == 0:
      raise ValueError("image_text_batch_size and text_batch_size are both 0: no rows to train on")
    for name in ("image_text_length", "text_length"):
      if getattr(self, name) < 2:
        raise ValueError(f"{name} must be >= 2 (a token and EOS), got {getattr(self, name)}")
    if len(self.image_size) != 2 or min(self.image_size) < 1:
      raise ValueError(f"image_size must be (height, width) > 0, got {self.image_size}")
    if not 0.0 < self.crop_min_area <= 1.0:
      raise ValueError(f"crop_min_area must be in (0, 1], got {self.crop_min_area}")

  def __call__(self, image_text: Optional[tf.data.Dataset],
               text: Optional[tf.data.Dataset]) -> tf.data.Dataset:
    """Task-example streams -> a stream of model batches.

    A stream that is None gives sub-batches of padding rows only (for a batch size of 0, or an
    eval split that only the other kind of task has).
    """
    kinds = {
        "image_text": _Kind(self.image_text_batch_size, self.image_text_length,
                            IMAGE_TEXT_DROPS, images=True),
        "text": _Kind(self.text_batch_size, self.text_length, TEXT_DROPS, images=False),
    }
    batches = tf.data.Dataset.zip({
        "image_text": self._batches(image_text, kinds["image_text"]),
        "text": self._batches(text, kinds["text"]),
    })
    if not self.train:
      batches = batches.take_while(lambda b: b["image_text"]["live"] | b["text"]["live"])
    return batches.map(lambda b: {key: {k: v for k, v in sub.items() if k != "live"}
                                  for key, sub in b.items()})

  def _row(self, index: tf.Tensor, example: dict, kind: "_Kind", decode: bool = True) -> dict:
    """One example -> one row, plus its end flag and drop reason (0: keep).

    decode=False gives the row of an image that failed to decode: a zero image, reason bad_image.
    """
    end = example["end"]
    tokens, has_text = finish_tokens(example["text"], kind.length)
    empty_reason = 1 + kind.drops.index("empty_caption" if kind.images else "empty_text")
    row = {"text_tokens": tokens * tf.cast(~end, tf.int32), "end": end,
           "reason": tf.where(has_text | end, 0, empty_reason)}
    if kind.images:

      def image():
        decoded = image_ops.decode_rgb(example["image"])
        return image_ops.crop_and_resize(
            decoded, self.image_size, random=self.train, min_area=self.crop_min_area,
            flip=self.flip, seed=tf.stack([tf.constant(self.seed, tf.int64), index]))

      zeros = lambda: tf.zeros([*self.image_size, 3], tf.uint8)  # noqa: E731
      if not decode:
        return {**row, "images": zeros(),
                "reason": tf.constant(1 + kind.drops.index("bad_image"))}
      # The end marker skips decoding, so it is never mistaken for a bad image.
      row["images"] = tf.cond(end, zeros, image)
    return row

  def _rows(self, examples: tf.data.Dataset, kind: "_Kind") -> tf.data.Dataset:
    """Examples -> kept rows, each with the cumulative drop counts up to and including it."""
    bad_row = lambda i, ex: self._row(i, ex, kind, decode=False)  # noqa: E731
    rows = to_rows(examples, lambda i, ex: self._row(i, ex, kind),
                   bad_row if kind.images else None, marker=not self.train)
    drops = len(kind.drops)

    def count(counts, row):
      counts += tf.one_hot(row["reason"] - 1, drops, dtype=tf.int64)
      out = {k: v for k, v in row.items() if k not in ("reason", "end")}
      return counts, {**out, DROP_COUNTS: counts, "keep": row["reason"] == 0}

    rows = rows.scan(tf.zeros([drops], tf.int64), count)
    return rows.filter(lambda row: row["keep"]).map(
        lambda row: {k: v for k, v in row.items() if k != "keep"})

  def _batches(self, examples: Optional[tf.data.Dataset], kind: "_Kind") -> tf.data.Dataset:
    """Sub-batches, each with "live" (False: filler after the stream ran out, or no stream)."""
    empty = {"text_tokens": tf.zeros([kind.batch_size, kind.length], tf.int32),
             DROP_COUNTS: tf.zeros([len(kind.drops)], tf.int64), "live": tf.constant(False)}
    if kind.images:
      empty["images"] = tf.zeros([kind.batch_size, *self.image_size, 3], tf.uint8)
    filler = tf.data.Dataset.from_tensors(empty).repeat()
    if kind.batch_size == 0 or examples is None:
      return filler

    def finish(batch):
      real = tf.shape(batch["text_tokens"])[0]
      out = {k: tf.pad(v, [[0, kind.batch_size - real]] + [[0, 0]] * (len(v.shape) - 1))
             for k, v in batch.items() if k != DROP_COUNTS}
      out = {k: tf.ensure_shape(v, empty[k].shape) for k, v in out.items()}
      # Counts are cumulative, so the last row's (the largest) is the stream's count so far.
      return {**out, DROP_COUNTS: tf.reduce_max(batch[DROP_COUNTS], axis=0),
              "live": tf.constant(True)}

    batches = self._rows(examples, kind).batch(kind.batch_size, drop_remainder=self.train)
    batches = batches.map(finish, num_parallel_calls=_AUTOTUNE)
    return batches if self.train else batches.concatenate(filler)


def to_rows(examples: tf.data.Dataset, to_row: Callable[..., dict],
            bad_row: Optional[Callable[..., dict]] = None, *, marker: bool) -> tf.data.Dataset:
  """Examples -> rows, in order: `to_row(index, example)`, each example given "end": False.

  Args:
    examples: a stream of feature dicts.
    to_row: (int64 index in the stream, example) -> row.
    bad_row: if given, an example on which `to_row` raises (an image no decoder accepts) gives
      `bad_row(index, example)` instead (see `map_catching_errors`).
    marker: end with `to_row` of one empty example with "end": True. It follows the last example
      of a finite (eval) pass, after every bad row, so that drops after the last good row are
      still counted: it skips decoding, carries the final counts and comes out as padding.
  """
  indexed = examples.map(lambda ex: {**ex, "end": tf.constant(False)}).enumerate()
  if bad_row is None:
    rows = indexed.map(to_row, num_parallel_calls=_AUTOTUNE, deterministic=True)
  else:
    rows = map_catching_errors(indexed, to_row, bad_row)
  if not marker:
    return rows
  empty = {k: tf.zeros([0] * len(s.shape), s.dtype) for k, s in examples.element_spec.items()}
  end = tf.data.Dataset.from_tensors({**empty, "end": tf.constant(True)}).enumerate()
  return rows.concatenate(end.map(to_row))


def map_catching_errors(elements: tf.data.Dataset, fn: Callable[..., dict],
                        fallback: Callable[..., dict]) -> tf.data.Dataset:
  """`elements.map(fn)`, in parallel, with `fallback(*element)` for elements on which `fn` raises.

  Only the errors of `fn` are caught: an error of `elements` itself (a damaged or truncated file)
  still stops the stream, where `ignore_errors` over the whole stream would drop it as if it were
  one bad example. For that, elements go through `fn` in groups of _CATCH_GROUP, each group in a
  dataset of its own (one dataset per element would cost ~0.5 ms of CPU per element). Rows keep
  the elements' order, except that a group's fallback rows come at the group's end.
  """
  spec = elements.element_spec

  def with_shapes(*element):
    return element, tf.nest.map_structure(tf.shape, element)

  def unpad(element, shapes):
    return tf.nest.map_structure(
        lambda v, shape, s: tf.ensure_shape(tf.slice(v, tf.zeros_like(shape), shape), s.shape),
        element, shapes, spec)

  def group(batch, shapes):
    size = tf.shape(tf.nest.flatten(shapes)[0], out_type=tf.int64)[0]
    members = tf.data.Dataset.from_tensor_slices((batch, shapes)).map(unpad)
    caught = members.map(fn).ignore_errors(log_warning=True)
    # Filling every group up to its size keeps the groups in order through the interleave.
    return caught.concatenate(members.take(1).map(fallback).repeat()).take(size)

  # padded_batch, not ragged_batch: ragged slices would come back as RaggedTensors.
  groups = elements.map(with_shapes).padded_batch(_CATCH_GROUP)
  return groups.interleave(group, cycle_length=_AUTOTUNE, block_length=_CATCH_GROUP,
                           num_parallel_calls=_AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True)
class _Kind:
  """One sub-batch: its rows, tokens per row, drop counter names, and whether it has images."""
  batch_size: int
  length: int
  drops: tuple[str, ...]
  images: bool
