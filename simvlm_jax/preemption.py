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

A second SIGINT interrupts at once (KeyboardInterrupt), for a user who does not want to wait.
"""
import os
import signal
import threading
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils


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

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (call after every step with increasing steps)."""
    if self._notice is not None:
      print(self._notice, flush=True)
      self._notice = None
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None
