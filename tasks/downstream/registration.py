"""SeqIO Tasks of the downstream benchmarks, one per benchmark and variant.

`register_downstream(benchmark, variant)` registers one Task over the built TFDS dataset
`<tfds name>/<variant>` in `data_dir` (default `simvlm_jax.data.paths.tfds_data_dir()`, i.e.
SIMVLM_DATA_DIR) and returns its name: the benchmark's name for variant "official", "shapes_" +
it for the shapes world. Callable from gin (`@tasks.register_downstream()`).

Task features (examples before a feature converter). Token features are int32 ids of
`tasks.VOCABULARY` without EOS (the converter appends it), each with a `<name>_pretokenized`
string copy; images are encoded bytes (tf.string scalars) that the pipeline decodes.

  coco_captions, nocaps   image; inputs = CAPTION_PROMPT; targets = one reference caption (a new
                          random pick each epoch, "" if the split has none, as NoCaps test).
                          Pass-through: captions (string [n], every reference, for the metrics),
                          image_id; nocaps also domain ("in-domain" | "near-domain" | "out-domain").
  vqa_v2                  image; inputs = question; targets = multiple_choice_answer.
                          Pass-through for the metric and the classifier: answers (string [10],
                          raw), answer_type, question_type, question_id, image_id, answer_ids
                          (int32 [k], into `tasks.downstream.vqa_v2.load_answer_vocab(variant)`),
                          answer_scores (float32 [k], VQA scores of those answers).
  nlvr2                   image_left, image_right; inputs = sentence; targets = "true" | "false".
                          Pass-through: label (int32 1 = true), identifier.
  snli_ve                 image; inputs = hypothesis; targets = "entailment" | "neutral" |
                          "contradiction". Pass-through: label (int32, index in snli_ve.LABELS),
                          pair_id, premise_text (the caption premise, a string: untokenized, so
                          no converter feeds it to the model beside the image).
  snli_ve_text            premise = the text premise (sentence1), inputs, targets and
                          pass-through as snli_ve, no image ("image" declared optional and never
                          produced): finetune on text premises, then evaluate on snli_ve.

Every task carries the benchmark's official metric as seqio `metric_fns` (`simvlm_jax.metrics`;
VQA accuracy in its current "2021" version unless `register_downstream(vqa_metric_version=...)`),
with a `postprocess_fn` that hands the metric what it scores against: the 10 human answers and the
answer type (vqa_v2), every reference caption (coco_captions, nocaps), the label word (nlvr2,
snli_ve). (`seqio.Evaluator` cannot cache tasks whose images are encoded-bytes scalars: it
measures every feature's length. `simvlm_jax.eval` is the evaluator.)

Splits: train, validation, test (coco_captions; shapes adds compositional), validation and test
(nocaps; shapes: validation), train, validation and test_dev, test (vqa_v2; shapes: train,
validation), train, validation, test (nlvr2, snli_ve, snli_ve_text).
"""
import dataclasses
import functools
from typing import Callable, Optional

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from simvlm_jax.data import paths
from simvlm_jax.metrics import captions as caption_metrics
from simvlm_jax.metrics import classification
from simvlm_jax.metrics import vqa as vqa_metrics
from tasks import pretraining, shapes_caption_check
from tasks.downstream import nocaps, snli_ve

VARIANTS = ("official", "shapes")
CAPTION_PROMPT = "a picture of"  # the paper's captioning prompt, in the shapes world's lower case

_TEXT = pretraining.IMAGE_TEXT_FEATURES["text"]
_IMAGE = pretraining.IMAGE_TEXT_FEATURES["image"]
_NO_IMAGE = pretraining.TEXT_FEATURES["image"]  # optional: text-only tasks never produce it


@seqio.map_over_dataset(num_seeds=1)
def _caption_example(example: dict, seed: tf.Tensor) -> dict:
  captions = example["captions"]
  # Appending "" makes index 0 valid (and the target empty) when there are no references.
  count = tf.maximum(tf.shape(captions)[0], 1)
  pick = tf.random.stateless_uniform([], seed, minval=0, maxval=count, dtype=tf.int32)
  out = {"image": example["image"], "inputs": CAPTION_PROMPT,
         "targets": tf.concat([captions, [""]], axis=0)[pick], "captions": captions,
         "image_id": example["image_id"]}
  if "domain" in example:
    out["domain"] = tf.gather(tf.constant(nocaps.DOMAINS), example["domain"])
  if "scene" in example:  # the shapes world's ground truth, for caption correctness
    out["scene"] = example["scene"]
  return out


@seqio.map_over_dataset
def _vqa_example(example: dict) -> dict:
  passed = ("answers", "answer_type", "question_type", "question_id", "image_id", "answer_ids",
            "answer_scores")
  return {"image": example["image"], "inputs": example["question"],
          "targets": example["multiple_choice_answer"], **{k: example[k] for k in passed}}


@seqio.map_over_dataset
def _nlvr2_example(example: dict) -> dict:
  return {"image_left": example["image_left"], "image_right": example["image_right"],
          "inputs": example["sentence"], "targets": tf.where(example["label"], "true", "false"),
          "label": tf.cast(example["label"], tf.int32), "identifier": example["identifier"]}


@seqio.map_over_dataset
def _nli_example(example: dict) -> dict:
  out = {"inputs": example["hypothesis"],
         "targets": tf.gather(tf.constant(snli_ve.LABELS), example["label"]),
         "label": tf.cast(example["label"], tf.int32), "pair_id": example["pair_id"]}
  if "image" in example:  # the image is the premise; its text only rides along
    return {**out, "image": example["image"], "premise_text": example["premise_text"]}
  return {**out, "premise": example["premise_text"]}


