"""Preemption: SIGTERM / SIGINT end the run at a step every process agrees on, after a checkpoint.

Cloud TPU, GKE and SLURM send SIGTERM some time before they kill a job. The train loop asks
`watcher.reached(step)` after every step; once it says True, the loop saves that step's state and
data position and exits with status 0, and the same command resumes the run.

One process: a Python handler records the signal and the next step boundary is the stop.

Several processes: the signal reaches hosts at different times, and each must save the same step.
JAX's preemption sync manager (started by `jax.distributed.initialize`) does this: its own SIGTERM
handler tells the coordination service, which picks the step after the largest step any process
has reached, and `multihost_utils.reached_preemption_sync_point(step)` turns True on every process
at that step. SIGINT (Ctrl-C) is turned into a SIGTERM to this process, so it takes the same path.

Evaluations: the loop asks `reached` before any evaluation of a step, and a long evaluation asks
`stop_requested()` between its batches (one process: the signal; several: the notice JAX's sync
manager posts in the coordination service, agreed by all), then the loop saves that step.

A second SIGINT interrupts at once (KeyboardInterrupt), for a user who does not want to wait.
"""
import os
import signal
import threading
from typing import Optional

import jax
import jax._src.distributed  # noqa: F401  (the coordination service client)
from absl import logging
from jax.experimental import multihost_utils

from simvlm_jax import distributed


class PreemptionWatcher:
  """Context manager: installs the handlers on entry, restores the previous ones on exit."""

  def __init__(self):
    self.received: Optional[str] = None  # the first signal this process received, e.g. "SIGTERM"
    self._multi = jax.process_count() > 1
    self._previous = {}
    self._notice: Optional[str] = None  # printed by the next `reached`

  def __enter__(self) -> "PreemptionWatcher":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("not in the main thread: SIGTERM/SIGINT will not save a checkpoint")
      return self
    # Several processes: SIGTERM stays with JAX's handler (installed by jax.distributed).
    signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.received == "SIGINT":
      raise KeyboardInterrupt  # the second Ctrl-C
    self.received = self.received or name
    # Printed by the loop's next `reached`, not here: the signal can arrive while the main thread
    # is inside a print to the same stream, and printing again raises "reentrant call".
    self._notice = (f"{name} received: stopping after the step in flight to save a checkpoint"
                    + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""))
    if self._multi and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # hand it to JAX's preemption notifier

  def stop_requested(self) -> bool:
    """Whether a stop was asked for on any process (the same answer on every process; one small
    collective when there are several). Asked between the batches of an evaluation, where the
    loop's `reached` cannot be: JAX's preemption sync point counts train steps only. On several
    processes SIGTERM goes to JAX's notifier, which posts the notice in the coordination service
    for every process to see; that is read here."""
    self._print_notice()
    asked = self.received is not None
    if self._multi and not asked:
      asked = _notice_posted()
    return distributed.any_process(asked)

  def _print_notice(self) -> None:
    if self._notice is not None:
      print(self._notice, flush=True)
      self._notice = None

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (call after every step with increasing steps)."""
    self._print_notice()
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None


# The key JAX's preemption sync manager writes into the coordination service when a process gets
# a preemption notice (xla/pjrt/distributed/preemption): every process can read it at once.
_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def _notice_posted() -> bool:
  # pylint: disable-next=protected-access
  client = getattr(jax._src.distributed.global_state, "client", None)
  if client is None:
    return False
  try:
    client.key_value_try_get(_NOTICE_KEY)
    return True
  except jax.errors.JaxRuntimeError:  # not found (or the service is gone: nothing to act on)
    return False
