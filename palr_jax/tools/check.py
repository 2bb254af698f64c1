"""Will this config fit? Per-device memory of a LoRA fine-tune on a pod, without the pod.

  python -m palr_jax.tools.check --config configs/ml1m_llama2_7b.py:v5e-16 --devices v5e-16
  python -m palr_jax.tools.check --config configs/ml1m_llama2_7b.py:8xH100 --devices 8xH100
  python -m palr_jax.tools.check --config configs/ml100k.py:quick --devices 8 --device-memory-gib 16

The model with its LoRA adapters is built with `nnx.eval_shape` (no weights), the train state with
`jax.eval_shape` of the trainer's own optimizer, and every array is laid out by the same sharding code the
trainer uses (`config.mesh` rules, `fit_spec`) on an `AbstractMesh` of the named devices, so no device
is needed. Base weights, adapters and optimizer state are exact per-device sizes; gradients and
activations are estimates (see `activation_bytes`). Exits 1 with the reason when the total exceeds
`--usable-fraction` of a device's memory.

The architecture comes from the checkpoint's config.json (`hf:DIR`, also gs://), a GGUF's metadata
(`gguf:FILE`, `smollm2`), `--hf-config FILE`, or, when the folder is not on this machine, the published
shape of a well-known checkpoint named by the folder (`.../Llama-2-7b-hf` -> Llama-2-7B).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from absl import flags
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding
from ml_collections import config_flags

from palr_jax import cli
from palr_jax import precision
from palr_jax import sharding
from palr_jax import validate
from palr_jax.hub import gguf as gguf_lib
from palr_jax.hub import llama_names
from palr_jax.hub import load
from palr_jax.model import attention
from palr_jax.model import llama

GIB = 1 << 30

# HBM per JAX device, and how many units of a slice name one device is: v4 and v5p slice names count
# TensorCores, two per chip, and a chip (megacore) is one JAX device; v5e and v6e count chips.
TPU_KINDS = {'v4': (32, 2), 'v5e': (16, 1), 'v5litepod': (16, 1), 'v5p': (95, 2), 'v6e': (32, 1)}
GPU_KINDS = {'H100': 80, 'H200': 141, 'A100-40': 40, 'A100-80': 80}

# Published config.json shapes, for planning before the checkpoint is on this machine.
KNOWN_SHAPES = {
    'llama-2-7b': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    'llama-2-13b': dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    'llama-2-70b': dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    'meta-llama-3-8b': dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            max_position_embeddings=8192, rope_theta=500000.0),
}
_ALIASES = {'llama-3-8b': 'meta-llama-3-8b', 'llama-3.1-8b': 'meta-llama-3-8b',
            'meta-llama-3.1-8b': 'meta-llama-3-8b'}


@dataclasses.dataclass(frozen=True)
class Devices:
  name: str
  count: int
  memory_gib: float
  platform: str | None  # 'tpu' | 'gpu' | None (unknown: a bare count)


def parse_devices(spec: str, memory_gib: float | None = None) -> Devices:
  """`v5e-16`, `v4-32`, `v5p-64`, `8xH100`, `16xA100-80`, or a count N with `memory_gib`."""
  if m := re.fullmatch(r'(v4|v5e|v5litepod|v5p|v6e)-(\d+)', spec):
    gib, per_device = TPU_KINDS[m[1]]
    units = int(m[2])
    if units % per_device:
      raise ValueError(f'--devices {spec}: {m[1]} slice sizes count TensorCores, {per_device} per chip')
    return Devices(spec, units // per_device, memory_gib or gib, 'tpu')
  if m := re.fullmatch(r'(\d+)x([A-Za-z0-9-]+)', spec):
    kind = {k.lower(): k for k in GPU_KINDS}.get(m[2].lower())
    if kind is None:
      raise ValueError(f'--devices {spec}: unknown GPU {m[2]!r}; known: {sorted(GPU_KINDS)} '
                       '(or pass a count and --device-memory-gib)')
    return Devices(spec, int(m[1]), memory_gib or GPU_KINDS[kind], 'gpu')
  if spec.isdigit() and int(spec) > 0:
    if not memory_gib:
      raise ValueError(f'--devices {spec}: a bare device count needs --device-memory-gib')
    return Devices(f'{spec} devices', int(spec), memory_gib, None)
  raise ValueError(f'--devices: expected e.g. v5e-16, v4-32, v5p-32, v6e-8, 8xH100, 8xA100-40 or a '
                   f'count with --device-memory-gib, got {spec!r}')


def abstract_mesh(mesh_config, count: int) -> AbstractMesh:
  sizes = sharding.mesh_shape(mesh_config, count)
  return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)


# ---------------------------------------------------------------------------------- architecture


def _known_shape(folder: str) -> tuple[str, dict] | None:
  name = re.sub(r'(-chat|-instruct|-hf)+$', '', os.path.basename(folder.rstrip('/')).lower())
  name = _ALIASES.get(name, name)
  return (name, KNOWN_SHAPES[name]) if name in KNOWN_SHAPES else None


def model_shape(model_config, hf_config: str | None = None, platform: str | None = None
                ) -> tuple[llama.LlamaConfig, str]:
  """The LlamaConfig to check (with config.model's dtypes, remat, attention) and where it came from; an
  'auto' dtype is what palr_jax/precision.py picks on the target devices' `platform` (unknown: an
  accelerator of bf16 units)."""
  target = precision.choose(platform or 'tpu')[0]
  runtime = dict(dtype=target if model_config.dtype == precision.AUTO else model_config.dtype,
                 param_dtype=target if model_config.param_dtype == precision.AUTO else model_config.param_dtype,
                 remat=model_config.remat, attention=model_config.attention,
                 scan_layers=bool(model_config.get('scan_layers', True)))
  if hf_config:
    hf, source = json.loads(epath.Path(hf_config).read_text()), hf_config
  else:
    kind, path = load.model_source(model_config.spec)
    if kind == 'gguf':
      reader = gguf_lib.open_reader(path)
      has_output = any(t.name == 'output.weight' for t in reader.tensors)
      hf = gguf_lib.hf_config_from_metadata(gguf_lib.read_metadata(reader), path, has_output)
      source = f'GGUF metadata of {path}'
    elif (path / 'config.json').exists():
      hf, source = json.loads((path / 'config.json').read_text()), os.fspath(path / 'config.json')
    elif known := _known_shape(os.fspath(path)):
      hf, source = known[1], f'published {known[0]} shape ({path / "config.json"} not on this machine)'
    else:
      raise FileNotFoundError(
          f'config.model.spec={model_config.spec!r}: {path / "config.json"} not found and the folder name is '
          f'no known checkpoint ({sorted(KNOWN_SHAPES)}); copy its config.json here and pass --hf-config FILE')
  return llama_names.config_from_hf(hf, **runtime), source


# ---------------------------------------------------------------------------------------- memory


def device_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a pytree of abstract arrays laid out by matching NamedShardings."""
  arrays, specs = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
             for a, s in zip(arrays, specs, strict=True))


