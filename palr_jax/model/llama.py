"""LLaMA-family decoder in Flax NNX, parameter paths mirroring Hugging Face's `LlamaForCausalLM`.

Parameter paths are HF's names without the `model.` prefix (`layers.3.self_attn.q_proj.kernel`), kernels
are [in, out] (`palr_jax/hub/llama_names.py` converts HF configs and tensors). Every parameter carries
`logical_axes` metadata that `palr_jax/sharding.py` maps onto the mesh.

Attention is causal within equal non-zero `segment_ids` (0 = padding; a negative segment is a prefix that the
later segments of its row all see; `attention.attention_mask`), so one forward serves packed training rows,
left/right padded batches, and several answers scored after one prompt. Without a cache the layers run as
one scan (`scan.apply_layers`). Decoding uses a functional `KVCache`:
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

from palr_jax.model import attention
from palr_jax.model import item_tokens
from palr_jax.model import scan

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
    if self.remat not in scan.REMAT_POLICIES:
      raise ValueError(f'LlamaConfig.remat: expected one of {sorted(scan.REMAT_POLICIES)}, '
                       f'got {self.remat!r}')
    if self.attention not in attention.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'LlamaConfig.attention: expected one of {attention.ATTENTION_IMPLEMENTATIONS}, '
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


# ----------------------------------------------------------------------------------------- layers


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """x @ w with both operands in the compute `dtype`, accumulated and returned in fp32.

  Under a 16-bit compute dtype the backward pass multiplies in that dtype too (`_matmul16`): JAX's own
  transpose of an fp32-accumulating dot takes the fp32 cotangent, so XLA would run both backward matmuls
  in fp32, slower than bf16 with fp32 accumulation on CPUs with bf16 dot instructions (the matmul peaks
  are in bench/RESULTS.md, "Train step").
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
    return checkpoint_name(matmul(x, self.kernel[...], self.dtype).astype(self.out_dtype), scan.PROJECTION)


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


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE; the kernel is `attention.dot_product_attention`'s."""

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
      mask = attention.attention_mask(segment_ids, segment_ids)
    else:
      k_cache, v_cache, kv_segments, end = layer_cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, end, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, end, 0, 0))
      mask = attention.attention_mask(segment_ids, kv_segments, end)
      q = q.astype(k.dtype)
    out = attention.dot_product_attention(q, k, v, mask, self.implementation)
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
               cache: KVCache | None = None, logits_at: jax.Array | None = None, hidden: bool = False,
               item_ids: jax.Array | None = None):
    """Logits (fp32) [B, T, V], or [B, N, V] at the [B, N] indices `logits_at`.

    With a cache, returns (logits, cache) where the T new tokens were written at `cache.end`. `hidden`
    returns the last layer's output instead of logits, for `head` to turn into logits a slice at a time.
    `item_ids` [B, T] (-1 = none): the soft token of that item replaces the token's embedding there
    (collaborative item tokens; the model needs `item_tokens.attach`).
    """
    config = self.config
    inv_freq = rope_inv_freq(config)
    x = self.embed_tokens(input_ids)
    if item_ids is not None:
      x = item_tokens.embed(self, x, item_ids)
    if cache is None:
      x = scan.apply_layers(self.layers, x, lambda layer, h: layer(h, positions, segment_ids, inv_freq)[0],
                            remat=config.remat, scan=config.scan_layers)
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


_ABSTRACT_MODELS: dict[str, tuple[Any, Any]] = {}


def abstract_model(config: LlamaConfig) -> Llama:
  """A Llama of shapes (`nnx.eval_shape`: no weights, nothing computed) with Variables of its own.

  A job builds the same model in several stages (load, adapters merged, export), and tracing the
  constructor's initializers is not free (bench/RESULTS.md, ":quick end to end"): it is traced once per config and
  process.
  """
  key = repr(config)  # LlamaConfig holds a dict (rope_scaling), so it cannot be hashed
  if key not in _ABSTRACT_MODELS:
    if len(_ABSTRACT_MODELS) >= 8:
      _ABSTRACT_MODELS.clear()
    _ABSTRACT_MODELS[key] = nnx.split(nnx.eval_shape(lambda: Llama(config)))
  graphdef, state = _ABSTRACT_MODELS[key]
  return nnx.merge(graphdef, state, copy=True)


def named_params(model: nnx.Module, filter=nnx.Param) -> dict[str, nnx.Variable]:
  """Dotted path -> Variable for every variable of the model that matches `filter`."""
  predicate = filterlib.to_predicate(filter)
  return {'.'.join(map(str, path)): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Variable) and predicate(path, node)}


def assign_params(model: nnx.Module, params: Mapping[str, Any]) -> None:
  """Sets every Param of `model` from {dotted path: array}, cast to the param's dtype (in place).

  All base params must be given, with their exact shapes; jax.Arrays keep their sharding.
  """
  variables = named_params(model, scan.FROZEN)
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
