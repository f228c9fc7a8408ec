"""TFDS builder `coco_karpathy`: COCO captions on the Karpathy split.

Raw files (source_dir, default $SIMVLM_DOWNSTREAM_DIR/coco):
  dataset_coco.json   the Karpathy split file: {"images": [{"filepath": "val2014",
                      "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895,
                      "split": "train" | "restval" | "val" | "test",
                      "sentences": [{"raw": ..., "tokens": [...]}, ...]}, ...]}
  train2014/ val2014/ the COCO 2014 images

Splits: train (train + restval), validation (val), test; any other split name in the file becomes
a split of its own (the shapes world adds "compositional").
Features: image (encoded bytes as stored), image_id (cocoid), file_name, captions (every reference);
config shapes also scene (the image's objects as JSON, from the shapes world's scenes.jsonl).
"""
import collections
import os

import numpy as np
import tensorflow_datasets as tfds

from tasks.downstream import common

SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
EXPECTED = {
    "dataset_coco.json": "Karpathy splits, from the Karpathy/neuraltalk release "
                         "(cs.stanford.edu/people/karpathy/deepimagesent)",
    "train2014/": "COCO 2014 train images, from cocodataset.org",
    "val2014/": "COCO 2014 val images, from cocodataset.org",
}


class CocoKarpathy(common.RawFilesBuilder):
  """COCO captions, Karpathy split, from local files."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "config shapes: the scene feature"}
  SOURCE_SUBDIR = "coco"
  EXPECTED = EXPECTED

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "file_name": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            **self.scene_features(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    root = self.source_dir()
    common.require(self.name, root, EXPECTED)
    scenes = self.read_scenes(root)
    images = collections.defaultdict(list)
    for image in common.read_json(os.path.join(root, "dataset_coco.json"))["images"]:
      images[SPLITS.get(image["split"], image["split"])].append(image)
    return {split: self._generate_examples(root, split, entries, scenes)
            for split, entries in images.items()}

  def _generate_examples(self, root: str, split: str, images: list, scenes: dict):
    with common.SkipCounter(f"{self.name} {split}") as skipped:
      for image in images:
        file_name = os.path.join(image["filepath"], image["filename"])
        data = common.read_bytes(os.path.join(root, file_name))
        if data is None:
          skipped.count += 1
          continue
        yield image["cocoid"], {
            "image": data,
            "image_id": image["cocoid"],
            "file_name": file_name,
            "captions": [s["raw"].strip() for s in image["sentences"]],
            **self.scene_of(scenes, file_name),
        }
