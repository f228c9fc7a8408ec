"""Gin entry points: a SeqIO task or mixture name -> this host's iterator of model batches.

  train.train_iterator_fn = @make_pretrain_iterator   # called with shard_index=, num_shards=
  train.eval_iterator_fn = @make_eval_iterator

The tasks of a mixture are split by modality: tasks with a required "image" output feature feed
the image-text sub-batch, the others (no "image", or an optional one they never produce, which
lets a seqio Mixture hold both kinds) the text-only sub-batch. Every batch holds exactly the
configured number of rows of each (e.g. the paper's 4,096 : 512); the mixture's rates only weigh
tasks against other tasks of the same modality. Batch sizes are global; each host reads only its
own shard of every dataset and produces `batch_size / num_shards` rows.

`simvlm_jax` does not import `tasks`: import it (or whatever registers your tasks) first, e.g.
with `import tasks` at the top of the gin file.
"""
import functools
from typing import Optional, Sequence, Union

import gin
import jax
import seqio
import tensorflow as tf
from absl import logging

from simvlm_jax.data import feature_converter
from simvlm_jax.data.iterator import DataIterator
from simvlm_jax.errors import UserError

ImageSize = Union[int, Sequence[int]]


@gin.configurable
def make_pretrain_iterator(mixture_or_task_name: str = gin.REQUIRED, *,
                           image_text_batch_size: int = gin.REQUIRED,
                           text_batch_size: int = gin.REQUIRED,
                           image_text_length: int = gin.REQUIRED,
                           text_length: int = gin.REQUIRED,
                           image_size: ImageSize = gin.REQUIRED,
                           seed: int = 0, split: str = "train",
                           shard_index: Optional[int] = None, num_shards: Optional[int] = None,
                           crop_min_area: float = 1.0, flip: bool = False) -> DataIterator:
  """The endless, shuffled training stream of this host.

  Args:
    mixture_or_task_name: a registered SeqIO Task or Mixture.
    image_text_batch_size, text_batch_size: global rows per batch of each kind (>= 0).
    image_text_length, text_length: tokens per row, EOS included.
    image_size: H (square) or (H, W).
    seed: the stream (shuffling, mixing, caption choice, crops) is a function of the seed.
    split: the split to read.
    shard_index, num_shards: this host's shard; default jax.process_index()/process_count().
    crop_min_area: random crops cover at least this fraction of the largest crop window.
    flip: random left-right flips (keep off when text talks about left and right).
  """
  return _make_iterator(mixture_or_task_name, train=True, split=split, seed=seed,
                        shard_index=shard_index, num_shards=num_shards,
                        image_text_batch_size=image_text_batch_size,
                        text_batch_size=text_batch_size, image_text_length=image_text_length,
                        text_length=text_length, image_size=image_size,
                        crop_min_area=crop_min_area, flip=flip)


@gin.configurable
def make_eval_iterator(mixture_or_task_name: str = gin.REQUIRED, *,
                       image_text_batch_size: int = gin.REQUIRED,
                       text_batch_size: int = gin.REQUIRED,
                       image_text_length: int = gin.REQUIRED,
                       text_length: int = gin.REQUIRED,
                       image_size: ImageSize = gin.REQUIRED,
                       split: str = "validation", seed: int = 0,
                       shard_index: Optional[int] = None,
                       num_shards: Optional[int] = None) -> DataIterator:
  """One deterministic pass over held-out data: no shuffling, centre crops, padded last batches.

  Tasks of the same modality are read one after the other. Padding rows (all-zero tokens) carry
  no target tokens. `seed` only picks which caption of a multi-caption example is used.
  """
  return _make_iterator(mixture_or_task_name, train=False, split=split, seed=seed,
                        shard_index=shard_index, num_shards=num_shards,
                        image_text_batch_size=image_text_batch_size,
                        text_batch_size=text_batch_size, image_text_length=image_text_length,
                        text_length=text_length, image_size=image_size)


def vocabulary(mixture_or_task_name: str) -> seqio.Vocabulary:
  """The vocabulary the tasks tokenize "text" with (the model's vocab_size must match it)."""
  vocabs = [task.output_features["text"].vocabulary
            for task, _ in _weighted_tasks(mixture_or_task_name)]
  if any(v != vocabs[0] for v in vocabs[1:]):
    raise UserError(f"the tasks of {mixture_or_task_name!r} use different vocabularies")
  return vocabs[0]


