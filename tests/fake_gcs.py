"""Runs a project command with `gs://` served from a local folder: no network, no credentials.

  python tests/fake_gcs.py ROOT MODULE [ARGS...]    # as `python -m MODULE ARGS...`

`gs://bucket/a/b` becomes ROOT/bucket/a/b wherever a path meets storage: epath (all of the
project's own file I/O goes through it; mapped with epath's own `testing.mock_epath`),
`tf.io.gfile` (seqio's SentencePiece reader, image reading), and the two libraries that open gs://
by themselves: TensorStore (Orbax's arrays: its GCS kvstore spec becomes a file one) and clu's
TensorBoard writer. A command that used
`open` or `os.path` on a gs:// path would look for a local folder named `gs:` and fail, which is what
the tests that run through this want to catch.
"""
import contextlib
import functools
import os
import runpy
import sys

PREFIX = "gs://"


def install(root: str) -> contextlib.ExitStack:
  """Maps gs:// onto `root` for this process until the returned stack is closed (which puts
  every patched function back, so a test may use it in its own process)."""
  # pylint: disable=import-outside-toplevel,protected-access
  from etils.epath import gpath, testing

  def local(path):
    path = os.fspath(path)
    return os.path.join(root, path[len(PREFIX):]) if path.startswith(PREFIX) else path

  def remote(path):
    return PREFIX + os.path.relpath(path, root) if path.startswith(root + os.sep) else path

  def one_path(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two_paths(fn, src, dst, *args, **kwargs):
    return fn(local(src), local(dst), *args, **kwargs)

  def walk(fn, top, **kwargs):
    for parent, dirs, files in fn(local(top), **kwargs):
      yield remote(os.fspath(parent)), dirs, files

  stack = contextlib.ExitStack()

  def patch(owner, name, value):  # put back when the stack closes (a test may install it)
    stack.callback(setattr, owner, name, getattr(owner, name))
    setattr(owner, name, value)

  # epath's own test double: every epath call goes through these (non-gs:// paths unchanged).
  stack.enter_context(testing.mock_epath(
      open=one_path, exists=one_path, isdir=one_path, listdir=one_path, makedirs=one_path,
      mkdir=one_path, rmtree=one_path, remove=one_path, stat=one_path, copy=two_paths,
      rename=two_paths, replace=two_paths, walk=walk,
      glob=lambda fn, pattern: [remote(p) for p in fn(local(pattern))]))
  patch(gpath, "_is_tf_installed", lambda: False)  # else epath sends gs:// to tf.io.gfile

  import tensorflow as tf
  # seqio reads through `tensorflow.compat.v2`, a module object of its own.
  for gfile in {id(m): m for m in (tf.io.gfile, tf.compat.v2.io.gfile)}.values():
    for name in ("exists", "isdir", "listdir", "makedirs", "remove", "rmtree", "stat", "GFile"):
      patch(gfile, name, functools.partial(one_path, getattr(gfile, name)))
    for name in ("copy", "rename"):
      patch(gfile, name, functools.partial(two_paths, getattr(gfile, name)))
    patch(gfile, "glob",
          (lambda fn: lambda pattern: [remote(p) for p in fn(local(pattern))])(gfile.glob))

  from orbax.checkpoint._src.path import gcs_utils
  patch(gcs_utils, "get_kvstore_for_gcs", lambda path: {"driver": "file", "path": local(path)})
  patch(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # asks the bucket

  from clu import metric_writers
  patch(metric_writers, "create_default_writer",
        functools.partial(one_path, metric_writers.create_default_writer))
  return stack


if __name__ == "__main__":
  sys.path[0] = os.getcwd()  # the repository, as for `python -m`
  root, module = os.path.abspath(sys.argv[1]), sys.argv[2]
  sys.argv = ["-m"] + sys.argv[3:]  # what `python -m` shows while it imports
  import simvlm_jax  # noqa: F401  (its quiet console, before TensorFlow is imported)
  with install(root):
    runpy.run_module(module, run_name="__main__", alter_sys=True)