def _vqa_postprocess(output, example=None, is_target=False):
  """A target becomes what VQA accuracy needs (answers, answer type); a prediction stays text."""
  if is_target:
    return {"answers": example["answers"], "answer_type": example["answer_type"]}
  return output


def _caption_postprocess(output, example=None, is_target=False):
  """A target becomes every reference caption of the image; a prediction stays text."""
  return list(example["captions"]) if is_target else output


def _tokenize(dataset: tf.data.Dataset, output_features: dict) -> tf.data.Dataset:
  """Tokenizes the text features only (images are tf.string features too, but stay bytes)."""
  text = {k: f for k, f in output_features.items() if f.dtype != tf.string}
  return seqio.preprocessors.tokenize(dataset, text, copy_pretokenized=True)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  tfds_name: str
  config_suffix: str  # appended to the variant: snli_ve/official_text
  splits: dict[str, tuple[str, ...]]  # per variant
  preprocessor: Callable
  output_features: dict[str, seqio.Feature]
  metric_fn: Callable  # seqio metric fn: (targets, predictions) -> {name: number}
  postprocess_fn: Optional[Callable] = None


BENCHMARKS = {
    "coco_captions": Benchmark(
        "coco_karpathy", "",
        {"official": ("train", "validation", "test"),
         "shapes": ("train", "validation", "test", "compositional")},
        _caption_example, {"image": _IMAGE, "inputs": _TEXT, "targets": _TEXT},
        caption_metrics.coco_caption_metric, _caption_postprocess),
    "nocaps": Benchmark(
        "nocaps", "", {"official": ("validation", "test"), "shapes": ("validation",)},
        _caption_example, {"image": _IMAGE, "inputs": _TEXT, "targets": _TEXT},
        caption_metrics.coco_caption_metric, _caption_postprocess),
    "vqa_v2": Benchmark(
        "vqa_v2", "",
        {"official": ("train", "validation", "test_dev", "test"),
         "shapes": ("train", "validation")},
        _vqa_example, {"image": _IMAGE, "inputs": _TEXT, "targets": _TEXT},
        vqa_metrics.vqa_metric, _vqa_postprocess),
    "nlvr2": Benchmark(
        "nlvr2", "", {v: ("train", "validation", "test") for v in VARIANTS}, _nlvr2_example,
        {"image_left": _IMAGE, "image_right": _IMAGE, "inputs": _TEXT, "targets": _TEXT},
        classification.nlvr2_metric),
    "snli_ve": Benchmark(
        "snli_ve", "", {v: ("train", "validation", "test") for v in VARIANTS}, _nli_example,
        {"image": _IMAGE, "inputs": _TEXT, "targets": _TEXT}, classification.snli_ve_metric),
    "snli_ve_text": Benchmark(
        "snli_ve", "_text", {v: ("train", "validation", "test") for v in VARIANTS}, _nli_example,
        {"image": _NO_IMAGE, "inputs": _TEXT, "premise": _TEXT, "targets": _TEXT},
        classification.snli_ve_metric),
}


def tfds_name(benchmark: str, variant: str = "official") -> str:
  """The TFDS dataset (name/config:version) a benchmark's task reads, e.g. "nlvr2/shapes:1.0.0"."""
  spec = BENCHMARKS[benchmark]
  version = tfds.builder_cls(spec.tfds_name).VERSION
  return f"{spec.tfds_name}/{variant}{spec.config_suffix}:{version}"


def register_downstream(benchmark: str, variant: str = "official",
                        data_dir: Optional[str] = None, name: Optional[str] = None,
                        vqa_metric_version: str = vqa_metrics.DEFAULT_VERSION) -> str:
  """Registers one downstream Task (once) and returns its name. See the module docstring.

  `vqa_metric_version` (vqa_v2 only): the VQA accuracy version of the task's metric fn, "2021" /
  "current" (default) or "2016" / "legacy" (`simvlm_jax.metrics.vqa`). Any other than the default
  needs a `name` of its own: a task is registered once, so "vqa_v2" always means the default.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  spec = BENCHMARKS[benchmark]
  vqa_metric_version = vqa_metrics.resolve_version(vqa_metric_version)
  metric_fn = spec.metric_fn
  if vqa_metric_version != vqa_metrics.DEFAULT_VERSION:
    if benchmark != "vqa_v2":
      raise ValueError(f"vqa_metric_version is for vqa_v2, not {benchmark!r}")
    if name is None:
      raise ValueError(f"VQA metric version {vqa_metric_version!r} needs a task name of its own")
    metric_fn = functools.partial(vqa_metrics.vqa_metric, version=vqa_metric_version)
  images = [k for k, f in spec.output_features.items() if f.dtype == tf.string and f.required]
  return pretraining._add_task(  # pylint: disable=protected-access
      name or (benchmark if variant == "official" else f"{variant}_{benchmark}"),
      source=seqio.TfdsDataSource(
          tfds_name(benchmark, variant), tfds_data_dir=data_dir or paths.tfds_data_dir(),
          splits=spec.splits[variant], read_only=True,
          decoders={k: tfds.decode.SkipDecoding() for k in images}),  # the pipeline decodes
      preprocessors=[spec.preprocessor, _tokenize],
      output_features=spec.output_features,
      postprocess_fn=spec.postprocess_fn,
      # The shapes world's captions are also checked against their scenes.
      metric_fns=[metric_fn] + ([shapes_caption_check.caption_correctness]
                                if variant == "shapes" and benchmark in ("coco_captions", "nocaps")
                                else []))


def register_all(data_dir: Optional[str] = None) -> list[str]:
  """Registers every benchmark in both variants; returns the task names."""
  return [register_downstream(b, v, data_dir) for v in VARIANTS for b in BENCHMARKS]


gin.external_configurable(register_downstream, module="tasks")
