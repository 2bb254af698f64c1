"""LoRA adapters for `palr_jax.model.llama.Llama`: wrap, filter, merge, and PEFT naming.

`apply_lora` swaps each targeted `llama.Linear` for a `LoRALinear` that keeps the same `kernel` variable
(so base paths and checkpoints are unchanged) and adds `lora_a` [in, r] / `lora_b` [r, out] as
`nnx.LoRAParam`. y = x W + (alpha / r) * dropout(x) A B, with B = 0 at init so step 0 is the base model
(PEFT's LoRA, whose adapter files `peft_state_dict` / `load_peft_state_dict` read and write).
"""
from __future__ import annotations

from collections.abc import Mapping
import functools
import re
from typing import Any

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from palr_jax.model import llama
from palr_jax.model import scan

TRAINABLE = nnx.LoRAParam
FROZEN = scan.FROZEN


def _mix32(x: jax.Array) -> jax.Array:
  """An invertible uint32 -> uint32 mixing function with full avalanche (C. Wellons' 'lowbias32')."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


class HashDropout(nnx.Dropout):
  """`nnx.Dropout` whose mask comes from a keyed hash of each element's index (two words drawn from the
  rng stream per call), not from threefry bits per element.

  Why: threefry bits per element are slow on CPU, a LoRA step draws a mask per adapted projection, and
  remat draws them again when it recomputes them: a sizeable part of a bf16 step, which the hash cuts
  (bench/RESULTS.md, "Train step: reading and remat policies").
  The keep probability is rounded to a multiple of 2^-24, and the kept values are scaled by exactly its
  inverse. Same switches as `nnx.Dropout`: `deterministic`, `model.eval()`, `nnx.view`.
  """

  def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    stream = self.rngs if rngs is None else rngs
    key = stream[self.rng_collection]() if isinstance(stream, nnx.Rngs) else (
        stream if isinstance(stream, jax.Array) else stream())
    words = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(inputs.shape, jnp.uint32)
    for axis in range(inputs.ndim):  # the flat element index, without a reshape (keeps any sharding)
      index = index * jnp.uint32(inputs.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, inputs.shape, axis)
    threshold = round((1.0 - self.rate) * 2 ** 24)
    keep = (_mix32(_mix32(index ^ words[0]) + words[1]) >> 8) < jnp.uint32(threshold)
    scaled = (inputs.astype(jnp.float32) * (2 ** 24 / threshold)).astype(inputs.dtype)
    return jnp.where(keep, scaled, jnp.zeros_like(inputs))


class LoRALinear(llama.Linear):
  """A `Linear` plus a scaled low-rank update; the base kernel is the wrapped module's own variable."""

  def __init__(self, base: llama.Linear, *, rank: int, alpha: float, dropout: float, dtype: str,
               rngs: nnx.Rngs):
    self.in_features, self.out_features = base.in_features, base.out_features
    self.dtype, self.out_dtype = base.dtype, base.out_dtype
    self.kernel = base.kernel
    in_axis, out_axis = base.kernel.get_metadata()['logical_axes']
    # PEFT's default A init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
    init_a = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
    self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (self.in_features, rank), dtype),
                                logical_axes=(in_axis, 'lora_rank'))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, self.out_features), dtype),
                                logical_axes=('lora_rank', out_axis))
    self.scale = alpha / rank
    self.dropout = HashDropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = llama.matmul(x, self.kernel[...], self.dtype)
    h = x if self.dropout is None else self.dropout(x)
    h = llama.matmul(h, self.lora_a[...], self.dtype)
    h = llama.matmul(h.astype(self.dtype), self.lora_b[...], self.dtype)
    return checkpoint_name((y + self.scale * h).astype(self.out_dtype), scan.PROJECTION)


def _modules(model: nnx.Module, kind: type) -> dict[str, nnx.Module]:
  return {'.'.join(map(str, path)): node for path, node in nnx.iter_graph(model)
          if isinstance(node, kind)}


def _set_module(model: nnx.Module, path: str, module: nnx.Module) -> None:
  *parents, name = [int(p) if p.isdigit() else p for p in path.split('.')]
  parent = model
  for p in parents:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  if isinstance(name, int):
    parent[name] = module
  else:
    setattr(parent, name, module)


