"""Libraries' warnings go to W/logs/ only (palr_jax/cli.py `library_logs_to_file`, used by palr_jax.main):
the terminal keeps palr_jax's own lines and every error."""
from __future__ import annotations

import io
import logging as py_logging
import os

from absl import logging

from palr_jax import cli


class FakeAbslHandler(py_logging.StreamHandler):
  """absl's handler as main sets it up: warnings to the terminal, its python_handler's stream the file."""

  def __init__(self, terminal, file):
    super().__init__(terminal)
    self.python_handler = py_logging.StreamHandler(file)


def _record(pathname: str, level: int, message: str) -> py_logging.LogRecord:
  return py_logging.LogRecord('absl', level, pathname, 1, message, None, None)


def test_library_warnings_reach_the_file_only(monkeypatch):
  terminal, file, own = io.StringIO(), io.StringIO(), io.StringIO()
  handler = FakeAbslHandler(terminal, file)
  monkeypatch.setattr(logging, 'get_absl_handler', lambda: handler)
  library = py_logging.getLogger('transformers')
  # What transformers does at its import: a stderr handler of its own, no propagation to the root logger.
  own_handler = py_logging.StreamHandler(own)
  library.addHandler(own_handler)
  monkeypatch.setattr(library, 'propagate', False)
  filters = list(library.filters)
  try:
    cli.library_logs_to_file()
    cli.library_logs_to_file()  # twice: still one filter each
    assert sum(isinstance(f, cli.LibrariesToFile) for f in handler.filters) == 1
    library.warning('PyTorch was not found. Models will not be available')
    ours = os.path.join(cli.PACKAGE_DIR, 'stages', 'rank.py')
    site = os.path.join(os.sep, 'venv', 'site-packages', 'orbax', 'checkpoint', 'x.py')
    for record in (_record(ours, py_logging.WARNING, 'palr warning'),
                   _record(site, py_logging.WARNING, 'orbax warning'),
                   _record(site, py_logging.ERROR, 'orbax error')):
      handler.handle(record)
  finally:
    library.removeHandler(own_handler)
    library.filters[:] = filters
    py_logging.captureWarnings(False)
  assert own.getvalue() == ''
  assert terminal.getvalue().splitlines() == ['palr warning', 'orbax error']
  assert file.getvalue().splitlines() == ['PyTorch was not found. Models will not be available', 'orbax warning']
