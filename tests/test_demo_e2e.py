"""End to end on the embedded data: the demo (build, pretrain, text-only run, captions, held-out
accuracy) with a few steps, then the predict command on its checkpoint, errors included."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["SIMVLM_CACHE_DIR"] = str(tmp / "cache")
  return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("demo")
  out = subprocess.run(
      [sys.executable, "-m", "simvlm_jax.demo", f"--workdir={tmp / 'work'}", "--steps=3",
       "--train_images=64", "--heldout_images=64", "--text_statements=200",
       "--skip_downstream"],  # finetuning and eval end to end: tests/test_eval.py
      cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return tmp, out.stdout


def _predict(tmp, *args):
  return subprocess.run([sys.executable, "-m", "simvlm_jax.predict", *args], cwd=REPO,
                        env=_env(tmp), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_demo_prints_captions_and_accuracies(demo):
  _, stdout = demo
  assert stdout.count("held-out image") == 8
  assert stdout.count("reference :") == 8 * 5
  assert stdout.count("model     : a picture of") == 8
  rows = [line.split() for line in stdout.splitlines() if line.strip().startswith(("image-text",
                                                                                  "text only"))]
  assert len(rows) == 2
  for row in rows:
    assert 0.0 <= float(row[-1]) <= 1.0 and 0.0 <= float(row[-2]) <= 1.0


@pytest.mark.slow
def test_predict_command(demo):
  tmp, _ = demo
  model_dir = str(tmp / "work" / "pretrain")
  images = tmp / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (80, 100, 3), np.uint8)).save(images / "a.png")
  Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)).convert("P").save(images / "b.png")
  out = _predict(tmp, f"--checkpoint_dir={model_dir}", f"--image={images}/*.png",
                 "--format=json", "--beam_size=2", "--max_decode_length=6")
  assert out.returncode == 0, out.stderr[-2000:]
  results = [json.loads(line) for line in out.stdout.splitlines()]
  assert [os.path.basename(r["image"]) for r in results] == ["a.png", "b.png"]
  assert all(r["prompt"] == "a picture of" and isinstance(r["prediction"], str) for r in results)
  text = _predict(tmp, f"--checkpoint_dir={model_dir}", f"--image={images}/a.png")
  assert text.returncode == 0 and text.stdout.startswith(f"{images}/a.png\t")

  (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  bad = _predict(tmp, f"--checkpoint_dir={model_dir}", f"--image={images}/broken.jpg")
  assert bad.returncode == 1 and "cannot read image" in bad.stderr

  missing = _predict(tmp, f"--checkpoint_dir={tmp / 'nowhere'}", f"--image={images}/a.png")
  assert missing.returncode == 1 and "config.gin not found" in missing.stderr

  mismatch = tmp / "mismatch"
  shutil.copytree(model_dir, mismatch)
  config = (mismatch / "config.gin").read_text().replace("VOCAB_SIZE = 512", "VOCAB_SIZE = 600")
  (mismatch / "config.gin").write_text(config)
  wrong = _predict(tmp, f"--checkpoint_dir={mismatch}", f"--image={images}/a.png")
  assert wrong.returncode == 1 and "model/vocabulary mismatch" in wrong.stderr
