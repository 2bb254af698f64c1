"""The docs' tables that restate the stage declarations, generated from them so they cannot drift.

  python -m palr_jax.tools.stage_table            # prints both tables
  python -m palr_jax.tools.stage_table --write    # rewrites them in docs/ARCHITECTURE.md and docs/pods.md

Each table sits in its document between `<!-- stage-table:begin -->` and `<!-- stage-table:end -->`
(ARCHITECTURE: what each stage hashes, reads and writes; pods.md: what each process does), built from the
stage list `palr_jax.main.stages` returns for palr_jax/defaults.py's config. tests/test_docs.py
regenerates them and compares.
"""
from __future__ import annotations

from collections.abc import Sequence
import re
import sys

from etils import epath

from palr_jax import files
from palr_jax.stages import base

BEGIN, END = '<!-- stage-table:begin -->', '<!-- stage-table:end -->'
ROOT = epath.Path(__file__).parent.parent.parent
# Which document holds which table.
DOCS = {'docs/ARCHITECTURE.md': 'fingerprints', 'docs/pods.md': 'processes'}


def _code(items: Sequence[str]) -> str:
  return ', '.join(f'`{i}`' for i in items)


def _inputs(stage) -> str:
  # Input paths are machine-specific (a wheel's site-packages, ~/.cache): the file names say enough.
  return ', '.join(f'`{epath.Path(p).name}`' for p in stage.inputs)


def fingerprint_table(stages) -> str:
  """Markdown: for each stage, the config keys its fingerprint hashes, the stages whose outputs it reads,
  the files outside the workdir it reads, what it writes under W, and how it runs on N processes."""
  rows = ['| stage | hashes (config keys) | upstream | inputs (outside W) | outputs (under W) | processes |',
          '|---|---|---|---|---|---|']
  for s in stages:
    rows.append(f'| `{s.name}` | {_code(s.hashes)} | {_code(s.upstream)} | {_inputs(s)} | {_code(s.outputs)} '
                f'| {s.processes} |')
  return '\n'.join(rows)


def default_stages():
  """The stage list the runner gets from palr_jax/main.py for palr_jax/defaults.py's config."""
  from palr_jax import defaults  # pylint: disable=g-import-not-at-top
  from palr_jax import main  # pylint: disable=g-import-not-at-top
  return main.stages(defaults.get_config())


def tables(stages=None) -> dict[str, str]:
  stages = default_stages() if stages is None else stages
  return {'fingerprints': fingerprint_table(stages), 'processes': base.process_table(stages)}


def between_markers(text: str, where: str = '') -> str:
  """The text between the markers (stripped); ValueError when they are missing."""
  m = re.search(re.escape(BEGIN) + r'\n(.*?)' + re.escape(END), text, re.S)
  if not m:
    raise ValueError(f'{where}: expected a table between {BEGIN} and {END}')
  return m.group(1).strip()


def replace_between_markers(text: str, table: str, where: str = '') -> str:
  between_markers(text, where)
  return re.sub(re.escape(BEGIN) + r'\n.*?' + re.escape(END), lambda _: f'{BEGIN}\n{table}\n{END}', text,
                count=1, flags=re.S)


def main(argv: Sequence[str]) -> int:
  if set(argv) - {'--write'}:
    print(f'usage: python -m palr_jax.tools.stage_table [--write]; got {list(argv)}', file=sys.stderr)
    return 2
  made = tables()
  for doc, which in DOCS.items():
    path = ROOT / doc
    if '--write' in argv:
      text = path.read_text()
      new = replace_between_markers(text, made[which], doc)
      if new != text:
        files.atomic_write_text(path, new)
        print(f'{doc}: table rewritten')
      else:
        print(f'{doc}: current')
    else:
      print(f'{doc}:\n{BEGIN}\n{made[which]}\n{END}\n')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
