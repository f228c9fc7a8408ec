"""Storage faults of checkpoints: which errors pass and which are damage, retries, and quiet.

A pod's storage fails for a moment (a GCS 503, a connection reset) far more often than a file is
damaged. A read is tried again (`Retries`, with backoff) and counts as unreadable only when the
same damage shows twice (`damage`: a missing file, a corrupt one) or every try failed; the reason
says which. When a read fails, Orbax abandons its other reads, whose echoes (tracebacks of closed
event loops, never-retrieved futures) would bury the one line that matters: they are quieted,
and only they. A failed background save's log pages are quieted the same way: the checkpointer
reports it in one line.
"""
import atexit
import dataclasses
import errno
import gc
import logging as logging_std
import re
import sys
import time
import warnings
import zipfile
from typing import Any, Callable, Optional

import gin

from simvlm_jax.errors import CheckpointError, one_line

MISSING, CORRUPT = "missing file", "corrupt"


# Errors that mean "this checkpoint's files are not what was written". Programming errors
# (TypeError, AttributeError, ...) are not among them, so a bug never sets a checkpoint aside.
READ_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError)


def _read_echo(error: Optional[BaseException]) -> bool:
  """Whether `error` is the echo of an abandoned TensorStore read: Orbax's own exception for one
  array (a bare Exception), or a read's callback landing on the closed event loop it was started
  from. Neither is ever raised by a read that succeeded."""
  if type(error) is Exception:  # pylint: disable=unidiomatic-typecheck
    return str(error).startswith("Encountered error while reading array")
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


# Orbax's coroutine that reads one array (orbax/checkpoint/_src/serialization/serialization.py).
_READ_COROUTINE = "_read_array_index_and_device_put"


# asyncio's reports of a task or future that ended with an exception nobody retrieved.
_NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


def quiet_read_echoes() -> None:
  """Drops the echoes of a failed TensorStore read (`_read_echo`).

  When one array of a checkpoint cannot be read, Orbax abandons the other reads; their callbacks
  land on a closed event loop, and their coroutines and tasks, once garbage, each print a
  traceback (thousands for a large model), long after the one error that matters was reported.
  Installed before every checkpoint read, not once one failed: the echoes may arrive while the
  first error is still on its way up (issue #28: a traceback after a recovered restart, now and
  then). It matches the echoes alone, so it hides nothing in a healthy run, nor any other error.
  """
  # A read Orbax had not started yet: Python warns when its coroutine is collected.
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message=f"coroutine '{_READ_COROUTINE}' was never awaited")
  if getattr(sys.unraisablehook, "_simvlm_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _read_echo(unraisable.exc_value):
      previous(unraisable)

  def keep(record):
    error = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().startswith(_NEVER_RETRIEVED) and _read_echo(error))

  hook._simvlm_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
  logging_std.getLogger("asyncio").addFilter(keep)


def after_failed_read() -> None:
  """Collects the abandoned reads while the filters are in place: at interpreter exit (once the
  `sys` module is torn down, Python prints an unraisable error itself) none is left."""
  if not getattr(after_failed_read, "registered", False):
    after_failed_read.registered = True
    atexit.register(gc.collect)


# What Orbax logs (with a traceback) when a save fails: the Checkpointer reports every failed save
# itself, in one line or a CheckpointError (the traceback behind --traceback).
_SAVE_FAILURE_LOGS = ("Handler Commit operations or the Commit callback", "Save Finalize thread",
                      "Checkpointer failed: one or more items may not be finalized")


def quiet_failed_save() -> None:
  """Drops Orbax's own error records of a failed save (see `_SAVE_FAILURE_LOGS`)."""
  logger = logging_std.getLogger("absl")
  if not any(getattr(f, "_simvlm_save_filter", False) for f in logger.filters):
    def keep(record):
      return not any(text in record.getMessage() for text in _SAVE_FAILURE_LOGS)
    keep._simvlm_save_filter = True  # pylint: disable=protected-access
    logger.addFilter(keep)


