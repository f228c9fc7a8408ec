"""Finetuning and evaluation batches of the downstream SeqIO tasks (VQA, NLVR2, SNLI-VE, captions).

  train.train_iterator_fn = @make_finetune_iterator
  make_finetune_iterator.task_name = "shapes_vqa_v2"

Task examples (see `tasks/downstream/registration.py`): token features `inputs`, `targets` (and
`premise` for the NLI tasks) without EOS, encoded images `image` or `image_left` + `image_right`,
and pass-through features for the metrics. Model batches (numpy, static shapes):

  {"image_text": {"images":        uint8 [B, H, W, 3], or [B, 2, H, W, 3] for image pairs (NLVR2),
                  "prefix_tokens": int32 [B, Li]  the encoder's text; NO EOS (the decoder continues
                                   it: a question, a hypothesis, or the prompt "a picture of"),
                  "target_tokens": int32 [B, Lt]  EOS-terminated answer / label word / caption,
                  or "class_scores": float32 [B, C] VQA soft scores (`classifier_classes` = C > 0)}}

Tasks without a required image (snli_ve_text) give a "text" sub-batch instead, without "images",
whose prefix is the premise's tokens followed by the hypothesis's (the premise is cut first when
both do not fit). With train=False (one deterministic pass, centre crops) every batch also holds
"meta": {feature: numpy array [B, ...]} with the examples' pass-through features as strings/ints
(references, answers, answer types, labels, ids, and the `*_pretokenized` texts) and "valid"
(bool [B]: False on the rows that pad the last batch to B). Evaluation pops "meta" before the batch
goes to the device.

Inputs that cannot be used are dropped and counted (the iterator's `counters()`): undecodable
images ("bad_image"), empty prefixes ("empty_prefix") and, in training, empty targets
("empty_target"; e.g. NoCaps test has no references).
"""
import os
from typing import Optional, Sequence, Union

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from simvlm_jax.data import image_ops
from simvlm_jax.data.feature_converter import DROP_COUNTS, finish_tokens, to_rows
from simvlm_jax.data.iterator import DataIterator
from simvlm_jax.data.pipeline import _shard_info, _weighted_tasks  # pylint: disable=protected-access
from simvlm_jax.data.pipeline import check_data_available
from simvlm_jax.errors import UserError

ImageSize = Union[int, Sequence[int]]
DROPS = ("bad_image", "empty_prefix", "empty_target")
IMAGE_PAIR = ("image_left", "image_right")
TOKEN_FEATURES = ("inputs", "targets", "premise")
ANSWER_VOCAB_FILE = "answers.txt"  # written next to the built vqa_v2 dataset


def image_features(task: seqio.Task) -> tuple[str, ...]:
  """The required image features of a task: ("image",), IMAGE_PAIR, or () (text only)."""
  return tuple(k for k in ("image",) + IMAGE_PAIR
               if k in task.output_features and task.output_features[k].required)


def get_task(task_name: str) -> seqio.Task:
  (task, _), *rest = _weighted_tasks(task_name)
  if rest:
    raise UserError(f"{task_name!r} is a mixture; finetuning reads one task")
  if "inputs" not in task.output_features:
    raise UserError(f"task {task_name!r} has no 'inputs' feature (is it a downstream task?)")
  return task


def vocabulary(task_name: str) -> seqio.Vocabulary:
  return get_task(task_name).output_features["inputs"].vocabulary


def answer_vocab(task_name: str) -> list[str]:
  """The VQA classifier's answers (index = class id), read next to the task's TFDS dataset."""
  source = get_task(task_name).source
  path = os.path.join(source.tfds_dataset.builder.data_dir, ANSWER_VOCAB_FILE)
  if not tf.io.gfile.exists(path):
    raise UserError(f"no answer vocabulary at {path} (is {task_name!r} a built VQA task?)")
  with tf.io.gfile.GFile(path) as f:
    return f.read().splitlines()


def _prefix(example: dict, length: int, with_premise: bool) -> tf.Tensor:
  """The encoder's text, no EOS, cut to `length`: the inputs, after the premise if asked."""
  inputs = tf.cast(example["inputs"], tf.int32)[:length]
  if not with_premise or "premise" not in example:
    return inputs
  room = length - tf.size(inputs)
  return tf.concat([tf.cast(example["premise"], tf.int32)[:room], inputs], axis=0)


