r"""The train loop and its command line.

  python -m simvlm_jax.train --gin_file=gin/runs/demo_pretrain.gin \
      --gin.train.model_dir=/tmp/simvlm --gin.train.total_steps=1000

Resolves gin, builds the mesh, restores the latest checkpoint of `model_dir` if there is one (state
and data iterator position), trains, evaluates on a schedule, writes metrics (TensorBoard through
clu, and a console progress line), and checkpoints. The same code runs on 1 CPU and on a pod.
"""
import os
import time
from typing import Any, Callable, Optional, Sequence, Tuple

import gin
import jax
import numpy as np
from absl import app
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from simvlm_jax import (checkpoints, console, distributed, evaluators as evaluators_lib, flops,
                        gin_utils, memory, objectives, preemption, run_dir)
from simvlm_jax.data import prefetch
from simvlm_jax.errors import DivergenceError, UserError, run_main
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


def _any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process gets the same answer)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _padding_batch(iterator: Any) -> Any:
  """An all-padding host batch (zero tokens carry no loss) of the iterator's static shapes."""
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), iterator.element_spec)


def evaluate(trainer: Trainer, params, eval_iterator_fn: Callable, max_batches: int) -> dict:
  """Teacher-forced loss and token accuracy over (at most `max_batches` of) an eval iterator.

  Every process runs the same number of eval steps, so the collectives match on a pod: each step
  asks whether any process still has a batch, and a process whose shard is used up (shards differ
  in files, drops and padding) feeds an all-padding batch until every shard is done.
  `eval/examples` counts the rows evaluated (padding excluded).
  """
  iterator = eval_iterator_fn(shard_index=jax.process_index(), num_shards=jax.process_count())
  totals = None
  for _ in range(max_batches):
    batch = next(iterator, None)
    if not _any_process(batch is not None):
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


