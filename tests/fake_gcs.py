"""Runs a project command with `gs://` served from a local folder: no network, no credentials.

  python tests/fake_gcs.py ROOT MODULE [ARGS...]    # as `python -m MODULE ARGS...`

`gs://bucket/a/b` becomes ROOT/bucket/a/b at the three places where a path meets storage:
epath (all of the project's own file I/O goes through it), `tf.io.gfile` (seqio's SentencePiece
reader, image reading) and the two libraries that open gs:// by themselves, TensorStore (Orbax's
arrays: its GCS kvstore spec becomes a file one) and clu's TensorBoard writer. A command that used
`open` or `os.path` on a gs:// path would look for a local folder named `gs:` and fail, which is what
the tests that run through this want to catch.
"""
import os
import runpy
import sys

PREFIX = "gs://"


def install(root: str) -> None:
  """Maps gs:// onto `root` for this process."""
  # pylint: disable=import-outside-toplevel,protected-access
  from etils.epath import backend, gpath

  def local(path):
    path = os.fspath(path)
    return os.path.join(root, path[len(PREFIX):]) if path.startswith(PREFIX) else path

  def remote(path):
    return PREFIX + os.path.relpath(path, root) if path.startswith(root + os.sep) else path

  class Mapped(backend._OsPathBackend):
    """epath's local backend, reached through gs:// names."""

    def open(self, path, mode):
      return super().open(local(path), mode)

    def exists(self, path):
      return super().exists(local(path))

    def isdir(self, path):
      return super().isdir(local(path))

    def listdir(self, path):
      return super().listdir(local(path))

    def glob(self, path):
      return [remote(p) for p in super().glob(local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
      for parent, dirs, files in super().walk(local(top), top_down=top_down, on_error=on_error):
        yield remote(os.fspath(parent)), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
      return super().makedirs(local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
      return super().mkdir(local(path), exist_ok=exist_ok)

    def rmtree(self, path):
      return super().rmtree(local(path))

    def remove(self, path):
      return super().remove(local(path))

    def rename(self, path, dst):
      return super().rename(local(path), local(dst))

    def replace(self, path, dst):
      return super().replace(local(path), local(dst))

    def copy(self, path, dst, overwrite):
      return super().copy(local(path), local(dst), overwrite=overwrite)

    def stat(self, path):
      return super().stat(local(path))

  gpath._PREFIX_TO_BACKEND["gs"] = Mapped()
  gpath._is_tf_installed = lambda: False  # else epath sends gs:// to tf.io.gfile

  import tensorflow as tf
  # seqio reads through `tensorflow.compat.v2`, a module object of its own.
  for gfile in {id(m): m for m in (tf.io.gfile, tf.compat.v2.io.gfile)}.values():
    for name in ("exists", "isdir", "listdir", "makedirs", "remove", "rmtree", "stat"):
      setattr(gfile, name, (lambda fn: lambda path, *a, **k: fn(local(path), *a, **k))(
          getattr(gfile, name)))
    for name in ("copy", "rename"):
      setattr(gfile, name, (lambda fn: lambda src, dst, *a, **k: fn(local(src), local(dst), *a,
                                                                    **k))(getattr(gfile, name)))
    gfile.glob = (lambda fn: lambda pattern: [remote(p) for p in fn(local(pattern))])(gfile.glob)
    gfile.GFile = (lambda cls: lambda name, mode="r": cls(local(name), mode))(gfile.GFile)

  from orbax.checkpoint._src.path import gcs_utils
  gcs_utils.get_kvstore_for_gcs = lambda path: {"driver": "file", "path": local(path)}
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False  # asks the bucket's API

  from clu import metric_writers
  create_writer = metric_writers.create_default_writer
  metric_writers.create_default_writer = lambda logdir, *a, **k: create_writer(local(logdir), *a,
                                                                              **k)


if __name__ == "__main__":
  sys.path[0] = os.getcwd()  # the repository, as for `python -m`
  root, module = os.path.abspath(sys.argv[1]), sys.argv[2]
  sys.argv = ["-m"] + sys.argv[3:]  # what `python -m` shows while it imports
  import simvlm_jax  # noqa: F401  (its quiet console, before TensorFlow is imported)
  install(root)
  runpy.run_module(module, run_name="__main__", alter_sys=True)
