"""The one runner: runs declared stages in order, each only when its outputs are not current.

A `Stage` (declared in palr_jax/stages/base.py) is data: its name, the config keys its fingerprint hashes,
the stages whose outputs it reads, the outputs it writes under the workdir W, how it runs on N processes,
and its function. Its fingerprint
hashes those config values, the digests of its upstream stages' outputs and the identity of the files
outside W it reads (`inputs`, the model's weight and tokenizer files included: a content hash, computed
once and reused while the file's size, mtime, inode and ctime match). When a stage finishes,
`W/<stage>.fingerprint.json` records the fingerprint, the run (its start time, UTC) and a digest of every
output (content hash of files up to `HASH_LIMIT`, size above; on a workdir not on local disk also each
output's size and modification time, so that a restart re-hashes, and downloads, only outputs whose
metadata changed); a stage is skipped only when both match, else it reruns and the log says why. So a
killed job resumes where it stopped, a changed option or input file reruns exactly the stages that read it
(and those whose inputs then changed), and a damaged output (a file cut short, edited, deleted) is redone,
never trusted. A record that is not what the runner wrote (unreadable, not a JSON object, missing keys)
counts as no record: its stage runs.

`Runner.forget` is a forced rerun (`--rerun`): it deletes the stage's record, outputs and `scratch` (its
resumable partial work: training checkpoints, ranking part files), so the stage starts over instead of
resuming or skipping; use it after changing code, which no fingerprint sees.

How a stage runs on a multi-process job (`processes`):
  collective  every process, on the global mesh (training);
  sharded     every process its share of the work (users split over processes) on its host-local
              mesh, each writing its own part files; then process 0 runs `merge`, which joins them;
  host        process 0 alone (CPU work: evaluation, the report); the others wait at a barrier.
Every shared file is written by one process, under a unique temporary name, then moved into place.
Process 0 decides whether a stage runs (fingerprint and reason) and hands the decision to the others, so
all take the same branch even where each host holds its own copies of the input files.

With `shared_dir` (sweeps), finished outputs are also kept there by stage and fingerprint, so sweep
points that share upstream work copy it instead of recomputing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import hashlib
import os
import time

from absl import logging
from etils import epath
import jax

from palr_jax import distributed
from palr_jax import files
from palr_jax import fingerprint
from palr_jax import memory
from palr_jax.stages.base import COLLECTIVE, SHARDED, Stage

HASH_LIMIT = 256 << 20  # outputs up to this size are content-hashed; larger ones by size
INPUT_HASH_LIMIT = 64 << 20  # hashing an input above this size is logged (it is read once, then cached)


def record_path(workdir, stage: str) -> epath.Path:
  return epath.Path(workdir) / f'{stage}.fingerprint.json'


def digest(path: epath.Path) -> str | None:
  """A digest of a file or folder tree (None when missing): content hashes, or sizes of large files."""
  if not path.exists():
    return None
  h = hashlib.sha256()
  if path.is_dir():
    for child in sorted(path.iterdir(), key=lambda p: p.name):
      if child.name.startswith('.'):
        continue
      h.update(f'{child.name}:{digest(child)};'.encode())
    return 'dir:' + h.hexdigest()[:16]
  size = path.stat().length
  if size > HASH_LIMIT:
    return f'size:{size}'
  h.update(path.read_bytes())
  return 'sha256:' + h.hexdigest()[:16]


def stat_signature(path: epath.Path) -> str | None:
  """Size and modification time of every file of a tree, from metadata alone: on an object store (gs://)
  this reads no content, and every write gives an object a new modification time. None when missing, or
  when the filesystem keeps no modification times (then only the digest can tell)."""
  if not path.exists():
    return None
  h = hashlib.sha256()
  if path.is_dir():
    for child in sorted(path.iterdir(), key=lambda p: p.name):
      if not child.name.startswith('.'):
        signature = stat_signature(child)
        if signature is None:
          return None
        h.update(f'{child.name}:{signature};'.encode())
    return 'dir:' + h.hexdigest()[:16]
  st = path.stat()
  return f'{st.length}:{st.mtime}' if st.mtime else None


def _output_stats(workdir: epath.Path, names) -> dict | None:
  """The outputs' stat signatures, recorded beside their digests on a workdir not on local disk (None on a
  local one, where hashing them again is cheap): a restart then checks a finished stage by metadata and
  downloads an output only when its signature changed."""
  return None if files.is_local(workdir) else {name: stat_signature(workdir / name) for name in names}


HASH_CACHE = '.input_hashes.json'  # under W: content hashes of inputs, by path, size, mtime and inode


def _file_key(path: epath.Path) -> list:
  """What identifies a file's version without reading it: size, mtime and, on a local disk, inode and
  ctime (which even an edit that sets the old mtime back changes)."""
  if files.is_local(path):
    st = os.stat(os.fspath(path))
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
  st = path.stat()
  return [st.length, st.mtime, None, None]


def content_hash(path: epath.Path) -> str:
  """sha256 of a file's bytes, read in chunks (a model's weights can be many GB)."""
  h = hashlib.sha256()
  with path.open('rb') as f:
    while chunk := f.read(16 << 20):
      h.update(chunk)
  return 'sha256:' + h.hexdigest()[:16]


def input_identity(paths: Sequence[str], cache_dir=None) -> list:
  """(path, content hash) of each input file (None when missing): an input edited in place changes its
  stage's fingerprint, even within the second it was last written, and a copy with new mtimes (the
  --watch setup copy) does not. Each hash is kept in `cache_dir/.input_hashes.json` and reused while the
  file's size, mtime, inode and ctime match, so a large model is read once, not at every run."""
  cache_path = None if cache_dir is None else epath.Path(cache_dir) / HASH_CACHE
  cache = {}
  if cache_path is not None and cache_path.exists():
    try:
      cache = files.read_json(cache_path)
    except ValueError:
      cache = {}
    if not isinstance(cache, dict):
      cache = {}
  out, changed = [], False
  for p in paths:
    path = epath.Path(p)
    if not path.exists():
      out.append([str(p), None])
      continue
    key = _file_key(path)
    known = cache.get(str(p))
    if isinstance(known, dict) and known.get('key') == key and isinstance(known.get('hash'), str):
      out.append([str(p), known['hash']])
      continue
    if key[0] > INPUT_HASH_LIMIT:
      logging.info('hashing %s (%d MiB) once; kept in %s', p, key[0] >> 20, cache_path)
    cache[str(p)] = {'key': key, 'hash': content_hash(path)}
    changed = True
    out.append([str(p), cache[str(p)]['hash']])
  if changed and cache_path is not None:
    try:
      files.atomic_write_json(cache_path, cache)
    except OSError as e:  # a cache only: the next run hashes again
      logging.warning('%s: not written (%s)', cache_path, e)
  return out


