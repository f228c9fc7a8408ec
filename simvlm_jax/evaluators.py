"""Scoring a model on a task's official metric: the `eval` command's and training's evaluators.

`Evaluator` decodes one task's split (greedy or beam search, or a classifier head's top answer)
and `score` applies the task's metric: VQA accuracy, COCO's caption metrics (pycocoevalcap) and
the shapes world's caption correctness, NLVR2 / SNLI-VE accuracy.

Inside training (big_vision's `evals`), gin-listed evaluators score the live parameters every N
steps:

  train.evaluators = {"vqa": @vqa/OfficialMetric()}
  vqa/OfficialMetric.task = "vqa_v2"
  vqa/OfficialMetric.every = 1000
  train.keep_best_by = "eval/vqa/accuracy"   # optional: keep the best checkpoint by it
  train.keep_best_mode = "max"

Zero-shot captioning of a pretraining run uses the caption task's "a picture of" prompt
(gin/evaluators/zero_shot_captioning.gin). Decoding runs on the training mesh with the training
parameters as they are sharded; every process reads every example, so all processes take the same
number of decoding steps on any data shards. TensorBoard gets `eval/<name>/<metric>` (nested
scores joined by "/"), the console one line per evaluation.
"""
import dataclasses
import json
import time
from typing import Any, Optional, Sequence

import gin
import jax
import numpy as np
from etils import epath

from simvlm_jax import decoding, gin_utils, run_dir
from simvlm_jax.errors import UserError
from simvlm_jax.metrics import captions as caption_metrics
from simvlm_jax.metrics import classification, vqa
from simvlm_jax.models import ModelConfig, SimVLM
from simvlm_jax.partitioning import Partitioner
from simvlm_jax.report import write_html_report

CAPTION_TASKS = ("coco_captions", "nocaps")
# What the model is shown (`evaluate.images`): the example's images, or controls that say whether
# it uses them: every pixel grey (a "blind" model), or an image pair in reverse order.
IMAGE_CONTROLS = ("given", "grey", "swapped")
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


def control_images(images: np.ndarray, control: str, task: str) -> np.ndarray:
  """uint8 `[batch, (2,) H, W, 3]` as `control` (IMAGE_CONTROLS) asks: given, every pixel grey,
  or each pair in reverse order."""
  if control == "grey":
    return np.full_like(images, 128)
  if control == "swapped":
    if images.ndim != 5:
      raise UserError(f"images='swapped' needs image pairs ([batch, 2, H, W, 3]); {task!r} has "
                      "one image per example")
    return images[:, ::-1]
  return images


class Evaluator:
  """Decodes one task's eval split with a model and scores it with the task's official metric.

  Built from a run directory by `for_run` (the `eval` command) or from a training run's own model,
  vocabulary and mesh (the evaluators inside training, `simvlm_jax.evaluators`). Every process
  reads every example and the rows of each batch are split over the mesh's batch shards, so all
  processes take the same number of steps whatever their data shards.
  """

  def __init__(self, task: str, split: str, config, vocabulary, answers: Optional[Sequence[str]],
               *, inputs_length: int, targets_length: int, batch_size: int, method: str,
               beam_size: int, alpha: float, max_decode_length: Optional[int],
               max_examples: Optional[int], partitioner: Partitioner, images: str = "given"):
    from simvlm_jax.data import finetune  # TensorFlow/seqio only here
    if images not in IMAGE_CONTROLS:
      raise UserError(f"images must be one of {', '.join(IMAGE_CONTROLS)}, got {images!r}")
    self.images = images
    self.benchmark = benchmark_of(task)
    self.task, self.split, self.config = task, split, config
    self.vocabulary = vocabulary or finetune.vocabulary(task)
    run_dir.check_vocabulary(self.vocabulary, config)
    self.inputs_length = inputs_length
    self.targets_length = min(targets_length, config.max_text_len - inputs_length)
    self.batch_size, self.max_examples = batch_size, max_examples
    self.partitioner = partitioner
    if batch_size % partitioner.batch_shards:
      raise UserError(f"the eval batch size {batch_size} does not split over the mesh's "
                      f"{partitioner.batch_shards} batch shards (data x fsdp): make it a "
                      "multiple of them")
    model = SimVLM(config)
    if config.num_classes:
      if self.benchmark != "vqa_v2":
        raise UserError("a classifier model is evaluated on VQA only")
      self.answers = list(answers or finetune.answer_vocab(task))
      self.method = "classifier"
      self._predict = jax.jit(lambda p, im, pre: model.apply({"params": p}, im, pre,
                                                              method="classify"),
                              out_shardings=partitioner.replicated)
    else:
      if method == "auto":
        method = "beam" if self.benchmark in CAPTION_TASKS else "greedy"
      self.method = method
      self._predict = _decode_fn(model, config, method,
                                 max_decode_length or self.targets_length, beam_size, alpha,
                                 partitioner)
    self._finetune = finetune

  @classmethod
  def for_run(cls, run: run_dir.Run, task: str, split: str, partitioner: Partitioner,
              **kwargs) -> "Evaluator":
    """For an opened run: its model, vocabulary, answers and finetuning lengths."""
    return cls(task, split, run.config, run.vocabulary, run.answers,
               inputs_length=run.setting("make_finetune_iterator.inputs_length", 32),
               targets_length=run.setting("make_finetune_iterator.targets_length", 32),
               partitioner=partitioner, **kwargs)

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
      if "images" in sub:
        sub["images"] = control_images(sub["images"], self.images, self.task)
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

  def evaluate(self, params, caption_metric_names: Sequence[str] = caption_metrics.ALL_METRICS,
               vqa_metric_version: str = vqa.DEFAULT_VERSION,
               report_images: int = 0) -> "Result":
    """Decodes the split with `params` (sharded for this evaluator's mesh) and scores it."""
    start = time.time()
    predictions, meta, images = self.predict(params, report_images)
    predict_s = time.time() - start
    scores, per_example = score(self.benchmark, predictions, meta, caption_metric_names,
                                vqa_metric_version)
    scores.update(method=self.method, predict_seconds=round(predict_s, 2),
                  score_seconds=round(time.time() - start - predict_s, 2))
    return Result(scores, predictions, meta, per_example, images)


