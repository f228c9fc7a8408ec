r"""The train loop and its command line.

  python -m simvlm_jax.train --gin_file=gin/runs/demo_pretrain.gin \
      --gin.train.model_dir=/tmp/simvlm --gin.train.total_steps=1000

Resolves gin, builds the mesh, restores the latest checkpoint of `model_dir` if there is one (state
and data iterator position), trains, evaluates on a schedule, writes metrics (TensorBoard through
clu, and a console progress line), and checkpoints. The same code runs on 1 CPU and on a pod.
"""
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import gin
import jax
import seqio
from absl import app
from clu import metric_writers
from etils import epath

from simvlm_jax import (checkpoints, console, distributed, evaluators as evaluators_lib, flops,
                        gin_utils, memory, nonfinite, objectives, preemption, run_dir)
from simvlm_jax import pretrained, progress as progress_lib
from simvlm_jax.data import prefetch
from simvlm_jax.errors import UserError, run_main
from simvlm_jax.models import ModelConfig
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer


def _check_run_settings(total_steps: Any, log_every: Any, checkpoint_every: Any) -> None:
  for name, value in (("total_steps", total_steps), ("log_every", log_every),
                      ("checkpoint_every", checkpoint_every)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"train.{name} must be a positive integer, got {value!r}")


def _restore(ckpt: checkpoints.Checkpointer, trainer: Trainer, data: Any,
             resume_data_position: bool, log: Callable[[str], None]) -> Optional[Any]:
  """The newest readable checkpoint of this run (state, and data position unless told not to)."""
  state = ckpt.restore_newest_readable(trainer.abstract_state,
                                       data if resume_data_position else None, log=log)
  if state is not None and not resume_data_position:
    log(f"resumed the train state of step {int(jax.device_get(state.step))} alone "
        "(train.resume_data_position=False): the data stream starts again from its beginning")
  return state


