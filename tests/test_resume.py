"""Exact resume, end to end: a run killed after its step-k checkpoint and restarted reaches step 2k
with parameters bitwise equal to an uninterrupted 2k-step run."""
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
          "--gin.train.log_every=5"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a plain user run.
  return env


def _params(model_dir, step):
  restored = ocp.StandardCheckpointer().restore(os.path.join(model_dir, "checkpoints", str(step),
                                                             "state"))
  return jax.device_get(restored["params"])


@pytest.mark.slow
def test_killed_run_resumes_bitwise(tmp_path):
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  subprocess.run(_command(reference), cwd=REPO, env=_env(), check=True, capture_output=True)

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

  out = subprocess.run(_command(resumed), cwd=REPO, env=_env(), check=True, capture_output=True,
                       text=True)
  assert f"step {K + 5}/{2 * K}" in out.stdout  # it went on from step K, not from scratch.
  assert f"step 5/{2 * K}" not in out.stdout

  expected, got = _params(reference, 2 * K), _params(resumed, 2 * K)
  leaves = jax.tree.leaves(expected)
  assert len(leaves) > 10
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  # And the runs really moved: step 2K differs from step K.
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_params(resumed, K)), leaves))
