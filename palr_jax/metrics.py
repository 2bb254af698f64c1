"""Ranking metrics for leave-one-out evaluation: one held-out positive per user.

Everything starts from the 0-based rank of each user's target among the candidates (the full catalog
minus the user's history, or a ranker's list). A target that is absent from a list has rank `inf`
and counts as a miss in every metric. With one positive:
  HR@K      = 1[rank < K]
  Recall@K  = HR@K (one relevant item; reported under its own name because papers use both)
  NDCG@K    = 1[rank < K] / log2(rank + 2)   (the ideal DCG is 1)
  MRR       = 1 / (rank + 1), without a cutoff.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


def _as_ranks(ranks) -> np.ndarray:
  r = np.asarray(ranks, dtype=np.float64)
  if r.ndim != 1 or not r.size:
    raise ValueError(f'ranks must be a non-empty 1-D array, got shape {r.shape}')
  if np.isnan(r).any() or (r < 0).any():
    raise ValueError('ranks must be >= 0 (inf for a target missing from the list), got '
                     f'{r[np.isnan(r) | (r < 0)][:5]}')
  return r


def _as_ks(ks: Sequence[int]) -> list[int]:
  out = [int(k) for k in ks]
  if not out or any(k <= 0 or k != kk for k, kk in zip(out, ks)):
    raise ValueError(f'ks must be positive integers, got {ks!r}')
  return out


def per_user_metrics(ranks, ks: Sequence[int]) -> dict[str, np.ndarray]:
  """{'HR@K', 'NDCG@K', 'Recall@K' for K in ks, 'MRR'} -> float64 [U] arrays (for paired tests)."""
  r = _as_ranks(ranks)
  out = {}
  gain = 1.0 / np.log2(np.where(np.isfinite(r), r, 0.0) + 2.0)
  for k in _as_ks(ks):
    hit = r < k
    out[f'HR@{k}'] = hit.astype(np.float64)
    out[f'NDCG@{k}'] = np.where(hit, gain, 0.0)
    out[f'Recall@{k}'] = hit.astype(np.float64)
  out['MRR'] = 1.0 / (r + 1.0)  # inf -> 0
  return out


def metrics_from_ranks(ranks, ks: Sequence[int]) -> dict[str, float]:
  """Means over users of `per_user_metrics`, as Python floats."""
  return {name: float(v.mean()) for name, v in per_user_metrics(ranks, ks).items()}


class BootstrapResult(NamedTuple):
  mean_diff: float  # observed mean of a - b
  low: float        # 2.5th percentile of the resampled mean differences
  high: float       # 97.5th percentile


def paired_bootstrap(a, b, samples: int, seed: int) -> BootstrapResult:
  """Percentile bootstrap over users of mean(a - b), for per-user metrics of two systems.

  Resampling users (not items) keeps each user's pair together, so the interval reflects how much
  the comparison depends on which users were drawn. Draw s uses `rng.integers(0, U, U)` of
  `np.random.default_rng(seed)`, in order, so results are reproducible.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not a.size:
    raise ValueError(f'a and b must be non-empty 1-D arrays of the same users, got {a.shape} and '
                     f'{b.shape}')
  if samples < 1:
    raise ValueError(f'samples must be >= 1, got {samples}')
  diff = a - b
  rng = np.random.default_rng(seed)
  means = np.array([diff[rng.integers(0, diff.size, diff.size)].mean() for _ in range(samples)])
  low, high = np.percentile(means, [2.5, 97.5])
  return BootstrapResult(float(diff.mean()), float(low), float(high))


# ------------------------------------------------------------------------------------------------
# Comparing methods on the same users.

BASELINE = 'retriever'


def compare(per_user: dict[str, dict[str, np.ndarray]], ks: Sequence[int], samples: int,
            seed: int) -> dict:
  """Means per method and paired-bootstrap intervals of each method's difference from the retriever.

  `per_user[method]` comes from `per_user_metrics` over the same users in the same order.
  """
  out = {'metrics': {}, 'vs_retriever': {}}
  names = [f'{m}@{k}' for k in ks for m in ('HR', 'NDCG')]
  for method, values in per_user.items():
    out['metrics'][method] = {n: float(values[n].mean()) for n in names}
    if method != BASELINE and BASELINE in per_user:
      out['vs_retriever'][method] = {
          n: paired_bootstrap(values[n], per_user[BASELINE][n], samples, seed)._asdict()
          for n in names}
  return out


