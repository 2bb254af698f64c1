"""Sweeps: axis expansion, overrides, resume after a kill, the CSV/table/plot, launch commands."""
import csv
import json
import os
import pathlib
import shlex
import subprocess
import sys

import matplotlib.image
import ml_collections
import pytest

from palr_jax import cli
from palr_jax.sweep import launch, report, run, spec
from palr_jax.sweep.spec import axis, product, zip_

ROOT = pathlib.Path(__file__).resolve().parents[1]


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.lora = ml_collections.ConfigDict({'rank': 8, 'alpha': 16.0, 'targets': ('q',)})
  return c


class FakeRunner:
  """Writes a results.json whose numbers are a function of the config, like main.run would."""

  def __init__(self, fail_on=None):
    self.calls = []
    self.fail_on = fail_on

  def __call__(self, config, workdir, *, shared_dir):
    self.calls.append((config, workdir, shared_dir))
    if config.lora.rank == self.fail_on:
      raise KeyboardInterrupt  # A kill in the middle of a point: no results.json.
    r, s = config.lora.rank, config.seed
    results = {split: {'num_users': 10, 'metrics': {
        'retriever': {'HR@10': 0.1, 'NDCG@10': 0.05},
        'palr_v2': {'HR@10': r / 100 + s / 1000 + off, 'NDCG@10': r / 200 + off}}}
               for split, off in (('valid', 0.01), ('test', 0.0))}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'results.json').write_text(json.dumps(results))


def test_product_and_zip_expand_in_order():
  assert product(axis('a', [1, 2]), axis('b', ['x', 'y', 'z'])) == [
      {'a': 1, 'b': 'x'}, {'a': 1, 'b': 'y'}, {'a': 1, 'b': 'z'},
      {'a': 2, 'b': 'x'}, {'a': 2, 'b': 'y'}, {'a': 2, 'b': 'z'}]
  assert zip_(axis('a', [1, 2]), axis('b', [3, 4])) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 4}]
  nested = product(axis('s', [0, 1]), zip_(axis('a', [1, 2]), axis('b', [3, 4])))
  assert nested == [{'s': 0, 'a': 1, 'b': 3}, {'s': 0, 'a': 2, 'b': 4},
                    {'s': 1, 'a': 1, 'b': 3}, {'s': 1, 'a': 2, 'b': 4}]
  with pytest.raises(spec.SweepError, match='different lengths'):
    zip_(axis('a', [1, 2]), axis('b', [3]))
  with pytest.raises(spec.SweepError, match=r"\['a'\] appear in more than one axis"):
    product(axis('a', [1]), axis('a', [2]))
  with pytest.raises(spec.SweepError, match='non-empty list'):
    axis('a', 'abc')


def test_load_sweep_validates(tmp_path):
  good = tmp_path / 'good.py'
  good.write_text('from palr_jax.sweep.spec import axis\nBASE_CONFIG = "c.py:x"\n'
                  'def get_sweep():\n  return axis("lora.rank", [4, 8])\n')
  assert spec.load_sweep(str(good)) == ([{'lora.rank': 4}, {'lora.rank': 8}], 'c.py:x')
  bad = tmp_path / 'bad.py'
  bad.write_text('X = 1\n')
  with pytest.raises(spec.SweepError, match=f'{bad}: defines no get_sweep'):
    spec.load_sweep(str(bad))
  dup = tmp_path / 'dup.py'
  dup.write_text('def get_sweep():\n  return [{"seed": 1}, {"seed": 1}]\n')
  with pytest.raises(spec.SweepError, match=r"points repeat: \['seed=1'\]"):
    spec.load_sweep(str(dup))
  with pytest.raises(spec.SweepError, match='not found'):
    spec.load_sweep(str(tmp_path / 'missing.py'))


def test_point_names_and_overrides():
  assert spec.point_name({'lora.rank': 8, 'lora.targets': ('q', 'v')}) == \
      "lora.rank=8,lora.targets=__q_,__v__"
  config = base_config()
  out = spec.apply_overrides(config, {'lora.rank': 4, 'lora.targets': ['k', 'v']})
  assert (out.lora.rank, out.lora.targets, config.lora.rank) == (4, ('k', 'v'), 8)
  with pytest.raises(spec.SweepError, match=r"p1: config has no key 'lora.rnak'"):
    spec.apply_overrides(config, {'lora.rnak': 4}, 'p1')
  with pytest.raises(spec.SweepError, match=r"config has no key 'seed.x'"):
    spec.apply_overrides(config, {'seed.x': 4})
  with pytest.raises(spec.SweepError, match=r"cannot set 'lora.rank' to 'big'"):
    spec.apply_overrides(config, {'lora.rank': 'big'})


