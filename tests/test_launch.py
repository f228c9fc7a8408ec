"""The launchers: exact --dry_run commands, and their shell parts run here against stand-ins for the
cluster tools (a fake train process on "TPU workers", fake sbatch/scontrol/srun for SLURM)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import pytest

from launch import slurm, tpu_pod
from simvlm_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = ["--name=simvlm-pod", "--zone=us-central2-b"]
GCLOUD = "gcloud compute tpus tpu-vm"
# A gin string with quotes and a space: it must reach simvlm_jax.train exactly as typed.
MODEL_DIR = "--gin.train.model_dir='gs://bucket/simvlm base'"
RUN_ARGS = ["--gin_file=gin/models/simvlm_base.gin", "--gin_file=gin/pretrain.gin", MODEL_DIR,
            "--gin.Partitioner.mesh_shape=(-1, 4, 1)"]
TRAIN_ARGV = ["-m", "simvlm_jax.train", "--jax_distributed=auto",
              "--gin_file=gin/models/simvlm_base.gin", "--gin_file=gin/pretrain.gin", MODEL_DIR,
              "--gin.Partitioner.mesh_shape=(-1, 4, 1)"]


def _dry_run(capsys, module, argv):
  module.main([*argv, "--dry_run"])
  return capsys.readouterr().out


def test_tpu_create_reuses_or_creates(capsys):
  out = _dry_run(capsys, tpu_pod, ["create", *POD, "--accelerator_type=v4-64", "--project=my-proj",
                                   "--spot"])
  assert out == (
      "# create runs only if describe fails (no slice of that name yet)\n"
      f"{GCLOUD} describe simvlm-pod --zone=us-central2-b --project=my-proj "
      "'--format=value(state)'\n"
      f"{GCLOUD} create simvlm-pod --zone=us-central2-b --project=my-proj "
      "--accelerator-type=v4-64 --version=tpu-ubuntu2204-base --spot\n")


@pytest.mark.parametrize("state, created", [("", True), ("READY", False), ("PREEMPTED", None)])
def test_tpu_create_for_real_against_a_fake_gcloud(tmp_path, monkeypatch, state, created):
  """describe fails (no slice): create; READY: reuse; any other state: refuse."""
  calls = tmp_path / "calls"
  gcloud = tmp_path / "gcloud"
  gcloud.write_text("#!/bin/bash\necho \"$@\" >> \"$FAKE_CALLS\"\n"
                    "if [ \"$3 $4\" = 'tpu-vm describe' ]; then\n"
                    "  [ -n \"$FAKE_STATE\" ] || exit 1; echo \"$FAKE_STATE\"\nfi\n")
  gcloud.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_CALLS", str(calls))
  monkeypatch.setenv("FAKE_STATE", state)
  argv = ["create", *POD, "--accelerator_type=v4-64"]
  if created is None:
    with pytest.raises(SystemExit, match="state PREEMPTED"):
      tpu_pod.main(argv)
  else:
    tpu_pod.main(argv)
  verbs = [line.split()[3] for line in calls.read_text().splitlines()]
  assert verbs == (["describe", "create"] if created else ["describe"])


def test_tpu_setup_installs_on_every_worker(capsys):
  out = _dry_run(capsys, tpu_pod, ["setup", *POD, f"--repo_dir={REPO}", "--archive=/tmp/a.tgz"])
  install = ("sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv && "
             "mkdir -p simvlm_jax && tar -xzf simvlm_jax_src.tar.gz -C simvlm_jax && "
             "cd simvlm_jax && python3.11 -m venv .venv && .venv/bin/pip install -q -U pip && "
             f".venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]=={jax.__version__}'")
  assert out.splitlines() == [
      "tar -czf /tmp/a.tgz --exclude=.git --exclude=.venv --exclude=__pycache__ "
      f"'--exclude=*.egg-info' -C {REPO} .",
      f"{GCLOUD} scp /tmp/a.tgz simvlm-pod:simvlm_jax_src.tar.gz --zone=us-central2-b --worker=all",
      f"{GCLOUD} ssh simvlm-pod --zone=us-central2-b --worker=all "
      + shlex.quote(f"--command={install}")]


def test_tpu_pin_follows_setup_py():
  assert tpu_pod.pinned_jax_version() == jax.__version__  # the TPU build of the jax we test.


def test_tpu_run_starts_the_same_command_on_all_workers(capsys):
  out = _dry_run(capsys, tpu_pod, ["run", *POD, *RUN_ARGS, "--env=TPU_STDERR_LOG_LEVEL=2"])
  train = shlex.join(["env", "TPU_STDERR_LOG_LEVEL=2", ".venv/bin/python", *TRAIN_ARGV])
  script = ("cd simvlm_jax || exit 1; "
            "if [ -f train.pid ] && kill -0 \"$(cat train.pid)\" 2>/dev/null; "
            "then echo \"a run is already going on (pid $(cat train.pid))\" >&2; exit 1; fi; "
            f"setsid nohup {train} > train.log 2>&1 < /dev/null & echo $! > train.pid")
  assert out == (f"{GCLOUD} ssh simvlm-pod --zone=us-central2-b --worker=all "
                 f"{shlex.quote('--command=' + script)}\n")
  # What a shell hands to gcloud, and what the workers' shell then hands to python.
  argv = shlex.split(out)
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "simvlm-pod",
                      "--zone=us-central2-b", "--worker=all"]
  assert argv[8] == "--command=" + script


def test_tpu_logs_stop_delete(capsys):
  assert _dry_run(capsys, tpu_pod, ["logs", *POD, "--worker=3", "--lines=20"]) == (
      f"{GCLOUD} ssh simvlm-pod --zone=us-central2-b --worker=3 "
      "'--command=tail -n 20 -F simvlm_jax/train.log'\n")
  assert _dry_run(capsys, tpu_pod, ["stop", *POD]) == (
      f"{GCLOUD} ssh simvlm-pod --zone=us-central2-b --worker=all "
      "'--command=cd simvlm_jax || exit 1; if [ -f train.pid ]; then "
      "kill -TERM -- \"-$(cat train.pid)\" 2>/dev/null; rm -f train.pid; fi'\n")
  assert _dry_run(capsys, tpu_pod, ["delete", *POD]) == (
      f"{GCLOUD} delete simvlm-pod --zone=us-central2-b --quiet\n")


@pytest.mark.parametrize("argv", [
    ["run", *POD, "--gin.train.total_steps=10"],  # no gin file.
    ["stop", *POD, "--gin.train.total_steps=10"],  # bindings only go with run.
    ["run", *POD, "--gin_file=a.gin", "--gin.train.total_steps", "10"],  # not KEY=VALUE.
    ["run", *POD, "--gin_file=a.gin", "--env=1X=2"],
    ["create", *POD],  # no accelerator type.
    ["delete", "--name=x"],  # no zone.
])
def test_launcher_rejects_bad_command_lines(argv):
  with pytest.raises(SystemExit):
    tpu_pod.main([*argv, "--dry_run"])


def _script_of(capsys, argv):
  """The shell script inside `--command=` of a dry-run gcloud ssh line."""
  return shlex.split(_dry_run(capsys, tpu_pod, argv))[-1].removeprefix("--command=")


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_tpu_run_and_stop_scripts_on_a_fake_worker(tmp_path, capsys):
  """A worker's home: the project with a stand-in python that records its argv, then waits."""
  project = tmp_path / "simvlm_jax"
  (project / ".venv" / "bin").mkdir(parents=True)
  fake = project / ".venv" / "bin" / "python"
  fake.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                  "json.dump([sys.argv[1:], os.environ.get('FOO')], open('argv.json', 'w'))\n"
                  "print('training', flush=True)\ntime.sleep(120)\n")
  fake.chmod(0o755)
  run = _script_of(capsys, ["run", *POD, *RUN_ARGS, "--env=FOO=a b"])
  stop = _script_of(capsys, ["stop", *POD])
  worker = lambda script: subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                                         text=True, timeout=60)
  assert worker(run).returncode == 0  # returns at once: the run is detached.
  pid = int((project / "train.pid").read_text())
  try:
    deadline = time.time() + 60
    while not (project / "argv.json").exists() and time.time() < deadline:
      time.sleep(0.05)
    assert json.loads((project / "argv.json").read_text()) == [TRAIN_ARGV, "a b"]
    assert os.getpgid(pid) == pid  # its own process group, which stop ends.
    second = worker(run)
    assert second.returncode == 1 and "already going on" in second.stderr
    assert worker(stop).returncode == 0
    while _alive(pid) and time.time() < deadline:
      time.sleep(0.05)
    assert not _alive(pid) and not (project / "train.pid").exists()
    assert "training" in (project / "train.log").read_text()
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


