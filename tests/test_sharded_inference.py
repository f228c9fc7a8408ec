"""`predict` (and `eval`, which decodes the same way) on a device mesh: the parameters sharded by
the training rules, each batch's rows over data x fsdp; the same predictions on 1 device, on 8
and in two processes (tests/test_multihost.py)."""
import gin
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import SENTENCES, write_run
from simvlm_jax.data import vocab
from simvlm_jax.predict import Predictor

PROMPTS = ["a red circle"] * 4 + ["a picture of"] * 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
  tmp = tmp_path_factory.mktemp("inference")
  model_path = vocab.train_sentencepiece(SENTENCES, 300, "a", directory=str(tmp))
  model_dir, _ = write_run(tmp, tiny_config, model_path)
  gin.clear_config()
  return str(model_dir)


@pytest.fixture(scope="module")
def one_device(run):
  predictor = Predictor(run)
  images = np.random.default_rng(0).integers(0, 255, (8, predictor.config.image_size,
                                                       predictor.config.image_size, 3), np.uint8)
  return images, {beam: predictor.generate(images, PROMPTS, beam, max_decode_length=6)
                  for beam in (1, 3)}


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_the_same_predictions_on_a_mesh(run, one_device, mesh):
  images, want = one_device
  predictor = Predictor(run, mesh_shape=mesh)
  table = predictor.run.params["token_embed"]["embedding"]
  assert len(table.sharding.device_set) == 8
  if mesh[1] > 1:
    assert table.sharding.spec == P("model", "fsdp")  # really sharded, not replicated
  for beam in (1, 3):  # greedy and beam search
    got = predictor.generate(images, PROMPTS, beam, max_decode_length=6)
    assert [g["prediction"] for g in got] == [w["prediction"] for w in want[beam]]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want[beam]],
                               rtol=1e-4, atol=1e-5)
  # The rows' scores differ (an untrained model writes the same text for all of them), so the
  # comparison also checks that each row lands where it came from.
  assert len({round(w["score"], 4) for w in want[1]}) == 8
