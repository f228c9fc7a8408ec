"""What every downstream reader shares: where its raw files are, the error when they are not
there, reading files, and the `official` / `shapes` builder configs.

Raw files are never downloaded. A builder reads them from `source_dir=` (the benchmark's folder)
or else from `<source_root>/<subdir>`, where source_root defaults to $SIMVLM_DOWNSTREAM_DIR
(~/simvlm_downstream if unset) for config `official` and to $SIMVLM_DOWNSTREAM_DIR/shapes for
config `shapes`: the shapes world's benchmarks, which `tasks/shapes_downstream.py` writes in the
same official formats.
"""
import json
import os
from typing import Iterator, Mapping, Optional

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from tasks import tfds_compat

SOURCE_DIR_ENV = "SIMVLM_DOWNSTREAM_DIR"
SCENES_FILE = "scenes.jsonl"  # the shapes world's ground truth, beside each benchmark's files


def default_root(config: str) -> str:
  """The folder with one subfolder per benchmark that a config reads when not told otherwise."""
  root = os.path.expanduser(os.environ.get(SOURCE_DIR_ENV) or "~/simvlm_downstream")
  return os.path.join(root, "shapes") if config.startswith("shapes") else root


def require(dataset: str, root: str, expected: Mapping[str, str],
            optional: Optional[Mapping[str, str]] = None) -> None:
  """Raises FileNotFoundError naming every missing entry of `expected` and where each comes from.

  Keys are paths relative to `root` (a trailing "/" marks a folder); values say what the entry is
  and where to get it. `optional` entries are listed in the message but never missing.
  """
  missing = [path for path in expected if not tf.io.gfile.exists(os.path.join(root, path))]
  if not missing:
    return
  lines = [f"  {path:<48} {about}" for path, about in {**expected, **(optional or {})}.items()]
  raise FileNotFoundError(
      f"{dataset}: missing {', '.join(missing)} in {root}.\nExpected there:\n" + "\n".join(lines) +
      f"\nPass source_dir=<that folder>, or point {SOURCE_DIR_ENV} (or `python -m tasks.build "
      f"downstream --source_dir`) at the folder above it.")


def read_bytes(path: str) -> Optional[bytes]:
  """The file's bytes, or None (logged) if unreadable: a missing image skips one example."""
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  except (OSError, tf.errors.NotFoundError) as e:
    logging.warning("skipping unreadable file %s: %s", path, e)
    return None


def read_json(path: str):
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def read_jsonl(path: str) -> Iterator[dict]:
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      if line.strip():
        yield json.loads(line)


class SkipCounter:
  """Counts examples skipped for unreadable images and logs the total once a split is done."""

  def __init__(self, what: str):
    self.what, self.count = what, 0

  def __enter__(self) -> "SkipCounter":
    return self

  def __exit__(self, *exc) -> None:
    if self.count:
      logging.warning("%s: skipped %d examples whose images could not be read", self.what,
                      self.count)


class RawFilesBuilder(tfds_compat.QuietPrepare, tfds.core.GeneratorBasedBuilder):
  """A reader of an official release in a local folder (no downloads).

  Subclasses set SOURCE_SUBDIR (their folder under the source root) and EXPECTED (what it holds:
  {relative path: what it is and where it comes from}, "/" ending folders), and read
  `self.source_dir()` in `_split_generators`.
  """
  SOURCE_SUBDIR = ""
  EXPECTED: Mapping[str, str] = {}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="official", description="the official release"),
      tfds.core.BuilderConfig(name="shapes",
                              description="the shapes world's benchmark in the official format"),
  ]

  def __init__(self, *, source_dir: Optional[str] = None, source_root: Optional[str] = None,
               **kwargs):
    self._source_dir = source_dir
    self._source_root = source_root
    super().__init__(**kwargs)

  def source_subdir(self) -> str:
    return self.SOURCE_SUBDIR

  def source_dir(self) -> str:
    root = self._source_root or default_root(self.builder_config.name)
    return self._source_dir or os.path.join(root, self.source_subdir())

  def scene_features(self) -> dict:
    """The shapes config's extra feature: each image's ground-truth scene (JSON), for checks
    such as caption correctness (`tasks.shapes_caption_check`); none for the official release."""
    return {"scene": tfds.features.Text()} if self.builder_config.name == "shapes" else {}

  def read_scenes(self, root: str) -> Mapping[str, str]:
    """{image file relative to root: its scene as JSON} from the shapes world's scenes.jsonl
    (config shapes); {} otherwise. An image without a scene gets "" (see `scene_of`)."""
    if self.builder_config.name != "shapes":
      return {}
    path = os.path.join(root, SCENES_FILE)
    if not tf.io.gfile.exists(path):
      logging.warning("%s/shapes: no %s, so no scene checks (tasks.build shapes_downstream "
                      "writes it)", self.name, path)
      return {}
    return {r["key"]: json.dumps({"objects": r["objects"]}) for r in read_jsonl(path)}

  def scene_of(self, scenes: Mapping[str, str], file_name: str) -> dict:
    """The example's scene feature (empty for the official config)."""
    return {"scene": scenes.get(file_name, "")} if self.builder_config.name == "shapes" else {}

  def has_source(self) -> bool:
    """Whether any file the release consists of is in the source folder (folders don't count)."""
    return any(tf.io.gfile.exists(os.path.join(self.source_dir(), path))
               for path in self.EXPECTED if not path.endswith("/"))
