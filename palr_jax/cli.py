"""How every program starts: `cli.run(main, define_flags)` in place of absl's `app.run(main)`.

Flags are defined and parsed, then `main(argv)` runs. Bad input found before anything is computed is one line on
stderr and exit code 2 (`USAGE_EXIT_CODE`), never a traceback:
  - a bad flag or flag value (absl's own message);
  - an unknown config key, `--config.retriever.factorz=3`, with the closest key as a suggestion;
  - a config file that is missing or whose get_config() fails (its error's last line);
  - a bad config value (`validate.ConfigError`, raised by main's checks) and `app.UsageError`.
The programs that run models share `--compilation_cache` (XLA's persistent cache, below).
Exit codes of the programs: 0 done; 1 failed; 2 bad flags or config (nothing computed);
`distributed.PREEMPTED_EXIT_CODE` (75) stopped by SIGTERM (preempted): the same command resumes it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import difflib
import functools
import hashlib
import importlib.util
import logging as py_logging
import os
import platform
import sys
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from palr_jax import defaults
from palr_jax import files
from palr_jax import validate

USAGE_EXIT_CODE = 2


def run(main: Callable[[list[str]], Any], define_flags: Callable[[], None]) -> None:
  """`define_flags()`, then `app.run(main)` with flags parsed by `parse_flags`; bad input is `fail`."""
  try:
    define_flags()
  except Exception as e:  # noqa: BLE001 - a default config file takes its overrides when its flag is defined
    if not any(a.startswith('--') and '.' in a.split('=', 1)[0] for a in sys.argv[1:]):
      raise
    fail(override_error(sys.argv, e))
  app.run(functools.partial(_guarded, main), flags_parser=parse_flags)


def _guarded(main, argv):
  try:
    if len(argv) > 1:
      raise validate.ConfigError(f'unexpected arguments: {argv[1:]}')
    return main(argv)
  except (validate.ConfigError, app.UsageError) as e:
    fail(str(e))


def program() -> str:
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


def fail(message: str) -> NoReturn:
  """Ends the program: `<program>: <message>` on one line of stderr, exit code 2."""
  print(f'{program()}: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing whose failures are one line each (`fail`)."""
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:
    fail(last_line(str(e)))
  except Exception as e:  # noqa: BLE001 - config_flags applying an override to a key the config lacks
    fail(override_error(argv, e))
  for name in config_flag_names():
    config = flags.FLAGS[name].value
    try:
      getattr(config, 'keys', None)  # a config file that failed to load raises on any attribute
    except OSError as e:
      spec = config_flags.get_config_filename(flags.FLAGS[name])
      path = spec.split(':', 1)[0]
      fail(f'--{name} {spec}: ' + ('no such file' if not os.path.exists(path) else last_line(str(e))))
  return rest


