"""Tests of the pretraining objectives (simvlm_jax/objectives.py), against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import objectives

EOS = 1


def make_rows(lengths, max_len, rng=None, low=2, high=60):
  """EOS-terminated, 0-padded rows with `lengths[i]` real tokens (EOS included)."""
  rng = rng or np.random.RandomState(0)
  tokens = np.zeros((len(lengths), max_len), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n - 1] = rng.randint(low, high, size=n - 1)
    tokens[i, n - 1] = EOS
  return tokens


def prefix_len_of(out):
  """k per row, read back from the prefix the objective produced."""
  return np.sum(np.asarray(out["prefix_tokens"]) > 0, axis=1)


# --- determinism of the draws -----------------------------------------------------------------------

def test_row_keys_are_a_pure_function_of_seed_step_and_index():
  idx = jnp.arange(8)
  a = jax.random.key_data(objectives.row_keys(3, 5, idx))
  b = jax.random.key_data(objectives.row_keys(3, jnp.int32(5), idx))
  np.testing.assert_array_equal(a, b)
  # A row's key depends on its own example index only, not on which other rows are in the batch.
  c = jax.random.key_data(objectives.row_keys(3, 5, jnp.arange(4, 8)))
  np.testing.assert_array_equal(a[4:], c)
  # All rows get distinct keys; a different step or seed gives other keys.
  assert len({tuple(k) for k in np.asarray(a).reshape(8, -1)}) == 8
  assert not np.array_equal(a, jax.random.key_data(objectives.row_keys(3, 6, idx)))
  assert not np.array_equal(a, jax.random.key_data(objectives.row_keys(4, 5, idx)))


@pytest.mark.parametrize("with_image", [True, False])
def test_prefix_lm_draw_is_deterministic_in_seed_step_index(with_image):
  tokens = jnp.asarray(make_rows([40] * 64, 48))
  idx = jnp.arange(64)
  k = lambda seed, step, i=idx: prefix_len_of(
      objectives.prefix_lm(tokens[: len(i)], objectives.row_keys(seed, step, i), with_image))
  k0 = k(0, 7)
  np.testing.assert_array_equal(k0, k(0, 7))  # same inputs -> same k
  np.testing.assert_array_equal(k0[:16], k(0, 7, idx[:16]))  # batch composition does not matter
  # Different step (or seed) -> different draws across the batch (k has 40 possible values).
  assert np.mean(k0 != k(0, 8)) > 0.5
  assert np.mean(k0 != k(1, 7)) > 0.5
  # jit does not change the draw.
  jitted = jax.jit(lambda t, s: objectives.prefix_lm(t, objectives.row_keys(0, s, idx), with_image))
  np.testing.assert_array_equal(prefix_len_of(jitted(tokens, jnp.int32(7))), k0)


# --- the range and distribution of k --------------------------------------------------------------

@pytest.mark.parametrize("with_image,lo", [(True, 0), (False, 1)])
def test_prefix_lengths_cover_exactly_the_specified_range_uniformly(with_image, lo):
  n, rows, steps = 6, 256, 8  # k in [lo, n - 1]: 6 (image) or 5 (text) values, 2048 draws.
  tokens = jnp.asarray(make_rows([n] * rows, 10))
  idx = jnp.arange(rows)
  fn = jax.jit(lambda s: objectives.draw_prefix_lengths(objectives.row_keys(0, s, idx), tokens, lo))
  ks = np.concatenate([np.asarray(fn(jnp.int32(s))) for s in range(steps)])
  values, counts = np.unique(ks, return_counts=True)
  np.testing.assert_array_equal(values, np.arange(lo, n))  # both ends hit, nothing outside
  expected = len(ks) / len(values)
  chi2 = np.sum((counts - expected) ** 2 / expected)
  # df <= 5: P(chi2 > 30) < 2e-5 for a uniform draw; a skewed draw (e.g. one end never or twice as
  # often drawn) gives chi2 in the hundreds.
  assert chi2 < 30, (counts, chi2)


@pytest.mark.parametrize("with_image", [True, False])
def test_prefix_lm_bounds_for_every_row_length(with_image):
  lengths = [1, 2, 3, 5, 9, 17, 31, 32] * 16
  tokens = make_rows(lengths, 32)
  out = objectives.prefix_lm(jnp.asarray(tokens),
                             objectives.row_keys(0, 1, jnp.arange(len(lengths))), with_image)
  k = prefix_len_of(out)
  n = np.asarray(lengths)
  lo = np.where(n >= 2, 0 if with_image else 1, 0)
  assert np.all(k >= lo) and np.all(k <= n - 1), (k, n)
  weights = np.asarray(out["loss_weights"])
  np.testing.assert_array_equal(weights.sum(1), n - k)  # at least one target (the EOS) remains
  # Every row: prefix + targets reconstruct the row; padding carries weight 0.
  targets = np.asarray(out["decoder_target_tokens"])
  for i in range(len(lengths)):
    rebuilt = np.concatenate([tokens[i, :k[i]], targets[i, :n[i] - k[i]]])
    np.testing.assert_array_equal(rebuilt, tokens[i, :n[i]])
    assert np.all(targets[i, n[i] - k[i]:] == 0)
  np.testing.assert_array_equal(weights, (targets > 0).astype(np.float32))


def test_image_text_no_prefix_rate_gives_that_share_of_image_rows_an_empty_prefix():
  """k = 0 for a `rate` share of image rows (binomial bounds), uniform k for the rest, drawn as at
  rate 0; text rows never change."""
  n, rows = 9, 2048
  tokens = jnp.asarray(make_rows([n] * rows, 12))
  keys = objectives.row_keys(0, 3, jnp.arange(rows))
  k = {rate: prefix_len_of(objectives.prefix_lm(tokens, keys, True, rate))
       for rate in (0.0, 0.5, 1.0)}
  assert np.all(k[1.0] == 0)
  changed = k[0.5] != k[0.0]
  assert np.all(k[0.5][changed] == 0)  # a row either keeps its uniform draw or gets k = 0
  empty = np.mean(k[0.5] == 0)  # 0.5 + 0.5 * 1/9 (the uniform draw's own k = 0) = 0.556
  assert abs(empty - (0.5 + 0.5 / n)) < 4 * np.sqrt(0.25 / rows), empty
  for rate in (0.5, 1.0):
    np.testing.assert_array_equal(
        prefix_len_of(objectives.prefix_lm(tokens, keys, False, rate)),
        prefix_len_of(objectives.prefix_lm(tokens, keys, False)))
  with pytest.raises(objectives.UserError, match="image_text_no_prefix_rate"):
    objectives.prefix_lm(tokens, keys, True, 1.5)


def test_plain_lm_has_no_prefix():
  tokens = make_rows([7, 3, 12], 12)
  for with_image in (True, False):
    out = objectives.plain_lm(jnp.asarray(tokens), objectives.row_keys(0, 0, jnp.arange(3)),
                              with_image)
    assert np.all(np.asarray(out["prefix_tokens"]) == 0)
    np.testing.assert_array_equal(out["decoder_target_tokens"], tokens)
    np.testing.assert_array_equal(out["decoder_positions"], np.broadcast_to(np.arange(12), (3, 12)))


# --- split_at on a hand-written example -------------------------------------------------------------

def test_split_at_hand_example():
  tokens = np.array([[5, 6, 7, 8, EOS, 0, 0, 0],
                     [9, EOS, 0, 0, 0, 0, 0, 0],
                     [4, 3, 2, EOS, 0, 0, 0, 0]], np.int32)
  out = objectives.split_at(jnp.asarray(tokens), jnp.array([2, 0, 3]))
  expect = dict(
      prefix_tokens=[[5, 6, 0, 0, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0],
                     [4, 3, 2, 0, 0, 0, 0, 0]],
      decoder_target_tokens=[[7, 8, EOS, 0, 0, 0, 0, 0],
                             [9, EOS, 0, 0, 0, 0, 0, 0],
                             [EOS, 0, 0, 0, 0, 0, 0, 0]],
      decoder_input_tokens=[[0, 7, 8, EOS, 0, 0, 0, 0],
                            [0, 9, EOS, 0, 0, 0, 0, 0],
                            [0, EOS, 0, 0, 0, 0, 0, 0]],
      # Targets keep the text positions they had in the row (the decoder continues the prefix);
      # past the end of the row the position is clipped to the last one (those carry weight 0).
      decoder_positions=[[2, 3, 4, 5, 6, 7, 7, 7],
                         [0, 1, 2, 3, 4, 5, 6, 7],
                         [3, 4, 5, 6, 7, 7, 7, 7]],
      loss_weights=[[1, 1, 1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0, 0, 0, 0]])
  assert set(out) == set(expect)
  for name, value in expect.items():
    np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(value), err_msg=name)
  assert out["loss_weights"].dtype == jnp.float32


# --- span corruption -------------------------------------------------------------------------------

VOCAB = 512


def _sentinel_runs(row):
  """Splits a decoded row (EOS-terminated) into [(sentinel, [tokens after it]), ...] and a head."""
  head, runs = [], []
  for t in row:
    if t == EOS:
      break
    if t >= VOCAB - 100:
      runs.append((int(t), []))
    elif runs:
      runs[-1][1].append(int(t))
    else:
      head.append(int(t))
  return head, runs


def test_span_corruption_structure_and_reconstruction():
  rng = np.random.RandomState(1)
  rows, max_len = 96, 64
  lengths = rng.randint(12, max_len + 1, size=rows)
  tokens = np.zeros((rows, max_len), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n - 1] = rng.permutation(np.arange(2, 400))[:n - 1]  # distinct ids per row
    tokens[i, n - 1] = EOS
  corrupt = jax.jit(lambda t, k: objectives.span_corruption(t, k, True, first_sentinel=VOCAB - 1,
                                                          num_sentinels=100))
  out = corrupt(jnp.asarray(tokens), objectives.row_keys(0, 0, jnp.arange(rows)))
  inputs = np.asarray(out["prefix_tokens"])
  targets = np.asarray(out["decoder_target_tokens"])
  np.testing.assert_array_equal(out["decoder_input_tokens"],
                                np.pad(targets[:, :-1], ((0, 0), (1, 0))))
  np.testing.assert_array_equal(out["loss_weights"], (targets > 0).astype(np.float32))

  noise_tokens = spans = body_tokens = 0
  noise_in_middle = 0
  for i, n in enumerate(lengths):
    body = tokens[i, :n - 1].tolist()
    for seq in (inputs[i], targets[i]):
      m = int(np.sum(seq > 0))
      assert seq[m - 1] == EOS and np.all(seq[m:] == 0) and np.sum(seq == EOS) == 1, seq
    in_head, in_runs = _sentinel_runs(inputs[i])
    tgt_head, tgt_runs = _sentinel_runs(targets[i])
    # Encoder: unique sentinels vocab-1, vocab-2, ... in order; targets start with vocab-1 and
    # interleave the same sentinels with the dropped spans.
    in_sentinels = [s for s, _ in in_runs]
    tgt_sentinels = [s for s, _ in tgt_runs]
    assert in_sentinels == list(range(VOCAB - 1, VOCAB - 1 - len(in_runs), -1)), inputs[i]
    assert tgt_head == [] and tgt_sentinels[:len(in_runs)] == in_sentinels, targets[i]
    assert len(in_runs) >= 1
    # Every dropped span is non-empty; in the encoder, spans are separated by kept text.
    spans_of = dict(tgt_runs)
    assert all(len(spans_of[s]) > 0 for s in in_sentinels)
    assert all(len(kept) > 0 for _, kept in in_runs[:-1])
    # Un-corrupting (sentinel -> its span from the targets) gives back the original text.
    rebuilt = list(in_head)
    for s, kept in in_runs:
      rebuilt += spans_of[s] + kept
    assert rebuilt == body, (i, body, inputs[i], targets[i])
    noise_tokens += sum(len(spans_of[s]) for s in in_sentinels)
    spans += len(in_runs)
    body_tokens += len(body)
    noise_in_middle += bool(in_runs[0][1])
  density = noise_tokens / body_tokens
  assert 0.13 < density < 0.17, density
  assert 2.0 < noise_tokens / spans < 4.5, noise_tokens / spans
  assert noise_in_middle > rows // 4  # spans are placed at random, not always at the end.
  # The draw is a function of the row keys.
  again = corrupt(jnp.asarray(tokens), objectives.row_keys(0, 0, jnp.arange(rows)))
  np.testing.assert_array_equal(again["prefix_tokens"], inputs)
  other = corrupt(jnp.asarray(tokens), objectives.row_keys(0, 1, jnp.arange(rows)))
  assert np.mean(np.any(np.asarray(other["prefix_tokens"]) != inputs, axis=1)) > 0.5


def test_random_spans_noise_mask_counts():
  keys = jax.random.split(jax.random.PRNGKey(0), 16)
  draw = jax.jit(jax.vmap(lambda k, n: objectives.random_spans_noise_mask(k, n, 128, 0.15, 3.0),
                          in_axes=(0, None)))
  for length, expect_noise in [(20, 3), (40, 6), (100, 15), (7, 1)]:
    masks = np.asarray(draw(keys, jnp.int32(length)))
    np.testing.assert_array_equal(masks.sum(1), expect_noise)
    assert not masks[:, length:].any()
    assert not masks[:, 0].any()  # as in T5, every row starts with kept text.
