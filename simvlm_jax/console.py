"""The console shows the project's own lines; library logging only when asked for.

The commands (`python -m simvlm_jax.train | eval | predict | demo`, `python -m tasks.build`) start
with the libraries' logging off:
- C++ (TensorFlow, XLA): TensorFlow >= 2.16 logs through absl's C++ log, which no environment
  variable silences, so stderr (file descriptor 2) goes through a filter thread that drops its
  INFO and WARNING lines, the "before absl::InitializeLog()" banner, and the cuInit / CUDA error a
  machine without a GPU prints when TensorFlow probes for one. Every other line (our `error:`
  lines, tracebacks, a library's real errors) passes, in order.
- Python (absl, Orbax, TensorFlow, JAX): one root handler that shows the project's own warnings
  (`warning: ...`) and anyone's errors, and drops the libraries' INFO and WARNING records.
`--library_logs` on the command line, or SIMVLM_LIBRARY_LOGS=1, keeps all of it (absl's
`--verbosity` then applies as usual). Errors from the libraries still surface: as exceptions, which
the commands turn into one `error:` line (`--traceback` for the whole story).
"""
import atexit
import logging
import os
import re
import sys
import threading

FLAG = "--library_logs"


def library_logs_wanted() -> bool:
  return FLAG in sys.argv or os.environ.get("SIMVLM_LIBRARY_LOGS", "") not in ("", "0")


# absl C++ log lines: "I0000 00:00:1796321330.668239   29940 port.cc:153] ..." (W, E alike).
_NATIVE_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] (.*)")
_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


# libjpeg's own complaints about a damaged file (the pipeline drops and counts that image).
_LIBJPEG = re.compile(rb"^(Improper call to JPEG library in state \d+|Corrupt JPEG data: |"
                      rb"Premature end of JPEG file)")
# pycocoevalcap's Java tokenizer reports its speed on stderr at every caption scoring.
_PTB_TOKENIZER = re.compile(rb"^PTBTokenizer tokenized \d+ tokens at ")
# Gloo (CPU collectives across processes) prints its connections, on stdout (see `own_stdout`).
_GLOO = re.compile(rb"^\[Gloo\] Rank \d+")


def is_library_noise(line: bytes) -> bool:
  """Whether a stderr line is library logging that the quiet console drops (a dropped log
  message's indented continuation lines are dropped with it, see `quiet_native`)."""
  if (line.startswith(_BANNER) or _LIBJPEG.match(line) or _PTB_TOKENIZER.match(line)
      or _GLOO.match(line)):
    return True
  match = _NATIVE_LINE.match(line)
  if not match:
    return False
  level, message = match.groups()
  return level in (b"I", b"W") or (level == b"E" and (b"cuInit" in message or
                                                      b"CUDA" in message))


def quiet_native() -> None:
  """Before TensorFlow or jaxlib is imported: filters their C++ logging out of stderr."""
  if library_logs_wanted() or getattr(quiet_native, "installed", False):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # what older TensorFlow still honours
  quiet_native.installed = True
  sys.stderr.flush()
  terminal = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)

  def pump() -> None:
    dropping = False
    with os.fdopen(read_end, "rb") as pipe:
      for line in pipe:
        # TensorFlow's op errors continue on indented lines ("\t [[{{node ...}}]]").
        dropping = is_library_noise(line) or (dropping and line[:1] in (b"\t", b" "))
        if not dropping:
          os.write(terminal, line)

  thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
  thread.start()

  @atexit.register
  def _restore() -> None:  # after a final traceback was written: let the filter pass it on
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(terminal, 2)  # closes our write end of the pipe: the filter reads to its end
    thread.join(timeout=5)


def own_stdout() -> None:
  """Keeps stdout for the program's own output: Python's `sys.stdout` keeps the terminal, and file
  descriptor 1, where C++ libraries print (Gloo's connection lines in a multi-process CPU run),
  goes to stderr and its filter. For commands whose stdout is data (`predict --format=json`) or
  the run's own log (`train`, `eval`)."""
  if getattr(own_stdout, "installed", False):
    return
  own_stdout.installed = True
  sys.stdout.flush()
  terminal = os.dup(1)
  os.dup2(2, 1)
  sys.stdout = os.fdopen(terminal, "w", buffering=1)


_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
                      + os.sep for d in ("simvlm_jax", "tasks"))


def is_shown(record: logging.LogRecord) -> bool:
  """Whether the quiet console shows a Python log record: the project's own warnings (a skipped
  file, a missing split) and anyone's errors."""
  return record.levelno >= logging.ERROR or (record.levelno >= logging.WARNING and
                                             record.pathname.startswith(_PROJECT_DIRS))


class _Formatter(logging.Formatter):
  """"warning: ..." / "error: ...", like the commands' own lines (and unlike absl's
  "W1203 12:00:00.0 ... file.py:50]" prefix, which the stderr filter takes for library logging)."""

  def format(self, record: logging.LogRecord) -> str:
    return f"{record.levelname.lower()}: {super().format(record)}"


def quiet_python() -> None:
  """After the command line is parsed (absl sets the verbosity from `--verbosity` then): one
  handler on the root logger that shows only `is_shown` records."""
  if library_logs_wanted():
    return
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  root = logging.getLogger()
  for handler in list(root.handlers):  # absl's, or one a library's basicConfig added
    root.removeHandler(handler)
  handler = logging.StreamHandler(sys.stderr)
  handler.addFilter(is_shown)
  handler.setFormatter(_Formatter("%(message)s"))
  root.addHandler(handler)
  root.setLevel(logging.WARNING)
