"""Bad input is caught before compute (palr_jax/validate.py, palr_jax/cli.py): each bad value is one
ConfigError naming its key; every program turns it, an unknown key or a missing config file into one
line on stderr and exit code 2 before any data or model is loaded and before any program is compiled."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from palr_jax import cli
from palr_jax import main as palr_main
from palr_jax import validate
from palr_jax.data import interactions
from palr_jax.defaults import get_config
from palr_jax.hub import hf
from tests.pipeline_fixtures import config as _config, write_dataset as _write_dataset, write_model as _write_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
  """The tiny dataset and model of test_main, written once."""
  root = tmp_path_factory.mktemp('assets')
  _write_dataset(root / 'data')
  _write_model(root / 'model')
  return root


@pytest.mark.parametrize('spec', ['configs/ml100k.py', 'configs/ml100k.py:quick', 'configs/ml100k.py:full',
                                  'configs/ml1m_llama2_7b.py:v5e-16', 'configs/ml1m_llama2_7b.py:8xH100',
                                  'configs/beauty_llama2_7b.py:v4-32'])
def test_shipped_configs_pass(spec):
  validate.check_config(cli.load_config(str(ROOT / spec)))


@pytest.mark.parametrize('key, value, words', [
    ('retriever.factors', 0, 'an integer >= 1'),      # issue: factors=0 reported HR = NDCG = 1.0
    ('retriever.factors', -3, 'an integer >= 1'),     # issue: a raw MLIRError
    ('retriever.iterations', 0, 'an integer >= 1'),
    ('retriever.num_candidates', 0, 'an integer >= 1'),
    ('retriever.folds', 1, 'an integer >= 2'),
    ('retriever.reg', -1.0, 'a number >= 0'),
    ('lora.rank', 0, 'an integer >= 1'),
    ('lora.dropout', 1.5, '<= 1'),
    ('train.batch_size', 0, 'an integer >= 1'),
    ('train.learning_rate', 0.0, 'a number > 0'),
    ('prompts.max_length', 0, 'an integer >= 1'),
    ('data.min_history', 2, 'an integer >= 3'),
    ('eval.ks', (0, 10), 'integers >= 1'),             # issue: failed after every fit
    ('eval.ks', (), 'non-empty'),
    ('eval.ks', (5.5,), 'integers >= 1'),
    ('eval.methods', ('retriever', 'palr_v3'), "unknown ['palr_v3']"),
    ('export.variant', 'zero_shot', 'a trained variant'),
    ('export.formats', ('gguf',), "('merged', 'peft')"),
    ('variants.palr_v2.rank_mode', 'scroe', "('score', 'generate', 'likelihood', 'residual')"),
    ('variants.palr_v1.rank_mode', 'score', "rank_task 'recommend_retrieval'"),
    ('variants.palr_v1.tasks', ('recomend',), 'a subset of'),
    ('profiles.kind', 'gpt', "('llm', 'stats')"),
    ('prompts.candidate_order', 'random', "('shuffle', 'retriever')"),
    ('prompts.missed_target', 'drop', "('insert', 'skip')"),
    ('model.remat', 'some', "('none', 'full', 'dots')"),
    ('model.attention', 'flash', "('auto', 'xla', 'blocked', 'cudnn', 'reference')"),
    ('model.dtype', 'float8', "('float32', 'bfloat16', 'float16', 'auto')"),
    ('model.spec', 'torch:foo', "'smollm2', 'hf:DIR' or 'gguf:FILE'"),
    ('train.lr_decay', 'exp', "('cosine', 'linear', 'constant')"),
    ('data.repeats', 'drop', "('keep', 'drop_targets')"),
    ('data.source', 'movielens', 'one of'),
    ('batching.length_buckets', (512, 256), 'increasing'),
    ('batching.length_buckets', (128, 256), 'largest bucket >= config.prompts.max_length'),
    ('mesh.fsdp', 0, 'or -1'),
    ('retriever.search.factors', (16, 0), 'retriever.search.factors=0'),
    ('rank.orders', 0, 'an integer >= 1'),
])
def test_bad_values_name_their_key(key, value, words):
  c = get_config()
  section, _, leaf = key.rpartition('.')
  node = c
  for part in section.split('.'):
    node = node[part]
  node[leaf] = value
  with pytest.raises(validate.ConfigError) as e:
    validate.check_config(c)
  message = str(e.value)
  assert '\n' not in message
  assert f'config.{key}' in message and words in message, message


def test_rank_orders_need_shuffled_candidates():
  c = get_config()
  c.rank.orders = 3
  validate.check_config(c)
  c.prompts.candidate_order = 'retriever'
  with pytest.raises(validate.ConfigError, match=r"config.rank.orders=3: expected 1 unless .*'shuffle'"):
    validate.check_config(c)


def test_num_candidates_against_the_tags():
  c = get_config()
  c.retriever.num_candidates = 30  # issue: failed after the retriever and v1's training
  with pytest.raises(validate.ConfigError, match=r'config.retriever.num_candidates=30: expected at most the 26 '):
    validate.check_config(c)
  c.prompts.tags = tuple('AB')
  c.retriever.num_candidates = 3
  with pytest.raises(validate.ConfigError, match='at most the 2 tags'):
    validate.check_config(c)
  # Without any variant that shows tagged candidates, the tags do not bound the candidates.
  del c.variants['zero_shot'], c.variants['palr_v2']
  c.eval.methods, c.export.variant = ('retriever', 'palr_v1'), 'palr_v1'
  validate.check_config(c)


def test_workdir_checks(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(validate.ConfigError, match=r'--workdir .*file: is a file'):  # issue: after the 60 s fit
    validate.check_workdir(tmp_path / 'file')
  with pytest.raises(validate.ConfigError, match=r'--workdir .*file/run: cannot write there'):
    validate.check_workdir(tmp_path / 'file' / 'run')
  made = validate.check_workdir(tmp_path / 'new' / 'run')
  assert made.is_dir() and not list(made.iterdir())  # created, the probe file removed


def test_data_and_model_checks_name_the_path(assets, tmp_path):
  c = _config(assets)
  validate.check_data_files(c.data)
  validate.check_model(c.model)
  c.data.name = 'tiny2'
  with pytest.raises(validate.ConfigError, match=r'tiny2.inter not found'):
    validate.check_data_files(c.data)
  c.model.spec = f'hf:{tmp_path / "nowhere"}'
  with pytest.raises(validate.ConfigError, match=r'nowhere: no such folder'):
    validate.check_model(c.model)
  (tmp_path / 'x.gguf').write_text('not a model')
  c.model.spec = f'gguf:{tmp_path / "x.gguf"}'
  with pytest.raises(validate.ConfigError, match=r'x.gguf: not a GGUF file'):
    validate.check_model(c.model)
  # A folder without tokenizer files, and one with a truncated model.safetensors.
  for name in ('notok', 'cut'):
    folder = tmp_path / name
    folder.mkdir()
    for f in (assets / 'model').iterdir():
      if name == 'cut' or not f.name.startswith(('tokenizer', 'special_tokens', 'vocab', 'merges')):
        (folder / f.name).write_bytes(f.read_bytes())
  with open(tmp_path / 'cut' / hf.SINGLE_FILE, 'r+b') as f:
    f.truncate(os.path.getsize(tmp_path / 'cut' / hf.SINGLE_FILE) - 100)
  c.model.spec = f'hf:{tmp_path / "notok"}'
  with pytest.raises(validate.ConfigError, match=r'notok: no tokenizer files'):
    validate.check_model(c.model)
  c.model.spec = f'hf:{tmp_path / "cut"}'
  with pytest.raises(validate.ConfigError, match=r'cut/model.safetensors: truncated'):
    validate.check_model(c.model)


def test_batch_sizes_against_the_mesh(assets):
  """8 simulated devices: the default mesh splits the batch 8 ways (tests/conftest.py)."""
  c = _config(assets)
  validate.check_mesh(c, train=True, rank=True, profiles=True, retriever=False)
  c.train.batch_size = 12
  with pytest.raises(validate.ConfigError, match=r'config.train: batch_size=12 must be a multiple of '
                                                 r'microbatches=1 x 8 batch shards'):
    validate.check_mesh(c, train=True, rank=False, profiles=False, retriever=False)
  c.train.batch_size, c.rank.batch_size = 8, 4
  with pytest.raises(validate.ConfigError, match=r'config.rank.batch_size=4 must be a multiple of the 8 batch'):
    validate.check_mesh(c, train=False, rank=True, profiles=False, retriever=False)
  c.rank.batch_size, c.profiles.batch_size = 8, 6
  with pytest.raises(validate.ConfigError, match=r'config.profiles.batch_size=6 must be a multiple'):
    validate.check_mesh(c, train=False, rank=False, profiles=True, retriever=False)
  c.mesh.data = 3
  with pytest.raises(validate.ConfigError, match=r'config.mesh: 8 devices do not divide'):
    validate.check_mesh(c, train=True, rank=False, profiles=False, retriever=False)


def test_plan_checks_only_what_the_stages_use(assets, tmp_path):
  c = _config(assets)
  c.model.spec = f'hf:{tmp_path / "absent"}'
  c.rank.batch_size = 4
  # The retriever alone needs neither the model nor the ranking mesh.
  assert [s.name for s in palr_main.plan(c, tmp_path / 'w', only=('retriever',))] == ['retriever']
  with pytest.raises(validate.ConfigError, match='absent: no such folder'):
    palr_main.plan(c, tmp_path / 'w')
  with pytest.raises(validate.ConfigError, match=r"--stages: unknown stage\(s\) \['retriver'\]"):
    palr_main.plan(c, tmp_path / 'w', only=('retriver',))
  with pytest.raises(validate.ConfigError, match=r"--rerun: unknown stage\(s\) \['rank'\]"):
    palr_main.plan(c, tmp_path / 'w', only=('retriever',), rerun=('rank',))


def test_run_rejects_before_reading_any_data(assets, tmp_path, monkeypatch):
  def never(*args, **kwargs):
    raise AssertionError('data loaded before the config was checked')

  monkeypatch.setattr(interactions, 'load', never)
  monkeypatch.setattr(hf, 'load_params', never)
  c = _config(assets)
  c.eval.ks = (0, 10)
  with pytest.raises(validate.ConfigError, match=r'config.eval.ks=\(0, 10\)'):
    palr_main.run(c, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()
  c = _config(assets)
  c.rank.batch_size = 4  # found by the mesh check, after the workdir was made and before any stage ran
  with pytest.raises(validate.ConfigError, match=r'config.rank.batch_size=4'):
    palr_main.run(c, tmp_path / 'run')
  assert list((tmp_path / 'run').iterdir()) == []


# --------------------------------------------------------------------------------------- programs


# Run in the child before the program (as `python -m module`): every executable XLA builds or loads from the
# persistent cache records BACKEND_COMPILE_EVENT, counted and said at exit; loading data or weights ends the
# child with GUARD_EXIT. "Fast" means what these count, not seconds, which a busy machine stretches.
GUARD_EXIT = 97
_GUARD = f"""
import atexit, runpy, sys
import jax.monitoring
from palr_jax.data import interactions
from palr_jax.hub import hf, load
compiled = []
def on_duration(event, seconds, **kwargs):
  if event == '/jax/core/compile/backend_compile_duration':
    compiled.append(str(kwargs.get('fun_name', '?')))
