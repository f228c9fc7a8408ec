"""`simvlm_jax.export`: a release holds the parameters alone and opens wherever a run does."""
import json
import os

import gin
import jax
import numpy as np
import pytest

from conftest import SENTENCES, write_run
from simvlm_jax import checkpoints, export, pretrained, run_dir
from simvlm_jax.data import vocab
from simvlm_jax.errors import UserError
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer


def test_export_round_trips_into_predict_eval_and_init_from(tmp_path, tiny_config):
  model_path = vocab.train_sentencepiece(SENTENCES, 300, "a", directory=str(tmp_path))
  model_dir, params = write_run(tmp_path, tiny_config, model_path)
  (model_dir / "answers.txt").write_text("yes\nno\n")
  release = tmp_path / "release"
  info = export.export(str(model_dir / "checkpoints" / "7"), str(release))
  gin.clear_config()

  n = sum(x.size for x in jax.tree.leaves(params))
  assert info == {"source": str(model_dir), "step": 7, "parameters": n, "bytes": 4 * n}
  assert json.loads((release / "export.json").read_text()) == info
  for name in ("config.gin", "vocabulary.model", "vocabulary.json", "answers.txt"):
    assert (release / name).read_bytes() == (model_dir / name).read_bytes()
  # Parameters only: Adam's two moments (twice the parameters) and the data position stay behind.
  step_dir = release / "checkpoints" / "7"
  assert "state" in os.listdir(step_dir) and "data" not in os.listdir(step_dir)
  saved = checkpoints.saved_tree(step_dir / "state")
  assert list(saved) == ["params"]

  # Opened as predict and eval open a run: the same parameters, vocabulary and answers.
  run = run_dir.open_run(str(release))
  assert run.step == 7 and run.answers == ["yes", "no"] and run.vocabulary.vocab_size == 300
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), params)
  gin.clear_config()

  # train.init_from: every parameter loaded.
  target = Trainer(tiny_config(vocab_size=300), Partitioner((1, 1, 1), devices=jax.devices()[:1]),
                   total_steps=1, seed=1).init_state().params
  loaded, report = pretrained.load_params(str(release), target)
  assert len(report["loaded"]) == len(jax.tree.leaves(params)) and not report["new"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)

  with pytest.raises(UserError, match="is not empty: export into a new directory"):
    export.export(str(model_dir), str(release))
  gin.clear_config()
