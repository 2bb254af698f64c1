"""Matrix-factorization retrievers in JAX: implicit ALS (iALS) and BPR.

Both take the interactions as per-user item-index histories (`Split.train`, possibly with a user's
history emptied for cross-fitting) and return `(user_factors [U, F], item_factors [I, F])`; the score
of item i for user u is `user_factors[u] @ item_factors[i]`.

iALS (Hu, Koren, Volinsky 2008) with confidence `c_ui = 1 + alpha * r_ui`, where r_ui counts how often
u consumed i (every unobserved pair has c = 1, p = 0). Each half-step is exact: for every row,
`x = (G + reg I + sum_i alpha r_i y_i y_i^T)^-1 sum_i (1 + alpha r_i) y_i` with the shared Gram
`G = Y^T Y`, so the cost is O(nnz F^2 + rows F^3) rather than O(rows * catalog); or (solver 'cg') a few
conjugate-gradient steps per row warm-started from the previous iteration, as implicit's ALS does,
O(steps (nnz F + rows F^2)), which never forms the F x F normal matrices. Rows are bucketed by
history length (powers of two) and solved in padded chunks by one jitted kernel per chunk shape; the
shapes come from a small fixed set, so refits (grid search, cross-fitting folds) reuse compilations.
A user with no history gets the zero vector, so an emptied user leaves the item factors exactly as
if it were absent. The fit ends with a user step, which makes `fold_in_users(V, histories)` reproduce
the fitted user factors and lets new users be scored against fixed item factors.

BPR (Rendle et al. 2009): uniform negative per observed pair, Adam, L2 on the gathered embeddings;
the whole run (epochs x minibatches) is one jitted `lax.scan`.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST


def interaction_counts(histories: Sequence[np.ndarray], num_items: int):
  """Distinct (row, item) pairs of ragged histories with their multiplicity, sorted by (row, item)."""
  lengths = np.asarray([len(h) for h in histories], np.int64)
  rows = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
  cols = (np.concatenate([np.asarray(h, np.int64) for h in histories]) if lengths.sum()
          else np.zeros(0, np.int64))
  if cols.size and (cols.min() < 0 or cols.max() >= num_items):
    bad = int(np.flatnonzero((cols < 0) | (cols >= num_items))[0])
    raise ValueError(f'history of row {rows[bad]} holds item index {cols[bad]}, '
                     f'expected 0 <= i < num_items={num_items}')
  keys, counts = np.unique(rows * num_items + cols, return_counts=True)
  return keys // num_items, keys % num_items, counts.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Chunk:
  rows: jax.Array    # [B] row being solved; num_rows marks padding rows
  cols: jax.Array    # [B, H] the other side's index; 0 on padding
  counts: jax.Array  # [B, H] r_ui; 0 on padding


def _next_pow2(n: np.ndarray) -> np.ndarray:
  return 1 << np.ceil(np.log2(np.maximum(n, 1))).astype(np.int64)


def _chunks(rows, cols, counts, num_rows: int, factors: int, budget: int) -> list[_Chunk]:
  """Groups rows (sorted COO) into padded [B, H] chunks: H = pow2 >= row length, B*max(H, F) <= budget.

  The budget bounds both the gathered factors [B, H, F] and the normal matrices [B, F, F].
  """
  lengths = np.bincount(rows, minlength=num_rows)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  widths = _next_pow2(lengths)
  out = []
  for width in np.unique(widths[lengths > 0]):
    members = np.flatnonzero((widths == width) & (lengths > 0))
    size = int(max(1, min(budget // max(int(width), factors), _next_pow2(len(members)))))
    for lo in range(0, len(members), size):
      m = members[lo:lo + size]
      m = np.concatenate([m, np.full(size - len(m), num_rows, m.dtype)])
      length = np.where(m < num_rows, lengths[np.minimum(m, num_rows - 1)], 0)
      pos = np.arange(width)[None, :]
      valid = pos < length[:, None]
      idx = np.where(valid, starts[np.minimum(m, num_rows - 1)][:, None] + pos, 0)
      out.append(_Chunk(rows=jnp.asarray(m, jnp.int32),
                        cols=jnp.asarray(np.where(valid, cols[idx], 0), jnp.int32),
                        counts=jnp.asarray(np.where(valid, counts[idx], 0), jnp.float32)))
  return out


@jax.jit
def _solve_chunk(other, gram, cols, counts, reg, alpha):
  """Exact iALS solve for a [B, H] chunk of rows against fixed `other` factors."""
  y = other[cols]                                               # [B, H, F]
  a = gram + reg * jnp.eye(gram.shape[0], dtype=gram.dtype)
  a = a + jnp.einsum('bhf,bhg->bfg', y * (alpha * counts)[..., None], y, precision=_HIGHEST)
  conf = jnp.where(counts > 0, 1.0 + alpha * counts, 0.0)
  b = jnp.einsum('bhf,bh->bf', y, conf, precision=_HIGHEST)
  chol = jnp.linalg.cholesky(a)
  return jax.scipy.linalg.cho_solve((chol, True), b[..., None])[..., 0]


@functools.partial(jax.jit, static_argnames='steps')
def _solve_chunk_cg(other, gram, cols, counts, reg, alpha, start, steps: int):
  """`steps` conjugate-gradient steps on the same system from `start` [B, F] (implicit's ALS solver): the
  normal matrix is never formed, each step costs O(B (H F + F^2)) instead of the O(B (H F^2 + F^3)) of
  forming and factoring it, and warm starts from the previous iteration's factors keep few steps enough."""
  y = other[cols]                                               # [B, H, F]
  a0 = gram + reg * jnp.eye(gram.shape[0], dtype=gram.dtype)
  weights = alpha * counts                                      # 0 on padding

  def matvec(p):
    inner = jnp.einsum('bhf,bf->bh', y, p, precision=_HIGHEST)
    return (jnp.matmul(p, a0, precision=_HIGHEST)
            + jnp.einsum('bhf,bh->bf', y, weights * inner, precision=_HIGHEST))

  conf = jnp.where(counts > 0, 1.0 + alpha * counts, 0.0)
  b = jnp.einsum('bhf,bh->bf', y, conf, precision=_HIGHEST)
  x = start
  r = b - matvec(x)
  p = r
  rs = jnp.sum(r * r, axis=1)
  for _ in range(steps):
    ap = matvec(p)
    pap = jnp.sum(p * ap, axis=1)
    step = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
    x = x + step[:, None] * p
    r = r - step[:, None] * ap
    rs_new = jnp.sum(r * r, axis=1)
    p = r + jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)[:, None] * p
    rs = rs_new
  return x


