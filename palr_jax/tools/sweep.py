"""Config sweeps: run a grid of config overrides, or emit one pod launch per point; collect the results.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()`, returning a list of override dicts
`{'dotted.config.key': value}` built with `axis`, `product` and `zip_`, and may name the config it
sweeps over in `BASE_CONFIG` (`--config` replaces it):

  BASE_CONFIG = 'configs/ml100k.py:quick'
  def get_sweep():
    return product(axis('lora.rank', [4, 8, 16]), zip_(axis('lora.alpha', [8., 16.]), axis('seed', [0, 1])))

  python -m palr_jax.tools.sweep --sweep configs/sweeps/lora_rank.py --workdir W

Point `lora.rank=8,seed=0` runs `palr_jax.main.run(config, W/<point>, shared_dir=W/_shared)`; stages whose
fingerprint does not depend on the swept keys (data, retriever, profiles ...) are computed once in
`W/_shared` and reused by every point. When a run returns, `W/<point>/sweep_point.json` records the
overrides and the full config: a point is finished when that record matches its config and its
`results.json` exists, so a killed sweep resumes at the first unfinished point. Every invocation ends by
collecting the finished points into `W/sweep.csv` (every metric), `W/sweep.md` (HR@10 and NDCG@10 per
method) and `W/sweep.png` (the swept axis against HR@10 and NDCG@10).

On a pod, `--emit-launch tpu_vm|slurm` prints one launcher command per unfinished point instead, each
running this module for that point alone (`--only NAME`); `--collect` then builds the reports.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import csv
import importlib.util
import io
import itertools
import json
import math
import re
import shlex
import sys
from typing import Any

from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags

from palr_jax import cli
from palr_jax import distributed
from palr_jax import files
from palr_jax import validate
from palr_jax.cli import load_config

Point = dict[str, Any]
Runner = Callable[..., Any]

SHARED_DIR = '_shared'
RECORD = 'sweep_point.json'
RESULTS = 'results.json'
SPLITS = ('valid', 'test')
HEADLINE = ('HR@10', 'NDCG@10')


class SweepError(ValueError):
  """A malformed sweep file or point; the message names the file and the point or key."""


# ------------------------------------------------------------------------------------- sweep files


def axis(key: str, values: Sequence[Any]) -> list[Point]:
  """One swept key: `axis('lora.rank', [4, 8])` -> [{'lora.rank': 4}, {'lora.rank': 8}]."""
  if not isinstance(key, str) or not key:
    raise SweepError(f'axis: key must be a dotted config key, got {key!r}')
  if isinstance(values, (str, bytes)) or not values:
    raise SweepError(f'axis {key!r}: values must be a non-empty list, got {values!r}')
  return [{key: v} for v in values]


def _merge(parts: Sequence[Point], how: str) -> Point:
  out: Point = {}
  for part in parts:
    clash = out.keys() & part.keys()
    if clash:
      raise SweepError(f'{how}: key(s) {sorted(clash)} appear in more than one axis')
    out.update(part)
  return out


def product(*axes: Sequence[Point]) -> list[Point]:
  """Every combination, the last axis varying fastest (like nested for-loops)."""
  return [_merge(combo, 'product') for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Point]) -> list[Point]:
  """Points taken together position by position; the axes must have equal lengths."""
  lengths = [len(a) for a in axes]
  if len(set(lengths)) > 1:
    raise SweepError(f'zip_: axes have different lengths {lengths}')
  return [_merge(combo, 'zip_') for combo in zip(*axes)]


def load_sweep(path: str) -> tuple[list[Point], str | None]:
  """The points of a sweep file and its BASE_CONFIG (None when it names none)."""
  spec = importlib.util.spec_from_file_location('palr_sweep_file', path)
  if spec is None or not epath.Path(path).exists():
    raise SweepError(f'{path}: sweep file not found')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_sweep', None)):
    raise SweepError(f'{path}: defines no get_sweep()')
  points = module.get_sweep()
  if not isinstance(points, list) or not points:
    raise SweepError(f'{path}: get_sweep() must return a non-empty list of dicts, got {points!r}')
  for i, point in enumerate(points):
    if not isinstance(point, dict) or not point or not all(isinstance(k, str) for k in point):
      raise SweepError(f'{path}: point {i} must be a non-empty dict of dotted config keys, got {point!r}')
  names = [point_name(p) for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f'{path}: points repeat: {dupes}')
  return points, getattr(module, 'BASE_CONFIG', None)


def point_name(point: Point) -> str:
  """A directory name from the overrides: `lora.rank=8,seed=0` (unsafe characters become '_')."""
  name = ','.join(f'{k}={_format_value(v)}' for k, v in point.items())
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)


def _format_value(v: Any) -> str:
  return v if isinstance(v, str) else repr(v)


def apply_overrides(config: ml_collections.ConfigDict, point: Point, where: str = 'sweep'
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's values set; only existing keys, with the config's types."""
  config = config.copy_and_resolve_references()
  for key, value in point.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise SweepError(f'{where}: config has no key {key!r}')
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f'{where}: cannot set {key!r} to {value!r}: {e}') from None
  return config


