"""Item-to-item transitions: what users consumed soon after what, the order of events that MF ignores.

`counts[i, j]` sums, over every history and every pair of events `(i at t, j at t + d)` with
`1 <= d <= window`, the weight `decay ** (d - 1)`: with window 1, how often j came right after i. A user's
query is their last `items` events, most recent first, weighted `decay ** k`; their transition score for
item j is `sum_k w_k counts[last_k, j]`. The retriever (retrieval/topk.py) fuses it with the MF score:
`(1 - weight) z(MF) + weight z(transitions)`, z standardizing each user's scores over the catalog.

The table is dense [I, I] (float32, 4 I^2 bytes: small for ML-100K and ML-1M, large from ~10k items); with
`retriever.shard_items` its columns are split over the mesh like the item factors.

No leakage: counts come from exactly the histories the MF model is fitted on (valid: train; test: train +
valid; a cross-fitted fold: the other folds' users), so a held-out target, and for training rows the
user's own events, never count.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def transition_counts(histories: Sequence[np.ndarray], num_items: int, window: int, decay: float
                      ) -> np.ndarray:
  """[I, I] float32: decayed counts of item j following item i within `window` events of a history."""
  if window < 1:
    raise ValueError(f'config.retriever.transition_window must be >= 1, got {window}')
  counts = np.zeros(num_items * num_items, np.float64)
  for d in range(1, window + 1):
    src = [np.asarray(h[:-d], np.int64) for h in histories if len(h) > d]
    if not src:
      break
    dst = np.concatenate([np.asarray(h[d:], np.int64) for h in histories if len(h) > d])
    counts += decay ** (d - 1) * np.bincount(np.concatenate(src) * num_items + dst,
                                             minlength=num_items * num_items)
  return counts.reshape(num_items, num_items).astype(np.float32)


def recent_items(histories: Sequence[np.ndarray], count: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
  """Each history's last `count` items, most recent first (int32 [N, count], -1 where shorter), and their
  weights `decay ** k` (float32, 0 on padding)."""
  if count < 1:
    raise ValueError(f'config.retriever.transition_items must be >= 1, got {count}')
  items = np.full((len(histories), count), -1, np.int32)
  for row, h in enumerate(histories):
    last = np.asarray(h[::-1][:count], np.int32)
    items[row, :len(last)] = last
  weights = np.where(items >= 0, decay ** np.arange(count, dtype=np.float32)[None], 0.0).astype(np.float32)
  return items, weights
