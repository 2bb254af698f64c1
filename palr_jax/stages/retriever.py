"""Stage `retriever`: MF on the leave-one-out split -> candidates/{train,valid,test}.jsonl + metrics.

Hyperparameters come from the `config.retriever.search` grid (every non-empty tuple is an axis over the
retriever key of that name), chosen on valid Recall@num_candidates; the valid model is fitted on train,
the test model on train + valid items, and train rows are cross-fitted over `config.retriever.folds`
user folds (palr_jax/retrieval/candidates.py says why). Writes, under the workdir:
  candidates/{train,valid,test}.jsonl   rows per docs/ARCHITECTURE.md
  retriever_results.json                HR/NDCG/Recall@config.eval.ks and MRR for valid, test and the
                                        cross-fitted train rows; chosen hyperparameters (only what
                                        the inputs determine: its digest decides what reruns)
  retriever_timings.json                fit seconds of each search point and of the valid/test fits
                                        (the first fit of a process includes XLA compilation); not an
                                        output, so a rerun that writes the same candidates reruns nothing
  retriever_baselines.json              with transitions fused: the MF model alone (every user's valid
                                        and test rank and top K), the ablation's first row; else {}
  retriever/item_factors.npy            the valid model's (train-only) item factors [items, F], float32:
                                        what collaborative item tokens project (model/item_tokens.py)
The retriever is MF (iALS or BPR), optionally fused with item-to-item transitions
(palr_jax/retrieval/transitions.py), which bring the order of events that MF ignores.
Processes: host (process 0 fits and writes; seconds on a CPU for ML-100K/ML-1M).
"""
from __future__ import annotations

import itertools
import io
import json
import time

from absl import logging
import jax
import numpy as np
import tqdm

from palr_jax import files
from palr_jax import metrics
from palr_jax import rng
from palr_jax import sharding
from palr_jax.data import interactions
from palr_jax.retrieval import candidates
from palr_jax.retrieval import mf
from palr_jax.stages import base

TIMINGS = 'retriever_timings.json'  # not in OUTPUTS: timings differ at every run
BASELINES = 'retriever_baselines.json'  # the MF model alone: every user's valid/test rank and top K
# The chosen MF fit's item factors [num_items, F] (float32 .npy, dense item order), the fit on train only:
# one table for the train, valid and test prompts of collaborative item tokens (palr_jax/model/item_tokens.py).
ITEM_FACTORS = 'retriever/item_factors.npy'
OUTPUTS = ('candidates/train.jsonl', 'candidates/valid.jsonl', 'candidates/test.jsonl',
           'retriever_results.json', BASELINES, ITEM_FACTORS)


def declare(config) -> base.Stage:
  return base.Stage(
      name='retriever', run=run, hashes=('seed', 'data', 'retriever', 'eval.ks'), outputs=OUTPUTS,
      processes=base.HOST, inputs=tuple(interactions.source_files(config.data)),
      per_process='process 0 fits the retriever (CPU) and writes the candidate files; the others wait')


def search_grid(retriever_config) -> list[dict]:
  """Every combination of the non-empty `retriever.search` axes ([{}] when there are none)."""
  for name, values in retriever_config.search.items():
    if not isinstance(values, (tuple, list)):
      raise ValueError(f'config.retriever.search.{name}={values!r}: expected a tuple of values')
  axes = {k: tuple(v) for k, v in retriever_config.search.items() if len(v)}
  unknown = sorted(a for a in axes if a == 'search' or a not in retriever_config)
  if unknown:
    raise ValueError(f'config.retriever.search: {unknown} are not retriever keys')
  return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _with(retriever_config, overrides: dict):
  out = retriever_config.copy_and_resolve_references()
  out.update(overrides)
  return out


# The retriever keys the MF fit reads; a search over the others (transitions) reuses the fit.
MF_KEYS = ('model', 'factors', 'reg', 'alpha', 'iterations', 'init_scale', 'solve_chunk', 'solver',
           'cg_steps', 'bpr_reg', 'learning_rate', 'epochs', 'batch_size')


def _fit(histories, num_items, retriever_config, key):
  start = time.perf_counter()
  users, items = jax.block_until_ready(mf.fit(histories, num_items, retriever_config, key))
  return users, items, time.perf_counter() - start


