"""Shared by the bench scripts: the one home of measured numbers, bench/RESULTS.md, and the quiet-box rule.

`write_section` replaces a `## Title` section of RESULTS.md in place (or appends it), written to a
temporary name and renamed. `quiet_or_exit` refuses to measure on a busy machine: a figure taken while
other jobs share the cores is not a measurement.
"""
from __future__ import annotations

import os
import re
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md')


def write_section(title: str, body: str, path: str = RESULTS) -> None:
  """Puts `## title` + `body` in place of that section of `path` (kept where it was), or appends it."""
  section = f'## {title}\n\n{body.strip()}\n'
  text = open(path).read() if os.path.exists(path) else '# Benchmarks\n'
  pattern = re.compile(rf'^## {re.escape(title)}\n.*?(?=^## |\Z)', re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + '\n', text).rstrip('\n') + '\n'
  else:
    text = text.rstrip('\n') + '\n\n' + section
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def load_limit(cores: int | None = None) -> float:
  """The highest 1-minute load average at which a measurement counts: 0.5 on 2 cores, 25% of the cores
  above that."""
  cores = cores or os.cpu_count() or 1
  return max(0.5, 0.25 * cores)


def quiet_or_exit(what: str, force: bool = False) -> float:
  """The current load average, after checking it is below `load_limit`; exits with status 3 otherwise
  (unless `force`, for smoke runs that record nothing)."""
  load = os.getloadavg()[0]
  limit = load_limit()
  if load > limit and not force:
    print(f'{what}: load average {load:.2f} > {limit:.2f} on {os.cpu_count()} cores: other work is running, '
          'so this would not be a measurement. Rerun on a quiet machine.', file=sys.stderr)
    sys.exit(3)
  return load
