"""Partial restore for finetuning: pretrained values where they fit, resized image positions,
new parameters initialised, and a report of each."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import checkpoints
from simvlm_jax import pretrained as pretrained_lib
from simvlm_jax.errors import CheckpointError
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_config):
  directory = tmp_path_factory.mktemp("pretrain")
  trainer = Trainer(tiny_config(), Partitioner((2, 2, 2)), total_steps=10)
  state = trainer.init_state()
  ckpt = checkpoints.Checkpointer(str(directory / "checkpoints"))
  ckpt.save(state, force=True)
  ckpt.close()
  return str(directory), jax.device_get(state.params)


def test_same_model_loads_everything(pretrained, tiny_config):
  directory, expected = pretrained
  target = Trainer(tiny_config(), Partitioner((1, 8, 1)), 10).init_state().params
  params, report = pretrained_lib.load_params(directory, target)
  assert not report["new"] and not report["resized"] and not report["unused"]
  assert len(report["loaded"]) == len(jax.tree.leaves(expected))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(target)):
    assert got.sharding == want.sharding  # placed on the finetuning mesh


def test_higher_resolution_resizes_image_positions(pretrained, tiny_config):
  directory, expected = pretrained
  target = Trainer(tiny_config(image_size=64), Partitioner((-1, 1, 1)), 10).init_state().params
  params, report = pretrained_lib.load_params(directory, target)
  assert "image_positions/embedding" in report["resized"]
  assert "encoder/layer_0/image_relpos/rel_bias" in report["resized"]
  old = expected["image_positions"]["embedding"].reshape(4, 4, -1)  # 32 px / patch 8
  new = np.asarray(params["image_positions"]["embedding"]).reshape(8, 8, -1)
  assert new.shape[-1] == old.shape[-1]
  # Bilinear resizing keeps the mean of each channel close and the corners' neighbourhood.
  np.testing.assert_allclose(new.mean((0, 1)), old.mean((0, 1)), atol=0.02)
  np.testing.assert_allclose(new[0, 0], old[0, 0], atol=0.6 * np.abs(old).max())
  # Everything else is the pretrained value.
  np.testing.assert_array_equal(params["token_embed"]["embedding"],
                                expected["token_embed"]["embedding"])


def test_new_and_unused_parameters_are_reported(pretrained, tiny_config):
  directory, expected = pretrained
  target = Trainer(tiny_config(), Partitioner((-1, 1, 1)), 10).init_state().params
  target = dict(target)
  head = jnp.full((32, 3), 7.0)
  target["classifier"] = {"kernel": head}
  del target["text_positions"]
  params, report = pretrained_lib.load_params(directory, target)
  assert report["new"] == ["classifier/kernel"]
  assert report["unused"] == ["text_positions/embedding"]
  np.testing.assert_array_equal(params["classifier"]["kernel"], head)


def test_image_pair_finetuning_adds_a_zero_image_index(pretrained, tiny_config):
  # NLVR2 (max_images = 2) from a single-image pretraining run: everything loads, and the new
  # image index embedding starts at zero, so the pair is encoded exactly as before finetuning.
  directory, expected = pretrained
  target = Trainer(tiny_config(max_images=2), Partitioner((-1, 1, 1)), 10).init_state().params
  params, report = pretrained_lib.load_params(directory, target)
  assert report["new"] == ["image_index/embedding"] and not report["unused"]
  assert len(report["loaded"]) == len(jax.tree.leaves(expected))
  np.testing.assert_array_equal(params["image_index"]["embedding"], np.zeros((2, 32)))


def test_mismatched_shape_is_a_clear_error(pretrained, tiny_config):
  directory, _ = pretrained
  target = Trainer(tiny_config(vocab_size=80), Partitioner((-1, 1, 1)), 10).init_state().params
  with pytest.raises(CheckpointError,
                     match=r"token_embed/embedding is \(64, 32\) in checkpoint 0 .*\(80, 32\)"):
    pretrained_lib.load_params(directory, target)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="no finished checkpoint"):
    pretrained_lib.load_params(str(tmp_path), {})
  with pytest.raises(CheckpointError, match="does not exist"):
    pretrained_lib.load_params(str(tmp_path / "nope"), {})
