"""TFDS builder `snli_ve`: SNLI-VE (image premise, text hypothesis, 3-way label), and its text-only
form for the cross-modality transfer experiment (finetune on text premises, test on images).

Raw files (source_dir, default $SIMVLM_DOWNSTREAM_DIR/snli_ve), from github.com/necla-ml/SNLI-VE:
  snli_ve_{train,dev,test}.jsonl   JSON lines: {"Flickr30K_ID", "sentence1" (the caption the
                                   premise image had in SNLI), "sentence2" (the hypothesis),
                                   "gold_label": "entailment" | "neutral" | "contradiction",
                                   "pairID", ...}
  flickr30k_images/<Flickr30K_ID>.jpg   Flickr30k images (shannon.cs.illinois.edu/DenotationGraph)

Configs: official, shapes (with images); official_text, shapes_text (no images read: the premise is
sentence1; shapes_text reads the shapes world's text-only NLI set from .../shapes/text_nli/).
Splits: train, validation (dev), test. Lines without a gold label ("-") are skipped.
Features: image (image configs only), hypothesis, label (ClassLabel: LABELS), premise_text,
pair_id, flickr30k_id ("" when the line has none).
"""
import dataclasses
import os

import tensorflow_datasets as tfds
from absl import logging

from tasks.downstream import common

LABELS = ("entailment", "neutral", "contradiction")
SPLITS = {"train": "train", "validation": "dev", "test": "test"}
IMAGE_FOLDER = "flickr30k_images"
EXPECTED = {f"snli_ve_{name}.jsonl": f"SNLI-VE {name} pairs, from github.com/necla-ml/SNLI-VE"
            for name in SPLITS.values()}
EXPECTED_IMAGES = {f"{IMAGE_FOLDER}/": "Flickr30k images, from "
                                       "shannon.cs.illinois.edu/DenotationGraph (by request)"}


@dataclasses.dataclass
class SnliVeConfig(tfds.core.BuilderConfig):
  text_only: bool = False
  source_subdir: str = "snli_ve"


class SnliVe(common.RawFilesBuilder):
  """SNLI-VE (or its text premises only), from local files."""
  VERSION = tfds.core.Version("1.0.0")
  EXPECTED = EXPECTED
  BUILDER_CONFIGS = [
      SnliVeConfig(name="official", description="SNLI-VE with Flickr30k images"),
      SnliVeConfig(name="shapes", description="the shapes world's SNLI-VE-style set"),
      SnliVeConfig(name="official_text", text_only=True,
                   description="SNLI-VE's text premises (sentence1), no images"),
      SnliVeConfig(name="shapes_text", text_only=True, source_subdir="text_nli",
                   description="the shapes world's text-only NLI set (scene descriptions)"),
  ]

  def source_subdir(self) -> str:
    return self.builder_config.source_subdir

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "hypothesis": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=LABELS),
        "premise_text": tfds.features.Text(),
        "pair_id": tfds.features.Text(),
        "flickr30k_id": tfds.features.Text(),
    }
    if not self.builder_config.text_only:
      features["image"] = tfds.features.Image(shape=(None, None, 3))
    return self.dataset_info_from_configs(description=__doc__,
                                          features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    root = self.source_dir()
    common.require(self.name, root,
                   EXPECTED if self.builder_config.text_only else {**EXPECTED, **EXPECTED_IMAGES})
    return {split: self._generate_examples(os.path.join(root, f"snli_ve_{name}.jsonl"),
                                           os.path.join(root, IMAGE_FOLDER), split)
            for split, name in SPLITS.items()}

  def _generate_examples(self, path: str, image_folder: str, split: str):
    unlabelled = 0
    with common.SkipCounter(f"{self.name} {split}") as skipped:
      for record in common.read_jsonl(path):
        if record["gold_label"] not in LABELS:
          unlabelled += 1
          continue
        example = {
            "hypothesis": record["sentence2"],
            "label": record["gold_label"],
            "premise_text": record["sentence1"],
            "pair_id": record["pairID"],
            "flickr30k_id": str(record.get("Flickr30K_ID", "")),
        }
        if not self.builder_config.text_only:
          example["image"] = common.read_bytes(
              os.path.join(image_folder, f"{record['Flickr30K_ID']}.jpg"))
          if example["image"] is None:
            skipped.count += 1
            continue
        yield record["pairID"], example
    if unlabelled:
      logging.info("%s %s: skipped %d pairs without a gold label", self.name, split, unlabelled)