def reordering(items: dict[str, Sequence[Sequence[int]]], targets: Sequence[int], k: int = 10,
               ranks: dict[str, Sequence[float]] | None = None) -> dict:
  """How each method reorders the retriever's candidate list, per user then averaged.

  `items[method][u]` is the method's order of user u's candidates (`items['retriever']` the retriever's,
  which bounds every reranker: a target it did not retrieve cannot be found). Returns
  {'candidates', 'target_in_candidates', 'methods': {m: {'top1_as_retriever', f'top{k}_overlap',
  f'HR@{k}_when_retrieved'}}}: a reranker that only learned the retriever's position prior has top-1
  agreement and overlap near 1; `HR@k_when_retrieved` is its skill on the users it could help, from the
  method's `ranks` (pessimistic: ties count against the target) where given, else from the list positions.
  """
  if BASELINE not in items:
    raise ValueError(f'reordering needs the {BASELINE!r} order, got methods {sorted(items)}')
  ref = [list(x) for x in items[BASELINE]]
  targets = [int(t) for t in targets]
  if any(len(v) != len(ref) for v in items.values()) or len(targets) != len(ref):
    raise ValueError(f'reordering: {len(targets)} targets and lists per method '
                     f'{ {m: len(v) for m, v in items.items()} }; expected the same users everywhere')
  found = np.asarray([t in r for t, r in zip(targets, ref)])
  out = {'candidates': max((len(r) for r in ref), default=0), 'target_in_candidates': float(found.mean()),
         'methods': {}}
  for method, lists in items.items():
    lists = [list(x) for x in lists]
    if ranks is not None and method in ranks:
      hit = np.asarray(ranks[method], np.float64) < k
    else:
      hit = np.asarray([t in x[:k] for t, x in zip(targets, lists)])
    out['methods'][method] = {
        'top1_as_retriever': float(np.mean([bool(x) and bool(r) and x[0] == r[0]
                                            for x, r in zip(lists, ref)])),
        f'top{k}_overlap': float(np.mean([len(set(x[:k]) & set(r[:k])) / k for x, r in zip(lists, ref)])),
        f'HR@{k}_when_retrieved': float(hit[found].mean()) if found.any() else 0.0}
  return out


# ------------------------------------------------------------------------------------------------
# Score fusion: the retriever's knowledge added back to an LLM reranker.

TIE_RTOL = 1e-5  # scores closer than this (relative) are equal (palr_jax/model/rerank.py says why)


def _standardized(scores) -> np.ndarray:
  """z-scores over one user's candidates; candidates without a score (None, -inf) go below every other."""
  x = np.asarray([np.nan if s is None else s for s in scores], np.float64)
  finite = np.isfinite(x)
  if not finite.any():
    return np.zeros(len(x))
  mean, std = x[finite].mean(), x[finite].std()
  if std <= TIE_RTOL * max(1.0, abs(mean)):  # equal up to rounding: no preference to scale up into z-scores
    std = np.inf
  z = (x - mean) / std
  z[~finite] = z[finite].min() - 1.0
  return z


def fuse(retriever: dict, llm: dict, weight: float) -> dict:
  """Ranks after fusing, per user, `z(retriever score) + weight * z(LLM score)` over the retriever's
  candidates (each method's split entry of rankings.json: `items` and `scores`, in the retriever's order).

  A target among the candidates is ranked pessimistically (every other candidate fusing to at least its
  score counts before it); a target the retriever missed keeps its retriever rank. Returns {'ranks',
  'items', 'targets'}, items in fused order (ties keep the retriever's order).
  """
  ranks, items = [], []
  for cands, r, s, target, rank in zip(retriever['items'], retriever['scores'], llm['scores'],
                                       retriever['targets'], retriever['ranks']):
    f = _standardized(r) + weight * _standardized(s)
    order = np.argsort(-f, kind='stable')
    items.append([cands[j] for j in order])
    if target in cands:
      ranks.append(float(np.sum(f >= f[cands.index(target)]) - 1))
    else:
      ranks.append(float(rank))
  return {'ranks': ranks, 'items': items, 'targets': list(retriever['targets'])}


def choose_fusion_weight(retriever: dict, llm: dict, weights: Sequence[float], metric: str
                         ) -> tuple[float, dict[str, float]]:
  """The weight (of `weights`) whose fusion scores best on `metric` (e.g. 'NDCG@10'), and every weight's
  score; the smallest of equals wins. Call it on valid only: the weight then carries to test."""
  k = int(metric.split('@')[1])
  by_weight = {float(w): metrics_from_ranks(fuse(retriever, llm, w)['ranks'], [k])[metric] for w in weights}
  best = max(by_weight, key=lambda w: (by_weight[w], -w))
  return best, {str(w): v for w, v in by_weight.items()}