@dataclasses.dataclass
class Result:
  scores: dict
  predictions: list[str]
  meta: list[dict]
  per_example: list
  images: list


def write_results(output_dir: epath.Path, step: int, title: str, benchmark: str, result: Result,
                  report_examples: int) -> None:
  """`predictions_<step>.jsonl` (every example) and `report_<step>.html` (the first
  `report_examples`, with images) in `output_dir`."""
  rows, report = [], []
  for i, (prediction, m, s) in enumerate(zip(result.predictions, result.meta,
                                             result.per_example)):
    record = {"index": i, "prompt": _text(m.get("inputs_pretokenized", "")),
              "prediction": prediction, "score": s,
              **{k: _jsonable(v) for k, v in m.items() if k != "inputs_pretokenized"}}
    rows.append(record)
    if i < report_examples:
      refs = (m.get("captions") if benchmark in CAPTION_TASKS else
              m.get("answers") if benchmark == "vqa_v2" else m.get("targets_pretokenized"))
      refs = [r for r in _jsonable(refs) if r] if isinstance(refs, np.ndarray) else _jsonable(refs)
      prompt = record["prompt"]
      if "premise_pretokenized" in m:
        prompt = f"premise: {_text(m['premise_pretokenized'])}\nhypothesis: {prompt}"
      example = {"prompt": prompt, "prediction": prediction, "references": refs, "score": s}
      if i < len(result.images):
        image = result.images[i]
        example["images" if image.ndim == 4 else "image"] = list(image) if image.ndim == 4 \
            else image
      report.append(example)
  (output_dir / f"predictions_{step}.jsonl").write_text(
      "".join(json.dumps(record) + "\n" for record in rows))
  write_html_report(str(output_dir / f"report_{step}.html"), title, result.scores, report)


def scalars(scores: dict) -> dict[str, float]:
  """The numbers of a scores dict for TensorBoard, nested keys joined by "/" (the confusion
  matrix and the per-question-type breakdown left out)."""
  return _numeric({k: v for k, v in scores.items()
                   if k not in ("confusion_matrix", "per_question_type", "step")})


def headline(benchmark: str, scores: dict) -> tuple[str, float]:
  """The one number of a benchmark: VQA accuracy, CIDEr, or accuracy."""
  key = "CIDEr" if benchmark in CAPTION_TASKS else "accuracy"
  return key, float(scores[key]) * (100.0 if key == "CIDEr" else 1.0)


def summary(benchmark: str, scores: dict) -> str:
  """"CIDEr 75.80; correctness: ..." : the headline number, and the shapes world's caption
  correctness where the task has scenes."""
  key, value = headline(benchmark, scores)
  text = f"{key} {value:.2f}"
  if "caption_correctness" in scores:
    from tasks import shapes_caption_check
    text += f"; correctness: {shapes_caption_check.summary(scores['caption_correctness'])}"
  return text



