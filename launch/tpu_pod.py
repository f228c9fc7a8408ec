r"""Cloud TPU VM pods: create (or reuse) a slice, install the project on every worker, start the
same training command on all workers, follow its log, stop it, delete the slice.

  python -m launch.tpu_pod create --name=simvlm --zone=us-central2-b --accelerator_type=v4-64
  python -m launch.tpu_pod setup  --name=simvlm --zone=us-central2-b
  python -m launch.tpu_pod run    --name=simvlm --zone=us-central2-b \
      --gin_file=gin/models/simvlm_base.gin --gin_file=gin/pretrain.gin --gin_file=DATA.gin \
      --gin.train.model_dir="'gs://BUCKET/simvlm_base'"
  python -m launch.tpu_pod logs   --name=simvlm --zone=us-central2-b
  python -m launch.tpu_pod stop   --name=simvlm --zone=us-central2-b
  python -m launch.tpu_pod delete --name=simvlm --zone=us-central2-b

`--dry_run` prints the commands instead of running them. On every worker the project lives in
`~/<remote_dir>` with its own `.venv`; a run writes `train.log` and `train.pid` there. The train
command gets `--jax_distributed=auto`: JAX finds the other workers from the TPU metadata.
"""
import argparse
import re
import shlex
import subprocess
import sys
from typing import List, Optional, Sequence

from launch import shell

ARCHIVE_NAME = "simvlm_jax_src.tar.gz"  # on the workers, in the home directory.
LOG, PID = "train.log", "train.pid"


def _gcloud(args: argparse.Namespace, verb: str, *extra: str,
            targets: Sequence[str] = ()) -> List[str]:
  """`gcloud compute tpus tpu-vm VERB TARGETS --zone [--project] EXTRA` (TARGETS: the slice)."""
  project = [f"--project={args.project}"] if args.project else []
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *(targets or [args.name]),
          f"--zone={args.zone}", *project, *extra]


def _ssh(args: argparse.Namespace, worker: str, script: str) -> List[str]:
  return _gcloud(args, "ssh", f"--worker={worker}", f"--command={script}")


def pinned_jax_version(repo: str = shell.REPO) -> str:
  """The jax version setup.py pins (the TPU install must match it)."""
  with open(f"{repo}/setup.py") as f:
    match = re.search(r'"jax==([^"]+)"', f.read())
  if not match:
    raise SystemExit(f"no jax==VERSION pin in {repo}/setup.py")
  return match.group(1)


def describe_command(args: argparse.Namespace) -> List[str]:
  return _gcloud(args, "describe", "--format=value(state)")


def create_command(args: argparse.Namespace) -> List[str]:
  spot = ["--spot"] if args.spot else []
  return _gcloud(args, "create", f"--accelerator-type={args.accelerator_type}",
                 f"--version={args.version}", *spot)


def setup_commands(args: argparse.Namespace) -> List[List[str]]:
  """Pack the local checkout, copy it to every worker, unpack it and install it in a venv there."""
  remote, python = shlex.quote(args.remote_dir), shlex.quote(args.python)
  jax_version = pinned_jax_version(args.repo_dir)
  install = " && ".join([
      "sudo apt-get -qq update",
      f"sudo apt-get -qq install -y {python} {python}-venv",
      f"mkdir -p {remote}",
      f"tar -xzf {ARCHIVE_NAME} -C {remote}",
      f"cd {remote}",
      f"{python} -m venv .venv",
      ".venv/bin/pip install -q -U pip",
      # The TPU build of the jax that setup.py pins (libtpu comes with the extra).
      f".venv/bin/pip install -q -e '.[gcs]' {shlex.quote(f'jax[tpu]=={jax_version}')}",
  ])
  return [
      ["tar", "-czf", args.archive, "--exclude=.git", "--exclude=.venv", "--exclude=__pycache__",
       "--exclude=*.egg-info", "-C", args.repo_dir, "."],
      _gcloud(args, "scp", "--worker=all", targets=[args.archive, f"{args.name}:{ARCHIVE_NAME}"]),
      _ssh(args, "all", install),
  ]


