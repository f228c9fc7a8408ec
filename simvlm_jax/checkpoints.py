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
"""
import dataclasses
import json
import logging as logging_std
import os
import sys
from typing import Any, Callable, Optional, Sequence, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from etils import epath
from jax.experimental import multihost_utils

from simvlm_jax.errors import CheckpointError, DivergenceError, one_line

PROCESSES_FILE = "processes.json"
UNREADABLE_SUFFIX = "_unreadable"
# Errors that mean "this checkpoint's files are not what was written". Programming errors
# (TypeError, AttributeError, ...) are not among them, so a bug never sets a checkpoint aside.
_READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError)


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


def _quiet_failed_read() -> None:
  """Drops the echoes of a failed TensorStore read that arrive after its exception was raised.

  When one array of a checkpoint cannot be read, Orbax abandons the other reads; their callbacks
  land on a closed event loop and each prints a traceback (thousands for a large model), long
  after the one error that matters was reported. Installed only once a read has failed, so it
  never hides anything in a healthy run.
  """
  if getattr(sys.unraisablehook, "_simvlm_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
      return
    if type(error) is Exception and "error while reading array" in str(error):
      return
    previous(unraisable)

  hook._simvlm_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
  logging_std.getLogger("asyncio").addFilter(
      lambda record: not record.getMessage().startswith("Task exception was never retrieved"))


def root_cause(error: BaseException) -> str:
  """One line for the innermost cause of an error (Orbax wraps TensorStore's message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = one_line(error)
  return text if len(text) <= 300 else text[:297] + "..."


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _agree(ok: bool) -> bool:
  """True on every process iff `ok` on every process (one small collective when multi-host)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@gin.configurable
def absolute(path: str) -> epath.Path:
  """`path` as an absolute epath: relative local paths are resolved against the working directory
  (Orbax needs absolute paths); paths with a scheme (gs://...) are kept as they are."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


class Checkpointer:
  """A CheckpointManager for TrainState and the data iterator.

  Args:
    directory: where step directories go.
    keep: how many most recent checkpoints to keep (None: all).
    save_every: `save` writes when `step % save_every == 0`, and always when `force=True`.
    async_save: write in a background thread while training goes on.
    keep_best: (metric, "min" | "max"): also keep the checkpoint with the best value of that
      metric among those saved with metrics (`save(..., metrics=)`).
    keep_period: also keep every checkpoint whose step is a multiple of this.
  """

  def __init__(self, directory: str, keep: Optional[int] = 3, save_every: int = 1000,
               async_save: bool = True, keep_best: Optional[Tuple[str, str]] = None,
               keep_period: Optional[int] = None):
    self.save_every = save_every
    self.directory = absolute(directory)
    self.keeps_best = keep_best is not None
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

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self.manager.all_steps()

  def save(self, state: Any, data_iterator: Any = None, force: bool = False,
           step: Optional[int] = None, metrics: Optional[dict] = None) -> bool:
    """Saves if the step is due (or `force`). Returns whether a save was started.

    `step` (default: read from `state`) lets the train loop skip a device read. A state with a
    non-finite value raises DivergenceError instead: it would replace good checkpoints (keep-N).
    `metrics` (e.g. the step's eval scores) rank the checkpoint for `keep_best`.
    """
    step = int(jax.device_get(state.step)) if step is None else step
    # The interval first: the loop calls this every step, and listing the steps reads storage.
    if (not force and step % self.save_every) or step in self.manager.all_steps():
      return False
    if not bool(_all_finite(state)):
      last = self.latest_step()
      raise DivergenceError(
          f"step {step}: the train state holds NaN or Inf values, so it was not saved; the last "
          f"good checkpoint is " + (f"step {last} ({self.directory / str(last)})"
                                    if last is not None else "none (no checkpoint was written)"))
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = DataIteratorSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True,
                             metrics=metrics)

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
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_newest_readable(self, abstract_state: Any, data_iterator: Any = None,
                              log: Callable[[str], None] = print) -> Optional[Any]:
    """Restores the newest checkpoint that can be read; None if there is none at all.

    Checkpoints that cannot be read are tried newest first; each gets one `log` line. Once an older
    one has been read, the newer unreadable ones are set aside (renamed, never deleted). If none
    can be read, nothing is renamed and a CheckpointError names them: a fault that breaks every
    checkpoint alike is more likely ours than the files'.
    """
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      self.check_model(step, abstract_state)
      error = None
      try:
        state = self.restore(abstract_state, data_iterator, step)
      except CheckpointError:
        raise
      except _READ_ERRORS as e:  # pylint: disable=catching-non-exception
        error, state = e, None
      except Exception as e:  # pylint: disable=broad-except
        if type(e) is not Exception:  # Orbax raises bare Exceptions for TensorStore read errors.
          raise
        error, state = e, None
      if error is not None:
        _quiet_failed_read()
      if _agree(error is None):
        for bad in unreadable:
          dest = self.set_aside(bad)
          log(f"checkpoint {bad} set aside as {dest}")
        return state
      reason = root_cause(error) if error is not None else "another process could not read it"
      log(f"checkpoint {step} in {self.directory} cannot be read ({reason}); trying the one "
          "before it")
      unreadable.append(step)
    if unreadable:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read (steps {sorted(unreadable)}; see the "
          "lines above). Move them away to start afresh, or run with --traceback if they look "
          "intact")
    return None

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

    Evaluation and prediction use this: the optimizer state (twice the parameters, for Adam) is
    never read from storage nor held in memory. Any failure is a CheckpointError naming the step.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise CheckpointError(f"no checkpoint {step} in {self.directory}; it has "
                            f"{list(self.all_steps())}")
    state_dir = self.directory / str(step) / "state"
    check_tree(state_dir, {"params": abstract_params}, f"checkpoint {step}")
    try:
      return _read_params(state_dir, abstract_params,
                          ocp.checkpoint_utils.construct_restore_args(abstract_params))
    except Exception as e:  # pylint: disable=broad-except
      _quiet_failed_read()
      others = [s for s in self.all_steps() if s != step]
      raise CheckpointError(
          f"checkpoint {step} in {self.directory} cannot be read ({root_cause(e)})"
          + (f"; the run has other checkpoints {others}: pick one with its step" if others
             else "")) from e

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _saved_tree(state_dir: epath.Path) -> Optional[Any]:
  """The saved tree's metadata (shapes and dtypes), or None when it cannot be read."""
  try:
    metadata = ocp.StandardCheckpointer().metadata(state_dir)
  except _READ_ERRORS:
    return None
  item = getattr(metadata, "item_metadata", metadata)
  return getattr(item, "tree", None)


def check_tree(state_dir: epath.Path, abstract: Any, what: str) -> None:
  """Raises CheckpointError when the saved tree lacks a leaf of `abstract` or has another shape.

  Saved leaves that `abstract` does not name are fine (a partial restore reads what it needs).
  """
  saved = _saved_tree(state_dir)
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


def _read_params(state_dir: epath.Path, abstract_params: Any, restore_args: Any) -> Any:
  """The `params` subtree of a saved TrainState (a partial restore: no optimizer state read)."""
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True))["params"]


