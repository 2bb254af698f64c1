"""Attention kernels of the decoder: the segment mask, a plain reference, and the kernels it dispatches to.

`dot_product_attention` runs one of: XLA's or cuDNN's (`jax.nn.dot_product_attention`), the 'blocked'
flash-style kernel for causal self-attention on CPU, or the 'reference' einsum the others are tested
against; `attention_kind` says which 'auto' picks.
"""
from __future__ import annotations

import math

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from palr_jax.model import scan

ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'blocked', 'cudnn', 'reference')
# Query rows per block of 'blocked' attention: the fastest block size on CPU for SmolLM2's heads in bf16
# (bench/attention.py; bench/RESULTS.md, "Attention on CPU").
ATTENTION_BLOCK = 96


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, q_offset: jax.Array | int = 0) -> jax.Array:
  """Boolean [B, T, S]: query t (at slot q_offset + t) sees slot s <= its own in the same non-zero segment,
  and every slot s <= t of a negative segment: a shared prefix, which each later segment of the row
  continues (K answers scored after one prompt in one forward, `decode.continuation_logprobs`).

  A query also always sees its own slot, so padding rows never softmax over an empty set (no NaN).
  """
  t = jnp.arange(q_segments.shape[1])[:, None] + q_offset
  s = jnp.arange(kv_segments.shape[1])[None, :]
  shared = (q_segments[:, :, None] == kv_segments[:, None, :]) | (kv_segments[:, None, :] < 0)
  visible = shared & (q_segments[:, :, None] != 0)
  return (visible & (s <= t)[None]) | (s == t)[None]


def _scores(q, k, mask):
  """fp32 scaled scores [B, KV, G, T, S] of queries q [B, T, N, H] against keys k [B, S, KV, H], masked
  with the most negative float."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  scores = jnp.einsum('btkgh,bskh->bkgts', q.reshape(b, t, kv, n // kv, h), k,
                      preferred_element_type=jnp.float32) / math.sqrt(h)
  return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)


def _attention_reference(q, k, v, mask):
  """Plain grouped einsum + fp32 softmax; the reference the fused kernels are tested against."""
  b, t, n, h = q.shape
  probs = jax.nn.softmax(_scores(q, k, mask), axis=-1).astype(v.dtype)
  return jnp.einsum('bkgts,bskh->btkgh', probs, v).reshape(b, t, n, h)


def attention_kind(choice: str, platform: str | None, dtype, head_dim: int, lengths: tuple[int, int] = (2, 2)
                   ) -> str:
  """What `attention=choice` runs: 'auto' takes cuDNN flash attention where it applies (GPU, 16-bit,
  head_dim % 8 == 0 and <= 128, even query and key lengths); on CPU, 'blocked' for causal self-attention
  (as many queries as keys: training and scoring without a cache) longer than one block; else XLA's."""
  if choice != 'auto':
    return choice
  fits = (platform == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
          and head_dim <= 128 and lengths[0] % 2 == 0 and lengths[1] % 2 == 0)
  if fits:
    return 'cudnn'
  if platform == 'cpu' and lengths[0] == lengths[1] > ATTENTION_BLOCK:
    return 'blocked'
  return 'xla'


def attention_blocks(length: int) -> list[tuple[int, int]]:
  """(first, end) query rows of each block of 'blocked' attention; block [lo, hi) sees keys [0, hi)."""
  return [(lo, min(lo + ATTENTION_BLOCK, length)) for lo in range(0, length, ATTENTION_BLOCK)]


def _attention_blocked(q, k, v, mask):
  """Causal self-attention in blocks of `ATTENTION_BLOCK` query rows, each against the keys up to its own
  last row, with a flash-style backward pass.

  Most of the upper triangle is never computed, and each block's scores stay small enough for the CPU's
  caches: forward and backward beat XLA's attention on CPU (bench/attention.py; bench/RESULTS.md,
  "Attention on CPU"). Only for masks whose query t never sees a key after slot t (`attention_mask` with
  q_offset 0): the keys it skips are masked anyway.

  The backward pass keeps the output and each row's log-sum-exp (named `scan.PROJECTION`, so the 'dots'
  remat policy keeps them too) and recomputes the probabilities from them: no [heads, T, T] array outlives
  its block, and a rematerialized layer does not rerun the softmax and the probabilities-values product.
  """
  t = q.shape[1]
  if k.shape[1] != t:
    raise ValueError(f'blocked attention is for self-attention: {t} queries, {k.shape[1]} keys')
  return _flash(q, k, v, mask)


def _flash_forward(q, k, v, mask):
  b, t, n, h = q.shape
  outs, lses = [], []
  for lo, hi in attention_blocks(t):
    scores = _scores(q[:, lo:hi], k[:, :hi], mask[:, lo:hi, :hi])
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum('bkgts,bskh->btkgh', (weights / total).astype(v.dtype), v[:, :hi],
                     preferred_element_type=jnp.float32)
    outs.append(out.astype(q.dtype).reshape(b, hi - lo, n, h))
    lses.append((top + jnp.log(total))[..., 0])  # [B, KV, G, tq]
  out = checkpoint_name(jnp.concatenate(outs, axis=1), scan.PROJECTION)
  lse = checkpoint_name(jnp.concatenate(lses, axis=-1), scan.PROJECTION)
  return out, (q, k, v, mask, out, lse)


def _flash_backward(residuals, d_out):
  q, k, v, mask, out, lse = residuals
  b, t, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  grouped = lambda x, lo, hi: x[:, lo:hi].reshape(b, hi - lo, kv, g, h)
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for lo, hi in attention_blocks(t):
    probs = jnp.exp(_scores(q[:, lo:hi], k[:, :hi], mask[:, lo:hi, :hi]) - lse[..., lo:hi, None])
    d_block = grouped(d_out, lo, hi)
    dv = dv.at[:, :hi].add(jnp.einsum('bkgts,btkgh->bskh', probs.astype(v.dtype), d_block,
                                      preferred_element_type=jnp.float32))
    d_probs = jnp.einsum('btkgh,bskh->bkgts', d_block, v[:, :hi], preferred_element_type=jnp.float32)
    rows = jnp.einsum('btkgh,btkgh->bkgt', d_block.astype(jnp.float32), grouped(out, lo, hi).astype(jnp.float32))
    d_scores = (probs * (d_probs - rows[..., None]) / math.sqrt(h)).astype(q.dtype)
    dq.append(jnp.einsum('bkgts,bskh->btkgh', d_scores, k[:, :hi], preferred_element_type=jnp.float32)
              .reshape(b, hi - lo, n, h))
    dk = dk.at[:, :hi].add(jnp.einsum('bkgts,btkgh->bskh', d_scores, grouped(q, lo, hi),
                                      preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dq, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


@jax.custom_vjp
def _flash(q, k, v, mask):
  return _flash_forward(q, k, v, mask)[0]


_flash.defvjp(_flash_forward, _flash_backward)


def dot_product_attention(q, k, v, mask, implementation: str) -> jax.Array:
  """q [B,T,N,H], k/v [B,S,K,H] (N a multiple of K), mask [B,T,S] -> [B,T,N,H]."""
  impl = attention_kind(implementation, jax.default_backend(), q.dtype, q.shape[-1], (q.shape[1], k.shape[1]))
  if impl == 'reference':
    return _attention_reference(q, k, v, mask)
  if impl == 'blocked':
    return _attention_blocked(q, k, v, mask)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
