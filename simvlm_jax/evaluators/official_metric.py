"""The official-metric evaluator: decodes a task's split and scores it (`eval`, and in training).

Each process reads and decodes its shard of the split (as t5x and big_vision do), every process
takes the same number of decoding steps, the predictions are gathered as text and process 0 scores
them (`scoring.score`), so the scores are one device's from O(1/hosts) input per host.
"""
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from simvlm_jax import decoding, distributed, run_dir
from simvlm_jax.errors import UserError
from simvlm_jax.evaluators.scoring import (CAPTION_TASKS, benchmark_of, example_metrics_of,
                                           score)
from simvlm_jax.evaluators import writers
from simvlm_jax.metrics import captions as caption_metrics
from simvlm_jax.metrics import vqa
from simvlm_jax.partitioning import Partitioner

# What the model is shown (`evaluate.images`): the example's images, or controls that say whether
# it uses them: every pixel grey (a "blind" model), or an image pair in reverse order.
IMAGE_CONTROLS = ("given", "grey", "swapped")

def control_images(images: np.ndarray, control: str, task: str) -> np.ndarray:
  """uint8 `[batch, (2,) H, W, 3]` as `control` (IMAGE_CONTROLS) asks: given, every pixel grey,
  or each pair in reverse order."""
  if control == "grey":
    return np.full_like(images, 128)
  if control == "swapped":
    if images.ndim != 5:
      raise UserError(f"images='swapped' needs image pairs ([batch, 2, H, W, 3]); {task!r} has "
                      "one image per example")
    return images[:, ::-1]
  return images


def _splits_over_processes(partitioner: Partitioner, batch_size: int) -> bool:
  """Whether each process can feed its own rows of a batch: the mesh is this process's alone, or
  its batch slices are split evenly over the processes (no two hold the same rows)."""
  processes = jax.process_count()
  if processes == 1 or all(d.process_index == jax.process_index()
                           for d in partitioner.mesh.devices.flat):
    return True
  mine = {index[0].start for index in partitioner.data_sharding.addressable_devices_indices_map(
      (batch_size,)).values()}
  return len(mine) * processes == partitioner.batch_shards


