"""Only the training process writes into a run: eval, predict and export read its checkpoints beside
a run that is still saving, and never touch a save in progress (`checkpoints.CheckpointReader`).

A save in progress is Orbax's temporary directory (`<step>.orbax-checkpoint-tmp-<time>`) on a file
system, and on gs:// a step directory without `commit_success.txt`. A reader that removed it (as
every `Checkpointer` does when it starts) pulled the files from under the trainer's background
save, which then failed and ended the run (issue #28)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio
from PIL import Image

import fake_gcs
from conftest import SENTENCES, process_env
from simvlm_jax import checkpoints, run_dir, train
from simvlm_jax.data import vocab
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.errors import CheckpointError
from simvlm_jax.partitioning import Partitioner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCS = os.path.join(REPO, "tests", "fake_gcs.py")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_config):
  """A run (config.gin, checkpoints 2 and 4) that each test copies."""
  directory = tmp_path_factory.mktemp("run")
  config = tiny_config()
  gin.clear_config()
  # Bound in gin, so that the run's config.gin (what readers rebuild the model from) names them.
  gin.parse_config([f"ModelConfig.{k} = {v!r}" for k, v in vars(config).items()])
  train.train(model_dir=str(directory), total_steps=4,
              train_iterator_fn=lambda **kw: SyntheticIterator(
                  image_size=config.image_size, vocab_size=config.vocab_size, text_batch=4, **kw),
              model_config=config, partitioner=Partitioner((1, 1, 1), devices=jax.devices()[:1]),
              log_every=2, checkpoint_every=2, keep_checkpoints=None)
  gin.clear_config()
  return directory


def _read_like_eval(model_dir: str) -> tuple[list[int], int]:
  """What eval and predict do to a run: list its steps, load the newest parameters."""
  run = run_dir.open_run(model_dir, restore=False, need_vocabulary=False)
  try:
    steps = run.steps()
    run.restore(run.step)  # the step the path names, else the newest
    assert len(jax.tree.leaves(run.params)) > 10
    return steps, run.step
  finally:
    gin.clear_config()


def test_a_save_in_progress_survives_readers_and_is_not_listed(finished_run, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished_run, run)
  in_progress = run / "checkpoints" / "6.orbax-checkpoint-tmp-1796691137"
  shutil.copytree(run / "checkpoints" / "4", in_progress)
  assert _read_like_eval(str(run)) == ([2, 4], 4)
  assert _read_like_eval(str(run / "checkpoints" / "2")) == ([2, 4], 2)
  assert sorted(os.listdir(in_progress)) == sorted(os.listdir(run / "checkpoints" / "4"))
  reader = checkpoints.CheckpointReader(str(run / "checkpoints"))
  assert reader.all_steps() == [2, 4] and reader.latest_step() == 4
  assert in_progress.exists()
  # A reader creates nothing either.
  missing = checkpoints.CheckpointReader(str(tmp_path / "elsewhere" / "checkpoints"))
  assert missing.all_steps() == [] and missing.latest_step() is None
  with pytest.raises(CheckpointError, match="no checkpoint in"):
    missing.restore_params({})
  assert not (tmp_path / "elsewhere").exists()


def test_an_uncommitted_step_on_gcs_survives_readers_and_is_not_listed(finished_run, tmp_path):
  """On gs:// a save writes into its step directory and commits it with `commit_success.txt`."""
  bucket = tmp_path / "bucket"
  run = bucket / "b" / "run"
  shutil.copytree(finished_run, run)
  for step in ("2", "4"):
    (run / "checkpoints" / step / "commit_success.txt").write_text("done")
  in_progress = run / "checkpoints" / "6"
  shutil.copytree(run / "checkpoints" / "4", in_progress)
  os.remove(in_progress / "commit_success.txt")
  with fake_gcs.install(str(bucket)):
    assert _read_like_eval("gs://b/run") == ([2, 4], 4)
    assert set(os.listdir(in_progress)) == set(os.listdir(run / "checkpoints" / "4")) - {
        "commit_success.txt"}
    reader = checkpoints.CheckpointReader("gs://b/run/checkpoints")
    assert reader.all_steps() == [2, 4]
  assert in_progress.exists()


# --- beside a training process ------------------------------------------------------------------

def _saving(folder, gcs: bool) -> bool:
  """Whether a save is in progress, seen in the local folder behind the run's checkpoints."""
  return any(".orbax-checkpoint-tmp" in name or (gcs and name.isdigit() and not (
      folder / name / "commit_success.txt").exists()) for name in os.listdir(folder))


def _poll(model_dir: str, folder, gcs: bool, rounds: int) -> int:
  """Reads the run as an eval sweep does, `rounds` times, each once a save is in progress (if one
  starts within a minute). Returns how many rounds read while one was."""
  run = run_dir.open_run(model_dir, restore=False, need_vocabulary=False)
  during = 0
  try:
    for _ in range(rounds):
      deadline = time.time() + 60
      while not _saving(folder, gcs) and time.time() < deadline:
        time.sleep(0.001)
      during += _saving(folder, gcs)
      steps = run.steps()
      run.restore()
      assert run.step >= steps[-1] and len(jax.tree.leaves(run.params)) > 10
  finally:
    gin.clear_config()
  return during


