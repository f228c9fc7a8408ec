"""Sharded training on 8 forced CPU devices: same numbers on every mesh, FSDP memory, mesh moves."""
import jax
import numpy as np
import pytest

from simvlm_jax import checkpoints
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.partitioning import Partitioner, resolve_mesh_shape
from simvlm_jax.trainer import Trainer

MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _run(config, mesh_shape, steps=3):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  partitioner = Partitioner(mesh_shape, devices=devices)
  trainer = Trainer(config, partitioner, total_steps=10)
  state = trainer.init_state()
  data = SyntheticIterator(image_text_batch=8, image_text_length=12, text_batch=8, text_length=16,
                           image_size=config.image_size, vocab_size=config.vocab_size)
  losses = []
  for _ in range(steps):
    state, metrics = trainer.train_step(state, partitioner.shard_batch(next(data)))
    losses.append(float(metrics["loss"]))
  return trainer, state, losses


def test_resolve_mesh_shape():
  assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="does not divide"):
    resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match="devices"):
    resolve_mesh_shape((2, 2, 1), 8)


@pytest.fixture(scope="module")
def reference_losses(tiny_config):
  losses = _run(tiny_config(), MESHES[0])[2]
  assert losses[-1] < losses[0]  # it trains
  return losses


# One case per mesh, so that pytest-xdist spreads the compilations over its workers.
@pytest.mark.parametrize("mesh", MESHES[1:], ids=lambda m: "x".join(map(str, m)))
def test_same_losses_on_every_mesh(tiny_config, reference_losses, mesh):
  np.testing.assert_allclose(_run(tiny_config(), mesh)[2], reference_losses, rtol=1e-5)


def _bytes_per_device(tree):
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return per_device


def test_fsdp_memory_bound(tiny_config):
  """With fsdp=8, every device holds at most total/8 of the parameter bytes plus the tensors that
  stay replicated because no dimension of theirs is sharded (norm scales/biases, relative position
  tables, the 3-channel stem conv); those must be small (< 5% of the total)."""
  config = tiny_config(emb_dim=64, mlp_dim=128, vocab_size=128)
  partitioner = Partitioner((1, 8, 1))
  state = Trainer(config, partitioner, total_steps=10).init_state()
  params = state.params
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  replicated = sum(x.nbytes for x in jax.tree.leaves(params) if x.sharding.is_fully_replicated)
  assert replicated < 0.05 * total
  per_device = _bytes_per_device(params)
  assert len(per_device) == 8
  bound = total / 8 + replicated
  assert max(per_device.values()) <= bound, (max(per_device.values()), bound)
  # The optimizer state (Adam mu and nu) is sharded the same way.
  opt_bytes = _bytes_per_device(state.opt_state)
  opt_total = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  assert max(opt_bytes.values()) <= opt_total / 8 + 2 * replicated + 64


def test_state_is_created_sharded(tiny_config):
  partitioner = Partitioner((2, 2, 2))
  trainer = Trainer(tiny_config(), partitioner, total_steps=10)
  state = trainer.init_state()
  kernel = state.params["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]  # [embed, mlp]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_shardings)):
    assert leaf.sharding == sharding


def test_checkpoint_restores_onto_another_mesh(tiny_config, tmp_path):
  config = tiny_config()
  trainer, state, _ = _run(config, (2, 2, 2), steps=2)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1)
  ckpt.save(state)
  ckpt.wait()
  expected = jax.device_get(state.params)
  for mesh in [(1, 8, 1), (1, 1, 1)]:
    devices = jax.devices()[:int(np.prod(mesh))]
    other = Trainer(config, Partitioner(mesh, devices=devices), total_steps=10)
    restored = ckpt.restore(other.abstract_state)
    assert int(restored.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), expected)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(other.state_shardings)):
      assert leaf.sharding == sharding
    # The parameters alone (evaluation, prediction): same values, the target's shardings.
    params = ckpt.restore_params(other.abstract_state.params, step=2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)
    for leaf, sharding in zip(jax.tree.leaves(params),
                              jax.tree.leaves(other.state_shardings.params)):
      assert leaf.sharding == sharding
  ckpt.close()
