"""LLaMA-family decoder in Flax NNX, parameter paths mirroring Hugging Face's `LlamaForCausalLM`.

Parameter paths are HF's names without the `model.` prefix (`layers.3.self_attn.q_proj.kernel`), kernels
are [in, out], so HF <-> NNX conversion is a name table plus transposes (`hf_param_names`,
`params_from_hf_state_dict`). Every parameter carries `logical_axes` metadata that
`palr_jax/sharding.py` maps onto the mesh.

Attention is causal within equal non-zero `segment_ids` (0 = padding; a negative segment is a prefix that the
later segments of its row all see), so one forward serves packed training rows, left/right padded batches,
and several answers scored after one prompt. Decoding uses a functional `KVCache`:
`logits, cache = model(ids, positions, segment_ids, cache=cache)` writes the new keys/values at
`cache.end` and attends over every slot with the same masking rule, so left-padded prompts need nothing
special.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
import math
from typing import Any

from flax import nnx
from flax.nnx import filterlib
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

# What the backward pass keeps of each layer's forward (the rest is recomputed). Projection outputs are
# named (`PROJECTION`) after the cast to the compute dtype, so 'dots' keeps them in bf16 under bf16
# compute, with the blocked attention's output and log-sum-exp, and never the attention scores [heads, T, T].
PROJECTION = 'projection'
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.save_only_these_names(PROJECTION),
}
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'blocked', 'cudnn', 'reference')
# Query rows per block of 'blocked' attention: 96-128 was fastest from T = 192 to 1024 on a 2-core x86 CPU
# (SmolLM2's 9/3 heads, bf16; bench/RESULTS.md, "Attention on CPU").
ATTENTION_BLOCK = 96
ROPE_TYPES = ('default', 'linear', 'llama3')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture (HF `config.json` semantics) plus how to run it (dtypes, remat, attention kernel)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'auto'
  scan_layers: bool = True

  def __post_init__(self):
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, 'eos_token_id', tuple(self.eos_token_id))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'LlamaConfig: num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'LlamaConfig.remat: expected one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'LlamaConfig.attention: expected one of {ATTENTION_IMPLEMENTATIONS}, '
                       f'got {self.attention!r}')
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'LlamaConfig.rope_scaling: rope_type {self.rope_type!r} is not supported '
                       f'(supported: {ROPE_TYPES})')
    for name in ('dtype', 'param_dtype'):
      jnp.dtype(getattr(self, name))  # Fails early on a misspelt dtype.

  def __hash__(self):  # rope_scaling is a dict; the config is a static jit argument via the graphdef.
    items = dataclasses.astuple(self)
    return hash(tuple(tuple(sorted(x.items())) if isinstance(x, dict) else x for x in items))

  @property
  def rope_type(self) -> str:
    scaling = self.rope_scaling or {}
    return scaling.get('rope_type', scaling.get('type', 'default'))

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    eos = self.eos_token_id
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **runtime) -> LlamaConfig:
    """From an HF `config.json` dict (transformers 4 `rope_scaling` or 5 `rope_parameters` layout).

    `runtime` sets dtype / param_dtype / remat / attention, which HF configs do not describe.
    """
    unknown = set(runtime) - {'dtype', 'param_dtype', 'remat', 'attention', 'scan_layers'}
    if unknown:
      raise TypeError(f'LlamaConfig.from_hf: unexpected keyword(s) {sorted(unknown)}')
    missing = [k for k in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                           'num_attention_heads') if k not in hf]
    if missing:
      raise ValueError(f'HF config: missing key(s) {missing}')
    if hf.get('hidden_act', 'silu') != 'silu':
      raise ValueError(f"HF config: hidden_act must be 'silu', got {hf['hidden_act']!r}")
    for key in ('attention_bias', 'mlp_bias'):
      if hf.get(key):
        raise ValueError(f'HF config: {key}=true is not supported (LLaMA has no biases)')
    rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
    rope_theta = rope.pop('rope_theta', hf.get('rope_theta', 10000.0))
    rope.pop('partial_rotary_factor', None)
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type == 'llama3':
      rope.setdefault('original_max_position_embeddings', hf.get('max_position_embeddings', 2048))
    heads = hf['num_attention_heads']
    return cls(
        vocab_size=hf['vocab_size'],
        hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'],
        num_layers=hf['num_hidden_layers'],
        num_heads=heads,
        num_kv_heads=hf.get('num_key_value_heads') or heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
        rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=None if rope_type == 'default' else rope,
        max_position_embeddings=hf.get('max_position_embeddings', 2048),
        tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
        bos_token_id=hf.get('bos_token_id'),
        eos_token_id=hf.get('eos_token_id'),
        pad_token_id=hf.get('pad_token_id'),
        **runtime)

  def to_hf(self) -> dict[str, Any]:
    """An HF `LlamaForCausalLM` config.json dict (readable by transformers 4 and 5)."""
    out = dict(
        architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=self.vocab_size,
        hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, hidden_act='silu',
        rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        pad_token_id=self.pad_token_id, torch_dtype=self.param_dtype)
    if self.rope_scaling:
      out['rope_scaling'] = dict(self.rope_scaling)
    return out


# ----------------------------------------------------------------------------------------- layers


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """x @ w with both operands in the compute `dtype`, accumulated and returned in fp32.

  Under a 16-bit compute dtype the backward pass multiplies in that dtype too (`_matmul16`): JAX's own
  transpose of an fp32-accumulating dot takes the fp32 cotangent, so XLA would run both backward matmuls
  in fp32, at half the speed of bf16 with fp32 accumulation on CPUs with bf16 dot instructions.
  """
  if jnp.dtype(dtype).itemsize == 2:
    return _matmul16(x, w, jnp.dtype(dtype).name)
  return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul16(x, w, dtype):
  return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _matmul16_fwd(x, w, dtype):
  return _matmul16(x, w, dtype), (x, w)


def _matmul16_bwd(dtype, residuals, g):
  x, w = residuals
  g = g.astype(dtype)
  dx = jnp.dot(g, w.astype(dtype).T, preferred_element_type=jnp.float32)
  # XLA drops this one where w is not differentiated (the frozen base).
  dw = jnp.tensordot(x.astype(dtype), g, axes=(tuple(range(x.ndim - 1)), tuple(range(g.ndim - 1))),
                     preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul16.defvjp(_matmul16_fwd, _matmul16_bwd)


class Linear(nnx.Module):
  """y = x @ kernel, no bias; kernel [in, out] stored in param_dtype, applied in the compute dtype.

  Accumulates in fp32 (`matmul`); the result is cast to `out_dtype` (default: the compute dtype).
  """

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], config: LlamaConfig,
               rngs: nnx.Rngs, out_dtype: str | None = None):
    self.in_features, self.out_features = in_features, out_features
    self.dtype, self.out_dtype = config.dtype, out_dtype or config.dtype
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), config.param_dtype),
                            logical_axes=axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    return checkpoint_name(matmul(x, self.kernel[...], self.dtype).astype(self.out_dtype), PROJECTION)


class Embed(nnx.Module):
  """Token embedding [V, D]; `attend` is the tied LM head."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.dtype = config.dtype
    init = nnx.initializers.normal(0.02)
    self.embedding = nnx.Param(
        init(rngs.params(), (config.vocab_size, config.hidden_size), config.param_dtype),
        logical_axes=('vocab', 'embed'))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    # `matmul`, so that the backward pass multiplies in the compute dtype too: JAX's own transpose would
    # convert the whole [V, D] table to fp32 at every step.
    return matmul(x, self.embedding[...].T, self.dtype)


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: statistics in fp32, eps inside the rsqrt, scale applied after the cast back."""

  def __init__(self, config: LlamaConfig):
    self.eps = config.rms_norm_eps
    self.scale = nnx.Param(jnp.ones((config.hidden_size,), config.param_dtype), logical_axes=('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [head_dim/2] (fp32) with HF's default / linear / llama3 scaling."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling or {}
  if config.rope_type == 'linear':
    return (inv_freq / scaling['factor']).astype(np.float32)
  if config.rope_type == 'llama3':
    factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old_len = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE (HF layout) of x [B, T, heads, head_dim] at integer positions [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


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

  Most of the upper triangle is never computed (at T = 512, 59% of the scores are), and each block's
  scores stay small enough for the CPU's caches: forward and backward 1.1-2.1x faster than XLA's
  attention from T = 192 to 1024 on a 2-core x86 CPU (bench/attention.py). Only for masks whose query t
  never sees a key after slot t (`attention_mask` with q_offset 0): the keys it skips are masked anyway.

  The backward pass keeps the output and each row's log-sum-exp (named `PROJECTION`, so the 'dots' remat
  policy keeps them too) and recomputes the probabilities from them: no [heads, T, T] array outlives its
  block, and a rematerialized layer does not rerun the softmax and the probabilities-values product.
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
  out = checkpoint_name(jnp.concatenate(outs, axis=1), PROJECTION)
  lse = checkpoint_name(jnp.concatenate(lses, axis=-1), PROJECTION)
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


class Attention(nnx.Module):

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    d, n, kv, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = n, kv, h
    self.implementation = config.attention
    self.q_proj = Linear(d, n * h, ('embed', 'heads'), config, rngs)
    self.k_proj = Linear(d, kv * h, ('embed', 'kv_heads'), config, rngs)
    self.v_proj = Linear(d, kv * h, ('embed', 'kv_heads'), config, rngs)
    self.o_proj = Linear(n * h, d, ('heads', 'embed'), config, rngs)

  def __call__(self, x, positions, segment_ids, inv_freq, layer_cache=None):
    """Returns (output, updated (k, v) of this layer or None)."""
    b, t, _ = x.shape
    q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), positions, inv_freq)
    k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), positions, inv_freq)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if layer_cache is None:
      mask = attention_mask(segment_ids, segment_ids)
    else:
      k_cache, v_cache, kv_segments, end = layer_cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, end, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, end, 0, 0))
      mask = attention_mask(segment_ids, kv_segments, end)
      q = q.astype(k.dtype)
    out = dot_product_attention(q, k, v, mask, self.implementation)
    out = self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))
    return out, (None if layer_cache is None else (k, v))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    d, m = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(d, m, ('embed', 'mlp'), config, rngs)
    self.up_proj = Linear(d, m, ('embed', 'mlp'), config, rngs)
    self.down_proj = Linear(m, d, ('mlp', 'embed'), config, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config)
    self.self_attn = Attention(config, rngs)
    self.post_attention_layernorm = RMSNorm(config)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, positions, segment_ids, inv_freq, layer_cache=None):
    h, kv = self.self_attn(self.input_layernorm(x), positions, segment_ids, inv_freq, layer_cache)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), kv


# ------------------------------------------------------------------------------------------ cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer keys/values [B, S_max, kv_heads, head_dim] (RoPE applied), with per-slot segment ids.

  Slots [0, end) are written; `segment_ids` 0 marks padding or unwritten slots, which no query sees.
  Writing past S_max is not checked inside jit: size the cache for prompt + new tokens.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  segment_ids: jax.Array  # [B, S_max] int32
  end: jax.Array          # [] int32

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache; dtype defaults to the compute dtype."""
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(dtype or config.dtype)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                 segment_ids=jnp.zeros((batch, max_len), jnp.int32), end=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------ model

