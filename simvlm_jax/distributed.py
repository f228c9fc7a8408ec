"""Multi-process start-up: `jax.distributed.initialize` from flags or the launcher's environment.

Every process of a run calls `initialize()` before touching JAX. Where the settings come from, per
field (coordinator address, number of processes, this process's id): a flag, else a `SIMVLM_*`
environment variable, else the SLURM job step. In detail:

  --jax_distributed=off   never initialize (a single process, whatever the environment says).
  --jax_distributed=auto  `jax.distributed.initialize()` detects the cluster itself (Cloud TPU VM
                          pods, SLURM, Open MPI); the fields given explicitly still win.
  --jax_distributed=env   (default) explicit fields, completed from a SLURM step with more than one
                          task; on a Cloud TPU pod (TPU_WORKER_HOSTNAMES lists several hosts) and
                          nothing explicit, as `auto`; with none of these, a plain single-process
                          run: nothing to do.

  field        flag                   environment                 SLURM step (srun)
  coordinator  --coordinator_address  SIMVLM_COORDINATOR_ADDRESS  first node of the step, port
                                                                  SIMVLM_COORDINATOR_PORT (default
                                                                  derived from SLURM_JOB_ID)
  processes    --num_processes        SIMVLM_NUM_PROCESSES        SLURM_STEP_NUM_TASKS
  process id   --process_id           SIMVLM_PROCESS_ID           SLURM_PROCID
  devices      --local_device_ids     SIMVLM_LOCAL_DEVICE_IDS     [SLURM_LOCALID] when a node runs
                                                                  several tasks (one GPU each)

`resolve()` is the pure part (environment in, keyword arguments out) and is what the tests check.
"""
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from simvlm_jax.errors import UserError, one_line

MODES = ("env", "auto", "off")

# Defined here rather than in gin_utils.define_flags: every entry point that calls `initialize()`
# imports this module once, so the flags exist exactly when they can be used.
_MODE = flags.DEFINE_enum("jax_distributed", "env", MODES,
                          "How to start jax.distributed: from flags/SIMVLM_*/SLURM variables "
                          "(env), JAX's own cluster detection (auto), or never (off).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_LOCAL_DEVICE_IDS = flags.DEFINE_string("local_device_ids", None,
                                        "Comma-separated local accelerator ids this process uses.")

# JAX's own SLURM default: a port in the ephemeral range picked by the job id, so every task of a
# job agrees on it without talking, and two jobs sharing a node rarely collide.
_SLURM_PORT_BASE, _SLURM_PORT_RANGE = 65536 - 4096, 4096


def _int(value: Any, name: str) -> Optional[int]:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _device_ids(value: Any, name: str) -> Optional[List[int]]:
  if value is None or value == "":
    return None
  if isinstance(value, (list, tuple)):
    return [_int(v, name) for v in value]
  return [_int(v.strip(), name) for v in str(value).split(",")]


def first_slurm_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist, as `scontrol show hostnames | head -1` prints it.

  "node[003-010,012],gpu7" -> "node003"; "rack[1-2]-n[07-08]" -> "rack1-n07"; "h1,h2" -> "h1".
  """
  first, depth = "", 0
  for ch in nodelist.strip():
    if ch == "," and depth == 0:
      break
    depth += {"[": 1, "]": -1}.get(ch, 0)
    first += ch
  # Each bracket group holds ranges and single ids; its first member is the first id before any
  # ',' or '-' (zero padding kept, as SLURM keeps it).
  host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)
  if not host or "[" in host or "]" in host:
    raise ValueError(f"cannot parse the SLURM node list {nodelist!r}")
  return host


def _slurm_step(env: Mapping[str, str]) -> Optional[Dict[str, Any]]:
  """Settings of a SLURM job step with more than one task, else None.

  srun sets the SLURM_STEP_* variables; the job-level ones stand in where those are missing.
  """
  if "SLURM_PROCID" not in env:
    return None
  tasks = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"), "SLURM_NTASKS")
  if tasks is None or tasks <= 1:
    return None
  nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
  if not nodelist:
    raise ValueError("SLURM step with several tasks but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
  port = _int(env.get("SIMVLM_COORDINATOR_PORT"), "SIMVLM_COORDINATOR_PORT")
  if port is None:
    job_id = _int(env.get("SLURM_JOB_ID"), "SLURM_JOB_ID")
    if job_id is None:
      raise ValueError("set SIMVLM_COORDINATOR_PORT (no SLURM_JOB_ID to derive a port from)")
    port = _SLURM_PORT_BASE + job_id % _SLURM_PORT_RANGE
  nodes = _int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES")
               or env.get("SLURM_NNODES"), "SLURM_STEP_NUM_NODES") or 1
  local_id = _int(env.get("SLURM_LOCALID"), "SLURM_LOCALID")
  return {"coordinator_address": f"{first_slurm_host(nodelist)}:{port}",
          "num_processes": tasks,
          "process_id": _int(env["SLURM_PROCID"], "SLURM_PROCID"),
          # Several tasks on a node: one device each (the sbatch template's one-process-per-GPU).
          "local_device_ids": [local_id] if tasks > nodes and local_id is not None else None}


def _is_tpu_pod(env: Mapping[str, str]) -> bool:
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1


def resolve(env: Mapping[str, str], mode: str = "env", coordinator_address: Optional[str] = None,
            num_processes: Optional[int] = None, process_id: Optional[int] = None,
            local_device_ids: Any = None) -> Optional[Dict[str, Any]]:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run.

  Args:
    env: the environment (e.g. `os.environ`).
    mode: "env", "auto" or "off" (see the module docstring).
    coordinator_address, num_processes, process_id, local_device_ids: flag values (None: unset);
      `local_device_ids` is a list or a comma-separated string.
  Raises:
    ValueError: settings that are incomplete, malformed or contradict each other.
  """
  if mode not in MODES:
    raise ValueError(f"jax_distributed must be one of {MODES}, got {mode!r}")
  explicit = {
      "coordinator_address": coordinator_address or env.get("SIMVLM_COORDINATOR_ADDRESS") or None,
      "num_processes": _int(num_processes if num_processes is not None
                            else env.get("SIMVLM_NUM_PROCESSES"), "num_processes"),
      "process_id": _int(process_id if process_id is not None else env.get("SIMVLM_PROCESS_ID"),
                         "process_id"),
  }
  local = _device_ids(local_device_ids if local_device_ids is not None
                      else env.get("SIMVLM_LOCAL_DEVICE_IDS"), "local_device_ids")
  given = {k: v for k, v in explicit.items() if v is not None}
  if mode == "off":
    if given or local is not None:
      raise ValueError(f"--jax_distributed=off contradicts the distributed settings {given} "
                       f"(local_device_ids={local})")
    return None
  if mode == "auto":
    return {**given, **({"local_device_ids": local} if local is not None else {})}

  slurm = _slurm_step(env)
  if slurm is not None:
    for key in ("num_processes", "process_id"):
      if key in given and given[key] != slurm[key]:
        raise ValueError(f"{key}={given[key]} (flag or SIMVLM_*) contradicts the SLURM step's "
                         f"{slurm[key]}")
    settings = {**slurm, **given}
    if local is not None:
      settings["local_device_ids"] = local
  elif not given:
    # Nothing explicit: a Cloud TPU pod (JAX reads the rest from the TPU metadata) or one process.
    return {} if _is_tpu_pod(env) else None
  else:
    settings = {**given, "local_device_ids": local}

  missing = [k for k in explicit if settings.get(k) is None]
  if missing:
    raise ValueError(f"multi-process run needs {missing} too (flags --{' --'.join(missing)} or "
                     f"SIMVLM_* variables); got {given}")
  address, n, pid = (settings[k] for k in explicit)
  if not re.fullmatch(r".+:\d+", address):
    raise ValueError(f"coordinator address must be host:port, got {address!r}")
  if n < 1 or not 0 <= pid < n:
    raise ValueError(f"process_id={pid} is not in [0, num_processes={n})")
  settings = {k: v for k, v in settings.items() if v is not None}
  # Everything is known: stop JAX's own detection from overriding it (under SLURM it would pin one
  # device per process even when one process drives a whole node).
  settings["cluster_detection_method"] = "deactivate"
  return settings


