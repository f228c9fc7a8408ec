"""Decoding: the cache matches the full forward pass; greedy, beam search and sampling are right."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import decoding
from simvlm_jax.models import SimVLM

ARCHS = ["encoder_decoder", "decoder_only"]


def _setup(tiny_config, arch, vocab=64, batch=2, **overrides):
  config = tiny_config(architecture=arch, vocab_size=vocab, **overrides)
  model = SimVLM(config)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3)), jnp.uint8)
  prompt = jnp.array([[2, 3, 4, 0], [4, 3, 0, 0]][:batch], jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images, prompt, prompt, prompt)["params"]
  return model, params, images, prompt


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_logits(model, params, images, prompt, tokens):
  """Full-sequence logits `[batch, L, vocab]` for decoder outputs `tokens`."""
  length = tokens.shape[1]
  dec_in = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
  positions = jnp.sum(prompt > 0, 1)[:, None] + jnp.arange(length)[None]
  return model.apply({"params": params}, images, prompt, dec_in, positions)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_steps_equal_full_forward(tiny_config, arch):
  model, params, images, prompt = _setup(tiny_config, arch)
  length = 7
  tokens = jnp.asarray(np.random.default_rng(2).integers(2, 64, (2, length)), jnp.int32)
  full = _teacher_forced_logits(model, params, images, prompt, tokens)
  encoded, mask, cache = jax.jit(decoding._prefill, static_argnums=(0, 4))(
      model, params, images, prompt, length)
  start = decoding._positions(prompt)
  token = jnp.zeros(2, jnp.int32)
  step_fn = jax.jit(decoding._apply_step, static_argnums=(0, 8))
  for step in range(length):
    logits, cache = step_fn(model, params, cache, encoded, mask, token, start + step,
                            jnp.int32(step), length)
    np.testing.assert_allclose(logits, full[:, step], atol=1e-5, err_msg=f"step {step}")
    token = tokens[:, step]


@pytest.mark.parametrize("scan", [False, True])
def test_reordering_beams_moves_self_attention_caches_only(tiny_config, scan):
  """Beam search reorders the self-attention caches by the chosen beams and leaves the
  cross-attention keys/values where they are: those are the same for every beam of a row (all
  projected from the row's encoder output), which is what makes not moving them exact."""
  model = SimVLM(tiny_config(scan_layers=scan, vocab_size=64))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  prompt = jnp.array([[2, 3, 4, 0], [4, 3, 0, 0]], jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), images, prompt, prompt, prompt)["params"]
  k = 3
  rep = lambda x: jnp.repeat(x, k, axis=0)
  encoded, mask, cache = jax.jit(decoding._prefill, static_argnums=(0, 4))(
      model, params, rep(images), rep(prompt), 5)
  _, cache = jax.jit(decoding._apply_step, static_argnums=(0, 8))(  # the first step makes them
      model, params, cache, encoded, mask, jnp.zeros(2 * k, jnp.int32),
      decoding._positions(rep(prompt)), jnp.int32(0), 5)
  # Fill the self-attention caches with row-distinct values, as decoding steps would.
  cache = jax.tree_util.tree_map_with_path(
      lambda path, x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)
      if path[-1].key in ("cached_key", "cached_value") else x, cache)
  beam_idx = jnp.array([[2, 2, 0], [1, 0, 1]])  # row 0 keeps beam 2 twice and beam 0; ...
  batch_axis = 1 if scan else 0
  moved = decoding._gather_cache(cache, beam_idx, batch_axis=batch_axis)
  rows = (np.arange(2)[:, None] * k + np.asarray(beam_idx)).reshape(-1)
  names = set()
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(cache)[0],
                                   jax.tree.leaves(moved)):
    name = path[-1].key
    names.add(name)
    before, after = np.asarray(before), np.asarray(after)
    if name in ("cached_key", "cached_value"):
      np.testing.assert_array_equal(after, np.take(before, rows, axis=batch_axis))
    else:
      np.testing.assert_array_equal(after, before)
    if name in ("cross_key", "cross_value"):  # the same for every beam of a row
      per_row = np.moveaxis(before, batch_axis, 0).reshape(2, k, -1)
      np.testing.assert_array_equal(per_row, np.repeat(per_row[:, :1], k, axis=1))
  assert names == {"cached_key", "cached_value", "cache_index", "cross_key", "cross_value"}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_argmax_of_teacher_forcing(tiny_config, arch):
  model, params, images, prompt = _setup(tiny_config, arch)
  out = jax.jit(lambda p: decoding.sample_or_greedy(model, p, images, prompt, 6))(params)
  logits = np.array(_teacher_forced_logits(model, params, images, prompt, out.tokens))
  logits[..., 0] = -np.inf
  expected = np.argmax(logits, -1)
  for row in range(2):
    toks = np.array(out.tokens[row])
    n = (list(toks).index(1) + 1) if 1 in toks else len(toks)
    np.testing.assert_array_equal(toks[:n], expected[row, :n])
    assert not toks[n:].any()
    logp = jax.nn.log_softmax(jnp.asarray(logits[row]))
    np.testing.assert_allclose(out.scores[row], sum(logp[i, toks[i]] for i in range(n)), rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_attention_decodes_as_plain(tiny_config, arch):
  """Cached decoding with `attention="fused"` (`jax.nn.dot_product_attention`, which takes the
  cache's heads-major keys/values back in its own layout) gives plain attention's beams."""
  model, params, images, prompt = _setup(tiny_config, arch)
  fused = SimVLM(tiny_config(architecture=arch, vocab_size=64, attention="fused"))
  plain, got = (jax.jit(lambda p, m=m: decoding.beam_search(m, p, images, prompt, 5, beam_size=2))(
      params) for m in (model, fused))
  np.testing.assert_array_equal(got.tokens, plain.tokens)
  np.testing.assert_allclose(got.scores, plain.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_size_one_equals_greedy(tiny_config, arch):
  model, params, images, prompt = _setup(tiny_config, arch)
  greedy = jax.jit(lambda p: decoding.sample_or_greedy(model, p, images, prompt, 6))(params)
  beam = jax.jit(lambda p: decoding.beam_search(model, p, images, prompt, 6, beam_size=1,
                                                alpha=0.0))(params)
  np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
  np.testing.assert_allclose(beam.scores[:, 0], greedy.scores, rtol=1e-5)


def _brute_force_best(model, params, images, prompt, vocab, length, alpha):
  """Scores every sequence that ends in EOS or reaches `length` and returns the best per row."""
  seqs = [list(body) + [last] for n in range(1, length + 1)
          for body in itertools.product(range(2, vocab), repeat=n - 1)
          for last in ([1] if n < length else range(1, vocab))]
  tokens = jnp.asarray([s + [0] * (length - len(s)) for s in seqs], jnp.int32)
  best = []
  for row in range(prompt.shape[0]):
    rep = lambda x: jnp.repeat(x[row:row + 1], len(seqs), axis=0)
    logits = _teacher_forced_logits(model, params, rep(images), rep(prompt), tokens)
    logp = jax.nn.log_softmax(logits.at[..., 0].set(-1e9))
    scores = [float(sum(logp[i, t, s[t]] for t in range(len(s))))
              / float(decoding.length_penalty(len(s), alpha)) for i, s in enumerate(seqs)]
    best.append((max(scores), seqs[int(np.argmax(scores))]))
  return best


@pytest.mark.parametrize("arch,scan", [("encoder_decoder", False), ("decoder_only", True)])
def test_beam_search_finds_brute_force_best(tiny_config, arch, scan):
  """Exhaustive beam search finds the best sequence; the decoder-only model with scanned layers
  also checks that the prefix's cache (filled once per row) is copied to every beam."""
  vocab, length, alpha = 5, 3, 0.6
  model, params, images, prompt = _setup(tiny_config, arch, vocab=vocab, scan_layers=scan)
  # With as many beams as live prefixes ((vocab - 2) ** (length - 1)), beam search is exhaustive.
  out = jax.jit(lambda p: decoding.beam_search(model, p, images, prompt, length, beam_size=9,
                                               alpha=alpha))(params)
  for row, (score, seq) in enumerate(_brute_force_best(model, params, images, prompt, vocab,
                                                       length, alpha)):
    np.testing.assert_allclose(out.scores[row, 0], score, rtol=1e-5)
    np.testing.assert_array_equal(out.tokens[row, 0, :len(seq)], seq)
    assert np.all(np.diff(np.array(out.scores[row])) <= 1e-6)  # best first


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_batch_padding_does_not_change_rows(tiny_config, method):
  model, params, images, prompt = _setup(tiny_config, "encoder_decoder")
  fn = jax.jit(decoding.make_decode_fn(model, method=method, max_decode_length=6, beam_size=3))
  alone = fn(params, images[:1], prompt[:1, :3])  # row 0, shorter static prompt length
  padded = fn(params, jnp.concatenate([images, images[:1]]),
              jnp.pad(jnp.concatenate([prompt, prompt[:1]]), ((0, 0), (0, 4))))
  np.testing.assert_array_equal(padded.tokens[0], alone.tokens[0])
  np.testing.assert_array_equal(padded.tokens[2], alone.tokens[0])
  np.testing.assert_allclose(padded.scores[0], alone.scores[0], rtol=1e-5)


def test_forced_decoder_prefix_is_followed_and_stripped(tiny_config):
  model, params, images, prompt = _setup(tiny_config, "encoder_decoder")
  forced = jnp.array([[11, 12, 0], [13, 0, 0]], jnp.int32)
  out = decoding.sample_or_greedy(model, params, images, prompt, 6, forced_tokens=forced)
  free = _teacher_forced_logits(model, params, images, prompt,
                                jnp.array([[11, 12] + list(out.tokens[0, :4]),
                                           [13] + list(out.tokens[1, :5])], jnp.int32))
  free = np.array(free)
  free[..., 0] = -np.inf
  assert int(out.tokens[0, 0]) == int(np.argmax(free[0, 2]))  # continues after the forced part
  assert int(out.tokens[1, 0]) == int(np.argmax(free[1, 1]))


def test_sampling_needs_key_and_respects_top_k(tiny_config):
  model, params, images, prompt = _setup(tiny_config, "encoder_decoder")
  fn = decoding.make_decode_fn(model, method="sample", max_decode_length=5, top_k=1)
  with pytest.raises(ValueError, match="PRNG"):
    fn(params, images, prompt)
  greedy = decoding.sample_or_greedy(model, params, images, prompt, 5)
  sampled = fn(params, images, prompt, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(sampled.tokens, greedy.tokens)  # top-1 sampling is greedy
  hot = decoding.make_decode_fn(model, method="sample", max_decode_length=5, temperature=5.0)
  a = hot(params, images, prompt, rng=jax.random.PRNGKey(0)).tokens
  b = hot(params, images, prompt, rng=jax.random.PRNGKey(1)).tokens
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, hot(params, images, prompt, rng=jax.random.PRNGKey(0)).tokens)


def test_filter_logits_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = decoding.filter_logits(logits, top_p=0.8) > decoding.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = decoding.filter_logits(logits, top_k=3) > decoding.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[True, True, True, False]])