def _values(state: nnx.State) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in jax.tree.leaves(state)]


def _attention_kind(model: llama.LlamaConfig, platform: str | None, length: int) -> str:
  return attention.attention_kind(model.attention, platform, model.dtype, model.head_dim, (length, length))


def activation_bytes(model: llama.LlamaConfig, mesh: AbstractMesh, rules, batch: int, length: int,
                     logit_positions: int, platform: str | None,
                     dropout_inputs: tuple[tuple[int, str], ...] = ()) -> int:
  """Estimated activations one device holds at the peak of a training step (one micro-batch).

  Per layer, what the backward pass keeps from the forward, in the compute dtype, for a LLaMA layer:
    none: both norms' inputs and outputs, q, k, v, the attention output, gate, up and their product,
          the [heads, T, T] attention scores and probabilities unless the kernel is flash (cuDNN; CPU's
          blocked kernel keeps a log-sum-exp per row, one block of scores being alive at a time), and
          the LoRA-dropped input of each adapter (`dropout_inputs`: (features, logical axis) per
          adapter of one layer, empty without dropout);
    dots: the layer input and every projection's output (what `dots_with_no_batch_dims_saveable` keeps),
          plus the attention output and log-sum-exp with the blocked kernel;
    full: the layer input only.
  On top: one layer's `none` set of cotangents while the backward pass is in that layer, the same again
  while a remat layer is recomputed, and the fp32 logits at the loss positions with their gradient.
  Layers as a scan with remat=none: XLA was measured to hold more than this (it keeps the stacked residuals
  while slicing them); with full or dots remat the scan needs less than the unrolled loop.
  Each tensor is laid out on the mesh by its logical axes (batch over the batch axes, heads and mlp over
  tensor), like the real activations.
  """
  d, q, kv, f = (model.hidden_size, model.num_heads * model.head_dim,
                 model.num_kv_heads * model.head_dim, model.intermediate_size)
  act = jnp.dtype(model.dtype).itemsize

  def size(shape, axes, itemsize=act):
    spec = sharding.fit_spec(sharding.logical_to_spec(axes, rules), shape, mesh)
    return math.prod(NamedSharding(mesh, spec).shard_shape(shape)) * itemsize

  embed = size((batch, length, d), ('batch', 'length', 'embed'))
  heads = size((batch, length, q), ('batch', 'length', 'heads'))
  kv_heads = size((batch, length, kv), ('batch', 'length', 'kv_heads'))
  mlp = size((batch, length, f), ('batch', 'length', 'mlp'))
  kind = _attention_kind(model, platform, length)
  scores = 0 if kind == 'cudnn' else 2 * size(
      (batch, model.num_heads, length, length), ('batch', 'heads', 'length', 'length'))
  attention_kept = block = 0
  if kind == 'blocked':  # flash-style backward: the output and one fp32 log-sum-exp per row are kept,
    # and one block of query rows' fp32 scores and probabilities is alive at a time
    scores = size((batch, model.num_heads, length), ('batch', 'heads', 'length'), 4)
    attention_kept = heads + scores
    block = 2 * size((batch, model.num_heads, min(attention.ATTENTION_BLOCK, length), length),
                     ('batch', 'heads', 'length', 'length'), 4)
  dropped = sum(size((batch, length, n), ('batch', 'length', axis)) for n, axis in dropout_inputs)
  layer = 5 * embed + 2 * heads + 2 * kv_heads + 3 * mlp + scores + dropped
  saved = {'none': layer, 'dots': 3 * embed + heads + 2 * kv_heads + 2 * mlp + attention_kept, 'full': embed}
  transient = layer * (1 if model.remat == 'none' else 2) + block
  logits = size((batch, logit_positions, model.vocab_size), ('batch', 'length', 'vocab'), 4)
  return model.num_layers * saved[model.remat] + transient + 2 * logits


