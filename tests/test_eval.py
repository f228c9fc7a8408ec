"""The eval command: task -> metric dispatch with hand-computed scores, and (slow) the whole path:
pretrain a tiny model, finetune it with init_from, evaluate with the official metrics."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simvlm_jax import eval as eval_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_of():
  assert eval_lib.benchmark_of("shapes_vqa_v2") == "vqa_v2"
  assert eval_lib.benchmark_of("snli_ve_text") == "snli_ve_text"
  with pytest.raises(ValueError, match="no metric"):
    eval_lib.benchmark_of("shapes64_image_text")


def test_vqa_scores():
  meta = [{"answers": np.array([b"yes"] * 10), "answer_type": b"yes/no", "question_type": b"is"},
          {"answers": np.array([b"2"] * 2 + [b"3"] * 8), "answer_type": b"number",
           "question_type": b"how many"}]
  scores, per_example = eval_lib.score("vqa_v2", ["Yes", "two"], meta)
  # "two" -> "2", given by 2 of 10 humans: each of the 8 others' leave-one-out sets has 2
  # matches (2/3), the 2 matching humans' have 1 (1/3): (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
  assert per_example == pytest.approx([100.0, 60.0])
  assert scores["accuracy"] == pytest.approx(80.0)
  assert scores["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 60.0})
  assert scores["examples"] == 2


def test_classification_scores_invalid_text_is_wrong():
  meta = [{"targets_pretokenized": t} for t in (b"entailment", b"neutral", b"contradiction",
                                                b"neutral")]
  scores, per_example = eval_lib.score("snli_ve", ["entailment", " Neutral", "maybe", "contra"],
                                       meta)
  assert scores["accuracy"] == 50.0 and per_example == [100.0, 100.0, 0.0, 0.0]
  assert scores["confusion_matrix"][2][3] == 1  # "maybe" -> <other>
  nlvr2, _ = eval_lib.score("nlvr2", ["true", "true"], [{"targets_pretokenized": b"true"},
                                                        {"targets_pretokenized": b"false"}])
  assert nlvr2["accuracy"] == 50.0


def test_numeric_flattening():
  flat = eval_lib._numeric({"accuracy": 1, "per": {"a": 2.0}, "method": "beam", "x": None,
                            "ok": True})
  assert flat == {"accuracy": 1.0, "per/a": 2.0}


def _env(tmp):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["SIMVLM_DATA_DIR"] = str(tmp / "tfds")
  env["SIMVLM_CACHE_DIR"] = str(tmp / "cache")
  return env


def _run(tmp, *args, timeout=600):
  out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(tmp),
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout


@pytest.mark.slow
def test_pretrain_finetune_evaluate(tmp_path):
  data = str(tmp_path / "tfds")
  _run(tmp_path, "tasks.build", "--data_dir", data, "shapes", "--train", "32", "--validation",
       "16", "--compositional", "16", "--text_train", "64", "--text_validation", "16",
       "--workers", "0")
  _run(tmp_path, "tasks.build", "--data_dir", data, "shapes_downstream", "--out_dir",
       str(tmp_path / "raw"), "--train", "16", "--eval", "12", "--workers", "0")
  pretrain = tmp_path / "pretrain"
  _run(tmp_path, "simvlm_jax.train", "--gin_file=runs/demo_pretrain.gin",
       f"--gin.train.model_dir='{pretrain}'", "--gin.train.total_steps=2",
       "--gin.train.eval_iterator_fn=None", "--gin.IMAGE_TEXT_BATCH_SIZE=4",
       "--gin.TEXT_BATCH_SIZE=2")
  finetuned = tmp_path / "nlvr2"
  stdout = _run(tmp_path, "simvlm_jax.train", "--gin_file=models/simvlm_tiny.gin",
                "--gin_file=finetune/nlvr2.gin", "--gin_file=runs/demo_finetune.gin",
                "--gin.TASK='shapes_nlvr2'", f"--gin.PRETRAINED_DIR='{pretrain}'",
                f"--gin.train.model_dir='{finetuned}'", "--gin.train.total_steps=2",
                "--gin.BATCH_SIZE=4")
  report = next(line for line in stdout.splitlines() if line.startswith("initialised from"))
  assert int(report.split(": ")[1].split(" loaded")[0]) > 50 and "0 new" in report
  assert "step 2/2" in stdout

  _run(tmp_path, "simvlm_jax.eval", "--gin_file=gin/eval.gin",
       f"--gin.evaluate.model_dir='{finetuned}'", "--gin.evaluate.task='shapes_nlvr2'",
       "--gin.evaluate.batch_size=5")
  out_dir = finetuned / "eval_shapes_nlvr2_validation"
  scores = json.loads((out_dir / "scores.json").read_text())
  assert list(scores) == ["2"]
  assert {"accuracy", "per_class_accuracy", "confusion_matrix"} <= set(scores["2"])
  assert 0.0 <= scores["2"]["accuracy"] <= 100.0 and scores["2"]["method"] == "greedy"
  rows = [json.loads(line) for line in (out_dir / "predictions_2.jsonl").read_text().splitlines()]
  assert len(rows) == scores["2"]["examples"] == 12  # 6 image pairs x 2 statements
  assert all(set(r) >= {"prompt", "prediction", "targets_pretokenized", "identifier", "score"}
             for r in rows)
  html = (out_dir / "report_2.html").read_text()
  assert html.count('<tr id="example-') == 12 and "data:image/jpeg;base64" in html
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(out_dir))

  # Zero-shot captioning of the pretraining checkpoint, same command, beam search.
  _run(tmp_path, "simvlm_jax.eval", "--gin_file=gin/eval.gin",
       f"--gin.evaluate.model_dir='{pretrain}'", "--gin.evaluate.task='shapes_coco_captions'",
       "--gin.evaluate.max_decode_length=8", "--gin.evaluate.beam_size=2")
  captions = json.loads((pretrain / "eval_shapes_coco_captions_validation" /
                         "scores.json").read_text())["2"]
  assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(captions)
  assert captions["examples"] == 12 and captions["method"] == "beam"
