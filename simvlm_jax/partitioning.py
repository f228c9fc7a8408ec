"""Device mesh and logical-axis sharding, the t5x way.

The model names axes logically (`batch`, `embed`, `mlp`, `heads`, ...); the rules below, set from gin,
map them onto the mesh axes `data`, `fsdp` and `model`. This is the only module that names mesh axes.
A logical axis whose mesh axes do not divide the dimension stays unsharded (e.g. the 3 input channels
of the stem conv), so any mesh works with any model size.
"""
import contextlib
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simvlm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "model")

# Order matters: an activation `[batch, length, embed]` gives `data`+`fsdp` to `batch`, so `embed`
# (which wants `fsdp`) stays unsharded there while parameter `embed` dims are sharded over `fsdp`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("classes", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("conv_out", "model"),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("kv", None),
    ("layers", None),  # the stacked axis of scanned layers
    ("length", None),
    ("text_pos", None),
    ("image_pos", None),
    ("image_index", None),
    ("relpos_buckets", None),
    ("conv_height", None),
    ("conv_width", None),
)


def _keys(path) -> Tuple[Any, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def _kept_names(shape: Tuple[int, ...], param_shape: Tuple[int, ...],
                names: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
  """The names of a parameter's dims that a state leaf keeps: all of them for the same shape,
  all but one for a factored moment (e.g. Adafactor's row / column statistics); else None."""
  if tuple(shape) == tuple(param_shape):
    return tuple(names)
  if len(shape) == len(param_shape) - 1:
    for drop in range(len(param_shape)):
      if tuple(shape) == tuple(param_shape[:drop] + param_shape[drop + 1:]):
        return tuple(names[:drop] + names[drop + 1:])
  return None


def box_like_params(tree: Any, boxed_params: Any) -> Any:
  """Logical axis names for optimizer state, from the parameters it tracks.

  Each leaf whose tree path ends with a parameter's path takes that parameter's names (AdamW's
  moments), or those of the dims it keeps (Adafactor's factored moments); other leaves (step
  counts, placeholders) stay unnamed, so they are replicated.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  boxes = {_keys(path): box
           for path, box in jax.tree_util.tree_leaves_with_path(boxed_params, is_leaf=is_box)
           if is_box(box)}

  def box(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):  # the longest matching path first
      if keys[start:] in boxes:
        param = boxes[keys[start:]]
        names = _kept_names(leaf.shape, param.value.shape, param.names)
        return param.replace(value=leaf, names=names) if names else leaf
    return leaf
  return jax.tree_util.tree_map_with_path(box, tree)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
  """Replaces a single -1 in `mesh_shape` by whatever makes the product `num_devices`."""
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise UserError(f"mesh_shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {mesh_shape}")
  if shape.count(-1) > 1:
    raise UserError(f"at most one -1 in mesh_shape, got {mesh_shape}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise UserError(f"mesh_shape {tuple(mesh_shape)} does not divide {num_devices} devices: "
                      "make the product of its other entries divide the device count")
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise UserError(f"mesh_shape {tuple(shape)} has {int(np.prod(shape))} devices, but this run "
                    f"has {num_devices}: make the product {num_devices}, or let one entry be -1 "
                    "(e.g. Partitioner.mesh_shape = (-1, 1, 1))")
  return tuple(shape)


@gin.configurable
class Partitioner:
  """Owns the mesh and the logical axis rules; builds shardings and global batches.

  Args:
    mesh_shape: sizes of (data, fsdp, model); one entry may be -1 for "the rest".
    logical_axis_rules: (logical name, mesh axis | tuple of mesh axes | None) pairs.
    devices: defaults to all devices (of all processes).
  """

  def __init__(self, mesh_shape: Sequence[int] = (-1, 1, 1),
               logical_axis_rules: Sequence[Tuple[str, Any]] = DEFAULT_RULES,
               devices: Optional[Sequence[Any]] = None):
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    try:
      device_array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      device_array = np.asarray(devices).reshape(shape)  # no topology information (e.g. CPU).
    self.mesh = Mesh(device_array, MESH_AXES)
    self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                       for name, axes in logical_axis_rules)

  @contextlib.contextmanager
  def activate(self):
    """Mesh and rules in scope, for tracing code that calls `nn.with_logical_constraint`."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def _fit(self, spec: P, shape: Sequence[int]) -> P:
    """Drops mesh axes that do not divide their dimension."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = int(np.prod([self.mesh.shape[a] for a in names])) if names else 1
      fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)

  def sharding_for_logical(self, logical_spec: P, shape: Sequence[int]) -> NamedSharding:
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), self.rules)
    return NamedSharding(self.mesh, self._fit(mesh_spec, shape))

  def shardings_for(self, boxed_abstract_tree: Any) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (from `jax.eval_shape`).

    The result has the structure of the unboxed tree; unannotated leaves are replicated.
    """
    specs = nn.get_partition_spec(boxed_abstract_tree)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed_abstract_tree))
    return jax.tree.map(lambda spec, shape: self.sharding_for_logical(spec, shape), specs, shapes,
                        is_leaf=lambda x: isinstance(x, P))

  @property
  def data_sharding(self) -> NamedSharding:
    """Leading (batch) dimension over `data` x `fsdp`; the rest replicated."""
    return NamedSharding(self.mesh, P(("data", "fsdp")))

  @property
  def batch_shards(self) -> int:
    """How many ways the batch dimension is split (data x fsdp)."""
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def shard_global_batch(self, batch: Any) -> Any:
    """A batch every process holds whole (evaluation and prediction read every example on every
    host) -> global `jax.Array`s, rows over data x fsdp where they divide, else replicated."""
    def put(x):
      x = np.asarray(x)
      sharding = NamedSharding(self.mesh, self._fit(P(("data", "fsdp")), x.shape))
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, batch)

  def shard_batch(self, host_batch: Any) -> Any:
    """Per-process numpy batch -> global `jax.Array`s, batch dimension split over data x fsdp."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x)),
        host_batch)

  def local_rows(self, array: jax.Array) -> np.ndarray:
    """The rows of a global array sharded like `shard_batch`'s that this process holds, in the
    order it gave them: `shard_batch`'s inverse (e.g. for the outputs of a host-sharded eval)."""
    blocks = {}
    for shard in array.addressable_shards:
      blocks.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])
