"""Item-to-item transitions: what users consumed soon after what, the order of events that MF ignores.

`counts[i, j]` sums, over every history and every pair of events `(i at t, j at t + d)` with
`1 <= d <= window`, the weight `decay ** (d - 1)`: with window 1, how often j came right after i. A user's
query is their last `items` events, most recent first, weighted `decay ** k`; their transition score for
item j is `sum_k w_k counts[last_k, j]`. The retriever (retrieval/topk.py) fuses it with the MF score:
`(1 - weight) z(MF) + weight z(transitions)`, z standardizing each user's scores over the catalog.

The table is sparse: per item i only its `top_m` successors j by count (ties: the smaller j), as CSR
arrays. It is built from the (i, j) pairs of the events, sorted once, so its memory is linear in
events * window and never I^2 (a dense [I, I] table is quadratic in the catalog); the query is a gather of
the recent items' rows and a scatter-add into the batch's scores (topk.py). With `top_m` at least a
row's support the scores equal the dense table's exactly.

No leakage: counts come from exactly the histories the MF model is fitted on (valid: train; test: train +
valid; a cross-fitted fold: the other folds' users), so a held-out target, and for training rows the
user's own events, never count.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Table:
  """Per item its kept successors, CSR: row i is `indices[indptr[i]:indptr[i+1]]` (item j) and the same
  slice of `values` (its decayed count), largest count first."""
  indptr: np.ndarray   # int64 [I + 1]
  indices: np.ndarray  # int32 [nnz]
  values: np.ndarray   # float32 [nnz]

  @property
  def num_items(self) -> int:
    return len(self.indptr) - 1

  @property
  def width(self) -> int:
    """The longest row (at least 1): the static gather width of the query."""
    return int(max(1, np.diff(self.indptr).max(initial=0)))

  @classmethod
  def from_dense(cls, table: np.ndarray) -> Table:
    """Every nonzero of a [I, I] table, for tests and small catalogs only."""
    rows, cols = np.nonzero(table)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(table)))]).astype(np.int64)
    return cls(indptr=indptr, indices=cols.astype(np.int32), values=table[rows, cols].astype(np.float32))

  def dense(self) -> np.ndarray:
    """[I, I] float32, for tests and small catalogs only."""
    out = np.zeros((self.num_items, self.num_items), np.float32)
    rows = np.repeat(np.arange(self.num_items), np.diff(self.indptr))
    out[rows, self.indices] = self.values
    return out


def _pairs(histories: Sequence[np.ndarray], num_items: int, window: int, decay: float):
  """(key = i * I + j int64, weight float64) of every event pair within `window`, one entry per pair."""
  lengths = np.asarray([len(h) for h in histories], np.int64)
  if not lengths.sum():
    return np.zeros(0, np.int64), np.zeros(0, np.float64)
  flat = np.concatenate([np.asarray(h, np.int64) for h in histories])
  if flat.min() < 0 or flat.max() >= num_items:
    raise ValueError(f'transition_table: an item index outside [0, num_items={num_items})')
  # Each event's distance to the end of its history: a pair (t, t + d) exists when d < that distance.
  to_end = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(flat))
  keys, weights = [], []
  for d in range(1, window + 1):
    src = np.flatnonzero(to_end > d)
    if not src.size:
      break
    keys.append(flat[src] * num_items + flat[src + d])
    weights.append(np.full(src.size, decay ** (d - 1), np.float64))
  if not keys:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)
  return np.concatenate(keys), np.concatenate(weights)


def transition_table(histories: Sequence[np.ndarray], num_items: int, window: int, decay: float,
                     top_m: int) -> Table:
  """The decayed successor counts of `histories`, each item's `top_m` largest kept (retriever section keys
  transition_window, transition_decay, transition_top_m)."""
  if window < 1:
    raise ValueError(f'config.retriever.transition_window must be >= 1, got {window}')
  if top_m < 1:
    raise ValueError(f'config.retriever.transition_top_m must be >= 1, got {top_m}')
  keys, weights = _pairs(histories, num_items, window, decay)
  keys, inverse = np.unique(keys, return_inverse=True)
  counts = np.bincount(inverse.ravel(), weights=weights, minlength=len(keys)).astype(np.float32)
  del inverse, weights
  rows, cols = keys // num_items, keys % num_items
  order = np.lexsort((cols, -counts, rows))         # by row, then largest count, then smaller item
  rows, cols, counts = rows[order], cols[order], counts[order]
  per_row = np.bincount(rows, minlength=num_items)
  starts = np.concatenate([[0], np.cumsum(per_row)[:-1]])
  keep = np.arange(len(rows)) - starts[rows] < top_m
  indptr = np.concatenate([[0], np.cumsum(np.minimum(per_row, top_m))]).astype(np.int64)
  return Table(indptr=indptr, indices=cols[keep].astype(np.int32), values=counts[keep])


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