def root_cause(error: BaseException) -> str:
  """One line for the innermost cause of an error (Orbax wraps TensorStore's message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = one_line(error)
  return text if len(text) <= 300 else text[:297] + "..."


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Retries:
  """How a checkpoint read or write that failed is tried again: `tries` in all, `delay_s` seconds
  before the second try, twice that before the third, and so on (a GCS 503 passes in seconds; a
  restart that gave up on it would set a good checkpoint aside)."""
  tries: int = 4
  delay_s: float = 1.0

  def pause(self, failed: int) -> float:
    """The wait after the `failed`-th failed try (1-based)."""
    return self.delay_s * 2 ** (failed - 1)


# TensorStore's status codes (its messages start with one) that mean the bytes read are not what
# was written; UNAVAILABLE, DEADLINE_EXCEEDED, ... are the storage's and may pass.
_CORRUPT_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "INVALID_ARGUMENT")


_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")


# A file that is there but does not parse (npz: the data iterator's held batches).
_FORMAT_ERRORS = (EOFError, KeyError, UnicodeDecodeError, zipfile.BadZipFile)


# Write errors that no retry cures: say so at once.
PERMANENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def causes(error: BaseException) -> list:
  chain = [error]
  while chain[-1].__cause__ is not None:
    chain.append(chain[-1].__cause__)
  return chain


def damage(error: BaseException) -> Optional[str]:
  """MISSING or CORRUPT when `error` says a checkpoint's files are not what was written (reading
  them again fails the same way); None when the storage itself may have failed for a moment (a
  503, a timeout, a reset connection)."""
  chain = causes(error)
  if any(isinstance(e, FileNotFoundError) for e in chain):
    return MISSING
  text = one_line(chain[-1])
  if text.startswith("NOT_FOUND"):
    return MISSING
  if text.startswith(_CORRUPT_CODES):
    return CORRUPT
  if any(isinstance(e, _FORMAT_ERRORS) for e in chain):
    return CORRUPT
  # A format or structure check (json, msgpack, the tree's metadata); not an OSError's errno.
  if isinstance(chain[-1], ValueError) and not _STATUS.match(text):
    return CORRUPT
  return None


def is_read_error(error: BaseException) -> bool:
  """Whether `error` is a checkpoint read failing (not a bug, which keeps its traceback)."""
  # Orbax raises bare Exceptions for TensorStore read errors.
  bare = type(error) is Exception  # pylint: disable=unidiomatic-typecheck
  return isinstance(error, READ_ERRORS) or bare


def read_with_retries(read: Callable[[], Any], what: str, retries: Retries,
                      log: Callable[[str], None], gone: Callable[[], bool] = lambda: False) -> Any:
  """`read()`, tried again while it fails with a read error that may pass (this process alone).

  Raises `Unreadable` with the reason once the damage reproduces, `gone()` says the checkpoint
  was removed meanwhile, or every try failed.
  """
  kinds = []
  for attempt in range(1, retries.tries + 1):
    try:
      return read()
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not is_read_error(e):
        raise
      error = e
    after_failed_read()
    kinds.append(damage(error))
    if gone():
      raise Unreadable("it was removed while it was read", error)
    if (len(kinds) > 1 and kinds[-1] is not None and kinds[-1] == kinds[-2]) or \
        attempt == retries.tries:
      break
    pause = retries.pause(attempt)
    log(f"{what}: reading failed ({root_cause(error)}); trying again in {pause:g}s "
        f"(try {attempt + 1} of {retries.tries})")
    time.sleep(pause)
  raise Unreadable(unreadable_reason(kinds, error, retries.tries), error)


def unreadable_reason(kinds: list, error: BaseException, tries: int) -> str:
  """Why a checkpoint counts as unreadable: the damage seen twice, or every try failing."""
  if kinds[-1] is not None and len(kinds) > 1 and kinds[-1] == kinds[-2]:
    return f"{kinds[-1]}: {root_cause(error)}"
  return f"failed {len(kinds)} time{'s' if len(kinds) > 1 else ''}: {root_cause(error)}"


class Unreadable(Exception):
  """A checkpoint that could not be read; `reason` is what its log line says."""

  def __init__(self, reason: str, error: BaseException):
    super().__init__(reason)
    self.reason, self.error = reason, error
