"""Running a sweep's points one after another, each a whole pipeline run sharing upstream stages.

Point `lora.rank=8,seed=0` runs `palr_jax.main.run(config, W/<point>, shared_dir=W/_shared)`; stages whose
fingerprint does not depend on the swept keys (data, retriever, profiles ...) are computed once in
`W/_shared` and reused by every point. When a run returns, `W/<point>/sweep_point.json` records the
overrides and the full config: a point is finished when that record matches its config and its
`results.json` exists, so a killed sweep resumes at the first unfinished point.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from palr_jax import files
from palr_jax import validate
from palr_jax.sweep.spec import Point, SweepError, apply_overrides, point_name

Runner = Callable[..., Any]

SHARED_DIR = '_shared'
RECORD = 'sweep_point.json'
RESULTS = 'results.json'


def _record(config: ml_collections.ConfigDict) -> Any:
  """The config as plain JSON values, the same way on both sides of a comparison."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def is_finished(point_dir: epath.Path, config: ml_collections.ConfigDict) -> bool:
  record = point_dir / RECORD
  if not (record.exists() and (point_dir / RESULTS).exists()):
    return False
  try:
    return json.loads(record.read_text()).get('config') == _record(config)
  except json.JSONDecodeError:
    return False


def _main_run(config, workdir, *, shared_dir):
  from palr_jax import main  # Imported late: the whole pipeline, only needed to run points.
  return main.run(config, workdir, shared_dir=shared_dir)


def run_sweep(config: ml_collections.ConfigDict, points: Sequence[Point], workdir, *,
              runner: Runner = _main_run, only: Sequence[str] = (), where: str = 'sweep') -> list[str]:
  """Runs the unfinished points one after another; returns the names of the points it ran.

  `runner(config, point_workdir, shared_dir=...)` must leave `point_workdir/results.json`.
  """
  workdir = epath.Path(workdir)
  names = [point_name(p) for p in points]
  unknown = sorted(set(only) - set(names))
  if unknown:
    raise SweepError(f'{where}: --only names unknown point(s) {unknown}; points: {names}')
  ran = []
  for i, (name, point) in enumerate(zip(names, points)):
    if only and name not in only:
      continue
    point_config = apply_overrides(config, point, f'{where}: point {name}')
    point_dir = workdir / name
    if is_finished(point_dir, point_config):
      logging.info('sweep point %d/%d %s: finished, skipped', i + 1, len(points), name)
      continue
    logging.info('sweep point %d/%d %s: running', i + 1, len(points), name)
    runner(point_config, point_dir, shared_dir=workdir / SHARED_DIR)
    if not (point_dir / RESULTS).exists():
      raise SweepError(f'{where}: point {name}: the run left no {point_dir / RESULTS}')
    if is_writer():
      files.atomic_write_json(point_dir / RECORD,
                               {'name': name, 'overrides': point, 'config': _record(point_config)})
    ran.append(name)
  return ran


def is_writer() -> bool:
  """Process 0 of the job (every process runs the sweep on a pod; one writes its files)."""
  return jax.process_index() == 0


def check_points(config, points: Sequence[Point], where: str, workdir=None, only: Sequence[str] = ()) -> None:
  """Every point's config (validate.check_config), before the first point runs or is launched; with
  `workdir`, also what the points to run here point at (data, model, mesh) and the sweep folder."""
  for point in points:
    name = point_name(point)
    try:
      point_config = apply_overrides(config, point, f'{where}: point {name}')
    except SweepError as e:
      raise validate.ConfigError(str(e)) from None
    try:
      validate.check_config(point_config)
      if workdir is not None and (not only or name in only):
        from palr_jax import main as palr_main  # the whole pipeline: only when points run here
        palr_main.plan(point_config, None)
    except validate.ConfigError as e:
      raise validate.ConfigError(f'{where}: point {name}: {e}') from None
  if workdir is not None:
    validate.check_workdir(workdir)
