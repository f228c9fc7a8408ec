"""Lets TFDS 4.9.10 prepare datasets defined outside its own package, quietly.

It imports the `importlib_resources` backport for that, but declares the dependency only for
Python < 3.9; the standard library's `importlib.resources` is the same API. A real backport, if
installed, wins.
"""
import importlib.resources.abc
import sys

from simvlm_jax import console

sys.modules.setdefault("importlib_resources", importlib.resources)


class QuietPrepare:
  """Mixin for the project's builders: no "Downloading and preparing dataset Unknown size ..." and
  "Dataset ... downloaded and prepared" lines. TFDS prints them on stdout for every build, meant
  for downloads and misleading here, and `tasks.build` prints its own line per dataset;
  `--library_logs` keeps them."""

  def _log_download_bytes(self) -> None:
    if console.library_logs_wanted():
      super()._log_download_bytes()

  def _log_download_done(self) -> None:
    if console.library_logs_wanted():
      super()._log_download_done()
