"""Ranks the retriever's candidates with the LLM: tag scores, constrained generation, or likelihood.

Everything here works on token ids, never on text: the prompt pipeline renders and tokenizes prompts and
candidates, the main job turns the orders returned here into ranks over the catalog (`full_ranking`,
`target_rank`).

- `score_tags` (PALR v2 and zero-shot; LlamaRec's verbalizer): one forward pass per prompt, each
  candidate scored by the log-probability of its one-token tag at the answer position.
- `generate_ranking` (the paper's way): the model writes items one after another, greedily, every token
  constrained by a prefix trie over the candidates' token ids, so each item written is a distinct
  candidate.
- `score_continuations` (PALR v1, which never saw tags): each candidate title's log-likelihood after the
  prompt; the prompt is encoded once into a KV cache that every candidate continues.

Prompts are sorted by length, batched with a fixed batch size (the last batch filled with empty rows) and
left-padded to the smallest length bucket that fits, so each bucket compiles once and the answer position
is the last column for every row. With a mesh, batches are sharded over the rules' `batch` axes.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from palr_jax import sharding as sharding_lib
from palr_jax.model.llama import init_cache

_CACHE_AXES = ('batch', 'length', 'kv_heads', 'head_dim')
_CACHE_ROUND = 64  # generation cache slots come in multiples of this: few distinct shapes, few compiles


# ------------------------------------------------------------------------------------ batching


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where batches live: a mesh and its logical-axis rules, or (mesh None) the default device."""
  mesh: Mesh | None
  rules: tuple

  def put(self, x: np.ndarray) -> jax.Array:
    """A host array [B, ...] on the devices, rows split over the batch axes (each process holds x)."""
    if self.mesh is None:
      return jnp.asarray(x)
    s = sharding_lib.batch_sharding(self.mesh, self.rules, ndim=x.ndim)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

  def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(
        x, sharding_lib.named_sharding(self.mesh, axes, x.shape, self.rules))


def _layout(mesh: Mesh | None, rules, batch_size: int) -> _Layout:
  if mesh is None:
    return _Layout(None, ())
  if rules is None:
    raise ValueError('rank: a mesh needs its logical-axis rules (config.mesh.rules)')
  rules = tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in rules)
  spec = sharding_lib.batch_sharding(mesh, rules).spec
  axes = () if not spec or spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
  shards = math.prod(mesh.shape[a] for a in axes)
  if batch_size % shards:
    raise ValueError(f'config.rank.batch_size={batch_size} must be a multiple of the {shards} batch '
                     f'shards of the mesh {dict(mesh.shape)}')
  return _Layout(mesh, rules)


def _to_host(x: jax.Array) -> np.ndarray:
  return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def _split(model: nnx.Module):
  """(graphdef, state) of the model with dropout switched off: LoRA dropout must not act while ranking."""
  return nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))


def _token_rows(rows, vocab_size: int, what: str) -> list[np.ndarray]:
  """Validates non-empty 1-D token id sequences within the vocabulary."""
  out = []
  for n, row in enumerate(rows):
    row = np.asarray(row)
    if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f'rank: {what}[{n}] must be a non-empty 1-D sequence of token ids, got {row!r}')
    if row.min() < 0 or row.max() >= vocab_size:
      raise ValueError(f'rank: {what}[{n}] has token ids outside [0, {vocab_size})')
    out.append(row.astype(np.int32))
  return out


def _bucket(length: int, buckets: Sequence[int]) -> int:
  fits = [b for b in sorted(buckets) if b >= length]
  if not fits:
    raise ValueError(f'rank: a prompt of {length} tokens exceeds the largest length bucket '
                     f'{max(buckets)} (config.rank.buckets)')
  return fits[0]


