"""Orbax checkpoints: train state + data iterator position, saved together, restorable on any mesh.

Layout: `<model_dir>/checkpoints/<step>/{state, data}`. `state` is the sharded TrainState (each
process writes its shards); `data` holds one iterator file per process, written by the iterator's
own `save(path)`, and `processes.json` (how many processes wrote it), so a resumed run replays
nothing and skips nothing. Orbax commits a step atomically (a temporary directory, renamed when
complete; `commit_success.txt` on object stores), so a killed run never leaves a half checkpoint
that a restart would pick up, and a restart deletes the temporary directories a kill left behind.

Faults, as a pod meets them:
  * A checkpoint that cannot be read (a file cut short or deleted) is skipped on restart with one
    line naming the step and the reason, and set aside (renamed into `checkpoints_unreadable/`,
    never deleted) once an older one has been read: the run resumes from the newest readable one.
  * A checkpoint of another model (other shapes or parameters) is a `CheckpointError`, never
    "damage": nothing is set aside.
  * A state holding a NaN or Inf is never written (`save` raises `DivergenceError`).
  * Storage fails for a moment (a GCS 503): a read is tried again (`checkpoint_faults.Retries`)
    and a checkpoint is set aside only for damage that reproduces (a missing file, a corrupt one)
    or a read that fails every try; the log line says which. A save that fails is written again (the next save, or the
    same step at the end of the run); one that keeps failing is a `CheckpointError` naming the
    step and the last good checkpoint.

Only the training process writes into a run (`Checkpointer`, which also removes what a killed save
left behind). Every other reader (eval, predict, export, the demo) opens its checkpoints with
`CheckpointReader`, which lists committed steps only and never creates, cleans or writes anything,
so it may run beside the training at any moment.
"""
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence, Tuple

import gin
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from etils import epath
from jax.experimental import multihost_utils

from simvlm_jax import checkpoint_faults as faults, distributed
from simvlm_jax.errors import CheckpointError, DivergenceError

PROCESSES_FILE = "processes.json"
UNREADABLE_SUFFIX = "_unreadable"


