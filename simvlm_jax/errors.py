"""Errors a user can fix, and how the command lines report them.

Long runs meet user mistakes (a misspelt gin binding, a mesh that does not fit the devices, a task
that is not registered, data that is not there, a checkpoint of another model), damaged files and
divergence. Each ends a command with one line `error: <what happened and what to change>` on
stderr and exit status 2; `--traceback` shows the full Python traceback instead. Anything else is
a bug and keeps its traceback (exit status 1).
"""
import sys
from typing import Any, Callable, NoReturn

from absl import flags

EXIT_USER_ERROR = 2

_TRACEBACK = flags.DEFINE_bool("traceback", False,
                               "Show the full traceback of an `error: ...` instead of one line.")


class UserError(ValueError):
  """A mistake in the configuration, paths, data or checkpoints that the user can fix.

  A ValueError, so library callers that catch ValueError (and seqio/gin, which re-raise it) keep
  working; the message is one sentence saying what is wrong and what to change.
  """


class CheckpointError(UserError):
  """A checkpoint that cannot be read, or that another model wrote."""


class DataError(UserError):
  """The input data cannot be read (a damaged or missing file; not an undecodable image)."""


class DivergenceError(UserError):
  """Training produced non-finite values and stopped (see `train.nonfinite_policy`)."""


def one_line(error: BaseException) -> str:
  """The first line of an error's message (gin and TensorStore append pages of context)."""
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0].strip()


def report_and_exit(error: BaseException) -> NoReturn:
  print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def run_main(main: Callable[[], Any], multi_process: bool = True) -> None:
  """Runs a command's body, after starting `jax.distributed` when `multi_process` and the run has
  several processes (the command must import `simvlm_jax.distributed`, which defines its flags):
  a UserError becomes one `error:` line and exit status 2; an int the body returns is the exit
  status."""
  try:
    if multi_process:
      from simvlm_jax import distributed  # pylint: disable=import-outside-toplevel
      distributed.initialize()  # before anything touches a device; a no-op for one process
    status = main()
    if isinstance(status, int) and not isinstance(status, bool) and status:
      sys.exit(status)
  except UserError as e:
    if flags.FLAGS.is_parsed() and _TRACEBACK.value:
      raise
    report_and_exit(e)
