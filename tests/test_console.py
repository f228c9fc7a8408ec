"""`simvlm_jax.console`: which stderr lines the quiet console drops, and that it keeps the rest."""
import logging
import subprocess
import sys

import pytest

from simvlm_jax import console
from simvlm_jax.metrics import captions


@pytest.mark.parametrize("line,noise", [
    (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
     True),
    (b"I0000 00:00:1796321330.668239   29940 port.cc:153] oneDNN custom operations are on.\n", True),
    (b"W0000 00:00:1796307175.637678   31840 cache_dataset_ops.cc:333] The calling iterator\n",
     True),
    (b"E0000 00:00:1796307175.637678   31840 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n",
     True),
    (b"E0000 00:00:1796307175.637678   31840 some_op.cc:52] a real failure\n", False),
    (b"I1203 18:07:21.672470 139644222651264 xla_bridge.py:849] Unable to initialize backend\n",
     True),
    (b"Improper call to JPEG library in state 201\n", True),
    (b"PTBTokenizer tokenized 665 tokens at 4277.44 tokens per second.\n", True),
    (b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n",
     True),
    (b"error: cannot read image photos/broken.png: Invalid PNG data, size 60\n", False),
    (b"Traceback (most recent call last):\n", False),
    (b"  File \"x.py\", line 1, in <module>\n", False),
])
def test_library_noise(line, noise):
  assert console.is_library_noise(line) == noise


def test_python_logging_shows_the_projects_warnings_and_every_error():
  from simvlm_jax import checkpoints  # pylint: disable=import-outside-toplevel

  def record(level, path):
    return logging.LogRecord("absl", level, path, 1, "message", None, None)

  ours, theirs = checkpoints.__file__, logging.__file__
  assert console.is_shown(record(logging.WARNING, ours))
  assert not console.is_shown(record(logging.INFO, ours))
  assert not console.is_shown(record(logging.WARNING, theirs))
  assert console.is_shown(record(logging.ERROR, theirs))


def test_a_command_prints_its_own_lines_only_unless_asked():
  """A command's TensorFlow import, a libjpeg complaint and a library's Python warning: gone,
  unless --library_logs; the project's own warning stays."""
  code = ("import sys; sys.argv = ['-m'] + sys.argv[1:]; import simvlm_jax; sys.argv[0] = 'x'; "
          "import tensorflow as tf; "
          "print('own line', file=sys.stderr, flush=True); "
          "import os; os.write(2, b'Improper call to JPEG library in state 201\\n\\t [[{{node x}}]]\\n'"
          " b'after\\n'); "
          "from simvlm_jax import console; console.quiet_python(); "
          "from absl import logging; logging.warning('a library warning'); "
          "from simvlm_jax.metrics import captions; captions._warn_spice_unavailable()")
  quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert quiet.returncode == 0 and quiet.stderr.splitlines() == [
      "own line", "after", f"warning: {captions.SPICE_UNAVAILABLE}"]
  loud = subprocess.run([sys.executable, "-c", code, console.FLAG], capture_output=True,
                        text=True, timeout=120)
  assert "Improper call to JPEG library in state 201" in loud.stderr
  assert len(loud.stderr.splitlines()) > 3
