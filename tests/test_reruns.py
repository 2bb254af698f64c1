"""When the runner skips, reruns and starts over (palr_jax/runner.py): damaged records and outputs, inputs
edited in place, forced reruns, and training state that never outlives the options it was trained with."""
from __future__ import annotations

import json
import os
import re

import pytest

from palr_jax import main as palr_main
from palr_jax import runner
from palr_jax.stages import base
from palr_jax.defaults import get_config
from palr_jax.train import progress
from tests.pipeline_fixtures import config as _config, write_dataset as _write_dataset, write_model as _write_model


class Ctx:
  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir


def _stage(calls, inputs=(), scratch=()):
  """A stage writing out.jsonl (three JSON lines) and, as its resumable work, part/0."""

  def run(ctx):
    calls.append(1)
    (ctx.workdir / 'out.jsonl').write_text(''.join(json.dumps({'row': i}) + '\n' for i in range(3)))
    (ctx.workdir / 'part').mkdir(exist_ok=True)
    (ctx.workdir / 'part' / '0').write_text('partial')

  return base.Stage(name='s', run=run, hashes=('seed',), outputs=('out.jsonl',), inputs=tuple(inputs),
                    scratch=tuple(scratch))


def _plain(lines):
  """Stage lines without the run they name ([run R, fingerprint F]): test_stage_lines_name_their_run."""
  return [re.sub(r' \[(from )?run [^\]]*\]$', '', line) for line in lines]


def _run(stage, workdir, shared=None):
  said = []
  job = runner.Runner(workdir, shared, say=said.append)
  job.run(stage, Ctx(get_config(), workdir))
  return _plain(said)


@pytest.mark.parametrize('record', ['[]', 'garbage{', '{}', '{"fingerprint": 3, "outputs": {}}',
                                    '{"fingerprint": "x", "outputs": []}'])
def test_a_record_the_runner_did_not_write_reruns_its_stage(tmp_path, record):
  calls = []
  _run(_stage(calls), tmp_path)
  runner.record_path(tmp_path, 's').write_text(record)  # issue: `[]` raised AttributeError
  said = _run(_stage(calls), tmp_path)
  assert calls == [1, 1]
  assert said[0] == 's: running (its record s.fingerprint.json is not one the runner wrote)'
  assert json.loads(runner.record_path(tmp_path, 's').read_text())['stage'] == 's'


def test_an_output_cut_short_reruns_its_stage(tmp_path):
  calls = []
  _run(_stage(calls), tmp_path)
  full = (tmp_path / 'out.jsonl').read_text()
  assert _run(_stage(calls), tmp_path) == ['s: current, skipped'] and calls == [1]
  (tmp_path / 'out.jsonl').write_text(full[:-7])  # cut mid-line
  said = _run(_stage(calls), tmp_path)
  assert said[0] == 's: running (its output out.jsonl changed or is damaged since it was written)'
  assert calls == [1, 1] and (tmp_path / 'out.jsonl').read_text() == full


def test_an_input_edited_in_place_reruns_its_stage(tmp_path):
  """Same size, same mtime, other content: the fingerprint sees it (the content is hashed)."""
  data = tmp_path / 'data.txt'
  data.write_text('u1 i1 100\n')
  calls = []
  work = tmp_path / 'w'
  work.mkdir()
  _run(_stage(calls, inputs=[str(data)]), work)
  st = os.stat(data)
  data.write_text('u1 i2 100\n')
  os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
  said = _run(_stage(calls, inputs=[str(data)]), work)
  assert calls == [1, 1] and said[0].startswith('s: running (its config, inputs or upstream outputs changed')


def test_forget_starts_over_even_from_a_shared_copy(tmp_path):
  calls = []
  work, shared = tmp_path / 'w', tmp_path / 'shared'
  work.mkdir()
  _run(_stage(calls, scratch=['part']), work, shared)
  assert _run(_stage(calls, scratch=['part']), work, shared) == ['s: current, skipped']
  said = []
  job = runner.Runner(work, shared, say=said.append)
  stage = _stage(calls, scratch=['part'])
  job.forget(stage)
  assert _plain(said) == ["s: rerun requested, deleted ['s.fingerprint.json', 'out.jsonl', 'part']"]
  assert not (work / 'out.jsonl').exists() and not (work / 'part').exists()
  job.run(stage, Ctx(get_config(), work))
  assert calls == [1, 1] and _plain(said)[-2].startswith('s: running (not run yet)')  # not copied from shared


# ------------------------------------------------------------------------------ the real pipeline


