"""Exact resume on the real input pipeline (the shapes world read through SeqIO and tf.data, whose
iterator position travels in every checkpoint), as a user's run meets it: killed (SIGKILL) while
an async save is in flight, stopped by SIGTERM (preemption) at a random step, killed again at a
random moment, and restarted each time with the same command. Each restart resumes from the newest
finalised checkpoint (a half-written one is removed by the next start and never resumed from), the
SIGTERM saves the step it reached and exits 0 with a line saying so, and every checkpoint of the
interrupted run is bitwise equal to the uninterrupted run's."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import command_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 14, 2
SEED = 20261203  # the kill moments are random, but the same on every CI run


def _command(model_dir, every=EVERY):
  return [sys.executable, "-m", "simvlm_jax.train", "--gin_file=gin/runs/demo_pretrain.gin",
          f"--gin.train.model_dir='{model_dir}'", f"--gin.train.total_steps={STEPS}",
          f"--gin.train.checkpoint_every={every}", "--gin.train.keep_checkpoints=100",
          "--gin.train.log_every=1", "--gin.train.eval_iterator_fn=None",
          "--gin.ModelConfig.num_encoder_layers=1", "--gin.ModelConfig.num_decoder_layers=1",
          # 8 + 2 rows: the pipeline, its position and the kills are what is tested, not the batch.
          "--gin.IMAGE_TEXT_BATCH_SIZE=8", "--gin.TEXT_BATCH_SIZE=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A small shapes world and its vocabulary, private to this module."""
  tmp = tmp_path_factory.mktemp("shapes")
  env = dict(os.environ, XLA_FLAGS=command_xla_flags())  # one device, as a user run
  env.update(SIMVLM_DATA_DIR=str(tmp / "tfds"), SIMVLM_CACHE_DIR=str(tmp / "cache"))
  subprocess.run([sys.executable, "-m", "tasks.build", "shapes", "--train=96", "--validation=8",
                  "--compositional=8", "--text_train=64", "--text_validation=8", "--workers=0"],
                 cwd=REPO, env=env, check=True, capture_output=True)
  return env


def _finalised(model_dir):
  path = os.path.join(model_dir, "checkpoints")
  return sorted(ocp.path.step.checkpoint_steps(path)) if os.path.isdir(path) else []


def _entries(model_dir):
  path = os.path.join(model_dir, "checkpoints")
  return os.listdir(path) if os.path.isdir(path) else []


def _state(model_dir, step):
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(model_dir, "checkpoints", str(step), "state"))
  return jax.device_get({"params": restored["params"], "opt_state": restored["opt_state"]})


def _run_until_stopped(model_dir, env, stop_when, log, sig):
  """Runs the command; sends `sig` once `stop_when(stdout lines so far, checkpoint entries)`.
  Returns the exit status."""
  proc = subprocess.Popen(_command(model_dir), cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while proc.poll() is None:
    assert time.time() < deadline, "the run did not reach its stop moment"
    with open(log.name) as f:
      lines = f.read().splitlines()
    if stop_when(lines, _entries(model_dir)):
      proc.send_signal(sig)
      break
    time.sleep(0.005)
  status = proc.wait(timeout=300)
  assert status != 0 or sig != signal.SIGKILL, "the run ended before its kill moment"
  return status


@pytest.mark.slow
def test_random_kills_on_the_shapes_pipeline_resume_bitwise(env, tmp_path):
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  # Every step of the uninterrupted run is kept, to compare with whichever the others saved.
  uninterrupted = subprocess.Popen(_command(reference, every=1), cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  rng = random.Random(SEED)

  def mid_save(lines, entries):  # Orbax writes into <step>.orbax-checkpoint-tmp-* first.
    return any(".orbax-checkpoint-tmp" in e for e in entries)

  def after_step(step, delay):
    def when(lines, entries):
      if not hasattr(when, "seen") and any(l.startswith(f"step {step}/") for l in lines):
        when.seen = time.time()
      return hasattr(when, "seen") and time.time() >= when.seen + delay
    return when

  step, delay = rng.randint(3, 5), rng.uniform(0.0, 0.5)
  term_step = rng.randint(6, 8)
  interruptions = [("SIGKILL while saving", signal.SIGKILL, mid_save),
                   (f"SIGTERM after the line of step {term_step}", signal.SIGTERM,
                    after_step(term_step, 0.0)),
                   (f"SIGKILL {delay:.2f} s after the line of step {step + 6}", signal.SIGKILL,
                    after_step(step + 6, delay))]
  previous = []
  for i, (moment, sig, stop_when) in enumerate(interruptions):
    with open(tmp_path / f"run{i}.log", "w") as log:
      status = _run_until_stopped(killed, env, stop_when, log, sig)
    text = (tmp_path / f"run{i}.log").read_text()
    resumed = re.findall(r"resumed from checkpoint (\d+)", text)
    # Each run resumes from the newest checkpoint its predecessor finalised, or from scratch.
    assert resumed == ([str(previous[-1])] if previous else []), (moment, text[-3000:])
    if i == 0:
      assert not _finalised(killed) and any(".orbax-checkpoint-tmp" in e for e in _entries(killed))
    if sig == signal.SIGTERM:  # preemption: the step reached is saved, whatever checkpoint_every
      assert status == 0, text[-3000:]
      stop, = re.findall(r"stopped by SIGTERM after step (\d+): saved checkpoint \d+ \(state and "
                         r"data position\) in .*; run the same command to resume", text)
      # The step in flight when the signal came (the line of a step lags its dispatch a little).
      assert term_step <= int(stop) <= term_step + 2 and _finalised(killed)[-1] == int(stop)
    previous = _finalised(killed)

  out = subprocess.run(_command(killed), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  if previous:
    assert f"resumed from checkpoint {previous[-1]}" in out.stdout
  assert uninterrupted.wait(timeout=300) == 0
  # No half-written checkpoint is left, and every step the interrupted runs saved matches.
  saved = sorted(int(e) for e in _entries(killed))  # checkpoint_every's, and the SIGTERM's
  assert set(range(EVERY, STEPS + 1, EVERY)) <= set(saved) and len(saved) <= STEPS // EVERY + 1
  for step in saved:
    got, expected = _state(killed, step), _state(reference, step)
    assert len(jax.tree.leaves(expected)) > 10
    jax.tree.map(np.testing.assert_array_equal, got, expected)
  first, last = _state(reference, EVERY), _state(reference, STEPS)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first),
                                                        jax.tree.leaves(last)))
