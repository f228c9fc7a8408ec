r"""A release of a trained run: its parameters (no optimizer state), config and vocabulary.

  python -m simvlm_jax.export --model_dir=runs/pretrain --out_dir=release/simvlm_tiny_shapes
  python -m simvlm_jax.export --model_dir=runs/vqa --step=2000 --out_dir=gs://bucket/release/vqa

The output is a run directory (`simvlm_jax.run_dir`) whose one checkpoint holds the parameters
alone, a third of a train state's size with Adam, so `predict --checkpoint_dir`, `eval`'s
`model_dir` and `train.init_from` read it as they read the run:

  <out_dir>/config.gin, vocabulary.model, vocabulary.json, answers.txt (a VQA classifier's)
  <out_dir>/checkpoints/<step>/state   {"params": ...}
  <out_dir>/export.json                where it came from, its step, parameter count and bytes
"""
import json
from typing import Optional

import jax
import numpy as np
from absl import app, flags
from etils import epath

from simvlm_jax import checkpoints, console, gin_utils, run_dir
from simvlm_jax import train  # noqa: F401  (registers `train`, which saved configs bind)
from simvlm_jax.errors import UserError, run_main

EXPORT_INFO = "export.json"
# What a release carries from the run directory beside its checkpoint.
RUN_FILES = (run_dir.CONFIG_FILE, run_dir.VOCABULARY_FILE, run_dir.VOCABULARY_INFO,
             run_dir.ANSWERS_FILE)


def export(model_dir: str, out_dir: str, step: Optional[int] = None) -> dict:
  """Writes the release of `model_dir` (its checkpoint `step`, default the newest) to `out_dir`
  and returns what export.json records."""
  run = run_dir.open_run(model_dir, step, need_vocabulary=False)
  out = checkpoints.absolute(out_dir)
  if out.exists() and any(out.iterdir()):
    raise UserError(f"{out} is not empty: export into a new directory")
  out.mkdir(parents=True, exist_ok=True)
  for name in RUN_FILES:
    if (run.directory / name).exists():
      (out / name).write_bytes((run.directory / name).read_bytes())
  ckpt = checkpoints.Checkpointer(str(out / run_dir.CHECKPOINTS), keep=None, async_save=False)
  try:
    ckpt.save({"params": run.params}, force=True, step=run.step)
  finally:
    ckpt.close()
  leaves = jax.tree.leaves(run.params)
  info = {"source": str(run.directory), "step": run.step,
          "parameters": int(sum(np.prod(x.shape) for x in leaves)),
          "bytes": int(sum(x.nbytes for x in leaves))}
  (out / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
  return info


def _define_flags():
  flags.DEFINE_string("model_dir", None, "The run to release (train.model_dir), or one of its "
                      "checkpoints/<step> directories.", required=True)
  flags.DEFINE_string("out_dir", None, "A new (or empty) directory; gs:// works.", required=True)
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")
  gin_utils.define_console_flags()


def main(argv):
  del argv
  f = flags.FLAGS  # one process: a release is written once, by one machine

  def run():
    console.quiet_python()
    info = export(f.model_dir, f.out_dir, f.step)
    print(f"exported step {info['step']} of {info['source']}: {info['parameters']:,} parameters "
          f"({info['bytes'] / 2**20:.1f} MiB, no optimizer state) -> {f.out_dir}")
  run_main(run, multi_process=False)


if __name__ == "__main__":
  _define_flags()
  app.run(main, argv=gin_utils.main_argv())
