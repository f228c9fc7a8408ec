"""The teacher-forced evaluation inside training: loss and token accuracy on held-out batches.

`train.eval_iterator_fn` gives each process its shard of a held-out split; every `train.eval_every`
steps the loop writes `eval/loss`, `eval/accuracy` and `eval/examples` (and may keep the best
checkpoint by one of them, `train.keep_best_by`).
"""
from typing import Any, Callable, Optional

import jax
import numpy as np

from simvlm_jax import distributed
from simvlm_jax.errors import UserError

SCALARS = ("eval/loss", "eval/accuracy")  # what `train.keep_best_by` may rank by


def _padding_batch(iterator: Any) -> Any:
  """An all-padding host batch (zero tokens carry no loss) of the iterator's static shapes."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), iterator.element_spec)


def run(trainer: Any, params, eval_iterator_fn: Callable, max_batches: int,
        should_stop: Callable[[], bool] = lambda: False) -> Optional[dict]:
  """Teacher-forced loss and token accuracy over (at most `max_batches` of) an eval iterator.

  Every process runs the same number of eval steps, so the collectives match on a pod: each step
  asks whether any process still has a batch, and a process whose shard is used up (shards differ
  in files, drops and padding) feeds an all-padding batch until every shard is done.
  `eval/examples` counts the rows evaluated (padding excluded). `should_stop()` (the same answer
  on every process) is asked before each batch: True abandons the evaluation (returns None).
  """
  iterator = eval_iterator_fn(shard_index=jax.process_index(), num_shards=jax.process_count())
  totals = None
  for _ in range(max_batches):
    if should_stop():
      return None
    batch = next(iterator, None)
    if not distributed.any_process(batch is not None):
      break
    if batch is None:
      batch = _padding_batch(iterator)
    sums = jax.device_get(trainer.eval_step(params, trainer.partitioner.shard_batch(batch)))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  if totals is None:
    raise UserError("the eval iterator produced no batch (is the eval split empty?)")
  denom = max(float(totals["weight_sum"]), 1.0)
  return {"eval/loss": float(totals["loss_sum"]) / denom,
          "eval/accuracy": float(totals["correct_sum"]) / denom,
          "eval/examples": float(totals["rows_sum"])}
