"""Hugging Face `LlamaForCausalLM` <-> `palr_jax.model.llama`: config.json keys and parameter names.

The model knows no file format: this is the one place that spells HF's config keys and state-dict names.
Our parameter paths are HF's names without the `model.` prefix (`layers.3.self_attn.q_proj.kernel`) and
our kernels are [in, out], so the conversion is a name table plus transposes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from palr_jax.model import llama


def config_from_hf(hf: Mapping[str, Any], **runtime) -> llama.LlamaConfig:
  """From an HF `config.json` dict (transformers 4 `rope_scaling` or 5 `rope_parameters` layout).

  `runtime` sets dtype / param_dtype / remat / attention / scan_layers, which HF configs do not describe.
  """
  unknown = set(runtime) - {'dtype', 'param_dtype', 'remat', 'attention', 'scan_layers'}
  if unknown:
    raise TypeError(f'config_from_hf: unexpected keyword(s) {sorted(unknown)}')
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
  return llama.LlamaConfig(
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


def config_to_hf(config: llama.LlamaConfig) -> dict[str, Any]:
  """An HF `LlamaForCausalLM` config.json dict (readable by transformers 4 and 5)."""
  out = dict(
      architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=config.vocab_size,
      hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act='silu',
      rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False,
      bos_token_id=config.bos_token_id,
      eos_token_id=list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
      pad_token_id=config.pad_token_id, torch_dtype=config.param_dtype)
  if config.rope_scaling:
    out['rope_scaling'] = dict(config.rope_scaling)
  return out


def hf_param_names(config: llama.LlamaConfig) -> dict[str, tuple[str, bool]]:
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


def param_shapes(config: llama.LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Our dotted parameter path -> shape, without building the model."""
  model = llama.abstract_model(config)
  return {path: tuple(v.shape) for path, v in llama.named_params(model).items()}


def params_from_hf_state_dict(config: llama.LlamaConfig, state_dict: Mapping[str, np.ndarray]
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
