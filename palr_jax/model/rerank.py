"""Reranking a user's candidates with the LLM, on token ids: tag scores, constrained generation, likelihood.

The stage (palr_jax/stages/rank.py) renders and tokenizes prompts and candidates; these functions return,
per user, scores or an order over the candidates as given.

- `score_tags` (LlamaRec's verbalizer): one forward pass per prompt, each candidate scored by the
  log-probability of its one-token tag at the answer position.
- `generate_ranking` (the paper's way): the model writes items one after another, greedily, every token
  constrained by a prefix trie over the candidates' token ids, so each item written is a distinct
  candidate; `generate_scores` turns what was written into scores whose ties are the arbitrary choices.
- `score_continuations`: each candidate answer's log-likelihood after the prompt, all K in one forward
  where the prompt is a prefix that every candidate continues.

Ties count against the target (`pessimistic_rank`): a model that cannot tell the candidates apart ranks the
target last among them, never at the position the prompt happened to show it (an all-zero model would
otherwise score HR@5 = 5/K).

Batching, padding and placement are the decoder's (palr_jax/model/decode.py). Each takes an optional
`progress(n)`, called after every batch with the number of prompts it finished (the stage's progress bar).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import nnx
import numpy as np

from palr_jax import batching
from palr_jax.model import decode
from palr_jax.sharding import Placement

CACHE_ROUND = 64  # generation cache slots come in multiples of this: few distinct shapes, few compiles


# ---------------------------------------------------------------------------------- score mode


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
               buckets: Sequence[int], placement: Placement | None = None,
               progress: Callable[[int], None] | None = None,
               item_ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
  """Log-probability of each candidate's tag token at the answer position: float32 [N, K].

  `prompts[n]` ends where the answer starts (after the assistant header); `tag_token_ids[n][k]` is the
  one-token tag of user n's candidate k ([N, K] array, or ragged lists: a user with fewer candidates gets
  -inf past them). Rank with `order_from_scores`. `item_ids[n]` (as long as prompts[n], -1 = none): the item
  whose soft token replaces each placeholder (collaborative item tokens; the model has a projector).
  """
  vocab = model.config.vocab_size
  prompts = decode.token_rows(prompts, vocab, 'rank: prompts')
  tags = _ragged(tag_token_ids, 'tag_token_ids', -1)
  if len(tags) != len(prompts):
    raise ValueError(f'rank: {len(prompts)} prompts but {len(tags)} rows of tag_token_ids')
  if item_ids is not None and [len(r) for r in item_ids] != [len(p) for p in prompts]:
    raise ValueError('rank: item_ids must have one row per prompt, as long as it')
  if tags.size and (tags.max() >= vocab or (tags < -1).any()):
    raise ValueError(f'rank: tag_token_ids must lie in [0, {vocab})')
  placement = placement or Placement()
  placement.check_batch(batch_size, 'config.rank.batch_size')
  graphdef, state = decode.eval_split(model)
  out = np.full(tags.shape, -np.inf, np.float32)
  for rows, ids, positions, segments in batching.left_padded_batches(prompts, batch_size, buckets):
    batch_tags = np.full((batch_size, tags.shape[1]), -1, np.int32)
    batch_tags[:len(rows)] = tags[rows]
    items = None
    if item_ids is not None:   # left-padded like the prompts
      items = np.full(ids.shape, -1, np.int32)
      for b, n in enumerate(rows):
        items[b, ids.shape[1] - len(item_ids[n]):] = item_ids[n]
      items = placement.put(items)
    scores = decode.last_token_logprobs(graphdef, state, *map(placement.put, (ids, positions, segments,
                                                                               batch_tags)), items)
    out[rows] = placement.to_host(scores)[:len(rows)]
    if progress is not None:
      progress(len(rows))
  return out


def order_from_scores(scores: np.ndarray) -> list[np.ndarray]:
  """Candidate indices by descending score per user; ties keep the given (retriever) order, -inf
  (absent) dropped. The order is what is written out; a target's rank is `pessimistic_rank`, not its
  place here."""
  scores = np.asarray(scores)
  return [row_order[np.isfinite(row[row_order])]
          for row, row_order in zip(scores, np.argsort(-scores, axis=-1, kind='stable'))]


# Scores closer than this (relative) are equal: float32 sums of equal per-token log-probabilities differ
# in their last bits (a constant model's mean log-likelihoods), which is rounding, not a preference.
TIE_RTOL = 1e-5


def pessimistic_rank(scores, target: int) -> int:
  """0-based rank of candidate `target` among one user's `scores` [K]: the number of other candidates
  scoring at least its score, within `TIE_RTOL` (-inf, no score, ties with every other -inf)."""
  scores = np.asarray(scores, np.float64)
  s = scores[target]
  return int(np.sum(scores >= s - TIE_RTOL * max(1.0, abs(s)) if np.isfinite(s) else scores >= s)) - 1


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
    self.ties: dict[int, set[int]] = {}  # position -> candidates the model could as well have written there

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

  def feed(self, token: int, tied: Sequence[int] = ()) -> list[int]:
    """Takes the model's pick (`tied`: the allowed tokens whose logit equals the pick's), then every token
    that has no alternative (the rest of a tagged item, the separator); returns those tokens, which the
    model must read before its next pick ([] once done)."""
    self._note_ties(token, tied)
    chunk = [token]
    self.advance(token)
    while not self.done and len(allowed := self.allowed()) == 1:
      chunk.append(allowed[0])
      self.advance(allowed[0])
    return [] if self.done else chunk

  def _note_ties(self, token: int, tied: Sequence[int]) -> None:
    """The candidates another tied token leads to could as well be the item being written."""
    children = self._live_children(self.node)
    for other in tied:
      if other == token:
        continue
      child = children.get(other)
      alternatives = self.trie.through[child] if child is not None else self.trie.ending[self.node]
      self.ties.setdefault(len(self.order), set()).update(self._unwritten(alternatives))

  def scores(self, num: int) -> np.ndarray:
    """float64 [num]: minus the position each candidate was written at, -inf for the unwritten, where an
    item written by an arbitrary choice (a tie) shares the score of the last item it could have been
    swapped with, and so does every item written between them (the unwritten: -inf). So a target's
    `pessimistic_rank` is never better than its position, and a model that ties everywhere ranks every
    candidate last."""
    written = len(self.order)
    position = {k: p for p, k in enumerate(self.order)}
    out = np.full(num, -np.inf)

    def close(start, end):  # the run of positions [start, end] shares the score of its last
      if end < written:
        out[self.order[start:end + 1]] = -float(end)

    start, end = 0, -1
    for p in range(written):
      if p > end:
        close(start, end)
        start = p
      end = max(end, p, *(position.get(k, written) for k in self.ties.get(p, ())))
    close(start, end)
    return out

  def _complete(self, separator_left: list[int]) -> None:
    self.order.append(self._unwritten(self.trie.ending[self.node])[0])
    self.node = 0
    self.pending = [] if self.done else list(separator_left)


def _tied_tokens(allowed: np.ndarray, tied: np.ndarray) -> list[list[int]]:
  return [row[mask].tolist() for row, mask in zip(allowed, tied)]


def _allowed_array(decoders: list[_Decoder], width: int) -> np.ndarray:
  out = np.full((len(decoders), width), -1, np.int32)
  for b, decoder in enumerate(decoders):
    if not decoder.done:
      tokens = decoder.allowed()
      out[b, :len(tokens)] = tokens
  return out


def generate_ranking(model: nnx.Module, prompts: Sequence[Sequence[int]],
                     candidates: Sequence[Sequence[Sequence[int]]], *, separator: Sequence[int],
                     max_items: int, batch_size: int, buckets: Sequence[int],
                     placement: Placement | None = None,
                     progress: Callable[[int], None] | None = None) -> list[list[int]]:
  """Candidate indices in the order the model writes them, up to `max_items` distinct ones per user
  (`_generate`)."""
  return [d.order for d in _generate(model, prompts, candidates, separator=separator, max_items=max_items,
                                     batch_size=batch_size, buckets=buckets, placement=placement,
                                     progress=progress)]


def generate_scores(model: nnx.Module, prompts: Sequence[Sequence[int]],
                    candidates: Sequence[Sequence[Sequence[int]]], *, separator: Sequence[int],
                    max_items: int, batch_size: int, buckets: Sequence[int],
                    placement: Placement | None = None,
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
  """What `generate_ranking` writes, as float64 [N, K_max] scores: minus the position written at, -inf
  for the unwritten, items written by a tied (arbitrary) choice sharing a score (`_Decoder.scores`)."""
  decoders = _generate(model, prompts, candidates, separator=separator, max_items=max_items,
                       batch_size=batch_size, buckets=buckets, placement=placement, progress=progress)
  width = max((len(c) for c in candidates), default=0)
  return np.stack([d.scores(width) for d in decoders]) if decoders else np.zeros((0, width))


def _generate(model: nnx.Module, prompts: Sequence[Sequence[int]],
              candidates: Sequence[Sequence[Sequence[int]]], *, separator: Sequence[int],
              max_items: int, batch_size: int, buckets: Sequence[int],
              placement: Placement | None = None,
              progress: Callable[[int], None] | None = None) -> list[_Decoder]:
  """Each user's decoder after writing up to `max_items` distinct candidates (its `order`, its `ties`).

  `candidates[n][k]` are the token ids user n's candidate k is written as (tag + title for PALR v2,
  title alone for v1), tokenized as they appear in a response; `separator` (non-empty) is written between
  items. Greedy: at every token with alternatives the model picks the argmax among the tokens the trie
  of unwritten candidates allows; tokens without alternatives (the rest of a tagged item, the separator)
  are fed to the KV cache in one chunk with the pick, so a batch takes one model call per choice, not
  per token.
  """
  vocab = model.config.vocab_size
  prompts = decode.token_rows(prompts, vocab, 'rank: prompts')
  if len(candidates) != len(prompts):
    raise ValueError(f'rank: {len(prompts)} prompts but {len(candidates)} candidate lists')
  candidates = [decode.token_rows(c, vocab, f'rank: candidates[{n}]') for n, c in enumerate(candidates)]
  separator = [int(t) for t in separator]
  if not separator or min(separator) < 0 or max(separator) >= vocab:
    raise ValueError(f'rank: separator must be non-empty token ids in [0, {vocab}), got {separator}')
  if max_items < 1:
    raise ValueError(f'config.rank.max_items must be >= 1, got {max_items}')
  placement = placement or Placement()
  placement.check_batch(batch_size, 'config.rank.batch_size')
  graphdef, state = decode.eval_split(model)
  width = max(len(c) for c in candidates) + 1 if candidates else 1  # live children + "ends here"
  out: list[_Decoder] = [_Decoder([], separator, max_items) for _ in prompts]
  for rows, ids, positions, segments in batching.left_padded_batches(prompts, batch_size, buckets):
    decoders = [_Decoder(candidates[n], separator, max_items) for n in rows]
    decoders += [_Decoder([], separator, max_items) for _ in range(batch_size - len(rows))]
    cache_len = ids.shape[1] + decode.round_up(max(d.max_tokens for d in decoders), CACHE_ROUND)
    end, next_position = ids.shape[1], segments.sum(axis=1).astype(np.int32)
    allowed = _allowed_array(decoders, width)
    (token, tied), cache = decode.prefill(graphdef, placement, cache_len, state,
                                          *map(placement.put, (ids, positions, segments, allowed)))
    while True:
      token, tied = placement.to_host(token), _tied_tokens(allowed, placement.to_host(tied))
      chunks = [[] if d.done else d.feed(int(t), ties) for d, t, ties in zip(decoders, token, tied)]
      lengths = np.array([len(c) for c in chunks], np.int32)
      if not lengths.any():
        break
      size = 1 << int(lengths.max() - 1).bit_length()  # power-of-two chunk widths: few compiles
      if end + size > cache_len:  # chunks padded to a common width can outgrow the token budget
        extra = decode.round_up(max(size, cache_len - ids.shape[1]), CACHE_ROUND)
        cache, cache_len = decode.grow_cache(cache, extra), cache_len + extra
      tokens, chunk_segments = np.zeros((2, batch_size, size), np.int32)
      for b, chunk in enumerate(chunks):
        tokens[b, :len(chunk)], chunk_segments[b, :len(chunk)] = chunk, 1
      chunk_positions = next_position[:, None] + np.arange(size, dtype=np.int32)
      allowed = _allowed_array(decoders, width)
      (token, tied), cache = decode.decode_chunk(
          graphdef, state, cache,
          *map(placement.put, (tokens, chunk_positions, chunk_segments, np.maximum(lengths - 1, 0), allowed)))
      end, next_position = end + size, next_position + lengths
    for b, n in enumerate(rows):
      out[n] = decoders[b]
    if progress is not None:
      progress(len(rows))
  return out


# ----------------------------------------------------------------------------- likelihood mode


def score_continuations(model: nnx.Module, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[Sequence[int]]], *, reduce: str,
                        batch_size: int, buckets: Sequence[int], placement: Placement | None = None,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
  """Log-likelihood of each candidate's tokens after the prompt: float32 [N, K_max].

  `reduce` is 'sum' (log p of the whole answer) or 'mean' (per token, less biased against long titles);
  users with fewer candidates get -inf past them. Each prompt is encoded once, in the same forward as its K
  continuations (`decode.continuation_logprobs`).
  """
  if reduce not in ('sum', 'mean'):
    raise ValueError(f"config.rank.reduce must be 'sum' or 'mean', got {reduce!r}")
  vocab = model.config.vocab_size
  prompts = decode.token_rows(prompts, vocab, 'rank: prompts')
  if len(continuations) != len(prompts):
    raise ValueError(f'rank: {len(prompts)} prompts but {len(continuations)} continuation lists')
  continuations = [decode.token_rows(c, vocab, f'rank: continuations[{n}]') for n, c in enumerate(continuations)]
  num = max((len(c) for c in continuations), default=0)
  cont_len = decode.round_up(max((len(t) for c in continuations for t in c), default=1), 8)
  placement = placement or Placement()
  placement.check_batch(batch_size, 'config.rank.batch_size')
  graphdef, state = decode.eval_split(model)
  out = np.full((len(prompts), num), -np.inf, np.float32)
  for rows, ids, positions, segments in batching.left_padded_batches(prompts, batch_size, buckets):
    tokens = np.zeros((batch_size, num, cont_len), np.int32)
    lengths = np.zeros((batch_size, num), np.int32)
    for b, n in enumerate(rows):
      for k, t in enumerate(continuations[n]):
        tokens[b, k, :len(t)] = t
        lengths[b, k] = len(t)
    scores = decode.continuation_logprobs(graphdef, reduce == 'mean', state,
                                          *map(placement.put, (ids, positions, segments, tokens, lengths)))
    out[rows] = placement.to_host(scores)[:len(rows)]
    if progress is not None:
      progress(len(rows))
  return out