@gin.configurable(denylist=["stop_after_step"])
def train(model_dir: str = gin.REQUIRED,
          total_steps: int = gin.REQUIRED,
          train_iterator_fn: Callable[..., Any] = gin.REQUIRED,
          model_config: Optional[ModelConfig] = None,
          objective: Callable = objectives.prefix_lm,
          partitioner: Optional[Partitioner] = None,
          seed: int = 0,
          num_microbatches: int = 1,
          log_every: int = 10,
          checkpoint_every: int = 1000,
          keep_checkpoints: Optional[int] = 3,
          keep_best_by: Optional[str] = None,
          keep_best_mode: str = "min",
          keep_period: Optional[int] = None,
          eval_iterator_fn: Optional[Callable[..., Any]] = None,
          eval_every: int = 0,
          eval_batches: int = 50,
          evaluators: Optional[dict] = None,
          init_from: Optional[str] = None,
          nonfinite_policy: str = "skip",
          max_consecutive_nonfinite: int = 5,
          resume_data_position: bool = True,
          prefetch_batches: int = 2,
          profile_steps: Optional[Tuple[int, int]] = None,
          stop_after_step: Optional[int] = None) -> Any:
  """Trains to `total_steps` (resuming from `model_dir`) and returns the final TrainState.

  `train_iterator_fn(shard_index=, num_shards=)` returns this process's iterator of host batches
  (with `save`/`restore`/`counters`); `eval_iterator_fn(shard_index=, num_shards=)` one pass of
  held-out batches (with `element_spec`). `stop_after_step` ends the run early (the schedule still
  spans `total_steps`), as a preempted job would. `init_from` (a pretraining model_dir or
  checkpoint) starts a new run from those parameters where they fit (finetuning); a checkpoint of
  this run's own `model_dir` always takes precedence, so a preempted finetuning job resumes.
  `evaluators` ({name: @OfficialMetric()}, `simvlm_jax.evaluators`) score the live parameters
  with a task's official metric every so many steps (TensorBoard: `eval/<name>/<metric>`).
  Checkpoints: the newest `keep_checkpoints`, plus, with `keep_best_by` (an eval scalar such as
  "eval/loss" or "eval/vqa/accuracy", `keep_best_mode` "min" or "max"), the best of those saved at
  an evaluation that reports it (every such evaluation then saves), plus every multiple of
  `keep_period`.
  `num_microbatches` accumulates each step's gradient over that many pieces of the global batch
  (the same update, with the activations of one piece at a time). `profile_steps = (first, last)`
  writes a `jax.profiler` trace of those steps (counted from 1) into `model_dir` for TensorBoard's
  profile tab.

  Faults: SIGTERM/SIGINT save the step reached and return (see `simvlm_jax.preemption`); a
  checkpoint that cannot be read is skipped and set aside (`Checkpointer.restore_newest_readable`);
  a step with a non-finite loss or gradient norm is never applied, and `nonfinite_policy` decides
  what follows: "skip" goes on and stops after `max_consecutive_nonfinite` such steps in a row,
  "halt" stops at once (both raise DivergenceError naming the last good checkpoint).
  `resume_data_position=False` resumes the train state alone (e.g. on another number of hosts).
  `prefetch_batches` batches are read and placed on the devices ahead of their step by a
  background thread (`simvlm_jax.data.prefetch`; 0: each when its step comes).
  """
  _check_run_settings(total_steps, log_every, checkpoint_every)
  if isinstance(prefetch_batches, bool) or not isinstance(prefetch_batches, int) or \
      prefetch_batches < 0:
    raise UserError(f"train.prefetch_batches must be an integer >= 0, got {prefetch_batches!r}")
  evaluators = evaluators_lib.check(evaluators)
  if keep_best_by is not None:
    _check_keep_best_by(keep_best_by, evaluators, eval_iterator_fn is not None and eval_every)
  if keep_best_mode not in ("min", "max"):
    raise UserError(f"train.keep_best_mode must be 'min' or 'max', got {keep_best_mode!r}")
  if profile_steps is not None and not (
      len(profile_steps) == 2 and all(isinstance(x, int) for x in profile_steps)
      and 1 <= profile_steps[0] <= profile_steps[1]):
    raise UserError(f"train.profile_steps must be (first, last) with 1 <= first <= last, got "
                    f"{profile_steps!r}")
  model_dir = str(checkpoints.absolute(model_dir))  # relative paths resolve here, once
  init_from = init_from and str(checkpoints.absolute(init_from))
  model_config = model_config or ModelConfig()
  partitioner = partitioner or Partitioner()
  is_main = jax.process_index() == 0
  log = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)
  with preemption.PreemptionWatcher() as watcher:
    # epath, not os: on a pod `model_dir` is shared storage (gs://...), which `open` cannot write.
    epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
    if init_from:  # finetuning tokenizes with the pretrained run's vocabulary
      run_dir.inherit_vocabulary(init_from)
    data = train_iterator_fn(shard_index=jax.process_index(), num_shards=jax.process_count())
    # The objective may need the vocabulary's ids (span corruption's sentinels).
    objective = objectives.for_vocabulary(objective, getattr(data, "vocabulary", None))
    trainer = Trainer(model_config, partitioner, total_steps, objective=objective, seed=seed,
                      num_microbatches=num_microbatches)
    ckpt = checkpoints.Checkpointer(
        os.path.join(model_dir, "checkpoints"), keep=keep_checkpoints, save_every=checkpoint_every,
        keep_best=(keep_best_by, keep_best_mode) if keep_best_by else None,
        keep_period=keep_period)
    running = evaluators and evaluators_lib.Running(
        evaluators, model_config, getattr(data, "vocabulary", None), getattr(data, "answers", None),
        partitioner)
    # The trainer's check gives a clear error before the compiler meets a batch of wrong shapes.
    feed = prefetch.DevicePrefetcher(
        data, lambda batch: (trainer.check_batch(batch), partitioner.shard_batch(batch))[1],
        depth=prefetch_batches)
    try:
      return _train_loop(trainer, ckpt, watcher, log, model_dir=model_dir,
                         total_steps=total_steps, data=feed,
                         seed=seed, log_every=log_every, eval_iterator_fn=eval_iterator_fn,
                         eval_every=eval_every, eval_batches=eval_batches, evaluators=running,
                         keep_best_by=keep_best_by, init_from=init_from,
                         guard=nonfinite.NonFiniteGuard(nonfinite_policy,
                                                        max_consecutive_nonfinite, ckpt, log),
                         resume_data_position=resume_data_position,
                         profile=profile_steps and (profile_steps[0] - 1, profile_steps[1]),
                         stop_after_step=stop_after_step)
    finally:
      feed.close()
      ckpt.close()


