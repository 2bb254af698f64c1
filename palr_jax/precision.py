"""`config.model.dtype` / `param_dtype` = 'auto': the precision this machine runs fastest, chosen once.

bfloat16 on TPUs and GPUs (fp32 on a GPU older than compute capability 8.0, which has no bf16 units) and on
CPUs with native bf16 instructions (x86 `avx512_bf16` or `amx_bf16`, ARM `bf16`); float32 on every other
CPU, where XLA emulates bf16 and a step is slower than in fp32 (bench/RESULTS.md, "Train step"). An
`XLA_FLAGS=--xla_cpu_max_isa=...` below AVX512_BF16 keeps XLA from those instructions, so it counts as no
native bf16.

`resolve(config)` runs where a program finalizes its config (palr_jax/main.py): every stage, its
fingerprint and `W/config.json` see the concrete dtype, and `config.model.dtype_chosen` records the choice
and why. `hub/hf.py` resolves a leftover 'auto' the same way, for configs built in code.
"""
from __future__ import annotations

from collections.abc import Iterable
import os
import platform as platform_lib
import re
import subprocess

import ml_collections

AUTO = 'auto'
BF16, FP32 = 'bfloat16', 'float32'
KEYS = ('dtype', 'param_dtype')
# --xla_cpu_max_isa values, oldest first (XLA's flag help); native bf16 from AVX512_BF16 on.
XLA_ISAS = ('SSE4_2', 'AVX', 'AVX2', 'AVX512', 'AVX512_VNNI', 'AVX512_BF16', 'AMX', 'AMX_FP16')
X86_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
_MAX_ISA = re.compile(r'--xla_cpu_max_isa=(\S+)')


def cpu_features() -> tuple[str, ...]:
  """This CPU's feature names: /proc/cpuinfo's `flags` (x86) or `Features` (ARM) line; on macOS, 'bf16'
  when sysctl reports FEAT_BF16. () when unknown."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):
          return tuple(value.split())
  except OSError:
    pass
  if platform_lib.system() == 'Darwin':
    try:
      out = subprocess.run(['sysctl', '-n', 'hw.optional.arm.FEAT_BF16'], capture_output=True, text=True,
                           timeout=5, check=False).stdout.strip()
      return ('bf16',) if out == '1' else ()
    except (OSError, subprocess.SubprocessError):
      pass
  return ()


def xla_max_isa(xla_flags: str | None) -> str | None:
  """The ISA named by the last --xla_cpu_max_isa in `xla_flags` (upper case), or None."""
  found = _MAX_ISA.findall(xla_flags or '')
  return found[-1].strip('"\'').upper() if found else None


def choose(platform: str, features: Iterable[str] = (), xla_flags: str | None = None,
           compute_capability: str | None = None) -> tuple[str, str]:
  """(dtype, why) for a backend `platform` ('cpu', 'gpu', 'tpu', ...); on a CPU from its `features`
  (`cpu_features()`) and `xla_flags` ($XLA_FLAGS); on a GPU from its `compute_capability` ('8.0')."""
  platform = platform.lower()
  if platform == 'tpu':
    return BF16, 'TPU'
  if platform in ('gpu', 'cuda', 'rocm'):
    try:
      major = int(str(compute_capability).split('.')[0]) if compute_capability else None
    except ValueError:
      major = None
    if major is not None and major < 8 and platform != 'rocm':
      return FP32, f'GPU of compute capability {compute_capability} has no native bf16'
    return BF16, 'GPU'
  if platform != 'cpu':
    return FP32, f'{platform} backend: bf16 support unknown'
  features = {f.lower() for f in features}
  native = [f for f in X86_BF16_FLAGS if f in features] or (['bf16'] if 'bf16' in features else [])
  if not native:
    return FP32, 'CPU without native bf16 (no avx512_bf16, amx_bf16 or ARM bf16): XLA would emulate it'
  isa = xla_max_isa(xla_flags)
  if isa in XLA_ISAS and XLA_ISAS.index(isa) < XLA_ISAS.index('AVX512_BF16'):
    return FP32, f'XLA_FLAGS --xla_cpu_max_isa={isa} keeps XLA below AVX512_BF16 (CPU has {native[0]})'
  return BF16, f'CPU has native bf16 ({native[0]})'


def detect() -> tuple[str, str]:
  """`choose` for this process's default JAX backend and this machine."""
  import jax  # pylint: disable=g-import-not-at-top; the programs import it anyway, tests fake this function
  platform = jax.default_backend()
  if platform == 'cpu':
    return choose('cpu', cpu_features(), os.environ.get('XLA_FLAGS'))
  capability = getattr(jax.devices()[0], 'compute_capability', None)
  return choose(platform, compute_capability=capability)


def concrete(value: str) -> str:
  """`value`, or the machine's choice for 'auto'."""
  return detect()[0] if value == AUTO else value


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose model dtypes are concrete ('auto' -> `detect()`), with the choice and its reason
  in `model.dtype_chosen`; `config` itself when nothing is 'auto' and the note is written (idempotent)."""
  model = config.model
  auto = [k for k in KEYS if model[k] == AUTO]
  if not auto and model.get('dtype_chosen'):
    return config
  out = config.copy_and_resolve_references()
  if auto:
    dtype, why = detect()
    for key in auto:
      out.model[key] = dtype
    note = f'{dtype} (auto: {why})'
    note += ''.join(f'; {k} {out.model[k]} as set in the config' for k in KEYS if k not in auto)
  else:
    note = f'{out.model.dtype} (as set in the config)'
    if out.model.param_dtype != out.model.dtype:
      note = f'compute {out.model.dtype}, weights {out.model.param_dtype} (as set in the config)'
  if 'dtype_chosen' in out.model:
    out.model.dtype_chosen = note
  return out


def note(config) -> str:
  """The precision line of a run: `model.dtype_chosen`, or the dtypes as set."""
  return config.model.get('dtype_chosen') or f'{config.model.dtype} (as set in the config)'
