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
(`simvlm_jax.report`), TensorBoard scalars (clu), and prints a summary. Zero-shot captioning of a
pretraining run works the same way: `--gin.evaluate.task="'shapes_coco_captions'"` on its
model_dir (the prompt is the caption task's "a picture of").

By default evaluation runs on one device. `evaluate.mesh_shape = (data, fsdp, model)` (e.g.
`(-1, 1, 1)`) restores the parameters sharded by the training rules over all devices of all
processes and splits each batch's rows over data x fsdp: every process reads every example, the
processes decode together, and process 0 writes the results.
"""
import json
import time
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np
from absl import app
from clu import metric_writers
from etils import epath

from simvlm_jax import checkpoints, decoding, distributed, gin_utils, run_dir
from simvlm_jax import train  # noqa: F401  (registers `train`, which saved configs bind)
from simvlm_jax.errors import UserError, run_main
from simvlm_jax.metrics import captions as caption_metrics
from simvlm_jax.metrics import classification, vqa
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.report import write_html_report

CAPTION_TASKS = ("coco_captions", "nocaps")
CLASS_LABELS = {"nlvr2": classification.NLVR2_CLASSES,
                "snli_ve": classification.SNLI_VE_CLASSES,
                "snli_ve_text": classification.SNLI_VE_CLASSES}


def benchmark_of(task: str) -> str:
  """The benchmark a task name stands for: "shapes_vqa_v2" -> "vqa_v2"."""
  name = task[len("shapes_"):] if task.startswith("shapes_") else task
  if name not in CAPTION_TASKS + ("vqa_v2",) + tuple(CLASS_LABELS):
    raise UserError(f"no metric for task {task!r}: expected one of vqa_v2, coco_captions, "
                    "nocaps, nlvr2, snli_ve, snli_ve_text (optionally shapes_...)")
  return name


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def score(benchmark: str, predictions: Sequence[str], meta: Sequence[dict],
          caption_metric_names: Sequence[str] = caption_metrics.ALL_METRICS,
          vqa_metric_version: str = vqa.DEFAULT_VERSION) -> tuple[dict, list]:
  """(scores, per-example score) of text predictions against the examples' pass-through features."""
  if benchmark == "vqa_v2":
    result = vqa.vqa_accuracy(predictions, [[_text(a) for a in m["answers"]] for m in meta],
                              [_text(m["answer_type"]) for m in meta],
                              [_text(m["question_type"]) for m in meta], vqa_metric_version)
    return ({"accuracy": result["overall"], "per_answer_type": result["per_answer_type"],
             "per_question_type": result["per_question_type"], "examples": len(predictions),
             "vqa_metric_version": vqa.resolve_version(vqa_metric_version)},
            result["per_question"])
  if benchmark in CAPTION_TASKS:
    refs = {i: [_text(c) for c in m["captions"] if _text(c)] for i, m in enumerate(meta)}
    corpus, per_image = caption_metrics.coco_caption_scores(
        dict(enumerate(predictions)), refs, caption_metric_names)
    scores = {**corpus, "examples": len(predictions)}
    scenes = [_text(m.get("scene", "")) for m in meta]
    if any(scenes):
      scores["caption_correctness"] = _caption_correctness(predictions, scenes)
    if benchmark == "nocaps":
      for domain in sorted({_text(m["domain"]) for m in meta}):
        ids = [i for i, m in enumerate(meta) if _text(m["domain"]) == domain]
        sub, _ = caption_metrics.score_tokenized(
            *_tokenized_subset(predictions, refs, ids), metrics=("CIDEr",))
        scores[f"CIDEr_{domain}"] = sub["CIDEr"]
    return scores, [per_image[i] for i in range(len(predictions))]
  classes = CLASS_LABELS[benchmark]
  labels = [_text(m["targets_pretokenized"]) for m in meta]
  result = classification.classification_metrics(predictions, labels, classes)
  per_example = [float(p.strip().lower() == l) * 100 for p, l in zip(predictions, labels)]
  return {**result, "examples": len(predictions)}, per_example


def _caption_correctness(predictions: Sequence[str], scenes: Sequence[str]) -> dict:
  """The shapes world's captions checked against their scenes (`tasks.shapes_caption_check`):
  precision (% of the colours, shapes, sizes and counts stated that are true) and recall (% of
  the objects named). Only the shapes world's caption tasks carry a scene feature."""
  from tasks import shapes_caption_check
  known = [i for i, scene in enumerate(scenes) if scene]
  return shapes_caption_check.corpus_score(
      [predictions[i] for i in known],
      [shapes_caption_check.scene_from_json(scenes[i]) for i in known])


def _tokenized_subset(predictions, refs, ids):
  tokenized = caption_metrics.ptb_tokenize(
      {**{("ref", i): refs[i] for i in ids}, **{("pred", i): [predictions[i]] for i in ids}})
  return ({i: tokenized[("ref", i)] for i in ids}, {i: tokenized[("pred", i)] for i in ids})


def _numeric(scores: dict, prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in scores.items():
    if isinstance(v, dict):
      out.update(_numeric(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f"{prefix}{k}"] = float(v)
  return out


def _jsonable(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return [_jsonable(v) for v in x.tolist()]
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.generic):
    return x.item()
  return x


_DECODE_FNS: dict = {}


def _decode_fn(model, config, method: str, max_decode_length: int, beam_size: int, alpha: float,
               partitioner: Partitioner):
  """The jitted decoder for a model config and mesh, shared by every Evaluator of this process:
  a demo or benchmark that evaluates several runs of one architecture compiles it once per input
  shape. Its outputs are replicated, so every process reads every row."""
  key = (repr(config), method, max_decode_length, beam_size, alpha, partitioner.mesh)
  if key not in _DECODE_FNS:
    _DECODE_FNS[key] = jax.jit(decoding.make_decode_fn(
        model, method=method, max_decode_length=max_decode_length, beam_size=beam_size,
        alpha=alpha), out_shardings=partitioner.replicated)
  return _DECODE_FNS[key]


class Evaluator:
  """A run's model (from its config.gin) and the eval data of one task; scores checkpoints."""

  def __init__(self, model_dir: str, task: str, split: str, batch_size: int, method: str,
               beam_size: int, alpha: float, max_decode_length: Optional[int],
               max_examples: Optional[int], partitioner: Optional[Partitioner] = None):
    from simvlm_jax.data import finetune  # TensorFlow/seqio only here
    self.benchmark = benchmark_of(task)
    # The run's own vocabulary copy is bound, so the task tokenizes as the run did.
    self.run = run_dir.open_run(model_dir, restore=False, need_vocabulary=False)
    self.model_dir, self.task, self.split = str(self.run.directory), task, split
    self.config = self.run.config
    self.vocabulary = self.run.vocabulary or finetune.vocabulary(task)
    run_dir.check_vocabulary(self.vocabulary, self.config)
    self.inputs_length = self.run.setting("make_finetune_iterator.inputs_length", 32)
    self.targets_length = self.run.setting("make_finetune_iterator.targets_length", 32)
    if self.inputs_length + self.targets_length > self.config.max_text_len:
      self.targets_length = self.config.max_text_len - self.inputs_length
    self.batch_size, self.max_examples = batch_size, max_examples
    self.partitioner = partitioner or run_dir.single_device()
    if batch_size % self.partitioner.batch_shards:
      raise UserError(f"evaluate.batch_size {batch_size} does not split over the mesh's "
                      f"{self.partitioner.batch_shards} batch shards (data x fsdp): make it a "
                      "multiple of them")
    self.abstract_params = run_dir.abstract_params(self.config, self.partitioner)
    self.ckpt = checkpoints.Checkpointer(str(self.run.directory / run_dir.CHECKPOINTS), keep=None)
    model = self.run.model
    if self.config.num_classes:
      if self.benchmark != "vqa_v2":
        raise UserError("a classifier model is evaluated on VQA only")
      self.answers = self.run.answers or finetune.answer_vocab(task)
      self.method = "classifier"
      self._predict = jax.jit(lambda p, im, pre: model.apply({"params": p}, im, pre,
                                                              method="classify"),
                              out_shardings=self.partitioner.replicated)
    else:
      if method == "auto":
        method = "beam" if self.benchmark in CAPTION_TASKS else "greedy"
      self.method = method
      self._predict = _decode_fn(model, self.config, method,
                                 max_decode_length or self.targets_length, beam_size, alpha,
                                 self.partitioner)
    self._finetune = finetune

  def steps(self) -> list[int]:
    return sorted(self.ckpt.all_steps())

  def _batches(self):
    return self._finetune.make_finetune_iterator(
        self.task, batch_size=self.batch_size, inputs_length=self.inputs_length,
        targets_length=self.targets_length, image_size=self.config.image_size, split=self.split,
        train=False, shard_index=0, num_shards=1, classifier_classes=0)

  def _texts(self, out, rows: int) -> list[str]:
    if self.method == "classifier":
      top = np.argmax(jax.device_get(out), axis=-1)
      return [self.answers[i] if i < len(self.answers) else "" for i in top[:rows]]
    texts = []
    for ids in jax.device_get(out.tokens)[:rows].tolist():
      ids = ids[:ids.index(decoding.EOS_ID)] if decoding.EOS_ID in ids else ids
      texts.append(self.vocabulary.decode([i for i in ids if 0 < i < self.vocabulary.vocab_size]))
    return texts

  def predict(self, params, report_images: int = 0) -> tuple[list[str], list[dict], list]:
    """(predictions, per-example pass-through features, the first `report_images` images)."""
    predictions, meta, images = [], [], []
    for batch in self._batches():
      extra = batch.pop("meta")
      (sub,) = batch.values()
      rows = int(np.sum(extra.pop("valid")))
      pixels, prefix = self.partitioner.shard_global_batch((sub.get("images"),
                                                            sub["prefix_tokens"]))
      with self.partitioner.activate():
        out = self._predict(params, pixels, prefix)
      predictions += self._texts(out, rows)
      meta += [{k: v[i] for k, v in extra.items()} for i in range(rows)]
      if "images" in sub and len(images) < report_images:
        images += list(sub["images"][:min(rows, report_images - len(images))])
      if self.max_examples and len(predictions) >= self.max_examples:
        predictions, meta = predictions[:self.max_examples], meta[:self.max_examples]
        break
    if not predictions:
      raise UserError(f"{self.task!r} {self.split!r} has no examples")
    return predictions, meta, images

  def evaluate_step(self, step: int, output_dir: str, caption_metric_names: Sequence[str],
                    report_examples: int, vqa_metric_version: str = vqa.DEFAULT_VERSION) -> dict:
    start = time.time()
    params = self.ckpt.restore_params(self.abstract_params, step=step)
    predictions, meta, images = self.predict(params, report_examples)
    predict_s = time.time() - start
    scores, per_example = score(self.benchmark, predictions, meta, caption_metric_names,
                                vqa_metric_version)
    scores.update(step=step, method=self.method, predict_seconds=round(predict_s, 2),
                  score_seconds=round(time.time() - start - predict_s, 2))
    rows, report = [], []
    for i, (prediction, m, s) in enumerate(zip(predictions, meta, per_example)):
      record = {"index": i, "prompt": _text(m.get("inputs_pretokenized", "")),
                "prediction": prediction, "score": s,
                **{k: _jsonable(v) for k, v in m.items() if k != "inputs_pretokenized"}}
      rows.append(record)
      if i < report_examples:
        refs = (m.get("captions") if self.benchmark in CAPTION_TASKS else
                m.get("answers") if self.benchmark == "vqa_v2" else m.get("targets_pretokenized"))
        refs = [r for r in _jsonable(refs) if r] if isinstance(refs, np.ndarray) else _jsonable(refs)
        prompt = record["prompt"]
        if "premise_pretokenized" in m:
          prompt = f"premise: {_text(m['premise_pretokenized'])}\nhypothesis: {prompt}"
        example = {"prompt": prompt, "prediction": prediction, "references": refs, "score": s}
        if i < len(images):
          image = images[i]
          example["images" if image.ndim == 4 else "image"] = list(image) if image.ndim == 4 \
              else image
        report.append(example)
    if jax.process_index():
      return scores  # every process decoded; process 0 writes
    (epath.Path(output_dir) / f"predictions_{step}.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in rows))
    write_html_report(str(epath.Path(output_dir) / f"report_{step}.html"),
                      f"{self.task} ({self.split}), {self.model_dir} step {step}", scores, report)
    return scores


def headline(benchmark: str, scores: dict) -> tuple[str, float]:
  """The one number of a benchmark: VQA accuracy, CIDEr, or accuracy."""
  key = "CIDEr" if benchmark in CAPTION_TASKS else "accuracy"
  return key, float(scores[key]) * (100.0 if key == "CIDEr" else 1.0)


@gin.configurable
def evaluate(model_dir: str = gin.REQUIRED, task: str = gin.REQUIRED, split: str = "validation",
             steps: Optional[Sequence[int]] = None, output_dir: Optional[str] = None,
             batch_size: int = 32, method: str = "auto", beam_size: int = 4, alpha: float = 0.6,
             max_decode_length: Optional[int] = None, max_examples: Optional[int] = None,
             caption_metric_names: Sequence[str] = caption_metrics.ALL_METRICS,
             report_examples: int = 100,
             vqa_metric_version: str = vqa.DEFAULT_VERSION,
             mesh_shape: Optional[Sequence[int]] = None) -> dict[int, dict]:
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
  """
  vqa.resolve_version(vqa_metric_version)  # a typo fails before the model loads
  partitioner = Partitioner(tuple(mesh_shape)) if mesh_shape is not None else None
  evaluator = Evaluator(model_dir, task, split, batch_size, method, beam_size, alpha,
                        max_decode_length, max_examples, partitioner)
  is_main = jax.process_index() == 0
  output_dir = epath.Path(output_dir or evaluator.run.directory / f"eval_{task}_{split}")
  output_dir.mkdir(parents=True, exist_ok=True)
  available = evaluator.steps()
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
  results = {}
  for step in todo:
    scores = evaluator.evaluate_step(step, output_dir, caption_metric_names, report_examples,
                                     vqa_metric_version)
    results[step] = scores
    all_scores[str(step)] = scores
    if not is_main:
      continue
    tmp = output_dir / "scores.json.tmp"
    tmp.write_text(json.dumps(all_scores, indent=1, sort_keys=True))
    tmp.replace(scores_path)
    numeric = _numeric({k: v for k, v in scores.items()
                        if k not in ("confusion_matrix", "per_question_type", "step")})
    writer.write_scalars(step, {f"eval/{task}/{k}": v for k, v in numeric.items()})
    key, value = headline(evaluator.benchmark, scores)
    summary = f"{key} {value:.2f}"
    if "caption_correctness" in scores:
      from tasks import shapes_caption_check
      summary += f"; correctness: {shapes_caption_check.summary(scores['caption_correctness'])}"
    print(f"{task} {split} step {step}: {summary} ({scores['examples']} examples, "
          f"{evaluator.method}, {scores['predict_seconds']:.1f}s predict + "
          f"{scores['score_seconds']:.1f}s score) -> {output_dir}", flush=True)
  writer.flush()
  writer.close()
  evaluator.ckpt.close()
  return results


def main(argv: Sequence[str]):
  del argv
  distributed.initialize()
  run_main(lambda: (gin_utils.parse_flags(), evaluate()))


if __name__ == "__main__":
  gin_utils.define_flags()
  app.run(main, argv=gin_utils.main_argv())