SYNTHETIC_ON_GCS = """
import json
from etils import epath
from simvlm_jax.data.synthetic import SyntheticIterator

def _save(self, path):
  epath.Path(path + ".json").write_text(json.dumps({"position": self.position}))

def _restore(self, path):
  self.position = json.loads(epath.Path(path + ".json").read_text())["position"]

SyntheticIterator.save, SyntheticIterator.restore = _save, _restore
"""


def _vocabulary(directory) -> seqio.SentencePieceVocabulary:
  return seqio.SentencePieceVocabulary(vocab.train_sentencepiece(
      SENTENCES, 300, "readers", directory=str(directory)))


def _wait_for(condition, what, proc, log, seconds=300):
  deadline = time.time() + seconds
  while not condition():
    assert proc.poll() is None, f"the training ended before {what}: {log.read_text()[-3000:]}"
    assert time.time() < deadline, f"no {what} after {seconds}s"
    time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["local", "gs"])
def test_eval_and_predict_beside_a_training_run(tmp_path, storage):
  """A run saving every 2 steps, read meanwhile by the predict command and an eval sweep (what
  eval, predict and export do to a run: `Run.steps` and `Run.restore`): the run goes on to the
  end (SIGTERM: it saves and exits 0), and every checkpoint it wrote is committed and
  restorable."""
  bucket = tmp_path / "bucket"
  folder = bucket / "b" / "run" if storage == "gs" else tmp_path / "run"
  model_dir = "gs://b/run" if storage == "gs" else str(folder)
  folder.mkdir(parents=True)
  # predict decodes text: the run carries a vocabulary (synthetic batches come without one).
  run_dir.write_vocabulary(str(folder), _vocabulary(tmp_path))
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "photo.png")
  env = process_env(1, PYTHONPATH=str(tmp_path))
  through, imports = ["-m"], ""
  if storage == "gs":
    # SyntheticIterator writes its position with `open`, which cannot reach gs://; through epath
    # here (the real pipelines' iterators write through tf.io.gfile and epath).
    (tmp_path / "synthetic_on_gcs.py").write_text(SYNTHETIC_ON_GCS)
    through, imports = [FAKE_GCS, str(bucket)], "synthetic_on_gcs"
  out, err = tmp_path / "train.out", tmp_path / "train.err"
  trainer = subprocess.Popen(
      [sys.executable, *through, "simvlm_jax.train", f"--import_modules={imports}",
       "--gin_file=gin/runs/synthetic_tiny.gin", f"--gin.train.model_dir='{model_dir}'",
       "--gin.VOCAB_SIZE=300", "--gin.train.total_steps=100000", "--gin.train.log_every=1000",
       "--gin.train.checkpoint_every=2", "--gin.train.keep_checkpoints=10"],
      cwd=REPO, env=env, stdout=out.open("w"), stderr=err.open("w"))
  try:
    _wait_for(lambda: (folder / "config.gin").exists() and checkpoints.committed_steps(
        folder / "checkpoints"), "checkpoint", trainer, err)
    if storage == "gs":  # the local folder has no commit files; a gs:// step needs one
      _wait_for(lambda: any((folder / "checkpoints" / str(s) / "commit_success.txt").exists()
                            for s in checkpoints.committed_steps(folder / "checkpoints")),
                "commit file", trainer, err)
    predict = None
    if storage == "local":  # the command of the report (its reading is the sweep's, below)
      predict = subprocess.Popen(
          [sys.executable, "-m", "simvlm_jax.predict", f"--checkpoint_dir={model_dir}",
           f"--image={tmp_path / 'photo.png'}", "--max_decode_length=2", "--format=json"],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with fake_gcs.install(str(bucket)) if storage == "gs" else contextlib.nullcontext():
      assert _poll(model_dir, folder / "checkpoints", storage == "gs", rounds=3) >= 1
    if predict is not None:
      predicted, predict_err = predict.communicate(timeout=300)
      assert predict.returncode == 0, predict_err[-3000:]
      assert json.loads(predicted)["prompt"] == "a picture of"
    assert trainer.poll() is None, f"the training ended while it was read: {err.read_text()}"
    trainer.send_signal(signal.SIGTERM)
    trainer.wait(timeout=300)
  finally:
    if trainer.poll() is None:
      trainer.kill()
  assert trainer.returncode == 0, err.read_text()[-3000:]
  assert "Traceback" not in err.read_text() and "stopped by SIGTERM" in out.read_text()
  names = os.listdir(folder / "checkpoints")
  steps = checkpoints.committed_steps(folder / "checkpoints")
  assert sorted(names, key=int) == [str(s) for s in steps]  # nothing half written
  for step in steps:
    directory = folder / "checkpoints" / str(step)
    assert storage == "local" or (directory / "commit_success.txt").exists()
    assert (directory / "data" / checkpoints.PROCESSES_FILE).exists()
    restored = ocp.StandardCheckpointer().restore(directory / "state")
    assert int(restored["step"]) == step
