"""Batched decoding and scoring with the KV cache, jitted once per (batch, prompt bucket, max_new_tokens).

Prompts are left-padded to a bucketed length (`bucket_length`) so that a new prompt length rarely
recompiles. `generate` prefills the cache with the whole prompt, then runs a `lax.while_loop` of
one-token steps that stops when every row has produced an EOS or `max_new_tokens` tokens. `score` is the
log-likelihood of given continuations in one forward pass (candidate ranking).
Both run the model in eval mode (LoRA dropout off) without changing the caller's model.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from palr_jax.model import llama


def bucket_length(n: int) -> int:
  """Next power of two >= max(n, 16) up to 512, then the next multiple of 256 (bounded padding)."""
  if n <= 512:
    return max(16, 1 << (max(n, 1) - 1).bit_length())
  return -(-n // 256) * 256


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


def _left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  ids = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  positions = np.zeros((len(prompts), length), np.int32)
  for b, p in enumerate(prompts):
    if len(p):
      ids[b, length - len(p):] = p
      segments[b, length - len(p):] = 1
      positions[b, length - len(p):] = np.arange(len(p))
  return ids, positions, segments


def _check_prompts(prompts, what='prompt_ids'):
  if not len(prompts):
    raise ValueError(f'{what}: empty batch')
  for i, p in enumerate(prompts):
    if not len(p):
      raise ValueError(f'{what}[{i}] is empty; every row needs at least one token')


def _eval_split(model: nnx.Module):
  """(graphdef, state) of an eval-mode view: dropout off, the caller's module untouched."""
  return nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'sample'))
def _generate(graphdef, state, ids, positions, segments, eos, pad_id, temperature, top_p, rng, *,
              max_new_tokens: int, sample: bool):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = ids.shape

  def choose(logits, key):
    if sample:
      return sample_token(logits, key, temperature=temperature, top_p=top_p)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  cache = llama.init_cache(model.config, batch, prompt_len + max_new_tokens)
  last = jnp.full((batch, 1), prompt_len - 1, jnp.int32)
  logits, cache = model(ids, positions, segments, cache=cache, logits_at=last)
  rng, key = jax.random.split(rng)
  token = choose(logits[:, 0], key)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)
  position = positions[:, -1] + 1

  def cond(carry):
    step, _, done, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, out, done, token, position, cache, rng = carry
    logits, cache = model(token[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32),
                          cache=cache)
    rng, key = jax.random.split(rng)
    token = jnp.where(done, pad_id, choose(logits[:, 0], key))
    out = out.at[:, step].set(token)
    return step + 1, out, done | jnp.isin(token, eos), token, position + 1, cache, rng

  _, out, *_ = jax.lax.while_loop(cond, body, (1, out, done, token, position, cache, rng))
  return out


def generate(model: llama.Llama, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_ids: int | Sequence[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None) -> list[list[int]]:
  """New tokens per prompt: greedy when temperature == 0, else temperature / top-p sampling (needs rng).

  Each row stops after its first EOS (which is kept in the output) or at max_new_tokens.
  """
  _check_prompts(prompt_ids)
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f'need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}')
  sample = temperature > 0
  if sample and rng is None:
    raise ValueError('sampling (temperature > 0) needs an rng key')
  eos = np.atleast_1d(np.asarray(eos_ids, np.int32))
  length = bucket_length(max(map(len, prompt_ids)))
  ids, positions, segments = _left_pad(prompt_ids, length, pad_id)
  graphdef, state = _eval_split(model)
  out = np.asarray(_generate(
      graphdef, state, ids, positions, segments, eos, np.int32(pad_id), np.float32(temperature or 1.0),
      np.float32(top_p), jax.random.key(0) if rng is None else rng,
      max_new_tokens=max_new_tokens, sample=sample))
  results, stops = [], set(eos.tolist())
  for row in out.tolist():
    stop = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
    results.append(row[:stop + 1])
  return results


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _score(graphdef, state, ids, positions, segments, at, targets, mask):
  logits = nnx.merge(graphdef, state)(ids, positions, segments, logits_at=at)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


def score(model: llama.Llama, prompt_ids: Sequence[Sequence[int]],
          continuation_ids: Sequence[Sequence[int]], *, pad_id: int) -> np.ndarray:
  """sum_t log p(continuation_t | prompt, continuation_<t) per row, float32 [B], in one forward pass."""
  _check_prompts(prompt_ids)
  _check_prompts(continuation_ids, 'continuation_ids')
  if len(prompt_ids) != len(continuation_ids):
    raise ValueError(f'score: {len(prompt_ids)} prompts but {len(continuation_ids)} continuations')
  rows = [list(p) + list(c) for p, c in zip(prompt_ids, continuation_ids)]
  length = bucket_length(max(map(len, rows)))
  n = bucket_length(max(map(len, continuation_ids)))
  ids = np.full((len(rows), length), pad_id, np.int32)
  segments = np.zeros_like(ids)
  at = np.zeros((len(rows), n), np.int32)
  targets = np.zeros((len(rows), n), np.int32)
  mask = np.zeros((len(rows), n), bool)
  for b, (row, p, c) in enumerate(zip(rows, prompt_ids, continuation_ids)):
    ids[b, :len(row)] = row
    segments[b, :len(row)] = 1
    at[b, :len(c)] = np.arange(len(p) - 1, len(row) - 1)
    targets[b, :len(c)] = c
    mask[b, :len(c)] = True
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
  graphdef, state = _eval_split(model)
  return np.asarray(_score(graphdef, state, ids, positions, segments, at, targets, mask))
