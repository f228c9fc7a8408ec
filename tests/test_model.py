"""Behavioural tests of the SimVLM model: masking, padding, the loss, position bias, conv stage, dropout."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simvlm_jax import objectives, trainer
from simvlm_jax.models import conv_stage, layers
from simvlm_jax.models.simvlm import SimVLM

ARCHS = ["encoder_decoder", "decoder_only"]
EOS = 1


B, P, LD = 2, 8, 8  # the standard test shapes (batch, prefix length, decoder length): one compile each


def init_params(config, seed=0):
  """Random parameters of every shape `SimVLM.init` makes (via eval_shape: XLA-compiling the real
  initialisers costs ~10 s on CPU). Nothing is zero, so zero-initialised parts of the real init (the
  relative position bias, the last norm of each ResNet block) are live and every path shows."""
  model = SimVLM(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda k, im, t: model.init(k, im, t, t, t)["params"], jax.random.PRNGKey(0), images, tokens))
  rng = np.random.RandomState(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      value = 1.0 + 0.1 * rng.randn(*s.shape)
    elif name.endswith("['bias']") or "rel_bias" in name:
      value = 0.3 * rng.randn(*s.shape)
    elif "token_embed" in name:
      value = rng.randn(*s.shape)
    elif "positions" in name:
      value = 0.3 * rng.randn(*s.shape)
    else:  # kernels: fan-in scaling
      value = rng.randn(*s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1 else 1.0)
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def logits_fn(config):
  """Jitted `(params, images | None, prefix, decoder_inputs, decoder_positions) -> logits`."""
  model = SimVLM(config)
  return jax.jit(lambda p, im, pre, din, dpos: model.apply({"params": p}, im, pre, din, dpos))


def random_images(batch, size, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (batch, size, size, 3)), jnp.uint8)


def pad_rows(rows, length):
  return jnp.asarray(np.array([list(r) + [0] * (length - len(r)) for r in rows], np.int32))


def max_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)))


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tiny_config):
  config = tiny_config(architecture=request.param)
  return config, init_params(config)


# --- causal masking ------------------------------------------------------------------------------

def _cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


@pytest.mark.parametrize("with_image", [True, False])
def test_no_leakage_from_later_decoder_tokens(arch_setup, with_image):
  config, params = arch_setup
  fn = logits_fn(config)
  rng = np.random.RandomState(0)
  images = random_images(B, config.image_size) if with_image else None
  prefix = pad_rows([[5, 9, 13], [7, 3]], P)
  dec_in = jnp.asarray(rng.randint(2, 60, (B, LD)), jnp.int32)
  dec_pos = jnp.asarray(np.stack([np.arange(3, 3 + LD), np.arange(2, 2 + LD)]), jnp.int32)
  targets = jnp.asarray(rng.randint(2, 60, (B, LD)), jnp.int32)
  base = fn(params, images, prefix, dec_in, dec_pos)
  base_loss = _cross_entropy(base, targets)
  for t in (0, 3, LD - 1):
    changed = dec_in.at[:, t].set((dec_in[:, t] + 17) % 58 + 2)
    assert np.all(np.asarray(changed[:, t] != dec_in[:, t]))
    out = fn(params, images, prefix, changed, dec_pos)
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
    for s in range(t, LD):
      assert max_diff(out[:, s], base[:, s]) > 1e-4, (t, s)
    loss = _cross_entropy(out, targets)
    np.testing.assert_allclose(loss[:, :t], base_loss[:, :t], atol=1e-6, rtol=0)
    assert max_diff(loss[:, t], base_loss[:, t]) > 1e-5


# --- the encoder sees the whole prefix, never the padding -----------------------------------------

@pytest.mark.parametrize("with_image", [True, False])
def test_every_prefix_token_matters(arch_setup, with_image):
  config, params = arch_setup
  fn = logits_fn(config)
  images = random_images(B, config.image_size) if with_image else None
  valid = [11, 23, 35, 47, 59]
  dec_in = jnp.array([[0, 8, 9, 10, 11, 12, 13, 14]] * B, jnp.int32)
  dec_pos = jnp.broadcast_to(jnp.arange(5, 5 + LD), (B, LD))
  for i in range(len(valid)):
    changed = list(valid)
    changed[i] -= 1
    out = fn(params, images, pad_rows([valid, changed], P), dec_in, dec_pos)
    assert max_diff(out[0], out[1]) > 1e-4, i  # row 1 differs from row 0 only in prefix token i
  if with_image:
    out = fn(params, jnp.stack([images[0], images[0]]).at[1, 5, 7, 1].add(100),
             pad_rows([valid, valid], P), dec_in, dec_pos)
    assert max_diff(out[0], out[1]) > 1e-4  # one changed pixel


@pytest.mark.parametrize("with_image", [True, False])
def test_prefix_padding_never_contributes(arch_setup, with_image):
  config, params = arch_setup
  fn = logits_fn(config)
  images = random_images(B, config.image_size) if with_image else None
  # Row 1 has an empty prefix (a text row under plain_lm): with no image, the decoder must not
  # fall back on attending to the padding.
  valid = [[11, 23, 35, 47, 59], []]
  dec_in = pad_rows([[0, 8, 9, 10], [0, 3, 2]], LD)
  dec_pos = jnp.asarray(np.stack([np.arange(5, 5 + LD), np.arange(2, 2 + LD)]), jnp.int32)
  short = fn(params, images, pad_rows(valid, P), dec_in, dec_pos)
  long = fn(params, images, pad_rows(valid, P + 5), dec_in, dec_pos)
  np.testing.assert_allclose(long, short, atol=1e-5, rtol=0)


# --- the loss ------------------------------------------------------------------------------------

# Two rows of each kind, split at fixed prefix lengths (a stand-in for the random draw).
IT_ROWS, IT_K = [[7, 12, 30, 41, EOS], [19, 25, 33, EOS]], [1, 2]  # 4 + 2 targets
TXT_ROWS, TXT_K = [[9, 22, 35, EOS], [44, 45, 46, 47, 48, EOS]], [2, 1]  # 2 + 5 targets


def fixed_split(tokens, keys, with_image):
  del keys
  return objectives.split_at(tokens, jnp.array(IT_K if with_image else TXT_K, jnp.int32))


@functools.lru_cache(maxsize=None)
def eval_fn(config):
  """The trainer's loss sums (split_batch + _sums), jitted."""
  return jax.jit(functools.partial(trainer.eval_step, model=SimVLM(config), objective=fixed_split,
                                   seed=0))


