"""A workdir on an object store (gs://; here TensorFlow's ram://, or a local folder the code is told is
not local): copies stream in chunks, TensorBoard events reach the store at checkpoints and at the end
(not at every event), a restart checks finished stages by metadata without downloading them, and every
process's logs land under W/logs/<process>."""
from __future__ import annotations

import json
import os
import tracemalloc
import uuid

from absl import logging
from etils import epath
import pytest

from palr_jax import files
from palr_jax import main as palr_main
from palr_jax import runner
from palr_jax.defaults import get_config
from palr_jax.stages import base
from palr_jax.train import progress
from tests import pipeline_fixtures


@pytest.fixture
def ram(monkeypatch):
  pipeline_fixtures.use_ram_filesystem(monkeypatch)
  return epath.Path(f'ram://{uuid.uuid4().hex}')


def test_a_copy_streams_a_file_larger_than_its_chunk(tmp_path, ram, monkeypatch):
  """What export does with each safetensors shard: never the whole file in memory."""
  data = os.urandom(4 << 20)
  (tmp_path / 'shard.bin').write_bytes(data)
  monkeypatch.setattr(files, 'COPY_CHUNK', 64 << 10)
  monkeypatch.setattr(files.copy_file, '__defaults__', (64 << 10,))
  tracemalloc.start()
  try:
    files.copy_tree(tmp_path, ram / 'out')                      # local -> object store
    files.copy_file(ram / 'out' / 'shard.bin', tmp_path / 'back.bin')  # and back
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert (tmp_path / 'back.bin').read_bytes() == data
  assert peak < len(data) // 8, peak  # a few chunks, not the 4 MiB file
  assert [p.name for p in (ram / 'out').iterdir()] == ['shard.bin']  # no temporary file left


def test_tensorboard_events_reach_an_object_store_at_sync_and_close(ram):
  logdir = ram / 'tensorboard'
  writer = progress.MetricWriter(logdir, 10, 0)
  for step in (1, 2):
    writer.write(step, {'train/loss': 1.0 / step})
  assert list(logdir.iterdir()) == []  # not uploaded at every event
  writer.sync()  # the trainer calls it at each checkpoint
  (events,) = logdir.iterdir()
  assert progress.scalars([events], 'train/loss') == {1: 1.0, 2: 0.5}
  writer.write(3, {'train/loss': 0.25})
  writer.close()
  assert progress.scalars([events], 'train/loss') == {1: 1.0, 2: 0.5, 3: 0.25}


class Ctx:
  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir


def test_a_restart_checks_finished_outputs_on_an_object_store_by_metadata(tmp_path, monkeypatch):
  """A folder the runner is told is not local: a finished stage is found current from the outputs' sizes
  and modification times, without hashing (downloading) them; an output rewritten since, of the same size,
  is hashed and found changed."""
  monkeypatch.setattr(files, 'is_local', lambda path: False)
  calls = []

  def run(ctx):
    calls.append(1)
    (ctx.workdir / 'out').mkdir(exist_ok=True)
    (ctx.workdir / 'out' / 'a.jsonl').write_text(json.dumps({'row': 1}) + '\n')

  stage = base.Stage(name='s', run=run, hashes=('seed',), outputs=('out',))
  said = []
  runner.Runner(tmp_path, say=said.append).run(stage, Ctx(get_config(), tmp_path))
  record = json.loads(runner.record_path(tmp_path, 's').read_text())
  assert record['stats']['out'] and record['outputs']['out'].startswith('dir:')

  hashed = []
  real_digest = runner.digest
  monkeypatch.setattr(runner, 'digest', lambda path: hashed.append(path) or real_digest(path))
  runner.Runner(tmp_path, say=said.append).run(stage, Ctx(get_config(), tmp_path))
  assert said[-1].startswith('s: current, skipped [from run ') and calls == [1] and hashed == []

  (tmp_path / 'out' / 'a.jsonl').write_text(json.dumps({'row': 2}) + '\n')  # same size, new content
  os.utime(tmp_path / 'out' / 'a.jsonl', (1, 1))
  runner.Runner(tmp_path, say=said.append).run(stage, Ctx(get_config(), tmp_path))
  assert any(line.startswith('s: running (its output out changed or is damaged since it was written)') for line in said)
  assert calls == [1, 1]
  assert hashed


def test_every_process_logs_under_w_logs_process_on_an_object_store(ram, monkeypatch):
  handler, flag = logging.get_absl_handler().python_handler, palr_main.flags.FLAGS
  saved = handler.stream, flag['stderrthreshold'].value, flag['logtostderr'].value
  try:
    folder = palr_main.log_to_files(ram / 'run', 3)
    handler.stream.write('a line from process three\n')  # where absl writes once flags are parsed (absl.app)
    palr_main.upload_logs(folder, ram / 'run', 3)
  finally:
    handler.stream.close()
    handler.stream, flag['stderrthreshold'].value, flag['logtostderr'].value = saved
  (log,) = [p for p in (ram / 'run' / 'logs' / '3').iterdir() if '.INFO.' in p.name]
  assert 'a line from process three' in log.read_text()
  assert palr_main.log_process_guess({'JAX_PROCESS_ID': '5', 'SLURM_PROCID': '2'}) == 5
  assert palr_main.log_process_guess({'SLURM_PROCID': '2'}) == 2
  assert palr_main.log_process_guess({}) == 0