# What the adapters leave untouched: every Param but the LoRA ones. Only `nnx.LoRAParam`s are trained.
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
# 16-bit floats cross the layer scan as same-width integers, their bit patterns: XLA:CPU converts a bf16
# array that a loop slices to fp32 as a whole, before the loop (a copy at twice the bytes, and a pass over
# it at every call), which it does not do for integers.
_BITS = {np.dtype(jnp.bfloat16): np.dtype(np.uint16), np.dtype(jnp.float16): np.dtype(np.int16)}


def _is_16bit_float(leaf) -> bool:
  return isinstance(leaf.dtype, np.dtype) and leaf.dtype in _BITS


def _to_bits(leaf: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(leaf, _BITS[leaf.dtype])


@jax.custom_jvp
def _frozen_to_bits(leaf: jax.Array) -> jax.Array:
  """`_to_bits` for a frozen base weight; raises if differentiated, since the bits carry no gradient."""
  return _to_bits(leaf)


@_frozen_to_bits.defjvp
def _frozen_to_bits_jvp(primals, tangents):
  raise TypeError('llama: a frozen base weight (an nnx.Param that is not an nnx.LoRAParam) is differentiated '
                  'through the layer scan, which only trains LoRA adapters; set model.scan_layers=False to '
                  'differentiate the base weights.')


@jax.tree_util.register_pytree_node_class
class _Bits:
  """A pytree whose 16-bit float leaves are held as bit patterns; their dtypes are static (aux data)."""

  def __init__(self, leaves, aux):
    self.leaves, self.aux = leaves, aux

  @classmethod
  def of(cls, tree, to_bits=_to_bits) -> _Bits:
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = tuple(leaf.dtype if _is_16bit_float(leaf) else None for leaf in leaves)
    return cls([leaf if dtype is None else to_bits(leaf) for leaf, dtype in zip(leaves, dtypes)],
               (treedef, dtypes))

  def value(self):
    treedef, dtypes = self.aux
    return jax.tree.unflatten(treedef, [leaf if dtype is None else jax.lax.bitcast_convert_type(leaf, dtype)
                                        for leaf, dtype in zip(self.leaves, dtypes)])

  def tree_flatten(self):
    return self.leaves, self.aux

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    return cls(list(leaves), aux)


def _residuals_as_bits(step):
  """`step` (one layer) with the residuals its backward pass keeps held as bit patterns where 16-bit: the
  layer scan stacks them in its forward loop and slices them in its backward loop, before which XLA:CPU
  would convert the whole bf16 stack to fp32. Same values, same gradients (tests/test_llama.py)."""

  @jax.custom_vjp
  def call(x, state):
    return step(x, state)

  def forward(x, state):
    out, pullback = jax.vjp(step, x, state)
    return out, _Bits.of(pullback)

  def backward(residuals, cotangent):
    return residuals.value()(cotangent)

  call.defvjp(forward, backward)
  return call


class Llama(nnx.Module):
  """LlamaForCausalLM. `model(input_ids, positions, segment_ids, *, cache=None, logits_at=None)`."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs | None = None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.config = config
    self.embed_tokens = Embed(config, rngs)
    self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config)
    if not config.tie_word_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, ('embed', 'vocab'), config, rngs,
                            out_dtype='float32')

  def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               cache: KVCache | None = None, logits_at: jax.Array | None = None, hidden: bool = False):
    """Logits (fp32) [B, T, V], or [B, N, V] at the [B, N] indices `logits_at`.

    With a cache, returns (logits, cache) where the T new tokens were written at `cache.end`. `hidden`
    returns the last layer's output instead of logits, for `head` to turn into logits a slice at a time.
    """
    config = self.config
    inv_freq = rope_inv_freq(config)
    x = self.embed_tokens(input_ids)
    if cache is None:
      x = self._layers(x, positions, segment_ids, inv_freq)
    else:
      kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                 (0, cache.end))
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        x, (k, v) = layer(x, positions, segment_ids, inv_freq, (cache.k[i], cache.v[i], kv_segments, cache.end))
        new_k.append(k)
        new_v.append(v)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None].astype(jnp.int32), axis=1)
    logits = x if hidden else self.head(x)
    if cache is None:
      return logits
    return logits, KVCache(k=tuple(new_k), v=tuple(new_v), segment_ids=kv_segments,
                           end=cache.end + input_ids.shape[1])

  def head(self, x: jax.Array) -> jax.Array:
    """The last layer's output -> logits: the final norm, then the LM head (tied or not)."""
    x = self.norm(x)
    return self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)

  def _layers(self, x, positions, segment_ids, inv_freq):
    """The decoder layers without a cache (training, scoring): a `lax.scan` over the layers' states,
    stacked on the fly, each step a pure function of (x, layer state), rematerialized per
    `config.remat`.

    Why a scan: the backward pass of a scan runs layer by layer, so with remat only the layer inputs and
    one layer's intermediates are alive; XLA:CPU schedules the rematerializations of an unrolled loop all
    before the backward pass (nothing orders them), which keeps every layer's attention scores at once
    (11 GB instead of 0.8 GB for SmolLM2 on 8 x 512 tokens). It also compiles one layer instead of all.
    The stacking copies the weights once per call (inside jit): cheap beside a forward of many tokens;
    decoding with a cache keeps the unrolled loop. `config.scan_layers = False` unrolls here too.

    The frozen 16-bit weights enter the scan, and a rematerialized layer's residuals leave it, as their bit
    patterns (`_Bits`): XLA:CPU kept an fp32 copy of every bf16 array the loops slice (SmolLM2: 424 MB of
    weights; with `remat='dots'`, 1.2 GB of saved projections), and converted them at every step.
    """
    config = self.config
    splits = [nnx.split(layer, FROZEN, ...) for layer in self.layers]
    scan = config.scan_layers and all(g == splits[0][0] for g, _, _ in splits[1:])

    def step_of(graphdef):
      def step(x, state):  # -> (output, the layer's random-stream state after the call)
        frozen, rest = state
        layer = nnx.merge(graphdef, frozen.value() if isinstance(frozen, _Bits) else frozen, rest)
        return layer(x, positions, segment_ids, inv_freq)[0], nnx.state(layer, nnx.RngState)
      if config.remat != 'none':
        # jax.checkpoint over a pure function of the layer's state: unlike nnx.remat this also works when
        # part of the state (the frozen base) enters the outer jit as a separate argument.
        step = jax.checkpoint(step, policy=REMAT_POLICIES[config.remat], prevent_cse=not scan)
      return _residuals_as_bits(step) if scan else step

    if scan:
      step = step_of(splits[0][0])
      stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                             *((_Bits.of(frozen, _frozen_to_bits), rest) for _, frozen, rest in splits))
      x, rngs = jax.lax.scan(step, x, stacked)
      rngs = [jax.tree.map(lambda leaf, i=i: leaf[i], rngs) for i in range(len(splits))]
    else:
      rngs = []
      for graphdef, frozen, rest in splits:
        x, rng = step_of(graphdef)(x, (frozen, rest))
        rngs.append(rng)
    for layer, rng in zip(self.layers, rngs):  # dropout streams advance as in an eager call
      nnx.update(layer, rng)
    return x