def _pad(tokens: tf.Tensor, length: int) -> tf.Tensor:
  return tf.ensure_shape(tf.pad(tokens, [[0, length - tf.size(tokens)]]), [length])


class FinetuneIterator(DataIterator):
  """A DataIterator over finetuning batches (see the module docstring), padding eval batches."""

  def __init__(self, dataset: tf.data.Dataset, key: str, batch_size: int, train: bool,
               vocabulary: Optional[seqio.Vocabulary] = None,
               answers: Optional[Sequence[str]] = None):
    super().__init__(dataset, {key: DROPS}, vocabulary=vocabulary, answers=answers)
    self._key, self._batch_size, self._train = key, batch_size, train

  def __next__(self) -> dict:
    while True:
      element = self._next_element()  # StopIteration ends an eval pass.
      sub = element[self._key]
      self._counts[self._key] = np.maximum(self._counts[self._key], sub[DROP_COUNTS].numpy())
      batch = {self._key: {k: v.numpy() for k, v in sub.items() if k != DROP_COUNTS}}
      if self._train:
        return batch
      meta = {k: v.numpy() for k, v in element["meta"].items()}
      end = element["end"].numpy()
      rows = len(end)
      pad = lambda x: np.pad(x, [(0, self._batch_size - rows)] + [(0, 0)] * (x.ndim - 1))  # noqa
      valid = pad(~end)
      if not valid.any():  # only the end marker: it brought the final drop counts
        continue
      batch[self._key] = {k: pad(v) for k, v in batch[self._key].items()}
      batch["meta"] = {**{k: pad(v) for k, v in meta.items()}, "valid": valid}
      return batch

  @property
  def element_spec(self) -> dict:
    """{sub-batch: {feature: jax.ShapeDtypeStruct}} of the model batch ("meta" not included)."""
    spec = self._dataset.element_spec[self._key]
    return {self._key: {k: jax.ShapeDtypeStruct((self._batch_size,) + tuple(s.shape[1:]),
                                                s.dtype.as_numpy_dtype)
                        for k, s in spec.items() if k != DROP_COUNTS}}