def gathered_weight_bytes(frozen: nnx.State, mesh: AbstractMesh, rules) -> int:
  """Estimated buffers of base weights all-gathered over the batch axes (FSDP) for use in a step.

  A sharded weight is gathered whole (still split over `tensor`) where it is used: count two layers
  (the one computing and the next one's prefetch) and the larger of the embedding and the LM head.
  Zero when nothing is sharded over the batch axes.
  """
  batch_axes = set(sharding.MESH_AXES) - {'tensor'}
  layer, ends = 0, 0
  for path, var in nnx.to_flat_state(frozen):
    axes = var.get_metadata().get('logical_axes')
    if axes is None:
      continue
    spec = sharding.fit_spec(sharding.logical_to_spec(axes, rules), var.shape, mesh)
    whole = jax.sharding.PartitionSpec(*(
        None if e is None else tuple(a for a in ((e,) if isinstance(e, str) else e) if a not in batch_axes)
        or None for e in spec))
    held, gathered = (NamedSharding(mesh, s).shard_shape(var.shape) for s in (spec, whole))
    if held == gathered:
      continue
    nbytes = math.prod(gathered) * var.dtype.itemsize
    if path[0] == 'layers':
      layer += nbytes if path[1] == 0 else 0
    else:
      ends = max(ends, nbytes)
  return 2 * layer + ends