SLURM_ARGS = ["--nodes=2", "--partition=gpu", "--account=vlm", "--sbatch_option=--qos=high",
              "--env=NCCL_DEBUG=WARN", *RUN_ARGS[:2], MODEL_DIR, "--gin.train.total_steps=1000000"]


def test_slurm_dry_run_prints_the_script_and_sbatch(capsys):
  out = _dry_run(capsys, slurm, [*SLURM_ARGS, "--workdir=/shared/simvlm_jax"])
  assert out == """\
mkdir -p /shared/simvlm_jax/slurm_logs
cat > /shared/simvlm_jax/slurm_logs/simvlm.sbatch <<'SBATCH_EOF'
#!/bin/bash
# SimVLM training on a SLURM GPU cluster, rendered from launch/slurm_train.sbatch by
# `python -m launch.slurm`, which also submits it.
#
# srun starts 8 task(s) on each node (one per GPU, or one driving all its GPUs).
# Every task runs the same command; simvlm_jax.distributed.initialize() takes its process id and the
# process count from srun's SLURM_PROCID / SLURM_STEP_NUM_TASKS (and, with several tasks per node,
# its GPU from SLURM_LOCALID), and the coordinator address from SIMVLM_COORDINATOR_ADDRESS below.
#SBATCH --job-name=simvlm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=/shared/simvlm_jax/slurm_logs/%x-%j.out
#SBATCH --exclusive
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --partition=gpu
#SBATCH --account=vlm
#SBATCH --qos=high
set -euo pipefail
cd /shared/simvlm_jax
export NCCL_DEBUG=WARN
# XLA's Triton matmul fusion aborted the compile of the Base step on an H200 (jax 0.11.2,
# docs/scaling.md): cuBLAS for the matmuls, unless XLA_FLAGS is given (--env XLA_FLAGS=...).
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}"
# Process 0 runs on the first node of the job and hosts the coordinator there; the port is derived
# from the job id, so jobs sharing a node do not collide. (sed, not head: head would stop reading
# early, and pipefail would turn scontrol's SIGPIPE into a failed job.)
SIMVLM_COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
export SIMVLM_COORDINATOR_ADDRESS="${SIMVLM_COORDINATOR_HOST}:$((61440 + SLURM_JOB_ID % 4096))"

# Preemption: SIGTERM makes every task finish its step, save a checkpoint of it (state and data
# position) and exit 0; the same script run again resumes from there. SLURM sends SIGTERM itself
# when it preempts the job for another one, and requeues it (PreemptMode=REQUEUE). Ahead of the
# time limit it sends SIGUSR1 to this script instead (--signal=B:USR1@...), which passes SIGTERM on
# to the tasks through srun and, once they have saved, requeues the job (same job id, same log).
on_time_limit() {
  echo "simvlm: job ${SLURM_JOB_ID} reaches its time limit soon: stopping the run at a checkpoint"
  kill -TERM "$srun_pid"
  wait "$srun_pid" || true
  echo "simvlm: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_time_limit USR1

srun --kill-on-bad-exit=1 .venv/bin/python -m simvlm_jax.train \\
    --gin_file=gin/models/simvlm_base.gin \\
    --gin_file=gin/pretrain.gin \\
    '--gin.train.model_dir='"'"'gs://bucket/simvlm base'"'"'' \\
    --gin.train.total_steps=1000000 &
srun_pid=$!
wait "$srun_pid"
SBATCH_EOF
sbatch /shared/simvlm_jax/slurm_logs/simvlm.sbatch
"""