class NonFiniteGuard:
  """Applies `train.nonfinite_policy` to the steps' `nonfinite_*` metrics, one step behind.

  The step itself never applies a non-finite update (see `trainer.train_step`); this decides
  whether the run goes on. Reading step s's flags after step s + 1 is dispatched keeps the host
  from waiting on the device. While non-finite steps follow each other, `in_streak` is True and
  the loop writes no periodic checkpoint (keep-N would drop good ones for copies of the same
  state).
  """

  def __init__(self, policy: str, max_consecutive: int, checkpointer: checkpoints.Checkpointer,
               log: Callable[[str], None]):
    if policy not in ("skip", "halt"):
      raise UserError(f"train.nonfinite_policy must be 'skip' or 'halt', got {policy!r}")
    if max_consecutive < 1:
      raise UserError(f"train.max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
    self.policy, self.max_consecutive = policy, max_consecutive
    self.ckpt, self.log = checkpointer, log
    self.consecutive = self.total = 0
    self._waiting: Optional[tuple[int, Any]] = None

  @property
  def in_streak(self) -> bool:
    return self.consecutive > 0

  def observe(self, step: int, metrics: dict) -> None:
    """Queues step `step`'s metrics and checks the previous step's."""
    previous = self._waiting
    self._waiting = (step, {k: metrics[k] for k in ("loss", "grad_norm", *_NONFINITE)})
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._waiting is not None:
      self._check(*self._waiting)
      self._waiting = None

  def _check(self, step: int, values: dict) -> None:
    values = jax.device_get(values)
    if not any(int(values[k]) for k in _NONFINITE):
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    what = " and ".join(f"the {name} ({float(values[metric])})"
                        for key, (name, metric) in _NONFINITE.items() if int(values[key]))
    what += " are not finite" if " and " in what else " is not finite"
    if self.policy == "halt":
      self._stop(f"step {step}: {what} (train.nonfinite_policy='halt'); its update was not "
                 "applied", first_bad=step)
    self.log(f"step {step}: {what}: update skipped ({self.consecutive} in a row, "
             f"{self.total} in all)")
    if self.consecutive >= self.max_consecutive:
      first = step - self.consecutive + 1
      self._stop(f"steps {first}-{step}: {self.consecutive} updates in a row had a non-finite "
                 "loss or gradient norm and were skipped (train.max_consecutive_nonfinite)",
                 first_bad=first)

  def _stop(self, what: str, first_bad: int):
    self.ckpt.wait()
    good = [s for s in self.ckpt.all_steps() if s < first_bad]
    where = (f"step {max(good)} ({self.ckpt.directory / str(max(good))})" if good
             else "none (no checkpoint was written before it)")
    raise DivergenceError(f"training diverged: {what}. The last good checkpoint is {where}; "
                          "lower the learning rate or check the data, then resume from it")


class ProgressLog:
  """The console line and TensorBoard scalars of each `log_every` window of steps.

  A window's metrics are read from the device at the next `flush`, which the loop calls once the
  following step is dispatched, so logging never leaves the device idle. Throughput counts the
  time between the reads of consecutive windows, each read waiting for the window's last step.
  """

  def __init__(self, writer: Any, log: Callable[[str], None], data: Any, start: int, end: int,
               total_steps: int):
    self.writer, self.log, self.data = writer, log, data
    self.end, self.total_steps = end, total_steps
    self.step_flops = self.peak = None  # set by `measure_against`
    self.metrics, self.examples, self.tokens = [], 0, 0
    self.closed = None  # (step, metrics, examples, tokens) of a window waiting to be read
    self.window_start = self.run_start = time.time()
    self.first_timed_step = start

  def measure_against(self, step_flops: float, peak: float, peak_name: str) -> None:
    """Model FLOPs of a step and the peak FLOP/s of all devices: MFU goes to TensorBoard as
    `perf/mfu_<peak_name>`."""
    self.step_flops, self.peak, self.peak_name = step_flops, peak, peak_name

  def add(self, metrics: dict, batch: Any) -> None:
    self.metrics.append(metrics)
    self.examples += _count_rows(batch)
    self.tokens += _count_tokens(batch)

  def compiled(self, step: int) -> None:
    """The first step has been dispatched (compiled): the ETA counts from here."""
    self.first_timed_step, self.run_start = step, time.time()

  def close_window(self, step: int) -> None:
    self.flush()
    self.closed = (step, self.metrics, self.examples, self.tokens)
    self.metrics, self.examples, self.tokens = [], 0, 0

  def flush(self) -> None:
    if self.closed is None:
      return
    done, metrics, examples, tokens = self.closed
    self.closed = None
    fetched = jax.device_get(metrics)
    now = time.time()
    elapsed = max(now - self.window_start, 1e-9)
    self.window_start = now
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]
               if k not in _NONFINITE}
    scalars["nonfinite_steps"] = float(sum(max(m[k] for k in _NONFINITE) for m in fetched))
    steps = len(fetched)
    scalars.update({"examples_per_s": examples / elapsed * jax.process_count(),
                    "tokens_per_s": tokens / elapsed * jax.process_count(),
                    "perf/step_time_s": elapsed / steps})
    if self.step_flops and self.peak:
      scalars[f"perf/mfu_{self.peak_name}"] = self.step_flops * steps / elapsed / self.peak
    scalars.update({f"data/{k}": v for k, v in self.data.counters().items()})
    self.writer.write_scalars(done, scalars)
    rate = (now - self.run_start) / max(done - self.first_timed_step, 1)
    self.log(f"step {done}/{self.total_steps} | loss {scalars['loss']:.4f} | "
             f"acc {scalars['accuracy']:.3f} | lr {scalars['learning_rate']:.2e} | "
             f"gnorm {scalars['grad_norm']:.2f} | {scalars['examples_per_s']:.1f} ex/s | "
             f"{scalars['tokens_per_s']:.0f} tok/s | eta {_format_eta(rate * (self.end - done))}")


# metric -> (what the console calls it, the metric holding its value)
_NONFINITE = {"nonfinite_loss": ("loss", "loss"), "nonfinite_grad": ("gradient norm", "grad_norm")}


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
                         guard=NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite, ckpt,
                                              log),
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
                keep_best_by: Optional[str], init_from: Optional[str], guard: NonFiniteGuard,
                resume_data_position: bool, profile: Optional[Tuple[int, int]],
                stop_after_step: Optional[int]) -> Any:
  partitioner = trainer.partitioner
  is_main = jax.process_index() == 0
  _write_run_files(model_dir, data, trainer.config, init_from, is_main)
  state = _restore(ckpt, trainer, data, resume_data_position, log)
  if state is None and init_from:
    params, report = checkpoints.load_pretrained_params(init_from, trainer.init_state().params)
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

  progress = ProgressLog(writer, log, data, start, end, total_steps)
  tracing = False
  for step in range(start, end):
    batch, device_batch = next(data)
    if step == start:
      log(memory.check_fits(memory.train_step_bytes(
          trainer.config, trainer.abstract_state, batch, jax.process_count(),
          partitioner.batch_shards, trainer.num_microbatches), memory.device_memory()))
      progress.measure_against(flops.batch_flops(trainer.config, batch, jax.process_count()),
                               *_peak(trainer.config, log))
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
    scores = {}
    if eval_iterator_fn is not None and eval_every and (done % eval_every == 0 or done == end):
      progress.flush()
      scores = evaluate(trainer, state.params, eval_iterator_fn, eval_batches)
      log(f"step {done} | " + " | ".join(
          f"{k} {v:.0f}" if k == "eval/examples" else f"{k} {v:.4f}" for k, v in scores.items()))
    if evaluators and evaluators.due(done, end):
      progress.flush()
      official, lines = evaluators(done, end, state.params)
      scores.update(official)
      for line in lines:
        log(line)
    if scores:
      writer.write_scalars(done, scores)
      _check_ranked(keep_best_by, scores)
    if watcher.reached(done):
      progress.flush()
      guard.flush()
      ckpt.save(state, data, force=True, step=done)
      ckpt.wait()
      log(f"stopped by {watcher.received or 'a preemption notice'} after step {done}: saved "
          f"checkpoint {done} (state and data position) in {ckpt.directory}; run the same "
          "command to resume")
      break
    if not guard.in_streak or done == end:
      ranked = ckpt.keeps_best and keep_best_by in scores  # an evaluated step competes for best
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


