"""Gradient accumulation (`train.num_microbatches`): without dropout the same step as one big
batch, on a mesh; with dropout the same in expectation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from simvlm_jax import objectives, trainer
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.errors import UserError
from simvlm_jax.models import SimVLM
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer, microbatches, split_batch

MESH = (2, 2, 2)  # data x fsdp x model over the 8 forced CPU devices


def _batches(config, steps):
  data = SyntheticIterator(image_text_batch=32, image_text_length=12, text_batch=16,
                           text_length=16, image_size=config.image_size,
                           vocab_size=config.vocab_size)
  return [next(data) for _ in range(steps)]


def _train(config, batches, num_microbatches):
  partitioner = Partitioner(MESH)
  trainer = Trainer(config, partitioner, total_steps=10, num_microbatches=num_microbatches)
  state = trainer.init_state()
  initial = jax.device_get(state.params)
  history = []
  for batch in batches:
    state, metrics = trainer.train_step(state, partitioner.shard_batch(batch))
    history.append(jax.device_get(metrics))
  return initial, jax.device_get(state.params), history


@pytest.fixture(scope="module")
def one_piece(tiny_config):
  config = tiny_config()
  batches = _batches(config, 2)
  return config, batches, _train(config, batches, 1)


def test_accumulated_step_equals_the_one_batch_step(one_piece):
  """Four pieces of 8 + 4 rows, one of each kind per device (two pieces: tests/test_multihost.py
  across two processes)."""
  config, batches, (initial, params, history) = one_piece
  _, got_params, got = _train(config, batches, 4)
  for step, (want, have) in enumerate(zip(history, got)):
    assert set(have) == set(want)
    for name in ("loss", "accuracy", "grad_norm", "target_tokens", "image_text/loss", "text/loss"):
      np.testing.assert_allclose(have[name], want[name], rtol=2e-5, err_msg=f"{name} @ {step}")
  # It trained (the comparison is not vacuous): the token embeddings moved.
  moved = np.abs(params["token_embed"]["embedding"] - initial["token_embed"]["embedding"])
  assert moved.max() > 1e-4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got_params,
               params)


def test_microbatch_rows_keep_their_global_prefix_lm_draws():
  tokens = np.zeros((8, 10), np.int32)
  tokens[:, :9] = np.arange(1, 10)  # 9 real tokens per row: many possible split points
  text = np.arange(1, 11)[None].repeat(4, 0).astype(np.int32)
  batch = {"image_text": {"text_tokens": tokens}, "text": {"text_tokens": text}}
  step = np.int32(3)
  whole = split_batch(batch, 0, step, objectives.prefix_lm)
  stacked = microbatches(batch, 4)
  for i in range(4):
    piece = split_batch(jax.tree.map(lambda x: x[i], stacked), 0, step, objectives.prefix_lm,
                        microbatch=(i, 4))
    for kind in whole:
      for key, value in piece[kind].items():
        np.testing.assert_array_equal(value, whole[kind][key][i::4], err_msg=f"{kind}/{key}")
  prefixes = np.sum(whole["image_text"]["prefix_tokens"] > 0, axis=1)
  assert len(set(prefixes.tolist())) > 1  # the draws differ per row, so the check has teeth


def test_microbatches_that_do_not_split_evenly_are_refused(tiny_config):
  config = tiny_config()
  batch = _batches(config, 1)[0]  # 32 image-text rows, 16 text rows
  partitioner = Partitioner(MESH)  # 4 batch shards
  trainer = Trainer(config, partitioner, total_steps=10, num_microbatches=8)
  with pytest.raises(UserError, match="num_microbatches = 8 leaves the 16 text rows of a step in "
                     "pieces that do not split over the mesh's 4 batch shards"):
    trainer.train_step(trainer.init_state(), partitioner.shard_batch(batch))
  with pytest.raises(UserError, match="num_microbatches = 3 does not divide a sub-batch of 32"):
    microbatches(batch, 3)
  with pytest.raises(UserError, match="must be a positive integer, got 0"):
    Trainer(config, partitioner, total_steps=10, num_microbatches=0)


def test_with_dropout_microbatches_give_the_one_piece_step_in_expectation(tiny_config):
  """With dropout, microbatch i draws its masks from its own key (the step's dropout key with i
  folded in), so the two-piece step is not the one-piece step mask for mask: for each of 256
  dropout keys their losses differ. Each row's masks have the same distribution either way, so
  over the 256 keys the mean gradients differ by their sampling noise alone: the squared distance
  between them over its expected value when the expectations are equal (the summed per-coordinate
  variances of the two means) is near 1, where the dropout-free gradient, which dropout does
  change in expectation, lies 90 times that far from the one-piece mean."""
  config = tiny_config(dropout_rate=0.2, stochastic_depth_rate=0.1,
                       decoder_stochastic_depth_rate=0.1, num_encoder_layers=1,
                       num_decoder_layers=1, patchifier="linear")
  model = SimVLM(config)
  params = nn.meta.unbox(trainer.init_params(model, config, jax.random.PRNGKey(0)))
  batch = jax.tree.map(jnp.asarray, next(SyntheticIterator(
      image_text_batch=4, image_text_length=8, text_batch=4, text_length=8,
      image_size=config.image_size, vocab_size=config.vocab_size)))

  def step(count, key):
    """(flat gradient, mean loss) of step 3 in `count` pieces with dropout key `key`."""
    grads, sums = trainer._grads_and_sums(  # pylint: disable=protected-access
        model, params, batch, seed=0, step=jnp.int32(3), objective=objectives.prefix_lm,
        dropout_rng=key, num_microbatches=count)
    return ravel_pytree(grads)[0], sums["loss_sum"] / sums["weight_sum"]

  keys = jax.random.split(jax.random.PRNGKey(1), 256)
  whole, whole_loss = map(np.asarray, jax.jit(jax.vmap(lambda k: step(1, k)))(keys))
  pieces, pieces_loss = map(np.asarray, jax.jit(jax.vmap(lambda k: step(2, k)))(keys))
  assert np.abs(whole_loss - pieces_loss).min() > 1e-4  # other masks, for every key

  # Squared distance between mean gradients over its expected value were their expectations
  # equal: the summed variances of the means.
  noise = lambda samples: samples.var(0).sum() / len(samples)  # noqa: E731
  gap = np.sum((pieces.mean(0) - whole.mean(0)) ** 2) / (noise(whole) + noise(pieces))
  assert 0.8 < gap < 1.5
  no_dropout = np.asarray(jax.jit(lambda: step(1, None)[0])())
  control = np.sum((whole.mean(0) - no_dropout) ** 2) / noise(whole)
  assert control > 20  # the check tells a different expectation apart
