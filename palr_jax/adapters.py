"""The adapters a run trained, added to a model for inference (ranking, export, generation).

They are read from the run's PEFT folders (`W/<variant>/adapters/step_<N>`, written after training by
`train.checkpointing.write_adapters`), else from its orbax checkpoint, else from an exported PEFT folder.
"""
from __future__ import annotations

from etils import epath
from flax import nnx
import ml_collections

from palr_jax.hub import load, peft
from palr_jax.model import lora
from palr_jax.train import checkpointing

# Where a run folder may keep an exported adapter in PEFT layout, in order of preference.
ADAPTER_DIRS = ('export/peft', 'adapter')


def find_adapter(workdir) -> epath.Path | None:
  """The PEFT adapter folder of a run (`W/export/peft` or `W/adapter`), or None."""
  for name in ADAPTER_DIRS:
    folder = epath.Path(workdir) / name
    if (folder / peft.CONFIG_FILE).exists():
      return folder
  return None


def apply_trained_adapter(model: nnx.Module, workdir, step: int | None = None, *, mesh=None, rules=None
                          ) -> tuple[str, ml_collections.ConfigDict]:
  """Adds the adapters trained in `workdir` to `model` (in place, laid out on `mesh` by `rules`), from,
  in this order: the PEFT folder of checkpoint `step` (`W/adapters/step_<N>`, default the latest), the
  trainer's orbax checkpoint `step` (LoRA settings from the config saved with it), a PEFT folder of an
  export (`find_adapter`, when no step is asked for). A model that has adapters already gets their values
  replaced. Returns (where they came from, the lora config section)."""
  workdir = epath.Path(workdir)
  has_adapters = bool(lora.lora_state(model))
  written = checkpointing.adapter_steps(workdir)
  directory = workdir / 'checkpoints'
  if written and (step is None or step in written):
    folder = checkpointing.adapter_dir(workdir, written[-1] if step is None else step)
  elif directory.exists() and checkpointing.orbax_manager(directory).all_steps():
    manager = checkpointing.orbax_manager(directory)
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
      raise FileNotFoundError(f'{directory}: no checkpoint for step {step}; have {sorted(manager.all_steps())}')
    saved = checkpointing.saved_config(manager, step)
    if 'lora' not in saved:
      raise ValueError(f'{directory}/{step}: the saved config has no lora section')
    lora_config = ml_collections.ConfigDict(saved['lora'])
    if not has_adapters:
      load.add_lora(model, lora_config, nnx.Rngs(0), mesh, rules)
    checkpointing.restore_adapters(model, directory, step)
    return f'{directory}/{step} (orbax)', lora_config
  elif step is not None:
    raise FileNotFoundError(f'{workdir}: no adapters or checkpoint for step {step} (have {written})')
  else:
    folder = find_adapter(workdir)
    if folder is None:
      raise FileNotFoundError(f'{workdir}: no trained adapter (no {checkpointing.ADAPTERS}/step_N, no checkpoint '
                              f'under checkpoints/, no PEFT folder at {" or ".join(ADAPTER_DIRS)})')
  lora_config = peft.lora_config_for(folder, model, 'float32')
  if not has_adapters:
    load.add_lora(model, lora_config, nnx.Rngs(0), mesh, rules)
  peft.load_adapter(model, folder, mesh, rules)
  return f'{folder} (PEFT)', lora_config