def loss_batch(images, it_len, txt_len):
  return {"image_text": {"images": images, "text_tokens": pad_rows(IT_ROWS, it_len)},
          "text": {"text_tokens": pad_rows(TXT_ROWS, txt_len)}}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_matches_hand_computed_cross_entropy(arch_setup):
  config, params = arch_setup
  fn = logits_fn(config)
  images = random_images(B, config.image_size)
  terms = {}
  for kind, imgs, rows, ks in (("image_text", images, IT_ROWS, IT_K),
                               ("text", None, TXT_ROWS, TXT_K)):
    # Hand-built model inputs: the prefix is the first k tokens; the decoder reads
    # [0, targets[:-1]] at the text positions of the targets k, k+1, ...
    prefix = pad_rows([r[:k] for r, k in zip(rows, ks)], P)
    dec_in = pad_rows([[0] + r[k:-1] for r, k in zip(rows, ks)], LD)
    dec_pos = jnp.asarray(np.stack([np.arange(k, k + LD) for k in ks]), jnp.int32)
    logp = _log_softmax(fn(params, imgs, prefix, dec_in, dec_pos))
    terms[kind] = [-logp[b, i, t] for b, (r, k) in enumerate(zip(rows, ks))
                   for i, t in enumerate(r[k:])]
  assert (len(terms["image_text"]), len(terms["text"])) == (6, 7)
  expected = np.mean(terms["image_text"] + terms["text"])  # mean over all 13 target tokens
  # It is a token mean, not the mean of the two per-kind means (which differs here).
  assert abs(expected - np.mean([np.mean(v) for v in terms.values()])) > 1e-4

  sums = eval_fn(config)(params, loss_batch(images, 6, 6))
  assert float(sums["weight_sum"]) == 13
  np.testing.assert_allclose(sums["loss_sum"] / sums["weight_sum"], expected, rtol=1e-5)
  np.testing.assert_allclose(sums["image_text/loss_sum"], np.sum(terms["image_text"]), rtol=1e-5)
  np.testing.assert_allclose(sums["text/loss_sum"], np.sum(terms["text"]), rtol=1e-5)


def test_target_padding_never_contributes_to_the_loss(arch_setup):
  config, params = arch_setup
  images = random_images(B, config.image_size)
  short = eval_fn(config)(params, loss_batch(images, 6, 6))
  long = eval_fn(config)(params, loss_batch(images, 12, 10))
  assert float(short["weight_sum"]) == float(long["weight_sum"]) == 13
  for name in ("loss_sum", "correct_sum", "image_text/loss_sum", "text/loss_sum"):
    np.testing.assert_allclose(long[name], short[name], rtol=1e-5, err_msg=name)


