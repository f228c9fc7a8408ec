"""The optimizers: weight decay that follows the learning rate, Adafactor against a hand-written
one over many steps, and lean state (Adafactor's factored moments, bfloat16 state) sharded like
the parameters it tracks."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simvlm_jax import gin_utils, memory
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.errors import UserError
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer, learning_rate_schedule, make_optimizer

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


# A matrix (decayed), a vector (never decayed) and a matrix too small to factor at min dim 4.
PARAMS = {"kernel": np.linspace(-2.0, 1.5, 24).reshape(4, 6),
          "bias": np.array([0.5, -2.0, 1.0, 0.25, -0.75, 3.0]),
          "table": np.linspace(0.5, -1.0, 15).reshape(3, 5)}


def _run(tx, grads):
  """One update of `tx` per gradient in `grads`, from PARAMS (float32)."""
  params = jax.tree.map(jnp.float32, PARAMS)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grad):
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state
  for grad in grads:
    params, state = step(params, state, grad)
  return jax.device_get(params)


ZEROS = [jax.tree.map(np.zeros_like, PARAMS)] * 100


def test_weight_decay_is_scaled_by_the_learning_rate():
  """100 steps with zero gradients: weight decay alone moves the weights, in AdamW and Adafactor
  alike. At learning rate 0 nothing moves; at a constant 0.01 with decay 0.1 each matrix is
  multiplied by (1 - 0.01 * 0.1)^100 = 0.90479 (optax's Adafactor decay took 0.9^100 = 2.7e-5 of
  it, and at learning rate 0 too); vectors are never decayed."""
  factor = (1 - 0.01 * 0.1) ** 100
  np.testing.assert_allclose(factor, 0.904792, rtol=1e-6)
  for name in ("adamw", "adafactor"):
    still = _run(make_optimizer(lambda step: 0.0, name=name, weight_decay=0.1), ZEROS)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=name), still,
                 jax.tree.map(np.float32, PARAMS))
    decayed = _run(make_optimizer(lambda step: 0.01, name=name, weight_decay=0.1), ZEROS)
    for key in ("kernel", "table"):
      np.testing.assert_allclose(decayed[key], factor * PARAMS[key], rtol=1e-5,
                                 err_msg=f"{name} {key}")
    np.testing.assert_array_equal(decayed["bias"], np.float32(PARAMS["bias"]), err_msg=name)


def test_weight_decay_defaults_adamw_to_001_and_adafactor_to_none():
  """t5x's Adafactor has no weight decay: by default (and with gin/optimizers/adafactor.gin over
  pretrain.gin's AdamW 0.01) zero gradients leave its weights where they are; AdamW's default
  multiplies a matrix by (1 - 0.01 * 0.01)^100 = 0.990049."""
  want = jax.tree.map(np.float32, PARAMS)
  jax.tree.map(np.testing.assert_array_equal,
               _run(make_optimizer(lambda step: 0.01, name="adafactor"), ZEROS), want)
  np.testing.assert_allclose(_run(make_optimizer(lambda step: 0.01), ZEROS)["kernel"],
                             0.990049 * PARAMS["kernel"], rtol=1e-5)
  # The run file binds train.*: importing train registers it.
  from simvlm_jax import train  # noqa: F401  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  try:
    gin_utils.parse_gin(["runs/synthetic_tiny.gin", "optimizers/adafactor.gin"], [])
    tx = make_optimizer(lambda step: 0.01)
  finally:
    gin.clear_config()
  jax.tree.map(np.testing.assert_array_equal, _run(tx, ZEROS), want)


def _adafactor_reference(grads, learning_rate, weight_decay, min_dim):
  """Adafactor as Shazeer & Stern (2018) write it, in float64, after global-norm clipping at 1:
  second moments decaying at 1 - t^-0.8, factored as row sums R and column sums C
  (V = R C / sum(R)) for a matrix whose two dims are >= `min_dim`; the step clipped to RMS 1,
  scaled by the parameter's RMS (at least 1e-3), plus decoupled weight decay on matrices, times
  the learning rate."""
  params = {k: v.copy() for k, v in PARAMS.items()}
  moments = {k: (np.zeros(v.shape[0]), np.zeros(v.shape[1]))
             if v.ndim == 2 and min(v.shape) >= min_dim else np.zeros(v.shape)
             for k, v in PARAMS.items()}
  for t, grad in enumerate(grads, start=1):
    norm = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in grad.values()))
    grad = {k: g * min(1.0, 1.0 / norm) for k, g in grad.items()}
    decay = 1.0 - t ** -0.8
    for k, g in grad.items():
      g2 = g ** 2 + 1e-30
      if isinstance(moments[k], tuple):
        rows, cols = moments[k]
        rows = decay * rows + (1 - decay) * g2.sum(1)
        cols = decay * cols + (1 - decay) * g2.sum(0)
        moments[k] = rows, cols
        v = np.outer(rows, cols) / rows.sum()
      else:
        v = moments[k] = decay * moments[k] + (1 - decay) * g2
      u = g / np.sqrt(v)
      u = u / max(1.0, np.sqrt(np.mean(u ** 2)))
      u = u * max(np.sqrt(np.mean(params[k] ** 2)), 1e-3)
      if params[k].ndim > 1:
        u = u + weight_decay * params[k]
      params[k] = params[k] - learning_rate(t - 1) * u
  return params


def test_adafactor_matches_a_hand_written_adafactor_over_many_steps():
  """200 steps of make_optimizer's Adafactor (global-norm clipping, factoring, update clipping,
  parameter scale, weight decay, a warmup-then-decay schedule) against `_adafactor_reference`,
  on random gradients whose global norm is below and above the clipping norm of 1."""
  rng = np.random.default_rng(0)
  grads = [{k: np.float32(rng.normal(size=p.shape) * 0.06 * (1 + t % 5))
            for k, p in PARAMS.items()} for t in range(200)]
  norms = [np.sqrt(sum(np.sum(g ** 2) for g in grad.values())) for grad in grads]
  assert min(norms) < 0.6 and max(norms) > 1.5
  schedule = learning_rate_schedule(200, peak_learning_rate=0.05, warmup_fraction=0.1)
  tx = make_optimizer(schedule, name="adafactor", weight_decay=0.1, clip_norm=1.0,
                      adafactor_min_dim_to_factor=4)
  got = _run(tx, grads)
  want = _adafactor_reference(grads, lambda t: float(schedule(t)), 0.1, min_dim=4)
  for key in PARAMS:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Not a vacuous comparison: every weight moved, the matrices shrank under the decay.
  assert min(np.abs(want[k] - PARAMS[k]).min() for k in PARAMS) > 1e-3
  for key in ("kernel", "table"):
    assert np.sqrt(np.mean(want[key] ** 2)) < 0.8 * np.sqrt(np.mean(PARAMS[key] ** 2))
