"""The whole PALR pipeline on a tiny model and a small fixture dataset: outputs, skip-when-current, and
reruns limited to the stages downstream of a changed option."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from etils import epath
import numpy as np
import pytest

from palr_jax import cli
from palr_jax import main as palr_main
from palr_jax.stages import rank as rank_stage
from palr_jax.train import checkpointing
from tests import pipeline_fixtures, prompt_fixtures

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _mtimes(workdir, names):
  return {n: os.stat(workdir / n).st_mtime_ns for n in names}


def test_pipeline_end_to_end_then_skips_then_reruns_ranking_only(tmp_path, monkeypatch):
  pipeline_fixtures.write_fixtures(tmp_path)
  workdir = tmp_path / 'run'
  config = pipeline_fixtures.config(tmp_path)

  results = palr_main.run(config, workdir)

  # The same run with W on a filesystem that is no POSIX path (TensorFlow's ram://, reached through epath
  # like gs://): the same results, and no open/os/shutil call on a workdir path.
  with pytest.MonkeyPatch.context() as mp:
    pipeline_fixtures.use_ram_filesystem(mp)
    mp.chdir(tmp_path)
    ram = epath.Path(f'ram://{uuid.uuid4().hex}/run')
    calls = pipeline_fixtures.forbid_local_io(mp, 'ram:')
    with pytest.raises(AssertionError, match='without epath'):
      os.makedirs(ram / 'plots')  # what evaluation once did: a local folder named ram:
    calls.clear()
    assert palr_main.run(config, ram) == results
    assert not calls
    steps = lambda w: sorted(p.name for p in (w / 'palr_v1' / 'checkpoints').iterdir())  # noqa: E731
    assert steps(ram) == steps(workdir) == ['2', '4']  # orbax's steps, mirrored through epath
    for name in ('predictions/test.jsonl', 'rankings.json', 'profiles.jsonl'):
      assert (ram / name).read_text() == (workdir / name).read_text(), name
    assert checkpointing.adapter_steps(ram / 'palr_v2') == checkpointing.adapter_steps(workdir / 'palr_v2')
    assert (ram / 'export' / 'merged' / 'config.json').exists()
  assert not (tmp_path / 'ram:').exists()

  # The ablation's rows: the MF model alone ('ials', the retriever fuses transitions), each method, and each
  # LLM method that scores the candidates fused with the retriever (weight chosen on valid).
  fused = {f'{m}+fusion' for m in results['fusion']}
  assert {'zero_shot', 'palr_v2'} <= set(results['fusion']) <= {'zero_shot', 'palr_v1', 'palr_v2'}
  for split in ('valid', 'test'):
    assert set(results[split]['metrics']) == set(config.eval.methods) | {'ials'} | fused
    for method, metrics in results[split]['metrics'].items():
      assert set(metrics) == {f'{m}@{k}' for k in (1, 3, 5) for m in ('HR', 'NDCG')}
      assert all(0.0 <= v <= 1.0 for v in metrics.values()), (method, metrics)
    assert set(results[split]['vs_retriever']) == {'zero_shot', 'palr_v1', 'palr_v2', 'ials'} | fused
  assert results['test']['num_users'] == pipeline_fixtures.NUM_USERS
  # The retriever's row equals the metrics of its own candidate file.
  test_rows = [json.loads(line) for line in (workdir / 'candidates' / 'test.jsonl').read_text().splitlines()]
  ranks = np.array([r['target_rank'] for r in test_rows], np.float64)
  assert results['test']['metrics']['retriever']['HR@3'] == pytest.approx(np.mean(ranks < 3))
  predictions = [json.loads(line) for line in (workdir / 'predictions' / 'test.jsonl').read_text().splitlines()]
  assert len(predictions) == pipeline_fixtures.NUM_USERS
  raw = {i: r for row in test_rows for i, r in zip(row['items'], row['item_ids'])}
  by_user = {row['user']: row for row in test_rows}
  for p in predictions:
    row = by_user[p['user']]
    assert sorted(p['ranked_items']) == sorted(row['items'])  # a reordering of the candidates
    assert p['ranked_item_ids'] == [raw[i] for i in p['ranked_items']]
    assert p['target'] == row['target']
    expected = p['ranked_items'].index(p['target']) if p['target'] in p['ranked_items'] else row['target_rank']
    assert p['rank'] == expected
  assert '| palr_v2 |' in (workdir / 'results.md').read_text()
  # The evidence: every method's test lists, raw ids, recompute every test metric from the raw data alone.
  from palr_jax.data import interactions
  from palr_jax.tools import recompute
  lines = recompute.read_lines(workdir / 'test_predictions.jsonl')
  again = recompute.recompute(lines, recompute.held_out(interactions.load(config.data)), (1, 3, 5))
  chosen = results['palr']['method']
  assert set(again) == set(results['test']['metrics']) | {'palr'}
  for method, values in again.items():
    assert values['users'] == pipeline_fixtures.NUM_USERS
    expected = results['test']['metrics'][chosen if method == 'palr' else method]
    assert 'HR@5' not in values  # past the 4 candidates the lists hold
    for name in ('HR@1', 'NDCG@1', 'HR@3', 'NDCG@3'):
      assert values[name] == pytest.approx(expected[name]), (method, name)
  assert chosen.removesuffix('+fusion') in config.variants
  # Reordering diagnostics: the retriever agrees with itself, and its HR@10 when the target was retrieved
  # is its HR@10 over those users.
  ro = results['test']['reordering']
  retrieved = np.array([r['target'] in r['items'] for r in test_rows])
  assert ro['target_in_candidates'] == pytest.approx(retrieved.mean())
  assert ro['methods']['retriever']['top1_as_retriever'] == 1.0
  assert ro['methods']['retriever']['HR@10_when_retrieved'] == pytest.approx(np.mean(ranks[retrieved] < 10))
  assert set(ro['methods']) == set(config.eval.methods) | {'ials'} | fused
  for name in ('plots/hr_at_k.png', 'plots/loss.png', 'export/merged/config.json',
               'export/peft/adapter_config.json'):
    assert (workdir / name).exists(), name
  steps = json.loads((workdir / 'rankings.json').read_text())['methods']['palr_v2']['checkpoint_step']
  assert steps in (2, 4)

  # The exported merged model gives the same logits in transformers as the tuned model in palr-jax.
  merged = transformers.LlamaForCausalLM.from_pretrained(workdir / 'export' / 'merged')
  assert merged.config.vocab_size == len(prompt_fixtures.tiny_tokenizer())

  # Same command again: every stage is current, nothing is rewritten.
  watched = ['candidates/train.jsonl', 'profiles.jsonl', 'rankings.json', 'results.json',
             'finetune_palr_v2.fingerprint.json', 'export/merged/config.json']
  before = _mtimes(workdir, watched)
  again = palr_main.run(config, workdir)
  assert _mtimes(workdir, watched) == before
  assert again == results

  # A ranking option changes: only ranking, evaluation and export rerun.
  config.variants.palr_v2.rank_mode = 'generate'
  palr_main.run(config, workdir)
  after = _mtimes(workdir, watched)
  for name in ('candidates/train.jsonl', 'profiles.jsonl', 'finetune_palr_v2.fingerprint.json'):
    assert after[name] == before[name], name
  for name in ('rankings.json', 'results.json'):
    assert after[name] != before[name], name

  # Ranking killed part-way resumes at the first part it had not finished.
  real, calls = rank_stage.rank_split, []

  def dying(*args, **kwargs):
    calls.append(args[3])  # the split
    if len(calls) == 3:
      raise RuntimeError('killed')
    return real(*args, **kwargs)

  monkeypatch.setattr(rank_stage, 'rank_split', dying)
  config.rank.max_items = 2
  with pytest.raises(RuntimeError, match='killed'):
    palr_main.run(config, workdir)
  assert len(list((workdir / 'rank_parts').glob('*/*.json'))) == 2
  calls.clear()
  monkeypatch.setattr(rank_stage, 'rank_split', lambda *a, **k: calls.append(a[3]) or real(*a, **k))
  resumed = palr_main.run(config, workdir)
  total = 2 + sum(len(checkpointing.adapter_steps(workdir / v)) + 1 for v in ('palr_v1', 'palr_v2'))
  assert len(calls) == total - 2
  assert not (workdir / 'rank_parts').exists()
  calls.clear()
  (workdir / 'rank.fingerprint.json').unlink()  # the same ranking again, from scratch, without a kill
  assert palr_main.run(config, workdir) == resumed
  assert len(calls) == total

  # Averaging over candidate orders: a score-mode method (zero_shot) ranks each split twice, the second
  # time with the candidates shuffled again, and keeps each item's mean score.
  real_users, seen = rank_stage.rank_users, []

  def recording(model, builder, examples, mode, *args, **kwargs):
    scores = real_users(model, builder, examples, mode, *args, **kwargs)
    seen.append((mode, [e.candidates for e in examples], [np.asarray(s, np.float64) for s in scores]))
    return scores

  monkeypatch.setattr(rank_stage, 'rank_users', recording)
  config.rank.orders = 2
  palr_main.run(config, workdir)
  runs = [(candidates, scores) for mode, candidates, scores in seen if mode == 'score']
  assert len(runs) == 4  # zero_shot: valid twice, then test twice
  (first, first_scores), (second, second_scores) = runs[2:]
  assert [sorted(c) for c in first] == [sorted(c) for c in second] and first != second
  rows = {r['user_index']: r['items'] for r in map(json.loads, (workdir / 'candidates' / 'test.jsonl').open())}
  ranked = json.loads((workdir / 'rankings.json').read_text())
  test = ranked['methods']['zero_shot']['test']
  for n, user in enumerate(ranked['users']):
    stored = dict(zip(rows[user], test['scores'][n]))
    for k, item in enumerate(first[n]):
      expected = np.mean([first_scores[n][k], second_scores[n][list(second[n]).index(item)]])
      np.testing.assert_allclose(stored[item], expected, rtol=1e-6, err_msg=f'user {user} item {item}')


def test_compilation_cache_is_used_and_env_wins(tmp_path):
  # In a child: jax's config is process-wide. A program compiled under the cache leaves an entry there,
  # and $JAX_COMPILATION_CACHE_DIR, when set, is kept over the flag.
  code = (
      'import sys, jax, jax.numpy as jnp\n'
      'from palr_jax import cli\n'
      'print(cli.use_compilation_cache(sys.argv[1]))\n'
      "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
      'jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'xla')], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out[-1] == str(tmp_path / 'xla' / cli.host_kind())  # one folder per instruction set
  assert any(p.name.startswith('jit_') for p in (tmp_path / 'xla' / cli.host_kind()).iterdir())
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'env')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'xla')], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out[-1] == str(tmp_path / 'env')
  out = subprocess.run([sys.executable, '-c', code.replace('sys.argv[1]', "''"), 'x'],
                       env={k: v for k, v in env.items() if k != 'JAX_COMPILATION_CACHE_DIR'}, check=True,
                       capture_output=True, text=True).stdout.split()
  assert out[-1] == 'None'


def test_a_second_job_on_a_held_workdir_exits_2_naming_the_holder(tmp_path):
  """Issue 29.8: two jobs on one workdir both computed everything and one died on the other's part file."""
  import socket  # pylint: disable=g-import-not-at-top
  from palr_jax import lock  # pylint: disable=g-import-not-at-top
  pipeline_fixtures.write_fixtures(tmp_path)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / lock.LOCK).write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                                               'started': '2026-01-02 03:04:05 UTC', 'command': 'first job'}))
  env = {**os.environ, 'PYTHONPATH': os.getcwd()}
  out = subprocess.run([sys.executable, '-m', 'palr_jax.main', f'--config=tests/pipeline_fixtures.py:{tmp_path}',
                        f'--workdir={workdir}', '--stages=retriever'], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  line = out.stderr.strip().splitlines()[-1]
  assert f'pid {os.getpid()}' in line and '2026-01-02 03:04:05 UTC' in line and 'first job' in line, line
  assert not (workdir / 'candidates').exists()
  assert json.loads((workdir / lock.LOCK).read_text())['pid'] == os.getpid()  # not taken from its holder


def test_a_stale_lock_is_taken_over_and_force_unlock_takes_any(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  from palr_jax import lock  # pylint: disable=g-import-not-at-top
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                        text=True, check=True)
  (tmp_path / lock.LOCK).write_text(json.dumps({'host': socket.gethostname(), 'pid': int(dead.stdout)}))
  assert lock.acquire(tmp_path) is None  # its pid is gone: stale
  assert lock.holder(tmp_path)['pid'] == os.getpid()
  assert lock.acquire(tmp_path) is None  # ours already
  lock.release(tmp_path)
  assert lock.holder(tmp_path) is None
  (tmp_path / lock.LOCK).write_text(json.dumps({'host': 'another-host', 'pid': 1}))
  assert "host 'another-host', pid 1" in lock.acquire(tmp_path)
  assert lock.acquire(tmp_path, force=True) is None and lock.holder(tmp_path)['pid'] == os.getpid()
