"""Orbax checkpoints: train state + data iterator position, saved together, restorable on any mesh.

Layout: `<model_dir>/checkpoints/<step>/{state, data}`. `state` is the sharded TrainState (each
process writes its shards); `data` holds one iterator file per process, written by the iterator's
own `save(path)`, so a resumed run replays nothing and skips nothing. Orbax commits a step
atomically (temporary directory, then rename), so a killed run never leaves a half checkpoint that
a restart would pick up.
"""
import dataclasses
import os
from typing import Any, Optional

import gin
import jax
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

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