jax.monitoring.register_event_duration_secs_listener(on_duration)
atexit.register(lambda: print(f'GUARD: compiled {{len(compiled)}} {{compiled[:5]}}', file=sys.stderr))
def forbid(owner, name):
  def loaded(*args, **kwargs):
    print(f'GUARD: {{owner.__name__}}.{{name}} was called', file=sys.stderr)
    sys.exit({GUARD_EXIT})
  setattr(owner, name, loaded)
for owner, name in ((interactions, 'load'), (hf, 'load_params'), (load, 'load_model')):
  forbid(owner, name)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def _program(module, *args, cwd=ROOT):
  """The program's completed process, run under `_GUARD`, and whether it stayed clear of loading and
  compiling (nothing loaded: it would have exited GUARD_EXIT; nothing compiled: the count at exit is 0)."""
  out = subprocess.run([sys.executable, '-c', _GUARD, module, *args], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  return out, out.returncode != GUARD_EXIT and 'GUARD: compiled 0 []' in out.stderr.splitlines()


@pytest.mark.parametrize('module, args, words', [
    ('palr_jax.main', ['--config.retriever.factorz=3'],
     '--config.retriever.factorz: no such config key; did you mean --config.retriever.factors?'),
    ('palr_jax.main', ['--config.retriver.factors=3'],
     '--config.retriver.factors: no such config key; did you mean --config.retriever.factors?'),
    ('palr_jax.main', ['--config.retriever.num_candidates=30'], 'config.retriever.num_candidates=30: expected'),
    ('palr_jax.main', ['--config.retriever.factors=0'], 'config.retriever.factors=0: expected an integer >= 1'),
    ('palr_jax.main', ['--stages=retriever', 'extra'], "unexpected arguments: ['extra']"),
    ('palr_jax.tools.check', ['--devices=8', '--device-memory-gib=16', '--config.eval.ks=(0,10)'],
     'config.eval.ks=(0, 10)'),
    ('palr_jax.tools.sweep', ['--sweep=configs/sweeps/lora_rank.py', '--config.retriever.factors=0'],
     'point lora.rank=4,lora.alpha=8.0: config.retriever.factors=0'),
    ('palr_jax.tools.show_prompts', ['--config.prompts.candidate_order=random'],
     "config.prompts.candidate_order='random'"),
])
def test_programs_reject_bad_config_in_one_line(tmp_path, module, args, words):
  base = ['--config=configs/ml100k.py:quick', f'--workdir={tmp_path / "w"}']
  if module == 'palr_jax.tools.check':
    base = base[:1]
  out, untouched = _program(module, *base, *args)
  lines = [line for line in out.stderr.splitlines() if line.startswith(f'{module}: ')]
  assert out.returncode == 2 and len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert words in lines[0], lines[0]
  assert untouched, out.stderr[-3000:]  # no data or model loaded, no program compiled
  assert not (tmp_path / 'w' / 'config.json').exists()


def test_missing_config_file_and_workdir_file(tmp_path):
  out, _ = _program('palr_jax.main', '--config=configs/nope.py', f'--workdir={tmp_path}')
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert 'palr_jax.main: --config configs/nope.py: no such file' in out.stderr.splitlines()
  (tmp_path / 'file').write_text('keep me')
  out, _ = _program('palr_jax.main', '--config=configs/ml100k.py:quick', f'--workdir={tmp_path / "file"}')
  assert out.returncode == 2 and f'palr_jax.main: --workdir {tmp_path / "file"}: is a file' in out.stderr
  assert (tmp_path / 'file').read_text() == 'keep me'


def test_generate_and_export_name_the_bad_input(tmp_path):
  (tmp_path / 'x.gguf').write_text('not a model')
  out, untouched = _program('palr_jax.tools.generate', f'--config.model.spec=gguf:{tmp_path / "x.gguf"}',
                          '--prompt=hi')
  assert out.returncode == 2 and 'Traceback' not in out.stderr and untouched, out.stderr[-2000:]
  assert f"palr_jax.tools.generate: config.model.spec='gguf:{tmp_path / 'x.gguf'}': {tmp_path / 'x.gguf'}: " \
         'not a GGUF file' in out.stderr
  # A program whose --config has a default (palr_jax/defaults.py) applies overrides as its flags are defined.
  out, _ = _program('palr_jax.tools.export', f'--out={tmp_path / "E"}', '--config.modl.spec=x')
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert ('palr_jax.tools.export: --config.modl.spec: no such config key; did you mean --config.model.spec?'
          in out.stderr.splitlines())
  # export into a folder holding files: refused before the model loads, the files intact.
  (tmp_path / 'D').mkdir()
  (tmp_path / 'D' / 'notes.txt').write_text('mine')
  out, untouched = _program('palr_jax.tools.export', f'--out={tmp_path / "D"}', '--format=merged')
  assert out.returncode == 2 and 'Traceback' not in out.stderr and untouched, out.stderr[-2000:]
  assert f'palr_jax.tools.export: export: {tmp_path / "D"} exists and is not empty; pass --overwrite' in out.stderr
  assert [p.name for p in (tmp_path / 'D').iterdir()] == ['notes.txt']
  assert (tmp_path / 'D' / 'notes.txt').read_text() == 'mine'