@functools.partial(jax.jit, static_argnames='num_rows')
def _assemble(rows, solutions, num_rows):
  """Scatters chunk solutions into a [num_rows, F] table; unsolved rows (empty history) stay 0."""
  table = jnp.zeros((num_rows + 1, solutions.shape[-1]), solutions.dtype)
  return table.at[rows].set(solutions)[:num_rows]


def _solve_side(other, chunks: list[_Chunk], num_rows: int, reg: float, alpha: float,
                start: jax.Array | None = None, cg_steps: int = 0) -> jax.Array:
  """Solves every row: exactly (Cholesky), or with `cg_steps` > 0 CG steps from `start` [num_rows, F]."""
  if not chunks:
    return jnp.zeros((num_rows, other.shape[1]), other.dtype)
  gram = jnp.matmul(other.T, other, precision=_HIGHEST)
  if cg_steps:
    start = jnp.concatenate([start, jnp.zeros((1, start.shape[1]), start.dtype)])  # padding rows: 0
    solutions = [_solve_chunk_cg(other, gram, c.cols, c.counts, reg, alpha, start[c.rows], cg_steps)
                 for c in chunks]
  else:
    solutions = [_solve_chunk(other, gram, c.cols, c.counts, reg, alpha) for c in chunks]
  rows = jnp.concatenate([c.rows for c in chunks])
  return _assemble(rows, jnp.concatenate(solutions), num_rows)


def _init(key, shape, scale):
  return scale * jax.random.normal(key, shape, jnp.float32)


