"""The train loop's progress: a console line and TensorBoard scalars per window of steps.

Loss, accuracy, learning rate and gradient norm averaged over the window, examples/s, tokens/s,
the step time and the MFU it implies, the data pipeline's counters, and an ETA. The window's
metrics are read from the device one step late, so logging never leaves the device idle.
"""
import time
from typing import Any, Callable, Tuple

import jax
import numpy as np

from simvlm_jax import flops
from simvlm_jax.models import ModelConfig
from simvlm_jax.nonfinite import NONFINITE


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_TOKEN_KEYS = ("text_tokens", "prefix_tokens", "target_tokens")  # pretraining / finetuning rows


def _count_tokens(batch: Any) -> int:
  """Real (non-pad) text tokens of a host batch (for tokens/s)."""
  return int(sum(np.count_nonzero(sub[k]) for sub in batch.values() for k in _TOKEN_KEYS
                 if k in sub))


def _count_rows(batch: Any) -> int:
  return sum(next(sub[k] for k in _TOKEN_KEYS if k in sub).shape[0] for sub in batch.values())


class ProgressLog:
  """The console line and TensorBoard scalars of each `log_every` window of steps.

  A window's metrics are read from the device at the next `flush`, which the loop calls once the
  following step is dispatched, so logging never leaves the device idle. Throughput counts the
  time between the reads of consecutive windows, each read waiting for the window's last step.
  """

  def __init__(self, writer: Any, log: Callable[[str], None], data: Any, start: int, end: int,
               total_steps: int):
    self.writer, self.log, self.data = writer, log, data
    self.end, self.total_steps = end, total_steps
    self.step_flops = self.peak = None  # set by `measure_against`
    self.metrics, self.examples, self.tokens = [], 0, 0
    self.closed = None  # (step, metrics, examples, tokens) of a window waiting to be read
    self.window_start = self.run_start = time.time()
    self.first_timed_step = start

  def measure_against(self, step_flops: float, peak: float, peak_name: str) -> None:
    """Model FLOPs of a step and the peak FLOP/s of all devices: MFU goes to TensorBoard as
    `perf/mfu_<peak_name>`."""
    self.step_flops, self.peak, self.peak_name = step_flops, peak, peak_name

  def add(self, metrics: dict, batch: Any) -> None:
    self.metrics.append(metrics)
    self.examples += _count_rows(batch)
    self.tokens += _count_tokens(batch)

  def compiled(self, step: int) -> None:
    """The first step has been dispatched (compiled): the ETA counts from here."""
    self.first_timed_step, self.run_start = step, time.time()

  def close_window(self, step: int) -> None:
    self.flush()
    self.closed = (step, self.metrics, self.examples, self.tokens)
    self.metrics, self.examples, self.tokens = [], 0, 0

  def flush(self) -> None:
    if self.closed is None:
      return
    done, metrics, examples, tokens = self.closed
    self.closed = None
    fetched = jax.device_get(metrics)
    now = time.time()
    elapsed = max(now - self.window_start, 1e-9)
    self.window_start = now
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]
               if k not in NONFINITE}
    scalars["nonfinite_steps"] = float(sum(max(m[k] for k in NONFINITE) for m in fetched))
    steps = len(fetched)
    scalars.update({"examples_per_s": examples / elapsed * jax.process_count(),
                    "tokens_per_s": tokens / elapsed * jax.process_count(),
                    "perf/step_time_s": elapsed / steps})
    if self.step_flops and self.peak:
      scalars[f"perf/mfu_{self.peak_name}"] = self.step_flops * steps / elapsed / self.peak
    scalars.update({f"data/{k}": v for k, v in self.data.counters().items()})
    self.writer.write_scalars(done, scalars)
    rate = (now - self.run_start) / max(done - self.first_timed_step, 1)
    self.log(f"step {done}/{self.total_steps} | loss {scalars['loss']:.4f} | "
             f"acc {scalars['accuracy']:.3f} | lr {scalars['learning_rate']:.2e} | "
             f"gnorm {scalars['grad_norm']:.2f} | {scalars['examples_per_s']:.1f} ex/s | "
             f"{scalars['tokens_per_s']:.0f} tok/s | eta {_format_eta(rate * (self.end - done))}")


def peak_flops(config: ModelConfig, log: Callable[[str], None]) -> Tuple[float, str]:
  """Peak FLOP/s of all devices for MFU, and its name: the datasheet bf16 peak of a known
  accelerator, else a float matmul timed here (CPU devices of a host share its cores: one
  measurement per host)."""
  device = jax.devices()[0]
  nominal = flops.nominal_peak(device.device_kind)
  if nominal:
    log(f"MFU against the nominal bf16 peak of {device.device_kind}: {nominal / 1e12:.0f} "
        f"TFLOP/s x {jax.device_count()} devices")
    return nominal * jax.device_count(), "nominal_bf16_peak"
  on_cpu = device.platform == "cpu"
  measured = flops.matmul_peak(config.compute_dtype, 1024 if on_cpu else 4096, repeats=3)
  units = jax.process_count() if on_cpu else jax.device_count()
  log(f"MFU against a {config.dtype} matmul peak measured here: {measured / 1e12:.3f} TFLOP/s x "
      f"{units} {'hosts' if on_cpu else 'devices'}")
  return measured * units, "measured_peak"


