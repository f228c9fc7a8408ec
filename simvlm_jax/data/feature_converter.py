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
after tokenization, is dropped and counted. Only decoding is forgiven: a damaged file or a failed
read upstream (a corrupt TFRecord, a missing shard) stops the stream with its own error. Each sub-batch also carries "drop_counts" (int64 [R],
cumulative over the stream, names in IMAGE_TEXT_DROPS / TEXT_DROPS), which the iterator moves
into its counters. Counting lives inside the tf.data graph (a `scan`), so it is saved and
restored with the iterator position and is exact across a resume.
"""
import dataclasses
from typing import Optional

import tensorflow as tf

from simvlm_jax.data import image_ops
from simvlm_jax.data.vocab import EOS_ID

IMAGE_TEXT_DROPS = ("bad_image", "empty_caption")
TEXT_DROPS = ("empty_text",)
DROP_COUNTS = "drop_counts"
_AUTOTUNE = tf.data.AUTOTUNE


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

  def _row(self, index: tf.Tensor, example: dict, kind: "_Kind") -> dict:
    """One example -> one row, plus its stream index, end flag and drop reason (0: keep)."""
    end = example["end"]
    tokens, has_text = finish_tokens(example["text"], kind.length)
    empty_reason = 1 + kind.drops.index("empty_caption" if kind.images else "empty_text")
    row = {"text_tokens": tokens * tf.cast(~end, tf.int32), "index": index, "end": end,
           "reason": tf.where(has_text | end, 0, empty_reason)}
    if kind.images:

      def image():
        decoded = image_ops.decode_rgb(example["image"])
        return image_ops.crop_and_resize(
            decoded, self.image_size, random=self.train, min_area=self.crop_min_area,
            flip=self.flip, seed=tf.stack([tf.constant(self.seed, tf.int64), index]))

      # The end marker skips decoding, so it is never mistaken for a bad image.
      row["images"] = tf.cond(end, lambda: tf.zeros([*self.image_size, 3], tf.uint8), image)
    return row

  def _rows(self, examples: tf.data.Dataset, kind: "_Kind") -> tf.data.Dataset:
    """Examples -> kept rows, each with the cumulative drop counts up to and including it."""
    examples = with_end_flag(examples, marker=not self.train)
    to_row = lambda i, ex: self._row(i, ex, kind)  # noqa: E731
    if kind.images:
      # A decode error removes the row; the gap it leaves in `index` is counted as a bad image.
      rows = map_dropping_decode_errors(examples.enumerate(), to_row)
    else:
      rows = examples.enumerate().map(to_row, num_parallel_calls=_AUTOTUNE, deterministic=True)
    drops = len(kind.drops)

    def count(state, row):
      next_index, counts = state
      counts += tf.one_hot(row["reason"] - 1, drops, dtype=tf.int64)
      if kind.images:
        gap = row["index"] - next_index
        counts += tf.one_hot(kind.drops.index("bad_image"), drops, dtype=tf.int64) * gap
      out = {k: v for k, v in row.items() if k not in ("index", "reason", "end")}
      return (row["index"] + 1, counts), {**out, DROP_COUNTS: counts, "keep": row["reason"] == 0}

    rows = rows.scan((tf.constant(0, tf.int64), tf.zeros([drops], tf.int64)), count)
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


def map_dropping_decode_errors(examples: tf.data.Dataset, fn) -> tf.data.Dataset:
  """`examples.map(fn)` in parallel and in order, where an element whose `fn` fails is removed.

  Each element is mapped in a one-element dataset of its own, so `ignore_errors` sees the errors
  of `fn` (an undecodable image) and nothing else: an error reading `examples` itself (a damaged
  file) is not swallowed but ends the stream. Elements keep their order, and the iterator
  position stays checkpointable.
  """
  def one(*element):
    return tf.data.Dataset.from_tensors(element).map(fn).ignore_errors()
  return examples.interleave(one, cycle_length=_DECODE_PARALLELISM, block_length=1,
                             num_parallel_calls=_AUTOTUNE, deterministic=True)


_DECODE_PARALLELISM = 16  # images decoded at once per stream


def with_end_flag(examples: tf.data.Dataset, marker: bool) -> tf.data.Dataset:
  """Adds "end" (False) to every example and, if `marker`, one empty example with end=True.

  The marker follows the last example of a finite (eval) pass so that drops after the last good
  row are still counted: it skips decoding, carries the final counts and comes out as padding.
  """
  examples = examples.map(lambda ex: {**ex, "end": tf.constant(False)})
  if not marker:
    return examples
  empty = {k: tf.zeros([0] * len(s.shape), s.dtype) for k, s in examples.element_spec.items()}
  empty["end"] = tf.constant(True)
  return examples.concatenate(tf.data.Dataset.from_tensors(empty))


@dataclasses.dataclass(frozen=True)
class _Kind:
  """One sub-batch: its rows, tokens per row, drop counter names, and whether it has images."""
  batch_size: int
  length: int
  drops: tuple[str, ...]
  images: bool
