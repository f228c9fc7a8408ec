"""What every downstream reader shares: where its raw files are, the error when they are not
there, reading images, and the `official` / `shapes` builder configs.

Raw files are never downloaded. A builder reads them from `source_dir=` or, if that is not given,
from `$SIMVLM_DOWNSTREAM_DIR/<subdir>` (config `official`) or `$SIMVLM_DOWNSTREAM_DIR/shapes/<subdir>`
(config `shapes`: the shapes world's benchmarks, written by `tasks/shapes_downstream.py` in the same
official formats). SIMVLM_DOWNSTREAM_DIR defaults to ~/simvlm_downstream.
"""
import json
import os
from typing import Iterator, Mapping, Optional

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from tasks import tfds_compat  # noqa: F401

SOURCE_DIR_ENV = "SIMVLM_DOWNSTREAM_DIR"
CONFIGS = ("official", "shapes")


def source_root() -> str:
  """The folder that holds one subfolder of raw files per benchmark (`shapes/` for the shapes world)."""
  return os.path.expanduser(os.environ.get(SOURCE_DIR_ENV) or "~/simvlm_downstream")


def default_source_dir(subdir: str, config: str) -> str:
  """Where a benchmark's raw files are read from when no source_dir is given."""
  root = source_root()
  return os.path.join(root, "shapes", subdir) if config.startswith("shapes") else os.path.join(root, subdir)


def require(dataset: str, root: str, expected: Mapping[str, str],
            optional: Mapping[str, str] = ()) -> None:
  """Raises FileNotFoundError naming every missing entry of `expected` and where each comes from.

  Keys are paths relative to `root` (a trailing "/" marks a folder); values say what the entry is
  and where to get it. `optional` entries are listed in the message but never missing.
  """
  missing = [path for path in expected if not tf.io.gfile.exists(os.path.join(root, path))]
  if not missing:
    return
  lines = [f"  {path:<48} {about}" for path, about in {**expected, **dict(optional)}.items()]
  raise FileNotFoundError(
      f"{dataset}: missing {', '.join(missing)} in {root}.\nExpected there:\n" + "\n".join(lines) +
      f"\nPass source_dir=<folder> (`python -m tasks.build downstream --source_dir ...`) or set "
      f"{SOURCE_DIR_ENV} to the folder that holds it (default ~/simvlm_downstream).")


def read_bytes(path: str) -> Optional[bytes]:
  """The file's bytes, or None (logged) if it cannot be read: one missing image skips one example."""
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


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder):
  """A reader of an official release in a local folder (no downloads).

  Subclasses set SOURCE_SUBDIR (the folder under SIMVLM_DOWNSTREAM_DIR) and read
  `self.source_dir()` in `_split_generators`.
  """
  SOURCE_SUBDIR = ""
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="official", description="the official release"),
      tfds.core.BuilderConfig(name="shapes",
                              description="the shapes world's benchmark in the official format"),
  ]

  def __init__(self, *, source_dir: Optional[str] = None, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def source_dir(self) -> str:
    return self._source_dir or default_source_dir(self.SOURCE_SUBDIR, self.builder_config.name)
