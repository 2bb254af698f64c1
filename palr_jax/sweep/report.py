"""A sweep's reports: the finished points collected into `W/sweep.csv` (every metric), `W/sweep.md`
(HR@10 and NDCG@10 per method) and `W/sweep.png` (the swept axis against HR@10 and NDCG@10).
"""
from __future__ import annotations

from collections.abc import Sequence
import csv
import io
import json
import math
from typing import Any

from etils import epath

from palr_jax import files
from palr_jax.sweep.run import RECORD, RESULTS
from palr_jax.sweep.spec import Point, SweepError, format_value, point_name

SPLITS = ('valid', 'test')
HEADLINE = ('HR@10', 'NDCG@10')


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
    writer.writerow([row['point'], *(format_value(row['overrides'].get(k, '')) for k in keys),
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
      cells = [format_value(row['overrides'].get(k, '')) for k in keys]
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
      ax.set_xticks(xs, [format_value(x) for x in xs])
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
