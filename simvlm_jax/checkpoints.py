"""Orbax checkpoints: train state + data iterator position, saved together, restorable on any mesh.

Layout: `<model_dir>/checkpoints/<step>/{state, data}`. `state` is the sharded TrainState (each
process writes its shards); `data` holds one iterator file per process, written by the iterator's
own `save(path)`, so a resumed run replays nothing and skips nothing. Orbax commits a step
atomically (temporary directory, then rename), so a killed run never leaves a half checkpoint that
a restart would pick up.
"""
import dataclasses
import os
from typing import Any, Optional, Tuple

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def _iterator_path(directory: epath.Path) -> str:
  return os.fspath(directory / f"process_{jax.process_index()}")


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a data iterator through its `save(path)` / `restore(path)` methods."""

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(_iterator_path(directory))

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


@gin.configurable
class Checkpointer:
  """A CheckpointManager for TrainState and the data iterator.

  Args:
    directory: where step directories go.
    keep: how many most recent checkpoints to keep (None: all).
    save_every: `save` writes when `step % save_every == 0`, and always when `force=True`.
    async_save: write in a background thread while training goes on.
  """

  def __init__(self, directory: str, keep: Optional[int] = 3, save_every: int = 1000,
               async_save: bool = True):
    self.save_every = save_every
    # The interval is decided here (Orbax's own policy would also save the first step).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(epath.Path(directory), options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return self.manager.all_steps()

  def save(self, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
    """Saves if the step is due (or `force`). Returns whether a save was started."""
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps() or (not force and step % self.save_every):
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = DataIteratorSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iterator: Any = None,
              step: Optional[int] = None) -> Any:
    """Restores `step` (default: latest) onto the shardings carried by `abstract_state`.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` set: the checkpoint may
    have been written on any other mesh. The data iterator, if given, is restored in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = DataIteratorRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Only the parameters of `step` (default: latest), onto `abstract_params`' shardings.

    Evaluation and prediction use this: the optimizer state (twice the parameters, for Adam) is
    never read from storage nor held in memory.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    return _read_params(self.manager.directory / str(step) / "state", abstract_params,
                        ocp.checkpoint_utils.construct_restore_args(abstract_params))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _read_params(state_dir: epath.Path, abstract_params: Any, restore_args: Any) -> Any:
  """The `params` subtree of a saved TrainState (a partial restore: no optimizer state read)."""
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True))["params"]


def _path_name(path) -> str:
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
  state_dir = epath.Path(init_from)
  if (state_dir / "checkpoints").exists():
    state_dir = state_dir / "checkpoints"
  if not (state_dir / "state").exists():
    steps = sorted(int(p.name) for p in state_dir.iterdir() if p.name.isdigit())
    if not steps:
      raise FileNotFoundError(f"no checkpoint to initialise from in {init_from}")
    state_dir = state_dir / str(steps[-1])
  # Restore the parameters only (never the optimizer state), as host numpy arrays.
  metadata = ocp.StandardCheckpointer().metadata(state_dir / "state")
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])
  loaded = _read_params(state_dir / "state", abstract, jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract))
  pretrained = {_path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
  report = {"loaded": [], "resized": [], "new": [], "unused": []}
  used = set()

  def pick(path, current):
    name = _path_name(path)
    value = pretrained.get(name)
    if value is None:
      report["new"].append(name)
      return current
    used.add(name)
    if value.shape != current.shape:
      if not name.endswith(RESIZABLE) or value.ndim != current.ndim:
        raise ValueError(f"{name}: checkpoint shape {value.shape} does not fit the model's "
                         f"{current.shape}")
      value = _resize_grid(value, current.shape)
      report["resized"].append(name)
    else:
      report["loaded"].append(name)
    return jax.device_put(value.astype(current.dtype), current.sharding)

  params = jax.tree_util.tree_map_with_path(pick, target)
  report["unused"] = sorted(set(pretrained) - used)
  return params, report
