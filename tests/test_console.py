"""`simvlm_jax.console`: which stderr lines the quiet console drops, and that it keeps the rest."""
import subprocess
import sys

import pytest

from simvlm_jax import console


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
    (b"error: cannot read image photos/broken.png: Invalid PNG data, size 60\n", False),
    (b"Traceback (most recent call last):\n", False),
    (b"  File \"x.py\", line 1, in <module>\n", False),
])
def test_library_noise(line, noise):
  assert console.is_library_noise(line) == noise


def test_a_command_prints_its_own_lines_only_unless_asked():
  """A command's TensorFlow import and a libjpeg complaint: gone, unless --library_logs."""
  code = ("import sys; sys.argv = ['-m'] + sys.argv[1:]; import simvlm_jax; sys.argv[0] = 'x'; "
          "import tensorflow as tf; "
          "print('own line', file=sys.stderr, flush=True); "
          "import os; os.write(2, b'Improper call to JPEG library in state 201\\n\\t [[{{node x}}]]\\n'"
          " b'after\\n')")
  quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert quiet.returncode == 0 and quiet.stderr.splitlines() == ["own line", "after"]
  loud = subprocess.run([sys.executable, "-c", code, console.FLAG], capture_output=True,
                        text=True, timeout=120)
  assert "Improper call to JPEG library in state 201" in loud.stderr
  assert len(loud.stderr.splitlines()) > 3
