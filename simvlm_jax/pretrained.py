"""Finetuning's start: the parameters of a pretrained run where they fit the new model.

`train.init_from` names a pretraining run (its newest finished checkpoint) or one step directory;
`load_params` reads only its parameters (never the optimizer state) as host arrays, puts each
where the new model has the same name and shape, interpolates the image position tables of
another resolution, and reports what was loaded, resized, new and unused.
"""
from typing import Any, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from simvlm_jax import checkpoint_faults as faults, checkpoints
from simvlm_jax.errors import CheckpointError


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


def load_params(init_from: str, target: Any) -> Tuple[Any, dict]:
  """Partial restore for finetuning: pretrained values where they fit, `target` elsewhere.

  Args:
    init_from: a model_dir (its latest checkpoint) or one checkpoint step directory.
    target: freshly initialised params (sharded `jax.Array`s); their shardings are kept.

  Returns:
    (params, report) where report lists the "loaded", "resized" (image position tables of another
    resolution, interpolated), "new" (not in the checkpoint: initialised) and "unused" (in the
    checkpoint, not in the model) parameter names.
  """
  state_dir = _pretrained_step_dir(checkpoints.absolute(init_from))
  # Restore the parameters only (never the optimizer state), as host numpy arrays.
  tree = checkpoints.saved_tree(state_dir / "state")
  what = f"checkpoint {state_dir.name} ({state_dir})"
  if tree is None or "params" not in tree:
    raise CheckpointError(f"init_from: {what} cannot be read (its metadata is missing or damaged)")
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])
  try:
    loaded = checkpoints.read_state_params(state_dir / "state", abstract, jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract))
  except Exception as e:  # pylint: disable=broad-except
    faults.after_failed_read()
    raise CheckpointError(f"init_from: {what} cannot be read ({faults.root_cause(e)}); point "
                          "init_from at another step directory") from e
  pretrained = {checkpoints.parameter_name(p): v
                for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
  report = {"loaded": [], "resized": [], "new": [], "unused": []}
  used = set()

  def pick(path, current):
    name = checkpoints.parameter_name(path)
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
