"""Candidate lists for the ranker: `W/candidates/{train,valid,test}.jsonl` (docs/ARCHITECTURE.md).

valid/test rows rank the whole catalog minus the user's history with a model that never saw the held-out
item. train rows must look like test time to the ranker, so a row (u, p) with target `train[u][p]` masks
only `train[u][:p]` and takes its scores from item factors fitted without user u (cross-fitting over user
folds) and a user vector folded in from the prefix `train[u][:p]` alone: the target's score never comes
from a model that saw the pair (u, target). Otherwise every train target would rank near the top and the
ranker would learn to trust the retriever's order more than it deserves.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses

import jax
import numpy as np

from palr_jax.retrieval import mf
from palr_jax.retrieval import topk
from palr_jax.retrieval import transitions


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Top-K of a set of queries: rows of `users` (dense index), optionally at a train `positions`."""
  users: np.ndarray            # [N] int
  targets: np.ndarray          # [N] int item index
  scores: np.ndarray           # [N, K] float32
  items: np.ndarray            # [N, K] int32
  ranks: np.ndarray            # [N] int32, 0-based rank of the target among unmasked items
  positions: np.ndarray | None = None  # [N] int, train rows only


def user_folds(num_users: int, folds: int, key) -> np.ndarray:
  """[U] fold id in 0..folds-1: a seeded permutation dealt round-robin (sizes differ by at most 1)."""
  if not 2 <= folds <= num_users:
    raise ValueError(f'config.retriever.folds={folds}: expected 2 <= folds <= number of users {num_users}')
  out = np.empty(num_users, np.int32)
  out[np.asarray(jax.random.permutation(key, num_users))] = np.arange(num_users) % folds
  return out


def train_positions(train: Sequence[np.ndarray], max_positions: int) -> tuple[np.ndarray, np.ndarray]:
  """(users, positions) of the train rows: p in 1..len-1, the most recent `max_positions` (0 = all).

  A position whose target already occurs earlier in the sequence (a repeat) is skipped: its target
  would be masked, and a masked item can never be a candidate.
  """
  users, positions = [], []
  for u, seq in enumerate(train):
    first = max(1, len(seq) - max_positions) if max_positions else 1
    for p in range(first, len(seq)):
      if seq[p] not in seq[:p]:
        users.append(u)
        positions.append(p)
  return np.asarray(users, np.int64), np.asarray(positions, np.int64)


def transition_table(histories: Sequence[np.ndarray], num_items: int, config) -> transitions.Table | None:
  """The sparse transition table of `histories` when the retriever fuses them (`transition_weight` > 0)."""
  if float(config.transition_weight) <= 0:
    return None
  return transitions.transition_table(histories, num_items, int(config.transition_window),
                                      float(config.transition_decay), int(config.transition_top_m))


def user_batch(config, num_items: int) -> int:
  """Users per jitted top-K call: `user_batch`, fewer where users x items would pass `score_chunk` (the
  [B, I] score arrays of a call are what grows with the catalog)."""
  return int(max(1, min(int(config.user_batch), int(config.score_chunk) // max(num_items, 1))))


def rank(user_factors, item_factors, histories: Sequence[np.ndarray], users: np.ndarray,
         targets: np.ndarray, config, mesh=None, positions: np.ndarray | None = None,
         table: transitions.Table | None = None) -> Ranking:
  """Top-`config.num_candidates` and target ranks for query rows `users` (config: retriever section),
  by MF scores, or fused with the transition `table` (`transition_table`) queried by each history's last
  items.

  A target the user already has (a repeat, e.g. Amazon re-purchases) is not masked: it is ranked, and
  can be a candidate, like any unseen item, so its rank and the candidate list agree.
  """
  fused = {}
  if table is not None:
    recent, weights = transitions.recent_items(histories, int(config.transition_items),
                                               float(config.transition_decay))
    fused = dict(transitions=table, recent=recent, recent_weights=weights,
                 transition_weight=float(config.transition_weight))
  histories = [h[h != t] for h, t in zip(histories, np.asarray(targets))]
  scores, items, ranks = topk.top_k(user_factors, item_factors, histories, config.num_candidates,
                                    user_batch=user_batch(config, item_factors.shape[0]), targets=targets,
                                    mesh=mesh, **fused)
  if not np.isfinite(scores).all():
    row = int(np.flatnonzero(~np.isfinite(scores).all(axis=1))[0])
    raise ValueError(f'user index {users[row]}: fewer than config.retriever.num_candidates='
                     f'{config.num_candidates} items outside the history')
  return Ranking(users=np.asarray(users), targets=np.asarray(targets), scores=scores, items=items,
                 ranks=ranks, positions=positions)


def cross_fit_fold(train: Sequence[np.ndarray], num_items: int, folds: np.ndarray, fold: int,
                   users: np.ndarray, positions: np.ndarray, config, key, mesh=None) -> Ranking:
  """Train rows of the users in `fold`: items fitted, and transitions counted, on the other folds; users
  folded in per prefix, and queried by the prefix's last items.

  The fold's users are given empty histories, which for iALS is exactly fitting without them (their
  factors are zero and add nothing to the item step); for BPR they contribute no pairs; for the
  transitions they contribute no events, so a user's own later events never count for their rows.
  """
  others = [seq if folds[u] != fold else seq[:0] for u, seq in enumerate(train)]
  _, item_factors = mf.fit(others, num_items, config, key)
  mine = np.flatnonzero(folds[users] == fold)
  prefixes = [train[users[r]][:positions[r]] for r in mine]
  targets = np.asarray([train[users[r]][positions[r]] for r in mine], np.int32)
  user_factors = mf.fold_in_users(item_factors, prefixes, config)
  return rank(user_factors, item_factors, prefixes, users[mine], targets, config, mesh,
              positions=positions[mine], table=transition_table(others, num_items, config))


def concat(rankings: Sequence[Ranking]) -> Ranking:
  """Joins rankings (e.g. the folds) and orders rows by (user, position)."""
  joined = {f.name: np.concatenate([getattr(r, f.name) for r in rankings])
            for f in dataclasses.fields(Ranking)}
  order = np.lexsort((joined['positions'], joined['users']))
  return Ranking(**{k: v[order] for k, v in joined.items()})


def rows(ranking: Ranking, user_ids: np.ndarray, item_ids: np.ndarray) -> Iterator[dict]:
  """JSON rows per docs/ARCHITECTURE.md (plus `target_id`, the target's raw id), one at a time: train has
  a row per (user, position), too many to hold as dicts at catalog scale."""
  for n in range(len(ranking.users)):
    u, target, items = int(ranking.users[n]), int(ranking.targets[n]), ranking.items[n].tolist()
    row = {'user': str(user_ids[u]), 'user_index': u, 'target': target,
           'target_id': str(item_ids[target]), 'items': items,
           'item_ids': [str(item_ids[i]) for i in items],
           'scores': [round(s, 6) for s in ranking.scores[n].tolist()],
           'target_rank': int(ranking.ranks[n])}
    if ranking.positions is not None:
      row['position'] = int(ranking.positions[n])
    yield row