def test_run_resume_and_reports(tmp_path):
  points = product(axis('lora.rank', [4, 16, 8]), axis('seed', [0]))
  names = ['lora.rank=4,seed=0', 'lora.rank=16,seed=0', 'lora.rank=8,seed=0']
  killed = FakeRunner(fail_on=8)
  with pytest.raises(KeyboardInterrupt):
    run.run_sweep(base_config(), points, tmp_path, runner=killed)
  assert [c[1] for c in killed.calls] == [tmp_path / n for n in names]
  assert all(c[2] == tmp_path / '_shared' for c in killed.calls)
  assert [c[0].lora.rank for c in killed.calls] == [4, 16, 8]

  resumed = FakeRunner()
  assert run.run_sweep(base_config(), points, tmp_path, runner=resumed) == [names[2]]
  assert [c[1] for c in resumed.calls] == [tmp_path / names[2]]
  assert run.run_sweep(base_config(), points, tmp_path, runner=resumed) == []
  record = json.loads((tmp_path / names[0] / 'sweep_point.json').read_text())
  assert record['overrides'] == {'lora.rank': 4, 'seed': 0} and record['config']['lora']['rank'] == 4

  changed = base_config()
  changed.lora.alpha = 32.0  # The base config changed: every recorded config is stale.
  rerun = FakeRunner()
  assert run.run_sweep(changed, points, tmp_path, runner=rerun, only=[names[1]]) == [names[1]]
  with pytest.raises(spec.SweepError, match='unknown point'):
    run.run_sweep(changed, points, tmp_path, runner=rerun, only=['nope'])

  rows = report.write_reports(points, tmp_path)
  assert [r['point'] for r in rows] == names
  with open(tmp_path / 'sweep.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['point'] for r in table] == names
  assert [float(r['test/palr_v2/HR@10']) for r in table] == [0.04, 0.16, 0.08]
  assert [float(r['valid/palr_v2/NDCG@10']) for r in table] == [0.03, 0.09, 0.05]
  assert [r['lora.rank'] for r in table] == ['4', '16', '8']
  md = (tmp_path / 'sweep.md').read_text()
  assert '| lora.rank | retriever HR@10 | retriever NDCG@10 | palr_v2 HR@10 | palr_v2 NDCG@10 |' in md
  assert '| 16 | 0.1000 | 0.0500 | **0.1600** | **0.0800** |' in md  # constant columns unmarked
  image = matplotlib.image.imread(tmp_path / 'sweep.png')
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200


def test_unfinished_points_are_listed_not_reported(tmp_path):
  points = axis('lora.rank', [4, 8])
  run.run_sweep(base_config(), points, tmp_path, runner=FakeRunner(), only=['lora.rank=4'])
  rows = report.write_reports(points, tmp_path)
  assert [r['point'] for r in rows] == ['lora.rank=4']
  assert 'Not finished: lora.rank=8' in (tmp_path / 'sweep.md').read_text()
  (tmp_path / 'lora.rank=4' / 'results.json').write_text('{"test": ')
  with pytest.raises(spec.SweepError, match=r'lora.rank=4/results.json: not JSON'):
    report.collect(points, tmp_path)
  (tmp_path / 'lora.rank=4' / 'results.json').write_text('{"test": {"retriever": {"HR@10": 0.1}}}')
  with pytest.raises(spec.SweepError, match=r'lora.rank=4/results.json: expected .*"metrics"'):
    report.collect(points, tmp_path)


def test_launch_commands_exact():
  points = axis('lora.rank', [4, 8])
  common = ['python', '-m', 'palr_jax.tools.sweep', '--sweep', 'configs/sweeps/lora_rank.py', '--workdir',
            'gs://b/sw', '--config', 'configs/ml1m_llama2_7b.py:v5e-16',
            "--config.lora.targets=('q', 'v')", '--only']
  tpu = launch.launch_commands(
      'tpu_vm', points, sweep_path='configs/sweeps/lora_rank.py', workdir='gs://b/sw',
      config_spec='configs/ml1m_llama2_7b.py:v5e-16', config_overrides={'lora.targets': ('q', 'v')},
      launch_args=['--name', 'palr', '--zone', 'us-west4-a'])
  assert tpu == [shlex.join(['launch/tpu_vm.sh', '--name', 'palr', '--zone', 'us-west4-a', '--watch', '--',
                             *common, f'lora.rank={r}']) for r in (4, 8)]
  slurm = launch.launch_commands(
      'slurm', points, sweep_path='configs/sweeps/lora_rank.py', workdir='gs://b/sw',
      config_spec='configs/ml1m_llama2_7b.py:v5e-16', config_overrides={'lora.targets': ('q', 'v')},
      launch_args=['--nodes=2'])
  assert slurm == [shlex.join(['sbatch', f'--job-name=lora.rank={r}', '--nodes=2',
                               'launch/slurm_gpu.sbatch', '--', *common, f'lora.rank={r}'])
                   for r in (4, 8)]


def test_cli_emits_unfinished_points_and_collects(tmp_path):
  (tmp_path / 'cfg.py').write_text(  # every point is checked (palr_jax/validate.py) before it is launched
      'from palr_jax import defaults\n'
      'def get_config(arg=""):\n'
      '  c = defaults.get_config()\n  c.lora.rank = 8\n'
      '  return c\n')
  (tmp_path / 'sw.py').write_text(
      f'from palr_jax.sweep.spec import axis\nBASE_CONFIG = "{tmp_path}/cfg.py"\n'
      'def get_sweep():\n  return axis("lora.rank", [4, 8])\n')
  work = tmp_path / 'w'
  run.run_sweep(cli.load_config(f'{tmp_path}/cfg.py'), [{'lora.rank': 4}], work,
                runner=FakeRunner())
  cmd = [sys.executable, '-m', 'palr_jax.tools.sweep', f'--sweep={tmp_path}/sw.py', f'--workdir={work}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(cmd + ['--emit-launch=slurm', '--launch-args=--nodes=2'], capture_output=True,
                       text=True, env=env, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [shlex.join([
      'sbatch', '--job-name=lora.rank=8', '--nodes=2', 'launch/slurm_gpu.sbatch', '--', 'python', '-m',
      'palr_jax.tools.sweep', '--sweep', f'{tmp_path}/sw.py', '--workdir', str(work), '--config',
      f'{tmp_path}/cfg.py', '--only', 'lora.rank=8'])]
  out = subprocess.run(cmd + ['--collect'], capture_output=True, text=True, env=env, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  assert '1/2 points finished' in out.stderr
  assert (work / 'sweep.csv').read_text().splitlines()[1].startswith('lora.rank=4,4,')
  out = subprocess.run(cmd + ['--emit-launch=pbs'], capture_output=True, text=True, env=env, cwd=ROOT)
  assert out.returncode != 0 and 'emit-launch' in out.stderr


def test_two_point_sweep_of_the_whole_pipeline(tmp_path, monkeypatch):
  """Acceptance: two points of palr_jax.main.run on the tiny model; the points differ in a ranking
  option, so data, retriever, profiles and both fine-tunes run once and the second point reuses them
  from W/_shared."""
  from palr_jax.train import loop
  from tests import pipeline_fixtures
  pipeline_fixtures.write_fixtures(tmp_path)
  config = pipeline_fixtures.config(tmp_path)
  config.eval.ks = (1, 5, 10)
  trained = []
  real_train = loop.train
  monkeypatch.setattr(loop, 'train', lambda c, w, *a, **k: trained.append(w) or real_train(c, w, *a, **k))
  points = axis('rank.max_items', [1, 3])
  names = ['rank.max_items=1', 'rank.max_items=3']
  work = tmp_path / 'sweep'

  assert run.run_sweep(config, points, work) == names
  assert trained == [work / names[0] / 'palr_v1', work / names[0] / 'palr_v2']
  assert run.run_sweep(config, points, work) == []  # Finished points are skipped.

  rows = report.write_reports(points, work)
  assert [r['point'] for r in rows] == names
  with open(work / 'sweep.csv') as f:
    table = list(csv.DictReader(f))
  for name, row in zip(names, table):
    results = json.loads((work / name / 'results.json').read_text())
    for method in config.eval.methods:
      for metric in ('HR@10', 'NDCG@10'):
        assert float(row[f'test/{method}/{metric}']) == results['test']['metrics'][method][metric]
  # Only palr_v1 ranks by generation, where max_items matters; the other methods agree across points.
  for method in ('ials', 'retriever', 'zero_shot', 'palr_v2'):
    assert table[0][f'test/{method}/HR@10'] == table[1][f'test/{method}/HR@10'], method
  # The MF model alone comes first, then the fused retriever, then what the LLM adds on top.
  assert '| rank.max_items | ials HR@10 | ials NDCG@10 | retriever HR@10 |' in (work / 'sweep.md').read_text()
  assert matplotlib.image.imread(work / 'sweep.png').ndim == 3