# --- 2D relative position bias -------------------------------------------------------------------

@pytest.mark.parametrize("x_shape,kernel_shape,in_axes", [
    ((3, 5, 6), (6, 4), 1),  # [batch, length, embed] x [embed, mlp]
    ((3, 5, 6), (6, 2, 4), 1),  # x [embed, heads, kv]: the attention projections
    ((3, 5, 2, 4), (2, 4, 6), 2),  # [.., heads, kv] x [heads, kv, embed]: the output projection
    ((7, 6), (6, 4), 1)])
def test_dense_contraction_and_its_gradients_equal_the_plain_product(x_shape, kernel_shape,
                                                                     in_axes):
  """layers.contract has hand-written gradients (two flat matrix products, for XLA's CPU
  backend): value, input and kernel gradients equal einsum's and autodiff's."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jax.random.normal(jax.random.key(1), kernel_shape)
  cotangent = jax.random.normal(jax.random.key(2), x_shape[:-in_axes] + kernel_shape[in_axes:])
  letters = "abcdefgh"
  batch, inner = letters[:len(x_shape) - in_axes], "xyz"[:in_axes]
  out = "pq"[:len(kernel_shape) - in_axes]
  spec = f"{batch}{inner},{inner}{out}->{batch}{out}"
  np.testing.assert_allclose(layers.contract(x, kernel, in_axes), jnp.einsum(spec, x, kernel),
                             rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda x, k: jnp.sum(layers.contract(x, k, in_axes) * cotangent), (0, 1))(
      x, kernel)
  plain = jax.grad(lambda x, k: jnp.sum(jnp.einsum(spec, x, k) * cotangent), (0, 1))(x, kernel)
  # By hand for the kernel: the sum over rows of x's outer product with the cotangent.
  rows = int(np.prod(x_shape[:-in_axes]))
  by_hand = (np.asarray(x).reshape(rows, -1).T @ np.asarray(cotangent).reshape(rows, -1))
  for got, want in zip(ours, plain):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[1], by_hand.reshape(kernel_shape), rtol=1e-5, atol=1e-5)
  # Under jit and in bfloat16 (the cast happens outside: gradients come back in the input dtype).
  x16, k16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  g16 = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.contract(x, k, in_axes).astype(jnp.float32)
                                               * cotangent), (0, 1)))(x16, k16)
  assert [g.dtype for g in g16] == [jnp.bfloat16, jnp.bfloat16]
  np.testing.assert_allclose(np.asarray(g16[1], np.float32), ours[1], rtol=0.05, atol=0.1)


def test_logits_against_the_embedding_table_and_their_gradients():
  """layers.contract_rows (the tied output layer, hand-written gradients) equals einsum and
  autodiff: `[batch, length, embed] . [vocab, embed] -> [batch, length, vocab]`."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 6))
  table = jax.random.normal(jax.random.key(1), (11, 6))
  cotangent = jax.random.normal(jax.random.key(2), (2, 3, 11))
  np.testing.assert_allclose(layers.contract_rows(x, table), jnp.einsum("ble,ve->blv", x, table),
                             rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda x, t: jnp.sum(layers.contract_rows(x, t) * cotangent), (0, 1))(x, table)
  plain = jax.grad(lambda x, t: jnp.sum(jnp.einsum("ble,ve->blv", x, t) * cotangent), (0, 1))(
      x, table)
  for got, want in zip(ours, plain):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  by_hand = np.asarray(cotangent).reshape(6, 11).T @ np.asarray(x).reshape(6, 6)
  np.testing.assert_allclose(ours[1], by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,size,use_bias", [(1, 6, False), (2, 6, False), (2, 7, True)])
def test_pointwise_conv_is_a_1x1_conv(stride, size, use_bias):
  """conv_stage.PointwiseConv (a product over channels, flat gradients) gives nn.Conv's 1x1
  convolution: same parameter tree, values and gradients, strided ("SAME") and odd sizes too."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  ours = conv_stage.PointwiseConv(5, stride, use_bias)
  conv = nn.Conv(5, (1, 1), strides=(stride, stride), padding="SAME", use_bias=use_bias)
  params = nn.unbox(ours.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv.init(jax.random.key(1), x))
  if use_bias:
    params["params"]["bias"] = jnp.arange(5.0)
  want = conv.apply(params, x)
  np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-5, atol=1e-5)
  assert want.shape == (2, -(-size // stride), -(-size // stride), 5)
  cotangent = jax.random.normal(jax.random.key(2), want.shape)
  grads = [jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * cotangent), (0, 1))(params, x)
           for m in (ours, conv)]
  for got, expected in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel,stride,use_bias", [
    (64, 7, 2, False),  # the stem
    (16, 3, 2, True),  # a stage's first 3x3
    (8, 2, 2, True),  # the projection to the token grid (kernel = stride: one product)
    (32, 16, 16, True),  # linear patches
    (12, 5, 3, False), (20, 4, 2, False), (9, 3, 3, True)])  # odd kernels, strides, paddings
def test_strided_conv_is_nn_conv(size, kernel, stride, use_bias):
  """conv_stage.StridedConv (the stride-1 convolution over the space-to-depth input) gives
  nn.Conv's strided SAME convolution: same parameter tree, values and both gradients."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  ours = conv_stage.StridedConv(5, kernel, stride, use_bias)
  conv = nn.Conv(5, (kernel, kernel), strides=(stride, stride), padding="SAME", use_bias=use_bias)
  params = nn.unbox(ours.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv.init(jax.random.key(1), x))
  if use_bias:
    params["params"]["bias"] = jnp.arange(5.0)
  want = conv.apply(params, x)
  assert want.shape == (2, size // stride, size // stride, 5)
  np.testing.assert_allclose(ours.apply(params, x), want, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(2), want.shape)
  grads = [jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * cotangent), (0, 1))(params, x)
           for m in (ours, conv)]
  for got, expected in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="divisible by"):
    ours.init(jax.random.key(1), x[:, :size - 1, :size - 1])


