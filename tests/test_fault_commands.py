"""The command lines meet a user's mistake with one line `error: ...` on stderr and exit status 2
(train, eval and predict alike), and `--traceback` shows the whole traceback instead; a run whose
learning rate makes it diverge stops with a diagnosis and never writes a non-finite checkpoint."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import command_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  env = dict(os.environ)
  env["XLA_FLAGS"] = command_xla_flags()
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _own_lines(stderr):
  """stderr's lines: the libraries' own logging is off (`simvlm_jax.console`), so nothing else."""
  return [line for line in stderr.splitlines() if line]


def _assert_one_error(out, message):
  assert out.returncode == 2, out.stderr[-3000:]
  lines = _own_lines(out.stderr)
  assert lines == [f"error: {message}"], lines


@pytest.mark.slow
def test_train_eval_predict_report_one_line(tmp_path):
  train = ["--import_modules=", "--gin_file=gin/runs/synthetic_tiny.gin",
           f"--gin.train.model_dir='{tmp_path / 'run'}'"]
  _assert_one_error(_run("simvlm_jax.train", *train, "--gin.Partitioner.mesh_shape=(3, 1, 1)"),
                    "mesh_shape (3, 1, 1) has 3 devices, but this run has 1: make the product 1, "
                    "or let one entry be -1 (e.g. Partitioner.mesh_shape = (-1, 1, 1))")
  _assert_one_error(_run("simvlm_jax.eval", "--gin_file=gin/eval.gin",
                         f"--gin.evaluate.model_dir='{tmp_path / 'nope'}'",
                         "--gin.evaluate.task='shapes_vqa_v2'"),
                    f"{tmp_path / 'nope'} is not a run directory: it holds no config.gin (give the "
                    "model_dir of a training run, or one of its checkpoints/<step> directories)")
  _assert_one_error(_run("simvlm_jax.predict", f"--checkpoint_dir={tmp_path / 'nope'}",
                         "--image=x.png"),
                    f"{tmp_path / 'nope'} is not a run directory: it holds no config.gin (give the "
                    "model_dir of a training run, or one of its checkpoints/<step> directories)")
  full = _run("simvlm_jax.train", *train, "--gin.train.totl_steps=3", "--traceback")
  assert full.returncode == 1
  assert "Traceback (most recent call last)" in full.stderr
  assert "UserError: gin: Configurable 'train' doesn't have a parameter named 'totl_steps'" in \
      full.stderr


@pytest.mark.slow
def test_a_huge_learning_rate_stops_with_a_diagnosis(tmp_path):
  """lr 1e6: the loss turns non-finite; the skipped updates are reported, the run stops after
  train.max_consecutive_nonfinite of them naming the last good checkpoint, and no checkpoint with
  a NaN or Inf is ever written (nor are good ones replaced by copies of a bad state)."""
  model_dir = tmp_path / "run"
  out = _run("simvlm_jax.train", "--import_modules=", "--gin_file=gin/runs/synthetic_tiny.gin",
             f"--gin.train.model_dir='{model_dir}'", "--gin.train.checkpoint_every=2",
             "--gin.train.log_every=1", "--gin.train.keep_checkpoints=2",
             "--gin.learning_rate_schedule.peak_learning_rate=1e6")
  assert out.returncode == 2, out.stderr[-3000:]
  skipped = [line for line in out.stdout.splitlines() if "update skipped" in line]
  assert len(skipped) == 5 and skipped[-1].endswith("(5 in a row, 5 in all)")
  first = int(skipped[0].split()[1].rstrip(":"))
  (error,) = _own_lines(out.stderr)
  assert error.startswith(f"error: training diverged: steps {first}-{first + 4}: 5 updates in a "
                          "row had a non-finite loss or gradient norm")
  steps = sorted(ocp.path.step.checkpoint_steps(model_dir / "checkpoints"))
  good = max(s for s in steps if s < first)
  assert f"The last good checkpoint is step {good} ({model_dir}/checkpoints/{good})" in error
  assert all(s <= first for s in steps)  # nothing written once the bad steps were seen
  for step in steps:
    tree = ocp.StandardCheckpointer().restore(model_dir / "checkpoints" / str(step) / "state")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


@pytest.mark.slow
def test_a_restart_past_a_damaged_checkpoint_says_which_damage_and_nothing_else(tmp_path):
  """The newest checkpoint cut short: the restart reads it twice (the damage reproduces), says in
  one line that it is corrupt, sets it aside and resumes from the one before; stderr stays empty
  (the reads Orbax abandons once printed a library traceback there, now and then)."""
  model_dir = tmp_path / "run"
  train = ["--import_modules=", "--gin_file=gin/runs/synthetic_tiny.gin",
           f"--gin.train.model_dir='{model_dir}'", "--gin.train.checkpoint_every=2",
           "--gin.train.log_every=2"]
  first = _run("simvlm_jax.train", *train, "--gin.train.total_steps=4")
  assert first.returncode == 0, first.stderr[-3000:]
  state = model_dir / "checkpoints" / "4" / "state"
  largest = max((os.path.join(d, f) for d, _, names in os.walk(state) for f in names),
                key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  again = _run("simvlm_jax.train", *train, "--gin.train.total_steps=5")
  assert again.returncode == 0 and again.stderr == "", again.stderr[-3000:]
  lines = again.stdout.splitlines()
  assert any(line.startswith(f"checkpoint 4 in {model_dir}/checkpoints cannot be read (corrupt: ")
             and line.endswith("); trying the one before it") for line in lines), lines
  assert (f"checkpoint 4 set aside as {model_dir}/checkpoints_unreadable/4" in lines and
          f"resumed from checkpoint 2 in {model_dir}/checkpoints" in lines), lines