def parameter_name(path) -> str:
  """'patchify/stem_conv/kernel' for a parameter's tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _resize_grid(table: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
  """Bilinear resize of the one axis of `table` that differs from `shape`, read as a square grid
  (g*g image positions, or (2g-1)^2 relative position buckets), so a checkpoint moves to another
  image resolution. Other axes (e.g. the stacked layers of a scanned model) stay as they are."""
  axes = [i for i, (a, b) in enumerate(zip(table.shape, shape)) if a != b]
  old_rows = table.shape[axes[0]] if len(axes) == 1 else 0
  old, new = int(round(np.sqrt(old_rows))), int(round(np.sqrt(shape[axes[0]] if axes else 0)))
  if len(axes) != 1 or old * old != old_rows or new * new != shape[axes[0]]:
    raise ValueError(f"cannot resize {table.shape} to {shape}: not one square grid axis")
  moved = np.moveaxis(table, axes[0], 0)
  grid = moved.reshape((old, old) + moved.shape[1:])
  resized = jax.image.resize(grid, (new, new) + moved.shape[1:], method="bilinear")
  return np.moveaxis(np.asarray(resized).reshape((new * new,) + moved.shape[1:]), 0, axes[0])


RESIZABLE = ("image_positions/embedding", "image_relpos/rel_bias")


def load_pretrained_params(init_from: str, target: Any) -> Tuple[Any, dict]:
  """Partial restore for finetuning: pretrained values where they fit, `target` elsewhere.

  Args:
    init_from: a model_dir (its latest checkpoint) or one checkpoint step directory.
    target: freshly initialised params (sharded `jax.Array`s); their shardings are kept.

  Returns:
    (params, report) where report lists the "loaded", "resized" (image position tables of another
    resolution, interpolated), "new" (not in the checkpoint: initialised) and "unused" (in the
    checkpoint, not in the model) parameter names.
  """
  state_dir = _pretrained_step_dir(absolute(init_from))
  # Restore the parameters only (never the optimizer state), as host numpy arrays.
  tree = _saved_tree(state_dir / "state")
  what = f"checkpoint {state_dir.name} ({state_dir})"
  if tree is None or "params" not in tree:
    raise CheckpointError(f"init_from: {what} cannot be read (its metadata is missing or damaged)")
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])
  try:
    loaded = _read_params(state_dir / "state", abstract, jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract))
  except Exception as e:  # pylint: disable=broad-except
    _quiet_failed_read()
    raise CheckpointError(f"init_from: {what} cannot be read ({root_cause(e)}); point init_from "
                          "at another step directory") from e
  pretrained = {parameter_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
  report = {"loaded": [], "resized": [], "new": [], "unused": []}
  used = set()

  def pick(path, current):
    name = parameter_name(path)
    value = pretrained.get(name)
    if value is None:
      report["new"].append(name)
      return current
    used.add(name)
    if value.shape != current.shape:
      if not name.endswith(RESIZABLE) or value.ndim != current.ndim:
        raise CheckpointError(f"init_from: {name} is {value.shape} in {what}, {current.shape} "
                              "in this model (only image position tables are resized)")
      value = _resize_grid(value, current.shape)
      report["resized"].append(name)
    else:
      report["loaded"].append(name)
    return jax.device_put(value.astype(current.dtype), current.sharding)

  params = jax.tree_util.tree_map_with_path(pick, target)
  report["unused"] = sorted(set(pretrained) - used)
  return params, report


def _pretrained_step_dir(path: epath.Path) -> epath.Path:
  """The step directory `init_from` names: a model_dir or checkpoints dir (its newest finalised
  step; a step a killed run left unfinished is never picked) or one step directory."""
  if (path / "state").exists():
    return path
  if (path / "checkpoints").exists():
    path = path / "checkpoints"
  if not path.exists():
    raise CheckpointError(f"init_from: {path} does not exist")
  steps = ocp.path.step.checkpoint_steps(path)
  if not steps:
    raise CheckpointError(f"init_from: no finished checkpoint in {path}")
  return path / str(max(steps))