def run_script(args: argparse.Namespace, gin_bindings: Sequence[str]) -> str:
  """The shell line every worker runs: start training detached (setsid + nohup), log to a file.

  The pid written is the train process's, which setsid makes a process group leader, so `stop`
  ends it together with anything it started.
  """
  env = [f"{k}={v}" for k, v in shell.env_pairs(args.env).items()]
  train = shell.train_command(".venv/bin/python", args.gin_file, gin_bindings,
                              flags=["--jax_distributed=auto"])
  return (f"cd {shlex.quote(args.remote_dir)} || exit 1; "
          f"if [ -f {PID} ] && kill -0 \"$(cat {PID})\" 2>/dev/null; "
          f"then echo \"a run is already going on (pid $(cat {PID}))\" >&2; exit 1; fi; "
          f"setsid nohup {shlex.join((['env', *env] if env else []) + train)} "
          f"> {LOG} 2>&1 < /dev/null & echo $! > {PID}")


def stop_script(args: argparse.Namespace) -> str:
  return (f"cd {shlex.quote(args.remote_dir)} || exit 1; "
          f"if [ -f {PID} ]; then kill -TERM -- \"-$(cat {PID})\" 2>/dev/null; rm -f {PID}; fi")


def logs_script(args: argparse.Namespace) -> str:
  return f"tail -n {args.lines} -F {shlex.quote(args.remote_dir)}/{LOG}"


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", required=True, help="TPU VM (pod slice) name.")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b (where v4 lives).")
  common.add_argument("--project", default=None, help="GCP project (default: gcloud's).")
  common.add_argument("--remote_dir", default="simvlm_jax",
                      help="Project directory on the workers, relative to the home directory.")
  common.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_pod", allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0])
  actions = parser.add_subparsers(dest="action", required=True)
  create = actions.add_parser("create", parents=[common], allow_abbrev=False,
                              help="Create the slice unless it exists.")
  create.add_argument("--accelerator_type", required=True, help="e.g. v4-64 (32 chips, 8 hosts).")
  create.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software image.")
  create.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity.")
  setup = actions.add_parser("setup", parents=[common], allow_abbrev=False,
                             help="Install this checkout on every worker.")
  setup.add_argument("--repo_dir", default=shell.REPO, help="Local checkout to copy.")
  setup.add_argument("--archive", default=f"/tmp/{ARCHIVE_NAME}", help="Local archive path.")
  setup.add_argument("--python", default="python3.11", help="Interpreter for the workers' venv.")
  run = actions.add_parser("run", parents=[common], allow_abbrev=False,
                           help="Start training on every worker (also takes --gin.KEY=VALUE).")
  run.add_argument("--gin_file", action="append", default=[], help="Gin files, in order.")
  run.add_argument("--env", action="append", default=[], help="KEY=VALUE for the train process.")
  logs = actions.add_parser("logs", parents=[common], allow_abbrev=False,
                            help="Follow a worker's train.log.")
  logs.add_argument("--worker", default="0", help="Worker index (0 prints the progress lines).")
  logs.add_argument("--lines", type=int, default=100)
  actions.add_parser("stop", parents=[common], allow_abbrev=False, help="Stop the run everywhere.")
  actions.add_parser("delete", parents=[common], allow_abbrev=False, help="Delete the slice.")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = _parser()
  args, gin_bindings = shell.parse(parser, sys.argv[1:] if argv is None else argv)
  if gin_bindings and args.action != "run":
    parser.error(f"gin bindings only go with `run`, got {gin_bindings}")
  if args.action == "create":
    # Reuse: describe succeeds for an existing slice (then nothing is created).
    if args.dry_run:
      print("# create runs only if describe fails (no slice of that name yet)")
      shell.execute([describe_command(args), create_command(args)], dry_run=True)
      return
    described = subprocess.run(describe_command(args), capture_output=True, text=True)
    state = described.stdout.strip()
    if described.returncode != 0:
      shell.execute([create_command(args)], dry_run=False)
    elif state == "READY":
      print(f"reusing the existing TPU VM {args.name}", file=sys.stderr)
    else:  # e.g. PREEMPTED (spot): it has to be deleted and created again.
      raise SystemExit(f"TPU VM {args.name} exists in state {state}: `delete` it first")
  elif args.action == "setup":
    shell.execute(setup_commands(args), args.dry_run)
  elif args.action == "run":
    shell.execute([_ssh(args, "all", run_script(args, gin_bindings))], args.dry_run)
  elif args.action == "logs":
    shell.execute([_ssh(args, args.worker, logs_script(args))], args.dry_run)
  elif args.action == "stop":
    shell.execute([_ssh(args, "all", stop_script(args))], args.dry_run)
  elif args.action == "delete":
    shell.execute([_gcloud(args, "delete", "--quiet")], args.dry_run)


if __name__ == "__main__":
  main()