def _train_loop(trainer: Trainer, ckpt: checkpoints.Checkpointer,
                watcher: preemption.PreemptionWatcher, log: Callable[[str], None], *,
                model_dir: str, total_steps: int, data: Any, seed: int,
                log_every: int, eval_iterator_fn: Optional[Callable], eval_every: int,
                eval_batches: int, evaluators: Optional[evaluators_lib.Running],
                keep_best_by: Optional[str], init_from: Optional[str],
                guard: nonfinite.NonFiniteGuard,
                resume_data_position: bool, profile: Optional[Tuple[int, int]],
                stop_after_step: Optional[int]) -> Any:
  partitioner = trainer.partitioner
  is_main = jax.process_index() == 0
  _write_run_files(model_dir, data, trainer.config, init_from, is_main)
  state = _restore(ckpt, trainer, data, resume_data_position, log)
  if state is None and init_from:
    params, report = pretrained.load_params(init_from, trainer.init_state().params)
    state = trainer.state_from_params(params)
    log(f"initialised from {init_from}: " + ", ".join(f"{len(v)} {k}" for k, v in report.items())
        + "".join(f"\n  {k}: {', '.join(v)}" for k, v in report.items() if k != "loaded" and v))
  elif state is None:
    state = trainer.init_state()
  start = int(jax.device_get(state.step))
  if start and not init_from:
    log(f"resumed from checkpoint {start} in {ckpt.directory}")
  end = total_steps if stop_after_step is None else min(stop_after_step, total_steps)

  writer = metric_writers.create_default_writer(model_dir, just_logging=not is_main)
  if is_main:
    (epath.Path(model_dir) / run_dir.CONFIG_FILE).write_text(run_dir.config_text(model_dir))
    writer.write_hparams({"total_steps": total_steps, "seed": seed,
                          "mesh": str(dict(partitioner.mesh.shape))})

  progress = progress_lib.ProgressLog(writer, log, data, start, end, total_steps)
  tracing = False
  for step in range(start, end):
    batch, device_batch = next(data)
    if step == start:
      log(memory.check_fits(memory.train_step_bytes(
          trainer.config, trainer.abstract_state, batch, jax.process_count(),
          partitioner.batch_shards, trainer.num_microbatches), memory.device_memory()))
      progress.measure_against(flops.batch_flops(trainer.config, batch, jax.process_count()),
                               *progress_lib.peak_flops(trainer.config, log))
    if profile and step == profile[0]:  # profile: (steps before the first traced, last traced)
      with data.paused():
        jax.profiler.start_trace(model_dir)
      tracing = True
    state, metrics = trainer.train_step(state, device_batch)
    done = step + 1
    # With step `done` queued on the device, read what step `done - 1` left: the host stays a
    # step ahead and fetches the next batch while the device computes.
    progress.flush()
    progress.add(metrics, batch)
    guard.observe(done, metrics)
    if done == start + 1 and is_main:
      (epath.Path(model_dir) / "operative_config.gin").write_text(gin.operative_config_str())
      progress.compiled(done)
    if done % log_every == 0 or done == end:
      progress.close_window(done)
    if tracing and done == profile[1]:
      with data.paused():
        tracing = _stop_trace(state, f"{profile[0] + 1}-{done}", model_dir, log)
    # The stop comes before any evaluation: a spot VM gives ~30 s after SIGTERM, less than a
    # beam-search evaluation may take; a notice during an evaluation abandons it between batches.
    stop = watcher.reached(done)
    scores = {}
    if not stop:
      scores = _evaluate(trainer, state, done, end, progress, log, watcher.stop_requested,
                         eval_iterator_fn=eval_iterator_fn, eval_every=eval_every,
                         eval_batches=eval_batches, evaluators=evaluators)
      stop = scores is None
    if stop:
      progress.flush()
      guard.flush()
      ckpt.save(state, data, force=True, step=done)
      ckpt.wait()
      log(f"stopped by {watcher.received or 'a preemption notice'} after step {done}: saved "
          f"checkpoint {done} (state and data position) in {ckpt.directory}; run the same "
          "command to resume")
      break
    if scores:
      writer.write_scalars(done, scores)
    if not guard.in_streak or done == end:
      ranked = ckpt.keeps_best and keep_best_by in scores  # an evaluated step competes for best
      if ckpt.keeps_best and scores and not ranked:  # never raise between a step and its save
        log(f"step {done}: train.keep_best_by = {keep_best_by!r} is not among this evaluation's "
            f"scalars ({', '.join(sorted(scores))}); the checkpoint is kept by step alone")
      ckpt.save(state, data, force=(done == end) or ranked, step=done,
                metrics=scores if ranked else None)
  if tracing:  # the run stopped inside the window
    with data.paused():
      _stop_trace(state, f"{profile[0] + 1}-{done}", model_dir, log)
  progress.flush()
  guard.flush()
  writer.flush()
  writer.close()
  return state


