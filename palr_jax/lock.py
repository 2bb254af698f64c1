"""The workdir lock: one job at a time on a workdir (two would compute everything twice and trip over each
other's part files).

Process 0 of a job holds `W/palr.lock` (JSON: host, pid, start time, command) from start to exit. A second
job finds it and stops with one line naming the holder. A lock whose process is gone (same host, pid not
alive) is stale and taken over with a warning; a lock held from another host cannot be checked from here:
`--force_unlock` takes it (only when that job is known to be dead).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys

from absl import logging
from etils import epath

from palr_jax import files

LOCK = 'palr.lock'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _mine() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
          'command': ' '.join(sys.argv)}


def holder(workdir) -> dict | None:
  """The lock's content, None when there is none; {} when it cannot be read (a lock all the same)."""
  path = epath.Path(workdir) / LOCK
  if not path.exists():
    return None
  try:
    held = files.read_json(path)
  except (ValueError, FileNotFoundError):
    return {}
  return held if isinstance(held, dict) else {}


def acquire(workdir, *, force: bool = False) -> str | None:
  """Takes the lock of `workdir` for this process: None when taken, else one line saying who holds it."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK
  held = holder(workdir)
  if held is not None:
    same_host, pid = held.get('host') == socket.gethostname(), held.get('pid')
    if force:
      logging.warning('%s: held by host %s pid %s; taken over (--force_unlock)', path, held.get('host'), pid)
    elif same_host and pid == os.getpid():
      return None
    elif same_host and isinstance(pid, int) and not _alive(pid):
      logging.warning('%s: held by pid %s on this host, which is gone; taking it over', path, pid)
    else:
      return (f'{workdir} is in use by another job: {path} names host {held.get("host")!r}, pid {pid}, started '
              f'{held.get("started")} ({held.get("command")!r}); wait for it, or rerun with --force_unlock '
              'if that job is gone')
  mine = _mine()
  if files.is_local(path) and held is None:
    try:  # exclusive create: of two jobs starting together, one wins
      fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return acquire(workdir, force=force)
    with os.fdopen(fd, 'w') as f:
      f.write(json.dumps(mine) + '\n')
  else:
    files.atomic_write_json(path, mine)
  return None


def release(workdir) -> None:
  """Removes the lock if this process holds it."""
  path = epath.Path(workdir) / LOCK
  held = holder(workdir)
  if held and held.get('host') == socket.gethostname() and held.get('pid') == os.getpid():
    path.unlink()
