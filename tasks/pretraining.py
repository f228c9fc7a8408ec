"""SeqIO Tasks and Mixtures for pretraining. Each register_* function registers once, returns names.

Task features (what `simvlm_jax.data.feature_converter` expects):
  image-text tasks: {"image": encoded image bytes (a required feature), "text": tokens}
  text-only tasks:  {"text": tokens} ("image" declared, but optional and absent)
Tokens carry no EOS here; the feature converter appends it after truncation.

Mixtures name their image-text and text-only tasks with rates; the pipeline fills each batch with
a fixed number of rows of each kind (set in gin), and uses the rates to weigh tasks of the same
kind. IMAGE_TEXT_RATE : TEXT_RATE records the paper's 4,096 : 512 rows per batch.
"""
import dataclasses
import functools
from typing import Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from simvlm_jax.data import paths
from tasks import webdataset
from tasks.vocabularies import VOCABULARY

IMAGE_TEXT_RATE, TEXT_RATE = 4096, 512

_TEXT = seqio.Feature(VOCABULARY, add_eos=False)
_IMAGE = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.string, rank=0)
IMAGE_TEXT_FEATURES = {"image": _IMAGE, "text": _TEXT}
# Text-only tasks declare "image" as optional and never produce it: a seqio Mixture needs equal
# feature names across its tasks, and the pipeline sends tasks whose "image" is not required to
# the text-only sub-batch.
TEXT_FEATURES = {"image": dataclasses.replace(_IMAGE, required=False), "text": _TEXT}
_TOKENIZE = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
_SKIP_IMAGE_DECODING = {"image": tfds.decode.SkipDecoding()}  # the pipeline decodes (and counts)

TaskRates = Union[Sequence[str], Mapping[str, float]]


@seqio.map_over_dataset(num_seeds=1)
def _one_caption(example: dict, seed: tf.Tensor) -> dict:
  """A random one of the example's captions (a new draw each epoch)."""
  captions = example["captions"]
  pick = tf.random.stateless_uniform([], seed, minval=0, maxval=tf.shape(captions)[0],
                                     dtype=tf.int32)
  return {"image": example["image"], "text": captions[pick]}


@seqio.map_over_dataset
def _line_to_text(line: tf.Tensor) -> dict:
  return {"text": line}


def _add_task(name: str, **kwargs) -> str:
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(name, **kwargs)
  return name


def register_shapes(config: str = "64px", data_dir: Optional[str] = None,
                    prefix: Optional[str] = None) -> str:
  """Registers the shapes world at one resolution; returns the pretraining mixture's name.

  Tasks: `<prefix>_image_text` (shapes_world/<config>) and `<prefix>_text` (shapes_world_text);
  mixture: `<prefix>_pretrain`. prefix defaults to "shapes" + the config without "px" (e.g.
  "shapes64"); data_dir defaults to `simvlm_jax.data.paths.tfds_data_dir()`.
  """
  data_dir = data_dir or paths.tfds_data_dir()
  prefix = prefix or "shapes" + config.replace("px", "")
  image_text = _add_task(
      f"{prefix}_image_text",
      source=seqio.TfdsDataSource(
          f"shapes_world/{config}:1.0.0", tfds_data_dir=data_dir,
          splits=("train", "validation", "compositional"), decoders=_SKIP_IMAGE_DECODING,
          read_only=True),
      preprocessors=[_one_caption, _TOKENIZE],
      output_features=IMAGE_TEXT_FEATURES)
  text = _add_task(
      f"{prefix}_text",
      source=seqio.TfdsDataSource("shapes_world_text:1.0.0", tfds_data_dir=data_dir,
                                  splits=("train", "validation"), read_only=True),
      preprocessors=[_TOKENIZE],
      output_features=TEXT_FEATURES)
  return register_pretrain_mixture(f"{prefix}_pretrain", [image_text], [text])


def register_image_text_folder(task_name: str, data_dir: str) -> str:
  """Registers the `image_text_folder` dataset built in `data_dir` (see tasks/folder_builder.py)."""
  return _add_task(
      task_name,
      source=seqio.TfdsDataSource("image_text_folder:1.0.0", tfds_data_dir=data_dir,
                                  decoders=_SKIP_IMAGE_DECODING, read_only=True),
      preprocessors=[functools.partial(seqio.preprocessors.rekey,
                                       key_map={"image": "image", "text": "caption"}),
                     _TOKENIZE],
      output_features=IMAGE_TEXT_FEATURES)


def register_webdataset(task_name: str, shards: webdataset.Shards,
                        validation_shards: Optional[webdataset.Shards] = None,
                        image_ext: Sequence[str] = webdataset.IMAGE_EXTENSIONS,
                        caption_ext: str = "txt") -> str:
  """Registers img2dataset WebDataset shards (`<shard>.tar` files; globs allowed), read in place.

  Each sample's image is its member with the first of `image_ext` it has, its caption the
  `caption_ext` member; hosts read whole files (at least one per host). See tasks/webdataset.py.
  """
  return _add_task(
      task_name,
      source=webdataset.webdataset_source(shards, validation_shards, image_ext, caption_ext),
      preprocessors=[_TOKENIZE],
      output_features=IMAGE_TEXT_FEATURES)


def register_image_text_parquet(task_name: str, shards: webdataset.Shards,
                                validation_shards: Optional[webdataset.Shards] = None,
                                image_column: str = "jpg", caption_column: str = "caption") -> str:
  """Registers parquet shards of image bytes and captions (img2dataset's output_format=parquet).

  Globs allowed; files are read in place, whole files per host (at least one per host). Rows whose
  image is null (img2dataset's failed downloads) are skipped. See tasks/webdataset.py.
  """
  return _add_task(
      task_name,
      source=webdataset.parquet_source(shards, validation_shards, image_column, caption_column),
      preprocessors=[_TOKENIZE],
      output_features=IMAGE_TEXT_FEATURES)


def register_text_file(task_name: str, train_files: Union[str, Sequence[str]],
                       validation_files: Union[str, Sequence[str], None] = None) -> str:
  """Registers a text-only task over plain-text files (one example per line; globs allowed)."""
  splits = {"train": train_files}
  if validation_files:
    splits["validation"] = validation_files
  return _add_task(
      task_name,
      source=seqio.TextLineDataSource(splits),
      preprocessors=[_line_to_text, _TOKENIZE],
      output_features=TEXT_FEATURES)


def register_pretrain_mixture(name: str, image_text_tasks: TaskRates, text_tasks: TaskRates,
                              image_text_rate: float = IMAGE_TEXT_RATE,
                              text_rate: float = TEXT_RATE) -> str:
  """Registers a mixture of image-text and text-only tasks; returns `name`.

  Each task list is a list of names (sharing their kind's rate equally) or a {name: weight}
  mapping (sharing it in proportion).
  """
  rates = []
  for tasks, total in ((image_text_tasks, image_text_rate), (text_tasks, text_rate)):
    weights = dict(tasks) if isinstance(tasks, Mapping) else {t: 1.0 for t in tasks}
    rates += [(t, total * w / sum(weights.values())) for t, w in weights.items()]
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(name, rates)
  return name


# Gin sees configurable versions (e.g. `@register_shapes()` as a value); Python calls, such as the
# presets registered on `import tasks`, stay untouched by gin bindings.
for _fn in (register_shapes, register_image_text_folder, register_webdataset,
            register_image_text_parquet, register_text_file, register_pretrain_mixture):
  gin.external_configurable(_fn, module="tasks")