def _iterator_path(directory: epath.Path) -> str:
  return os.fspath(directory / f"process_{jax.process_index()}")


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a data iterator through its `save(path)` / `restore(path)` methods."""

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(_iterator_path(directory))
    if jax.process_index() == 0:
      (directory / PROCESSES_FILE).write_text(json.dumps({"processes": jax.process_count()}))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
    args.iterator.restore(_iterator_path(directory))
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@gin.configurable
def absolute(path: str) -> epath.Path:
  """`path` as an absolute epath: relative local paths are resolved against the working directory
  (Orbax needs absolute paths); paths with a scheme (gs://...) are kept as they are."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def committed_steps(directory: epath.Path) -> list[int]:
  """The steps in `directory` whose save completed, ascending; [] when there is no directory.

  A save in progress is an Orbax temporary directory (`<step>.orbax-checkpoint-tmp-<time>`), or on
  an object store (gs://) a step directory without `commit_success.txt`: neither is listed.
  """
  return sorted(ocp.path.step.checkpoint_steps(directory))


def _print_on_main(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def read_params(directory: epath.Path, abstract_params: Any, step: Optional[int],
                retries: faults.Retries, log: Callable[[str], None]) -> Any:
  """Only the parameters of `step` (default: the newest committed), onto `abstract_params`'
  shardings, with a read error that may pass tried again. Any failure is a CheckpointError."""
  steps = committed_steps(directory)
  step = (steps[-1] if steps else None) if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}")
  if step not in steps:
    raise CheckpointError(f"no checkpoint {step} in {directory}; it has {steps}")
  state_dir = directory / str(step) / "state"
  check_tree(state_dir, {"params": abstract_params}, f"checkpoint {step}")
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
  try:
    return faults.read_with_retries(
        lambda: read_state_params(state_dir, abstract_params, restore_args),
        f"checkpoint {step} in {directory}", retries, log,
        gone=lambda: step not in committed_steps(directory))
  except faults.Unreadable as e:
    others = [s for s in committed_steps(directory) if s != step]
    raise CheckpointError(
        f"checkpoint {step} in {directory} cannot be read ({e.reason})"
        + (f"; the run has other checkpoints {others}: pick one with its step" if others
           else "")) from e.error


class CheckpointReader:
  """A run's checkpoints, read-only: how eval, predict, export and the demo open them.

  The training process may be saving beside it at any moment, so this lists committed steps only
  and never creates, cleans up or writes anything (removing what a killed save left behind is the
  training process's `Checkpointer`'s job: a reader cannot tell a killed save from a running one).
  """

  def __init__(self, directory: str, retries: Optional[faults.Retries] = None,
               log: Callable[[str], None] = _print_on_main):
    self.directory = absolute(directory)
    self.retries = retries or faults.Retries()
    self.log = log

  def all_steps(self) -> list[int]:
    return committed_steps(self.directory)

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """See `read_params`."""
    return read_params(self.directory, abstract_params, step, self.retries, self.log)


@dataclasses.dataclass
class _Save:
  """A save that was started: its step, how to start it again, and the state it writes."""
  step: int
  start: Callable[[], bool]
  state: Any

  def can_restart(self) -> bool:
    """Whether the state is still there to write again (the train step donates it)."""
    return not any(x.is_deleted() for x in jax.tree.leaves(self.state)
                   if isinstance(x, jax.Array))


class Checkpointer:
  """The training process's checkpoints: a CheckpointManager for TrainState and the data iterator.

  Only the process that trains builds one: it creates the directory and, when it starts, removes
  the temporary directories a killed save left behind. Everything else opens a run with
  `CheckpointReader`.

  Args:
    directory: where step directories go.
    keep: how many most recent checkpoints to keep (None: all).
    save_every: `save` writes when `step % save_every == 0`, and always when `force=True`.
    async_save: write in a background thread while training goes on.
    keep_best: (metric, "min" | "max"): also keep the checkpoint with the best value of that
      metric among those saved with metrics (`save(..., metrics=)`).
    keep_period: also keep every checkpoint whose step is a multiple of this.
    retries: how a failed read or write is tried again (default: `checkpoint_faults.Retries()`,
      gin-configurable).
    log: where the lines about retries go (default: printed by process 0).
  """

  def __init__(self, directory: str, keep: Optional[int] = 3, save_every: int = 1000,
               async_save: bool = True, keep_best: Optional[Tuple[str, str]] = None,
               keep_period: Optional[int] = None, retries: Optional[faults.Retries] = None,
               log: Callable[[str], None] = _print_on_main):
    self.save_every = save_every
    self.directory = absolute(directory)
    self.keeps_best = keep_best is not None
    self.retries = retries or faults.Retries()
    self.log = log
    self._in_flight: Optional[_Save] = None  # started, not yet known to be complete
    self._failed_in_row = 0
    policies = []
    if keep is not None:
      policies.append(preservation.LatestN(n=keep))
    if keep_best is not None:
      name, mode = keep_best
      policies.append(preservation.BestN(get_metric_fn=lambda metrics: metrics[name],
                                         reverse=(mode == "min"), n=1,
                                         keep_checkpoints_without_metrics=False))
    if keep_period:
      policies.append(preservation.EveryNSteps(interval_steps=keep_period))
    # The interval is decided here (Orbax's own policy would also save the first step).
    options = ocp.CheckpointManagerOptions(
        preservation_policy=(preservation.AnyPreservationPolicy(policies)
                             if keep is not None else None),
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))
    faults.quiet_failed_save()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def save(self, state: Any, data_iterator: Any = None, force: bool = False,
           step: Optional[int] = None, metrics: Optional[dict] = None) -> bool:
    """Saves if the step is due (or `force`). Returns whether a save was started.

    `step` (default: read from `state`) lets the train loop skip a device read. A state with a
    non-finite value raises DivergenceError instead: it would replace good checkpoints (keep-N).
    `metrics` (e.g. the step's eval scores) rank the checkpoint for `keep_best`. If the previous
    (background) save failed, this one is its retry; CheckpointError once `retries.tries` saves
    in a row failed.
    """
    step = int(jax.device_get(state.step)) if step is None else step
    # The interval first: the loop calls this every step, and listing the steps reads storage.
    if (not force and step % self.save_every) or step in self.manager.all_steps():
      return False
    self._settle(next_step=step)
    if not bool(_all_finite(state)):
      last = self.latest_step()
      raise DivergenceError(
          f"step {step}: the train state holds NaN or Inf values, so it was not saved; the last "
          f"good checkpoint is " + (f"step {last} ({self.directory / str(last)})"
                                    if last is not None else "none (no checkpoint was written)"))
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = DataIteratorSave(data_iterator)
    return self._start(_Save(step, lambda: self.manager.save(
        step, args=ocp.args.Composite(**items), force=True, metrics=metrics), state))

  def _start(self, save: _Save) -> bool:
    """Starts `save`, again after a failure of its own (the state is still here)."""
    while True:
      try:
        error, started = None, save.start()
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if not faults.is_read_error(e):
          raise
        error, started = e, False
      if distributed.all_processes(error is None):
        self._in_flight = save if started else None
        return started
      self._failed(save.step, error, next_step=save.step)

  def _settle(self, next_step: Optional[int] = None) -> None:
    """Waits for the save in flight. If it failed, the save of `next_step` about to start is its
    retry; at the end of a run (`next_step` None) the same step is written again."""
    save, self._in_flight = self._in_flight, None
    if save is None:  # every process started the same saves: none is in flight anywhere
      self.manager.wait_until_finished()
      return
    error = None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if not faults.is_read_error(e):
        raise
      error = e
    if distributed.all_processes(error is None):
      self._failed_in_row = 0
      return
    if next_step is None:  # the end of the run: the same step again, if its state is still here
      next_step = save.step if save.can_restart() else None
    self._failed(save.step, error, next_step)
    if next_step == save.step:
      self._start(save)
      self._settle()

  def _failed(self, step: int, error: Optional[BaseException], next_step: Optional[int]) -> None:
    """Counts a failed save of `step` and clears what it left. Logs the retry (the save of
    `next_step`; None: there is none) and pauses, or raises CheckpointError when there is no
    retry, the error cannot pass (a full disk) or `retries.tries` saves in a row failed."""
    self._failed_in_row += 1
    self.manager.reload()  # Orbax's list may name the failed step, or miss older ones
    self._remove_unfinished(step)
    reason = faults.root_cause(error) if error is not None else "another process could not write it"
    permanent = isinstance(error, OSError) and error.errno in faults.PERMANENT_ERRNOS
    if next_step is None or permanent or self._failed_in_row >= self.retries.tries:
      last = self.manager.latest_step()
      tries = (f"; {self._failed_in_row} saves in a row failed" if self._failed_in_row > 1
               else "")
      raise CheckpointError(
          f"checkpoint {step} could not be written to {self.directory} ({reason}{tries}). The "
          "last good checkpoint is " + (f"step {last} ({self.directory / str(last)}): run the "
                                        "same command to resume from it" if last is not None
                                        else "none (no checkpoint was written)")) from error
    pause = self.retries.pause(self._failed_in_row)
    instead = "writing it again" if next_step == step else f"writing step {next_step} instead"
    self.log(f"checkpoint {step} could not be written ({reason}); {instead} in {pause:g}s "
             f"(try {self._failed_in_row + 1} of {self.retries.tries})")
    time.sleep(pause)

  def _remove_unfinished(self, step: int) -> None:
    """Removes what a failed save of `step` left (its temporary directory; on an object store,
    the step directory without its commit file), so that writing it again starts clean. Safe
    here only: this process is the run's one writer, and no save is in flight."""
    if jax.process_index() == 0 and self.directory.exists():
      committed = committed_steps(self.directory)
      for path in self.directory.iterdir():
        if (path.name.startswith(f"{step}.orbax-checkpoint-tmp") or
            (path.name == str(step) and step not in committed)):
          path.rmtree()
    multihost_utils.sync_global_devices(f"simvlm_remove_unfinished_{step}")

  def check_model(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointError if `step` was written for other shapes or another parameter tree.

    An unreadable metadata file is damage, not another model: it passes here and fails restore.
    """
    check_tree(self.directory / str(step) / "state", abstract_state, f"checkpoint {step}")

  def _written_by(self, step: int) -> Optional[int]:
    """How many processes wrote `step`'s data iterator positions (None: no data item)."""
    data = self.directory / str(step) / "data"
    if not data.exists():
      return None
    marker = data / PROCESSES_FILE
    if marker.exists():
      return int(json.loads(marker.read_text())["processes"])
    return len({p.name.split(".")[0] for p in data.iterdir() if p.name.startswith("process_")})

  def restore(self, abstract_state: Any, data_iterator: Any = None,
              step: Optional[int] = None) -> Any:
    """Restores `step` (default: latest) onto the shardings carried by `abstract_state`.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` set: the checkpoint may
    have been written on any other mesh. The data iterator, if given, is restored in place; it
    must have been written by as many processes as this run has (each host reads its own shard).
    One try: `restore_newest_readable` is what retries and skips.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      written = self._written_by(step)
      if written is not None and written != jax.process_count():
        raise CheckpointError(
            f"checkpoint {step} in {self.directory} was written by {written} processes and this "
            f"run has {jax.process_count()}: the train state can be resumed on any number of "
            "processes, the data iterator positions cannot (each host reads its own shard). "
            "Resume the state alone with --gin.train.resume_data_position=False (the data stream "
            "then starts again from its beginning)")
      items["data"] = DataIteratorRestore(data_iterator)
    faults.quiet_read_echoes()
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_newest_readable(self, abstract_state: Any, data_iterator: Any = None,
                              log: Callable[[str], None] = print) -> Optional[Any]:
    """Restores the newest checkpoint that can be read; None if there is none at all.

    Each checkpoint is tried again after a read error that may pass (`retries`); it counts as
    unreadable when the damage reproduces (a missing or corrupt file) or every try failed. The
    unreadable ones are tried newest first; each gets one `log` line saying which it was. Once an
    older one has been read, the newer unreadable ones are set aside (renamed, never deleted). If
    none can be read, nothing is renamed and a CheckpointError names them: a fault that breaks
    every checkpoint alike is more likely ours than the files'.
    """
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      self.check_model(step, abstract_state)
      state, reason = self._restore_agreed(abstract_state, data_iterator, step, log)
      if reason is None:
        for bad in unreadable:
          dest = self.set_aside(bad)
          log(f"checkpoint {bad} set aside as {dest}")
        return state
      log(f"checkpoint {step} in {self.directory} cannot be read ({reason}); trying the one "
          "before it")
      unreadable.append(step)
    if unreadable:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read (steps {sorted(unreadable)}; see the "
          "lines above). Move them away to start afresh, or run with --traceback if they look "
          "intact")
    return None

  def _restore_agreed(self, abstract_state: Any, data_iterator: Any, step: int,
                      log: Callable[[str], None]) -> Tuple[Optional[Any], Optional[str]]:
    """(state, None) once `step` was read on every process, or (None, why it counts as
    unreadable). Every process makes the same tries (each try ends in a collective)."""
    kinds, error = [], None
    for attempt in range(1, self.retries.tries + 1):
      try:
        error, state = None, self.restore(abstract_state, data_iterator, step)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if not faults.is_read_error(e):
          raise
        error, state = e, None
        faults.after_failed_read()
      if distributed.all_processes(error is None):
        return state, None
      kinds.append(faults.damage(error) if error is not None else None)
      # Damage that reproduces ends the tries (on every process: each says it is done).
      confirmed = error is None or (len(kinds) > 1 and kinds[-1] is not None and
                                    kinds[-1] == kinds[-2])
      if distributed.all_processes(confirmed) or attempt == self.retries.tries:
        break
      pause = self.retries.pause(attempt)
      log(f"checkpoint {step} in {self.directory}: reading failed ("
          f"{faults.root_cause(error) if error is not None else 'on another process'}); trying "
          "again "
          f"in {pause:g}s (try {attempt + 1} of {self.retries.tries})")
      time.sleep(pause)
    if error is None:
      return None, "another process could not read it"
    return None, faults.unreadable_reason(kinds, error, self.retries.tries)

  def set_aside(self, step: int) -> epath.Path:
    """Moves step `step` into `<directory>_unreadable/` (process 0; all processes wait)."""
    root = self.directory.parent / (self.directory.name + UNREADABLE_SUFFIX)
    dest, n = root / str(step), 0
    while dest.exists():
      n += 1
      dest = root / f"{step}.{n}"
    if jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)
    multihost_utils.sync_global_devices(f"simvlm_set_aside_{step}")
    self.manager.reload()
    return dest

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Only the parameters of `step` (default: latest), onto `abstract_params`' shardings.

    Evaluation and prediction use this (through `CheckpointReader`): the optimizer state (twice
    the parameters, for Adam) is never read from storage nor held in memory. A read error that
    may pass is tried again; any failure is a CheckpointError naming the step.
    """
    return read_params(self.directory, abstract_params, step, self.retries, self.log)

  def wait(self):
    """Waits for the save in flight; a failed one is written again (CheckpointError if it
    cannot be)."""
    self._settle()

  def close(self):
    try:
      self._settle()
    finally:
      self.manager.close()


def saved_tree(state_dir: epath.Path) -> Optional[Any]:
  """The saved tree's metadata (shapes and dtypes), or None when it cannot be read."""
  try:
    metadata = ocp.StandardCheckpointer().metadata(state_dir)
  except faults.READ_ERRORS:
    return None
  item = getattr(metadata, "item_metadata", metadata)
  return getattr(item, "tree", None)


def check_tree(state_dir: epath.Path, abstract: Any, what: str) -> None:
  """Raises CheckpointError when the saved tree lacks a leaf of `abstract` or has another shape.

  Saved leaves that `abstract` does not name are fine (a partial restore reads what it needs).
  """
  saved = saved_tree(state_dir)
  if saved is None:
    return
  saved_shapes = {parameter_name(p): tuple(getattr(v, "shape", ()) or ())
                  for p, v in jax.tree_util.tree_leaves_with_path(saved)}
  problems = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    name = parameter_name(path)
    if name not in saved_shapes:
      problems.append(f"{name} is missing")
    elif saved_shapes[name] != tuple(leaf.shape):
      problems.append(f"{name} is {saved_shapes[name]} there, {tuple(leaf.shape)} here")
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise CheckpointError(
        f"{what} in {state_dir.parent.parent} was written by another model: {problems[0]}{more}. "
        "Use the model config of the run that wrote it, a new model_dir, or train.init_from to "
        "start from its parameters where they fit")


def read_state_params(state_dir: epath.Path, abstract_params: Any, restore_args: Any) -> Any:
  """The `params` subtree of a saved TrainState (a partial restore: no optimizer state read)."""
  faults.quiet_read_echoes()
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True))["params"]


def parameter_name(path) -> str:
  """'patchify/stem_conv/kernel' for a parameter's tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
