"""A sweep on a pod: one launcher command per point, each running `palr_jax.tools.sweep` for that point alone."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import shlex
from typing import Any

from palr_jax.sweep.spec import Point, SweepError, format_value, point_name


def _config_args(config_spec: str, overrides: Mapping[str, Any]) -> list[str]:
  args = ['--config', config_spec]
  for key, value in overrides.items():
    args.append(f'--config.{key}={format_value(value)}')
  return args


def launch_commands(launcher: str, points: Sequence[Point], *, sweep_path: str, workdir: str,
                    config_spec: str, config_overrides: Mapping[str, Any] | None = None,
                    launch_args: Sequence[str] = ()) -> list[str]:
  """One shell command per point: the launcher running `python -m palr_jax.tools.sweep ... --only POINT`.

  tpu_vm: `launch/tpu_vm.sh LAUNCH_ARGS --watch -- python ...` (the slice is reused from point to point,
  so each waits for its point to finish, resubmitting it after a preemption); slurm: `sbatch
  --job-name=POINT LAUNCH_ARGS launch/slurm_gpu.sbatch -- python ...` (independent jobs; points that share
  upstream stages may compute them concurrently).
  """
  if launcher not in ('tpu_vm', 'slurm'):
    raise SweepError(f'--emit-launch: expected tpu_vm or slurm, got {launcher!r}')
  base = ['python', '-m', 'palr_jax.tools.sweep', '--sweep', sweep_path, '--workdir', workdir,
          *_config_args(config_spec, config_overrides or {})]
  out = []
  for point in points:
    name = point_name(point)
    run = [*base, '--only', name]
    if launcher == 'tpu_vm':
      cmd = ['launch/tpu_vm.sh', *launch_args, '--watch', '--', *run]
    else:
      cmd = ['sbatch', f'--job-name={name}', *launch_args, 'launch/slurm_gpu.sbatch', '--', *run]
    out.append(shlex.join(cmd))
  return out