def last_line(message: str) -> str:
  """A message's last line when it holds a traceback (config_flags wraps get_config()'s errors so)."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if not lines:
    return message
  return f'{lines[0].split(": ")[0]}: {lines[-1]}' if any(line.startswith('Traceback') for line in lines) else lines[0]


def config_flag_names() -> list[str]:
  """The config-file flags the program defined (`config_flags.DEFINE_config_file`)."""
  return [name for name in flags.FLAGS
          if isinstance(flags.FLAGS[name].parser, config_flags.config_flags.ConfigFileFlagParser)]


def override_error(argv: Sequence[str], error: Exception) -> str:
  """Names the first `--config.KEY=...` override whose key the config lacks, with the closest key (the
  keys of `--config`'s file, or of palr_jax/defaults.py, which every config starts from)."""
  for arg in argv[1:]:
    name, _, key = arg[2:].split('=', 1)[0].partition('.')
    if not arg.startswith('--') or not key:
      continue
    try:
      config = load_config(_flag_argument(argv, name) or os.path.abspath(defaults.__file__))
    except Exception:  # noqa: BLE001 - explained by the error itself below
      break
    known = list(dotted_keys(config))
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      hint = f'; did you mean --{name}.{close[0]}?' if close else f'; sections: {sorted(config.keys())}'
      return f'--{name}.{key}: no such config key{hint}'
  return last_line(f'{type(error).__name__}: {error}')


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def dotted_keys(config, prefix: str = '') -> Iterator[str]:
  """Every key of a ConfigDict, sections and values, dotted: 'retriever', 'retriever.factors', ..."""
  for key, item in config.items():
    yield prefix + key
    if isinstance(item, ml_collections.ConfigDict):
      yield from dotted_keys(item, f'{prefix}{key}.')


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> path's get_config(arg), as absl's config_flags loads `--config`."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('palr_loaded_config', path)
  if module_spec is None or not os.path.exists(path):
    raise validate.ConfigError(f'config {spec!r}: file {path} not found')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


# ------------------------------------------------------------------------ library logs

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Libraries that log through handlers of their own (not propagating to the root logger) at import.
OWN_HANDLER_LOGGERS = ('transformers',)


class LibrariesToFile(py_logging.Filter):
  """On the absl handler: a record from outside palr_jax below ERROR (a library's warning: transformers'
  'PyTorch was not found', jax's, orbax's, Python warnings) is written by `to_file` alone and kept off the
  terminal; palr_jax's own records and every error pass as before."""

  def __init__(self, to_file: Callable[[py_logging.LogRecord], None]):
    super().__init__()
    self.to_file = to_file

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR or is_ours(record):
      return True
    self.to_file(record)
    return False


class HandOver(py_logging.Filter):
  """On a library's own logger: its records go to `handler` (the absl one) instead of its own handlers."""

  def __init__(self, handler: py_logging.Handler):
    super().__init__()
    self.handler = handler

  def filter(self, record: py_logging.LogRecord) -> bool:
    self.handler.handle(record)
    return False


def is_ours(record: py_logging.LogRecord) -> bool:
  return os.path.abspath(record.pathname).startswith(PACKAGE_DIR + os.sep)


def library_logs_to_file() -> None:
  """Libraries' records below ERROR go to the absl log file only (use after `use_absl_log_file`): the
  terminal keeps stage lines, progress bars, palr_jax's warnings, errors and the results."""
  handler = logging.get_absl_handler()
  python_handler = handler.python_handler
  to_file = functools.partial(py_logging.StreamHandler.emit, python_handler)  # its stream, not stderr
  if not any(isinstance(f, LibrariesToFile) for f in handler.filters):
    handler.addFilter(LibrariesToFile(to_file))
  for name in OWN_HANDLER_LOGGERS:  # before the library is imported: its handler is added later
    logger = py_logging.getLogger(name)
    if not any(isinstance(f, HandOver) for f in logger.filters):
      logger.addFilter(HandOver(handler))
  py_logging.captureWarnings(True)  # warnings.warn -> the 'py.warnings' logger -> the filter above


# ------------------------------------------------------------------------ compilation cache

DEFAULT_COMPILATION_CACHE = '~/.cache/palr_jax/xla'


def define_compilation_cache_flag() -> None:
  flags.DEFINE_string('compilation_cache', DEFAULT_COMPILATION_CACHE,
                      "XLA's persistent compilation cache (local or gs://; '' = off; $JAX_COMPILATION_CACHE_DIR "
                      'wins): a rerun, a resumed job or a sweep point loads what an earlier run compiled.')


def use_compilation_cache(path: str) -> str | None:
  """Points XLA's persistent compilation cache at `path`/<`host_kind()`> and returns the folder in use
  (None: off).

  Each train-step shape takes seconds to compile on a CPU and minutes for a 7B model on a pod (a cold
  `:quick` run spends a good part of its time compiling: bench/RESULTS.md, ":quick end to end"); with the
  cache, a rerun, a job resumed after preemption or a sweep point that runs the same program loads
  the executable instead. Entries are keyed by the program, the devices and the compile options, so a
  changed model or mesh compiles afresh. $JAX_COMPILATION_CACHE_DIR, when set, wins over `path`.
  """
  import jax  # pylint: disable=g-import-not-at-top; the programs that start here import it anyway
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR') and path:
    folder = os.path.expanduser(path) if files.is_local(path) else path
    jax.config.update('jax_compilation_cache_dir', f'{folder.rstrip("/")}/{host_kind()}')
  return jax.config.jax_compilation_cache_dir or None


def host_kind() -> str:
  """A name for this host's instruction set: CPU executables are compiled for the host's features, so a
  cache in a home folder shared by different machines keeps one subfolder per kind (a pod's hosts,
  alike, share one)."""
  flags_line = ''
  try:
    with open('/proc/cpuinfo') as f:
      flags_line = next((line for line in f if line.startswith('flags')), '')
  except OSError:
    pass
  identity = f'{platform.machine()} {platform.processor()} {" ".join(sorted(flags_line.split()))}'
  return f'{platform.machine()}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}'
