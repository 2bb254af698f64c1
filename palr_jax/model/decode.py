"""The one decoder: prefill, free and chunked decoding with the KV cache, and scoring, jitted per shape.

Every entry point takes token ids (the model knows no text), batches them with the one length policy
(`palr_jax.batching`: fixed batch size, prompts left-padded to a length bucket, so the last column is
every row's last prompt token and each bucket compiles once) and runs the model in eval mode (LoRA
dropout off) without changing the caller's model. With a `Placement` on a mesh, batch rows are split
over the rules' batch axes and KV caches like the batch and the weights.

- `generate`: free decoding (greedy or temperature / top-p sampling) until EOS or `max_new_tokens`, one
  `lax.while_loop` of one-token steps after the prefill (profiles, the generate tool).
- `prefill` / `decode_chunk` / `grow_cache`: the pieces of constrained decoding (model/rerank.py), where
  the host picks what may come next and several forced tokens are fed at once.
- `last_token_logprobs`: log-softmax at the answer position, one forward (tag scores).
- `continuation_logprobs`: log p(continuation | prompt) of K continuations per prompt in one forward, the
  prompt a shared prefix that every continuation extends (likelihood ranking).
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from palr_jax import batching
from palr_jax.model import llama
from palr_jax.sharding import Placement

CACHE_AXES = ('batch', 'length', 'kv_heads', 'head_dim')


def eval_split(model: nnx.Module):
  """(graphdef, state) of an eval-mode view: dropout off, the caller's module untouched."""
  return nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))


def token_rows(rows, vocab_size: int, what: str) -> list[np.ndarray]:
  """Validates non-empty 1-D token id sequences within the vocabulary."""
  out = []
  for n, row in enumerate(rows):
    row = np.asarray(row)
    if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f'{what}[{n}] must be a non-empty 1-D sequence of token ids, got {row!r}')
    if row.min() < 0 or row.max() >= vocab_size:
      raise ValueError(f'{what}[{n}] has token ids outside [0, {vocab_size})')
    out.append(row.astype(np.int32))
  return out


def round_up(n: int, multiple: int) -> int:
  return -(-max(n, 1) // multiple) * multiple


def empty_cache(model, placement: Placement, batch: int, length: int) -> llama.KVCache:
  """A KV cache (inside jit) whose rows are split like the batch and whose kv heads like the weights."""
  cache = llama.init_cache(model.config, batch, length)
  return dataclasses.replace(
      cache, k=tuple(placement.constrain(k, CACHE_AXES) for k in cache.k),
      v=tuple(placement.constrain(v, CACHE_AXES) for v in cache.v),
      segment_ids=placement.constrain(cache.segment_ids, ('batch', 'length')))


def _last_column(ids: jax.Array) -> jax.Array:
  return jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32)


# ------------------------------------------------------------------------------------ free decoding


def sample_token(logits: jax.Array, rng: jax.Array, *, temperature, top_p) -> jax.Array:
  """Draws from softmax(logits / temperature) restricted to the top-p nucleus (HF semantics: the
  smallest set of most likely tokens whose mass reaches top_p; the most likely token is always kept).

  logits [B, V] -> int32 [B].
  """
  logits = logits.astype(jnp.float32) / temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
  choice = jax.random.categorical(rng, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'placement', 'max_new_tokens', 'sample'))
def _generate(graphdef, state, ids, positions, segments, eos, pad_id, temperature, top_p, rng, *,
              placement, max_new_tokens: int, sample: bool):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = ids.shape

  def choose(logits, key):
    if sample:
      return sample_token(logits, key, temperature=temperature, top_p=top_p)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  cache = empty_cache(model, placement, batch, prompt_len + max_new_tokens)
  logits, cache = model(ids, positions, segments, cache=cache, logits_at=_last_column(ids))
  rng, key = jax.random.split(rng)
  token = choose(logits[:, 0], key)
  empty = jnp.sum(segments, axis=1) == 0
  token = jnp.where(empty, pad_id, token)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos) | empty
  position = positions[:, -1] + 1

  def cond(carry):
    step, _, done, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, out, done, token, position, cache, rng = carry
    logits, cache = model(token[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache)
    rng, key = jax.random.split(rng)
    token = jnp.where(done, pad_id, choose(logits[:, 0], key))
    out = out.at[:, step].set(token)
    return step + 1, out, done | jnp.isin(token, eos), token, position + 1, cache, rng

  _, out, *_ = jax.lax.while_loop(cond, body, (1, out, done, token, position, cache, rng))
  return out


def generate(model: llama.Llama, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_ids: int | Sequence[int], pad_id: int, buckets: Sequence[int], batch_size: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, rng: jax.Array | None = None,
             placement: Placement | None = None) -> list[list[int]]:
  """New tokens per prompt (in the order given): greedy when temperature == 0, else temperature / top-p
  sampling (needs rng). Each row stops after its first EOS (kept in the output) or at max_new_tokens.

  Prompts are batched `batch_size` at a time (default: all in one batch), longest first.
  """
  if not len(prompt_ids):
    raise ValueError('prompt_ids: empty batch')
  for i, p in enumerate(prompt_ids):
    if not len(p):
      raise ValueError(f'prompt_ids[{i}] is empty; every row needs at least one token')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f'need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}')
  sample = temperature > 0
  if sample and rng is None:
    raise ValueError('sampling (temperature > 0) needs an rng key')
  placement = placement or Placement()
  batch_size = batch_size or len(prompt_ids)
  placement.check_batch(batch_size, 'generate batch size')
  eos = np.atleast_1d(np.asarray(eos_ids, np.int32))
  stops = set(eos.tolist())
  graphdef, state = eval_split(model)
  rng = jax.random.key(0) if rng is None else rng
  results: list[list[int]] = [[] for _ in prompt_ids]
  prompts = [np.asarray(p, np.int32) for p in prompt_ids]
  for n, (rows, ids, positions, segments) in enumerate(batching.left_padded_batches(prompts, batch_size,
                                                                                   buckets)):
    out = placement.to_host(_generate(
        graphdef, state, *map(placement.put, (ids, positions, segments)), eos, np.int32(pad_id),
        np.float32(temperature or 1.0), np.float32(top_p), jax.random.fold_in(rng, n),
        placement=placement, max_new_tokens=max_new_tokens, sample=sample))
    for b, i in enumerate(rows):
      row = out[b].tolist()
      stop = next((j for j, t in enumerate(row) if t in stops), len(row) - 1)
      results[i] = row[:stop + 1]
  return results


