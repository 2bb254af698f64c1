"""Files under the workdir: atomic writes, JSON lines, copies (config fingerprints: palr_jax/fingerprint.py).

Every path goes through `etils.epath`, so a workdir may be local, `gs://` or any filesystem epath knows.
A file is written under a unique temporary name next to it and then moved into place: readers never see
a half-written file, and two writers never share a temporary name.
"""
from __future__ import annotations

from collections.abc import Iterable
import json
import os
import uuid
from typing import Any

from etils import epath


def is_local(path) -> bool:
  """A path on this host's filesystem, not a URL (gs://, ram://, ...)."""
  return '://' not in os.fspath(path)


def temp_path(path: epath.Path) -> epath.Path:
  """A unique temporary sibling of `path` (hidden: stage digests skip it) to write and then move into place."""
  return path.parent / f'.{path.name}.tmp-{uuid.uuid4().hex[:12]}'


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_path(path)
  tmp.write_bytes(data)
  tmp.replace(path)


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
  atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + '\n')


def atomic_write_jsonl(path, rows: Iterable[dict]) -> None:
  atomic_write_text(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))


def read_json(path) -> Any:
  """A JSON file; a missing or malformed one raises naming the file."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found')
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def read_jsonl(path, *, torn_tail_ok: bool = False) -> list[dict]:
  """JSON lines; a malformed line raises naming the file and line number.

  With `torn_tail_ok` a last line without its newline that does not parse (a write cut short by a kill)
  is dropped instead.
  """
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found')
  text = path.read_text()
  lines = text.split('\n')
  rows = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if torn_tail_ok and i == len(lines):
        continue
      raise ValueError(f'{path}:{i}: not a JSON object ({e.msg})') from None
  return rows


COPY_CHUNK = 16 << 20  # bytes a copy holds at once: a safetensors shard is streamed, never read whole


def copy_file(src, dst, chunk: int = COPY_CHUNK) -> None:
  """Copies one file in chunks of `chunk` bytes (any epath filesystems) to a temporary name, then moves it
  into place; a failed copy leaves no partial `dst`."""
  src, dst = epath.Path(src), epath.Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_path(dst)
  try:
    with src.open('rb') as reader, tmp.open('wb') as writer:
      block = reader.read(chunk)
      writer.write(block)  # even when empty: some filesystems (TensorFlow's ram://) only then create it
      while block := reader.read(chunk):
        writer.write(block)
    tmp.replace(dst)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def copy_tree(src, dst) -> None:
  """Copies a file or a folder tree (any epath filesystems), streaming each file; an existing `dst` is
  replaced."""
  src, dst = epath.Path(src), epath.Path(dst)
  if src.is_dir():
    if dst.exists():
      dst.rmtree()
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
      copy_tree(child, dst / child.name)
  else:
    copy_file(src, dst)
