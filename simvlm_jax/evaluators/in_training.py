"""Evaluators inside training (big_vision's `evals`): gin-listed official metrics every N steps.

  train.evaluators = {"vqa": @vqa/OfficialMetric()}
  vqa/OfficialMetric.task = "vqa_v2"
  vqa/OfficialMetric.every = 1000
  train.keep_best_by = "eval/vqa/accuracy"   # optional: keep the best checkpoint by it
  train.keep_best_mode = "max"

Zero-shot captioning of a pretraining run uses the caption task's "a picture of" prompt
(gin/evaluators/zero_shot_captioning.gin). Decoding runs on the training mesh with the training
parameters as they are sharded. TensorBoard gets `eval/<name>/<metric>` (nested scores joined by
"/"), the console one line per evaluation.
"""
import dataclasses
from typing import Any, Callable, Optional, Sequence

import gin

from simvlm_jax import gin_utils
from simvlm_jax.errors import UserError
from simvlm_jax.evaluators.official_metric import Evaluator
from simvlm_jax.evaluators.scoring import always_written, benchmark_of, scalars, summary
from simvlm_jax.metrics import vqa
from simvlm_jax.models import ModelConfig
from simvlm_jax.partitioning import Partitioner


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

  def ranking_scalars(self) -> tuple[str, ...]:
    """The scalars (without "eval/<name>/") every evaluation of this task writes, whatever its
    data: what `train.keep_best_by` may rank by."""
    return always_written(benchmark_of(self.task), self.caption_metric_names)


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

  def __call__(self, step: int, last: int, params: Any,
               should_stop: Callable[[], bool] = lambda: False
               ) -> Optional[tuple[dict[str, float], list[str]]]:
    """The scalars of the evaluators due at `step` ({"eval/<name>/<metric>": value}) and their
    console lines; None when `should_stop` interrupted one (see `Evaluator.predict`)."""
    out, lines = {}, []
    for name, evaluator in self.evaluators.items():
      spec = self.specs[name]
      if not spec.due(step, last):
        continue
      result = evaluator.run(params, spec.caption_metric_names, spec.vqa_metric_version,
                                  should_stop=should_stop)
      if result is None:
        return None
      scores = result.scores
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