def apply_lora(model: llama.Llama, lora_config, rngs: nnx.Rngs) -> llama.Llama:
  """Wraps (in place, and returns) every Linear whose dotted path fully matches a `lora_config.targets`
  regex (like PEFT's string `target_modules`), e.g. `layers.3.self_attn.q_proj`.

  `rngs` provides `params` (A init) and `dropout` streams. Dropout is active until the model is put in
  eval mode (`model.eval()` or `nnx.view(model, deterministic=True)`).
  """
  if _modules(model, LoRALinear):
    raise ValueError('apply_lora: the model already has LoRA adapters')
  if lora_config.rank < 1:
    raise ValueError(f'config.lora.rank must be >= 1, got {lora_config.rank}')
  linears = _modules(model, llama.Linear)
  patterns = [re.compile(t) for t in lora_config.targets]
  for pattern in patterns:
    if not any(pattern.fullmatch(path) for path in linears):
      raise ValueError(f'config.lora.targets: {pattern.pattern!r} matches no Linear module '
                       f'(paths look like {sorted(linears)[:4]} ...)')
  for path, base in linears.items():
    if any(p.fullmatch(path) for p in patterns):
      _set_module(model, path, LoRALinear(base, rank=lora_config.rank, alpha=lora_config.alpha,
                                          dropout=lora_config.dropout, dtype=lora_config.dtype,
                                          rngs=rngs))
  return model


def lora_state(model: nnx.Module) -> nnx.State:
  """The trainable adapter weights (what a LoRA checkpoint needs)."""
  return nnx.state(model, TRAINABLE)


@jax.jit
def _merged_kernel(kernel, a, b, scale):
  delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision='highest')
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(model: llama.Llama) -> llama.Llama:
  """A plain Llama (no adapters, no dropout) whose kernels are W + (alpha/r) A B.

  Unadapted parameters are shared with `model`, not copied.
  """
  params = {path: var.value for path, var in llama.named_params(model, FROZEN).items()}
  for path, module in _modules(model, LoRALinear).items():
    params[f'{path}.kernel'] = _merged_kernel(module.kernel.value, module.lora_a.value,
                                              module.lora_b.value, module.scale)
  merged = llama.abstract_model(model.config)
  llama.assign_params(merged, params)
  return merged


def merged_params(model: llama.Llama) -> dict[str, Any]:
  """{dotted path: value} of every base parameter as merged: the kernel itself, or for an adapted kernel a
  function computing W + (alpha/r) A B, so a caller can materialize one merged tensor at a time."""
  params: dict[str, Any] = {path: var.value for path, var in llama.named_params(model, FROZEN).items()}
  for path, module in _modules(model, LoRALinear).items():
    params[f'{path}.kernel'] = functools.partial(_merged_kernel, module.kernel.value, module.lora_a.value,
                                                 module.lora_b.value, module.scale)
  return params


def hf_module_path(path: str) -> str:
  """Our module path -> HF LlamaForCausalLM module name (`layers.0.mlp.up_proj` -> `model.layers...`)."""
  return path if path == 'lm_head' else f'model.{path}'


def peft_state_dict(model: nnx.Module, values: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Adapter tensors under PEFT's names and layouts (`adapter_model.safetensors`), of the model's own
  adapters or of `values` ({'layers.0.self_attn.q_proj.lora_a': array, ...}, for the same modules).

  `base_model.model.<hf module>.lora_A.weight` is A^T [r, in], `lora_B.weight` is B^T [out, r]; the
  scale is not folded in (PEFT applies lora_alpha / r from adapter_config.json).
  """
  out = {}
  for path, module in _modules(model, LoRALinear).items():
    prefix = f'base_model.model.{hf_module_path(path)}'
    a = module.lora_a.value if values is None else values[f'{path}.lora_a']
    b = module.lora_b.value if values is None else values[f'{path}.lora_b']
    out[f'{prefix}.lora_A.weight'] = np.asarray(a).T
    out[f'{prefix}.lora_B.weight'] = np.asarray(b).T
  return out


def load_peft_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray]) -> None:
  """Sets the adapters of a LoRA-wrapped model from PEFT tensors (the inverse of `peft_state_dict`).

  The model must have been wrapped with the adapter's targets and rank; every adapter tensor must be
  present and no other.
  """
  expected = peft_state_dict(model)
  missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
  if missing or unknown:
    raise ValueError(f'PEFT adapter: missing tensor(s) {missing[:4]}, unexpected tensor(s) {unknown[:4]}'
                     ' (do config.lora.targets match the adapter target_modules?)')
  for path, module in _modules(model, LoRALinear).items():
    prefix = f'base_model.model.{hf_module_path(path)}'
    for var, key in ((module.lora_a, f'{prefix}.lora_A.weight'), (module.lora_b, f'{prefix}.lora_B.weight')):
      value = np.asarray(tensors[key]).T
      if value.shape != var.value.shape:
        raise ValueError(f'PEFT adapter: {key} has shape {np.shape(tensors[key])}, '
                         f'expected {var.value.shape[::-1]} (is config.lora.rank right?)')
      var.value = jnp.asarray(value, var.value.dtype)