def fit_ials(histories: Sequence[np.ndarray], num_items: int, config, key) -> tuple[jax.Array, jax.Array]:
  """Fits iALS on per-user item histories; `config` is the retriever section.

  Reads factors, reg, alpha, iterations, init_scale, solve_chunk, solver, cg_steps. Each iteration is a
  user step then an item step, solved exactly (solver 'cholesky') or by `cg_steps` conjugate-gradient
  steps warm-started from the previous iteration ('cg', the cheaper solve at catalog scale); a final
  exact user step makes the user factors the exact solve against the returned items either way.
  """
  solver = getattr(config, 'solver', 'cholesky')
  if solver not in ('cholesky', 'cg'):
    raise ValueError(f'config.retriever.solver={solver!r}, expected cholesky | cg')
  cg_steps = int(config.cg_steps) if solver == 'cg' else 0
  if solver == 'cg' and cg_steps < 1:
    raise ValueError(f'config.retriever.cg_steps={cg_steps}, expected >= 1 with solver cg')
  rows, cols, counts = interaction_counts(histories, num_items)
  num_users, f = len(histories), int(config.factors)
  user_chunks = _chunks(rows, cols, counts, num_users, f, config.solve_chunk)
  order = np.lexsort((rows, cols))
  item_chunks = _chunks(cols[order], rows[order], counts[order], num_items, f, config.solve_chunk)
  reg, alpha = float(config.reg), float(config.alpha)
  items = _init(key, (num_items, f), config.init_scale)
  users = jnp.zeros((num_users, f), jnp.float32)
  for _ in range(config.iterations):
    users = _solve_side(items, user_chunks, num_users, reg, alpha, users, cg_steps)
    items = _solve_side(users, item_chunks, num_items, reg, alpha, items, cg_steps)
  return _solve_side(items, user_chunks, num_users, reg, alpha), items


def fold_in_users(item_factors: jax.Array, histories: Sequence[np.ndarray], config) -> jax.Array:
  """iALS user vectors [len(histories), F] for histories against fixed item factors (the ALS user step).

  Scores users the item factors never saw: e.g. a history prefix `train[u][:p]` with item factors
  fitted without u. Reads reg, alpha, solve_chunk from the retriever section `config`.
  """
  num_items, f = item_factors.shape
  rows, cols, counts = interaction_counts(histories, num_items)
  chunks = _chunks(rows, cols, counts, len(histories), f, config.solve_chunk)
  return _solve_side(item_factors, chunks, len(histories), float(config.reg), float(config.alpha))


@functools.partial(jax.jit, static_argnames=('num_items', 'epochs', 'batch_size'))
def _train_bpr(params, users, items, key, learning_rate, reg, *, num_items, epochs, batch_size):
  optimizer = optax.adam(learning_rate)
  num_batches = max(1, users.shape[0] // batch_size)

  def loss_fn(p, u, i, j):
    pu, qi, qj = p['users'][u], p['items'][i], p['items'][j]
    margin = jnp.sum(pu * (qi - qj), axis=-1)
    l2 = jnp.sum(pu * pu + qi * qi + qj * qj, axis=-1)
    return jnp.mean(-jax.nn.log_sigmoid(margin) + reg * l2)

  def step(carry, batch):
    p, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  def epoch(carry, epoch_key):
    perm_key, neg_key = jax.random.split(epoch_key)
    order = jax.random.permutation(perm_key, users.shape[0])[:num_batches * batch_size]
    order = order.reshape(num_batches, batch_size)
    negatives = jax.random.randint(neg_key, order.shape, 0, num_items)
    carry, losses = jax.lax.scan(step, carry, (users[order], items[order], negatives))
    return carry, losses.mean()

  (params, _), losses = jax.lax.scan(epoch, (params, optimizer.init(params)),
                                     jax.random.split(key, epochs))
  return params, losses


def fit_bpr(histories: Sequence[np.ndarray], num_items: int, config, key) -> tuple[jax.Array, jax.Array]:
  """Fits BPR on the distinct (user, item) pairs; `config` is the retriever section.

  Reads factors, bpr_reg, learning_rate, epochs, batch_size, init_scale. Negatives are uniform over the
  catalog (a sampled negative may be a positive, as in the original BPR).
  """
  rows, cols, _ = interaction_counts(histories, num_items)
  if rows.size == 0:
    raise ValueError('fit_bpr: the histories hold no interactions')
  user_key, item_key, train_key = jax.random.split(key, 3)
  f = int(config.factors)
  params = {'users': _init(user_key, (len(histories), f), config.init_scale),
            'items': _init(item_key, (num_items, f), config.init_scale)}
  params, _ = _train_bpr(params, jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), train_key,
                         float(config.learning_rate), float(config.bpr_reg), num_items=num_items,
                         epochs=int(config.epochs), batch_size=int(min(config.batch_size, rows.size)))
  return params['users'], params['items']


def fit(histories: Sequence[np.ndarray], num_items: int, config, key) -> tuple[jax.Array, jax.Array]:
  """Dispatches on `config.model` (ials | bpr)."""
  fits = {'ials': fit_ials, 'bpr': fit_bpr}
  if config.model not in fits:
    raise ValueError(f'config.retriever.model={config.model!r}, expected one of {sorted(fits)}')
  return fits[config.model](histories, num_items, config, key)
