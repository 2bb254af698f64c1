"""Top-K items per user and the full rank of a target, jitted, history-masked, optionally item-sharded.

A user's score for item i is the MF score `U[u] @ V[i]`, or, with a transition table (retrieval/
transitions.py), `(1 - w) z(MF) + w z(T)`, where `T[u, i] = sum_k q_k counts[recent_k(u), i]` and z
standardizes each user's scores over the catalog. The table is sparse (CSR): T is the gather of the
recent items' rows, [B, R, M] entries, scatter-added into the batch's [B, I] scores. The items a user
already has are masked to -inf from a padded index array [B, H] (-1 = padding), never a dense [U, I]
mask, so memory is O(B * I + B * H) per batch. A target's rank is the number of other unmasked items that
score at least as high (0-based, ties counted against the target: a scorer that cannot tell items apart
ranks the target last, never first). With a mesh, V's item axis is split over every device (the sparse
table, O(I * M), is replicated and each shard scatters only the entries of its own columns): each shard
scores and masks its own slice, keeps its local top-K (indices made global), and the shards' [B, K]
candidate lists, laid side by side, are merged by one more top-K; so the catalog only has to fit in the
memory of all devices together and only B * K * devices candidates cross between them.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from palr_jax.retrieval import transitions as transitions_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def pad_histories(histories: Sequence[np.ndarray], width: int | None = None) -> np.ndarray:
  """Ragged item-index histories -> int32 [N, width] padded with -1 (width: the longest, at least 1)."""
  longest = max((len(h) for h in histories), default=0)
  width = max(longest, 1) if width is None else width
  if longest > width:
    raise ValueError(f'pad_histories: a history has {longest} items, more than width={width}')
  out = np.full((len(histories), width), -1, np.int32)
  for row, h in enumerate(histories):
    out[row, :len(h)] = h
  return out


def _standardize(x, valid, axes):
  """(x - mean) / std over the unmasked `valid` items of each row (all shards when `axes` is set)."""
  n = jnp.sum(valid).astype(jnp.float32)
  s1 = jnp.sum(jnp.where(valid, x, 0.0), axis=1)
  s2 = jnp.sum(jnp.where(valid, x * x, 0.0), axis=1)
  if axes:
    n, s1, s2 = jax.lax.psum((n, s1, s2), axes)
  mean = s1 / n
  std = jnp.sqrt(jnp.maximum(s2 / n - mean * mean, 1e-12))
  return (x - mean[:, None]) / std[:, None]


def _transition_scores(table, recent, recent_weights, width: int, n: int, offset):
  """[B, n] transition scores of the n items from `offset`: the recent items' CSR rows (at most `width`
  entries each), weighted, scatter-added; entries of other shards' columns are dropped."""
  starts, lengths, indices, values = table
  r = jnp.maximum(recent, 0)                                                  # [B, R]
  pos = jnp.arange(width)
  ok = (pos < lengths[r][..., None]) & (recent >= 0)[..., None]               # [B, R, W]
  at = jnp.where(ok, starts[r][..., None] + pos, 0)
  cols = indices[at] - offset
  vals = jnp.where(ok, values[at] * recent_weights[..., None], 0.0)
  local = jnp.where(ok & (cols >= 0) & (cols < n), cols, n)                   # n: dropped by the scatter
  b = recent.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], local.shape)
  return jnp.zeros((b, n), jnp.float32).at[rows, local].add(vals, mode='drop')


def _scores(users, items, recent, recent_weights, table, width, weight, valid, offset=0, axes=None):
  """Scores [B, n] of the n items of this slice: MF alone, or fused with the transition scores."""
  mf = jnp.matmul(users, items.T, precision=_HIGHEST)
  if table is None:
    return mf
  tr = _transition_scores(table, recent, recent_weights, width, items.shape[0], offset)
  return (1.0 - weight) * _standardize(mf, valid, axes) + weight * _standardize(tr, valid, axes)


def _mask(scores, history, offset):
  """The scores with the history (global item indices) at -inf."""
  n = scores.shape[1]
  local = history - offset
  local = jnp.where((history >= 0) & (local >= 0) & (local < n), local, n)   # n: dropped by the scatter
  rows = jnp.arange(scores.shape[0])[:, None]
  return scores.at[rows, local].set(-jnp.inf, mode='drop')


def _rank_of(masked, target_scores):
  """Other items scoring at least the target's score (the target itself is one of them: not masked)."""
  return jnp.sum(masked >= target_scores[:, None], axis=1, dtype=jnp.int32) - 1