@gin.configurable
def make_finetune_iterator(task_name: str = gin.REQUIRED, *, batch_size: int = gin.REQUIRED,
                           inputs_length: int = gin.REQUIRED, targets_length: int = gin.REQUIRED,
                           image_size: ImageSize = gin.REQUIRED, split: str = "train",
                           train: bool = True, seed: int = 0, shard_index: Optional[int] = None,
                           num_shards: Optional[int] = None, classifier_classes: int = 0,
                           crop_min_area: float = 1.0, flip: bool = False) -> FinetuneIterator:
  """This host's finetuning stream (train=True: endless, shuffled, random crops) or one eval pass.

  Args:
    task_name: a registered downstream SeqIO task (e.g. "vqa_v2", "shapes_nlvr2").
    batch_size: global rows per batch (each of `num_shards` hosts reads batch_size / num_shards).
    inputs_length, targets_length: prefix tokens (no EOS) and target tokens (EOS included).
    image_size: H (square) or (H, W); use the model's (higher than pretraining is fine: position
      tables are interpolated by `train.init_from`).
    split, train, seed: what to read, how (see above), and the stream's seed.
    shard_index, num_shards: this host's shard; default jax.process_index()/process_count().
    classifier_classes: > 0: "class_scores" [B, C] from the VQA answer_ids/answer_scores instead
      of "target_tokens" (the 3,129-way classifier; answers outside the C classes score nothing).
    crop_min_area, flip: training augmentation (flip off for text that says left and right).
  """
  shard = _shard_info(shard_index, num_shards)
  if batch_size % shard.num_shards:
    raise UserError(f"batch_size={batch_size} is not divisible by {shard.num_shards} hosts")
  rows = batch_size // shard.num_shards
  if rows < 1 or inputs_length < 1 or targets_length < 2:
    raise UserError("need batch_size >= hosts, inputs_length >= 1 and targets_length >= 2")
  image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  task = get_task(task_name)
  if split not in task.splits:
    raise UserError(f"task {task.name!r} has no split {split!r}; it has {sorted(task.splits)}")
  check_data_available(task, split)
  images = image_features(task)
  key = "image_text" if images else "text"
  examples = task.get_dataset(
      sequence_length={"inputs": inputs_length, "targets": targets_length,
                       "premise": inputs_length},
      split=split, shuffle=train, seed=seed, shard_info=shard,
      num_epochs=None if train else 1, try_in_mem_cache=False)
  answers = None
  if classifier_classes:
    if "answer_ids" not in examples.element_spec:
      raise UserError(f"classifier_classes > 0 needs VQA answer_ids; {task.name!r} has none")
    try:
      answers = answer_vocab(task_name)
    except UserError:
      answers = None  # a task without the file: the run cannot name its classes
    if answers and len(answers) > classifier_classes:
      logging.warning("%s has %d answer classes; only the first %d are trained", task.name,
                      len(answers), classifier_classes)
      answers = answers[:classifier_classes]
  skip = set(TOKEN_FEATURES) | set(images) | {"answer_ids", "answer_scores"}
  meta_keys = [] if train else [k for k in examples.element_spec if k not in skip]
  row_seed = seed * 1_000_003 + shard.index

  def to_row(index, example, decode=True):
    """decode=False: the row of an image that failed to decode (zero images, reason bad_image)."""
    # The premise's text joins the prefix only without images (SNLI-VE: the image is the premise).
    prefix = _prefix(example, inputs_length, with_premise=not images)
    row = {"prefix_tokens": _pad(prefix, inputs_length)}
    end = example["end"]
    reason = tf.where((tf.size(prefix) > 0) | end, 0, 1 + DROPS.index("empty_prefix"))
    if classifier_classes:
      ids = tf.cast(example["answer_ids"], tf.int32)
      keep = ids < classifier_classes
      row["class_scores"] = tf.tensor_scatter_nd_max(
          tf.zeros([classifier_classes], tf.float32), tf.boolean_mask(ids, keep)[:, None],
          tf.boolean_mask(tf.cast(example["answer_scores"], tf.float32), keep))
    else:
      targets, has_target = finish_tokens(example["targets"], targets_length)
      row["target_tokens"] = targets
      if train:
        reason = tf.where((reason == 0) & ~has_target, 1 + DROPS.index("empty_target"), reason)
    decoded = []
    zeros = lambda: tf.zeros([*image_size, 3], tf.uint8)  # noqa: E731
    for i, name in enumerate(images):
      crop_seed = tf.stack([tf.constant(row_seed, tf.int64), index * 2 + i])
      decode_image = lambda name=name, crop_seed=crop_seed: image_ops.crop_and_resize(  # noqa: E731
          image_ops.decode_rgb(example[name]), image_size, random=train, min_area=crop_min_area,
          flip=flip, seed=crop_seed if train else None)
      # The end marker skips decoding, so it is never mistaken for a bad image.
      decoded.append(tf.cond(end, zeros, decode_image) if decode else zeros())
    if not decode:
      reason = tf.constant(1 + DROPS.index("bad_image"))
    if decoded:
      row["images"] = decoded[0] if len(decoded) == 1 else tf.stack(decoded)
    row.update(reason=reason, end=end, meta={k: example[k] for k in meta_keys})
    return row

  bad_row = lambda i, ex: to_row(i, ex, decode=False)  # noqa: E731
  # The end marker (eval) comes out as a row with valid False.
  rows_ds = to_rows(examples, to_row, bad_row if images else None, marker=not train)

  def count(counts, row):
    counts += tf.one_hot(row["reason"] - 1, len(DROPS), dtype=tf.int64)
    return counts, {**row, DROP_COUNTS: counts}

  rows_ds = rows_ds.scan(tf.zeros([len(DROPS)], tf.int64), count)
  rows_ds = rows_ds.filter(lambda row: row["reason"] == 0)

  def to_batch(batch):
    sub = {k: v for k, v in batch.items()
           if k not in ("reason", "end", "meta", DROP_COUNTS)}
    sub[DROP_COUNTS] = tf.reduce_max(batch[DROP_COUNTS], axis=0)
    out = {key: sub}
    if not train:
      out.update(meta=batch["meta"], end=batch["end"])
    return out

  # padded_batch: variable-length pass-through features (e.g. the references) pad with ""/0.
  batches = rows_ds.padded_batch(rows, drop_remainder=train).map(to_batch)
  options = tf.data.Options()
  options.deterministic = True
  return FinetuneIterator(batches.prefetch(2).with_options(options), key, rows, train,
                          vocabulary=task.output_features["inputs"].vocabulary, answers=answers)

