r"""The train loop and its command line.

  python -m simvlm_jax.train --gin_file=gin/runs/demo_pretrain.gin \
      --gin.train.model_dir=/tmp/simvlm --gin.train.total_steps=1000

Resolves gin, builds the mesh, restores the latest checkpoint of `model_dir` if there is one (state
and data iterator position), trains, evaluates on a schedule, writes metrics (TensorBoard through
clu, and a console progress line), and checkpoints. The same code runs on 1 CPU and on a pod.
"""
import os
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import numpy as np
from absl import app, logging
from clu import metric_writers
from etils import epath

from simvlm_jax import checkpoints, distributed, gin_utils, objectives
from simvlm_jax.models import ModelConfig
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer

def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_TOKEN_KEYS = ("text_tokens", "prefix_tokens", "target_tokens")  # pretraining / finetuning rows


def _count_tokens(batch: Any) -> int:
  """Real (non-pad) text tokens of a host batch (for tokens/s)."""
  return int(sum(np.count_nonzero(sub[k]) for sub in batch.values() for k in _TOKEN_KEYS
                 if k in sub))


def _count_rows(batch: Any) -> int:
  return sum(next(sub[k] for k in _TOKEN_KEYS if k in sub).shape[0] for sub in batch.values())


def evaluate(trainer: Trainer, params, eval_iterator_fn: Callable, max_batches: int) -> dict:
  """Teacher-forced loss and token accuracy over (at most `max_batches` of) an eval iterator."""
  totals = None
  for i, batch in enumerate(eval_iterator_fn()):
    if i >= max_batches:
      break
    sums = jax.device_get(trainer.eval_step(params, trainer.partitioner.shard_batch(batch)))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  if totals is None:
    raise ValueError("the eval iterator produced no batch")
  denom = max(float(totals["weight_sum"]), 1.0)
  return {"eval/loss": float(totals["loss_sum"]) / denom,
          "eval/accuracy": float(totals["correct_sum"]) / denom}


@gin.configurable(denylist=["stop_after_step"])
def train(model_dir: str = gin.REQUIRED,
          total_steps: int = gin.REQUIRED,
          train_iterator_fn: Callable[..., Any] = gin.REQUIRED,
          model_config: Optional[ModelConfig] = None,
          objective: Callable = objectives.prefix_lm,
          partitioner: Optional[Partitioner] = None,
          seed: int = 0,
          log_every: int = 10,
          checkpoint_every: int = 1000,
          keep_checkpoints: Optional[int] = 3,
          eval_iterator_fn: Optional[Callable[[], Any]] = None,
          eval_every: int = 0,
          eval_batches: int = 50,
          init_from: Optional[str] = None,
          stop_after_step: Optional[int] = None) -> Any:
  """Trains to `total_steps` (resuming from `model_dir`) and returns the final TrainState.

  `train_iterator_fn(shard_index=, num_shards=)` returns this process's iterator of host batches
  (with `save`/`restore`/`counters`). `stop_after_step` ends the run early (the schedule still
  spans `total_steps`), as a preempted job would. `init_from` (a pretraining model_dir or
  checkpoint) starts a new run from those parameters where they fit (finetuning); a checkpoint of
  this run's own `model_dir` always takes precedence, so a preempted finetuning job resumes.
  """
  model_config = model_config or ModelConfig()
  partitioner = partitioner or Partitioner()
  is_main = jax.process_index() == 0
  # epath, not os: on a pod `model_dir` is shared storage (gs://...), which `open` cannot write.
  epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
  trainer = Trainer(model_config, partitioner, total_steps, objective=objective, seed=seed)
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), keep=keep_checkpoints,
                                  save_every=checkpoint_every)
  data = train_iterator_fn(shard_index=jax.process_index(), num_shards=jax.process_count())

  if ckpt.latest_step() is not None:
    state = ckpt.restore(trainer.abstract_state, data)
    logging.info("Restored step %d from %s", int(state.step), model_dir)
  elif init_from:
    params, report = checkpoints.load_pretrained_params(init_from, trainer.init_state().params)
    state = trainer.state_from_params(params)
    if is_main:
      print(f"initialised from {init_from}: " + ", ".join(
          f"{len(v)} {k}" for k, v in report.items()) +
            "".join(f"\n  {k}: {', '.join(v)}" for k, v in report.items()
                    if k != "loaded" and v), flush=True)
  else:
    state = trainer.init_state()
  start = int(jax.device_get(state.step))
  end = total_steps if stop_after_step is None else min(stop_after_step, total_steps)

  writer = metric_writers.create_default_writer(model_dir, just_logging=not is_main)
  if is_main:
    (epath.Path(model_dir) / "config.gin").write_text(gin.config_str())
    writer.write_hparams({"total_steps": total_steps, "seed": seed,
                          "mesh": str(dict(partitioner.mesh.shape))})

  pending, window_start, window_examples, window_tokens = [], time.time(), 0, 0
  run_start, first_step_done = time.time(), start
  for step in range(start, end):
    batch = next(data)
    window_examples += _count_rows(batch)
    window_tokens += _count_tokens(batch)
    state, metrics = trainer.train_step(state, partitioner.shard_batch(batch))
    pending.append(metrics)
    done = step + 1
    if done == start + 1 and is_main:
      (epath.Path(model_dir) / "operative_config.gin").write_text(gin.operative_config_str())
      first_step_done, run_start = done, time.time()  # ETA excludes compilation.
    if done % log_every == 0 or done == end:
      fetched = jax.device_get(pending)
      scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
      elapsed = max(time.time() - window_start, 1e-9)
      scalars.update({"examples_per_s": window_examples / elapsed * jax.process_count(),
                      "tokens_per_s": window_tokens / elapsed * jax.process_count()})
      scalars.update({f"data/{k}": v for k, v in data.counters().items()})
      writer.write_scalars(done, scalars)
      rate = (time.time() - run_start) / max(done - first_step_done, 1)
      if is_main:
        print(f"step {done}/{total_steps} | loss {scalars['loss']:.4f} | "
              f"acc {scalars['accuracy']:.3f} | lr {scalars['learning_rate']:.2e} | "
              f"gnorm {scalars['grad_norm']:.2f} | {scalars['examples_per_s']:.1f} ex/s | "
              f"{scalars['tokens_per_s']:.0f} tok/s | eta {_format_eta(rate * (end - done))}",
              flush=True)
      pending, window_start, window_examples, window_tokens = [], time.time(), 0, 0
    if eval_iterator_fn is not None and eval_every and (done % eval_every == 0 or done == end):
      scores = evaluate(trainer, state.params, eval_iterator_fn, eval_batches)
      writer.write_scalars(done, scores)
      if is_main:
        print(f"step {done} | " + " | ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    ckpt.save(state, data, force=(done == end))
  ckpt.close()
  writer.flush()
  writer.close()
  return state


def main(argv: Sequence[str]):
  del argv
  distributed.initialize()  # Before anything touches a device; a no-op for one process.
  gin_utils.parse_flags()
  train()


if __name__ == "__main__":
  gin_utils.define_flags()
  app.run(main, argv=gin_utils.main_argv())