# ------------------------------------------------------------------------------------------ running


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
    if _is_writer():
      files.atomic_write_json(point_dir / RECORD,
                               {'name': name, 'overrides': point, 'config': _record(point_config)})
    ran.append(name)
  return ran


def _is_writer() -> bool:
  """Process 0 of the job (every process runs the sweep on a pod; one writes its files)."""
  return jax.process_index() == 0


# --------------------------------------------------------------------------------------- reporting


def collect(points: Sequence[Point], workdir) -> list[dict[str, Any]]:
  """One row per finished point: {'point', 'overrides', 'results'}; results as main.run writes them,
  `{split: {'metrics': {method: {metric: value}}, ...}}`."""
  workdir = epath.Path(workdir)
  rows = []
  for point in points:
    name = point_name(point)
    path = workdir / name / RESULTS
    if not (workdir / name / RECORD).exists() or not path.exists():
      continue
    try:
      results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise SweepError(f'{path}: not JSON ({e.msg} at line {e.lineno})') from None
    if not (isinstance(results, dict) and all(isinstance(results.get(split, {}).get('metrics'), dict)
                                              for split in SPLITS)):
      raise SweepError(f'{path}: expected {{"valid"|"test": {{"metrics": {{method: {{metric: value}}}}}}}} '
                       '(palr_jax.main results)')
    rows.append({'point': name, 'overrides': point, 'results': results})
  return rows


def _swept_keys(points: Sequence[Point]) -> list[str]:
  """Keys in point order whose values differ between points (the sweep's axes)."""
  keys = list(dict.fromkeys(k for p in points for k in p))
  return [k for k in keys if len({json.dumps(p.get(k), default=repr) for p in points}) > 1] or keys


def _metric_columns(rows) -> list[tuple[str, str, str]]:
  cols = {}
  for row in rows:
    for split in SPLITS:
      for method, metrics in row['results'][split]['metrics'].items():
        for metric in metrics:
          cols[(split, method, metric)] = None
  return list(cols)


def _value(row, split, method, metric) -> float:
  return float(row['results'][split]['metrics'].get(method, {}).get(metric, math.nan))


def sweep_csv(points: Sequence[Point], rows) -> str:
  """point, every override key, then `split/method/metric` for every metric seen."""
  keys = list(dict.fromkeys(k for p in points for k in p))
  cols = _metric_columns(rows)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(['point', *keys, *('/'.join(c) for c in cols)])
  for row in rows:
    writer.writerow([row['point'], *(_format_value(row['overrides'].get(k, '')) for k in keys),
                     *(repr(_value(row, *c)) for c in cols)])
  return out.getvalue()


def _methods(rows) -> list[str]:
  return list(dict.fromkeys(m for _, m, _ in _metric_columns(rows)))


def sweep_markdown(points: Sequence[Point], rows) -> str:
  """HR@10 and NDCG@10 of every method, one table per split; the best value of a column in bold."""
  keys = _swept_keys(points)
  methods = _methods(rows)
  lines = [f'# Sweep: {len(rows)} of {len(points)} points finished', '']
  missing = [point_name(p) for p in points if point_name(p) not in {r['point'] for r in rows}]
  if missing:
    lines += [f'Not finished: {", ".join(missing)}', '']
  for split in SPLITS:
    cols = [(m, k) for m in methods for k in HEADLINE]
    values = {c: [_value(r, split, *c) for r in rows] for c in cols}
    best = {c: max(v) if len(set(v)) > 1 else None for c, v in values.items()}  # None: nothing to mark
    lines += [f'## {split}', '',
              '| ' + ' | '.join([*keys, *(f'{m} {k}' for m, k in cols)]) + ' |',
              '|' + '---|' * (len(keys) + len(cols))]
    for row in rows:
      cells = [_format_value(row['overrides'].get(k, '')) for k in keys]
      for c in cols:
        v = _value(row, split, *c)
        cells.append('' if math.isnan(v) else f'**{v:.4f}**' if v == best[c] else f'{v:.4f}')
      lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def sweep_plot(points: Sequence[Point], rows) -> bytes:
  """PNG: HR@10 and NDCG@10 against the swept axis, a line per method (solid test, dashed valid).

  When the first swept key is numeric and differs in every point, it is the x axis (log2 when its
  values span a factor of 8 or more); otherwise the points stand side by side, labelled by name.
  """
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  key = _swept_keys(points)[0]
  xs_raw = [r['overrides'].get(key) for r in rows]
  numeric = (all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_raw)
             and len(set(xs_raw)) == len(xs_raw))
  xs = xs_raw if numeric else list(range(len(rows)))
  fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5.5 * len(HEADLINE), 4), squeeze=False)
  for ax, metric in zip(axes[0], HEADLINE):
    for j, method in enumerate(_methods(rows)):
      color = f'C{j % 10}'
      for split, style in (('test', '-'), ('valid', '--')):
        ys = [_value(r, split, method, metric) for r in rows]
        if not all(math.isnan(y) for y in ys):
          ax.plot(xs, ys, style, marker='o', color=color, label=f'{method} ({split})')
    if numeric:
      ax.set_xlabel(key)
      if min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale('log', base=2)
      ax.set_xticks(xs, [_format_value(x) for x in xs])
    else:
      ax.set_xticks(xs, [r['point'] for r in rows], rotation=30, ha='right', fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc='best', handlelength=3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=120)
  plt.close(fig)
  return buf.getvalue()