def _write_jsonl(path, rows, total: int, name: str) -> None:
  """Streams JSON lines to a temp sibling, then renames: train has a row per (user, position), more
  than fits in memory as one string at catalog scale."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.temp_path(path)
  with tmp.open('w') as f:
    for row in tqdm.tqdm(rows, total=total, desc=f'candidates/{name}.jsonl', mininterval=10):
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  tmp.replace(path)


def run(ctx) -> dict:
  """Fits, writes the candidate files, retriever_results.json and, when the retriever fuses transitions,
  the MF model's own ranks (retriever_baselines.json); returns the results dict."""
  config, workdir, inter, split = ctx.config, ctx.workdir, ctx.inter, ctx.split
  num_items, k = len(inter.item_ids), int(config.retriever.num_candidates)
  mesh = sharding.make_mesh(config.mesh) if config.retriever.shard_items else None
  seed = int(config.seed)
  grid = search_grid(config.retriever)
  folds = candidates.user_folds(len(split.train), int(config.retriever.folds), rng.jax_key(seed, 'folds'))
  users = np.arange(len(split.train))
  bar = tqdm.tqdm(total=len(grid) + 1 + int(config.retriever.folds), desc='retriever fits')

  # Search on valid: every point fits train with the same key, so points differ only in settings; points
  # that differ only in the transition settings share one fit.
  search, search_seconds, best, fits, tables = [], [], None, {}, {}
  for overrides in grid:
    rconfig = _with(config.retriever, overrides)
    mf_key = tuple(str(rconfig[name]) for name in MF_KEYS)
    if mf_key not in fits:
      fits[mf_key] = _fit(split.train, num_items, rconfig, rng.jax_key(seed, 'valid'))
    user_factors, item_factors, seconds = fits[mf_key]
    table = None
    if float(rconfig.transition_weight) > 0:  # one table per (window, decay), shared by the other settings
      table_key = (rconfig.transition_window, rconfig.transition_decay)
      if table_key not in tables:
        tables[table_key] = candidates.transition_table(split.train, num_items, rconfig)
      table = tables[table_key]
    ranking = candidates.rank(user_factors, item_factors, split.train, users, split.valid, rconfig, mesh,
                              table=table)
    recall = metrics.metrics_from_ranks(ranking.ranks, [k])[f'Recall@{k}']
    search.append({**overrides, f'valid_Recall@{k}': recall})
    search_seconds.append({**overrides, 'fit_seconds': seconds})
    if best is None or recall > best[0]:
      best = (recall, rconfig, ranking, seconds, user_factors, item_factors)
    bar.update()
    bar.set_postfix(search=str(overrides), recall=f'{recall:.4f}')
  _, rconfig, valid, valid_seconds, valid_users, valid_items = best

  seen = [np.append(t, v) for t, v in zip(split.train, split.valid)]
  user_factors, item_factors, test_seconds = _fit(seen, num_items, rconfig, rng.jax_key(seed, 'test'))
  test = candidates.rank(user_factors, item_factors, seen, users, split.test, rconfig, mesh,
                         table=candidates.transition_table(seen, num_items, rconfig))
  bar.update()

  train_users, positions = candidates.train_positions(split.train, int(rconfig.max_train_positions))
  fold_rankings = []
  for fold in range(int(rconfig.folds)):
    start = time.perf_counter()
    fold_rankings.append(candidates.cross_fit_fold(
        split.train, num_items, folds, fold, train_users, positions, rconfig,
        rng.jax_key(seed, f'fold{fold}'), mesh))
    bar.update()
    bar.set_postfix(fold=fold, seconds=f'{time.perf_counter() - start:.1f}')
  bar.close()
  train = candidates.concat(fold_rankings)

  for name, ranking in (('train', train), ('valid', valid), ('test', test)):
    _write_jsonl(workdir / 'candidates' / f'{name}.jsonl',
                 candidates.rows(ranking, inter.user_ids, inter.item_ids), len(ranking.users), name)
  ks = [int(x) for x in config.eval.ks]
  chosen = rconfig.to_dict()
  chosen.pop('search')
  results = {
      'dataset': inter.name, 'num_users': len(inter.user_ids), 'num_items': num_items,
      'num_candidates': k, 'hyperparameters': chosen, 'search': search,
      'valid': metrics.metrics_from_ranks(valid.ranks, ks),
      'test': metrics.metrics_from_ranks(test.ranks, ks),
      'train': {'rows': len(train.users), **metrics.metrics_from_ranks(train.ranks, ks)},
  }
  if float(rconfig.transition_weight) > 0:  # the MF model alone, for the ablation
    alone = _with(rconfig, {'transition_weight': 0.0})
    baselines = {
        'valid': candidates.rank(valid_users, valid_items, split.train, users, split.valid, alone, mesh),
        'test': candidates.rank(user_factors, item_factors, seen, users, split.test, alone, mesh)}
    results['mf_alone'] = {which: metrics.metrics_from_ranks(r.ranks, ks) for which, r in baselines.items()}
    files.atomic_write_json(workdir / BASELINES, {rconfig.model: {
        which: {'ranks': r.ranks.tolist(), 'items': r.items.tolist()} for which, r in baselines.items()}})
  else:
    files.atomic_write_json(workdir / BASELINES, {})
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(jax.device_get(valid_items), np.float32), allow_pickle=False)
  files.atomic_write_bytes(workdir / ITEM_FACTORS, buffer.getvalue())
  files.atomic_write_json(workdir / 'retriever_results.json', results)
  files.atomic_write_json(workdir / TIMINGS, {'search': search_seconds,
                                              'fit_seconds': {'valid': valid_seconds, 'test': test_seconds}})
  headline = metrics.metrics_from_ranks(test.ranks, (10, 20, 50))
  logging.info('retriever %s + transitions (w %.2f): test HR@10 %.4f NDCG@10 %.4f Recall@20 %.4f HR@50 %.4f '
               '(valid Recall@%d %.4f)', rconfig.model, float(rconfig.transition_weight), headline['HR@10'],
               headline['NDCG@10'], headline['Recall@20'], headline['HR@50'], k, best[0])
  return results
