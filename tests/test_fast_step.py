"""The fast train step's switches change speed and memory, not the numbers: fused attention,
rematerialisation policies, bf16 activations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.models import SimVLM
from simvlm_jax.models.layers import fused_backend
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer


def _inputs():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  prefix = jnp.array([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)
  dec = jnp.array([[0, 3, 4, 5], [0, 6, 7, 0]], jnp.int32)
  return images, prefix, dec, jnp.broadcast_to(jnp.arange(4), (2, 4))


def _logits_and_grads(config, params=None, text_only=False):
  """Logits and the gradient of a log-likelihood, from one compiled function."""
  model = SimVLM(config)
  images, prefix, dec, pos = _inputs()
  if params is None:
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images, prefix, dec, pos)["params"])
  images = None if text_only else images

  def loss(p):
    logits = model.apply({"params": p}, images, prefix, dec, pos)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return params, logits, grads


@pytest.mark.parametrize("arch,text_only", [("encoder_decoder", False),
                                            ("encoder_decoder", True), ("decoder_only", False)])
def test_fused_attention_matches_plain(tiny_config, arch, text_only):
  params, logits, grads = _logits_and_grads(tiny_config(architecture=arch), text_only=text_only)
  _, fused_logits, fused_grads = _logits_and_grads(
      tiny_config(architecture=arch, attention="fused"), params, text_only)
  np.testing.assert_allclose(fused_logits, logits, atol=1e-5)
  for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_fused_attention_takes_cudnn_only_where_it_runs():
  """JAX's default implementation is XLA everywhere: "fused" must ask for cuDNN itself on GPU, and
  only for inputs cuDNN's flash kernel takes (half precision, head_dim a multiple of 8 <= 128)."""
  assert fused_backend("gpu", jnp.bfloat16, 64) == "cudnn"
  assert fused_backend("cuda", jnp.float16, 128) == "cudnn"
  assert fused_backend("gpu", jnp.bfloat16, 80) == "cudnn"  # Huge
  assert fused_backend("gpu", jnp.float32, 64) is None
  assert fused_backend("gpu", jnp.bfloat16, 36) is None
  assert fused_backend("gpu", jnp.bfloat16, 256) is None
  assert fused_backend("cpu", jnp.bfloat16, 64) is None
  assert fused_backend("tpu", jnp.bfloat16, 64) is None


def test_remat_policies_keep_gradients(tiny_config):
  params, logits, grads = _logits_and_grads(tiny_config())
  for remat in ("full", "dots_saveable"):
    _, remat_logits, remat_grads = _logits_and_grads(tiny_config(remat=remat), params)
    np.testing.assert_allclose(remat_logits, logits, atol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_bfloat16_step_tracks_float32(tiny_config):
  """bf16 activations with fp32 parameters and optimizer state: same loss to bf16 precision."""
  devices = jax.devices()[:1]
  losses = {}
  for dtype in ("float32", "bfloat16"):
    partitioner = Partitioner((1, 1, 1), devices=devices)
    trainer = Trainer(tiny_config(dtype=dtype), partitioner, total_steps=10)
    state = trainer.init_state()
    data = SyntheticIterator(image_size=32, vocab_size=64)
    run = []
    for _ in range(3):
      state, metrics = trainer.train_step(state, partitioner.shard_batch(next(data)))
      run.append(float(metrics["loss"]))
    losses[dtype] = run
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(state.opt_state))
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
  assert losses["bfloat16"] != losses["float32"]  # it really computed in bf16


def _loop_to_scan(params, stacks):
  """The same weights in the scanned layout: `layer_i` subtrees stacked on a leading axis."""
  params = dict(params)
  for name in stacks:
    stack = dict(params[name])
    layers = sorted((k for k in stack if k.startswith("layer_")), key=lambda k: int(k[6:]))
    stack["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[stack.pop(k) for k in layers])
    params[name] = stack
  return params


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_scanned_layers_match_the_loop(tiny_config, arch):
  from simvlm_jax import decoding
  stacks = ["encoder", "decoder"] if arch == "encoder_decoder" else ["stack"]
  config = tiny_config(architecture=arch, stochastic_depth_rate=0.2)
  params, logits, grads = _logits_and_grads(config)
  scan_config = tiny_config(architecture=arch, stochastic_depth_rate=0.2, scan_layers=True)
  scan_params = _loop_to_scan(params, stacks)
  _, scan_logits, scan_grads = _logits_and_grads(scan_config, scan_params)
  np.testing.assert_allclose(scan_logits, logits, atol=1e-5)
  for a, b in zip(jax.tree.leaves(scan_grads), jax.tree.leaves(_loop_to_scan(grads, stacks))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  # The scanned model's parameters carry the stacked `layers` axis name.
  boxed = SimVLM(scan_config).init(jax.random.PRNGKey(0), *_inputs())["params"]
  assert boxed[stacks[0]]["layers"]["mlp"]["wi"]["kernel"].names == ("layers", "embed", "mlp")
  # Decoding (with its per-layer caches stacked too) gives the same tokens.
  images, prefix, _, _ = _inputs()
  for method in ("greedy", "beam"):
    fn = lambda model, p: decoding.make_decode_fn(model, method=method, max_decode_length=5,
                                                  beam_size=3)(p, images, prefix)
    loop = fn(SimVLM(config), params)
    scanned = fn(SimVLM(scan_config), scan_params)
    np.testing.assert_array_equal(scanned.tokens, loop.tokens)
    np.testing.assert_allclose(scanned.scores, loop.scores, rtol=1e-5)
