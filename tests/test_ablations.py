"""The ablation gin files (gin/ablations/) over the demo's pretraining run: each changes exactly
what its row of SimVLM's Table 6 says, and benchmarks/ablations.py runs every one of them."""
import glob
import os
import sys
import types

import gin
import numpy as np
import pytest

from simvlm_jax import gin_utils, objectives
from simvlm_jax import train  # (registers `train`, which the run files bind)
from simvlm_jax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import ablations  # noqa: E402


def _parse(*files):
  gin.clear_config()
  gin_utils.parse_gin(["runs/demo_pretrain.gin", *files], [])
  return {"config": ModelConfig(),
          "objective": gin.query_parameter("train.objective").scoped_configurable_fn,
          "text_rows": gin.query_parameter("%TEXT_BATCH_SIZE"),
          "image_text_rows": gin.query_parameter("%IMAGE_TEXT_BATCH_SIZE"),
          "vocab_size": gin.query_parameter("%VOCAB_SIZE")}


@pytest.fixture(scope="module")
def base():
  yield _parse()
  gin.clear_config()


@pytest.mark.parametrize("name, expected", [
    ("span_corruption", {"objective": objectives.span_corruption, "vocab_size": 640}),
    ("plain_lm", {"objective": objectives.plain_lm}),
    ("decoder_only", {"architecture": "decoder_only"}),
    ("linear_patches", {"patchifier": "linear"}),
    ("image_text_only", {"text_rows": 0}),
])
def test_each_ablation_changes_only_its_own_setting(base, name, expected):
  (files,) = [v for k, v in ablations.CONFIGS.items() if k == name]
  got = _parse(*files)
  gin.clear_config()
  assert base["objective"] is objectives.prefix_lm and base["config"].patchifier == "resnet"
  assert base["config"].architecture == "encoder_decoder" and base["text_rows"] == 8
  for key in ("objective", "text_rows", "image_text_rows", "vocab_size"):
    assert got[key] == expected.get(key, base[key]), key
  changed = {k: v for k, v in vars(got["config"]).items() if vars(base["config"])[k] != v}
  model_keys = {k: v for k, v in expected.items() if k in vars(base["config"])}
  if "vocab_size" in expected:
    model_keys["vocab_size"] = expected["vocab_size"]
  assert changed == model_keys


def test_the_table_covers_every_ablation_file():
  files = {os.path.relpath(f, os.path.join(REPO, "gin"))
           for f in glob.glob(os.path.join(REPO, "gin", "ablations", "*.gin"))}
  assert files == {f for v in ablations.CONFIGS.values() for f in v}
  assert ablations.CONFIGS["prefix_lm"] == ()  # the base run itself


def test_table_shows_mean_and_half_spread_over_seeds():
  run = lambda seed, cider, vqa: {
      "config": "prefix_lm", "seed": seed, "vqa": {"accuracy": vqa},
      "zero_shot": {"CIDEr": cider, "caption_correctness": {"precision": 50.0, "recall": 10.0,
                                                             "right": 5.0 + seed}},
      "text_nli": {"accuracy": 60.0}}
  text = ablations.table([run(0, 0.5, 40.0), run(1, 0.7, 50.0)])
  assert text.splitlines()[2] == ("| prefix_lm | 0,1 | 60.0 ± 10.0 | 50.0 ± 0.0 | 10.0 ± 0.0 | "
                                  "5.5 ± 0.5 | 45.0 ± 5.0 | 60.0 ± 0.0 |")
  # Results written before a column existed show it as n/a, not as an error.
  old = run(0, 0.5, 40.0)
  del old["zero_shot"]["caption_correctness"]["right"]
  assert ablations.table([old]).splitlines()[2] == (
      "| prefix_lm | 0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 10.0 ± 0.0 | n/a | 40.0 ± 0.0 | 60.0 ± 0.0 |")


def test_a_preempted_run_ends_the_program_instead_of_evaluating_it(tmp_path, monkeypatch, capsys):
  """The demo, fidelity and ablation scripts train through `demo.run_train`: a run that SIGTERM
  stopped (train returns the state of the step it saved) must not be evaluated as finished."""
  from tasks import demo  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(train, "train", lambda: types.SimpleNamespace(step=np.int32(3)))
  with pytest.raises(SystemExit) as stop:
    demo.run_train(["runs/synthetic_tiny.gin"], str(tmp_path), ["train.total_steps = 10"])
  gin.clear_config()
  assert stop.value.code == 0
  assert capsys.readouterr().out == (f"stopped at step 3 of 10 ({tmp_path}); run the same command "
                                     "to resume\n")
  monkeypatch.setattr(train, "train", lambda: types.SimpleNamespace(step=np.int32(10)))
  demo.run_train(["runs/synthetic_tiny.gin"], str(tmp_path), ["train.total_steps = 10"])
  gin.clear_config()
