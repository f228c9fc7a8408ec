"""Rematerialisation policies (`ModelConfig.remat`): what a layer's backward pass keeps of its
forward pass, read from JAX's own list of saved residuals, and that none changes the gradient."""
import collections
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint

from simvlm_jax.models import transformer
from simvlm_jax.models.config import REMAT_POLICIES

BATCH, Q_LEN, KV_LEN, EMB, HEADS, HEAD_DIM, MLP = 2, 5, 7, 32, 4, 8, 64
HEADS_SHAPE = lambda length: (BATCH, length, HEADS, HEAD_DIM)  # noqa: E731


def _saved(f, *args):
  """Counter of (name, shape) over the residuals `f`'s backward pass keeps, besides its
  arguments: name is the `checkpoint_name`, or None for an unnamed intermediate."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(f, *args)
  saved = collections.Counter()
  for line in out.getvalue().splitlines():  # e.g. "f32[2,5,4,8] named 'key_proj' from ..."
    shape, source = re.fullmatch(r"\w+\[([\d,]*)\] (.*)", line).groups()
    if source.startswith("from the argument"):
      continue
    name = re.match(r"named '(\w+)'", source)
    saved[name and name.group(1), tuple(int(d) for d in shape.split(",") if d)] += 1
  return saved


def _encoder(remat):
  """An encoder layer under `remat`: f(params, x, mask) -> the summed output (whose gradient
  needs nothing of the output itself), its parameters and inputs."""
  kwargs = dict(num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP)
  x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, Q_LEN, EMB))
  mask = jnp.tril(jnp.ones((Q_LEN, Q_LEN), bool))[None].repeat(BATCH, 0)
  params = transformer.EncoderLayer(**kwargs).init(jax.random.PRNGKey(0), x, mask, 0.0)
  layer = transformer.rematerialised(transformer.EncoderLayer, remat)(**kwargs)
  return lambda p, x, mask: jnp.sum(layer.apply(p, x, mask, 0.0)), (params, x, mask)


def _decoder(remat):
  """As `_encoder`: a decoder layer over `Q_LEN` targets and `KV_LEN` encoded tokens."""
  kwargs = dict(num_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=MLP)
  y = jax.random.normal(jax.random.PRNGKey(1), (BATCH, Q_LEN, EMB))
  encoded = jax.random.normal(jax.random.PRNGKey(2), (BATCH, KV_LEN, EMB))
  self_mask = jnp.tril(jnp.ones((Q_LEN, Q_LEN), bool))[None].repeat(BATCH, 0)
  cross_mask = jnp.ones((BATCH, Q_LEN, KV_LEN), bool)
  args = (y, encoded, self_mask, cross_mask)
  params = transformer.DecoderLayer(**kwargs).init(jax.random.PRNGKey(0), *args, 0.0)
  layer = transformer.rematerialised(transformer.DecoderLayer, remat)(**kwargs)
  return lambda p, *a: jnp.sum(layer.apply(p, *a, 0.0)), (params,) + args


# What each policy keeps besides the layer's inputs and parameters. The MLP's output is never
# kept: the backward pass does not read it (it is only added to the residual stream).
ENCODER_ATTENTION = {("query_proj", HEADS_SHAPE(Q_LEN)): 1, ("key_proj", HEADS_SHAPE(Q_LEN)): 1,
                     ("value_proj", HEADS_SHAPE(Q_LEN)): 1,
                     ("attention_out", (BATCH, Q_LEN, EMB)): 1}
DECODER_ATTENTION = {("query_proj", HEADS_SHAPE(Q_LEN)): 2,  # self- and cross-attention
                     ("key_proj", HEADS_SHAPE(Q_LEN)): 1, ("key_proj", HEADS_SHAPE(KV_LEN)): 1,
                     ("value_proj", HEADS_SHAPE(Q_LEN)): 1, ("value_proj", HEADS_SHAPE(KV_LEN)): 1,
                     ("attention_out", (BATCH, Q_LEN, EMB)): 2}
MLP_IN = {("mlp_in", (BATCH, Q_LEN, MLP)): 1}
EXPECTED = {
    "full": ({}, {}),
    "dots_saveable": ({**ENCODER_ATTENTION, **MLP_IN}, {**DECODER_ATTENTION, **MLP_IN}),
    "dots_except_mlp": (ENCODER_ATTENTION, DECODER_ATTENTION),
}


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_each_policy_keeps_the_products_it_names(layer):
  assert set(REMAT_POLICIES) == {"none", *EXPECTED}  # every documented policy is checked here
  make = _encoder if layer == "encoder" else _decoder
  for remat, expected in EXPECTED.items():
    f, args = make(remat)
    want = expected[layer == "decoder"]
    assert _saved(f, *args) == want, remat
  # Without remat the backward pass keeps intermediates of every kind (norms, softmax, GELU),
  # unnamed ones included: what the policies above recompute.
  f, args = make("none")
  kept = _saved(f, *args)
  assert kept[None, (BATCH, HEADS, Q_LEN, Q_LEN)] >= 1 and kept[None, (BATCH, Q_LEN, MLP)] >= 1


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_policies_leave_the_gradient_unchanged(layer):
  make = _encoder if layer == "encoder" else _decoder
  f, args = make("none")
  want = jax.grad(f, argnums=(0, 1))(*args)
  assert np.abs(want[1]).max() > 0  # not a vacuous comparison
  for remat in REMAT_POLICIES:
    f, args = make(remat)
    got = jax.grad(f, argnums=(0, 1))(*args)
    # Bitwise: the recomputed forward pass runs the same operations on the same values.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=remat), got, want)