def _make_iterator(name: str, *, train: bool, split: str, seed: int,
                   shard_index: Optional[int], num_shards: Optional[int],
                   image_text_batch_size: int, text_batch_size: int, image_text_length: int,
                   text_length: int, image_size: ImageSize, **converter_kwargs) -> DataIterator:
  shard = _shard_info(shard_index, num_shards)
  image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  batch_sizes = {}
  for key, rows in (("image_text", image_text_batch_size), ("text", text_batch_size)):
    if rows % shard.num_shards:
      raise UserError(f"{key}_batch_size={rows} is not divisible by {shard.num_shards} hosts")
    batch_sizes[key] = rows // shard.num_shards

  image_text_tasks, text_tasks = [], []
  for task, rate in _weighted_tasks(name):
    _check_task(task)
    check_data_available(task, split)
    if split not in task.splits:
      if train:
        raise UserError(f"task {task.name!r} has no split {split!r}; it has {sorted(task.splits)}")
      # As seqio mixtures do: evaluate each task on the splits it has (e.g. only image-text
      # tasks have "compositional"); a kind with no such task yields padding rows only.
      logging.warning("task %r has no split %r; evaluating without it", task.name, split)
      continue
    (image_text_tasks if _has_images(task) else text_tasks).append((task, rate))
  if not image_text_tasks and not text_tasks:
    raise UserError(f"no task of {name!r} has a split {split!r}")
  if train:
    for key, tasks in (("image_text", image_text_tasks), ("text", text_tasks)):
      if batch_sizes[key] and not tasks:
        raise UserError(f"{key}_batch_size > 0 but {name!r} has no {key.replace('_', '-')} task")

  converter = feature_converter.PretrainFeatureConverter(
      image_text_batch_size=batch_sizes["image_text"], text_batch_size=batch_sizes["text"],
      image_text_length=image_text_length, text_length=text_length, image_size=image_size,
      train=train, seed=seed * 1_000_003 + shard.index, **converter_kwargs)
  streams = {}
  for key, tasks, features, length in (
      ("image_text", image_text_tasks, ("image", "text"), image_text_length),
      ("text", text_tasks, ("text",), text_length)):
    if batch_sizes[key] and tasks:
      streams[key] = _modality_stream(tasks, features, length, split=split, train=train,
                                      seed=seed, shard=shard)
  batches = converter(streams.get("image_text"), streams.get("text")).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  return DataIterator(batches.with_options(options),
                      {"image_text": feature_converter.IMAGE_TEXT_DROPS,
                       "text": feature_converter.TEXT_DROPS}, vocabulary=vocabulary(name))


def _shard_info(shard_index: Optional[int], num_shards: Optional[int]) -> seqio.ShardInfo:
  if (shard_index is None) != (num_shards is None):
    raise UserError("give both shard_index and num_shards, or neither")
  if shard_index is None:
    shard_index, num_shards = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < num_shards:
    raise UserError(f"shard_index={shard_index} is not in [0, num_shards={num_shards})")
  return seqio.ShardInfo(index=shard_index, num_shards=num_shards)


def _weighted_tasks(name: str) -> list[tuple[seqio.Task, float]]:
  """(task, rate) of a task (rate 1) or of every task of a mixture with a positive rate."""
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise UserError(f"{e} Import the module that registers it first (e.g. `import tasks` in "
                    "the gin file or --import_modules=tasks).") from None
  if isinstance(provider, seqio.Mixture):
    return [(t, provider.get_rate(t)) for t in provider.tasks if provider.get_rate(t) > 0]
  return [(provider, 1.0)]


def _has_images(task: seqio.Task) -> bool:
  image = task.output_features.get("image")
  return image is not None and image.required


def _check_task(task: seqio.Task) -> None:
  if "text" not in task.output_features:
    raise UserError(f"task {task.name!r} has no 'text' output feature")


def check_data_available(task: seqio.Task, split: str) -> None:
  """Raises UserError, before any reading starts, when the data of `task`'s `split` is missing."""
  source = task.source
  if isinstance(source, seqio.TfdsDataSource):
    builder = source.tfds_dataset.builder
    if not builder.is_prepared():
      raise UserError(
          f"task {task.name!r} reads TFDS dataset {builder.info.full_name} which is not built in "
          f"{builder.data_dir_root}; build it first (shapes world: `python -m tasks.build shapes`) "
          "or point SIMVLM_DATA_DIR at the directory that holds it.")
  elif isinstance(source, seqio.FileDataSource) and split in source.splits:
    if not source.list_shards(split):
      raise UserError(f"task {task.name!r} split {split!r}: no file matches "
                      f"{source._split_to_filepattern[split]!r}")  # pylint: disable=protected-access


def _modality_stream(tasks: list[tuple[seqio.Task, float]], features: Sequence[str],
                     length: int, *, split: str, train: bool, seed: int,
                     shard: seqio.ShardInfo) -> tf.data.Dataset:
  """The examples of one modality: tasks sampled by rate (train) or read in turn (eval)."""
  streams = []
  for task, _ in tasks:
    ds = task.get_dataset(sequence_length={"text": length}, split=split, shuffle=train,
                          seed=seed, shard_info=shard, num_epochs=None if train else 1,
                          try_in_mem_cache=False)
    streams.append(ds.map(lambda ex: {k: ex[k] for k in features}))
  if len(streams) == 1:
    return streams[0]
  if not train:
    return functools.reduce(lambda a, b: a.concatenate(b), streams)
  total = sum(rate for _, rate in tasks)
  return tf.data.Dataset.sample_from_datasets(
      streams, weights=[rate / total for _, rate in tasks], seed=seed,
      stop_on_empty_dataset=True)