@pytest.mark.parametrize("size", [32, 9])
def test_max_pool_is_nn_max_pool(size):
  """conv_stage.max_pool gives nn.max_pool's 3x3 stride-2 SAME pooling and its gradient, which
  goes to the first maximum of a window (ties made on purpose: after a ReLU most are zeros)."""
  x = jnp.round(jax.random.normal(jax.random.key(0), (2, size, size, 4)) * 2) / 2
  want = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
  np.testing.assert_array_equal(conv_stage.max_pool(x), want)
  cotangent = jax.random.normal(jax.random.key(1), want.shape)
  grads = [jax.grad(lambda x: jnp.sum(pool(x) * cotangent))(x)
           for pool in (conv_stage.max_pool,
                        lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME"))]
  assert int(jnp.sum(x[:, :3, :3] == x[:, :3, :3].max((1, 2), keepdims=True))) > 8  # ties
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_image_index_tells_the_images_of_a_pair_apart(tiny_config):
  # NLVR2 encodes (left image, statement) and (right image, statement) apart and the decoder
  # attends over both: without an image index, swapping the images gives the same logits, so
  # "the left image ..." could not be judged. With it, the order shows.
  config = tiny_config(max_images=2)
  params = init_params(config)
  images = jnp.stack([random_images(B, 32, seed=1), random_images(B, 32, seed=2)], axis=1)
  swapped = images[:, ::-1]
  prefix = pad_rows([[5, 6, 7], [8, 9]], P)
  dec_in = pad_rows([[0, 3, 4], [0, 10]], LD)
  positions = jnp.broadcast_to(jnp.arange(LD), (B, LD))
  logits = logits_fn(config)
  for index, tells_apart in ((np.zeros((2, 32)), False),
                             (np.random.RandomState(0).randn(2, 32), True)):
    p = {**params, "image_index": {"embedding": jnp.asarray(index, jnp.float32)}}
    diff = max_diff(logits(p, images, prefix, dec_in, positions),
                    logits(p, swapped, prefix, dec_in, positions))
    assert (diff > 1e-2) if tells_apart else (diff < 1e-5), diff
  # Runs finetuned before the index existed (max_images = 1) still evaluate, as they trained.
  old = logits_fn(tiny_config())
  assert max_diff(old(params, images, prefix, dec_in, positions),
                  old(params, swapped, prefix, dec_in, positions)) < 1e-5
  with pytest.raises(ValueError, match="3 images per example, the model is configured for at "
                     "most ModelConfig.max_images = 2"):
    logits(params, jnp.concatenate([images, swapped[:, :1]], axis=1), prefix, dec_in, positions)
  decoder_only = tiny_config(architecture="decoder_only")
  with pytest.raises(ValueError, match="several images per example need the encoder-decoder"):
    logits_fn(decoder_only)(init_params(decoder_only), images, prefix, dec_in, positions)


def test_relative_position_index_g2():
  # Tokens (row, col): 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1); bucket = (dy + 1) * 3 + (dx + 1).
  np.testing.assert_array_equal(layers.relative_position_index(2),
                                [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
  idx = layers.relative_position_index(3)
  assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == 24
  assert np.all(np.diag(idx) == 12)  # zero offset is the centre bucket
  assert np.all(idx + idx.T == 24)  # the opposite offset is the mirrored bucket


def test_relative_bias_only_touches_the_image_block():
  module = layers.ImageRelativePositionBias(grid_size=2, num_heads=3)
  table = jnp.arange(27, dtype=jnp.float32).reshape(9, 3) + 1.0
  idx = layers.relative_position_index(2)
  for q_len, kv_len in ((7, 7), (5, 9)):  # [heads, q_len, kv_len]
    bias = np.asarray(module.apply({"params": {"rel_bias": table}}, q_len, kv_len))
    assert bias.shape == (3, q_len, kv_len)
    for h in range(3):
      np.testing.assert_array_equal(bias[h, :4, :4], np.asarray(table)[idx, h])
    np.testing.assert_array_equal(bias[:, 4:, :], 0)
    np.testing.assert_array_equal(bias[:, :, 4:], 0)


def _zero_rel_bias(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if "rel_bias" in jax.tree_util.keystr(path) else p, params)


def test_relative_bias_changes_image_tokens_only_when_there_is_an_image(arch_setup):
  config, params = arch_setup
  tables = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)
            if "rel_bias" in jax.tree_util.keystr(p)]
  n_layers = config.num_encoder_layers + (
      config.num_decoder_layers if config.architecture == "decoder_only" else 0)
  assert len(tables) == n_layers  # one table per encoder-type layer
  zeroed = _zero_rel_bias(params)
  fn = logits_fn(config)
  prefix = pad_rows([[11, 23, 35], [4]], P)
  dec_in = pad_rows([[0, 8, 9], [0, 5]], LD)
  dec_pos = jnp.asarray(np.stack([np.arange(3, 3 + LD), np.arange(1, 1 + LD)]), jnp.int32)
  images = random_images(B, config.image_size)
  # Text-only: the bias table is never used.
  np.testing.assert_array_equal(fn(params, None, prefix, dec_in, dec_pos),
                                fn(zeroed, None, prefix, dec_in, dec_pos))
  assert max_diff(fn(params, images, prefix, dec_in, dec_pos),
                  fn(zeroed, images, prefix, dec_in, dec_pos)) > 1e-4
  if config.architecture == "encoder_decoder":
    encode = jax.jit(lambda p: SimVLM(config).apply({"params": p}, images, prefix,
                                                    method=SimVLM.encode)[0])
    with_bias, without = encode(params), encode(zeroed)
    assert with_bias.shape == (B, config.num_image_tokens + P, config.emb_dim)
    for i in range(config.num_image_tokens):
      assert max_diff(with_bias[:, i], without[:, i]) > 1e-5, i


# --- conv stage --------------------------------------------------------------------------------

def _token_shape(module, image_size, batch=1):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  def run(x):
    variables = module.init(jax.random.PRNGKey(0), x, True)
    return module.apply(variables, x, True)
  return jax.eval_shape(run, images).shape


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_conv_stage_gives_14x14_tokens_at_224(stages):
  widths, blocks = (16, 32, 64)[:stages], (1, 2, 1)[:stages]
  module = conv_stage.ResNetStage(emb_dim=24, patch_size=16, stem_width=8, stage_widths=widths,
                                  stage_blocks=blocks)
  assert _token_shape(module, 224) == (1, 196, 24)


def test_linear_patchifier_and_full_model_token_counts(tiny_config):
  assert _token_shape(conv_stage.LinearPatchify(emb_dim=24, patch_size=16), 224, 2) == (2, 196, 24)
  for overrides in (dict(), dict(patchifier="linear"),
                    dict(resnet_stage_widths=(16, 32, 64), resnet_stage_blocks=(1, 1, 1))):
    config = tiny_config(image_size=224, patch_size=16, **overrides)
    model = SimVLM(config)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8)
    prefix = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    def encode(im, pre):
      variables = model.init(jax.random.PRNGKey(0), im, pre, pre, pre)
      return model.apply(variables, im, pre, method=SimVLM.encode)
    encoded, mask = jax.eval_shape(encode, images, prefix)
    assert encoded.shape == (2, 196 + 5, config.emb_dim) and mask.shape == (2, 201), overrides


def test_conv_stride_must_divide_patch_size():
  module = conv_stage.ResNetStage(emb_dim=8, patch_size=8, stem_width=8, stage_widths=(16, 32, 64),
                                  stage_blocks=(1, 1, 1))  # stride 16 > patch 8
  with pytest.raises(ValueError, match="patch_size"):
    _token_shape(module, 32)


def test_group_norm_keeps_rows_independent(arch_setup):
  config, params = arch_setup
  module = conv_stage.ResNetStage(config.emb_dim, config.patch_size, config.resnet_stem_width,
                                  config.resnet_stage_widths, config.resnet_stage_blocks)
  run = jax.jit(lambda x: module.apply({"params": params["patchify"]}, x, True))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  one, two = run(x[:1]), run(x)
  assert one.shape == (1, config.num_image_tokens, config.emb_dim)
  np.testing.assert_allclose(two[:1], one, atol=1e-5, rtol=0)
  assert max_diff(two[1], one[0]) > 1e-3
  # The same through the whole model: row 0's logits ignore the image of row 1.
  fn = logits_fn(config)
  images = random_images(3, config.image_size)
  prefix, dec_in = pad_rows([[5, 6], [7]], P), pad_rows([[0, 3], [0, 4]], LD)
  dec_pos = jnp.broadcast_to(jnp.arange(2, 2 + LD), (B, LD))
  a = fn(params, images[:2], prefix, dec_in, dec_pos)
  b = fn(params, images[jnp.array([0, 2])], prefix, dec_in, dec_pos)
  np.testing.assert_allclose(a[0], b[0], atol=1e-5, rtol=0)
  assert max_diff(a[1], b[1]) > 1e-4


# --- dropout and stochastic depth ------------------------------------------------------------------

@pytest.mark.parametrize("regulariser,with_image", [
    (dict(dropout_rate=0.2), False),
    (dict(stochastic_depth_rate=0.5, decoder_stochastic_depth_rate=0.5), True),
])
def test_dropout_and_stochastic_depth(tiny_config, regulariser, with_image):
  config = tiny_config(**regulariser)
  params = init_params(config)
  model = SimVLM(config)
  images = random_images(B, config.image_size) if with_image else None
  prefix = pad_rows([[5, 6, 7], [9, 4]], P)
  dec_in = pad_rows([[0, 3, 4, 8], [0, 2]], LD)
  dec_pos = jnp.asarray(np.stack([np.arange(3, 3 + LD), np.arange(2, 2 + LD)]), jnp.int32)
  apply = jax.jit(lambda rng, det: model.apply({"params": params}, images, prefix, dec_in, dec_pos,
                                               deterministic=det, rngs={"dropout": rng}),
                  static_argnums=1)
  a, b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  det = apply(a, True)
  np.testing.assert_array_equal(det, apply(b, True))  # deterministic: the rng is unused
  # Deterministic equals the same model with regularisation switched off.
  plain = logits_fn(tiny_config())(params, images, prefix, dec_in, dec_pos)
  np.testing.assert_allclose(det, plain, atol=1e-5, rtol=0)
  train_a = apply(a, False)
  np.testing.assert_array_equal(train_a, apply(a, False))  # same rng -> same draw
  assert max_diff(train_a, apply(b, False)) > 1e-4  # the draw depends on the rng
  assert max_diff(train_a, det) > 1e-4


def test_drop_path_drops_whole_rows():
  x = jnp.ones((64, 3, 5))
  y = layers.DropPath().apply({}, x, 0.5, False, rngs={"dropout": jax.random.PRNGKey(0)})
  per_row = np.asarray(y).reshape(64, -1)
  assert set(np.unique(per_row)) <= {0.0, 2.0}  # kept rows rescaled by 1 / keep
  assert np.all(per_row.min(1) == per_row.max(1))  # all or nothing per example
  assert 10 < np.sum(per_row[:, 0] == 0) < 54
  np.testing.assert_array_equal(layers.DropPath().apply({}, x, 0.5, True), x)
  # A traced rate (layers under nn.scan) draws the same way.
  traced = jax.jit(lambda r: layers.DropPath().apply({}, x, r, False,
                                                     rngs={"dropout": jax.random.PRNGKey(0)}))
  np.testing.assert_array_equal(traced(jnp.float32(0.5)), y)