def _transition_entries(table, recent, recent_weights, width: int, n: int):
  """The recent items' CSR entries: (columns [B, R*W], n on padding; weighted values [B, R*W], 0 there)."""
  starts, lengths, indices, values = table
  r = jnp.maximum(recent, 0)
  pos = jnp.arange(width)
  ok = (pos < lengths[r][..., None]) & (recent >= 0)[..., None]
  at = jnp.where(ok, starts[r][..., None] + pos, 0)
  cols = jnp.where(ok, indices[at], n)
  vals = jnp.where(ok, values[at] * recent_weights[..., None], 0.0)
  b = recent.shape[0]
  return cols.reshape(b, -1), vals.reshape(b, -1)


def _sparse_moments(cols, vals):
  """Per row, sum and sum of squares of the dense row the entries scatter-add to: entries sharing a
  column are summed first (sort by column, then per-run sums from one cumulative sum)."""
  cols, vals = jax.lax.sort((cols, vals), dimension=1, num_keys=1)
  total = jnp.cumsum(vals, axis=1)
  before = total - vals                                                       # exclusive cumsum
  j = jnp.arange(cols.shape[1])
  first = jnp.concatenate([jnp.ones_like(cols[:, :1], bool), cols[:, 1:] != cols[:, :-1]], axis=1)
  last = jnp.concatenate([cols[:, 1:] != cols[:, :-1], jnp.ones_like(cols[:, :1], bool)], axis=1)
  run_start = jax.lax.cummax(jnp.where(first, j, 0), axis=1)
  run = total - jnp.take_along_axis(before, run_start, axis=1)
  return total[:, -1], jnp.sum(jnp.where(last, run * run, 0.0), axis=1)


def _fused_scores(users, items, item_stats, recent, recent_weights, table, width, weight, n: int):
  """The scores of `_scores` (one device, every item valid) in fewer passes over the [B, I] array: the MF
  moments come from the item statistics (sum_i u.v_i = u.sum(V), sum_i (u.v_i)^2 = u^T V^T V u) and the
  transition moments from the sparse entries, so the dense work is the matmul and
  in-place scatters. Needs 0 <= weight < 1. Returns (scores, scale, shift): the fused score is
  scale * scores + shift per row with scale > 0, so the order and every rank are the fused ones and only
  the top values are mapped."""
  mf = jnp.matmul(users, items.T, precision=_HIGHEST)  # items past n: zero padding rows
  item_sum, item_gram = item_stats
  s1 = jnp.matmul(users, item_sum, precision=_HIGHEST)
  s2 = jnp.sum(jnp.matmul(users, item_gram, precision=_HIGHEST) * users, axis=1)
  mean_m = s1 / n
  std_m = jnp.sqrt(jnp.maximum(s2 / n - mean_m * mean_m, 1e-12))
  cols, vals = _transition_entries(table, recent, recent_weights, width, n)
  t1, t2 = _sparse_moments(cols, vals)
  mean_t = t1 / n
  std_t = jnp.sqrt(jnp.maximum(t2 / n - mean_t * mean_t, 1e-12))
  # (1 - w)(mf - mean_m)/std_m + w (T - mean_t)/std_t = scale (mf + ratio T) + shift, 0 <= w < 1: the
  # transitions are added in place to the matmul's output, and the affine map touches only the top values.
  scale = (1.0 - weight) / std_m
  ratio = weight * std_m / ((1.0 - weight) * std_t)
  shift = -(1.0 - weight) * mean_m / std_m - weight * mean_t / std_t
  rows = jnp.broadcast_to(jnp.arange(users.shape[0])[:, None], cols.shape)
  return mf.at[rows, cols].add(vals * ratio[:, None], mode='drop'), scale, shift


_BLOCK = 512  # items per block of `_blocked_top_k`: its candidates are k blocks, its max-reduce reads each once


def _blocked_top_k(x, k: int):
  """`jax.lax.top_k(x, k)` over the last axis, equal in values, indices and tie order (lower index first),
  reading the [B, n] array once for block maxima and then only k blocks: the exact top k lie in the k
  blocks with the largest maxima (ties: lower block), because every unselected block's elements are beaten
  by the k selected maxima; the blocks are kept in index order and the < _BLOCK tail columns appended, so
  the final top-k's ties still go to the lower index. Plain top_k where the catalog is not much bigger.
  Cheapest when n is a multiple of _BLOCK (`top_k` pads the items so): no copy of the main part."""
  b, n = x.shape
  blocks = n // _BLOCK
  if blocks < 4 * k:
    return jax.lax.top_k(x, k)
  main = x[:, :blocks * _BLOCK].reshape(b, blocks, _BLOCK)
  _, chosen = jax.lax.top_k(jnp.max(main, axis=2), k)
  chosen = jnp.sort(chosen, axis=1)                                           # [B, k] in index order
  picked = jnp.take_along_axis(main, chosen[:, :, None], axis=1).reshape(b, k * _BLOCK)
  where = (chosen[:, :, None] * _BLOCK + jnp.arange(_BLOCK)).reshape(b, k * _BLOCK)
  tail = n - blocks * _BLOCK
  if tail:
    picked = jnp.concatenate([picked, x[:, blocks * _BLOCK:]], axis=1)
    where = jnp.concatenate([where, jnp.broadcast_to(blocks * _BLOCK + jnp.arange(tail), (b, tail))], axis=1)
  values, pos = jax.lax.top_k(picked, k)
  return values, jnp.take_along_axis(where, pos, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('k', 'width', 'num_items'))
