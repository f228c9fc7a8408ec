"""TFDS builder `nlvr2`: NLVR2, a statement about a pair of images, true or false.

Raw files (source_dir, default $SIMVLM_DOWNSTREAM_DIR/nlvr2), from github.com/lil-lab/nlvr:
  train.json, dev.json, test1.json   JSON lines: {"sentence", "label": "True" | "False",
                                     "identifier": "dev-850-0-0", "directory" (train only), ...}
  images/train/<directory>/, images/dev/, images/test1/   (or train/, dev/, test1/ at the top)
An example's images are `<identifier without its last -N>-img0.png` and `-img1.png`.

Splits: train, validation (dev), test (test1). Features: image_left (img0), image_right (img1),
sentence, label (bool), identifier.
"""
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks.downstream import common

SPLITS = {"train": "train", "validation": "dev", "test": "test1"}
EXPECTED = {
    **{f"{name}.json": f"NLVR2 {name} statements, from github.com/lil-lab/nlvr (nlvr2/data)"
       for name in SPLITS.values()},
    "images/": "NLVR2 images: images/{train/<directory>,dev,test1}/ (or {train,dev,test1}/ at the "
               "top), from the NLVR2 image release (lil.nlp.cornell.edu/nlvr)",
}


def image_names(identifier: str) -> tuple[str, str]:
  """"dev-850-0-0" -> ("dev-850-0-img0.png", "dev-850-0-img1.png")."""
  pair = identifier.rsplit("-", 1)[0]
  return f"{pair}-img0.png", f"{pair}-img1.png"


class Nlvr2(common.RawFilesBuilder):
  """NLVR2 statements with both images, from local files."""
  VERSION = tfds.core.Version("1.0.0")
  SOURCE_SUBDIR = "nlvr2"
  EXPECTED = EXPECTED

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image_left": tfds.features.Image(shape=(None, None, 3)),
            "image_right": tfds.features.Image(shape=(None, None, 3)),
            "sentence": tfds.features.Text(),
            "label": tfds.features.Scalar(dtype=np.bool_),
            "identifier": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    root = self.source_dir()
    # The documented layout has images/<split>/; some unpack the image archives at the top.
    top_level = (not tf.io.gfile.exists(os.path.join(root, "images")) and
                 all(tf.io.gfile.exists(os.path.join(root, name)) for name in SPLITS.values()))
    common.require(self.name, root,
                   {k: v for k, v in EXPECTED.items() if not (top_level and k == "images/")})
    image_root = root if top_level else os.path.join(root, "images")
    return {split: self._generate_examples(os.path.join(root, f"{name}.json"),
                                           os.path.join(image_root, name), split)
            for split, name in SPLITS.items()}

  def _generate_examples(self, path: str, image_folder: str, split: str):
    with common.SkipCounter(f"{self.name} {split}") as skipped:
      for record in common.read_jsonl(path):
        folder = os.path.join(image_folder, str(record.get("directory", "")))
        left, right = (common.read_bytes(os.path.join(folder, name))
                       for name in image_names(record["identifier"]))
        if left is None or right is None:
          skipped.count += 1
          continue
        yield record["identifier"], {
            "image_left": left,
            "image_right": right,
            "sentence": record["sentence"],
            "label": record["label"] == "True",
            "identifier": record["identifier"],
        }