def _flag_values() -> Dict[str, Any]:
  """The flags, or their defaults when absl has not parsed a command line (library use)."""
  if not flags.FLAGS.is_parsed():
    return {}
  return {"mode": _MODE.value, "coordinator_address": _COORDINATOR.value,
          "num_processes": _NUM_PROCESSES.value, "process_id": _PROCESS_ID.value,
          "local_device_ids": _LOCAL_DEVICE_IDS.value}


def initialize(env: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, Any]]:
  """Starts `jax.distributed` if this run has several processes; returns the arguments used.

  Call before any JAX computation. A no-op (returns None) for a single-process run and when
  `jax.distributed` is already initialized, so calling it twice is safe.
  """
  if jax.distributed.is_initialized():
    return None
  try:
    kwargs = resolve(os.environ if env is None else env, **_flag_values())
  except ValueError as e:
    raise UserError(f"distributed settings: {one_line(e)}") from e
  if kwargs is None:
    return None
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:  # e.g. the coordinator cannot be reached in time
    raise UserError(f"jax.distributed.initialize({kwargs}) failed: {one_line(e)}") from e
  logging.info("jax.distributed: process %d of %d (%s)", jax.process_index(), jax.process_count(),
               kwargs)
  return kwargs


# Agreement between processes. Every process of a run must enter the same collectives in the same
# order: a decision that one host takes alone (an unreadable file, a refused setting, a preemption
# notice) goes through one of these before anyone acts on it.

def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process gets the same answer)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def all_processes(flag: bool) -> bool:
  """Whether `flag` holds on every process (every process gets the same answer)."""
  return not any_process(not flag)


def all_processes_mask(mask: np.ndarray) -> np.ndarray:
  """Elementwise AND of a bool `[n]` mask over processes (same `n` everywhere)."""
  mask = np.asarray(mask, bool)
  if jax.process_count() == 1:
    return mask
  return np.all(multihost_utils.process_allgather(mask.astype(np.int32)), axis=0).astype(bool)


T = TypeVar("T")


def refuse_together(fn: Callable[[], T]) -> T:
  """Runs `fn` on every process; a UserError on any one of them is raised on all of them.

  A refusal that one host reaches alone (it alone reads a file that changed, say) must not leave
  the others waiting in the next collective until the coordination service times out: the
  processes exchange their first error lines, and each raises the lowest process's.
  """
  try:
    result, error = fn(), None
  except UserError as e:
    result, error = None, e
  for pid, message in enumerate(gather_json(None if error is None else one_line(error))):
    if message is not None:
      if pid == jax.process_index():
        raise error
      raise UserError(f"{message} (process {pid})")
  return result


def gather_json(obj: Any) -> List[Any]:
  """Every process's JSON-serialisable `obj`, in process order, on every process (e.g. the
  predictions of a host-sharded evaluation: text, not arrays, so they travel as bytes)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:size]).decode("utf-8")) for row, size in zip(rows, sizes)]


def broadcast_json(obj: Any) -> Any:
  """Process 0's JSON-serialisable `obj` on every process (the others' `obj` is ignored)."""
  if jax.process_count() == 1:
    return obj
  return gather_json(obj if jax.process_index() == 0 else None)[0]