# Inside training, METEOR (a Java process, ~10 s a call) is left out unless asked for.
DEFAULT_CAPTION_METRICS = ("Bleu", "ROUGE_L", "CIDEr")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OfficialMetric:
  """One task's official metric on one split, every `every` steps and at the run's last step.

  `batch_size` (default: the smallest multiple of the mesh's batch shards >= 32), `method`,
  `beam_size`, `alpha`, `max_decode_length` and `max_examples` as `simvlm_jax.eval.evaluate`'s;
  `inputs_length` / `targets_length` default to the run's `make_finetune_iterator` settings
  (else 32).
  """
  task: str = gin.REQUIRED
  every: int = gin.REQUIRED
  split: str = "validation"
  batch_size: Optional[int] = None
  method: str = "auto"
  beam_size: int = 4
  alpha: float = 0.6
  max_decode_length: Optional[int] = None
  max_examples: Optional[int] = None
  inputs_length: Optional[int] = None
  targets_length: Optional[int] = None
  caption_metric_names: Sequence[str] = DEFAULT_CAPTION_METRICS
  vqa_metric_version: str = vqa.DEFAULT_VERSION

  def check(self, name: str) -> None:
    """Refuses a wrong setting before the run starts."""
    if "/" in name or not name:
      raise UserError(f"train.evaluators: {name!r} is not a usable evaluator name (it names the "
                      "TensorBoard scalars eval/<name>/...; no '/')")
    if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
      raise UserError(f"train.evaluators[{name!r}].every must be a positive integer, got "
                      f"{self.every!r}")
    try:
      benchmark_of(self.task)
      vqa.resolve_version(self.vqa_metric_version)
    except ValueError as e:
      raise UserError(f"train.evaluators[{name!r}]: {e}") from None

  def due(self, step: int, last: int) -> bool:
    return step % self.every == 0 or step == last


class Running:
  """A training run's evaluators, built once the run's model, vocabulary and mesh are known."""

  def __init__(self, specs: dict[str, OfficialMetric], config: ModelConfig, vocabulary: Any,
               answers: Optional[Sequence[str]], partitioner: Partitioner):
    self.specs = specs
    self.evaluators = {}
    shards = partitioner.batch_shards
    for name, spec in specs.items():
      self.evaluators[name] = Evaluator(
          spec.task, spec.split, config, vocabulary, answers,
          inputs_length=spec.inputs_length or gin_utils.query(
              "make_finetune_iterator.inputs_length", 32),
          targets_length=spec.targets_length or gin_utils.query(
              "make_finetune_iterator.targets_length", 32),
          batch_size=spec.batch_size or -(-32 // shards) * shards, method=spec.method,
          beam_size=spec.beam_size, alpha=spec.alpha, max_decode_length=spec.max_decode_length,
          max_examples=spec.max_examples, partitioner=partitioner)

  def due(self, step: int, last: int) -> bool:
    return any(spec.due(step, last) for spec in self.specs.values())

  def __call__(self, step: int, last: int, params: Any) -> tuple[dict[str, float], list[str]]:
    """The scalars of the evaluators due at `step` ({"eval/<name>/<metric>": value}) and their
    console lines."""
    out, lines = {}, []
    for name, evaluator in self.evaluators.items():
      spec = self.specs[name]
      if not spec.due(step, last):
        continue
      scores = evaluator.evaluate(params, spec.caption_metric_names,
                                  spec.vqa_metric_version).scores
      out.update({f"eval/{name}/{k}": v for k, v in scalars(scores).items()})
      lines.append(f"step {step} | eval/{name}: {spec.task} {spec.split} "
                   f"{summary(evaluator.benchmark, scores)} "
                   f"({scores['examples']} examples, {evaluator.method}, "
                   f"{scores['predict_seconds'] + scores['score_seconds']:.1f}s)")
    return out, lines


def check(specs: Any) -> dict[str, OfficialMetric]:
  """`train.evaluators` checked: a dict of name -> OfficialMetric."""
  if specs is None:
    return {}
  if not isinstance(specs, dict) or not all(isinstance(v, OfficialMetric) for v in specs.values()):
    raise UserError(f"train.evaluators must be a dict of name -> @OfficialMetric(), got {specs!r}")
  for name, spec in specs.items():
    spec.check(name)
  return dict(specs)
