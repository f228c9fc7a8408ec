"""Command-line gin handling shared by train, eval and predict (t5x's `--gin.KEY=VALUE` style)."""
import importlib
import logging as std_logging
import os
import sys
from typing import List, Sequence

import gin
from absl import flags, logging


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """Turns `--gin.KEY=VALUE` into `--gin_bindings=KEY=VALUE` so absl can parse it."""
  out = []
  for arg in argv:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise ValueError(f"expected --gin.KEY=VALUE, got {arg!r}")
      arg = f"--gin_bindings={key} = {value}"
    out.append(arg)
  return out


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files (looked up in `search_paths`, then the repo's `gin/`) and bindings.

  A wrong file or binding fails here, before any work starts, with gin's own message.
  """
  repo_gin = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
  for path in list(search_paths) + [os.getcwd(), repo_gin]:
    gin.add_config_file_search_path(path)
  # gin logs an error for every search path that misses before one hits; only real failures
  # (which raise) matter here.
  std_logging.disable(std_logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), finalize_config=False)
  finally:
    std_logging.disable(std_logging.NOTSET)


def main_argv() -> List[str]:
  return rewrite_gin_args(sys.argv)


def define_flags() -> None:
  """The flags every entry point shares (defined from `__main__` only, never at import)."""
  flags.DEFINE_multi_string("gin_file", [], "Gin files, applied in order.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (also given as --gin.KEY=VALUE).")
  flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories to look up gin files in.")
  flags.DEFINE_multi_string("import_modules", ["tasks"],
                            "Modules imported before parsing gin (e.g. the SeqIO task registry).")


def quiet_logging() -> None:
  """Warnings and up only: Orbax and TensorFlow log every step at INFO."""
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_flags() -> None:
  """Sets the log level, imports `--import_modules`, then parses `--gin_file`s and bindings."""
  f = flags.FLAGS
  if not f["verbosity"].present:
    quiet_logging()
  for module in filter(None, f.import_modules):
    importlib.import_module(module)
  parse_gin(f.gin_file, f.gin_bindings, f.gin_search_paths)
