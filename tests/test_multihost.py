"""Multi-process runs: the `simvlm_jax.distributed` settings, and two processes on loopback that
train exactly like one process with the same 8 devices.

The end-to-end case: two `python -m simvlm_jax.train` processes with 4 CPU devices each (coordinator
on 127.0.0.1, settings from SIMVLM_* variables, i.e. `distributed.initialize`) against one process
with 8 devices: same losses step by step, metrics/config written once, and the checkpoint they
write together restores in a single process, onto another mesh, with the same parameters.
"""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

# `train` is imported for its gin configurable `train.*`, which the run's gin files bind.
from simvlm_jax import distributed, gin_utils, train  # noqa: F401
from simvlm_jax.checkpoints import Checkpointer
from simvlm_jax.data import vocab
from simvlm_jax.data.synthetic import SyntheticIterator
from simvlm_jax.models import ModelConfig
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.trainer import Trainer
from conftest import SENTENCES, free_port, pair_env, process_env, write_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
GIN_FILE = "gin/runs/synthetic_tiny.gin"
# text_batch 8 so 8 devices divide both sub-batches; a 1+1 layer, 1-stage model keeps compilation
# short (the loop, sharding and checkpoint code are the same at any size).
BINDINGS = ["SyntheticIterator.text_batch = 8", "ModelConfig.num_encoder_layers = 1",
            "ModelConfig.num_decoder_layers = 1", "ModelConfig.resnet_stage_widths = (32,)",
            "ModelConfig.resnet_stage_blocks = (1,)"]
TIMEOUT_S = 600


# An eval split of 9 examples after the last step: 5 go to process 0 (two batches of 4 rows),
# 4 to process 1 (one batch), which must pad a second step for the collectives to match.
EVAL = ["train.eval_iterator_fn = @eval/SyntheticIterator",
        "eval/SyntheticIterator.num_examples = 9", f"train.eval_every = {STEPS}"]

# The same global batch in two sequential pieces, on another mesh: the same run up to float order.
MICROBATCHES = ["train.num_microbatches = 2", "Partitioner.mesh_shape = (4, 1, 2)"]


def _command(model_dir, extra=()):
  return [sys.executable, "-m", "simvlm_jax.train", "--import_modules=", f"--gin_file={GIN_FILE}",
          f"--gin.train.model_dir='{model_dir}'", f"--gin.train.total_steps={STEPS}",
          f"--gin.train.checkpoint_every={STEPS}", "--gin.train.log_every=1",
          *[f"--gin_bindings={b}" for b in [*BINDINGS, *extra]]]


def _wait_all(procs):
  """Waits for every process; on any failure or timeout kills the rest and fails with the logs."""
  deadline = time.time() + TIMEOUT_S
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=max(deadline - time.time(), 1))
      outputs.append((proc.returncode, out, err))
  except subprocess.TimeoutExpired:
    outputs.append(("timeout", "", ""))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if any(rc != 0 for rc, _, _ in outputs):
    pytest.fail("\n\n".join(f"rc={rc}\n{out[-3000:]}\n{err[-5000:]}" for rc, out, err in outputs))
  return [out for _, out, _ in outputs]


def _scalars(model_dir):
  """{tag: {step: value}} from the run's single TensorBoard events file."""
  files = glob.glob(os.path.join(model_dir, "events.out.tfevents.*"))
  assert len(files) == 1, files  # only process 0 writes metrics.
  out = {}
  for event in event_file_loader.EventFileLoader(files[0]).Load():
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == "scalars":
        out.setdefault(value.tag, {})[event.step] = float(tensor_util.make_ndarray(value.tensor))
  return out


def _progress_steps(stdout):
  return [int(line.split()[1].split("/")[0]) for line in stdout.splitlines()
          if re.match(r"step \d+/", line)]


def _loop_position(step_dir, pid):
  """The data position process `pid` saved in a checkpoint: the loop's, i.e. the iterator's less
  the batches the device prefetcher had read ahead (saved beside it, replayed first on resume)."""
  with open(os.path.join(step_dir, "data", f"process_{pid}.json")) as f:
    position = json.load(f)["position"]
  with np.load(os.path.join(step_dir, "data", f"process_{pid}.pending.npz")) as held:
    return position - int(held["count"])


