"""Collaborative item tokens (LLaRA-style hybrid prompts): an item's MF factor, projected into the LLM's
embedding space, replaces the token embedding at a placeholder position beside the item's title.

`attach(model, factors, ...)` adds an `ItemProjector` to a Llama as `model.item_tokens`. It holds the
retriever's item factors [N, F] as a frozen `ItemFactors` variable (not an `nnx.Param`, so LoRA merging and
`llama.assign_params` never see it) and a 2-layer GELU MLP F -> hidden -> D whose weights are
`ProjectorParam`, a subclass of `nnx.LoRAParam`: the train step's split (`train.step.split_model`), the
orbax adapter checkpoints and `lora.lora_state` treat them as adapters, with no change there. Every
variable carries `logical_axes` (`item_vocab`, `item_factor`, `item_hidden`, `embed`), sharded by
`config.mesh.rules` like the base.

The model then takes `item_ids` [B, T] (int32, -1 where a position is an ordinary token):
`model(ids, positions, segments, item_ids=item_ids)`. Exported beside the PEFT adapter as
`item_projector.safetensors` (`save_projector`, `load_projector`; `LOADER_NOTE` says how to use it).
"""
from __future__ import annotations

from collections.abc import Mapping
import io
import json
from typing import Any

from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from palr_jax import files
from palr_jax import sharding

WEIGHTS_FILE = 'item_projector.safetensors'
NOTE_FILE = 'ITEM_TOKENS.md'
ATTRIBUTE = 'item_tokens'           # the projector's attribute on the Llama (its parameter path prefix)
TENSORS = ('fc1.kernel', 'fc1.bias', 'fc2.kernel', 'fc2.bias', 'factors')

LOADER_NOTE = """\
# Collaborative item tokens

`{weights}` holds the item projector trained with this LoRA adapter (palr_jax/model/item_tokens.py):

- `factors` [N, F]: the retriever's MF item factors, row = dense item index (palr_jax item order).
- `fc1.kernel` [F, H], `fc1.bias` [H], `fc2.kernel` [H, D], `fc2.bias` [D] (kernels are [in, out]).

The soft token of item i is `gelu(factors[i] @ fc1.kernel + fc1.bias) @ fc2.kernel + fc2.bias` (tanh-approximate
GELU, as `jax.nn.gelu`). It replaces the input embedding at the placeholder token (token id {placeholder})
written after each item title of the prompt; every other position embeds as usual. With transformers:
`embeds = model.get_input_embeddings()(input_ids); embeds[input_ids == {placeholder}] = projected items;
model(inputs_embeds=embeds, ...)` with the PEFT adapter of this folder loaded.
"""


class ProjectorParam(nnx.LoRAParam):
  """A trainable projector weight: an `nnx.LoRAParam`, so it is trained and checkpointed with the adapters."""


class ItemFactors(nnx.Variable):
  """The frozen MF item factor table [N, F] (not an `nnx.Param`: never merged into or assigned as a base
  weight)."""


class ItemProjector(nnx.Module):
  """item index -> soft token [D]: fc2(gelu(fc1(factors[i])))."""

  def __init__(self, factors: np.ndarray, hidden: int, out_features: int, *, rngs: nnx.Rngs,
               dtype: str = 'float32', param_dtype: str = 'float32'):
    factors = np.asarray(factors, np.float32)
    if factors.ndim != 2 or not factors.shape[0] or hidden < 1:
      raise ValueError(f'item tokens: factors must be [N, F] with N > 0 and hidden >= 1, got '
                       f'{factors.shape} and hidden={hidden}')
    f = factors.shape[1]
    self.dtype = dtype
    self.placeholder_id = None   # the placeholder token, when read from an exported file (the loader note)
    self.factors = ItemFactors(jnp.asarray(factors, param_dtype), logical_axes=('item_vocab', 'item_factor'))
    init = nnx.initializers.lecun_normal()
    self.fc1 = _Dense(init(rngs.params(), (f, hidden), param_dtype), ('item_factor', 'item_hidden'))
    # fc2 starts small, so a new soft token starts near the origin, not as noise the size of a word embedding.
    self.fc2 = _Dense(nnx.initializers.normal(0.02 / np.sqrt(hidden))(rngs.params(), (hidden, out_features),
                                                                       param_dtype), ('item_hidden', 'embed'))

  @property
  def num_items(self) -> int:
    return self.factors.shape[0]

  def project(self, factors: jax.Array) -> jax.Array:
    """Factors [..., F] -> soft tokens [..., D] (fp32)."""
    return self.fc2(jax.nn.gelu(self.fc1(factors.astype(self.dtype))))

  def __call__(self, item_ids: jax.Array) -> jax.Array:
    """Soft tokens [B, T, D] (fp32) of item indices [B, T] (-1 rows give item 0's; the caller masks them)."""
    return self.project(jnp.take(self.factors[...], jnp.maximum(item_ids, 0), axis=0))


class _Dense(nnx.Module):
  def __init__(self, kernel: jax.Array, axes: tuple[str, str]):
    self.kernel = ProjectorParam(kernel, logical_axes=axes)
    self.bias = ProjectorParam(jnp.zeros((kernel.shape[1],), kernel.dtype), logical_axes=(axes[1],))

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel[...]
    return jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32) + self.bias[...].astype(jnp.float32)


def projector(model: nnx.Module) -> ItemProjector | None:
  return getattr(model, ATTRIBUTE, None)