def write_reports(points: Sequence[Point], workdir) -> list[dict[str, Any]]:
  """Writes W/sweep.csv, W/sweep.md and (with at least one finished point) W/sweep.png."""
  workdir = epath.Path(workdir)
  rows = collect(points, workdir)
  files.atomic_write_text(workdir / 'sweep.csv', sweep_csv(points, rows))
  files.atomic_write_text(workdir / 'sweep.md', sweep_markdown(points, rows))
  if rows:
    files.atomic_write_bytes(workdir / 'sweep.png', sweep_plot(points, rows))
  return rows


# ------------------------------------------------------------------------------------------ launch


def _config_args(config_spec: str, overrides: Mapping[str, Any]) -> list[str]:
  args = ['--config', config_spec]
  for key, value in overrides.items():
    args.append(f'--config.{key}={_format_value(value)}')
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


# --------------------------------------------------------------------------------------------- CLI

def _define_flags() -> None:
  """Only when run as a program: a sweep file's `from palr_jax.tools.sweep import ...` imports this module a
  second time, which must not define the flags again."""
  flags.DEFINE_string('sweep', None, 'Sweep file defining get_sweep().', required=True)
  flags.DEFINE_string('workdir', None, 'Sweep directory: W/<point>, W/_shared, W/sweep.*.', required=True)
  config_flags.DEFINE_config_file(
      'config', None, "Base config path.py[:arg] (default: the sweep file's BASE_CONFIG).",
      lock_config=False)
  flags.DEFINE_multi_string('only', [], 'Run only these points (by name).')
  flags.DEFINE_enum('emit-launch', None, ['tpu_vm', 'slurm'],
                    'Print one launcher command per unfinished point instead of running.')
  flags.DEFINE_string('launch-args', '', 'Options for the launcher, e.g. "--name palr --zone us-west4-a".')
  flags.DEFINE_bool('collect', False, 'Only collect finished points into the reports.')
  cli.define_compilation_cache_flag()


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


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  sweep_path, workdir = FLAGS.sweep, FLAGS.workdir
  try:
    points, base_config = load_sweep(sweep_path)
  except SweepError as e:
    raise validate.ConfigError(str(e)) from None
  if FLAGS.config is not None:
    config = FLAGS.config
    config_spec = config_flags.get_config_filename(FLAGS['config'])
    config_overrides = config_flags.get_override_values(FLAGS['config'])
  elif base_config:
    config, config_spec, config_overrides = load_config(base_config), base_config, {}
  else:
    raise validate.ConfigError(f'{sweep_path} has no BASE_CONFIG: pass --config path.py[:arg]')
  where = f'sweep {sweep_path}'
  if not FLAGS.collect:
    if not FLAGS['emit-launch'].value:
      cli.use_compilation_cache(FLAGS.compilation_cache)  # points that share a program compile it once
      distributed.initialize_from_flags()  # On a pod: one job across the hosts before any device is used.
    check_points(config, points, where, None if FLAGS['emit-launch'].value else workdir, FLAGS.only)
  if FLAGS['emit-launch'].value:
    todo = [p for p in points
            if not is_finished(epath.Path(workdir) / point_name(p), apply_overrides(config, p, where))]
    for line in launch_commands(FLAGS['emit-launch'].value, todo, sweep_path=sweep_path, workdir=workdir,
                                config_spec=config_spec, config_overrides=config_overrides,
                                launch_args=shlex.split(FLAGS['launch-args'].value)):
      print(line)
    return
  if not FLAGS.collect:
    run_sweep(config, points, workdir, only=FLAGS.only, where=where)
  if _is_writer():
    rows = write_reports(points, workdir)
    print(f'{len(rows)}/{len(points)} points finished; reports in {workdir}/sweep.{{csv,md,png}}',
          file=sys.stderr)


if __name__ == '__main__':
  cli.run(main, _define_flags)
