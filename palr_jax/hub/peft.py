"""PEFT LoRA adapter folders (`adapter_config.json` + `adapter_model.safetensors`) <-> our adapters.

The folder is what `peft.PeftModel.from_pretrained(base, DIR)` loads over the HF base model; tensor
names and layouts come from `palr_jax.model.lora.peft_state_dict`. `target_modules` is written as PEFT's
suffix list when that names exactly the adapted modules (the usual `q_proj`/`v_proj` case), else as a
regex matching exactly them, so PEFT wraps the same modules we trained.
"""
from __future__ import annotations

import re

import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from safetensors.numpy import load, save

from palr_jax import files
from palr_jax.model import item_tokens, llama, lora

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'


def _linear_paths(model) -> list[str]:
  """Module paths of every Linear (`layers.0.self_attn.q_proj`, `lm_head`)."""
  return sorted(p.removesuffix('.kernel') for p in llama.named_params(model) if p.endswith('.kernel'))


def _adapted_paths(model) -> list[str]:
  return sorted(p.removesuffix('.lora_a') for p in llama.named_params(model, nnx.LoRAParam)
                if p.endswith('.lora_a'))


def target_modules(model) -> list[str] | str:
  """PEFT `target_modules` naming exactly the model's adapted modules (HF module names)."""
  adapted = _adapted_paths(model)
  if not adapted:
    raise ValueError('PEFT export: the model has no LoRA adapters')
  suffixes = sorted({p.rsplit('.', 1)[-1] for p in adapted})
  if sorted(p for p in _linear_paths(model) if p.rsplit('.', 1)[-1] in suffixes) == adapted:
    return suffixes
  return '|'.join(re.escape(lora.hf_module_path(p)) for p in adapted)


def save_adapter(out_dir, model, lora_config, base_model_name_or_path: str, values=None,
                 placeholder_id: int | None = None) -> None:
  """Writes the PEFT folder for `model`'s adapters, or for `values` ({dotted adapter path: host array},
  the trainer's flat form) on `model`'s modules. Each file is written whole and moved into place (any
  epath filesystem); the adapter file comes first, the config last."""
  tensors = lora.peft_state_dict(model, values)
  ranks = {v.shape[0] for k, v in tensors.items() if k.endswith('lora_A.weight')}
  scales = {node.scale for _, node in nnx.iter_graph(model) if isinstance(node, lora.LoRALinear)}
  if ranks != {lora_config.rank} or scales != {lora_config.alpha / lora_config.rank}:
    raise ValueError(f'PEFT export: the adapters have rank(s) {sorted(ranks)} and scale(s) {sorted(scales)}; '
                     f'the lora config says rank {lora_config.rank}, alpha/rank '
                     f'{lora_config.alpha / lora_config.rank}')
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': base_model_name_or_path,
      'r': int(lora_config.rank), 'lora_alpha': float(lora_config.alpha),
      'lora_dropout': float(lora_config.dropout), 'target_modules': target_modules(model),
      'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False, 'inference_mode': True,
  }
  out_dir = epath.Path(out_dir)
  files.atomic_write_bytes(out_dir / WEIGHTS_FILE, save({k: np.ascontiguousarray(v, np.float32) for k, v in
                                                     tensors.items()}, metadata={'format': 'pt'}))
  # Collaborative item tokens: the projector trained with the adapter, beside it (no-op without one).
  item_tokens.save_projector(out_dir, model, placeholder_id, values)
  files.atomic_write_json(out_dir / CONFIG_FILE, adapter_config)


def lora_config_for(folder, model, dtype: str) -> ml_collections.ConfigDict:
  """A `config.lora`-shaped section that `lora.apply_lora` turns into the adapter's modules: rank,
  alpha and dropout from adapter_config.json, targets as exact regexes of our matching module paths.
  Options that would change the function (rslora, DoRA, per-module ranks, biases ...) are errors."""
  path = epath.Path(folder) / CONFIG_FILE
  cfg = files.read_json(path)
  for key in ('r', 'lora_alpha', 'target_modules'):
    if key not in cfg:
      raise ValueError(f'{path}: no {key!r}')
  if cfg.get('peft_type', 'LORA') != 'LORA':
    raise ValueError(f"{path}: peft_type is {cfg['peft_type']!r}; only LORA adapters are supported")
  changes_maths = [k for k in ('use_rslora', 'use_dora', 'rank_pattern', 'alpha_pattern', 'layers_to_transform',
                               'modules_to_save', 'exclude_modules') if cfg.get(k)]
  if changes_maths or cfg.get('bias', 'none') != 'none':
    raise ValueError(f'{path}: {changes_maths or ["bias"]} set; only plain LoRA (one rank and alpha, no '
                     'biases or extra modules) is supported')
  wanted = cfg['target_modules']
  if isinstance(wanted, str):
    match = lambda name: re.fullmatch(wanted, name) is not None  # noqa: E731
  else:
    match = lambda name: any(name == t or name.endswith('.' + t) for t in wanted)  # noqa: E731
  paths = [p for p in _linear_paths(model) if match(lora.hf_module_path(p))]
  if not paths:
    raise ValueError(f'{path}: target_modules {wanted!r} matches no module of this model')
  return ml_collections.ConfigDict({
      'rank': int(cfg['r']), 'alpha': float(cfg['lora_alpha']), 'dropout': float(cfg.get('lora_dropout', 0.0)),
      'targets': tuple(re.escape(p) for p in paths), 'dtype': dtype})


def load_adapter(model, folder, mesh=None, rules=None) -> None:
  """Sets a LoRA-wrapped model's adapters from a PEFT folder (wrapped as `lora_config_for` says), and its
  item projector from `item_projector.safetensors` when the folder has one (attached, laid out on `mesh`
  by `rules`, if the model has none yet)."""
  path = epath.Path(folder) / WEIGHTS_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found')
  try:
    tensors = load(path.read_bytes())
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
    raise ValueError(f'{path}: not a readable safetensors file ({e})') from None
  try:
    lora.load_peft_state_dict(model, tensors)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  item_tokens.load_projector(model, folder, mesh, rules)
