"""Divergence: what the loop does after a step whose loss or gradient norm is not finite.

The step itself never applies such an update (`trainer.train_step`); `NonFiniteGuard` applies
`train.nonfinite_policy` to the steps' `nonfinite_*` metrics and stops the run when it must,
naming the last good checkpoint.
"""
from typing import Any, Callable, Optional

import jax

from simvlm_jax import checkpoints
from simvlm_jax.errors import DivergenceError, UserError

# metric -> (what the console calls it, the metric holding its value)
NONFINITE = {"nonfinite_loss": ("loss", "loss"), "nonfinite_grad": ("gradient norm", "grad_norm")}


class NonFiniteGuard:
  """Applies `train.nonfinite_policy` to the steps' `nonfinite_*` metrics, one step behind.

  The step itself never applies a non-finite update (see `trainer.train_step`); this decides
  whether the run goes on. Reading step s's flags after step s + 1 is dispatched keeps the host
  from waiting on the device. While non-finite steps follow each other, `in_streak` is True and
  the loop writes no periodic checkpoint (keep-N would drop good ones for copies of the same
  state).
  """

  def __init__(self, policy: str, max_consecutive: int, checkpointer: checkpoints.Checkpointer,
               log: Callable[[str], None]):
    if policy not in ("skip", "halt"):
      raise UserError(f"train.nonfinite_policy must be 'skip' or 'halt', got {policy!r}")
    if max_consecutive < 1:
      raise UserError(f"train.max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
    self.policy, self.max_consecutive = policy, max_consecutive
    self.ckpt, self.log = checkpointer, log
    self.consecutive = self.total = 0
    self._waiting: Optional[tuple[int, Any]] = None

  @property
  def in_streak(self) -> bool:
    return self.consecutive > 0

  def observe(self, step: int, metrics: dict) -> None:
    """Queues step `step`'s metrics and checks the previous step's."""
    previous = self._waiting
    self._waiting = (step, {k: metrics[k] for k in ("loss", "grad_norm", *NONFINITE)})
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._waiting is not None:
      self._check(*self._waiting)
      self._waiting = None

  def _check(self, step: int, values: dict) -> None:
    values = jax.device_get(values)
    if not any(int(values[k]) for k in NONFINITE):
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    what = " and ".join(f"the {name} ({float(values[metric])})"
                        for key, (name, metric) in NONFINITE.items() if int(values[key]))
    what += " are not finite" if " and " in what else " is not finite"
    if self.policy == "halt":
      self._stop(f"step {step}: {what} (train.nonfinite_policy='halt'); its update was not "
                 "applied", first_bad=step)
    self.log(f"step {step}: {what}: update skipped ({self.consecutive} in a row, "
             f"{self.total} in all)")
    if self.consecutive >= self.max_consecutive:
      first = step - self.consecutive + 1
      self._stop(f"steps {first}-{step}: {self.consecutive} updates in a row had a non-finite "
                 "loss or gradient norm and were skipped (train.max_consecutive_nonfinite)",
                 first_bad=first)

  def _stop(self, what: str, first_bad: int):
    self.ckpt.wait()
    good = [s for s in self.ckpt.all_steps() if s < first_bad]
    where = (f"step {max(good)} ({self.ckpt.directory / str(max(good))})" if good
             else "none (no checkpoint was written before it)")
    raise DivergenceError(f"training diverged: {what}. The last good checkpoint is {where}; "
                          "lower the learning rate or check the data, then resume from it")
