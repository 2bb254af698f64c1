"""model.dtype 'auto': the precision chosen by the machine, on faked platforms and CPU feature lists."""
from __future__ import annotations

import json

import pytest

from palr_jax import defaults
from palr_jax import precision
from palr_jax import validate

REAL_DETECT = precision.detect  # tests/conftest.py fakes it in every test; these fake the machine instead

ZEN3 = 'fpu sse4_2 avx avx2 fma bmi2 sha_ni'.split()
SAPPHIRE_RAPIDS = ZEN3 + 'avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8'.split()
COOPER_LAKE = ZEN3 + ['avx512f', 'avx512_bf16']
AMX_ONLY = ZEN3 + ['amx_bf16']
GRAVITON3 = 'fp asimd crc32 atomics fphp asimdhp sve bf16 i8mm'.split()
GRAVITON2 = 'fp asimd crc32 atomics fphp asimdhp asimddp'.split()


@pytest.mark.parametrize('features, xla_flags, dtype, words', [
    (ZEN3, None, 'float32', 'CPU without native bf16'),
    (SAPPHIRE_RAPIDS, None, 'bfloat16', 'avx512_bf16'),
    (COOPER_LAKE, '', 'bfloat16', 'avx512_bf16'),
    (AMX_ONLY, None, 'bfloat16', 'amx_bf16'),
    (GRAVITON3, None, 'bfloat16', '(bf16)'),
    (GRAVITON2, None, 'float32', 'CPU without native bf16'),
    ((), None, 'float32', 'CPU without native bf16'),
    # An AVX2 box measured on a bf16 one: XLA codegen restricted below AVX512_BF16 counts as no bf16.
    (SAPPHIRE_RAPIDS, '--xla_cpu_max_isa=AVX2', 'float32', '--xla_cpu_max_isa=AVX2'),
    (SAPPHIRE_RAPIDS, '--xla_dump_to=/tmp/d --xla_cpu_max_isa=avx512 --xla_cpu_enable_fast_math=false',
     'float32', '--xla_cpu_max_isa=AVX512 keeps XLA below AVX512_BF16'),
    (SAPPHIRE_RAPIDS, '--xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=AMX', 'bfloat16', 'avx512_bf16'),  # last wins
    (SAPPHIRE_RAPIDS, '--xla_cpu_max_isa=AVX512_BF16', 'bfloat16', 'avx512_bf16'),
    (ZEN3, '--xla_cpu_max_isa=AMX', 'float32', 'CPU without native bf16'),  # a flag adds no instructions
])
def test_cpu_choice(features, xla_flags, dtype, words):
  chosen, why = precision.choose('cpu', features, xla_flags)
  assert chosen == dtype and words in why, (chosen, why)


def test_accelerator_choice():
  assert precision.choose('tpu') == ('bfloat16', 'TPU')
  assert precision.choose('gpu', compute_capability='9.0')[0] == 'bfloat16'
  assert precision.choose('gpu')[0] == 'bfloat16'  # capability unknown: the GPUs people rent have bf16
  dtype, why = precision.choose('gpu', compute_capability='7.0')  # V100: no bf16 units
  assert dtype == 'float32' and '7.0' in why
  assert precision.choose('METAL')[0] == 'float32'


def _fake_machine(monkeypatch, platform: str, features=(), xla_flags=None):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(precision, 'detect', REAL_DETECT)
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  monkeypatch.setattr(precision, 'cpu_features', lambda: tuple(features))
  if xla_flags is None:
    monkeypatch.delenv('XLA_FLAGS', raising=False)
  else:
    monkeypatch.setenv('XLA_FLAGS', xla_flags)


@pytest.mark.parametrize('features, xla_flags, dtype', [
    (SAPPHIRE_RAPIDS, None, 'bfloat16'), (ZEN3, None, 'float32'),
    (SAPPHIRE_RAPIDS, '--xla_cpu_max_isa=AVX2', 'float32')])
def test_resolve_writes_the_choice_and_why(monkeypatch, features, xla_flags, dtype):
  _fake_machine(monkeypatch, 'cpu', features, xla_flags)
  config = defaults.get_config()
  assert (config.model.dtype, config.model.param_dtype) == ('auto', 'auto')  # the default
  validate.check_config(config)
  resolved = precision.resolve(config)
  assert (resolved.model.dtype, resolved.model.param_dtype) == (dtype, dtype)
  assert resolved.model.dtype_chosen == f'{dtype} (auto: {precision.choose("cpu", features, xla_flags)[1]})'
  assert config.model.dtype == 'auto'  # the caller's config is left as it was (sweeps compare it)
  assert precision.resolve(resolved) is resolved  # once
  assert json.loads(resolved.to_json_best_effort())['model']['dtype'] == dtype


def test_resolve_keeps_set_dtypes_and_says_so(monkeypatch):
  _fake_machine(monkeypatch, 'cpu', SAPPHIRE_RAPIDS)
  config = defaults.get_config()
  config.model.dtype = 'float32'
  resolved = precision.resolve(config)
  assert (resolved.model.dtype, resolved.model.param_dtype) == ('float32', 'bfloat16')
  assert resolved.model.dtype_chosen.startswith('bfloat16 (auto: CPU has native bf16 (avx512_bf16))')
  assert resolved.model.dtype_chosen.endswith('; dtype float32 as set in the config')
  config.model.param_dtype = 'float32'
  assert precision.resolve(config).model.dtype_chosen == 'float32 (as set in the config)'


def test_run_says_records_and_fingerprints_the_concrete_dtype(tmp_path, monkeypatch):
  """The run's first line names the precision and why, config.json records it, and the LLM stages hash the
  concrete dtype: a run folder moved from a bf16 CPU to one without reruns them instead of resuming."""
  from palr_jax import files, fingerprint  # pylint: disable=g-import-not-at-top
  from palr_jax import main as palr_main  # pylint: disable=g-import-not-at-top
  from palr_jax import runner  # pylint: disable=g-import-not-at-top
  from tests import pipeline_fixtures  # pylint: disable=g-import-not-at-top
  pipeline_fixtures.write_fixtures(tmp_path)
  config = pipeline_fixtures.config(tmp_path)
  config.model.dtype = config.model.param_dtype = 'auto'
  ran = []
  monkeypatch.setattr(runner.Runner, 'run', lambda self, stage, ctx: ran.append((stage, ctx.config)))
  fingerprints = {}
  for features, dtype in ((SAPPHIRE_RAPIDS, 'bfloat16'), (ZEN3, 'float32')):
    _fake_machine(monkeypatch, 'cpu', features)
    lines, ran[:] = [], []
    workdir = tmp_path / dtype
    assert palr_main.run(config, workdir, say=lines.append) is None
    why = precision.choose('cpu', features)[1]
    assert lines[0] == f'precision: {dtype} (auto: {why})'
    saved = files.read_json(workdir / 'config.json')['model']
    assert (saved['dtype'], saved['param_dtype'], saved['dtype_chosen']) == (dtype, dtype, f'{dtype} (auto: {why})')
    stage, stage_config = next((s, c) for s, c in ran if s.name == 'finetune_palr_v1')
    assert stage_config.model.dtype == dtype and 'model.dtype' in stage.hashes
    fingerprints[dtype] = fingerprint.of(stage_config, stage.hashes)
  assert fingerprints['bfloat16'] != fingerprints['float32']
  assert config.model.dtype == 'auto'