@dataclasses.dataclass(frozen=True)
class Report:
  devices: Devices
  mesh: dict[str, int]
  model: llama.LlamaConfig
  source: str
  params: int            # base parameters (count)
  lora_params: int
  rows: dict[str, int]   # name -> bytes per device
  usable_fraction: float

  @property
  def total(self) -> int:
    return sum(self.rows.values())

  @property
  def usable(self) -> float:
    return self.devices.memory_gib * GIB * self.usable_fraction

  @property
  def fits(self) -> bool:
    return self.total <= self.usable


def check(config, devices: Devices, *, hf_config: str | None = None, usable_fraction: float = 0.9
          ) -> Report:
  """Per-device bytes of the base, adapters, optimizer state, gradients and activations."""
  from palr_jax.model import lora
  from palr_jax.train import step

  model_config, source = model_shape(config.model, hf_config, devices.platform)
  mesh = abstract_mesh(config.mesh, devices.count)
  rules = config.mesh.rules
  c = config.train
  step.check_batch_layout(c, mesh, rules)

  def build():
    model = llama.Llama(model_config, rngs=nnx.Rngs(0))
    lora.apply_lora(model, config.lora, rngs=nnx.Rngs(1))
    return model

  parts, values, frozen = step.split_model(nnx.eval_shape(build))
  optimizer = step.make_optimizer(c)
  abstract = jax.eval_shape(lambda v: step.init_state(v, optimizer), values)
  shardings = step.state_shardings(abstract, parts, optimizer, mesh, rules)
  base = device_bytes(_values(frozen), jax.tree.leaves(sharding.state_shardings(frozen, mesh, rules)))
  adapters = device_bytes(abstract['lora'], shardings['lora'])
  optimizer_state = device_bytes([abstract['opt_state'], abstract['step']],
                                 [shardings['opt_state'], shardings['step']])
  dropout_inputs = () if config.lora.dropout <= 0 else tuple(
      (var.shape[0], var.get_metadata()['logical_axes'][0]) for path, var in nnx.to_flat_state(parts.lora)
      if path[:2] == ('layers', 0) and path[-1] == 'lora_a')
  grads = device_bytes([jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in abstract['lora'].values()],
                       list(shardings['lora'].values()))
  length = config.prompts.max_length
  logit_positions = length - 1 if c.max_loss_tokens <= 0 else min(c.max_loss_tokens, length - 1)
  rows = {
      f'base params ({model_config.param_dtype})': base,
      f'LoRA params ({config.lora.dtype})': adapters,
      'optimizer state (AdamW moments, step)': optimizer_state,
      'gradients (estimate)': grads * (2 if c.microbatches > 1 else 1),
      'gathered base weights (estimate)': gathered_weight_bytes(frozen, mesh, rules),
      'activations (estimate)': activation_bytes(model_config, mesh, rules, c.batch_size // c.microbatches,
                                                 length, logit_positions, devices.platform, dropout_inputs),
  }
  return Report(devices=devices, mesh=dict(mesh.shape), model=model_config, source=source,
                params=sum(math.prod(v.shape) for v in _values(frozen)),
                lora_params=sum(math.prod(v.shape) for v in abstract['lora'].values()),
                rows=rows, usable_fraction=usable_fraction)


