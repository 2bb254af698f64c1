"""Hugging Face Llama folders (config.json + safetensors) <-> sharded NNX parameters.

Loading reads, per parameter, only the slices this process's devices hold
(`jax.make_array_from_callback` over `safe_open(...).get_slice`), one safetensors file open at a time, so
a 7B checkpoint never sits whole in host memory. Writing goes shard by shard for the same reason.
Parameter paths and the HF name table come from `palr_jax.model.llama` (`hf_param_names`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from flax import nnx
import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from palr_jax import sharding as sharding_lib
from palr_jax.model import llama

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Stored dtypes we read (what HF Llama checkpoints use).
_DTYPES = {'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
           'BF16': np.dtype(ml_dtypes.bfloat16)}


class TensorSpec(NamedTuple):
  """A tensor to write: name, shape, dtype, and `load()` giving its value when its shard is written."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[], np.ndarray]


class StoredTensor(NamedTuple):
  file: str          # file name inside the folder
  shape: tuple[int, ...]
  dtype: np.dtype


# --------------------------------------------------------------------------------------- config


def read_json(path) -> dict:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e.msg}, line {e.lineno})') from None


def write_json(path, obj) -> None:
  epath.Path(path).write_text(json.dumps(obj, indent=2) + '\n')


def llama_config(folder, model_config) -> llama.LlamaConfig:
  """LlamaConfig from `folder/config.json` (transformers 4 or 5 spellings) plus the runtime settings
  (dtype, param_dtype, remat, attention) of `model_config`. Anything that would change the maths —
  another architecture, biases, an unknown rope_type, another activation — is an error naming the file."""
  path = epath.Path(folder) / 'config.json'
  hf = read_json(path)
  model_type = hf.get('model_type')
  archs = hf.get('architectures') or []
  if model_type != 'llama' or any(a != 'LlamaForCausalLM' for a in archs):
    raise ValueError(f"{path}: model_type={model_type!r}, architectures={archs}; expected 'llama' / "
                     "LlamaForCausalLM")
  try:
    return llama.LlamaConfig.from_hf(hf, dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                                     remat=model_config.remat, attention=model_config.attention)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def generation_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """generation_config.json: the special ids transformers' `generate` stops and pads with."""
  return {k: hf_config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
          if hf_config.get(k) is not None}


# ---------------------------------------------------------------------------------------- reading


def _header(path: epath.Path) -> dict[str, Any]:
  """A safetensors file's JSON header (8-byte little-endian length, then JSON); no tensor data read."""
  with path.open('rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f'{path}: not a safetensors file (shorter than its header length)')
    (n,) = struct.unpack('<Q', raw)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f'{path}: not a safetensors file (unreadable header)') from None
  header.pop('__metadata__', None)
  return header


def stored_tensors(folder) -> dict[str, StoredTensor]:
  """Every tensor of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
  folder = epath.Path(folder)
  if (folder / INDEX_FILE).exists():
    index = read_json(folder / INDEX_FILE)
    if not isinstance(index.get('weight_map'), dict):
      raise ValueError(f'{folder / INDEX_FILE}: no "weight_map" object')
    files = sorted(set(index['weight_map'].values()))
  elif (folder / SINGLE_FILE).exists():
    index, files = None, [SINGLE_FILE]
  else:
    raise FileNotFoundError(f'{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found')
  out = {}
  for file in files:
    for name, info in _header(folder / file).items():
      if info['dtype'] not in _DTYPES:
        raise ValueError(f'{folder / file}: tensor {name!r} is {info["dtype"]}; expected one of '
                         f'{sorted(_DTYPES)}')
      out[name] = StoredTensor(file, tuple(info['shape']), _DTYPES[info['dtype']])
  if index is not None:
    for name, file in index['weight_map'].items():
      if out.get(name, StoredTensor(None, (), None)).file != file:
        raise ValueError(f'{folder / INDEX_FILE}: {name!r} is mapped to {file}, which does not hold it')
  return out


def _slice_key(index: tuple[slice, ...]) -> tuple:
  return tuple((s.start, s.stop, s.step) for s in index)


def _read_array(handle, name: str, shape, transpose: bool, dtype, sharding) -> jax.Array:
  """One parameter as a global jax.Array; each addressable device's slice is read on its own (an HF
  [out, in] weight is our [in, out]: our index (rows, cols) is the stored (cols, rows), transposed)."""
  stored = handle.get_slice(name)
  read: dict[tuple, np.ndarray] = {}  # replicas of one slice are read once

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    key = _slice_key(index)
    if key not in read:
      value = stored[index[::-1] if transpose else index]
      read[key] = np.ascontiguousarray(value.T if transpose else value).astype(dtype, copy=False)
    return read[key]

  return jax.make_array_from_callback(shape, sharding, callback)


def load_params(folder, config: llama.LlamaConfig, mesh: Mesh | None = None, rules=None
                ) -> dict[str, jax.Array]:
  """{our dotted path: jax.Array} for every base parameter, sharded by its `logical_axes` under `rules`
  on `mesh` (or on the default device when mesh is None), cast to `config.param_dtype`."""
  folder = epath.Path(folder)
  if mesh is not None and rules is None:
    raise ValueError('load_params: a mesh needs logical-axis rules (config.mesh.rules)')
  stored = stored_tensors(folder)
  table = llama.hf_param_names(config)
  abstract = llama.named_params(nnx.eval_shape(lambda: llama.Llama(config)))
  known = {hf_name for hf_name, _ in table.values()}
  ignored = {'lm_head.weight'} if config.tie_word_embeddings else set()
  unexpected = sorted(n for n in stored if n not in known | ignored and not n.endswith('rotary_emb.inv_freq'))
  if unexpected:
    raise ValueError(f'{folder}: tensor(s) the Llama config does not describe: {unexpected[:8]} '
                     f'(in {stored[unexpected[0]].file})')
  plan: dict[str, list[str]] = {}
  for path, (hf_name, transpose) in table.items():
    if hf_name not in stored:
      raise ValueError(f'{folder}: missing tensor {hf_name!r}')
    want = tuple(abstract[path].shape)
    got = stored[hf_name].shape[::-1] if transpose else stored[hf_name].shape
    if got != want:
      raise ValueError(f'{folder / stored[hf_name].file}: {hf_name!r} has shape {stored[hf_name].shape}, '
                       f'expected {want[::-1] if transpose else want} from config.json')
    plan.setdefault(stored[hf_name].file, []).append(path)
  dtype = np.dtype(config.param_dtype)
  params = {}
  for file, paths in sorted(plan.items()):  # one open file at a time bounds the mapped memory
    with safe_open(os.fspath(folder / file), framework='numpy') as handle:
      for path in paths:
        hf_name, transpose = table[path]
        var = abstract[path]
        if mesh is None:
          sharding = SingleDeviceSharding(jax.devices()[0])
        else:
          sharding = sharding_lib.named_sharding(mesh, var.get_metadata().get('logical_axes'),
                                                 var.shape, rules)
        params[path] = _read_array(handle, hf_name, tuple(var.shape), transpose, dtype, sharding)
  return params


def load_tokenizer(folder):
  """The folder's tokenizer (local files only; no remote code)."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True, trust_remote_code=False)


