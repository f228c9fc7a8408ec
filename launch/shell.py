"""What the launchers share: command-line parsing, the train command, printing or running commands.

Commands are argv lists, never shell strings, so a gin binding reaches `simvlm_jax.train` exactly as
typed; `--dry_run` prints each as `shlex.join` would, which a shell turns back into the same argv.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MODULE = "simvlm_jax.train"


def parse(parser: argparse.ArgumentParser,
          argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
  """The launcher's own flags, and the `--gin.KEY=VALUE` bindings (verbatim, in order)."""
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not (a.startswith("--gin.") and "=" in a)]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (gin bindings are --gin.KEY=VALUE)")
  return args, rest


def env_pairs(pairs: Sequence[str]) -> Dict[str, str]:
  """["KEY=VALUE", ...] (from repeated --env flags) -> {KEY: VALUE}."""
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise SystemExit(f"--env expects KEY=VALUE, got {pair!r}")
    out[key] = value
  return out


def train_command(python: str, gin_files: Sequence[str], gin_bindings: Sequence[str],
                  flags: Sequence[str] = ()) -> List[str]:
  if not gin_files:
    raise SystemExit("give at least one --gin_file")
  return [python, "-m", TRAIN_MODULE, *flags, *[f"--gin_file={f}" for f in gin_files],
          *gin_bindings]


def execute(commands: Sequence[Sequence[str]], dry_run: bool) -> None:
  """Prints (dry run) or runs each command in turn, stopping at the first failure."""
  for command in commands:
    if dry_run:
      print(shlex.join(command), flush=True)
    else:
      print("+ " + shlex.join(command), file=sys.stderr, flush=True)
      subprocess.run(command, check=True)