_HINTS = {
    'base': 'Shard the base over more devices (config.mesh.fsdp, or tensor).',
    'gathered': 'Use more data and less fsdp parallelism (config.mesh) if the base fits, or tensor.',
    'activations': 'Split the step into micro-batches (config.train.microbatches), set config.model.remat '
                   '(dots, then full), or shorten config.prompts.max_length.',
    'LoRA': 'Lower config.lora.rank or adapt fewer modules (config.lora.targets).',
    'optimizer': 'Lower config.lora.rank or adapt fewer modules (config.lora.targets).',
    'gradients': 'Lower config.lora.rank or adapt fewer modules (config.lora.targets).',
}


def format_report(report: Report, config) -> str:
  m, c = report.model, config.train
  mesh = ' '.join(f'{k}={v}' for k, v in report.mesh.items())
  lines = [
      f'devices: {report.devices.name}: {report.devices.count} x {report.devices.memory_gib:g} GiB; '
      f'mesh {mesh}',
      f'model: {report.params / 1e9:.2f}B params (vocab {m.vocab_size}, hidden {m.hidden_size}, '
      f'{m.num_layers} layers, {m.num_heads} heads / {m.num_kv_heads} kv, mlp {m.intermediate_size}) '
      f'from {report.source}',
      f'LoRA: rank {config.lora.rank}, {report.lora_params / 1e6:.2f}M params; batch {c.batch_size} '
      f'in {c.microbatches} micro-batch(es) x {config.prompts.max_length} tokens, remat={m.remat}, '
      f'attention={_attention_kind(m, report.devices.platform, config.prompts.max_length)}',
      '',
      f'{"per device":<42}{"GiB":>9}',
  ]
  lines += [f'  {name:<40}{b / GIB:>9.3f}' for name, b in report.rows.items()]
  lines += [f'  {"total":<40}{report.total / GIB:>9.3f}',
            f'  {f"usable ({report.usable_fraction:.0%} of {report.devices.memory_gib:g} GiB)":<40}'
            f'{report.usable / GIB:>9.3f}', '']
  if report.fits:
    lines.append(f'fits: {(report.usable - report.total) / GIB:.2f} GiB to spare per device')
  else:
    largest = max(report.rows, key=report.rows.get)
    lines.append(f'DOES NOT FIT: needs {report.total / GIB:.2f} GiB per device, '
                 f'{report.usable / GIB:.2f} GiB usable; the largest part is {largest}. {_HINTS[largest.split()[0]]}')
  return '\n'.join(lines)


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config path.py[:arg].', lock_config=False)
  flags.mark_flag_as_required('config')
  flags.DEFINE_string('devices', None, 'v5e-16, v4-32, v5p-32, v6e-8, 8xH100, 8xA100-40, or a count N '
                      'with --device-memory-gib.', required=True)
  flags.DEFINE_float('device-memory-gib', None, 'Memory per device (overrides the known kind\'s).')
  flags.DEFINE_float('usable-fraction', 0.9, 'Share of device memory the check lets the run use '
                     '(XLA needs the rest; on GPUs set XLA_PYTHON_CLIENT_MEM_FRACTION to match).')
  flags.DEFINE_string('hf-config', None, 'An HF config.json giving the architecture (default: the '
                      'checkpoint named by config.model.spec).')


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')  # Shapes only: never claim the host's accelerators.
  FLAGS = flags.FLAGS
  config = FLAGS.config
  validate.check_config(config)  # the mesh and the model are checked against --devices, not this host
  try:
    devices = parse_devices(FLAGS.devices, FLAGS['device-memory-gib'].value)
    report = check(config, devices, hf_config=FLAGS['hf-config'].value,
                   usable_fraction=FLAGS['usable-fraction'].value)
  except (ValueError, FileNotFoundError) as e:
    raise validate.ConfigError(str(e)) from None
  print(format_report(report, config))
  return 0 if report.fits else 1


if __name__ == '__main__':
  cli.run(main, _define_flags)
