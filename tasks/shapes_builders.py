"""TFDS builders of the shapes world: `shapes_world` (image-text) and `shapes_world_text`.

  tfds.builder("shapes_world/64px", data_dir=...)      # 64x64 JPEG; 16px..224px, also *_png
  ShapesWorld(config="64px", data_dir=d, split_sizes={"train": 50_000}).download_and_prepare()

Configs fix what an example looks like (resolution, encoding); how many examples a build makes
(`split_sizes`), the `seed` and the number of worker processes are build arguments, recorded in
the dataset's metadata. Example i of a split depends only on (seed, split, i), so a larger build
is a superset of a smaller one.
"""
import dataclasses
import functools
import multiprocessing
import os
from typing import Callable, Iterator, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds

from tasks import shapes_world
from tasks import tfds_compat

_RESOLUTIONS = range(16, 225, 8)  # every multiple of 8 up to 224


@dataclasses.dataclass
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """What a stored image looks like: side length in pixels and "jpeg" or "png"."""
  image_size: int = 64
  encoding: str = "jpeg"


def _parallel_map(fn: Callable[[int], dict], count: int, num_workers: int) -> Iterator[dict]:
  """fn(0), ..., fn(count - 1) in order; on `num_workers` forked processes if > 0.

  Workers overlap example generation with TFDS's encoding and writing in this process.
  """
  if num_workers < 1 or count < 256:
    yield from map(fn, range(count))
    return
  # fork starts workers instantly (spawn would re-import everything); it is safe here because
  # they only run numpy/PIL code, never TensorFlow.
  with multiprocessing.get_context("fork").Pool(num_workers) as pool:
    yield from pool.imap(fn, range(count), chunksize=64)


class _ShapesBuilder(tfds_compat.QuietPrepare, tfds.core.GeneratorBasedBuilder):
  """Build arguments shared by both shapes builders."""
  DEFAULT_SPLIT_SIZES: Mapping[str, int] = {}

  def __init__(self, *, split_sizes: Optional[Mapping[str, int]] = None, seed: int = 0,
               num_workers: Optional[int] = None, **kwargs):
    unknown = set(split_sizes or {}) - set(self.DEFAULT_SPLIT_SIZES)
    if unknown:
      raise ValueError(f"unknown splits {sorted(unknown)}; splits are "
                       f"{sorted(self.DEFAULT_SPLIT_SIZES)}")
    self._split_sizes = {**self.DEFAULT_SPLIT_SIZES, **(split_sizes or {})}
    self._seed = seed
    self._num_workers = max(0, (os.cpu_count() or 1) - 1) if num_workers is None else num_workers
    super().__init__(**kwargs)

  def _metadata(self) -> tfds.core.MetadataDict:
    return tfds.core.MetadataDict(seed=self._seed, split_sizes=dict(self._split_sizes))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated
    return {split: self._generate_examples(split, count)
            for split, count in self._split_sizes.items() if count > 0}


class ShapesWorld(_ShapesBuilder):
  """Procedural scenes of 1-3 coloured shapes with five captions each.

  Splits: train and validation (same distribution) and compositional (every image holds a
  colour-shape pair that training never shows; see shapes_world.HELD_OUT_PAIRS).
  """
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      ShapesWorldConfig(name=f"{size}px{'' if encoding == 'jpeg' else '_png'}",
                        image_size=size, encoding=encoding,
                        description=f"{size}x{size} images, {encoding.upper()}-encoded")
      for encoding in ("jpeg", "png") for size in _RESOLUTIONS
  ]
  DEFAULT_SPLIT_SIZES = {"train": 40_000, "validation": 2_000, "compositional": 2_000}

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3),
                                         encoding_format=self.builder_config.encoding),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=5),
            "objects": tfds.features.Sequence({
                "colour": tfds.features.ClassLabel(names=list(shapes_world.COLOURS)),
                "shape": tfds.features.ClassLabel(names=list(shapes_world.SHAPES)),
                "size": tfds.features.ClassLabel(names=list(shapes_world.SIZES)),
                "x": tfds.features.Scalar(np.float32),
                "y": tfds.features.Scalar(np.float32),
            }),
            "background": tfds.features.ClassLabel(names=list(shapes_world.BACKGROUNDS)),
        }),
        metadata=self._metadata(),
    )

  def _generate_examples(self, split: str, count: int):
    make = functools.partial(shapes_world.image_text_example, self._seed, split,
                             image_size=self.builder_config.image_size,
                             encoding=self.builder_config.encoding)
    yield from enumerate(_parallel_map(make, count, self._num_workers))


class ShapesWorldText(_ShapesBuilder):
  """Text-only statements about the shapes world (scene descriptions, facts, rules), no images.

  Uses only training colour-shape pairs, so it leaks nothing about the compositional split.
  """
  VERSION = tfds.core.Version("1.0.0")
  DEFAULT_SPLIT_SIZES = {"train": 100_000, "validation": 2_000}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        metadata=self._metadata(),
    )

  def _generate_examples(self, split: str, count: int):
    make = functools.partial(shapes_world.text_example, self._seed, split)
    yield from enumerate(_parallel_map(make, count, self._num_workers))