def test_slurm_per_node_processes(capsys):
  out = _dry_run(capsys, slurm, ["--nodes=4", "--processes=per_node", "--gpus_per_node=4",
                                 "--job_name=base", "--log_dir=/logs", "--port=7000",
                                 "--signal_seconds=0", "--no-requeue", "--gin_file=a.gin"])
  lines = out.splitlines()
  for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
               "#SBATCH --cpus-per-task=32", "#SBATCH --output=/logs/%x-%j.out",
               'export SIMVLM_COORDINATOR_ADDRESS="${SIMVLM_COORDINATOR_HOST}:7000"']:
    assert line in lines
  assert not any(line.startswith(("#SBATCH --partition", "#SBATCH --account", "export NCCL",
                                  "#SBATCH --signal", "#SBATCH --requeue"))
                 for line in lines)
  assert "scontrol requeue" not in out
  assert lines[0] == "mkdir -p /logs" and lines[-1] == "sbatch /logs/base.sbatch"


def test_slurm_submission_reaches_distributed_initialize(tmp_path, monkeypatch):
  """Submit for real against fake sbatch/scontrol/srun; feed what srun got to `resolve`."""
  bin_dir, workdir = tmp_path / "bin", tmp_path / "checkout"
  bin_dir.mkdir()
  workdir.mkdir()
  tools = {
      # sbatch runs the script as SLURM would on the first node of a 2-node allocation.
      "sbatch": "#!/bin/bash\n"
                "SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='gpu-[12-13]' exec bash \"$1\"\n",
      # Many more lines than a pipe holds: a reader that stops early makes scontrol die of SIGPIPE.
      "scontrol": "#!/bin/bash\n[ \"$1 $2 $3\" = 'show hostnames gpu-[12-13]' ] && "
                  "{ printf 'gpu-12\\ngpu-13\\n'; seq -f 'gpu-x%g' 100000; }\n",
      "srun": f"#!{sys.executable}\nimport json, os, sys\njson.dump({{'argv': sys.argv[1:], "
              "'cwd': os.getcwd(), 'env': {k: v for k, v in os.environ.items() "
              "if k.startswith(('SIMVLM_', 'NCCL_'))}}, open(os.environ['FAKE_SRUN_OUT'], 'w'))\n",
  }
  for name, text in tools.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_SRUN_OUT", str(tmp_path / "srun.json"))

  slurm.main([*SLURM_ARGS, f"--workdir={workdir}", f"--log_dir={tmp_path / 'logs'}"])
  assert (tmp_path / "logs" / "simvlm.sbatch").read_text().startswith("#!/bin/bash\n")
  srun = json.loads((tmp_path / "srun.json").read_text())
  assert srun["argv"] == ["--kill-on-bad-exit=1", ".venv/bin/python", "-m", "simvlm_jax.train",
                          "--gin_file=gin/models/simvlm_base.gin", "--gin_file=gin/pretrain.gin",
                          MODEL_DIR, "--gin.train.total_steps=1000000"]
  assert srun["cwd"] == str(workdir)
  port = 61440 + 4242 % 4096
  assert srun["env"] == {"SIMVLM_COORDINATOR_ADDRESS": f"gpu-12:{port}", "NCCL_DEBUG": "WARN"}
  # Task 11 of 16 (local GPU 3 of node gpu-13), as srun would start it.
  task = {**srun["env"], "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu-[12-13]",
          "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "11",
          "SLURM_LOCALID": "3"}
  assert distributed.resolve(task) == {
      "coordinator_address": f"gpu-12:{port}", "num_processes": 16, "process_id": 11,
      "local_device_ids": [3], "cluster_detection_method": "deactivate"}


