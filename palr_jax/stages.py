"""Stage bookkeeping: config fingerprints, atomic files, skip-when-current.

Every PALR stage writes its outputs under the workdir and, last, `<stage>.fingerprint.json` holding the
hash of the config sections it depends on (and of its upstream stages' fingerprints). A stage whose
fingerprint file matches is skipped, so a killed run resumes where it stopped and sweep points that share
upstream settings share those stages. The fingerprint is written only after every output is in place, so
a half-finished stage is never mistaken for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import logging
from etils import epath


def _plain(value: Any) -> Any:
  """Config values as JSON-stable plain Python (ConfigDicts, tuples, numpy scalars)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, 'item') and callable(value.item):
    return value.item()
  return value


def fingerprint(config, sections: Sequence[str], upstream: Iterable[str] = ()) -> str:
  """Hash of `config.<section>` for each section (dotted keys allowed) plus upstream fingerprints."""
  payload = {}
  for name in sections:
    node = config
    for part in name.split('.'):
      node = node[part]
    payload[name] = _plain(node)
  payload['_upstream'] = list(upstream)
  blob = json.dumps(payload, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
  """Writes to `<path>.tmp` then renames: readers never see a half-written file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def atomic_write_json(path, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def atomic_write_jsonl(path, rows: Iterable[dict]) -> None:
  atomic_write_text(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))


def read_jsonl(path) -> list[dict]:
  """Reads JSON lines; a malformed line raises naming the file and line number."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found')
  rows = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{i}: not a JSON object ({e.msg})') from None
  return rows


def is_current(workdir, stage: str, fp: str, outputs: Sequence[str] = ()) -> bool:
  path = epath.Path(workdir) / f'{stage}.fingerprint.json'
  if not path.exists():
    return False
  try:
    recorded = json.loads(path.read_text()).get('fingerprint')
  except json.JSONDecodeError:
    return False
  return recorded == fp and all((epath.Path(workdir) / o).exists() for o in outputs)


def mark_done(workdir, stage: str, fp: str, sections: Sequence[str] = ()) -> None:
  atomic_write_json(epath.Path(workdir) / f'{stage}.fingerprint.json',
                    {'stage': stage, 'fingerprint': fp, 'sections': list(sections)})


def run_stage(workdir, stage: str, fp: str, fn: Callable[[], Any], outputs: Sequence[str] = (),
              is_writer: bool = True, barrier: Callable[[str], None] | None = None) -> bool:
  """Runs `fn` unless `stage` is current. Returns True if it ran.

  On a pod only the writer process (process 0) runs `fn`; the others wait at `barrier` so that every
  process sees the outputs before the next stage reads them.
  """
  if is_current(workdir, stage, fp, outputs):
    logging.info('stage %s: current (fingerprint %s), skipped', stage, fp)
    if barrier:
      barrier(f'{stage}-skip')
    return False
  ran = False
  if is_writer:
    logging.info('stage %s: running (fingerprint %s)', stage, fp)
    fn()
    mark_done(workdir, stage, fp)
    ran = True
  if barrier:
    barrier(f'{stage}-done')
  return ran


def hide_accelerators_from_tf():
  """tf.data shares the process with JAX: TensorFlow must never take GPU/TPU memory."""
  import tensorflow as tf
  for kind in ('GPU', 'TPU'):
    with contextlib.suppress(RuntimeError, ValueError):  # TF already initialized, or no such kind
      tf.config.set_visible_devices([], kind)
  return tf
