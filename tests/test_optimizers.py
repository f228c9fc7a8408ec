"""Lean optimizer state: Adafactor's factored moments and bfloat16 state, sharded like the
parameters they track."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import memory
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.errors import UserError
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer, make_optimizer

ADAFACTOR = ["make_optimizer.name = 'adafactor'", "learning_rate_schedule.peak_learning_rate = 1e-2"]
BF16 = ["make_optimizer.state_dtype = 'bfloat16'"]


def _losses(config, bindings, mesh=(1, 1, 1), steps=6):
  gin.clear_config()
  gin.parse_config(bindings + ["learning_rate_schedule.warmup_fraction = 0.1"])
  try:
    partitioner = Partitioner(mesh, devices=jax.devices()[:int(np.prod(mesh))])
    trainer = Trainer(config, partitioner, total_steps=steps)
    state = trainer.init_state()
  finally:
    gin.clear_config()  # the optimizer is built: the bindings are not needed past here
  batch = partitioner.shard_batch(next(SyntheticIterator(
      image_text_batch=8, image_text_length=12, text_batch=8, text_length=16,
      image_size=config.image_size, vocab_size=config.vocab_size)))
  losses = []
  for _ in range(steps):  # one batch again and again: the loss must fall
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return trainer, state, losses


@pytest.fixture(scope="module")
def config(tiny_config):
  return tiny_config(emb_dim=128, mlp_dim=256, num_heads=4, head_dim=32, vocab_size=128)


@pytest.fixture(scope="module")
def adam(config):
  return _losses(config, [])


@pytest.fixture(scope="module")
def adafactor(config):
  return _losses(config, ADAFACTOR)


def test_adafactor_state_is_factored_and_trains(adam, adafactor):
  adam_trainer, _, adam_losses = adam
  trainer, state, losses = adafactor
  adam_bytes = memory.bytes_per_device(adam_trainer.abstract_state.opt_state)
  params = memory.bytes_per_device(trainer.abstract_state.params)
  assert adam_bytes >= 2 * params
  # Tensors whose two largest dims are >= 32 keep their sums over each; the rest a full moment.
  assert memory.bytes_per_device(trainer.abstract_state.opt_state) < 0.25 * params
  kernel = state.opt_state[1][0].v_row["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
  assert kernel.shape == (128,)  # [embed, mlp] -> its row statistics
  assert losses[-1] < losses[0] - 1.0 and adam_losses[-1] < adam_losses[0] - 1.0


def test_adafactor_state_is_sharded_like_its_parameters(config, adafactor):
  single_trainer = adafactor[0]
  gin.parse_config(ADAFACTOR)
  try:
    abstract = Trainer(config, Partitioner((1, 4, 2)), total_steps=6).abstract_state
  finally:
    gin.clear_config()
  kernel = lambda tree: tree["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]  # noqa: E731
  factored = abstract.opt_state[1][0]
  assert kernel(abstract.params).sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  # The row statistics keep the embed dim (fsdp), the column ones the mlp dim (model).
  assert kernel(factored.v_row).sharding.spec == jax.sharding.PartitionSpec("fsdp")
  assert kernel(factored.v_col).sharding.spec == jax.sharding.PartitionSpec("model")
  assert memory.bytes_per_device(abstract.opt_state) < 0.5 * memory.bytes_per_device(
      single_trainer.abstract_state.opt_state)


def test_bfloat16_state_halves_adam_and_tracks_float32(config, adam):
  adam_trainer, _, adam_losses = adam
  trainer, state, losses = _losses(config, BF16)
  mu = state.opt_state[1][0].mu["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
  assert mu.dtype == jnp.bfloat16 and state.params["token_embed"]["embedding"].dtype == jnp.float32
  full = memory.bytes_per_device(adam_trainer.abstract_state.opt_state)
  assert abs(memory.bytes_per_device(trainer.abstract_state.opt_state) - full / 2) < 64
  np.testing.assert_allclose(losses, adam_losses, rtol=2e-2)
  assert losses[-1] < losses[0] - 1.0


def test_optimizer_settings_are_checked():
  with pytest.raises(UserError, match="make_optimizer.name must be 'adamw' or 'adafactor', got "
                     "'sgd'"):
    make_optimizer(lambda _: 1e-3, name="sgd")
  with pytest.raises(UserError, match="state_dtype must be 'bfloat16', 'float32' or None, got "
                     "'float16'"):
    make_optimizer(lambda _: 1e-3, state_dtype="float16")


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_learning_rate_multipliers_scale_the_named_parameters_updates(name):
  """make_optimizer.lr_multipliers: the updates of the parameters whose names match are the
  plain optimizer's times the factor (weight decay included), the rest are the plain ones."""
  params = {"patchify": {"stem_conv": {"kernel": jnp.full((3, 3, 3, 4), 0.5)},
                         "stem_norm": {"scale": jnp.ones(4)}},
            "encoder": {"layer_0": {"mlp": {"wi": {"kernel": jnp.full((4, 8), -0.25)}}}}}
  grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
  plain = make_optimizer(lambda step: 1e-2, name=name, weight_decay=0.1)
  scaled = make_optimizer(lambda step: 1e-2, name=name, weight_decay=0.1,
                          lr_multipliers={"patchify/stem_conv/.*": 3.0, "encoder/.*": 0.5})
  want, _ = plain.update(grads, plain.init(params), params)
  got, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(got["patchify"]["stem_conv"]["kernel"],
                             3.0 * want["patchify"]["stem_conv"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(got["encoder"]["layer_0"]["mlp"]["wi"]["kernel"],
                             0.5 * want["encoder"]["layer_0"]["mlp"]["wi"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(got["patchify"]["stem_norm"]["scale"],
                                want["patchify"]["stem_norm"]["scale"])
  assert np.abs(want["patchify"]["stem_conv"]["kernel"]).min() > 0  # not a vacuous comparison


def test_a_learning_rate_multiplier_that_matches_nothing_is_refused():
  params = {"patchify": {"stem_conv": {"kernel": jnp.ones((3, 3))}}}
  tx = make_optimizer(lambda step: 1e-3, lr_multipliers={"patchify": 3.0})  # not the whole name
  with pytest.raises(UserError, match=r"^make_optimizer.lr_multipliers: \['patchify'\] match no "
                                      r"parameter \(names look like 'patchify/stem_conv/kernel'"):
    tx.init(params)
