"""Top-K items per user and the full rank of a target, jitted, history-masked, optionally item-sharded.

Scores are `U @ V.T` for a batch of users; the items a user already has are masked to -inf from a padded
index array [B, H] (-1 = padding), never a dense [U, I] mask, so memory is O(B * I + B * H) per batch.
A target's rank is the number of unmasked items that score strictly higher (0-based; ties favour the
target). With a mesh, V's item axis is split over every device: each shard scores and masks its own
slice, keeps its local top-K (indices made global), and the shards' [B, K] candidate lists, laid side by
side, are merged by one more top-K; so the catalog only has to fit in the memory of all devices together
and only B * K * devices candidates cross between them.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def _masked_scores(users, items, history, offset):
  """Scores [B, n] of items offset..offset+n and the same with the history (global indices) at -inf."""
  scores = jnp.matmul(users, items.T, precision=_HIGHEST)
  n = items.shape[0]
  local = history - offset
  local = jnp.where((history >= 0) & (local >= 0) & (local < n), local, n)   # n: dropped by the scatter
  rows = jnp.arange(scores.shape[0])[:, None]
  return scores, scores.at[rows, local].set(-jnp.inf, mode='drop')


@functools.partial(jax.jit, static_argnames='k')
def masked_top_k(users, items, history, targets, k: int):
  """Top-k (scores, item indices) [B, k] over items minus history, and targets' ranks [B] (or None)."""
  scores, masked = _masked_scores(users, items, history, 0)
  values, indices = jax.lax.top_k(masked, k)
  if targets is None:
    return values, indices, None
  target_scores = jnp.take_along_axis(scores, targets[:, None], axis=1)
  return values, indices, jnp.sum(masked > target_scores, axis=1, dtype=jnp.int32)


def _item_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(mesh.axis_names)


@functools.partial(jax.jit, static_argnames=('k', 'num_items', 'mesh'))
def sharded_masked_top_k(users, items, history, targets, k: int, num_items: int, mesh: Mesh):
  """`masked_top_k` with `items` [I_pad, F] split over every mesh axis; rows >= num_items are padding."""
  axes = _item_axes(mesh)

  def local(users, items, history, targets):
    n = items.shape[0]
    offset = jax.lax.axis_index(axes) * n
    scores, masked = _masked_scores(users, items, history, offset)
    masked = jnp.where(offset + jnp.arange(n) < num_items, masked, -jnp.inf)
    values, indices = jax.lax.top_k(masked, min(k, n))
    if targets is None:
      return values, indices + offset, None
    here = (targets >= offset) & (targets < offset + n)
    own = jnp.take_along_axis(scores, jnp.clip(targets - offset, 0, n - 1)[:, None], axis=1)[:, 0]
    target_scores = jax.lax.pmax(jnp.where(here, own, -jnp.inf), axes)
    ranks = jax.lax.psum(jnp.sum(masked > target_scores[:, None], axis=1, dtype=jnp.int32), axes)
    return values, indices + offset, ranks

  # Each shard's local top-k lands side by side on axis 1; the merge picks the global top-k.
  values, indices, ranks = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(axes), P(), P()),
      out_specs=(P(None, axes), P(None, axes), P()))(users, items, history, targets)
  values, pos = jax.lax.top_k(values, k)
  return values, jnp.take_along_axis(indices, pos, axis=1), ranks


def top_k(user_factors, item_factors, histories: Sequence[np.ndarray], k: int, *, user_batch: int,
          targets: np.ndarray | None = None, mesh: Mesh | None = None):
  """Top-k unseen items for every user, in jitted batches of `user_batch` users.

  Args:
    user_factors: [N, F]; item_factors: [I, F].
    histories: N ragged item-index arrays masked out of each user's ranking.
    k: items kept per user; must not exceed I.
    targets: optional int [N] items whose 0-based rank among the unmasked items is returned.
    mesh: shard the item axis over all of this mesh's devices (None = one device).
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
  if mesh is None:
    items = jnp.asarray(item_factors)
    kernel = functools.partial(masked_top_k, k=k)
  else:
    shards = mesh.devices.size
    padded = -(-num_items // shards) * shards
    items = jnp.pad(jnp.asarray(item_factors), ((0, padded - num_items), (0, 0)))
    items = jax.device_put(items, NamedSharding(mesh, P(_item_axes(mesh))))
    kernel = functools.partial(sharded_masked_top_k, k=k, num_items=num_items, mesh=mesh)
  user_factors = np.asarray(user_factors, np.float32)
  width = int(2 ** np.ceil(np.log2(max([len(h) for h in histories] + [1]))))  # few compiled shapes
  batch = int(min(user_batch, num_users))
  outputs = []
  for lo in range(0, num_users, batch):
    hi = min(lo + batch, num_users)
    users = np.zeros((batch, user_factors.shape[1]), np.float32)
    users[:hi - lo] = user_factors[lo:hi]
    history = pad_histories(list(histories[lo:hi]) + [()] * (batch - (hi - lo)), width)
    batch_targets = None if targets is None else np.pad(targets[lo:hi], (0, batch - (hi - lo)))
    outputs.append((hi - lo, kernel(users, items, history, batch_targets)))
  scores = np.concatenate([np.asarray(o[0][:n]) for n, o in outputs])
  indices = np.concatenate([np.asarray(o[1][:n]) for n, o in outputs])
  ranks = None if targets is None else np.concatenate([np.asarray(o[2][:n]) for n, o in outputs])
  return scores, indices, ranks
