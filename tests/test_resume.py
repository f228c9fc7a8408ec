"""Exact resume, end to end, as a user's run meets it: a run killed (SIGKILL) after its step-k
checkpoint, or stopped by SIGTERM / SIGINT (preemption, Ctrl-C) at any step, and restarted with the
same command reaches step 2k with parameters bitwise equal to an uninterrupted 2k-step run."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 20


def _command(model_dir):
  return [sys.executable, "-m", "simvlm_jax.train", "--import_modules=",
          "--gin_file=gin/runs/synthetic_tiny.gin", f"--gin.train.model_dir='{model_dir}'",
          f"--gin.train.total_steps={2 * K}", f"--gin.train.checkpoint_every={K}",
          "--gin.train.log_every=1"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a plain user run.
  return env


def _params(model_dir, step):
  restored = ocp.StandardCheckpointer().restore(os.path.join(model_dir, "checkpoints", str(step),
                                                             "state"))
  return jax.device_get(restored["params"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run's parameters at steps K and 2K."""
  model_dir = str(tmp_path_factory.mktemp("reference"))
  subprocess.run(_command(model_dir), cwd=REPO, env=_env(), check=True, capture_output=True)
  return _params(model_dir, K), _params(model_dir, 2 * K)


def _assert_same(got, expected):
  leaves = jax.tree.leaves(expected)
  assert len(leaves) > 10
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def _resume(model_dir, first_step):
  out = subprocess.run(_command(model_dir), cwd=REPO, env=_env(), check=True, capture_output=True,
                       text=True)
  assert f"resumed from checkpoint {first_step - 1}" in out.stdout
  assert f"step {first_step}/{2 * K}" in out.stdout  # it went on, not from scratch.
  assert "step 1/" not in out.stdout
  return out


@pytest.mark.slow
def test_killed_run_resumes_bitwise(reference, tmp_path):
  resumed = str(tmp_path / "resumed")
  proc = subprocess.Popen(_command(resumed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = os.path.join(resumed, "checkpoints", str(K))
  deadline = time.time() + 300
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  assert os.path.isdir(first)
  assert not os.path.isdir(os.path.join(resumed, "checkpoints", str(2 * K)))

  _resume(resumed, K + 1)
  _assert_same(_params(resumed, 2 * K), reference[1])
  # And the runs really moved: step 2K differs from step K.
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(reference[0]),
                                                        jax.tree.leaves(reference[1])))


def _stop_with(sig, model_dir, after_step):
  """Runs until the progress line of `after_step`, sends `sig`; returns (exit status, stdout)."""
  proc = subprocess.Popen(_command(model_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(f"step {after_step}/"):
      proc.send_signal(sig)
  return proc.wait(timeout=300), "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_reached_and_resumes_bitwise(reference, tmp_path, sig):
  """Preemption: the step in flight finishes, its checkpoint is written (state and data position),
  the process exits 0 with a line saying so; the same command resumes exactly there."""
  model_dir = str(tmp_path / "run")
  status, stdout = _stop_with(sig, model_dir, after_step=7)
  assert status == 0
  stops = [line for line in stdout.splitlines() if line.startswith("stopped by")]
  assert len(stops) == 1, stdout
  saved = int(stops[0].split("after step ")[1].split(":")[0])
  assert 7 <= saved < 2 * K  # the step in flight, or the one after it
  assert stops[0] == (f"stopped by {signal.Signals(sig).name} after step {saved}: saved "
                      f"checkpoint {saved} (state and data position) in {model_dir}/checkpoints; "
                      "run the same command to resume")
  assert sorted(ocp.path.step.checkpoint_steps(os.path.join(model_dir, "checkpoints"))) == [saved]
  _resume(model_dir, saved + 1)
  _assert_same(_params(model_dir, K), reference[0])
  _assert_same(_params(model_dir, 2 * K), reference[1])
