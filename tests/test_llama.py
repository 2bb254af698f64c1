"""Parity of palr_jax.model.llama with transformers' LlamaForCausalLM (torch, fp32) on tiny configs."""
import dataclasses
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from palr_jax.hub import llama_names
from palr_jax.model import attention
from palr_jax.model import llama

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=100, num_layers=2, num_heads=6,
            num_kv_heads=6, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    'mha_odd_sizes': BASE,
    'gqa_4to1': dict(BASE, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=128),
    'tied': dict(BASE, num_kv_heads=3, tie_word_embeddings=True),
    'llama3_rope': dict(BASE, num_kv_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    'linear_rope': dict(BASE, rope_scaling=dict(rope_type='linear', factor=4.0)),
}


# Eager mode compiles every primitive per shape; one jit per forward is several times faster.
forward = nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))


def make_config(name='mha_odd_sizes', **overrides) -> llama.LlamaConfig:
  return llama.LlamaConfig(**dict(CONFIGS[name], **overrides))


def torch_model(config: llama.LlamaConfig, seed=0) -> transformers.LlamaForCausalLM:
  """A random fp32 HF model of the same architecture; weights large enough for O(1) logits."""
  hf = transformers.LlamaConfig(**llama_names.config_to_hf(config), attn_implementation='eager')
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith('norm.weight') else 0.15 * torch.randn_like(p))
  return model


def jax_model(config: llama.LlamaConfig, tm: transformers.LlamaForCausalLM) -> llama.Llama:
  model = llama.Llama(config, rngs=nnx.Rngs(1))
  state = {k: v.numpy() for k, v in tm.state_dict().items()}
  llama.assign_params(model, llama_names.params_from_hf_state_dict(config, state))
  return model


def torch_logits(tm, ids, attention_mask=None):
  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    return tm(input_ids=torch.tensor(ids), attention_mask=mask).logits.numpy()


def dense_inputs(ids):
  ids = np.asarray(ids, np.int32)
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  return ids, positions, np.ones_like(ids)


def left_padded(rows, pad_id=0):
  """[B, T] ids, positions, segment_ids and HF attention_mask for left-padded rows."""
  t = max(map(len, rows))
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for b, row in enumerate(rows):
    ids[b, t - len(row):] = row
    mask[b, t - len(row):] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return ids, positions, mask, mask


@pytest.mark.parametrize('name,attention', [(name, 'xla') for name in sorted(CONFIGS)]
                         + [('gqa_4to1', 'reference'), ('tied', 'reference')])
def test_logits_match_transformers(name, attention):
  config = make_config(name, attention=attention)
  tm = torch_model(config)
  model = jax_model(config, tm)
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 21))
  expected = torch_logits(tm, ids)
  got = np.asarray(forward(model, *dense_inputs(ids)))
  assert got.dtype == np.float32 and got.shape == expected.shape
  assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero numbers
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', ['llama3_rope', 'linear_rope'])
def test_rope_scaling_changes_logits(name):
  """The scaled-RoPE parity above would pass trivially if scaling were ignored at these lengths."""
  config = make_config(name)
  tm = torch_model(config)
  ids = np.random.default_rng(1).integers(0, 97, (1, 40))
  scaled = np.asarray(forward(jax_model(config, tm), *dense_inputs(ids)))
  unscaled = jax_model(dataclasses.replace(config, rope_scaling=None), tm)
  plain = np.asarray(forward(unscaled, *dense_inputs(ids)))
  assert np.abs(scaled - plain).max() > 1e-2


def test_left_padding_matches_transformers_attention_mask():
  config = make_config('gqa_4to1')
  tm = torch_model(config)
  model = jax_model(config, tm)
  rng = np.random.default_rng(2)
  rows = [list(rng.integers(3, 97, n)) for n in (9, 4, 7)]
  ids, positions, segments, mask = left_padded(rows)
  with torch.no_grad():
    expected = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  got = np.asarray(forward(model, ids, positions, segments))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)
  assert np.isfinite(got).all()


def test_packed_segments_equal_separate_sequences():
  config = make_config('gqa_4to1')
  model = jax_model(config, torch_model(config))
  rng = np.random.default_rng(3)
  a, b = rng.integers(3, 97, 5), rng.integers(3, 97, 8)
  ids = np.concatenate([a, b, [0, 0, 0]])[None].astype(np.int32)
  positions = np.concatenate([np.arange(5), np.arange(8), [0, 0, 0]])[None].astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 8 + [0] * 3], np.int32)
  packed = np.asarray(forward(model, ids, positions, segments))[0]
  np.testing.assert_allclose(packed[:5], np.asarray(forward(model, *dense_inputs(a[None])))[0], atol=1e-5)
  np.testing.assert_allclose(packed[5:13], np.asarray(forward(model, *dense_inputs(b[None])))[0], atol=1e-5)