def test_slurm_time_limit_stops_the_run_at_a_checkpoint_and_requeues(tmp_path, monkeypatch):
  """SIGUSR1 to the batch script (what --signal=B:USR1@300 makes SLURM send) reaches the tasks as
  SIGTERM through srun; once srun has exited the job is requeued."""
  bin_dir, workdir, events = tmp_path / "bin", tmp_path / "checkout", tmp_path / "events"
  bin_dir.mkdir()
  workdir.mkdir()
  tools = {
      # Detached, like a real batch job; the script's pid lets the test play SLURM's part.
      "sbatch": "#!/bin/bash\nSLURM_JOB_ID=4242 SLURM_JOB_NODELIST=gpu-1 bash \"$1\" "
                "> \"$EVENTS.log\" 2>&1 &\necho $! > \"$EVENTS.pid\"\n",
      "scontrol": "#!/bin/bash\nif [ \"$1\" = show ]; then echo gpu-1; "
                  "else echo \"scontrol $*\" >> \"$EVENTS\"; fi\n",
      # A train process that saves and exits 0 on SIGTERM.
      "srun": f"#!{sys.executable}\nimport os, signal, sys, time\n"
              "events = os.environ['EVENTS']\n"
              "def stop(signum, frame):\n"
              "  open(events, 'a').write('srun got SIGTERM\\n'); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "open(events, 'a').write('srun started\\n')\n"
              "time.sleep(60)\n"
              "open(events, 'a').write('srun ran to the end\\n')\n",
  }
  for name, text in tools.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("EVENTS", str(events))

  slurm.main([*SLURM_ARGS, f"--workdir={workdir}", f"--log_dir={tmp_path / 'logs'}"])
  deadline = time.time() + 30
  while "srun started" not in (events.read_text() if events.exists() else ""):
    assert time.time() < deadline, "srun never started"
    time.sleep(0.1)
  script_pid = int((tmp_path / "events.pid").read_text())
  os.kill(script_pid, signal.SIGUSR1)
  while "scontrol requeue" not in events.read_text():
    assert time.time() < deadline, events.read_text()
    time.sleep(0.1)
  assert events.read_text().splitlines() == ["srun started", "srun got SIGTERM",
                                             "scontrol requeue 4242"]
  log = (tmp_path / "events.log").read_text()
  assert "job 4242 reaches its time limit soon: stopping the run at a checkpoint" in log
