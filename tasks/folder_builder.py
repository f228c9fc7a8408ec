"""TFDS builder for your own image-text data: `image_text_folder`.

The source folder holds, per split, `<split>.jsonl` and/or `<split>.tsv`:
  <split>.jsonl   one {"image": path, "caption": text} object per line
  <split>.tsv     caption <TAB> url-or-path per line (the CC3M layout)
Relative paths are relative to the folder; http(s) URLs are fetched at build time.

  ImageTextFolder(data_dir=out_dir, source_dir=folder).download_and_prepare()

Image bytes are stored exactly as read, never re-encoded or checked: an image the pipeline cannot
decode is dropped and counted at training time, not at build time. Lines whose image cannot be
read at all (missing file, failed download) are skipped and their number logged.
"""
import json
import os
import urllib.request
from typing import Iterator, Optional

import tensorflow_datasets as tfds
from absl import logging

from tasks import tfds_compat

_URL_TIMEOUT_S = 30


def _read_lines(path: str) -> Iterator[tuple[int, str, str]]:
  """(line number, image reference, caption) of a .jsonl or .tsv file."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      if path.endswith(".jsonl"):
        record = json.loads(line)
        yield number, record["image"], record.get("caption") or ""
      else:
        caption, _, reference = line.partition("\t")
        yield number, reference.strip(), caption


def _read_image(reference: str, folder: str) -> Optional[bytes]:
  try:
    if reference.startswith(("http://", "https://")):
      with urllib.request.urlopen(reference, timeout=_URL_TIMEOUT_S) as response:
        return response.read()
    with open(os.path.join(folder, reference), "rb") as f:
      return f.read()
  except OSError as e:
    logging.warning("skipping image %s: %s", reference, e)
    return None


class ImageTextFolder(tfds_compat.QuietPrepare, tfds.core.GeneratorBasedBuilder):
  """Image-caption pairs from a local folder of JSONL / TSV (CC3M-style) files."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source_dir: Optional[str] = None, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "source": tfds.features.Text(),  # where the image came from
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # files are local or fetched one by one (a failed URL skips one example)
    if not self._source_dir or not os.path.isdir(self._source_dir):
      raise ValueError(f"ImageTextFolder needs source_dir=<folder>, got {self._source_dir!r}")
    files = {}
    for name in sorted(os.listdir(self._source_dir)):
      split, ext = os.path.splitext(name)
      if ext in (".jsonl", ".tsv"):
        files.setdefault(split, []).append(os.path.join(self._source_dir, name))
    if not files:
      raise ValueError(f"no <split>.jsonl or <split>.tsv file in {self._source_dir}")
    return {split: self._generate_examples(paths) for split, paths in files.items()}

  def _generate_examples(self, paths: list[str]):
    skipped = 0
    for path in paths:
      for number, reference, caption in _read_lines(path):
        image = _read_image(reference, self._source_dir)
        if image is None:
          skipped += 1
          continue
        yield f"{os.path.basename(path)}:{number}", {
            "image": image, "caption": caption, "source": reference}
    if skipped:
      logging.warning("skipped %d unreadable images of %s", skipped, paths)