def masked_top_k(users, items, history, targets, recent, recent_weights, table, weight, k: int, width: int,
                 item_stats=None, num_items: int | None = None):
  """Top-k (scores, item indices) [B, k] over items minus history, and targets' ranks [B] (or None).

  With `item_stats` (sum and Gram of the first `num_items` rows of `items`; the rest are zero padding),
  the scores come from `_fused_scores` (fewer passes over the catalog: the matmul, in-place scatters,
  the blocked top-k and the rank count); without, from the reference `_scores`."""
  if item_stats is not None:
    if table is None:
      scores = jnp.matmul(users, items.T, precision=_HIGHEST)
      scale, shift = jnp.ones(users.shape[0]), jnp.zeros(users.shape[0])
    else:
      scores, scale, shift = _fused_scores(users, items, item_stats, recent, recent_weights, table, width,
                                           weight, num_items)
    masked = _mask(scores, history, 0)
    if items.shape[0] > num_items:
      masked = masked.at[:, num_items:].set(-jnp.inf)
    values, indices = _blocked_top_k(masked, k)
    values = values * scale[:, None] + shift[:, None]
    if targets is None:
      return values, indices, None
    target_scores = jnp.take_along_axis(masked, targets[:, None], axis=1)[:, 0]
    return values, indices, _rank_of(masked, target_scores)
  valid = jnp.ones(items.shape[0], bool)
  masked = _mask(_scores(users, items, recent, recent_weights, table, width, weight, valid), history, 0)
  values, indices = jax.lax.top_k(masked, k)
  if targets is None:
    return values, indices, None
  # The target is never masked (callers drop it from the history), so its score is read off `masked`.
  target_scores = jnp.take_along_axis(masked, targets[:, None], axis=1)[:, 0]
  return values, indices, _rank_of(masked, target_scores)


def _item_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(mesh.axis_names)


@functools.partial(jax.jit, static_argnames=('k', 'width', 'num_items', 'mesh'))
def sharded_masked_top_k(users, items, history, targets, recent, recent_weights, table, weight, k: int,
                         width: int, num_items: int, mesh: Mesh):
  """`masked_top_k` with `items` [I_pad, F] split over every mesh axis (rows >= num_items are padding) and
  the sparse table replicated: each shard scatters its own columns."""
  axes = _item_axes(mesh)

  def local(users, items, history, targets, recent, recent_weights, table):
    n = items.shape[0]
    offset = jax.lax.axis_index(axes) * n
    valid = offset + jnp.arange(n) < num_items
    scores = _scores(users, items, recent, recent_weights, table, width, weight, valid, offset, axes)
    masked = jnp.where(valid, _mask(scores, history, offset), -jnp.inf)
    values, indices = jax.lax.top_k(masked, min(k, n))
    if targets is None:
      return values, indices + offset, None
    here = (targets >= offset) & (targets < offset + n)
    own = jnp.take_along_axis(masked, jnp.clip(targets - offset, 0, n - 1)[:, None], axis=1)[:, 0]
    target_scores = jax.lax.pmax(jnp.where(here, own, -jnp.inf), axes)
    ranks = jax.lax.psum(jnp.sum(masked >= target_scores[:, None], axis=1, dtype=jnp.int32), axes) - 1
    return values, indices + offset, ranks

  table_spec = None if table is None else (P(), P(), P(), P())
  # Each shard's local top-k lands side by side on axis 1; the merge picks the global top-k.
  values, indices, ranks = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(axes), P(), P(), P(), P(), table_spec),
      out_specs=(P(None, axes), P(None, axes), P()))(users, items, history, targets, recent, recent_weights,
                                                     table)
  values, pos = jax.lax.top_k(values, k)
  return values, jnp.take_along_axis(indices, pos, axis=1), ranks


