r"""Official-metric evaluation of checkpoints on a downstream task.

  python -m simvlm_jax.eval --gin_file=gin/eval.gin \
      --gin.evaluate.model_dir="'/tmp/simvlm_demo/finetune_vqa'" \
      --gin.evaluate.task="'shapes_vqa_v2'" [--gin.evaluate.steps="[100, 200]"]

Restores one checkpoint (`steps=[s]`), the listed steps, or every checkpoint of `model_dir`
(`steps=None`, the default), with the model of the run's saved `config.gin` (as
`simvlm_jax.predict.Predictor`). The prompt is the task's inputs (a question, a statement, a
hypothesis, or "a picture of" for captioning); the answer is decoded (greedy or beam search:
`evaluate.method`) or, for a model with a classifier head (`ModelConfig.num_classes > 0`), the
top class of the VQA answer vocabulary. The metric follows the task:

  vqa_v2                     VQA accuracy (overall, per answer type, per question type; version:
                             `evaluate.vqa_metric_version`)
  coco_captions, nocaps      BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap; SPICE: n/a offline);
                             the shapes world's also caption correctness against the scene
                             (`tasks.shapes_caption_check`: precision and recall, in %)
  nlvr2, snli_ve(_text)      accuracy, per class and a confusion matrix; text that is no label is
                             wrong

Writes to `output_dir` (default `<model_dir>/eval_<task>_<split>`): `scores.json` ({step: scores},
merged with earlier runs), `predictions_<step>.jsonl` (one line per example), `report_<step>.html`
(`simvlm_jax.report`), TensorBoard scalars (clu), and prints a summary. The decoding and the
metrics are `simvlm_jax.evaluators`', which training's in-loop evaluators share. Zero-shot
captioning of a pretraining run works the same way: `--gin.evaluate.task="'shapes_coco_captions'"`
on its model_dir (the prompt is the caption task's "a picture of").

`evaluate.images="'grey'"` (every pixel grey) or `"'swapped'"` (each image pair reversed) are
controls: how much of the score needs the images, and NLVR2's left from right.

By default evaluation runs on one device. `evaluate.mesh_shape = (data, fsdp, model)` (e.g.
`(-1, 1, 1)`) restores the parameters sharded by the training rules over all devices of all
processes and splits each batch's rows over data x fsdp. With several processes each reads its
shard of the split (with the default one-device mesh, each decodes its shard on its own device),
the predictions are gathered, process 0 scores them and writes the results.
"""
import json
from typing import Optional, Sequence

import gin
import jax
from absl import app
from clu import metric_writers
from etils import epath

from simvlm_jax import checkpoints, console, gin_utils, run_dir
from simvlm_jax import distributed  # noqa: F401  (its --jax_distributed flags; run_main starts it)
from simvlm_jax import train  # noqa: F401  (registers `train`, which saved configs bind)
from simvlm_jax.errors import UserError, run_main
from simvlm_jax.evaluators import Evaluator, scalars, summary, write_results
from simvlm_jax.metrics import captions as caption_metrics
from simvlm_jax.metrics import vqa
from simvlm_jax.partitioning import Partitioner


