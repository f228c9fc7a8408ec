r"""SLURM GPU clusters: render `launch/slurm_train.sbatch` for a run and submit it with sbatch.

  python -m launch.slurm --nodes=8 --gpus_per_node=8 --partition=gpu \
      --gin_file=gin/models/simvlm_base.gin --gin_file=gin/pretrain.gin --gin_file=DATA.gin \
      --gin.train.model_dir="'/shared/runs/simvlm_base'"

`--processes=per_gpu` (default) starts one process per GPU, `per_node` one per node that drives all
the node's GPUs. `--signal_seconds` before the time limit the run stops at a checkpoint and, with
`--requeue` (default), the job is requeued to resume from it. The rendered script is kept as `<log_dir>/<job_name>.sbatch` next to the job's log.
`--dry_run` prints the shell commands that would write and submit it (the script inlined) instead.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, Optional, Sequence

from launch import shell

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_train.sbatch")
# Same rule as simvlm_jax.distributed's SLURM default, evaluated by the batch script.
DEFAULT_PORT = "$((61440 + SLURM_JOB_ID % 4096))"
CPUS_PER_GPU = 8


def render(fields: Dict[str, str], template_path: str = TEMPLATE) -> str:
  """Fills `{{name}}` fields; a field alone on its line that renders empty drops the line."""
  with open(template_path) as f:
    template = f.read()
  missing = set(re.findall(r"{{(\w+)}}", template)) - set(fields)
  if missing:
    raise KeyError(f"no value for template fields {sorted(missing)}")
  lines = []
  for line in template.splitlines():
    alone = re.fullmatch(r"{{(\w+)}}", line)
    if alone and not fields[alone.group(1)]:
      continue
    lines.append(re.sub(r"{{(\w+)}}", lambda m: fields[m.group(1)], line))
  return "\n".join(lines) + "\n"


def script_fields(args: argparse.Namespace, gin_bindings: Sequence[str]) -> Dict[str, str]:
  tasks_per_node = args.gpus_per_node if args.processes == "per_gpu" else 1
  gpus_per_task = args.gpus_per_node // tasks_per_node
  command = shell.train_command(args.python, args.gin_file, gin_bindings)
  options = [f"#SBATCH --{name}={value}" for name, value in
             (("partition", args.partition), ("account", args.account)) if value]
  options += [f"#SBATCH {option}" for option in args.sbatch_option]
  return {
      "job_name": args.job_name,
      "nodes": str(args.nodes),
      "tasks_per_node": str(tasks_per_node),
      "gpus_per_node": str(args.gpus_per_node),
      "cpus_per_task": str(args.cpus_per_task or CPUS_PER_GPU * gpus_per_task),
      "time": args.time,
      "log_dir": args.log_dir,
      "sbatch_options": "\n".join(options),
      "signal_option": (f"#SBATCH --signal=B:USR1@{args.signal_seconds}"
                        if args.signal_seconds else ""),
      "requeue_option": "#SBATCH --requeue" if args.requeue else "",
      "requeue_command": ('  echo "simvlm: requeueing job ${SLURM_JOB_ID}"\n'
                          '  scontrol requeue "$SLURM_JOB_ID"') if args.requeue else "",
      "workdir": shlex.quote(args.workdir),
      "exports": "\n".join(f"export {k}={shlex.quote(v)}"
                           for k, v in shell.env_pairs(args.env).items()),
      "port": str(args.port) if args.port else DEFAULT_PORT,
      # One argument per line, for a readable script; the shell joins them back.
      "command": " \\\n    ".join([shlex.join(command[:3])]
                                   + [shlex.quote(a) for a in command[3:]]),
  }


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m launch.slurm", allow_abbrev=False,
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--processes", choices=("per_gpu", "per_node"), default="per_gpu")
  parser.add_argument("--cpus_per_task", type=int, default=None,
                      help=f"Default: {CPUS_PER_GPU} per GPU of the task.")
  parser.add_argument("--time", default="24:00:00", help="Wall-clock limit (sbatch --time).")
  parser.add_argument("--signal_seconds", type=int, default=300,
                      help="Seconds before the time limit at which the run is told to stop at a "
                           "checkpoint (0: never; the run is then killed at the limit).")
  parser.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=True,
                      help="Requeue the job when it stops ahead of its time limit or is preempted; "
                           "the requeued job resumes from the checkpoint.")
  parser.add_argument("--job_name", default="simvlm")
  parser.add_argument("--partition", default=None)
  parser.add_argument("--account", default=None)
  parser.add_argument("--sbatch_option", action="append", default=[],
                      help="Any other sbatch option, e.g. --sbatch_option=--qos=high.")
  parser.add_argument("--workdir", default=shell.REPO,
                      help="The checkout on the cluster's shared filesystem.")
  parser.add_argument("--log_dir", default=None, help="Default: <workdir>/slurm_logs.")
  parser.add_argument("--python", default=".venv/bin/python", help="Relative to --workdir.")
  parser.add_argument("--port", type=int, default=None,
                      help="Coordinator port (default: derived from the job id).")
  parser.add_argument("--env", action="append", default=[], help="KEY=VALUE exported to all tasks.")
  parser.add_argument("--gin_file", action="append", default=[], help="Gin files, in order.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands, submit nothing.")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = _parser()
  args, gin_bindings = shell.parse(parser, sys.argv[1:] if argv is None else argv)
  if args.gpus_per_node < 1 or args.nodes < 1:
    parser.error("--nodes and --gpus_per_node must be positive")
  if args.signal_seconds < 0:
    parser.error("--signal_seconds must be >= 0")
  args.log_dir = args.log_dir or os.path.join(args.workdir, "slurm_logs")
  if re.search(r"\s", args.log_dir):
    parser.error("--log_dir cannot contain whitespace (it goes into an #SBATCH line)")
  script = render(script_fields(args, gin_bindings))
  path = os.path.join(args.log_dir, f"{args.job_name}.sbatch")
  submit = ["sbatch", path]
  if args.dry_run:
    print(f"mkdir -p {shlex.quote(args.log_dir)}")
    print(f"cat > {shlex.quote(path)} <<'SBATCH_EOF'\n{script}SBATCH_EOF")
    print(shlex.join(submit), flush=True)
    return
  os.makedirs(args.log_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  shell.execute([submit], dry_run=False)


if __name__ == "__main__":
  main()
