"""Scores of predictions: each benchmark's official metric, and the metrics a task adds.

VQA accuracy (`simvlm_jax.metrics.vqa`), COCO's caption metrics (pycocoevalcap) and NoCaps' per
domain CIDEr, NLVR2 / SNLI-VE accuracy with per-class accuracy and a confusion matrix; plus the
metric fns a registered task marks `scores_examples` (the shapes world's caption correctness
against the scene). `scalars`, `headline` and `summary` turn scores into TensorBoard scalars and
console lines.
"""
from typing import Any, Callable, Sequence

import seqio

from simvlm_jax.errors import UserError
from simvlm_jax.metrics import captions as caption_metrics
from simvlm_jax.metrics import classification, vqa

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


def text(x: Any) -> str:
  """A pass-through feature as text (bytes decoded)."""
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def score(benchmark: str, predictions: Sequence[str], meta: Sequence[dict],
          caption_metric_names: Sequence[str] = caption_metrics.ALL_METRICS,
          vqa_metric_version: str = vqa.DEFAULT_VERSION,
          example_metrics: Sequence[Callable] = ()) -> tuple[dict, list]:
  """(scores, per-example score) of text predictions against the examples' pass-through features;
  `example_metrics` (a task's, see `example_metrics_of`) add their scores."""
  scores, per_example = _official(benchmark, predictions, meta, caption_metric_names,
                                  vqa_metric_version)
  for fn in example_metrics:
    scores.update(fn(meta, predictions))
  return scores, per_example


def always_written(benchmark: str, caption_metric_names: Sequence[str]) -> tuple[str, ...]:
  """The scalars of `score`'s that every evaluation of `benchmark` writes, whatever its data
  (what a checkpoint may be ranked by): the official metric's, not the per-answer-type ones."""
  if benchmark == "vqa_v2":
    return ("accuracy",)
  if benchmark in CAPTION_TASKS:
    names = [f"Bleu_{n}" for n in range(1, 5)] if "Bleu" in caption_metric_names else []
    return tuple(names + [m for m in ("METEOR", "ROUGE_L", "CIDEr") if m in caption_metric_names])
  return ("accuracy",) + tuple(f"per_class_accuracy/{c}" for c in CLASS_LABELS[benchmark])


def example_metrics_of(task: str) -> list[Callable]:
  """The metric fns of a registered SeqIO task that score predictions against whole examples
  (those with `scores_examples = True`, called as `fn(examples, predictions) -> {name: value}`
  with each example's pass-through features), e.g. the shapes world's caption correctness against
  the scene. A task's other metric fns are the official metric, which `score` computes itself."""
  try:
    registered = seqio.get_mixture_or_task(task)
  except ValueError:
    return []
  return [fn for fn in getattr(registered, "metric_fns", ())
          if getattr(fn, "scores_examples", False)]


def _official(benchmark: str, predictions: Sequence[str], meta: Sequence[dict],
              caption_metric_names: Sequence[str], vqa_metric_version: str) -> tuple[dict, list]:
  if benchmark == "vqa_v2":
    result = vqa.vqa_accuracy(predictions, [[text(a) for a in m["answers"]] for m in meta],
                              [text(m["answer_type"]) for m in meta],
                              [text(m["question_type"]) for m in meta], vqa_metric_version)
    return ({"accuracy": result["overall"], "per_answer_type": result["per_answer_type"],
             "per_question_type": result["per_question_type"], "examples": len(predictions),
             "vqa_metric_version": vqa.resolve_version(vqa_metric_version)},
            result["per_question"])
  if benchmark in CAPTION_TASKS:
    refs = {i: [text(c) for c in m["captions"] if text(c)] for i, m in enumerate(meta)}
    corpus, per_image = caption_metrics.coco_caption_scores(
        dict(enumerate(predictions)), refs, caption_metric_names)
    scores = {**corpus, "examples": len(predictions)}
    if benchmark == "nocaps":
      for domain in sorted({text(m["domain"]) for m in meta}):
        ids = [i for i, m in enumerate(meta) if text(m["domain"]) == domain]
        sub, _ = caption_metrics.score_tokenized(
            *_tokenized_subset(predictions, refs, ids), metrics=("CIDEr",))
        scores[f"CIDEr_{domain}"] = sub["CIDEr"]
    return scores, [per_image[i] for i in range(len(predictions))]
  classes = CLASS_LABELS[benchmark]
  labels = [text(m["targets_pretokenized"]) for m in meta]
  result = classification.classification_metrics(predictions, labels, classes)
  per_example = [float(p.strip().lower() == l) * 100 for p, l in zip(predictions, labels)]
  return {**result, "examples": len(predictions)}, per_example


def _tokenized_subset(predictions, refs, ids):
  tokenized = caption_metrics.ptb_tokenize(
      {**{("ref", i): refs[i] for i in ids}, **{("pred", i): [predictions[i]] for i in ids}})
  return ({i: tokenized[("ref", i)] for i in ids}, {i: tokenized[("pred", i)] for i in ids})


def numeric(scores: dict, prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in scores.items():
    if isinstance(v, dict):
      out.update(numeric(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[f"{prefix}{k}"] = float(v)
  return out


def scalars(scores: dict) -> dict[str, float]:
  """The numbers of a scores dict for TensorBoard, nested keys joined by "/" (the confusion
  matrix and the per-question-type breakdown left out)."""
  return numeric({k: v for k, v in scores.items()
                   if k not in ("confusion_matrix", "per_question_type", "step")})


def headline(benchmark: str, scores: dict) -> tuple[str, float]:
  """The one number of a benchmark: VQA accuracy, CIDEr, or accuracy."""
  key = "CIDEr" if benchmark in CAPTION_TASKS else "accuracy"
  return key, float(scores[key]) * (100.0 if key == "CIDEr" else 1.0)


def summary(benchmark: str, scores: dict) -> str:
  """"CIDEr 75.80; caption correctness: precision 50, recall 33, right 25": the headline number,
  and the numbers of the shapes world's caption correctness where the task has scenes."""
  key, value = headline(benchmark, scores)
  text = f"{key} {value:.2f}"
  checked = scores.get("caption_correctness")
  if checked:
    text += "; caption correctness: " + ", ".join(
        f"{k} {v:.0f}" for k, v in checked.items() if k in ("precision", "recall", "right")
        and v is not None)
  return text