@pytest.fixture
def tiny(tmp_path):
  _write_dataset(tmp_path / 'data')
  _write_model(tmp_path / 'model')
  return tmp_path


def _say(config, workdir, **kwargs):
  said = []
  palr_main.run(config, workdir, say=said.append, **kwargs)
  return [line for line in _plain(said) if not line.startswith('precision: ')]  # stage lines only


def test_retriever_reruns_for_a_cut_candidate_file_and_an_edited_data_file(tiny):
  config, work = _config(tiny), tiny / 'run'
  _say(config, work, only=('retriever',))
  test_rows = (work / 'candidates' / 'test.jsonl').read_text()
  assert _say(config, work, only=('retriever',)) == ['retriever: current, skipped']
  # Issue: a test.jsonl cut mid-line was 'current, skipped', and a later stage died on a bare KeyError.
  (work / 'candidates' / 'test.jsonl').write_text(test_rows[:len(test_rows) // 2])
  said = _say(config, work, only=('retriever',))
  assert said[0] == 'retriever: running (its output candidates/test.jsonl changed or is damaged since it was written)'
  assert (work / 'candidates' / 'test.jsonl').read_text() == test_rows
  # Issue: an input data file edited in place was skipped too. One user's last event moves in time.
  inter = tiny / 'data' / 'tiny.inter'
  lines = inter.read_text().splitlines()
  last = lines[-1].split('\t')
  lines[-1] = '\t'.join(last[:3] + [str(int(last[3]) - 5)])
  inter.write_text('\n'.join(lines) + '\n')
  said = _say(config, work, only=('retriever',))
  assert said[0].startswith('retriever: running (its config, inputs or upstream outputs changed')


def test_doubled_rows_give_the_retriever_the_same_split_and_metrics(tiny):
  """Issue: doubling every row of a RecBole .inter took test HR@10 from 0.083 to 0.800 (the test target
  was the valid target for half the users)."""
  config = _config(tiny)
  _say(config, tiny / 'once', only=('retriever',))
  lines = (tiny / 'data' / 'tiny.inter').read_text().splitlines()
  doubled = tiny / 'doubled'
  doubled.mkdir()
  (doubled / 'tiny.inter').write_text('\n'.join([lines[0]] + [row for row in lines[1:] for _ in (0, 1)]) + '\n')
  (doubled / 'tiny.item').write_text((tiny / 'data' / 'tiny.item').read_text())
  config.data.path = str(doubled)
  _say(config, tiny / 'twice', only=('retriever',))
  once, twice = (json.loads((tiny / name / 'retriever_results.json').read_text()) for name in ('once', 'twice'))
  assert twice['test'] == once['test'] and twice['valid'] == once['valid']
  for split in ('valid', 'test'):
    assert (tiny / 'twice' / 'candidates' / f'{split}.jsonl').read_text() == \
        (tiny / 'once' / 'candidates' / f'{split}.jsonl').read_text()


def _learning_rates(logdir):
  return progress.scalars(sorted(logdir.glob('events.out.tfevents.*')), 'train/learning_rate')


def test_a_changed_training_option_trains_again_from_step_zero(tiny):
  """Issue: after --config.train.learning_rate=5e-3 the run 'resumed from step N', trained zero steps and
  ranked with the old adapters; after lora.rank=4 it died in an orbax shape error."""
  config, work = _config(tiny), tiny / 'run'
  only = ('finetune_palr_v2',)
  _say(config, work, only=only)
  old = _learning_rates(work / 'palr_v2' / 'tensorboard')
  assert sorted(old) == [1, 2, 3, 4]
  config.train.learning_rate = 5e-3
  said = _say(config, work, only=only)
  assert any(line.startswith('finetune_palr_v2: running (its config') for line in said), said
  new = _learning_rates(work / 'palr_v2' / 'tensorboard')
  assert sorted(new) == [1, 2, 3, 4]  # every step trained again, with the new peak
  assert max(new.values()) == pytest.approx(5e-3) and max(old.values()) == pytest.approx(2e-4)
  config.lora.rank = 4
  _say(config, work, only=only)
  peft_config = json.loads((work / 'palr_v2' / 'adapters' / 'step_4' / 'adapter_config.json').read_text())
  assert peft_config['r'] == 4
  assert sorted(_learning_rates(work / 'palr_v2' / 'tensorboard')) == [1, 2, 3, 4]


def test_rerun_trains_from_scratch(tiny):
  config, work = _config(tiny), tiny / 'run'
  only = ('finetune_palr_v2',)
  _say(config, work, only=only)
  before = _learning_rates(work / 'palr_v2' / 'tensorboard')
  said = _say(config, work, only=only, rerun=('finetune_palr_v2',))
  assert said[0].startswith("finetune_palr_v2: rerun requested, deleted ['finetune_palr_v2.fingerprint.json', "
                            "'palr_v2/checkpoints', 'palr_v2/adapters', 'palr_v2/tensorboard', 'examples'")
  assert 'finetune_palr_v2: running (not run yet)' in said
  assert _learning_rates(work / 'palr_v2' / 'tensorboard') == before  # all four steps again, same schedule


def test_input_hashes_are_cached_and_a_copy_with_new_mtimes_is_the_same_input(tmp_path, monkeypatch):
  """Issue 27.7: inputs above 64 MiB were identified by size and mtime, so the --watch setup copy reran
  every stage. Now by content, hashed once while size, mtime and inode match."""
  data = tmp_path / 'weights.bin'
  data.write_bytes(b'x' * 1000)
  work = tmp_path / 'w'
  work.mkdir()
  calls, hashed = [], []
  real = runner.content_hash
  monkeypatch.setattr(runner, 'content_hash', lambda path: hashed.append(str(path)) or real(path))
  _run(_stage(calls, inputs=[str(data)]), work)
  assert _run(_stage(calls, inputs=[str(data)]), work) == ['s: current, skipped']
  assert hashed == [str(data)]  # the second run read the cache
  copy = tmp_path / 'copy.bin'
  copy.write_bytes(data.read_bytes())
  os.replace(copy, data)  # a new inode and mtime, the same bytes
  assert _run(_stage(calls, inputs=[str(data)]), work) == ['s: current, skipped']
  assert calls == [1] and hashed == [str(data)] * 2


def test_new_weights_rerun_the_stages_that_load_the_model_and_a_touch_reruns_nothing(tiny):
  """Issue 29.1: model.safetensors rewritten in place (same config, new weights) left every stage
  'current, skipped'; the fine-tunes and rank hashed only the spec string and config.json."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  config, work = _config(tiny), tiny / 'run'
  first = _say(config, work, only=('rank',))
  stages = [line.split(':')[0] for line in first if ': running' in line]
  weights = tiny / 'model' / 'model.safetensors'
  os.utime(weights, ns=(1, 10**18))  # new mtime, same bytes
  assert all(line.endswith('current, skipped') for line in _say(config, work, only=('rank',)))
  tensors = st_numpy.load_file(str(weights))
  st_numpy.save_file({k: v * 2 for k, v in tensors.items()}, str(weights), metadata={'format': 'pt'})
  said = _say(config, work, only=('rank',))
  reran = [line.split(':')[0] for line in said if ': running' in line]
  assert reran == [s for s in stages if s.startswith(('finetune_', 'rank'))] and len(reran) >= 2, said
  assert 'retriever: current, skipped' in said


def test_a_retriever_rerun_with_the_same_candidates_changes_no_downstream_fingerprint(tiny):
  """Issue 29.5: retriever_results.json recorded fit seconds, so its digest changed at every run and
  deleting one candidates file reran both fine-tunes, rank, report and export."""
  config, work = _config(tiny), tiny / 'run'
  _say(config, work, only=('retriever',))
  before = json.loads(runner.record_path(work, 'retriever').read_text())['outputs']
  (work / 'candidates' / 'test.jsonl').unlink()
  said = _say(config, work, only=('retriever',))
  assert said[0] == 'retriever: running (its output candidates/test.jsonl is missing)'
  assert json.loads(runner.record_path(work, 'retriever').read_text())['outputs'] == before
  timings = json.loads((work / 'retriever_timings.json').read_text())  # kept beside, out of the digest
  assert set(timings['fit_seconds']) == {'valid', 'test'}
  assert 'fit_seconds' not in json.loads((work / 'retriever_results.json').read_text())


def test_a_damaged_rank_or_profiles_part_is_redone_not_fatal(tmp_path):
  """Issue 29.9: a truncated rank part file failed every rerun ('not valid JSON') and never healed."""
  import types  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from palr_jax.stages import profiles, rank  # pylint: disable=g-import-not-at-top
  ctx = types.SimpleNamespace(workdir=tmp_path, fingerprint='f1',
                              inter=types.SimpleNamespace(user_ids=np.array(['u0', 'u1', 'u2'])))
  good = {key: [1] for key in rank.PART_KEYS}
  path = rank._part(ctx, 'zero-valid')
  path.parent.mkdir(parents=True)
  for damaged in (json.dumps(good)[:-9], '[1, 2]', '{"users": [1]}'):
    path.write_text(damaged)
    assert rank._ranked_part(ctx, 'zero-valid', lambda: good) == good
    assert json.loads(path.read_text()) == good
  assert rank._ranked_part(ctx, 'zero-valid', lambda: pytest.fail('an intact part is not redone')) == good
  parts = tmp_path / profiles.PARTS / 'f1'
  parts.mkdir(parents=True)
  (parts / '0.jsonl').write_text(json.dumps({'user': 'u0', 'user_index': 0, 'profile': 'likes x'}) + '\n')
  (parts / '1.jsonl').write_text('{"user": "u1", "user_index": 1, "prof')
  assert list(profiles.finished(ctx)) == [0]  # u1 is written again


def _state(run_dir):
  return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob('*'))
          if p.is_file() and p.parts[len(run_dir.parts)] in ('checkpoints', 'adapters')}


def test_a_changed_option_that_fails_deletes_nothing_and_the_old_command_skips(tiny):
  """Issue 29.2: a changed option cleared the finished fine-tune first, then failed (exit 1); the old
  command then trained again from scratch."""
  config, work = _config(tiny), tiny / 'run'
  only = ('finetune_palr_v2',)
  _say(config, work, only=only)
  before = _state(work / 'palr_v2')
  assert any(name.startswith('adapters/') for name in before)
  config.prompts.max_length = 8  # too short for any example: fails while the examples are written
  with pytest.raises(Exception):
    _say(config, work, only=only)
  assert _state(work / 'palr_v2') == before
  config.prompts.max_length = _config(tiny).prompts.max_length
  assert _say(config, work, only=only)[-1] == 'finetune_palr_v2: current, skipped'


def test_a_changed_option_that_fails_in_training_sets_the_old_state_aside_and_takes_it_back(tiny, monkeypatch):
  from palr_jax.train import loop  # pylint: disable=g-import-not-at-top
  config, work = _config(tiny), tiny / 'run'
  only = ('finetune_palr_v2',)
  _say(config, work, only=only)
  before = _state(work / 'palr_v2')
  config.train.learning_rate = 5e-3
  with monkeypatch.context() as m:
    m.setattr(loop, 'train', lambda *a, **k: (_ for _ in ()).throw(RuntimeError('out of memory')))
    with pytest.raises(RuntimeError, match='out of memory'):
      _say(config, work, only=only)
  assert _state(work / 'palr_v2' / 'previous') == before  # set aside, not deleted
  config.train.learning_rate = _config(tiny).train.learning_rate
  said = _say(config, work, only=only)
  assert 'finetune_palr_v2: running (its output palr_v2/checkpoints is missing)' in said
  assert {k: v for k, v in _state(work / 'palr_v2').items() if k.startswith('checkpoints/')} == \
      {k: v for k, v in before.items() if k.startswith('checkpoints/')}  # resumed at the end: no step trained
  assert not (work / 'palr_v2' / 'previous').exists()


def test_stage_lines_name_their_run_and_fingerprint(tmp_path):
  """Issue 29.10: a stage line did not say which run it came from."""
  calls, said = [], []
  first = runner.Runner(tmp_path, say=said.append)
  first.run(_stage(calls), Ctx(get_config(), tmp_path))
  record = json.loads(runner.record_path(tmp_path, 's').read_text())
  assert record['run'] == first.run_id
  assert said[-1].startswith('s: done in') and said[-1].endswith(f'[run {first.run_id}, fingerprint '
                                                                  f'{record["fingerprint"]}]')
  second = runner.Runner(tmp_path, say=said.append)
  second.run(_stage(calls), Ctx(get_config(), tmp_path))
  assert said[-1] == f's: current, skipped [from run {first.run_id}, fingerprint {record["fingerprint"]}]'


def test_stages_without_the_report_do_not_present_old_results_as_new(tiny, capsys):
  """Issue 29.10: `--stages retriever` printed the previous run's results.md as if it were current."""
  config, work = _config(tiny), tiny / 'run'
  work.mkdir()
  (work / 'results.json').write_text('{"from": "an earlier run"}')
  (work / 'results.md').write_text('# PALR results (earlier)\n')
  runner.record_path(work, 'report').write_text(json.dumps({'stage': 'report', 'fingerprint': 'f0',
                                                            'run': '2026-01-01T00:00:00Z', 'outputs': {}}))
  assert palr_main.run(config, work, only=('retriever',), say=lambda line: None) is None
  assert palr_main.results_heading(work) == 'results.md: report of run 2026-01-01T00:00:00Z, fingerprint f0'
