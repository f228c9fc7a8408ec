"""Command-line gin handling shared by train, eval and predict (t5x's `--gin.KEY=VALUE` style)."""
import difflib
import importlib
import inspect
import logging as std_logging
import os
import re
import sys
from typing import Any, List, Optional, Sequence

import gin
from absl import flags, logging
from etils import epath

from simvlm_jax import console
from simvlm_jax.errors import UserError, report_and_exit


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """Turns `--gin.KEY=VALUE` into `--gin_bindings=KEY=VALUE` so absl can parse it."""
  out = []
  for arg in argv:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise UserError(f"expected --gin.KEY=VALUE, got {arg!r} (a value with spaces or quotes "
                        "needs shell quoting: --gin.KEY=\"'text'\")")
      arg = f"--gin_bindings={key} = {value}"
    out.append(arg)
  return out


def _open_uri(path: str):
  return epath.Path(path).open()


def _is_readable_uri(path: str) -> bool:
  return "://" in path and epath.Path(path).is_file()


# gin opens files with `open`; a run's config.gin on gs:// (eval, predict, init_from) or a
# `--gin_file=gs://...` goes through epath instead.
gin.config.register_file_reader(_open_uri, _is_readable_uri)


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files (looked up in `search_paths`, then the repo's `gin/`) and bindings.

  A wrong file or binding fails here, before any work starts: a UserError with gin's message and,
  for a misspelt name, the closest names that exist.
  """
  repo_gin = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
  known = getattr(gin.config, "_LOCATION_PREFIXES", [])
  for path in list(search_paths) + [os.getcwd(), repo_gin]:
    if path not in known:
      gin.add_config_file_search_path(path)
  # gin logs an error for every search path that misses before one hits; only real failures
  # (which raise) matter here.
  std_logging.disable(std_logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings), finalize_config=False)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever fails while reading the user's config (syntax, names, files, a gin `import` of a
    # module that is not there) is the config's fault; --traceback shows the details.
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = _suggestion(message)
    raise UserError(f"gin: {message}{hint}") from e
  finally:
    std_logging.disable(std_logging.NOTSET)


def query(name: str, default: Any = None) -> Any:
  """The value bound to `name` ("make_finetune_iterator.inputs_length") in the current config,
  macros resolved, or `default` when it has none."""
  try:
    value = gin.query_parameter(name)
    while (isinstance(value, gin.config.ConfigurableReference) and
           value.scoped_selector.endswith("/gin.macro")):
      value = gin.query_parameter("%" + value.scoped_selector[:-len("/gin.macro")])
    return value
  except ValueError:
    return default


def _suggestion(message: str) -> str:
  """" (did you mean ...?)" for gin's unknown-parameter and unknown-configurable messages."""
  names: Optional[List[str]] = None
  unknown = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
  if unknown:
    fn = _configurable(unknown.group(1))
    if fn is not None:
      target = fn.__init__ if inspect.isclass(fn) else fn
      names, word = list(inspect.signature(target).parameters), unknown.group(2)
  else:
    unknown = re.search(r"No configurable matching '([^']+)'", message)
    if unknown:
      word = unknown.group(1).split(".")[-1]
      names = sorted({s.split(".")[-1] for s in _configurable_selectors()})
  if not names:
    return ""
  close = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# gin keeps its registry private; these two only feed the "did you mean" hint, so a gin release
# that moves it loses the hint, never the error.
def _configurable(selector: str):
  try:
    return gin.config._REGISTRY.get_match(selector).wrapped  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return None


def _configurable_selectors() -> List[str]:
  try:
    return [s for s, _ in gin.config._REGISTRY.items()]  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return []


def main_argv() -> List[str]:
  """The command line with `--gin.KEY=VALUE` rewritten; a malformed one ends the command with one
  `error:` line (before absl parses the flags, so there is no --traceback yet)."""
  try:
    return rewrite_gin_args(sys.argv)
  except UserError as e:
    report_and_exit(e)


def define_flags() -> None:
  """The flags every entry point shares (defined from `__main__` only, never at import)."""
  flags.DEFINE_multi_string("gin_file", [], "Gin files, applied in order.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (also given as --gin.KEY=VALUE).")
  flags.DEFINE_multi_string("gin_search_paths", [], "Extra directories to look up gin files in.")
  flags.DEFINE_multi_string("import_modules", ["tasks"],
                            "Modules imported before parsing gin (e.g. the SeqIO task registry).")
  define_console_flags()


def define_console_flags() -> None:
  flags.DEFINE_bool("library_logs", False, "Show the libraries' logging (TensorFlow, XLA, Orbax, "
                    "absl INFO); off by default, see `simvlm_jax.console`.")


def flag_overrides() -> tuple[List[str], List[str]]:
  """(gin files, bindings) of the command line, for commands that apply them over a run's own
  config (`run_dir.open_run`); nothing when absl has not parsed a command line."""
  f = flags.FLAGS
  if not f.is_parsed() or "gin_file" not in f:
    return [], []
  return list(f.gin_file), list(f.gin_bindings)


def parse_flags() -> None:
  """Quiets library logging (unless --library_logs), imports `--import_modules`, then parses
  `--gin_file`s and bindings."""
  f = flags.FLAGS
  console.quiet_python()
  for module in filter(None, f.import_modules):
    importlib.import_module(module)
  parse_gin(f.gin_file, f.gin_bindings, f.gin_search_paths)
