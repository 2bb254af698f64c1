"""Stage `retriever`: MF on the leave-one-out split -> candidates/{train,valid,test}.jsonl + metrics.

Hyperparameters come from the `config.retriever.search` grid (every non-empty tuple is an axis over the
retriever key of that name), chosen on valid Recall@num_candidates; the valid model is fitted on train,
the test model on train + valid items, and train rows are cross-fitted over `config.retriever.folds`
user folds (palr_jax/retrieval/candidates.py says why). Writes, under the workdir:
  candidates/{train,valid,test}.jsonl   rows per docs/ARCHITECTURE.md
  retriever_results.json                HR/NDCG/Recall@config.eval.ks and MRR for valid, test and the
                                        cross-fitted train rows; chosen hyperparameters; fit seconds
                                        (the first fit of a process includes XLA compilation)
Processes: host (process 0 fits and writes; seconds on a CPU for ML-100K/ML-1M).
"""
from __future__ import annotations

import itertools
import time

from absl import logging
import jax
import numpy as np
import tqdm

from palr_jax import files
from palr_jax import metrics
from palr_jax import rng
from palr_jax import runner
from palr_jax import sharding
from palr_jax.data import interactions
from palr_jax.retrieval import candidates
from palr_jax.retrieval import mf

OUTPUTS = ('candidates/train.jsonl', 'candidates/valid.jsonl', 'candidates/test.jsonl',
           'retriever_results.json')


def declare(config) -> runner.Stage:
  return runner.Stage(
      name='retriever', run=run, hashes=('seed', 'data', 'retriever', 'eval.ks'), outputs=OUTPUTS,
      processes=runner.HOST, inputs=tuple(interactions.source_files(config.data)),
      what='process 0 fits the retriever (CPU) and writes the candidate files; the others wait')


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


def _fit(histories, num_items, retriever_config, key):
  start = time.perf_counter()
  users, items = jax.block_until_ready(mf.fit(histories, num_items, retriever_config, key))
  return users, items, time.perf_counter() - start


def run(ctx) -> dict:
  """Fits, writes the candidate files and retriever_results.json; returns the results dict."""
  config, workdir, inter, split = ctx.config, ctx.workdir, ctx.inter, ctx.split
  num_items, k = len(inter.item_ids), int(config.retriever.num_candidates)
  mesh = sharding.make_mesh(config.mesh) if config.retriever.shard_items else None
  seed = int(config.seed)
  grid = search_grid(config.retriever)
  folds = candidates.user_folds(len(split.train), int(config.retriever.folds), rng.jax_key(seed, 'folds'))
  users = np.arange(len(split.train))
  bar = tqdm.tqdm(total=len(grid) + 1 + int(config.retriever.folds), desc='retriever fits')

  # Search on valid: every point fits train with the same key, so points differ only in settings.
  search, best = [], None
  for overrides in grid:
    rconfig = _with(config.retriever, overrides)
    user_factors, item_factors, seconds = _fit(split.train, num_items, rconfig, rng.jax_key(seed, 'valid'))
    ranking = candidates.rank(user_factors, item_factors, split.train, users, split.valid, rconfig, mesh)
    recall = metrics.metrics_from_ranks(ranking.ranks, [k])[f'Recall@{k}']
    search.append({**overrides, f'valid_Recall@{k}': recall, 'fit_seconds': seconds})
    if best is None or recall > best[0]:
      best = (recall, rconfig, ranking, seconds)
    bar.update()
    bar.set_postfix(search=str(overrides), recall=f'{recall:.4f}')
  _, rconfig, valid, valid_seconds = best

  seen = [np.append(t, v) for t, v in zip(split.train, split.valid)]
  user_factors, item_factors, test_seconds = _fit(seen, num_items, rconfig, rng.jax_key(seed, 'test'))
  test = candidates.rank(user_factors, item_factors, seen, users, split.test, rconfig, mesh)
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
    files.atomic_write_jsonl(workdir / 'candidates' / f'{name}.jsonl',
                              candidates.rows(ranking, inter.user_ids, inter.item_ids))
  ks = [int(x) for x in config.eval.ks]
  chosen = rconfig.to_dict()
  chosen.pop('search')
  results = {
      'dataset': inter.name, 'num_users': len(inter.user_ids), 'num_items': num_items,
      'num_candidates': k, 'hyperparameters': chosen, 'search': search,
      'fit_seconds': {'valid': valid_seconds, 'test': test_seconds},
      'valid': metrics.metrics_from_ranks(valid.ranks, ks),
      'test': metrics.metrics_from_ranks(test.ranks, ks),
      'train': {'rows': len(train.users), **metrics.metrics_from_ranks(train.ranks, ks)},
  }
  files.atomic_write_json(workdir / 'retriever_results.json', results)
  headline = metrics.metrics_from_ranks(test.ranks, (10, 50))
  logging.info('retriever %s: test HR@10 %.4f NDCG@10 %.4f HR@50 %.4f (valid Recall@%d %.4f)',
               rconfig.model, headline['HR@10'], headline['NDCG@10'], headline['HR@50'], k, best[0])
  return results