# --------------------------------------------------------------------------- HF names and values


def hf_param_names(config: LlamaConfig) -> dict[str, tuple[str, bool]]:
  """Our dotted parameter path -> (HF state-dict name, transposed?) for LlamaForCausalLM."""
  table = {'embed_tokens.embedding': ('model.embed_tokens.weight', False),
           'norm.scale': ('model.norm.weight', False)}
  for i in range(config.num_layers):
    table[f'layers.{i}.input_layernorm.scale'] = (f'model.layers.{i}.input_layernorm.weight', False)
    table[f'layers.{i}.post_attention_layernorm.scale'] = (
        f'model.layers.{i}.post_attention_layernorm.weight', False)
    for block, names in (('self_attn', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
                         ('mlp', ('gate_proj', 'up_proj', 'down_proj'))):
      for name in names:
        table[f'layers.{i}.{block}.{name}.kernel'] = (f'model.layers.{i}.{block}.{name}.weight', True)
  if not config.tie_word_embeddings:
    table['lm_head.kernel'] = ('lm_head.weight', True)
  return table


_ABSTRACT_MODELS: dict[str, tuple[Any, Any]] = {}


def abstract_model(config: LlamaConfig) -> Llama:
  """A Llama of shapes (`nnx.eval_shape`: no weights, nothing computed) with Variables of its own.

  Tracing the constructor's initializers takes ~0.5 s for SmolLM2 on a CPU, and a job builds the same
  model in several stages (load, adapters merged, export): it is traced once per config and process.
  """
  key = repr(config)  # LlamaConfig holds a dict (rope_scaling), so it cannot be hashed
  if key not in _ABSTRACT_MODELS:
    if len(_ABSTRACT_MODELS) >= 8:
      _ABSTRACT_MODELS.clear()
    _ABSTRACT_MODELS[key] = nnx.split(nnx.eval_shape(lambda: Llama(config)))
  graphdef, state = _ABSTRACT_MODELS[key]
  return nnx.merge(graphdef, state, copy=True)


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Our dotted parameter path -> shape, without building the model."""
  model = abstract_model(config)
  return {path: tuple(v.shape) for path, v in named_params(model).items()}


def params_from_hf_state_dict(config: LlamaConfig, state_dict: Mapping[str, np.ndarray]
                              ) -> dict[str, np.ndarray]:
  """HF LlamaForCausalLM tensors (numpy) -> {our path: array}, kernels transposed to [in, out].

  Ignores rotary `inv_freq` buffers and a saved `lm_head.weight` of a tied model; any other missing,
  unexpected or misshapen tensor is an error naming it.
  """
  table = hf_param_names(config)
  shapes = param_shapes(config)
  known = {hf for hf, _ in table.values()}
  unexpected = [k for k in state_dict if k not in known and not k.endswith('rotary_emb.inv_freq')
                and not (k == 'lm_head.weight' and config.tie_word_embeddings)]
  if unexpected:
    raise ValueError(f'HF state dict: unexpected tensor(s) {sorted(unexpected)[:8]}')
  out = {}
  for path, (hf_name, transpose) in table.items():
    if hf_name not in state_dict:
      raise ValueError(f'HF state dict: missing tensor {hf_name!r}')
    value = np.asarray(state_dict[hf_name])
    value = value.T if transpose else value
    if value.shape != shapes[path]:
      raise ValueError(f'HF state dict: {hf_name!r} has shape {tuple(np.shape(state_dict[hf_name]))}, '
                       f'expected {shapes[path][::-1] if transpose else shapes[path]}')
    out[path] = value
  return out


def named_params(model: nnx.Module, filter=nnx.Param) -> dict[str, nnx.Variable]:
  """Dotted path -> Variable for every variable of the model that matches `filter`."""
  predicate = filterlib.to_predicate(filter)
  return {'.'.join(map(str, path)): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Variable) and predicate(path, node)}


def assign_params(model: nnx.Module, params: Mapping[str, Any]) -> None:
  """Sets every Param of `model` from {dotted path: array}, cast to the param's dtype (in place).

  All base params must be given, with their exact shapes; jax.Arrays keep their sharding.
  """
  variables = named_params(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  unknown = sorted(set(params) - set(variables))
  missing = sorted(set(variables) - set(params))
  if unknown or missing:
    raise ValueError(f'assign_params: unknown path(s) {unknown[:8]}, missing path(s) {missing[:8]}')
  for path, var in variables.items():
    value = params[path]
    if tuple(value.shape) != tuple(var.value.shape):
      raise ValueError(f'assign_params: {path} has shape {tuple(value.shape)}, '
                       f'expected {tuple(var.value.shape)}')
    var.value = jnp.asarray(value, dtype=var.value.dtype)