def top_k(user_factors, item_factors, histories: Sequence[np.ndarray], k: int, *, user_batch: int,
          targets: np.ndarray | None = None, mesh: Mesh | None = None,
          transitions: transitions_lib.Table | None = None,
          recent: np.ndarray | None = None, recent_weights: np.ndarray | None = None,
          transition_weight: float = 0.0, fused: bool = True):
  """Top-k unseen items for every user, in jitted batches of `user_batch` users.

  Args:
    user_factors: [N, F]; item_factors: [I, F].
    histories: N ragged item-index arrays masked out of each user's ranking.
    k: items kept per user; must not exceed I.
    targets: optional int [N] items whose 0-based rank among the unmasked items is returned.
    mesh: shard the item axis over all of this mesh's devices (None = one device).
    transitions, recent, recent_weights, transition_weight: the sparse transition table (a
      retrieval/transitions.py Table over I items) and each user's query ([N, R] item indices, -1
      padding, and weights) fused with weight w; None: MF scores alone.
    fused: one device: the z-moments from item statistics and the sparse entries (`_fused_scores`, fewer
      passes over each [B, I] batch); False: the reference `_scores` (the same order; the tests compare).
  Returns:
    numpy (scores [N, k] float32, items [N, k] int32, ranks [N] int32 or None). A user with fewer than
    k unmasked items gets -inf scores in the tail.
  """
  num_users, num_items = user_factors.shape[0], item_factors.shape[0]
  if len(histories) != num_users:
    raise ValueError(f'top_k: {len(histories)} histories for {num_users} users')
  if not 0 < k <= num_items:
    raise ValueError(f'top_k: k={k}, expected 1 <= k <= num_items={num_items}')
  if targets is not None:
    targets = np.asarray(targets, np.int32)
    if targets.shape != (num_users,) or targets.min(initial=0) < 0 or targets.max(initial=0) >= num_items:
      raise ValueError(f'top_k: targets must be [{num_users}] item indices in [0, {num_items})')
  if transitions is None:
    recent = np.full((num_users, 1), -1, np.int32)
    recent_weights = np.zeros((num_users, 1), np.float32)
  elif transitions.num_items != num_items or recent is None or len(recent) != num_users:
    raise ValueError(f'top_k: transitions must be a table over {num_items} items with a query per user')
  weight = np.float32(transition_weight)
  table, width = None, 1
  if transitions is not None:  # one dummy entry, so an empty table still gathers
    width = int(2 ** np.ceil(np.log2(transitions.width)))  # few compiled shapes across refits
    table = (jnp.asarray(transitions.indptr[:-1], jnp.int32),
             jnp.asarray(np.diff(transitions.indptr), jnp.int32),
             jnp.asarray(np.append(transitions.indices, 0), jnp.int32),
             jnp.asarray(np.append(transitions.values, 0), jnp.float32))
  if mesh is None:
    items = jnp.asarray(item_factors)
    item_stats = None
    if fused and (table is None or 0 <= weight < 1):  # weight 1: the reference (T alone, MF ignored)
      item_stats = (jnp.sum(items, axis=0), jnp.matmul(items.T, items, precision=_HIGHEST))
      if num_items // _BLOCK >= 4 * k:  # whole blocks for _blocked_top_k
        items = jnp.pad(items, ((0, -num_items % _BLOCK), (0, 0)))
    kernel = functools.partial(masked_top_k, k=k, width=width, item_stats=item_stats, num_items=num_items)
  else:
    shards = mesh.devices.size
    padded = -(-num_items // shards) * shards
    items = jnp.pad(jnp.asarray(item_factors), ((0, padded - num_items), (0, 0)))
    items = jax.device_put(items, NamedSharding(mesh, P(_item_axes(mesh))))
    if table is not None:
      table = jax.device_put(table, NamedSharding(mesh, P()))
    kernel = functools.partial(sharded_masked_top_k, k=k, width=width, num_items=num_items, mesh=mesh)
  user_factors = np.asarray(user_factors, np.float32)
  history_width = int(2 ** np.ceil(np.log2(max([len(h) for h in histories] + [1]))))  # few compiled shapes
  batch = int(min(user_batch, num_users))
  outputs = []
  batches = range(0, num_users, batch)  # progress only where there are many (catalog-scale train rows)
  for lo in tqdm.tqdm(batches, desc='top-K batches', leave=False, mininterval=30, disable=len(batches) < 64):
    hi = min(lo + batch, num_users)
    pad = batch - (hi - lo)
    users = np.zeros((batch, user_factors.shape[1]), np.float32)
    users[:hi - lo] = user_factors[lo:hi]
    history = pad_histories(list(histories[lo:hi]) + [()] * pad, history_width)
    batch_targets = None if targets is None else np.pad(targets[lo:hi], (0, pad))
    query = np.pad(recent[lo:hi], ((0, pad), (0, 0)), constant_values=-1)
    query_weights = np.pad(recent_weights[lo:hi], ((0, pad), (0, 0)))
    outputs.append((hi - lo, kernel(users, items, history, batch_targets, query, query_weights, table, weight)))
  scores = np.concatenate([np.asarray(o[0][:n]) for n, o in outputs])
  indices = np.concatenate([np.asarray(o[1][:n]) for n, o in outputs])
  ranks = None if targets is None else np.concatenate([np.asarray(o[2][:n]) for n, o in outputs])
  return scores, indices, ranks