class Evaluator:
  """Decodes one task's eval split with a model and scores it with the task's official metric.

  Built from a run directory by `for_run` (the `eval` command) or from a training run's own model,
  vocabulary and mesh (the evaluators inside training). Each process reads and decodes its shard
  of the split, all processes take the same number of decoding steps, the predictions are
  gathered (as text) and process 0 scores them: the scores of one device, from O(1/hosts) input
  per host.
  """

  def __init__(self, task: str, split: str, config, vocabulary, answers: Optional[Sequence[str]],
               *, inputs_length: int, targets_length: int, batch_size: int, method: str,
               beam_size: int, alpha: float, max_decode_length: Optional[int],
               max_examples: Optional[int], partitioner: Partitioner, images: str = "given"):
    from simvlm_jax.data import finetune  # TensorFlow/seqio only here
    if images not in IMAGE_CONTROLS:
      raise UserError(f"images must be one of {', '.join(IMAGE_CONTROLS)}, got {images!r}")
    self.images = images
    self.benchmark = benchmark_of(task)
    self.example_metrics = example_metrics_of(task)
    self.task, self.split, self.config = task, split, config
    self.vocabulary = vocabulary or finetune.vocabulary(task)
    run_dir.check_vocabulary(self.vocabulary, config)
    self.inputs_length = inputs_length
    self.targets_length = min(targets_length, config.max_text_len - inputs_length)
    self.batch_size, self.max_examples = batch_size, max_examples
    self.partitioner = partitioner
    if batch_size % partitioner.batch_shards:
      raise UserError(f"the eval batch size {batch_size} does not split over the mesh's "
                      f"{partitioner.batch_shards} batch shards (data x fsdp): make it a "
                      "multiple of them")
    if config.num_classes:
      if self.benchmark != "vqa_v2":
        raise UserError("a classifier model is evaluated on VQA only")
      self.answers = list(answers or finetune.answer_vocab(task))
      method = "classifier"
    elif method == "auto":
      method = "beam" if self.benchmark in CAPTION_TASKS else "greedy"
    self.method = method
    # Each process reads its shard of the split (as t5x and big_vision do) where the mesh splits
    # the batch over the processes; else (e.g. a model axis across hosts) every process reads it
    # all, and process 0's rows are the ones kept.
    self.host_sharded = _splits_over_processes(partitioner, batch_size)
    self._predict = decoding.jitted(
        config, method, max_decode_length or self.targets_length, beam_size, alpha,
        partitioner.data_sharding if self.host_sharded else partitioner.replicated)
    self._finetune = finetune

  @classmethod
  def for_run(cls, run: run_dir.Run, task: str, split: str, partitioner: Partitioner,
              **kwargs) -> "Evaluator":
    """For an opened run: its model, vocabulary, answers and finetuning lengths."""
    return cls(task, split, run.config, run.vocabulary, run.answers,
               inputs_length=run.setting("make_finetune_iterator.inputs_length", 32),
               targets_length=run.setting("make_finetune_iterator.targets_length", 32),
               partitioner=partitioner, **kwargs)

  def _batches(self):
    shard = (jax.process_index(), jax.process_count()) if self.host_sharded else (0, 1)
    return self._finetune.make_finetune_iterator(
        self.task, batch_size=self.batch_size, inputs_length=self.inputs_length,
        targets_length=self.targets_length, image_size=self.config.image_size, split=self.split,
        train=False, shard_index=shard[0], num_shards=shard[1], classifier_classes=0)

  def _texts(self, out) -> list[str]:
    """The text of every row of a decoded (or classified) batch of this process."""
    if self.method == "classifier":
      return [self.answers[i] if i < len(self.answers) else "" for i in np.argmax(out, axis=-1)]
    return [decoding.text_of(self.vocabulary, ids) for ids in out.tokens.tolist()]

  def _padding(self, like: Optional[dict]) -> dict:
    """Model inputs of a batch with no example (a process whose shard is used up)."""
    if like is not None:
      return {k: np.zeros_like(v) for k, v in like.items()}
    rows = self.batch_size // (jax.process_count() if self.host_sharded else 1)
    inputs = {"prefix_tokens": np.zeros((rows, self.inputs_length), np.int32)}
    pictures = self._finetune.image_features(self._finetune.get_task(self.task))
    if pictures:
      size = (self.config.image_size,) * 2
      inputs["images"] = np.zeros((rows,) + ((2,) if len(pictures) == 2 else ()) + size + (3,),
                                  np.uint8)
    return inputs

  def _decode(self, params, inputs: dict) -> Any:
    """Decodes one batch of this process's rows; the outputs of those rows (host numpy)."""
    if self.host_sharded:
      pixels, prefix = self.partitioner.shard_batch((inputs.get("images"),
                                                     inputs["prefix_tokens"]))
    else:
      pixels, prefix = self.partitioner.shard_global_batch((inputs.get("images"),
                                                            inputs["prefix_tokens"]))
    with self.partitioner.activate():
      out = self._predict(params, pixels, prefix)
    if self.host_sharded:
      return jax.tree.map(self.partitioner.local_rows, out)
    return jax.device_get(out)

  def predict(self, params, report_images: int = 0,
              should_stop: Callable[[], bool] = lambda: False
              ) -> Optional[tuple[list[str], list[dict], dict[int, np.ndarray]]]:
    """(predictions, per-example pass-through features, {example index: image} for the first
    `report_images` examples that process 0 read) in the split's order, the same on every
    process; None when `should_stop()` (asked before each batch, the same answer on every
    process) said True.

    Each process decodes the examples of its shard; every process takes the same number of
    decoding steps (a process whose shard is used up feeds empty rows), and the predictions are
    gathered as text.
    """
    processes = jax.process_count() if self.host_sharded else 1
    quota = self.max_examples and -(-self.max_examples // processes)  # per process
    records, images, like = [], {}, None
    iterator, exhausted = self._batches(), False
    while True:
      if should_stop():
        return None
      batch = None if exhausted else next(iterator, None)
      exhausted = batch is None
      if not distributed.any_process(batch is not None):
        break
      if batch is None:
        inputs, extra, rows = self._padding(like), {}, 0
      else:
        extra = batch.pop("meta")
        (inputs,) = batch.values()
        rows = int(np.sum(extra.pop("valid")))
        inputs = {k: v for k, v in inputs.items() if k in ("images", "prefix_tokens")}
        like = inputs
      if "images" in inputs:
        inputs["images"] = control_images(inputs["images"], self.images, self.task)
      texts = self._texts(self._decode(params, inputs))
      for i in range(rows):
        # Example k of process p is example k * processes + p of the split (seqio's sharding
        # by example); the order only decides the predictions file's, never a score.
        index = len(records) * processes + jax.process_index() * self.host_sharded
        if "images" in inputs and jax.process_index() == 0 and len(images) < report_images:
          images[index] = inputs["images"][i]
        records.append((index, texts[i], {k: writers.jsonable(v[i]) for k, v in extra.items()}))
      if quota and len(records) >= quota:
        records, exhausted = records[:quota], True
    if not self.host_sharded and jax.process_index():
      records = []  # every process read it all: process 0's copy is the one kept
    gathered = sorted((tuple(r) for part in distributed.gather_json(records) for r in part),
                      key=lambda r: r[0])[:self.max_examples or None]
    if not gathered:
      raise UserError(f"{self.task!r} {self.split!r} has no examples")
    order = {index: n for n, (index, _, _) in enumerate(gathered)}
    return ([text for _, text, _ in gathered], [m for _, _, m in gathered],
            {order[i]: image for i, image in images.items() if i in order})

  def run(self, params, caption_metric_names: Sequence[str] = caption_metrics.ALL_METRICS,
               vqa_metric_version: str = vqa.DEFAULT_VERSION, report_images: int = 0,
               should_stop: Callable[[], bool] = lambda: False) -> Optional["Result"]:
    """Decodes the split with `params` (sharded for this evaluator's mesh) and scores it; None
    when `should_stop` interrupted the decoding (see `predict`)."""
    start = time.time()
    decoded = self.predict(params, report_images, should_stop)
    if decoded is None:
      return None
    predictions, meta, images = decoded
    predict_s = time.time() - start
    # Process 0 scores (METEOR starts Java; no need for every host to), every process gets it.
    scored = None
    if jax.process_index() == 0:
      scored = score(self.benchmark, predictions, meta, caption_metric_names,
                     vqa_metric_version, self.example_metrics)
    scores, per_example = distributed.broadcast_json(scored)
    scores.update(method=self.method, predict_seconds=round(predict_s, 2),
                  score_seconds=round(time.time() - start - predict_s, 2))
    return Result(scores, predictions, meta, per_example, images)


@dataclasses.dataclass
class Result:
  scores: dict
  predictions: list[str]
  meta: list[dict]
  per_example: list
  images: dict[int, np.ndarray]  # example index -> its image(s), for the report