# ------------------------------------------------------------------------------ constrained decoding


def pick(logits: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Greedy choice among the allowed token ids [B, W] (-1 = none): the token id [B], and which allowed
  tokens tie with it [B, W] (the same logit: the choice among them was arbitrary, see rerank)."""
  scores = jnp.where(allowed >= 0, jnp.take_along_axis(logits, jnp.maximum(allowed, 0), axis=-1), -jnp.inf)
  best = jnp.argmax(scores, axis=-1)
  tied = (allowed >= 0) & (scores == jnp.take_along_axis(scores, best[:, None], axis=-1))
  return jnp.take_along_axis(allowed, best[:, None], axis=-1)[:, 0], tied


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def prefill(graphdef, placement, cache_len, state, ids, positions, segments, allowed):
  """Encodes the prompts into a new cache of `cache_len` slots; the first pick among `allowed` (`pick`)."""
  model = nnx.merge(graphdef, state)
  cache = empty_cache(model, placement, ids.shape[0], cache_len)
  logits, cache = model(ids, positions, segments, cache=cache, logits_at=_last_column(ids))
  return pick(logits[:, 0], allowed), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_chunk(graphdef, state, cache, tokens, positions, segments, last, allowed):
  """Writes each row's chunk [B, C] (right-padded, segment 0) to the cache; picks after its last token."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, positions, segments, cache=cache, logits_at=last[:, None])
  return pick(logits[:, 0], allowed), cache


@functools.partial(jax.jit, static_argnums=1)
def grow_cache(cache, extra: int):
  """The cache with `extra` more (empty) slots."""
  pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  return dataclasses.replace(cache, k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)),
                             segment_ids=pad(cache.segment_ids))


# ------------------------------------------------------------------------------------------ scoring


@functools.partial(jax.jit, static_argnums=0)
def last_token_logprobs(graphdef, state, ids, positions, segments, tokens, item_ids=None):
  """log p(token | prompt) at the last column for each row's `tokens` [B, K] (-1 = none: -inf).
  `item_ids` [B, T]: collaborative item tokens (-1 = none; palr_jax/model/item_tokens.py)."""
  model = nnx.merge(graphdef, state)
  logits = model(ids, positions, segments, logits_at=_last_column(ids), item_ids=item_ids)[:, 0]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  scores = jnp.take_along_axis(logp, jnp.maximum(tokens, 0), axis=-1)
  return jnp.where(tokens >= 0, scores, -jnp.inf)


@functools.partial(jax.jit, static_argnums=(0, 1))
def continuation_logprobs(graphdef, mean, state, ids, positions, segments, continuations, lengths):
  """Sum (or mean) log p(continuation | prompt) [B, K]; continuations [B, K, L] right-padded.

  One forward per row laid out as [prompt | continuation 1 | ... | continuation K]: the prompt is a shared
  prefix (segment -1, `attention.attention_mask`) that every continuation sees, continuation k
  (segment k + 1) sees only itself beyond it, and each continues at the prompt's length. So the prompt is
  encoded once and the program is the layer scan of training and score mode: a KV cache would unroll every
  layer (twice), which compiles several times slower (bench/RESULTS.md, ":quick end to end").
  """
  model = nnx.merge(graphdef, state)
  batch, width = ids.shape
  num, cont_len = continuations.shape[1:]
  steps = jnp.arange(cont_len)
  inside = steps[None, None] < lengths[..., None]                                        # [B, K, L]
  prompt_len = jnp.sum(segments != 0, axis=1)
  row_ids = jnp.concatenate([ids, continuations.reshape(batch, -1)], axis=1)
  row_positions = jnp.concatenate(
      [positions, jnp.broadcast_to(prompt_len[:, None, None] + steps, (batch, num, cont_len)).reshape(batch, -1)],
      axis=1)
  answer_segments = jnp.where(inside, jnp.arange(1, num + 1)[None, :, None], 0).reshape(batch, -1)
  row_segments = jnp.concatenate([-(segments != 0).astype(jnp.int32), answer_segments], axis=1)
  # Token i of continuation k is predicted at the slot before it: for i = 0, the prompt's last.
  before = width + jnp.arange(num)[:, None] * cont_len + steps[None, :] - 1               # [K, L]
  before = jnp.where(steps[None, :] == 0, width - 1, before)
  hidden = model(row_ids, row_positions, row_segments, hidden=True,
                 logits_at=jnp.broadcast_to(before.reshape(-1), (batch, num * cont_len)))
  hidden = hidden.reshape(batch, num, cont_len, -1)

  def answer(k):  # one continuation's logits at a time: [B, L, V] alive, not [B, K, L, V]
    logp = jax.nn.log_softmax(model.head(hidden[:, k]).astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, continuations[:, k, :, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(inside[:, k], token_logp, 0.0), axis=-1)

  total = jax.lax.map(answer, jnp.arange(num)).T
  total = total / jnp.maximum(lengths, 1) if mean else total
  return jnp.where(lengths > 0, total, -jnp.inf)