def _batches(prompts: list[np.ndarray], batch_size: int, buckets: Sequence[int]):
  """Yields (indices into prompts, ids, positions, segment_ids), left-padded to a length bucket.

  Rows past len(indices) are empty (segment 0 throughout) so every batch has `batch_size` rows.
  """
  if batch_size < 1:
    raise ValueError(f'config.rank.batch_size must be >= 1, got {batch_size}')
  lengths = np.array([len(p) for p in prompts])
  order = np.argsort(-lengths, kind='stable')
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = _bucket(int(lengths[rows].max()), buckets)
    ids = np.zeros((batch_size, width), np.int32)
    positions = np.zeros((batch_size, width), np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for b, n in enumerate(rows):
      length = lengths[n]
      ids[b, width - length:] = prompts[n]
      positions[b, width - length:] = np.arange(length)
      segments[b, width - length:] = 1
    yield rows, ids, positions, segments


def _round_up(n: int, multiple: int) -> int:
  return -(-max(n, 1) // multiple) * multiple


def _empty_cache(model, layout: _Layout, batch: int, length: int):
  """A KV cache (inside jit) whose rows are split like the batch and whose kv heads like the weights."""
  cache = init_cache(model.config, batch, length)
  return dataclasses.replace(
      cache, k=tuple(layout.constrain(k, _CACHE_AXES) for k in cache.k),
      v=tuple(layout.constrain(v, _CACHE_AXES) for v in cache.v),
      segment_ids=layout.constrain(cache.segment_ids, ('batch', 'length')))


def _last_column(ids: jax.Array) -> jax.Array:
  return jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)


# ---------------------------------------------------------------------------------- score mode


@functools.partial(jax.jit, static_argnums=0)
def _tag_logprobs(graphdef, state, ids, positions, segments, tags):
  model = nnx.merge(graphdef, state)
  logits = model(ids, positions, segments, logits_at=_last_column(ids))[:, 0]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  scores = jnp.take_along_axis(logp, jnp.maximum(tags, 0), axis=-1)
  return jnp.where(tags >= 0, scores, -jnp.inf)


def _ragged(rows, what: str, fill) -> np.ndarray:
  """list[list[int]] (or an [N, K] array) -> [N, K_max] int32, `fill` after each row's end."""
  rows = [np.asarray(r, np.int64).reshape(-1) for r in rows]
  out = np.full((len(rows), max((len(r) for r in rows), default=0)), fill, np.int64)
  for n, r in enumerate(rows):
    out[n, :len(r)] = r
  if out.size and out.max() > np.iinfo(np.int32).max:
    raise ValueError(f'rank: {what} has ids beyond int32')
  return out.astype(np.int32)


def score_tags(model: nnx.Module, prompts: Sequence[Sequence[int]], tag_token_ids, *, batch_size: int,
               buckets: Sequence[int], mesh: Mesh | None = None, rules=None) -> np.ndarray:
  """Log-probability of each candidate's tag token at the answer position: float32 [N, K].

  `prompts[n]` ends where the answer starts (after the assistant header); `tag_token_ids[n][k]` is the
  one-token tag of user n's candidate k ([N, K] array, or ragged lists: a user with fewer candidates gets
  -inf past them). Rank with `order_from_scores`.
  """
  vocab = model.config.vocab_size
  prompts = _token_rows(prompts, vocab, 'prompts')
  tags = _ragged(tag_token_ids, 'tag_token_ids', -1)
  if len(tags) != len(prompts):
    raise ValueError(f'rank: {len(prompts)} prompts but {len(tags)} rows of tag_token_ids')
  if tags.size and (tags.max() >= vocab or (tags < -1).any()):
    raise ValueError(f'rank: tag_token_ids must lie in [0, {vocab})')
  layout = _layout(mesh, rules, batch_size)
  graphdef, state = _split(model)
  out = np.full(tags.shape, -np.inf, np.float32)
  for rows, ids, positions, segments in _batches(prompts, batch_size, buckets):
    batch_tags = np.full((batch_size, tags.shape[1]), -1, np.int32)
    batch_tags[:len(rows)] = tags[rows]
    scores = _tag_logprobs(graphdef, state, *map(layout.put, (ids, positions, segments, batch_tags)))
    out[rows] = _to_host(scores)[:len(rows)]
  return out


def order_from_scores(scores: np.ndarray) -> list[np.ndarray]:
  """Candidate indices by descending score per user; ties keep retriever order, -inf (absent) dropped."""
  scores = np.asarray(scores)
  return [row_order[np.isfinite(row[row_order])]
          for row, row_order in zip(scores, np.argsort(-scores, axis=-1, kind='stable'))]


# ------------------------------------------------------------------------------- generate mode


class _Trie:
  """Prefix tree over the candidates' token sequences; node 0 is the root."""

  def __init__(self, sequences: Sequence[np.ndarray]):
    self.children: list[dict[int, int]] = [{}]
    self.ending: list[list[int]] = [[]]   # candidates whose sequence ends at the node
    self.through: list[list[int]] = [[]]  # candidates whose sequence passes through or ends at it
    for k, sequence in enumerate(sequences):
      node = 0
      self.through[0].append(k)
      for token in sequence.tolist():
        child = self.children[node].get(token)
        if child is None:
          child = len(self.children)
          self.children[node][token] = child
          self.children.append({})
          self.ending.append([])
          self.through.append([])
        node = child
        self.through[node].append(k)
      self.ending[node].append(k)


class _Decoder:
  """One user's constrained greedy decoding: which tokens may come next, and the items written so far.

  An item ends when its last token is written and nothing unwritten continues it; where a longer
  candidate does continue it, the separator's first token is the "ends here" choice (unless a
  continuation starts with that token: then the longer one is written). Identical token
  sequences (duplicate titles) are written once per candidate, first by candidate order. Between items
  the separator is written, after the last one nothing.
  """

  def __init__(self, candidates: Sequence[np.ndarray], separator: Sequence[int], max_items: int):
    self.trie = _Trie(candidates)
    self.separator = list(separator)
    self.limit = min(max_items, len(candidates))
    lengths = sorted((len(c) for c in candidates), reverse=True)[:self.limit]
    self.max_tokens = sum(lengths) + max(self.limit - 1, 0) * len(self.separator)
    self.order: list[int] = []
    self.node = 0
    self.pending: list[int] = []  # separator tokens still to write

  @property
  def done(self) -> bool:
    return len(self.order) == self.limit

  def _unwritten(self, candidates: list[int]) -> list[int]:
    return [k for k in candidates if k not in self.order]

  def _live_children(self, node: int) -> dict[int, int]:
    return {t: c for t, c in self.trie.children[node].items() if self._unwritten(self.trie.through[c])}

  def allowed(self) -> list[int]:
    if self.pending:
      return self.pending[:1]
    tokens = list(self._live_children(self.node))
    if self._unwritten(self.trie.ending[self.node]) and self.separator[0] not in tokens:
      tokens.append(self.separator[0])
    return tokens

  def advance(self, token: int) -> None:
    if self.pending:
      self.pending.pop(0)
      return
    child = self._live_children(self.node).get(token)
    if child is None:  # the separator: the item ends at this node
      self._complete(self.separator[1:])
      return
    self.node = child
    if not self._live_children(child):
      self._complete(self.separator)

  def feed(self, token: int) -> list[int]:
    """Takes the model's pick, then every token that has no alternative (the rest of a tagged item, the
    separator); returns those tokens, which the model must read before its next pick ([] once done)."""
    chunk = [token]
    self.advance(token)
    while not self.done and len(allowed := self.allowed()) == 1:
      chunk.append(allowed[0])
      self.advance(allowed[0])
    return [] if self.done else chunk

  def _complete(self, separator_left: list[int]) -> None:
    self.order.append(self._unwritten(self.trie.ending[self.node])[0])
    self.node = 0
    self.pending = [] if self.done else list(separator_left)


def _pick(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """Greedy choice among the allowed token ids [B, W] (-1 = none): the token id [B]."""
  scores = jnp.take_along_axis(logits, jnp.maximum(allowed, 0), axis=-1)
  best = jnp.argmax(jnp.where(allowed >= 0, scores, -jnp.inf), axis=-1)
  return jnp.take_along_axis(allowed, best[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefill(graphdef, layout, cache_len, state, ids, positions, segments, allowed):
  model = nnx.merge(graphdef, state)
  cache = _empty_cache(model, layout, ids.shape[0], cache_len)
  logits, cache = model(ids, positions, segments, cache=cache, logits_at=_last_column(ids))
  return _pick(logits[:, 0], allowed), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode_chunk(graphdef, state, cache, tokens, positions, segments, last, allowed):
  """Writes each row's chunk [B, C] (right-padded, segment 0) to the cache; picks after its last token."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, positions, segments, cache=cache, logits_at=last[:, None])
  return _pick(logits[:, 0], allowed), cache


@functools.partial(jax.jit, static_argnums=1)
def _grow_cache(cache, extra: int):
  """The cache with `extra` more (empty) slots."""
  pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  return dataclasses.replace(cache, k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                             segment_ids=pad(cache.segment_ids))


def _allowed_array(decoders: list[_Decoder], width: int) -> np.ndarray:
  out = np.full((len(decoders), width), -1, np.int32)
  for b, decoder in enumerate(decoders):
    if not decoder.done:
      tokens = decoder.allowed()
      out[b, :len(tokens)] = tokens
  return out


def generate_ranking(model: nnx.Module, prompts: Sequence[Sequence[int]],
                     candidates: Sequence[Sequence[Sequence[int]]], *, separator: Sequence[int],
                     max_items: int, batch_size: int, buckets: Sequence[int], mesh: Mesh | None = None,
                     rules=None) -> list[list[int]]:
  """Candidate indices in the order the model writes them, up to `max_items` distinct ones per user.

  `candidates[n][k]` are the token ids user n's candidate k is written as (tag + title for PALR v2,
  title alone for v1), tokenized as they appear in a response; `separator` (non-empty) is written between
  items. Greedy: at every token with alternatives the model picks the argmax among the tokens the trie
  of unwritten candidates allows; tokens without alternatives (the rest of a tagged item, the separator)
  are fed to the KV cache in one chunk with the pick, so a batch takes one model call per choice, not
  per token.
  """
  vocab = model.config.vocab_size
  prompts = _token_rows(prompts, vocab, 'prompts')
  if len(candidates) != len(prompts):
    raise ValueError(f'rank: {len(prompts)} prompts but {len(candidates)} candidate lists')
  candidates = [_token_rows(c, vocab, f'candidates[{n}]') for n, c in enumerate(candidates)]
  separator = [int(t) for t in separator]
  if not separator or min(separator) < 0 or max(separator) >= vocab:
    raise ValueError(f'rank: separator must be non-empty token ids in [0, {vocab}), got {separator}')
  if max_items < 1:
    raise ValueError(f'config.rank.max_items must be >= 1, got {max_items}')
  layout = _layout(mesh, rules, batch_size)
  graphdef, state = _split(model)
  width = max(len(c) for c in candidates) + 1 if candidates else 1  # live children + "ends here"
  out: list[list[int]] = [[] for _ in prompts]
  for rows, ids, positions, segments in _batches(prompts, batch_size, buckets):
    decoders = [_Decoder(candidates[n], separator, max_items) for n in rows]
    decoders += [_Decoder([], separator, max_items) for _ in range(batch_size - len(rows))]
    cache_len = ids.shape[1] + _round_up(max(d.max_tokens for d in decoders), _CACHE_ROUND)
    end, next_position = ids.shape[1], segments.sum(axis=1).astype(np.int32)
    token, cache = _prefill(graphdef, layout, cache_len, state,
                            *map(layout.put, (ids, positions, segments,
                                              _allowed_array(decoders, width))))
    while True:
      token = _to_host(token)
      chunks = [[] if d.done else d.feed(int(t)) for d, t in zip(decoders, token)]
      lengths = np.array([len(c) for c in chunks], np.int32)
      if not lengths.any():
        break
      size = 1 << int(lengths.max() - 1).bit_length()  # power-of-two chunk widths: few compiles
      if end + size > cache_len:  # chunks padded to a common width can outgrow the token budget
        extra = _round_up(max(size, cache_len - ids.shape[1]), _CACHE_ROUND)
        cache, cache_len = _grow_cache(cache, extra), cache_len + extra
      tokens, chunk_segments = np.zeros((2, batch_size, size), np.int32)
      for b, chunk in enumerate(chunks):
        tokens[b, :len(chunk)], chunk_segments[b, :len(chunk)] = chunk, 1
      chunk_positions = next_position[:, None] + np.arange(size, dtype=np.int32)
      token, cache = _decode_chunk(
          graphdef, state, cache,
          *map(layout.put, (tokens, chunk_positions, chunk_segments, np.maximum(lengths - 1, 0),
                            _allowed_array(decoders, width))))
      end, next_position = end + size, next_position + lengths
    for b, n in enumerate(rows):
      out[n] = decoders[b].order
  return out


# ----------------------------------------------------------------------------- likelihood mode


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _continuation_logprobs(graphdef, layout, mean, state, ids, positions, segments, continuations,
                           lengths):
  """Sum (or mean) log p(continuation | prompt) [B, K]; continuations [B, K, L] right-padded."""
  model = nnx.merge(graphdef, state)
  batch, width = ids.shape
  num, cont_len = continuations.shape[1:]
  cache = _empty_cache(model, layout, batch, width + cont_len)
  logits, cache = model(ids, positions, segments, cache=cache, logits_at=_last_column(ids))
  first = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 0], axis=-1), continuations[:, :, 0], axis=-1)
  prompt_len = segments.sum(axis=1)
  steps = jnp.arange(cont_len)

  def rest(k):  # tokens 1.. of every user's k-th continuation, continuing the shared prompt cache
    tokens, length = continuations[:, k], lengths[:, k]
    inside = (steps[None] < length[:, None]).astype(jnp.int32)
    logits, _ = model(tokens, prompt_len[:, None] + steps[None], inside, cache=cache)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(inside[:, 1:] > 0, token_logp, 0.0), axis=-1)

  total = first + jax.lax.map(rest, jnp.arange(num)).T
  total = total / jnp.maximum(lengths, 1) if mean else total
  return jnp.where(lengths > 0, total, -jnp.inf)


def score_continuations(model: nnx.Module, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[Sequence[int]]], *, reduce: str,
                        batch_size: int, buckets: Sequence[int], mesh: Mesh | None = None,
                        rules=None) -> np.ndarray:
  """Log-likelihood of each candidate's tokens after the prompt: float32 [N, K_max].

  `reduce` is 'sum' (log p of the whole title) or 'mean' (per token, less biased against long titles);
  users with fewer candidates get -inf past them. Each prompt is encoded once; the K continuations of a
  batch run one after another over that shared cache.
  """
  if reduce not in ('sum', 'mean'):
    raise ValueError(f"config.rank.reduce must be 'sum' or 'mean', got {reduce!r}")
  vocab = model.config.vocab_size
  prompts = _token_rows(prompts, vocab, 'prompts')
  if len(continuations) != len(prompts):
    raise ValueError(f'rank: {len(prompts)} prompts but {len(continuations)} continuation lists')
  continuations = [_token_rows(c, vocab, f'continuations[{n}]') for n, c in enumerate(continuations)]
  num = max((len(c) for c in continuations), default=0)
  cont_len = _round_up(max((len(t) for c in continuations for t in c), default=1), 8)
  layout = _layout(mesh, rules, batch_size)
  graphdef, state = _split(model)
  out = np.full((len(prompts), num), -np.inf, np.float32)
  for rows, ids, positions, segments in _batches(prompts, batch_size, buckets):
    tokens = np.zeros((batch_size, num, cont_len), np.int32)
    lengths = np.zeros((batch_size, num), np.int32)
    for b, n in enumerate(rows):
      for k, t in enumerate(continuations[n]):
        tokens[b, k, :len(t)] = t
        lengths[b, k] = len(t)
    scores = _continuation_logprobs(graphdef, layout, reduce == 'mean', state,
                                    *map(layout.put, (ids, positions, segments, tokens, lengths)))
    out[rows] = _to_host(scores)[:len(rows)]
  return out


# ------------------------------------------------------------------------ ranks over the catalog


def _check_order(candidate_items: np.ndarray, candidate_order) -> np.ndarray:
  order = np.asarray(candidate_order, np.int64).reshape(-1)
  if len(np.unique(candidate_items)) != len(candidate_items):
    raise ValueError(f'rank: candidate items are not distinct: {candidate_items.tolist()}')
  if order.size and (order.min() < 0 or order.max() >= len(candidate_items)
                     or len(np.unique(order)) != len(order)):
    raise ValueError(f'rank: candidate order {order.tolist()} must be distinct indices into '
                     f'{len(candidate_items)} candidates')
  return order


def full_ranking(candidate_items, candidate_order, retriever_ranking) -> np.ndarray:
  """Item ids best first: the ranked candidates, the candidates the LLM left out (retriever order),
  then the rest of the retriever's ranking, so metrics are over the whole catalog.

  `candidate_order` indexes `candidate_items` (retriever order) and may be partial (generate mode
  writes at most `max_items`).
  """
  items = np.asarray(candidate_items, np.int64).reshape(-1)
  order = _check_order(items, candidate_order)
  left_out = np.setdiff1d(np.arange(len(items)), order)  # sorted: retriever order
  head = items[np.concatenate([order, left_out]).astype(np.int64)]
  tail = np.asarray(retriever_ranking, np.int64).reshape(-1)
  return np.concatenate([head, tail[~np.isin(tail, items)]])


def target_rank(candidate_items, candidate_order, target: int, retriever_rank: int) -> int:
  """0-based rank of the target in `full_ranking`: its place among the reranked candidates, or, when the
  retriever missed it, its retriever rank (items before it: the K candidates, then the same others)."""
  items = np.asarray(candidate_items, np.int64).reshape(-1)
  order = _check_order(items, candidate_order)
  hit = np.flatnonzero(items == target)
  if hit.size:
    left_out = np.setdiff1d(np.arange(len(items)), order)
    return int(np.flatnonzero(np.concatenate([order, left_out]) == hit[0])[0])
  if retriever_rank < len(items):
    raise ValueError(f'rank: target {target} has retriever rank {retriever_rank} < {len(items)} but is '
                     f'not among the candidates {items.tolist()}')
  return int(retriever_rank)