def _check_keep_best_by(keep_best_by: str, evaluators: dict, teacher_forced: bool) -> None:
  """`keep_best_by` must name a scalar some evaluation of this run writes."""
  name = keep_best_by.split("/")[1] if keep_best_by.count("/") >= 2 else None
  if name in evaluators or (teacher_forced and keep_best_by.count("/") == 1):
    return
  raise UserError(f"train.keep_best_by = {keep_best_by!r} ranks checkpoints by an evaluation: "
                  "name a scalar one writes, eval/<name>/<metric> of train.evaluators "
                  f"({', '.join(evaluators) or 'none set'}), or eval/loss with "
                  "train.eval_iterator_fn and train.eval_every set")


def _check_ranked(keep_best_by: Optional[str], scores: dict) -> None:
  """After an evaluation: a misspelt `keep_best_by` metric stops the run at the first evaluation
  of its evaluator, naming the metrics that evaluator writes."""
  if keep_best_by is None or keep_best_by in scores:
    return
  if keep_best_by.count("/") == 1:  # the teacher-forced evaluation's eval/<metric>
    mine = [k for k in scores if k.count("/") == 1]
  else:  # an evaluator's eval/<name>/<metric>
    mine = [k for k in scores if k.startswith("/".join(keep_best_by.split("/")[:2]) + "/")]
  if mine:
    raise UserError(f"train.keep_best_by = {keep_best_by!r}: that evaluation writes "
                    f"{', '.join(sorted(mine))}")


def _stop_trace(state: Any, steps: str, model_dir: str, log: Callable[[str], None]) -> bool:
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  log(f"profiled steps {steps}: {model_dir}/plugins/profile (TensorBoard's profile tab)")
  return False


def _peak(config: ModelConfig, log: Callable[[str], None]) -> Tuple[float, str]:
  """Peak FLOP/s of all devices for MFU, and its name: the datasheet bf16 peak of a known
  accelerator, else a float matmul timed here (CPU devices of a host share its cores: one
  measurement per host)."""
  device = jax.devices()[0]
  nominal = flops.nominal_peak(device.device_kind)
  if nominal:
    log(f"MFU against the nominal bf16 peak of {device.device_kind}: {nominal / 1e12:.0f} "
        f"TFLOP/s x {jax.device_count()} devices")
    return nominal * jax.device_count(), "nominal_bf16_peak"
  on_cpu = device.platform == "cpu"
  measured = flops.matmul_peak(config.compute_dtype, 1024 if on_cpu else 4096, repeats=3)
  units = jax.process_count() if on_cpu else jax.device_count()
  log(f"MFU against a {config.dtype} matmul peak measured here: {measured / 1e12:.3f} TFLOP/s x "
      f"{units} {'hosts' if on_cpu else 'devices'}")
  return measured * units, "measured_peak"


def _write_run_files(model_dir: str, data: Any, config: ModelConfig, init_from: Optional[str],
                     is_main: bool) -> None:
  """Checks the data's vocabulary against the model before any step, and copies it (and a VQA
  classifier's answers) into the run directory, so predict and eval need nothing else."""
  vocabulary = getattr(data, "vocabulary", None)
  if vocabulary is None:
    return  # synthetic batches: token ids without text
  run_dir.check_vocabulary(vocabulary, config)
  if init_from:
    run_dir.check_same_vocabulary(init_from, vocabulary)
  if is_main:
    run_dir.write_vocabulary(model_dir, vocabulary)
    if getattr(data, "answers", None):
      run_dir.write_answers(model_dir, data.answers)


def main(argv: Sequence[str]):
  del argv
  console.own_stdout()  # the run's own lines, not Gloo's (multi-process CPU runs)
  distributed.initialize()  # Before anything touches a device; a no-op for one process.
  run_main(lambda: (gin_utils.parse_flags(), train()))


if __name__ == "__main__":
  gin_utils.define_flags()
  app.run(main, argv=gin_utils.main_argv())