def attach(model: nnx.Module, factors: np.ndarray, hidden: int, rngs: nnx.Rngs, mesh=None, rules=None,
           dtype: str = 'float32') -> ItemProjector:
  """Adds a fresh `ItemProjector` to `model` (in place) as `model.item_tokens`, laid out on `mesh` by
  `rules` (the factors too). `hidden` 0 = the LLM's hidden size."""
  if projector(model) is not None:
    raise ValueError('item tokens: the model already has an item projector')
  d = model.config.hidden_size
  module = ItemProjector(factors, hidden or d, d, rngs=rngs, dtype=dtype, param_dtype=dtype)
  setattr(model, ATTRIBUTE, module)
  if mesh is not None:
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
  return module


def embed(model: nnx.Module, x: jax.Array, item_ids: jax.Array | None) -> jax.Array:
  """Token embeddings `x` [B, T, D] with the soft token of item_ids[b, t] wherever it is >= 0."""
  module = projector(model)
  if item_ids is None:
    return x
  if module is None:
    raise ValueError('item_ids given, but the model has no item projector (item_tokens.attach)')
  soft = module(item_ids).astype(x.dtype)
  return jnp.where((item_ids >= 0)[..., None], soft, x)


# ----------------------------------------------------------------------------------------- files


def read_factors(path) -> np.ndarray:
  """The retriever's item factors [N, F] (float32 .npy, `stages/retriever.py` ITEM_FACTORS)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; run the retriever stage (it writes the MF item factors)')
  try:
    factors = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
  except ValueError as e:
    raise ValueError(f'{path}: not a readable .npy array ({e})') from None
  if factors.ndim != 2 or not factors.shape[0]:
    raise ValueError(f'{path}: shape {factors.shape}; expected [num_items, factors]')
  return factors.astype(np.float32)


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.ascontiguousarray(np.asarray(x, np.float32))


def projector_tensors(model: nnx.Module, values: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """{'fc1.kernel', ..., 'factors'}: host float32 arrays of the model's projector, its weights taken from
  `values` (the trainer's flat adapter form, `item_tokens.fc1.kernel` ...) where given."""
  module = projector(model)
  if module is None:
    return {}
  own = {'fc1.kernel': module.fc1.kernel, 'fc1.bias': module.fc1.bias, 'fc2.kernel': module.fc2.kernel,
         'fc2.bias': module.fc2.bias, 'factors': module.factors}
  out = {}
  for name, var in own.items():
    key = f'{ATTRIBUTE}.{name}'
    out[name] = _host(values[key] if values is not None and key in values else var.get_value())
  return out


def save_projector(out_dir, model: nnx.Module, placeholder_id: int | None = None,
                   values: Mapping[str, Any] | None = None) -> bool:
  """Writes `item_projector.safetensors` and the loader note into `out_dir` when the model has a projector;
  returns whether it did."""
  tensors = projector_tensors(model, values)
  if not tensors:
    return False
  if placeholder_id is None:   # a projector read from a folder keeps the placeholder its file named
    placeholder_id = getattr(projector(model), 'placeholder_id', None)
  out_dir = epath.Path(out_dir)
  meta = {'format': 'np', 'placeholder_id': str(-1 if placeholder_id is None else int(placeholder_id))}
  files.atomic_write_bytes(out_dir / WEIGHTS_FILE, st_save(tensors, metadata=meta))
  note = LOADER_NOTE.format(weights=WEIGHTS_FILE, placeholder='?' if placeholder_id is None else placeholder_id)
  files.atomic_write_bytes(out_dir / NOTE_FILE, note.encode())
  return True


def read_projector(folder) -> dict[str, np.ndarray] | None:
  """The tensors of `folder/item_projector.safetensors`, None when the folder has none."""
  path = epath.Path(folder) / WEIGHTS_FILE
  if not path.exists():
    return None
  data = path.read_bytes()
  tensors = st_load(data)
  missing = sorted(set(TENSORS) - set(tensors))
  if missing:
    raise ValueError(f'{path}: missing tensor(s) {missing}; expected {list(TENSORS)}')
  header = json.loads(data[8:8 + int.from_bytes(data[:8], 'little')])   # safetensors: u64 length, JSON
  placeholder = int(header.get('__metadata__', {}).get('placeholder_id', -1))
  return {**tensors, '__placeholder_id__': placeholder}


def load_projector(model: nnx.Module, folder, mesh=None, rules=None, dtype: str = 'float32') -> bool:
  """Sets (or attaches, then sets) the model's projector from `folder/item_projector.safetensors`; returns
  False when there is none. Shapes must match a projector already attached."""
  tensors = read_projector(folder)
  if tensors is None:
    return False
  module = projector(model)
  if module is None:
    module = attach(model, tensors['factors'], int(tensors['fc1.kernel'].shape[1]), nnx.Rngs(0), mesh, rules,
                    dtype)
  placeholder = int(tensors.pop('__placeholder_id__'))
  module.placeholder_id = None if placeholder < 0 else placeholder
  own = {'fc1.kernel': module.fc1.kernel, 'fc1.bias': module.fc1.bias, 'fc2.kernel': module.fc2.kernel,
         'fc2.bias': module.fc2.bias, 'factors': module.factors}
  for name, var in own.items():
    value = tensors[name]
    old = var.get_value()
    if tuple(value.shape) != tuple(old.shape):
      raise ValueError(f'{epath.Path(folder) / WEIGHTS_FILE}: {name} has shape {tuple(value.shape)}, '
                       f'expected {tuple(old.shape)}')
    new = jnp.asarray(value, old.dtype)
    if getattr(old, 'sharding', None) is not None and mesh is not None:
      new = jax.device_put(new, old.sharding)
    var.set_value(new)
  return True
