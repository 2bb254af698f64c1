"""Retriever speed and quality against named peers, on ML-100K (leave-one-out, test protocol).

1. Fit: our jitted iALS (exact Cholesky solves) vs `implicit` 0.7.3 ALS (CPU, conjugate gradient, all
   cores as its own threads, BLAS single-threaded as implicit asks), same train+valid data, same factors / reg / iterations and the same confidences
   (implicit weighs a positive by alpha_implicit * r, ours by 1 + alpha * r, so alpha_implicit = 1 + alpha).
   Both are scored with the same ranking code: test HR@10 / NDCG@10 / HR@50 over the catalog minus history.
   Our seed s uses the key the retriever stage gives its test model, so these are the numbers of
   `python -m palr_jax.main --stages retriever --config.seed=s` (no search grid in the config).
2. Top-K for all users: our jitted, user-batched, history-masked `topk.top_k` vs numpy (BLAS matmul,
   mask, `argpartition`, sort of the top K), on ML-100K and on a larger synthetic catalog.
Times are the best of `--repeats` warm runs (the first, compiling, call is reported apart).

  python bench/retriever.py [--config configs/ml100k.py] [--repeats 3] [--write bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time

import jax
import numpy as np

import results as results_md
from palr_jax import metrics as evaluate
from palr_jax import rng
from palr_jax.data import interactions
from palr_jax.retrieval import mf
from palr_jax.retrieval import topk


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def best_of(fn, repeats: int):
  """(result, first-call seconds, best of `repeats` further calls)."""
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return out, first, min(times, default=first)


def numpy_top_k(users, items, histories, k, batch):
  """Reference: scores by BLAS, history to -inf, argpartition then sort of the K survivors."""
  out = []
  for lo in range(0, len(users), batch):
    scores = users[lo:lo + batch] @ items.T
    rows = np.repeat(np.arange(scores.shape[0]), [len(h) for h in histories[lo:lo + batch]])
    scores[rows, np.concatenate(histories[lo:lo + batch])] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    out.append(np.take_along_axis(part, order, axis=1))
  return np.concatenate(out)


def jax_top_k(users, items, histories, k, batch):
  return topk.top_k(users, items, histories, k, user_batch=batch)[1]


def headline(ranks) -> dict[str, float]:
  m = evaluate.metrics_from_ranks(ranks, (10, 50))
  return {'HR@10': m['HR@10'], 'NDCG@10': m['NDCG@10'], 'HR@50': m['HR@50']}


def fit_ours(histories, num_items, rconfig, seed):
  key = rng.jax_key(seed, 'test')
  return jax.block_until_ready(mf.fit_ials(histories, num_items, rconfig, key))


def fit_implicit(histories, num_items, rconfig, seed):
  import implicit
  import scipy.sparse
  import threadpoolctl
  rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
  matrix = scipy.sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(histories))),
                                   shape=(len(histories), num_items))  # duplicates sum, as our counts
  model = implicit.cpu.als.AlternatingLeastSquares(
      factors=int(rconfig.factors), regularization=float(rconfig.reg), alpha=1.0 + float(rconfig.alpha),
      iterations=int(rconfig.iterations), random_state=seed, num_threads=0)
  with threadpoolctl.threadpool_limits(1, 'blas'):  # implicit's own advice: its threads, not BLAS's
    model.fit(matrix, show_progress=False)
  return model.user_factors, model.item_factors


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/ml100k.py')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--seeds', type=int, default=3, help='quality: mean over this many seeds')
  parser.add_argument('--write', default='', help='update the "## Retriever" section of this file')
  args = parser.parse_args()
  config = load_config(args.config)
  rconfig = config.retriever
  inter = interactions.load(config.data)
  split = interactions.leave_one_out(inter)
  num_items = len(inter.item_ids)
  seen = [np.append(t, v) for t, v in zip(split.train, split.valid)]
  k = 50

  lines = []
  def say(text=''):
    print(text, flush=True)
    lines.append(text)

  say(f'ML-100K: {len(seen)} users, {num_items} items, {sum(map(len, seen))} train+valid events; '
      f'iALS factors={rconfig.factors} reg={rconfig.reg} alpha={rconfig.alpha} '
      f'iterations={rconfig.iterations}; mean of {args.seeds} seeds, times best of {args.repeats}.')
  say()
  say('| model | first fit s (compile) | fit s | test HR@10 | NDCG@10 | HR@50 (mean ± std over seeds) |')
  say('|---|---|---|---|---|---|')
  fit_times = {}
  for name, fit in (('palr_jax iALS (jit, Cholesky)', fit_ours), ('implicit 0.7.3 ALS (CG, 2 threads)', fit_implicit)):
    quality, firsts, bests = [], [], []
    for seed in range(args.seeds):
      (users, items), first, best = best_of(lambda: fit(seen, num_items, rconfig, seed),
                                            args.repeats if seed == 0 else 0)
      firsts.append(first)
      bests.append(best)
      ranks = topk.top_k(np.asarray(users), np.asarray(items), seen, 1, user_batch=rconfig.user_batch,
                         targets=split.test)[2]
      quality.append(headline(ranks))
    fit_times[name] = min(bests)
    cells = ' | '.join(f'{np.mean([q[m] for q in quality]):.4f} ± {np.std([q[m] for q in quality]):.4f}'
                       for m in ('HR@10', 'NDCG@10', 'HR@50'))
    say(f'| {name} | {firsts[0]:.2f} | {fit_times[name]:.2f} | {cells} |')
  ours, theirs = fit_times.values()
  say()
  say(f'fit time ratio implicit / ours: {theirs / ours:.2f}x')
  say()

  say(f'Top-{k} for all users (history masked), user batch {rconfig.user_batch}:')
  say()
  say('| catalog | users x items x factors | jax first call s | jax s | numpy s | numpy / jax |')
  say('|---|---|---|---|---|---|')
  users, items = (np.asarray(a) for a in fit_ours(seen, num_items, rconfig, 0))
  rng = np.random.default_rng(0)
  synthetic_users, synthetic_items = 4096, 32768
  cases = [('ML-100K', users, items, seen),
           ('synthetic', rng.normal(size=(synthetic_users, 64)).astype(np.float32),
            rng.normal(size=(synthetic_items, 64)).astype(np.float32),
            [rng.choice(synthetic_items, size=rng.integers(20, 500), replace=False)
             for _ in range(synthetic_users)])]
  for name, u, v, histories in cases:
    ours_out, first, ours_s = best_of(lambda: jax_top_k(u, v, histories, k, rconfig.user_batch), args.repeats)
    ref_out, _, ref_s = best_of(lambda: numpy_top_k(u, v, histories, k, rconfig.user_batch), args.repeats)
    agree = (ours_out == ref_out).mean()
    say(f'| {name} | {u.shape[0]} x {v.shape[0]} x {u.shape[1]} | {first:.3f} | {ours_s:.3f} | '
        f'{ref_s:.3f} | {ref_s / ours_s:.2f}x |')
    if agree < 0.999:
      say(f'WARNING: {name}: top-{k} agrees with numpy on only {agree:.4f} of entries')
  say()
  say(f'Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), '
      f'jax {jax.__version__} on {jax.devices()[0].platform}; run {datetime.date.today().isoformat()}; '
      f'load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores).')

  if args.write:
    results_md.write_section('Retriever', '`python bench/retriever.py`\n\n' + '\n'.join(lines), args.write)


if __name__ == '__main__':
  sys.exit(main())