@gin.configurable(denylist=["overrides"])
def evaluate(model_dir: str = gin.REQUIRED, task: str = gin.REQUIRED, split: str = "validation",
             steps: Optional[Sequence[int]] = None, output_dir: Optional[str] = None,
             batch_size: int = 32, method: str = "auto", beam_size: int = 4, alpha: float = 0.6,
             max_decode_length: Optional[int] = None, max_examples: Optional[int] = None,
             caption_metric_names: Sequence[str] = caption_metrics.ALL_METRICS,
             report_examples: int = 100,
             vqa_metric_version: str = vqa.DEFAULT_VERSION,
             mesh_shape: Optional[Sequence[int]] = None, images: str = "given",
             overrides: tuple[Sequence[str], Sequence[str]] = ((), ())) -> dict[int, dict]:
  """Scores the checkpoints of `model_dir` on `task`; returns {step: scores}. See the module doc.

  Args:
    steps: checkpoint steps to score (default: every checkpoint in `model_dir`; "latest": the
      last one).
    method: "greedy", "beam" or "auto" (beam search for captioning, greedy otherwise); ignored by
      classifier models.
    max_decode_length: default: the run's `make_finetune_iterator.targets_length` (else 32).
    max_examples: score only the first N examples (quick looks; not an official number).
    caption_metric_names: a subset of Bleu, METEOR, ROUGE_L, CIDEr (METEOR starts Java, ~10 s).
    report_examples: example rows (with images) in the HTML report.
    vqa_metric_version: VQA accuracy as the official code computes it now, "2021" / "current", or
      before its 2021 fix, "2016" / "legacy" (many published numbers); `simvlm_jax.metrics.vqa`.
    mesh_shape: (data, fsdp, model) over every device of every process (one entry may be -1);
      default: one device. `batch_size` must be a multiple of data x fsdp.
    images: "given"; or a control of whether the model uses its images: "grey" (every pixel
      128) or "swapped" (an image pair in reverse order: NLVR2's "left" and "right"). The
      default output_dir then ends in `_grey` / `_swapped`.
    overrides: (gin files, bindings) applied over the run's config (the command line's, so that
      e.g. `--gin.ModelConfig.attention="'fused'"` holds; see `run_dir.open_run`).
  """
  vqa.resolve_version(vqa_metric_version)  # a typo fails before the model loads
  partitioner = (Partitioner(tuple(mesh_shape)) if mesh_shape is not None
                 else run_dir.single_device())
  run = run_dir.open_run(model_dir, restore=False, need_vocabulary=False, overrides=overrides)
  evaluator = Evaluator.for_run(run, task, split, partitioner, batch_size=batch_size,
                                method=method, beam_size=beam_size, alpha=alpha,
                                max_decode_length=max_decode_length, max_examples=max_examples,
                                images=images)
  is_main = jax.process_index() == 0
  control = "" if images == "given" else f"_{images}"
  output_dir = epath.Path(output_dir or run.directory / f"eval_{task}_{split}{control}")
  output_dir.mkdir(parents=True, exist_ok=True)
  available = run.steps()
  if not available:
    raise UserError(f"no checkpoint in {model_dir}/checkpoints")
  todo = (available if steps is None else available[-1:] if steps == "latest"
          else [int(s) for s in steps])
  missing = sorted(set(todo) - set(available))
  if missing:
    raise UserError(f"no checkpoint for steps {missing} in {model_dir}; it has {available}")
  scores_path = output_dir / "scores.json"
  all_scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
  writer = metric_writers.create_default_writer(str(output_dir), just_logging=not is_main)
  abstract = run_dir.abstract_params(run.config, partitioner)
  # Read-only: the run may be training beside this evaluation.
  ckpt = checkpoints.CheckpointReader(str(run.directory / run_dir.CHECKPOINTS))
  results = {}
  for step in todo:
    result = evaluator.run(ckpt.restore_params(abstract, step=step), caption_metric_names,
                                vqa_metric_version, report_examples)
    scores = {**result.scores, "step": step, "images": images}
    results[step] = all_scores[str(step)] = scores
    if not is_main:
      continue  # every process decoded; process 0 writes
    write_results(output_dir, step, f"{task} ({split}{', images ' + images if control else ''}"
                  f"), {run.directory} step {step}",
                  evaluator.benchmark, result, report_examples)
    tmp = output_dir / "scores.json.tmp"
    tmp.write_text(json.dumps(all_scores, indent=1, sort_keys=True))
    tmp.replace(scores_path)
    writer.write_scalars(step, {f"eval/{task}/{k}": v for k, v in scalars(scores).items()})
    print(f"{task} {split}{control} step {step}: {summary(evaluator.benchmark, scores)} "
          f"({scores['examples']} examples, {evaluator.method}, "
          f"{scores['predict_seconds']:.1f}s predict + {scores['score_seconds']:.1f}s score) -> "
          f"{output_dir}", flush=True)
  writer.flush()
  writer.close()
  return results


def main(argv: Sequence[str]):
  del argv
  console.own_stdout()  # the run's own lines, not Gloo's (multi-process CPU runs)
  run_main(lambda: (gin_utils.parse_flags(), evaluate(overrides=gin_utils.flag_overrides())))


if __name__ == "__main__":
  gin_utils.define_flags()
  app.run(main, argv=gin_utils.main_argv())
