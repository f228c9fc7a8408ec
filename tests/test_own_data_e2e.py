"""The README's "Your own data, in three commands", as a user runs them: a folder of images of many
kinds with a broken one and an empty caption, relative paths throughout, a vocabulary of the
user's own text, the complete run file that needs only paths, and predict over a folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from conftest import command_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _run(cwd, *args):
  env = dict(os.environ, XLA_FLAGS=command_xla_flags())
  env["SIMVLM_CACHE_DIR"] = str(cwd / "cache")
  out = subprocess.run([PY, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
  return out


@pytest.mark.slow
def test_build_train_predict_on_your_own_folder(tmp_path):
  rng = np.random.default_rng(0)
  pairs = tmp_path / "my_pairs"
  pairs.mkdir()
  colours = ["red", "green", "blue", "yellow"]
  records = []
  for i in range(24):
    name = f"photo{i}." + ("jpg" if i % 3 else "png")
    size = (40 + 7 * i, 90 - i)
    array = np.full(size + (3,), 40 * (i % 4), np.uint8) + rng.integers(0, 30, size + (3,),
                                                                         dtype=np.uint8)
    image = Image.fromarray(array)
    if name.endswith("png") and i % 2 == 0:
      image = image.convert("RGBA")  # transparency, composited over white
    image.save(pairs / name)
    records.append({"image": name, "caption": f"a {colours[i % 4]} picture number {i}"})
  (pairs / "broken.jpg").write_bytes((pairs / "photo1.jpg").read_bytes()[:200])
  records += [{"image": "broken.jpg", "caption": "a cut file"},
              {"image": "photo2.jpg", "caption": ""}]
  (pairs / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  (tmp_path / "my_text.txt").write_text("\n".join(
      f"the {c} square is next to the {d} circle" for c in colours for d in colours) + "\n")

  build = _run(tmp_path, "tasks.build", "--data_dir=my_tfds", "folder", "--source_dir=my_pairs")
  assert build.returncode == 0, build.stderr[-3000:]
  vocab = _run(tmp_path, "tasks.build", "vocab", "--from", "my_pairs/train.jsonl", "my_text.txt",
               "--vocab_size=300", "--output=my_vocab.model")
  assert vocab.returncode == 0, vocab.stderr[-3000:]
  assert (tmp_path / "my_vocab.model").is_file()

  train = _run(tmp_path, "simvlm_jax.train", f"--gin_search_paths={REPO}/gin",
               f"--gin_file={REPO}/gin/runs/own_data.gin", "--gin.OWN_DATA_DIR='my_tfds'",
               "--gin.OWN_TEXT_FILES=['my_text.txt']", "--gin.VOCABULARY='my_vocab.model'",
               "--gin.train.model_dir='my_run'", "--gin.train.total_steps=2",
               "--gin.train.log_every=1", "--gin.IMAGE_TEXT_BATCH_SIZE=8",
               "--gin.TEXT_BATCH_SIZE=2", "--gin.ModelConfig.num_encoder_layers=1",
               "--gin.ModelConfig.num_decoder_layers=1")
  assert train.returncode == 0, train.stderr[-3000:]
  assert "step 2/2" in train.stdout
  assert train.stderr == ""  # the quiet console: nothing but the run's own lines
  run = tmp_path / "my_run"
  assert (run / "vocabulary.model").read_bytes() == (tmp_path / "my_vocab.model").read_bytes()

  photos = tmp_path / "my_photos"
  photos.mkdir()
  Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(photos / "new.jpg")
  Image.fromarray(rng.integers(0, 255, (30, 30), np.uint8)).convert("P").save(photos / "p.png")
  (photos / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  os.remove(tmp_path / "my_vocab.model")  # predict needs nothing but the run directory
  predict = _run(tmp_path, "simvlm_jax.predict", "--checkpoint_dir=my_run", "--image=my_photos")
  assert predict.returncode == 0, predict.stderr[-3000:]
  assert [line.split("\t")[0] for line in predict.stdout.splitlines()] == [
      "my_photos/new.jpg", "my_photos/p.png"]
  errors = predict.stderr.splitlines()
  assert len(errors) == 2 and errors[0].startswith("error: cannot read image my_photos/damaged.png")
  assert errors[1] == "2 of 3 images predicted; 1 could not be read"
