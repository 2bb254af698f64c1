"""LoRA: identity at init, W + (alpha/r) A B semantics, merge, targets, dropout, PEFT parity."""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import peft
import pytest
import torch

from palr_jax.model import llama, lora
from test_llama import dense_inputs, forward, jax_model, make_config, torch_model


def lora_config(**overrides):
  c = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0, dtype='float32',
                                     targets=(r'.*self_attn\.(q_proj|v_proj)',)))
  c.update(overrides)
  return c


def randomize_adapters(model, seed=0):
  rng = np.random.default_rng(seed)
  for var in llama.named_params(model, lora.TRAINABLE).values():
    var.value = jnp.asarray(0.2 * rng.normal(size=var.value.shape), var.value.dtype)


IDS = np.random.default_rng(0).integers(0, 97, (2, 9))


def test_zero_b_equals_base_and_adds_logical_axes():
  config = make_config('gqa_4to1')
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  base = np.asarray(forward(model, *dense_inputs(IDS)))
  lora.apply_lora(model, lora_config(), nnx.Rngs(1))
  np.testing.assert_array_equal(forward(model, *dense_inputs(IDS)), base)
  q = model.layers[1].self_attn.q_proj
  assert isinstance(q, lora.LoRALinear) and type(model.layers[1].self_attn.k_proj) is llama.Linear
  assert q.lora_a.get_metadata()['logical_axes'] == ('embed', 'lora_rank')
  assert q.lora_b.get_metadata()['logical_axes'] == ('lora_rank', 'heads')
  assert q.lora_a.value.shape == (64, 4) and q.lora_b.value.shape == (4, 128)
  assert not np.any(q.lora_b.value) and np.any(q.lora_a.value)
  assert set(llama.named_params(model, lora.TRAINABLE)) == {
      f'layers.{i}.self_attn.{p}_proj.lora_{ab}' for i in range(2) for p in 'qv' for ab in 'ab'}
  assert 'layers.0.self_attn.q_proj.kernel' in llama.named_params(model, lora.FROZEN)


def test_nonzero_adapters_equal_manual_update_and_merge():
  config = make_config('tied')
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  base_params = {p: np.asarray(v.value) for p, v in llama.named_params(model).items()}
  lora.apply_lora(model, lora_config(targets=(r'.*(q_proj|down_proj)',), alpha=6.0), nnx.Rngs(1))
  randomize_adapters(model)
  manual = dict(base_params)
  for path, var in llama.named_params(model, lora.TRAINABLE).items():
    if path.endswith('lora_a'):
      module = path[:-len('.lora_a')]
      a, b = np.asarray(var.value), np.asarray(llama.named_params(model)[f'{module}.lora_b'].value)
      manual[f'{module}.kernel'] = base_params[f'{module}.kernel'] + (6.0 / 4) * a @ b
  reference = llama.Llama(config)
  llama.assign_params(reference, manual)
  expected = np.asarray(forward(reference, *dense_inputs(IDS)))
  got = np.asarray(forward(model, *dense_inputs(IDS)))
  base = np.asarray(forward(llama.Llama(config, rngs=nnx.Rngs(0)), *dense_inputs(IDS)))
  assert np.abs(got - base).max() > 1e-2
  np.testing.assert_allclose(got, expected, atol=1e-5)
  merged = lora.merge_lora(model)
  assert not llama.named_params(merged, lora.TRAINABLE)
  for path, value in manual.items():
    np.testing.assert_allclose(llama.named_params(merged)[path].value, value, atol=1e-6, err_msg=path)
  np.testing.assert_allclose(forward(merged, *dense_inputs(IDS)), expected, atol=1e-5)


def test_targets_by_regex():
  config = make_config()
  targets = (r'.*mlp\.\w+_proj', r'layers\.1\.self_attn\.o_proj')
  model = lora.apply_lora(llama.Llama(config), lora_config(targets=targets), nnx.Rngs(0))
  wrapped = {'.'.join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, lora.LoRALinear)}
  assert wrapped == (
      {f'layers.{i}.mlp.{n}' for i in range(2) for n in ('gate_proj', 'up_proj', 'down_proj')}
      | {'layers.1.self_attn.o_proj'})
  with pytest.raises(ValueError, match='already has LoRA'):
    lora.apply_lora(model, lora_config(), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'q_proj' matches no Linear"):  # full match, like PEFT's regex
    lora.apply_lora(llama.Llama(config), lora_config(targets=('q_proj',)), nnx.Rngs(0))


def test_only_adapters_get_gradients():
  config = make_config()
  model = lora.apply_lora(llama.Llama(config), lora_config(), nnx.Rngs(0))
  loss = lambda m: jnp.mean(m(*dense_inputs(IDS)) ** 2)
  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.TRAINABLE)))(model)
  flat = {'.'.join(map(str, p)): v.value for p, v in nnx.to_flat_state(grads)}
  assert set(flat) == set(llama.named_params(model, lora.TRAINABLE))
  # dL/dB = (x A)^T dL/dy is non-zero; dL/dA = x^T dL/dy B^T vanishes while B = 0.
  assert np.abs(flat['layers.0.self_attn.q_proj.lora_b']).max() > 0
  assert np.abs(flat['layers.0.self_attn.q_proj.lora_a']).max() == 0


