"""TFDS builder `nocaps`: NoCaps, for evaluating a COCO-finetuned captioner.

Raw files (source_dir, default $SIMVLM_DOWNSTREAM_DIR/nocaps):
  nocaps_val_4500_captions.json   COCO-style: {"images": [{"id", "file_name", "open_images_id",
                                  "domain": "in-domain" | "near-domain" | "out-domain", ...}],
                                  "annotations": [{"image_id", "caption", "id"}, ...]}
  val/                            the validation images (Open Images), named by file_name
  nocaps_test_image_info.json     (optional) the test images, no captions (scored by the server)
  test/                           (with the test file) the test images

Splits: validation, test (if its file is there). Features: image, image_id, open_images_id,
domain (ClassLabel: DOMAINS, for per-domain CIDEr), captions (every reference; empty for test);
config shapes also scene (the image's objects as JSON, from the shapes world's scenes.jsonl).
"""
import collections
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks.downstream import common

DOMAINS = ("in-domain", "near-domain", "out-domain")
VAL_FILE, TEST_FILE = "nocaps_val_4500_captions.json", "nocaps_test_image_info.json"
EXPECTED = {
    VAL_FILE: "NoCaps validation annotations, from nocaps.org/download",
    "val/": "NoCaps validation images (Open Images, via nocaps.org/download)",
}
OPTIONAL = {
    TEST_FILE: "NoCaps test image info, from nocaps.org/download (optional)",
    "test/": "NoCaps test images (with the test file)",
}


class Nocaps(common.RawFilesBuilder):
  """NoCaps validation (and test) images with their domains, from local files."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "config shapes: the scene feature"}
  SOURCE_SUBDIR = "nocaps"
  EXPECTED = EXPECTED

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "open_images_id": tfds.features.Text(),
            "domain": tfds.features.ClassLabel(names=DOMAINS),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            **self.scene_features(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    root = self.source_dir()
    common.require(self.name, root, EXPECTED, OPTIONAL)
    splits = {"validation": self._generate_examples(root, VAL_FILE, "val")}
    if tf.io.gfile.exists(os.path.join(root, TEST_FILE)):
      splits["test"] = self._generate_examples(root, TEST_FILE, "test")
    return splits

  def _generate_examples(self, root: str, annotation_file: str, image_folder: str):
    data = common.read_json(os.path.join(root, annotation_file))
    scenes = self.read_scenes(root)
    captions = collections.defaultdict(list)
    for annotation in data.get("annotations", ()):
      captions[annotation["image_id"]].append(annotation["caption"].strip())
    with common.SkipCounter(f"{self.name} {image_folder}") as skipped:
      for image in data["images"]:
        encoded = common.read_bytes(os.path.join(root, image_folder, image["file_name"]))
        if encoded is None:
          skipped.count += 1
          continue
        yield image["id"], {
            "image": encoded,
            "image_id": image["id"],
            "open_images_id": image["open_images_id"],
            "domain": image["domain"],
            "captions": captions[image["id"]],
            **self.scene_of(scenes, f"{image_folder}/{image['file_name']}"),
        }
