"""Recomputes HR@K / NDCG@K of every method from the report's evidence and the raw data, nothing else.

  python -m palr_jax.tools.recompute --predictions runs/ml100k-full/test_predictions.jsonl \
      --config configs/ml100k.py:full

The held-out test item of each user is read from the raw interaction files the config names (the same
loading and chronological leave-one-out as the run: palr_jax/data/interactions.py); the target's rank is
its place in the method's `ranked_item_ids` (absent: a miss). K is reported only up to the shortest list
of a method (a longer K would need ranks past what the file holds). Prints one JSON object
{method: {'users': n, 'HR@K': ..., 'NDCG@K': ...}}; compare with results.json's `test.metrics`.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from etils import epath
from ml_collections import config_flags
import numpy as np

from palr_jax import defaults
from palr_jax import metrics
from palr_jax.data import interactions


def held_out(inter: interactions.Interactions) -> dict[str, str]:
  """Raw user id -> raw id of its held-out test item (the last event)."""
  split = interactions.leave_one_out(inter)
  return {str(inter.user_ids[u]): str(inter.item_ids[t]) for u, t in enumerate(split.test.tolist())}


def recompute(lines: list[dict], targets: dict[str, str], ks) -> dict[str, dict]:
  """{method: {'users', 'HR@K', 'NDCG@K' for K in ks up to the method's shortest list}} from evidence lines
  ({'user', 'method', 'ranked_item_ids'}) and each user's raw test item."""
  by_method: dict[str, list[dict]] = {}
  for n, line in enumerate(lines):
    missing = {'user', 'method', 'ranked_item_ids'} - set(line)
    if missing:
      raise ValueError(f'line {n + 1}: missing {sorted(missing)}')
    if str(line['user']) not in targets:
      raise ValueError(f'line {n + 1}: user {line["user"]!r} is not in the data')
    by_method.setdefault(str(line['method']), []).append(line)
  out = {}
  for method, rows in by_method.items():
    ranks = []
    for row in rows:
      ranked, target = [str(i) for i in row['ranked_item_ids']], targets[str(row['user'])]
      ranks.append(ranked.index(target) if target in ranked else np.inf)
    shortest = min(len(row['ranked_item_ids']) for row in rows)
    usable = [int(k) for k in ks if int(k) <= shortest]
    values = metrics.metrics_from_ranks(ranks, usable) if usable else {}
    out[method] = {'users': len(rows), **{f'{m}@{k}': values[f'{m}@{k}'] for k in usable for m in ('HR', 'NDCG')}}
  return out


def read_lines(path) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', os.path.abspath(defaults.__file__),
                                  'The run\'s config (its `data` section names the raw files).')
  flags.DEFINE_string('predictions', None, 'test_predictions.jsonl of a run.', required=True)
  flags.DEFINE_list('ks', None, 'Cutoffs (default: the config\'s eval.ks).')


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  ks = [int(k) for k in (f.ks or config.eval.ks)]
  try:
    lines = read_lines(f.predictions)
    result = recompute(lines, held_out(interactions.load(config.data)), ks)
  except (OSError, ValueError) as e:
    print(f'recompute: {f.predictions}: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