def _evaluate(trainer: Trainer, state: Any, done: int, end: int,
              progress: progress_lib.ProgressLog, log: Callable[[str], None],
              should_stop: Callable[[], bool], *,
              eval_iterator_fn: Optional[Callable], eval_every: int, eval_batches: int,
              evaluators: Optional[evaluators_lib.Running]) -> Optional[dict]:
  """The evaluations due after step `done`: {scalar: value} ({} when none is due), or None when a
  preemption notice stopped one of them."""
  scores = {}
  if eval_iterator_fn is not None and eval_every and (done % eval_every == 0 or done == end):
    progress.flush()
    teacher_forced = evaluators_lib.teacher_forced.run(
        trainer, state.params, eval_iterator_fn, eval_batches, should_stop)
    if teacher_forced is None:
      log(f"step {done}: the teacher-forced evaluation was abandoned for the stop")
      return None
    scores.update(teacher_forced)
    log(f"step {done} | " + " | ".join(
        f"{k} {v:.0f}" if k == "eval/examples" else f"{k} {v:.4f}" for k, v in scores.items()))
  if evaluators and evaluators.due(done, end):
    progress.flush()
    official = evaluators(done, end, state.params, should_stop)
    if official is None:
      log(f"step {done}: the in-training evaluation was abandoned for the stop")
      return None
    values, lines = official
    scores.update(values)
    for line in lines:
      log(line)
  return scores


def _check_keep_best_by(keep_best_by: str, evaluators: dict, teacher_forced: bool) -> None:
  """`keep_best_by` must name a scalar some evaluation of this run writes: checked before step 1,
  since a misspelling found at the first evaluation would cost the steps since the last save."""
  parts = keep_best_by.split("/", 2)
  if teacher_forced and keep_best_by in evaluators_lib.teacher_forced.SCALARS:
    return
  if len(parts) == 3 and parts[0] == "eval" and parts[1] in evaluators:
    written = evaluators[parts[1]].ranking_scalars()
    if parts[2] in written:
      return
    raise UserError(f"train.keep_best_by = {keep_best_by!r}: evaluator {parts[1]!r} "
                    f"({evaluators[parts[1]].task}) writes "
                    f"{', '.join(f'eval/{parts[1]}/{m}' for m in written)}")
  raise UserError(f"train.keep_best_by = {keep_best_by!r} ranks checkpoints by an evaluation: "
                  "name a scalar one writes, eval/<name>/<metric> of train.evaluators "
                  f"({', '.join(evaluators) or 'none set'}), or one of "
                  f"{', '.join(evaluators_lib.teacher_forced.SCALARS)} with "
                  "train.eval_iterator_fn and train.eval_every set")


def _stop_trace(state: Any, steps: str, model_dir: str, log: Callable[[str], None]) -> bool:
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  log(f"profiled steps {steps}: {model_dir}/plugins/profile (TensorBoard's profile tab)")
  return False


def _write_run_files(model_dir: str, data: Any, config: ModelConfig, init_from: Optional[str],
                     is_main: bool) -> None:
  """Checks the data's vocabulary against the model before any step, and copies it (and a VQA
  classifier's answers) into the run directory, so predict and eval need nothing else."""
  vocabulary = getattr(data, "vocabulary", None)
  if vocabulary is None:
    return  # synthetic batches: token ids without text

  def check():
    run_dir.check_vocabulary(vocabulary, config)
    if init_from:
      run_dir.check_same_vocabulary(init_from, vocabulary)
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
      run_dir.check_resumed_vocabulary(model_dir, vocabulary)
  # Every process checks and they refuse together: one host leaving alone would leave the others
  # blocked in the restore's collectives until the coordination service gives up.
  distributed.refuse_together(check)
  if is_main:
    run_dir.write_vocabulary(model_dir, vocabulary)
    if getattr(data, "answers", None):
      run_dir.write_answers(model_dir, data.answers)


def main(argv: Sequence[str]):
  del argv
  console.own_stdout()  # the run's own lines, not Gloo's (multi-process CPU runs)
  run_main(lambda: (gin_utils.parse_flags(), train()))


if __name__ == "__main__":
  gin_utils.define_flags()
  app.run(main, argv=gin_utils.main_argv())