def test_dropout_in_train_mode_only():
  config = make_config()
  model = lora.apply_lora(llama.Llama(config), lora_config(dropout=0.5), nnx.Rngs(params=0, dropout=1))
  randomize_adapters(model)
  ids = dense_inputs(IDS)
  first, second = np.asarray(forward(model, *ids)), np.asarray(forward(model, *ids))
  assert np.abs(first - second).max() > 1e-3  # a fresh mask per call
  evaluated = nnx.view(model, deterministic=True)
  no_dropout = lora.apply_lora(llama.Llama(config), lora_config(dropout=0.0), nnx.Rngs(params=0))
  randomize_adapters(no_dropout)
  np.testing.assert_allclose(forward(evaluated, *ids), forward(no_dropout, *ids), atol=1e-6)


@pytest.mark.parametrize('rate', [0.05, 0.5])
def test_hash_dropout_masks_are_bernoulli_and_fresh_per_call(rate):
  # Each element kept with probability 1 - rate (4 sigma over 2^20 elements), kept values scaled by its
  # inverse, masks of two calls and of two streams independent (agreement p^2 + (1-p)^2), none constant
  # along an axis; eval mode is the identity.
  dropout = lora.HashDropout(rate, rngs=nnx.Rngs(dropout=3))
  x = jnp.ones((4, 512, 512), jnp.bfloat16)
  first, second = np.asarray(dropout(x), np.float32), np.asarray(dropout(x), np.float32)
  other = np.asarray(lora.HashDropout(rate, rngs=nnx.Rngs(dropout=4))(x), np.float32)
  keep, n = 1 - rate, x.size
  sigma = np.sqrt(keep * rate / n)
  for mask in (first > 0, second > 0, other > 0):
    assert abs(mask.mean() - keep) < 4 * sigma
    assert abs(mask.mean(axis=(0, 1)) - keep).max() < 8 * np.sqrt(keep * rate / 2048)  # no bad column
  np.testing.assert_allclose(np.unique(first[first > 0]), [1 / keep], rtol=4e-3)  # bf16 rounding
  agree = keep ** 2 + rate ** 2
  for a, b in ((first, second), (first, other)):
    assert abs(((a > 0) == (b > 0)).mean() - agree) < 6 * np.sqrt(agree * (1 - agree) / n)
  dropout.deterministic = True
  np.testing.assert_array_equal(np.asarray(dropout(x)), np.asarray(x))


def test_float32_adapters_with_bfloat16_compute():
  config = make_config('gqa_4to1', dtype='bfloat16', param_dtype='bfloat16')
  model = lora.apply_lora(llama.Llama(config), lora_config(dtype='float32'), nnx.Rngs(0))
  randomize_adapters(model)
  assert model.layers[0].self_attn.q_proj.lora_a.value.dtype == jnp.float32
  assert model.layers[0].self_attn.q_proj.kernel.value.dtype == jnp.bfloat16
  loss = lambda m: jnp.mean(m(*dense_inputs(IDS)) ** 2)
  value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, lora.TRAINABLE)))(model)
  assert np.isfinite(value)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in leaves)
  merged = lora.merge_lora(model)
  assert merged.layers[0].self_attn.q_proj.kernel.value.dtype == jnp.bfloat16


def test_peft_adapter_parity_and_roundtrip():
  config = make_config('gqa_4to1')
  tm = torch_model(config)
  targets = (r'.*(q_proj|v_proj|up_proj)',)
  model = lora.apply_lora(jax_model(config, tm), lora_config(targets=targets), nnx.Rngs(0))
  wrong_rank = lora.apply_lora(jax_model(config, tm), lora_config(rank=2, targets=targets), nnx.Rngs(0))
  pm = peft.get_peft_model(tm, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                               target_modules=['q_proj', 'v_proj', 'up_proj']))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if 'lora_' in name:
        p.copy_(0.2 * torch.randn_like(p))
  tensors = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
  with torch.no_grad():
    expected = pm(input_ids=torch.tensor(IDS)).logits.numpy()
  lora.load_peft_state_dict(model, tensors)
  np.testing.assert_allclose(forward(model, *dense_inputs(IDS)), expected, atol=1e-4)
  exported = lora.peft_state_dict(model)
  assert exported.keys() == tensors.keys()
  for k, v in tensors.items():
    np.testing.assert_array_equal(exported[k], v)
  with pytest.raises(ValueError, match='missing tensor'):
    lora.load_peft_state_dict(model, {k: v for k, v in tensors.items() if 'up_proj' not in k})
  with pytest.raises(ValueError, match='expected .*rank'):
    lora.load_peft_state_dict(wrong_rank, tensors)