def read_record(workdir, stage: str) -> dict | None:
  """The stage's record, or None when there is none or it is not one the runner wrote."""
  path = record_path(workdir, stage)
  if not path.exists():
    return None
  try:
    record = files.read_json(path)
  except ValueError:
    return None
  ok = (isinstance(record, dict) and isinstance(record.get('fingerprint'), str)
        and isinstance(record.get('outputs'), dict))
  if not ok:
    logging.warning('%s: not a stage record (damaged?); its stage runs again', path)
  return record if ok else None


class Runner:
  """Runs stages for one job; every process makes the same calls in the same order."""

  def __init__(self, workdir, shared_dir=None, *, say: Callable[[str], None] | None = None):
    self.workdir = epath.Path(workdir)
    self.shared_dir = None if shared_dir is None else epath.Path(shared_dir)
    self.say = say or (lambda line: logging.info('%s', line))
    self.ran: list[str] = []
    self.fingerprints: dict[str, str] = {}
    self.forced: set[str] = set()
    # Which run wrote what: in each record, and on each stage line (a skipped stage names its earlier run).
    self.run_id = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())

  def forget(self, stage: Stage) -> None:
    """A forced rerun: deletes (on process 0) the stage's record, outputs and scratch, so that it runs from
    scratch and neither resumes, skips, nor copies its old outputs from the shared folder. Every process
    calls it."""
    self.forced.add(stage.name)
    if not distributed.is_leader():
      return
    gone = []
    for name in (record_path(self.workdir, stage.name).name, *stage.outputs, *stage.scratch):
      path = self.workdir / name
      if path.is_dir():
        path.rmtree()
      elif path.exists():
        path.unlink()
      else:
        continue
      gone.append(name)
    self.say(f'{stage.name}: rerun requested, deleted {gone or "nothing"}')

  def fingerprint(self, stage: Stage, config) -> str:
    upstream = []
    for name in stage.upstream:
      record = read_record(self.workdir, name)
      if record is None or record.get('fingerprint') != self.fingerprints.get(name):
        raise RuntimeError(f'stage {stage.name}: its upstream stage {name} has not finished')
      upstream.append([name, record['outputs']])
    return fingerprint.of(config, stage.hashes, upstream=[str(u) for u in upstream],
                          extra={'inputs': input_identity(stage.inputs, self.workdir), 'extra': stage.also_hashes})

  def why_not_current(self, stage: Stage, fp: str) -> str | None:
    """None when the stage's recorded outputs are current and intact, else the reason it must run."""
    record = read_record(self.workdir, stage.name)
    if record is None:
      path = record_path(self.workdir, stage.name)
      return f'its record {path.name} is not one the runner wrote' if path.exists() else 'not run yet'
    if record.get('fingerprint') != fp:
      return f'its config, inputs or upstream outputs changed (fingerprint {record.get("fingerprint")} -> {fp})'
    recorded = record.get('outputs') or {}
    stats = record.get('stats') if isinstance(record.get('stats'), dict) else {}
    for name in stage.outputs:
      if stats.get(name) is not None and stats[name] == stat_signature(self.workdir / name):
        continue  # unchanged since its digest was taken (a non-local workdir: nothing downloaded)
      now = digest(self.workdir / name)
      if now is None:
        return f'its output {name} is missing'
      if recorded.get(name) != now:
        return f'its output {name} changed or is damaged since it was written'
    return None

  def decide(self, stage: Stage, config) -> tuple[str, str | None]:
    """(fingerprint, why the stage must run or None), decided by process 0 and shared with every process:
    each host hashes its own copy of the inputs (their mtimes differ), and all must name the same part
    files and take the same branch. Current outputs kept in `shared_dir` are copied in first."""
    plan = None
    if distributed.is_leader():
      fp = self.fingerprint(stage, config)
      reason = self.why_not_current(stage, fp)
      if reason is not None and stage.name not in self.forced and self._from_shared(stage, fp):
        reason = self.why_not_current(stage, fp)
        if reason is None:
          self.say(f'{stage.name}: copied from {self.shared_dir}')
      elif reason is None:
        earlier = (read_record(self.workdir, stage.name) or {}).get('run', 'unrecorded')
        self.say(f'{stage.name}: current, skipped [from run {earlier}, fingerprint {fp}]')
      plan = [fp, reason]
    fp, reason = distributed.from_leader(f'{stage.name}-plan', plan)
    self.fingerprints[stage.name] = fp
    return fp, reason

  def run(self, stage: Stage, ctx) -> None:
    """Runs `stage` unless current; raises whatever the stage raises (distributed.Preempted included)."""
    fp, reason = self.decide(stage, ctx.config)
    if reason is None:
      return
    self.say(f'{stage.name}: running ({reason})')
    if jax.process_count() > 1:
      self.say(f'{stage.name}: {stage.processes}: {stage.per_process}')
    start = time.perf_counter()
    memory.reset_peak_rss()
    ctx.stage, ctx.fingerprint, ctx.run_id = stage.name, fp, self.run_id
    ctx.upstream = {name: read_record(self.workdir, name)['outputs'] for name in stage.upstream}
    if stage.resumes is not None and distributed.is_leader():
      found = stage.resumes(ctx)
      if found:
        self.say(f'{stage.name}: resumes {found}')
    if stage.processes in (COLLECTIVE, SHARDED) or distributed.is_leader():
      stage.run(ctx)
      logging.info('stage %s: run returned after %.1f s', stage.name, time.perf_counter() - start)
    if stage.processes == SHARDED:
      distributed.barrier(f'{stage.name}-parts')
      if distributed.is_leader():
        stage.merge(ctx)
    if distributed.is_leader():
      files.atomic_write_json(record_path(self.workdir, stage.name), {
          'stage': stage.name, 'fingerprint': fp, 'run': self.run_id, 'hashes': list(stage.hashes),
          'upstream': list(stage.upstream),
          'outputs': {name: digest(self.workdir / name) for name in stage.outputs},
          'stats': _output_stats(self.workdir, stage.outputs)})
      self._to_shared(stage, fp)
    distributed.barrier(f'{stage.name}-done')
    memory.release_memory()
    self.ran.append(stage.name)
    self.say(f'{stage.name}: done in {time.perf_counter() - start:.1f} s (peak RSS {memory.peak_rss_gib():.2f} GiB) '
             f'[run {self.run_id}, fingerprint {fp}]')

  def _shared(self, stage: Stage, fp: str) -> epath.Path | None:
    return None if self.shared_dir is None else self.shared_dir / stage.name / fp

  def _from_shared(self, stage: Stage, fp: str) -> bool:
    """Process 0: copies the stage's outputs kept in `shared_dir` for `fp`, if any, into the workdir."""
    src = self._shared(stage, fp)
    if src is None or not (src / 'done').exists():
      return False
    for name in stage.outputs:
      files.copy_tree(src / name, self.workdir / name)
    try:
      record = files.read_json(src / 'done')
    except ValueError:  # not a record: copied as it is, read_record then ignores it
      record = None
    if isinstance(record, dict):  # the copies' own signatures: the recorded digests hold for them
      record['stats'] = _output_stats(self.workdir, stage.outputs)
      files.atomic_write_json(record_path(self.workdir, stage.name), record)
    else:
      files.copy_tree(src / 'done', record_path(self.workdir, stage.name))
    return True

  def _to_shared(self, stage: Stage, fp: str) -> None:
    dst = self._shared(stage, fp)
    if dst is None or (dst / 'done').exists() and stage.name not in self.forced:
      return
    for name in stage.outputs:
      files.copy_tree(self.workdir / name, dst / name)
    files.copy_tree(record_path(self.workdir, stage.name), dst / 'done')


def with_upstream(stages: Sequence[Stage], names: Sequence[str]) -> list[Stage]:
  """The named stages and, transitively, the stages they read from, in the order given."""
  by_name = {s.name: s for s in stages}
  unknown = sorted(set(names) - set(by_name))
  if unknown:
    raise ValueError(f'--stages: unknown stage(s) {unknown}; stages: {list(by_name)}')
  wanted, todo = set(), list(names)
  while todo:
    name = todo.pop()
    if name not in wanted:
      wanted.add(name)
      todo.extend(by_name[name].upstream)
  return [s for s in stages if s.name in wanted]
