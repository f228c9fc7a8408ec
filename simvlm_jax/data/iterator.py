"""The host iterator: numpy batches out of a tf.data pipeline, a checkpointable position, counters.

The position is tf.data's own iterator state (shuffle buffers, file offsets, random streams,
prefetched batches), written with tf.train.Checkpoint, so a restored iterator continues with
exactly the batch the saved one would have produced next: nothing replayed, nothing skipped.

Iterators still open when the interpreter exits are closed first (`atexit`): a tf.data thread
inside a Python function (e.g. a reader's tf.numpy_function) dies once the interpreter
finalizes, and an iterator destroyed after that would wait for it forever.
"""
import atexit
import weakref
from typing import Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from simvlm_jax.data.feature_converter import DROP_COUNTS
from simvlm_jax.errors import DataError, one_line


class DataIterator(Iterator[dict]):
  """Iterates over model batches (dicts of numpy arrays, see `feature_converter`).

  Args:
    dataset: a stream of batches whose sub-batches carry cumulative DROP_COUNTS.
    drop_names: per sub-batch key, the names of its DROP_COUNTS entries.
    vocabulary: what the text was tokenized with (a run copies it into its directory).
    answers: a VQA classifier's answers, class id = index.
  """

  def __init__(self, dataset: tf.data.Dataset, drop_names: Mapping[str, Sequence[str]],
               vocabulary: Optional[seqio.Vocabulary] = None,
               answers: Optional[Sequence[str]] = None):
    self.vocabulary, self.answers = vocabulary, answers
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._drop_names = {k: tuple(v) for k, v in drop_names.items()}
    self._counts = {k: np.zeros(len(v), np.int64) for k, v in self._drop_names.items()}
    _OPEN.add(self)

  def __iter__(self) -> "DataIterator":
    return self

  def _next_element(self) -> dict:
    """The next tf.data element; StopIteration ends a finite (eval) stream. A failed read (only
    image decoding is forgiven, see `feature_converter`) becomes a one-line DataError."""
    try:
      return next(self._iterator)
    except tf.errors.OpError as e:
      raise DataError(f"the input pipeline cannot read its data: {type(e).__name__}: "
                      f"{one_line(e)}") from e

  def __next__(self) -> dict:
    while True:
      element = self._next_element()
      batch = {}
      for key, sub in element.items():
        self._counts[key] = np.maximum(self._counts[key], sub[DROP_COUNTS].numpy())
        batch[key] = {k: v.numpy() for k, v in sub.items() if k != DROP_COUNTS}
      # A batch of nothing but padding only closes an eval stream (it brings the final counts).
      if any(np.any(sub["text_tokens"][:, 0]) for sub in batch.values()):
        return batch

  @property
  def element_spec(self) -> dict:
    """{sub-batch: {feature: jax.ShapeDtypeStruct}} of this host's batches."""
    return {key: {k: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype.as_numpy_dtype)
                  for k, s in sub.items() if k != DROP_COUNTS}
            for key, sub in self._dataset.element_spec.items()}

  def counters(self) -> dict[str, int]:
    """Inputs dropped so far on this host, e.g. {"dropped/bad_image": 2, ...}."""
    return {f"dropped/{name}": int(count)
            for key, names in self._drop_names.items()
            for name, count in zip(names, self._counts[key])}

  def _checkpoint(self) -> tuple[tf.train.Checkpoint, dict]:
    counts = {k: tf.Variable(v) for k, v in self._counts.items()}
    return tf.train.Checkpoint(iterator=self._iterator, **counts), counts

  def save(self, path: str) -> None:
    """Writes the position and counters under the prefix `path` (one per process)."""
    checkpoint, _ = self._checkpoint()
    checkpoint.write(path)

  def restore(self, path: str) -> None:
    """Continues from a position written by `save` on an iterator built the same way."""
    checkpoint, counts = self._checkpoint()
    checkpoint.read(path).assert_consumed()
    self._counts = {k: v.numpy() for k, v in counts.items()}


_OPEN: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  """Destroys the tf.data iterators while their threads can still run Python."""
  for iterator in list(_OPEN):
    iterator._iterator = None  # pylint: disable=protected-access