# ---------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_dir(path, replace: bool = True) -> Iterator[epath.Path]:
  """Yields a temporary sibling folder that becomes `path` once the block succeeds.

  With `replace=False` an existing `path` (another process finished first) is kept and ours dropped.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp-{uuid.uuid4().hex[:8]}'
  tmp.mkdir()
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if path.exists():
    if not replace:
      shutil.rmtree(tmp, ignore_errors=True)
      return
    old = path.parent / f'.{path.name}.old-{uuid.uuid4().hex[:8]}'
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    tmp.rename(path)


def shard_plan(specs: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
  """Consecutive groups of at most `max_shard_bytes` (a bigger tensor gets a shard of its own)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    nbytes = int(np.prod(spec.shape)) * spec.dtype.itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


def save_safetensors(folder, specs: Sequence[TensorSpec], max_shard_bytes: int | None = None) -> None:
  """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when
  the tensors exceed `max_shard_bytes`. Only one shard's tensors are in host memory at a time."""
  folder = epath.Path(folder)
  shards = shard_plan(specs, max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  weight_map, total = {}, 0
  for file, shard in zip(names, shards):
    tensors = {}
    for spec in shard:
      value = np.asarray(spec.load())
      if value.shape != tuple(spec.shape) or value.dtype != spec.dtype:
        raise ValueError(f'{spec.name}: produced {value.dtype}{list(value.shape)}, declared '
                         f'{spec.dtype}{list(spec.shape)}')
      tensors[spec.name] = np.ascontiguousarray(value)
      weight_map[spec.name] = file
      total += value.nbytes
    save_file(tensors, os.fspath(folder / file), metadata={'format': 'pt'})
    del tensors
  if len(shards) > 1:
    write_json(folder / INDEX_FILE, {'metadata': {'total_size': total}, 'weight_map': weight_map})


def export_specs(config: llama.LlamaConfig, params: Mapping[str, jax.Array], dtype) -> list[TensorSpec]:
  """HF tensors (transposed back to [out, in], cast to `dtype`) for {our path: array} base params."""
  dtype = np.dtype(dtype)
  specs = []
  for path, (hf_name, transpose) in llama.hf_param_names(config).items():
    array = params[path]
    shape = tuple(array.shape)[::-1] if transpose else tuple(array.shape)

    def load(array=array, transpose=transpose):
      value = np.asarray(jax.device_get(array))
      return np.ascontiguousarray(value.T if transpose else value).astype(dtype, copy=False)

    specs.append(TensorSpec(hf_name, shape, dtype, load))
  return specs


def save_folder(out_dir, config: llama.LlamaConfig, params: Mapping[str, jax.Array], tokenizer,
                dtype: str, max_shard_bytes: int | None) -> None:
  """A complete HF folder (config.json, safetensors, generation_config.json, tokenizer), atomically."""
  hf_config = dict(config.to_hf(), torch_dtype=str(np.dtype(dtype)))
  with atomic_dir(out_dir) as tmp:
    write_json(tmp / 'config.json', hf_config)
    write_json(tmp / 'generation_config.json', generation_config(hf_config))
    save_safetensors(tmp, export_specs(config, params, dtype), max_shard_bytes)
    tokenizer.save_pretrained(os.fspath(tmp))