def _model_config():
  gin.clear_config()
  try:
    gin_utils.parse_gin([GIN_FILE], BINDINGS, search_paths=[REPO])
    return ModelConfig()
  finally:
    gin.clear_config()


def _restore(model_dir, trainer):
  """The train state alone: a 2-process run's data positions cannot be resumed by 1 process."""
  return Checkpointer(os.path.join(model_dir, "checkpoints")).restore(trainer.abstract_state)


def _start_pair(model_dir, address, extra=()):
  """The two processes of a 2-process run on loopback, stdout to files (read while they run)."""
  procs = []
  for pid in range(2):
    env = pair_env(4, address, pid)
    os.makedirs(model_dir, exist_ok=True)
    out = open(os.path.join(os.path.dirname(model_dir), f"{os.path.basename(model_dir)}_{pid}.out"),
               "w+")
    procs.append(subprocess.Popen(_command(model_dir, extra), cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, text=True))
    procs[-1].log = out
  return procs


def _wait_pair(procs):
  for proc in procs:
    try:
      proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
  logs = []
  for proc in procs:
    proc.log.seek(0)
    logs.append(proc.log.read())
  if any(proc.returncode != 0 for proc in procs):
    pytest.fail("\n\n".join(f"rc={p.returncode}\n{log[-5000:]}" for p, log in zip(procs, logs)))
  return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One process with 8 devices and two with 4 each, the same run (with an eval at the end); the
  two-process run takes each step in two microbatches on a data 4 x model 2 mesh."""
  tmp = tmp_path_factory.mktemp("runs")
  single, multi = str(tmp / "single"), str(tmp / "multi")
  procs = [subprocess.Popen(_command(single, EVAL), cwd=REPO, env=process_env(8),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
  single_out, = _wait_all(procs)
  multi_out0, multi_out1 = _wait_pair(_start_pair(multi, f"127.0.0.1:{free_port()}",
                                                     [*EVAL, *MICROBATCHES]))
  return single, multi, (single_out, multi_out0, multi_out1)


@pytest.mark.slow
def test_two_processes_match_one(runs):
  single, multi, (single_out, multi_out0, multi_out1) = runs
  # Console, metrics and gin files come from process 0 only.
  assert _progress_steps(single_out) == list(range(1, STEPS + 1))
  assert _progress_steps(multi_out0) == list(range(1, STEPS + 1))
  assert _progress_steps(multi_out1) == []
  for name in ("config.gin", "operative_config.gin"):
    assert os.path.isfile(os.path.join(multi, name))
  with open(os.path.join(multi, "operative_config.gin")) as f:
    assert "train.num_microbatches = 2" in f.read()  # the pieces were really taken

  expected, got = _scalars(single), _scalars(multi)
  for tag in ("loss", "accuracy", "grad_norm", "learning_rate", "image_text/loss", "text/loss"):
    assert sorted(got[tag]) == list(range(1, STEPS + 1)), tag
    np.testing.assert_allclose([got[tag][s] for s in sorted(got[tag])],
                               [expected[tag][s] for s in sorted(expected[tag])], rtol=1e-5,
                               err_msg=tag)
  assert got["loss"][STEPS] < got["loss"][1] - 0.1  # it trained: the comparison is not vacuous.

  # Uneven eval shards: every example counted once, no step missing on the shorter shard.
  assert got["eval/examples"] == expected["eval/examples"] == {STEPS: 9.0}
  for tag in ("eval/loss", "eval/accuracy"):
    np.testing.assert_allclose(got[tag][STEPS], expected[tag][STEPS], rtol=1e-5, err_msg=tag)

  # Both processes wrote their shards and their iterator position into the same step directory:
  # the loop's position, the iterator's less the batches the prefetcher had read ahead (saved).
  step_dir = os.path.join(multi, "checkpoints", str(STEPS))
  for pid in range(2):
    assert _loop_position(step_dir, pid) == STEPS
    assert os.path.isdir(os.path.join(step_dir, "state", f"ocdbt.process_{pid}"))

  # One process, another mesh (data 2 x fsdp 2 x model 2): the 2-process checkpoint restores to the
  # parameters the 1-process run reached.
  trainer = Trainer(_model_config(), Partitioner(mesh_shape=(2, 2, 2)), STEPS)
  state, reference = _restore(multi, trainer), _restore(single, trainer)
  assert int(state.step) == STEPS
  # Really resharded: the runs' fsdp axes were 1 wide; here the table is split 2 x 2.
  assert state.params["token_embed"]["embedding"].sharding.spec == P("model", "fsdp")
  got_params, expected_params = jax.device_get(state.params), jax.device_get(reference.params)
  assert len(jax.tree.leaves(got_params)) > 10
  initial = jax.device_get(trainer.init_state().params)
  # Microbatches and the model axis sum in another order, and Adam's normalised update turns the
  # rounding of near-zero gradients into parameter differences of up to about 1e-4 after 12 steps:
  # every tensor must land within 1% of the distance it travelled from its initial value.
  def close(path, got, want, start):
    travelled = np.linalg.norm(want - start)
    assert np.linalg.norm(got - want) <= 0.01 * travelled + 1e-7, jax.tree_util.keystr(path)
  jax.tree_util.tree_map_with_path(close, got_params, expected_params, initial)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(got_params),
                                                     jax.tree.leaves(initial)))


@pytest.mark.slow
def test_predict_in_two_processes_matches_one(tmp_path, tiny_config):
  """predict --mesh over the 8 devices of two processes: every process reads every image, the
  rows of each batch are split over all devices, process 0 prints what one device prints."""
  model_dir, _ = write_run(tmp_path, tiny_config, vocab.train_sentencepiece(
      SENTENCES, 300, "a", directory=str(tmp_path)))
  gin.clear_config()
  photos = tmp_path / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):  # 5 images in a batch of 8 rows: padding rows too
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(photos / f"{i}.png")
  command = [sys.executable, "-m", "simvlm_jax.predict", f"--checkpoint_dir={model_dir}",
             f"--image={photos}", "--format=json", "--max_decode_length=5", "--batch_size=8"]
  pipe = dict(cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  single, = _wait_all([subprocess.Popen(command, env=process_env(1), **pipe)])
  address = f"127.0.0.1:{free_port()}"
  out0, out1 = _wait_all([subprocess.Popen(
      [*command, "--mesh=-1,1,1"], **pipe,
      env=pair_env(4, address, pid)) for pid in range(2)])
  want, got = ([json.loads(line) for line in out.splitlines()] for out in (single, out0))
  assert out1 == "" and len(got) == len(want) == 5
  assert [g["image"] for g in got] == [w["image"] for w in want]
  assert [g["prediction"] for g in got] == [w["prediction"] for w in want]
  np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], rtol=1e-4,
                             atol=1e-5)


def test_eval_shards_are_uneven_and_keep_every_example_at_its_global_row():
  kw = dict(image_text_batch=8, text_batch=8, num_examples=9)
  single = list(SyntheticIterator(**kw))
  hosts = [list(SyntheticIterator(**kw, shard_index=i, num_shards=2)) for i in range(2)]
  assert len(single) == 2 and [len(h) for h in hosts] == [2, 1]
  tokens = lambda batch: batch["image_text"]["text_tokens"]  # noqa: E731
  np.testing.assert_array_equal(np.concatenate([tokens(hosts[0][0]), tokens(hosts[1][0])]),
                                tokens(single[0]))
  np.testing.assert_array_equal(tokens(hosts[0][1])[:1], tokens(single[1])[:1])
  assert tokens(single[1])[:1].any() and not tokens(hosts[0][1])[1:].any()  # padding rows
  assert not tokens(single[1])[1:].any()


# `simvlm_jax.distributed.resolve`: environment in, `jax.distributed.initialize` arguments out.

SLURM_GPU_TASK = {"SLURM_JOB_ID": "12345", "SLURM_STEP_NUM_TASKS": "16",
                  "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[007-008]",
                  "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
                  "SLURM_JOB_NODELIST": "gpu[007-008]"}
DEACTIVATE = {"cluster_detection_method": "deactivate"}  # all known: no JAX auto-detection.


def test_resolve_plain_run_is_single_process():
  assert distributed.resolve({}) is None
  assert distributed.resolve({"PATH": "/usr/bin", "TPU_WORKER_HOSTNAMES": "localhost"}) is None
  # One SLURM task (e.g. `sbatch -n1`, or an salloc shell) is one process too.
  assert distributed.resolve({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                              "SLURM_JOB_NODELIST": "n1"}) is None


def test_resolve_explicit_environment_and_flags():
  env = {"SIMVLM_COORDINATOR_ADDRESS": "10.0.0.2:1234", "SIMVLM_NUM_PROCESSES": "4",
         "SIMVLM_PROCESS_ID": "3", "SIMVLM_LOCAL_DEVICE_IDS": "0, 2"}
  assert distributed.resolve(env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                      "process_id": 3, "local_device_ids": [0, 2], **DEACTIVATE}
  # Flags win over the environment, field by field.
  assert distributed.resolve(env, process_id=0, local_device_ids="5") == {
      "coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 0,
      "local_device_ids": [5], **DEACTIVATE}
  assert distributed.resolve({}, coordinator_address="h:1", num_processes=2, process_id=1) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1, **DEACTIVATE}


@pytest.mark.parametrize("env, flag_values, message", [
    ({"SIMVLM_COORDINATOR_ADDRESS": "h:1"}, {}, "['num_processes', 'process_id']"),
    ({"SIMVLM_NUM_PROCESSES": "2", "SIMVLM_PROCESS_ID": "0"}, {}, "['coordinator_address']"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "not in [0, "),
    ({}, {"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "not in [0, "),
    ({}, {"coordinator_address": "host", "num_processes": 2, "process_id": 0}, "host:port"),
    ({"SIMVLM_NUM_PROCESSES": "two"}, {}, "num_processes must be an integer"),
    ({"SIMVLM_LOCAL_DEVICE_IDS": "0,x"}, {"coordinator_address": "h:1", "num_processes": 2,
                                          "process_id": 0}, "local_device_ids must be an integer"),
    ({"SIMVLM_PROCESS_ID": "0"}, {"mode": "off"}, "contradicts"),
    ({**SLURM_GPU_TASK, "SIMVLM_NUM_PROCESSES": "8"}, {}, "contradicts the SLURM step's 16"),
    ({**SLURM_GPU_TASK, "SIMVLM_PROCESS_ID": "0"}, {}, "contradicts the SLURM step's 9"),
    ({**SLURM_GPU_TASK, "SLURM_STEP_NODELIST": "gpu[007-008"}, {}, "cannot parse"),
    ({}, {"mode": "sometimes"}, "must be one of"),
])
def test_resolve_rejects_inconsistent_settings(env, flag_values, message):
  with pytest.raises(ValueError) as error:
    distributed.resolve(env, **flag_values)
  assert message in str(error.value)


def test_resolve_slurm_step():
  port = 61440 + 12345 % 4096
  # 8 tasks per node: one GPU each, the task's local id.
  assert distributed.resolve(SLURM_GPU_TASK) == {
      "coordinator_address": f"gpu007:{port}", "num_processes": 16, "process_id": 9,
      "local_device_ids": [1], **DEACTIVATE}
  # One task per node drives all of the node's GPUs: no device restriction.
  per_node = {**SLURM_GPU_TASK, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "0"}
  assert distributed.resolve(per_node) == {"coordinator_address": f"gpu007:{port}",
                                           "num_processes": 2, "process_id": 1, **DEACTIVATE}
  # The launcher's coordinator (from `scontrol show hostnames`), its port, and explicit device ids
  # win; the job-level variables stand in for missing step ones.
  job_level = {k: v for k, v in SLURM_GPU_TASK.items() if not k.startswith("SLURM_STEP_")}
  job_level.update(SLURM_JOB_NUM_NODES="2", SIMVLM_COORDINATOR_PORT="4000")
  assert distributed.resolve(job_level)["coordinator_address"] == "gpu007:4000"
  assert distributed.resolve({**SLURM_GPU_TASK, "SIMVLM_COORDINATOR_ADDRESS": "ib-gpu007:5000",
                              "SIMVLM_NUM_PROCESSES": "16", "SIMVLM_LOCAL_DEVICE_IDS": "3"}) == {
      "coordinator_address": "ib-gpu007:5000", "num_processes": 16, "process_id": 9,
      "local_device_ids": [3], **DEACTIVATE}


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("h2,h1", "h2"), ("node[003-010,012],gpu7", "node003"),
    ("gpu[12,3-5]", "gpu12"), ("rack[1-2]-n[07-08],x", "rack1-n07"), ("a-b-[9-10]", "a-b-9"),
])
def test_first_slurm_host(nodelist, host):
  assert distributed.first_slurm_host(nodelist) == host


def test_resolve_modes_auto_and_off_and_tpu_pods():
  pod = {"TPU_WORKER_HOSTNAMES": "10.1.0.1,10.1.0.2,10.1.0.3,10.1.0.4", "TPU_WORKER_ID": "2"}
  assert distributed.resolve(pod) == {}  # JAX reads the slice from the TPU metadata itself.
  assert distributed.resolve({}, mode="auto") == {}
  assert distributed.resolve({"SIMVLM_NUM_PROCESSES": "4"}, mode="auto",
                             local_device_ids="0") == {"num_processes": 4, "local_device_ids": [0]}
  assert distributed.resolve(pod, mode="off") is None
  assert distributed.resolve(SLURM_GPU_TASK, mode="off") is None


def test_initialize_calls_jax_once_with_the_resolved_arguments(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  assert distributed.initialize(env={}) is None  # single process: JAX is not touched.
  assert calls == []
  env = {"SIMVLM_COORDINATOR_ADDRESS": "127.0.0.1:9", "SIMVLM_NUM_PROCESSES": "2",
         "SIMVLM_PROCESS_ID": "1"}
  expected = {"coordinator_address": "127.0.0.1:9", "num_processes": 2, "process_id": 1,
              **DEACTIVATE}
  assert distributed.initialize(env=env) == expected
  assert distributed.initialize(env=env) is None  # already initialized: idempotent.
  assert calls == [expected]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(runs, tmp_path):
  """The signal reaches one host only: both save the same step and exit 0, and the restarted pair
  ends with the parameters of the uninterrupted 2-process run, bit for bit."""
  _, reference, _ = runs
  model_dir = str(tmp_path / "preempted")
  procs = _start_pair(model_dir, f"127.0.0.1:{free_port()}", MICROBATCHES)  # as the reference
  deadline = time.time() + TIMEOUT_S
  while True:  # SIGTERM to process 1 once process 0 has logged step 2.
    procs[0].log.seek(0)
    if 2 in _progress_steps(procs[0].log.read()):
      break
    assert procs[0].poll() is None and time.time() < deadline, "the run did not reach step 2"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  log0, log1 = _wait_pair(procs)
  stops = [re.search(r"stopped by (.+) after step (\d+): saved checkpoint (\d+)", log)
           for log in (log0, log1)]
  assert stops[0] is not None and stops[1] is None, log0  # process 0 alone prints
  assert stops[0].group(1) == "a preemption notice"  # process 0 never got the signal itself
  step = int(stops[0].group(2))
  assert 2 <= step < STEPS and int(stops[0].group(3)) == step
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [str(step)]
  for pid in range(2):
    assert _loop_position(os.path.join(model_dir, "checkpoints", str(step)), pid) == step

  log0, _ = _wait_pair(_start_pair(model_dir, f"127.0.0.1:{free_port()}", MICROBATCHES))
  assert f"resumed from checkpoint {step}" in log0
  assert _progress_steps(log0) == list(range(step + 1, STEPS + 1))
  trainer = Trainer(_model_config(), Partitioner(mesh_shape=(-1, 1, 1)), STEPS)
  got, expected = _restore(model_dir, trainer), _restore(reference, trainer)
  assert int(got.step) == STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params),
               jax.device_get(expected.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.opt_state),
               jax.device_get(expected.opt_state))