def test_xla_and_reference_attention_agree():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(2, 7, 6, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
  segments = jnp.array([[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2, 0]], jnp.int32)
  mask = attention.attention_mask(segments, segments)
  ref = attention.dot_product_attention(q, k, v, mask, 'reference')
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask, 'xla'), ref, atol=1e-5)
  # Reference semantics by hand: row 1, query 3 attends to keys 0..3 of segment 1 only.
  logits = np.einsum('nh,sh->ns', q[1, 3].reshape(2, 3, 8)[0], k[1, :4, 0]) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(ref[1, 3, :3], p @ np.asarray(v[1, :4, 0]), atol=1e-5)


def test_blocked_attention_matches_reference_values_and_gradients():
  # Longer than two blocks with a short last one, packed segments and padding: the blocks below the
  # diagonal must give exactly what the full [T, T] softmax gives, and so must the gradients.
  t = 2 * attention.ATTENTION_BLOCK + 17
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, t, 6, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32)
  segments = np.ones((2, t), np.int32)
  segments[0, 70:] = 2
  segments[1, t - 40:] = 0
  mask = attention.attention_mask(jnp.asarray(segments), jnp.asarray(segments))
  ref = attention.dot_product_attention(q, k, v, mask, 'reference')
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, mask, 'blocked'), ref, atol=1e-5)

  def loss(impl):
    return lambda q, k, v: (attention.dot_product_attention(q, k, v, mask, impl) ** 2).sum()
  for got, want in zip(jax.grad(loss('blocked'), (0, 1, 2))(q, k, v), jax.grad(loss('reference'), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-4)
  # 'auto' takes it on CPU for self-attention longer than a block, not for a prefill against a cache.
  assert attention.attention_kind('auto', 'cpu', jnp.bfloat16, 64, (t, t)) == 'blocked'
  assert attention.attention_kind('auto', 'cpu', jnp.bfloat16, 64, (t, t + 8)) == 'xla'
  assert attention.attention_kind('auto', 'gpu', jnp.bfloat16, 64, (t, t)) == 'xla'  # odd: no cuDNN either
  with pytest.raises(ValueError, match='self-attention'):
    attention.dot_product_attention(q, k[:, :-1], v[:, :-1], mask[:, :, :-1], 'blocked')


def test_attention_mask_rule():
  seg = jnp.array([[0, 1, 1, 2]], jnp.int32)
  expected = np.array([[1, 0, 0, 0],   # padding sees only itself
                       [0, 1, 0, 0],
                       [0, 1, 1, 0],
                       [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(attention.attention_mask(seg, seg)[0], expected)


def test_attention_mask_shared_prefix():
  # A prompt (segment -1) after left padding, then two answers: each sees the prompt and itself.
  seg = jnp.array([[0, -1, -1, 1, 1, 2, 0]], jnp.int32)
  expected = np.array([[1, 0, 0, 0, 0, 0, 0],
                       [0, 1, 0, 0, 0, 0, 0],
                       [0, 1, 1, 0, 0, 0, 0],
                       [0, 1, 1, 1, 0, 0, 0],
                       [0, 1, 1, 1, 1, 0, 0],
                       [0, 1, 1, 0, 0, 1, 0],   # answer 2 does not see answer 1
                       [0, 0, 0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(attention.attention_mask(seg, seg)[0], expected)


def test_logits_at_gathers_positions():
  config = make_config('tied')
  model = llama.Llama(config)
  ids = np.random.default_rng(5).integers(0, 97, (2, 10))
  full = np.asarray(forward(model, *dense_inputs(ids)))
  at = np.array([[0, 9, 4], [3, 3, 1]], np.int32)
  got = np.asarray(forward(model, *dense_inputs(ids), logits_at=at))
  np.testing.assert_allclose(got, np.take_along_axis(full, at[..., None], 1), atol=1e-6)


def test_cache_prefill_and_steps_match_full_forward():
  config = make_config('llama3_rope')
  model = jax_model(config, torch_model(config))
  rng = np.random.default_rng(6)
  rows = [list(rng.integers(3, 97, n)) for n in (10, 6)]
  ids, positions, segments, _ = left_padded(rows)
  full = np.asarray(forward(model, ids, positions, segments))
  cache = llama.init_cache(config, batch=2, max_len=16)
  step = nnx.jit(lambda m, c, a, b: m(ids[:, a:b], positions[:, a:b], segments[:, a:b], cache=c),
                 static_argnums=(2, 3))
  p = 6  # prefill the first 6 columns, then feed one token at a time
  logits, cache = step(model, cache, 0, p)
  outs = [np.asarray(logits)]
  for t in range(p, ids.shape[1]):
    logits, cache = step(model, cache, t, t + 1)
    outs.append(np.asarray(logits))
  assert int(cache.end) == ids.shape[1]
  real = segments.astype(bool)
  np.testing.assert_allclose(np.concatenate(outs, 1)[real], full[real], atol=1e-5)


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_loss_and_gradients(remat):
  config = make_config('gqa_4to1')
  ids = np.random.default_rng(7).integers(0, 97, (2, 8))

  def grads(cfg):
    model = llama.Llama(cfg, rngs=nnx.Rngs(3))
    loss = lambda m: jnp.mean(m(*dense_inputs(ids)) ** 2)
    return nnx.jit(nnx.grad(loss))(model)

  base, other = grads(config), grads(dataclasses.replace(config, remat=remat))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other)):
    np.testing.assert_allclose(a, b, atol=1e-6)

  # As the trainer calls it: only part of the state is differentiated, the rest (the frozen base) is
  # a separate argument of the outer jit.
  def split_grads(cfg):
    graphdef, head, rest = nnx.split(llama.Llama(cfg, rngs=nnx.Rngs(3)), lambda path, _: 'norm' in path, ...)
    loss = lambda head, rest: jnp.mean(nnx.merge(graphdef, head, rest)(*dense_inputs(ids)) ** 2)
    return jax.jit(jax.grad(loss))(head, rest)

  base, other = split_grads(config), split_grads(dataclasses.replace(config, remat=remat))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _bf16_lora_grads(remat, scan_layers):
  """(loss, LoRA gradients, the compiled step's HLO) of a 3-layer bf16 model with fp32 adapters and
  dropout, the frozen base a separate argument, as the trainer runs it."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from palr_jax.model import lora  # pylint: disable=g-import-not-at-top
  config = make_config('gqa_4to1', num_layers=3, dtype='bfloat16', param_dtype='bfloat16', remat=remat,
                       scan_layers=scan_layers)
  model = llama.Llama(config, rngs=nnx.Rngs(3))
  lora.apply_lora(model, ml_collections.ConfigDict(dict(rank=4, alpha=8.0, dropout=0.1, dtype='float32',
                                                        targets=(r'.*(q_proj|down_proj)',))),
                  nnx.Rngs(params=4, dropout=5))
  for path, var in llama.named_params(model, nnx.LoRAParam).items():  # B = 0 at init: no gradient for A
    var.value = jnp.full(var.value.shape, 0.05, var.value.dtype) if path.endswith('lora_b') else var.value
  graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
  ids = np.random.default_rng(9).integers(0, 97, (2, 24))

  def loss(adapters, rest):
    rest = jax.tree.map(lambda leaf: leaf, rest)  # Variables of this trace: dropout advances its counts
    return jnp.mean(nnx.merge(graphdef, adapters, rest)(*dense_inputs(ids)).astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss))
  (value, grads), hlo = step(adapters, rest), step.lower(adapters, rest).compile().as_text()
  return float(value), jax.tree.leaves(grads), hlo


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_bf16_layer_scan_matches_unrolled_without_fp32_copies(remat):
  # The scan passes the frozen bf16 weights and the saved bf16 residuals as bit patterns: same loss and
  # gradients as the unrolled layers, and XLA keeps no fp32 stack of them ([layers, in, out] weights,
  # [layers, B, T, features] residuals) as it did with bf16 arrays in the loop.
  scanned, unrolled = _bf16_lora_grads(remat, True), _bf16_lora_grads(remat, False)
  np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-3)
  assert len(scanned[1]) == len(unrolled[1]) == 12
  for a, b in zip(scanned[1], unrolled[1]):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * np.abs(np.asarray(b)).max())
  upcasts = re.findall(r'= f32\[3,[\d,]+\]\S* convert\(', scanned[2])  # [layers, ...]: a whole stack
  assert not upcasts, upcasts


def test_layer_scan_refuses_gradients_for_frozen_bf16_weights():
  config = make_config('gqa_4to1', dtype='bfloat16', param_dtype='bfloat16')
  model = llama.Llama(config, rngs=nnx.Rngs(3))
  ids = np.random.default_rng(7).integers(0, 97, (2, 8))
  loss = lambda m: jnp.mean(m(*dense_inputs(ids)).astype(jnp.float32) ** 2)
  with pytest.raises(TypeError, match='frozen base weight.*scan_layers=False'):
    nnx.jit(nnx.grad(loss))(model)
  unrolled = llama.Llama(dataclasses.replace(config, scan_layers=False), rngs=nnx.Rngs(3))
  grads = nnx.jit(nnx.grad(loss))(unrolled)
  assert np.abs(np.asarray(grads.layers[0].mlp.up_proj.kernel.value, np.float32)).max() > 0


def test_bfloat16_compute_with_float32_params_is_close():
  config = make_config('gqa_4to1')
  tm = torch_model(config)
  ids = np.random.default_rng(8).integers(0, 97, (2, 12))
  ref = np.asarray(forward(jax_model(config, tm), *dense_inputs(ids)))
  bf16 = jax_model(dataclasses.replace(config, dtype='bfloat16'), tm)
  assert bf16.layers[0].mlp.up_proj.kernel.value.dtype == jnp.float32
  got = forward(bf16, *dense_inputs(ids))
  assert got.dtype == jnp.float32
  assert np.abs(np.asarray(got) - ref).max() < 0.1 * np.abs(ref).max()


def test_every_param_has_logical_axes_and_hf_paths():
  config = make_config('gqa_4to1')
  params = llama.named_params(llama.Llama(config))
  assert set(params) == set(llama_names.hf_param_names(config))
  for path, var in params.items():
    axes = var.get_metadata().get('logical_axes')
    assert axes is not None and len(axes) == var.value.ndim, path
    assert 'sharding_names' not in var.get_metadata() and 'out_sharding' not in var.get_metadata()
  assert params['layers.1.self_attn.k_proj.kernel'].value.shape == (64, 32)
  assert params['layers.1.self_attn.k_proj.kernel'].get_metadata()['logical_axes'] == ('embed', 'kv_heads')
  assert params['lm_head.kernel'].value.shape == (64, 97)
  tied = llama.named_params(llama.Llama(make_config('tied')))
  assert 'lm_head.kernel' not in tied


def test_hf_state_dict_errors_name_the_tensor():
  config = make_config()
  state = {k: v.numpy() for k, v in torch_model(config).state_dict().items()}
  missing = dict(state)
  del missing['model.layers.1.mlp.up_proj.weight']
  with pytest.raises(ValueError, match=r'missing tensor .*layers\.1\.mlp\.up_proj'):
    llama_names.params_from_hf_state_dict(config, missing)
  with pytest.raises(ValueError, match='unexpected tensor.*extra'):
    llama_names.params_from_hf_state_dict(config, dict(state, extra=np.zeros(1)))
  bad = dict(state, **{'model.norm.weight': np.zeros(47, np.float32)})
  with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(47,\), expected \(48,\)"):
    llama_names.params_from_hf_state_dict(config, bad)
  model = llama.Llama(config)
  with pytest.raises(ValueError, match='missing path'):
    llama.assign_params(model, {})


def test_config_from_hf_roundtrip_and_validation():
  config = make_config('llama3_rope', eos_token_id=[2, 5])
  assert config.eos_token_id == (2, 5)
  assert hash(config) == hash(make_config('llama3_rope', eos_token_id=(2, 5)))
  # transformers 5 writes the `rope_parameters` layout.
  hf = transformers.LlamaConfig(**llama_names.config_to_hf(config)).to_dict()
  assert llama_names.config_from_hf(hf) == config
  assert llama_names.config_from_hf(llama_names.config_to_hf(config), dtype='bfloat16').dtype == 'bfloat16'
  with pytest.raises(ValueError, match='num_kv_heads'):
    make_config(num_kv_heads=4)
  with pytest.raises(ValueError, match='yarn'):
    make_config(rope_scaling={'rope_type': 'yarn', 'factor': 2.0})
  with pytest.raises(ValueError, match='remat'):
    make_config(remat='some')
  with pytest.raises(ValueError, match='missing key'):
    llama_names.config_from_hf({'vocab_size': 3})
  with pytest.raises(TypeError, match='unexpected keyword'):
    llama_names.config_from_hf(hf, rope_theta=1.0)  # only runtime settings, not architecture
