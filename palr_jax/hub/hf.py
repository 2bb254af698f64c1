"""Hugging Face Llama folders (config.json + safetensors) <-> sharded NNX parameters.

Loading maps one stored tensor at a time (offsets from the safetensors header, `np.memmap`) and hands
each addressable device only its slice (`jax.make_array_from_callback`), so a process reads just what
its devices hold and a 7B checkpoint never sits whole in host memory (bench/load_memory.py measures it).
Writing streams each file tensor by tensor for the same reason (bench/export_memory.py measures it).
Parameter paths and the HF name table come from `llama_names` (`hf_param_names`).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from palr_jax import files
from palr_jax import precision
from palr_jax import sharding as sharding_lib
from palr_jax.hub import llama_names
from palr_jax.model import llama

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Stored dtypes we read (what HF Llama checkpoints use).
_DTYPES = {'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
           'BF16': np.dtype(ml_dtypes.bfloat16)}


class TensorSpec(NamedTuple):
  """A tensor to write: name, shape, dtype, and `load()` giving its value when it is written."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[], np.ndarray]


class StoredTensor(NamedTuple):
  file: str          # file name inside the folder
  shape: tuple[int, ...]
  dtype: np.dtype
  offset: int        # byte offset of the data in the file


# --------------------------------------------------------------------------------------- config


def write_json(path, obj) -> None:
  epath.Path(path).write_text(json.dumps(obj, indent=2) + '\n')


def llama_config(folder, model_config) -> llama.LlamaConfig:
  """LlamaConfig from `folder/config.json` (transformers 4 or 5 spellings) plus the runtime settings
  (dtype, param_dtype, remat, attention) of `model_config`. Anything that would change the maths —
  another architecture, biases, an unknown rope_type, another activation — is an error naming the file."""
  path = epath.Path(folder) / 'config.json'
  hf = files.read_json(path)
  model_type = hf.get('model_type')
  archs = hf.get('architectures') or []
  if model_type != 'llama' or any(a != 'LlamaForCausalLM' for a in archs):
    raise ValueError(f"{path}: model_type={model_type!r}, architectures={archs}; expected 'llama' / "
                     "LlamaForCausalLM")
  try:
    return llama_names.config_from_hf(hf, dtype=precision.concrete(model_config.dtype),
                                      param_dtype=precision.concrete(model_config.param_dtype),
                                      remat=model_config.remat, attention=model_config.attention,
                                      scan_layers=bool(model_config.get('scan_layers', True)))
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def generation_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """generation_config.json: the special ids transformers' `generate` stops and pads with."""
  return {k: hf_config[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
          if hf_config.get(k) is not None}


# ---------------------------------------------------------------------------------------- reading


def _header(path: epath.Path) -> tuple[dict[str, Any], int]:
  """(JSON header, where the data starts) of a safetensors file: an 8-byte little-endian length, the
  JSON, then the tensors' bytes at the header's `data_offsets`. No tensor data is read."""
  with path.open('rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f'{path}: not a safetensors file (shorter than its header length)')
    (n,) = struct.unpack('<Q', raw)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f'{path}: not a safetensors file (unreadable header)') from None
  if not isinstance(header, dict):
    raise ValueError(f'{path}: not a safetensors file (its header is a JSON {type(header).__name__}, '
                     'expected an object of tensors)')
  header.pop('__metadata__', None)
  for name, info in header.items():
    ok = (isinstance(info, dict) and isinstance(info.get('dtype'), str) and isinstance(info.get('shape'), list)
          and all(isinstance(d, int) and d >= 0 for d in info['shape'])
          and isinstance(info.get('data_offsets'), list) and len(info['data_offsets']) == 2
          and all(isinstance(o, int) and o >= 0 for o in info['data_offsets'])
          and info['data_offsets'][0] <= info['data_offsets'][1])
    if not ok:
      raise ValueError(f'{path}: not a safetensors file (tensor {name!r}: expected dtype, shape and '
                       f'data_offsets [begin, end], got {json.dumps(info)[:200]})')
  return header, 8 + n


def stored_tensors(folder) -> dict[str, StoredTensor]:
  """Every tensor of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
  folder = epath.Path(folder)
  if (folder / INDEX_FILE).exists():
    index = files.read_json(folder / INDEX_FILE)
    if not isinstance(index.get('weight_map'), dict):
      raise ValueError(f'{folder / INDEX_FILE}: no "weight_map" object')
    shards = sorted(set(index['weight_map'].values()))
  elif (folder / SINGLE_FILE).exists():
    index, shards = None, [SINGLE_FILE]
  else:
    raise FileNotFoundError(f'{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found')
  out = {}
  for file in shards:
    if not (folder / file).exists():
      raise FileNotFoundError(f'{folder / INDEX_FILE}: names {file}, which is not in {folder}')
    header, start = _header(folder / file)
    size = (folder / file).stat().length
    needed = start + max((info['data_offsets'][1] for info in header.values()), default=0)
    if size < needed:
      raise ValueError(f'{folder / file}: truncated: its header describes {needed} bytes, the file has '
                       f'{size} (an interrupted download or copy?)')
    for name, info in header.items():
      if info['dtype'] not in _DTYPES:
        raise ValueError(f'{folder / file}: tensor {name!r} is {info["dtype"]}; expected one of '
                         f'{sorted(_DTYPES)}')
      begin, end = info['data_offsets']
      t = StoredTensor(file, tuple(info['shape']), _DTYPES[info['dtype']], start + begin)
      if end - begin != t.dtype.itemsize * math.prod(t.shape):
        raise ValueError(f'{folder / file}: tensor {name!r} has {end - begin} bytes for shape {t.shape}')
      out[name] = t
  if index is not None:
    for name, file in index['weight_map'].items():
      if name not in out or out[name].file != file:
        raise ValueError(f'{folder / INDEX_FILE}: {name!r} is mapped to {file}, which does not hold it')
  return out


def stored_dtype(folder) -> str:
  """The dtype most of the folder's tensors are stored in ('bfloat16', 'float32', ...)."""
  counts = collections.Counter(str(t.dtype) for t in stored_tensors(folder).values())
  return counts.most_common(1)[0][0]


def _source_sharding(sharding, transpose: bool):
  """Where the stored [out, in] layout of a transposed param goes: the same devices, axes swapped."""
  if not transpose or not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
  return NamedSharding(sharding.mesh, P(*spec[::-1]))


@functools.lru_cache(maxsize=None)
def _to_param(transpose: bool, dtype: str, sharding):
  """Jitted transpose / cast / copy on the devices (fast there; a host transpose of 7B weights takes
  minutes). Always a new buffer: on CPU the source may alias the mapped file."""
  return jax.jit(lambda x: jnp.array(x.T if transpose else x, dtype=dtype, copy=True),
                 out_shardings=sharding)


def _read_array(stored: np.ndarray, shape, transpose: bool, dtype: str, sharding) -> jax.Array:
  """One parameter as a global jax.Array from a memory-mapped stored tensor: each addressable device's
  slice goes straight from the mapped file to the device in the stored layout (on CPU, JAX may even
  alias the mapping), then is transposed / cast on device to our [in, out] and dtype."""
  source = jax.make_array_from_callback(shape[::-1] if transpose else shape,
                                        _source_sharding(sharding, transpose), lambda index: stored[index])
  return _to_param(transpose, dtype, sharding)(source)


def load_params(folder, config: llama.LlamaConfig, mesh: Mesh | None = None, rules=None
                ) -> dict[str, jax.Array]:
  """{our dotted path: jax.Array} for every base parameter, sharded by its `logical_axes` under `rules`
  on `mesh` (or on the default device when mesh is None), cast to `config.param_dtype`."""
  folder = epath.Path(folder)
  if mesh is not None and rules is None:
    raise ValueError('load_params: a mesh needs logical-axis rules (config.mesh.rules)')
  stored = stored_tensors(folder)
  table = llama_names.hf_param_names(config)
  abstract = llama.named_params(llama.abstract_model(config))
  known = {hf_name for hf_name, _ in table.values()}
  ignored = {'lm_head.weight'} if config.tie_word_embeddings else set()
  unexpected = sorted(n for n in stored if n not in known | ignored and not n.endswith('rotary_emb.inv_freq'))
  if unexpected:
    raise ValueError(f'{folder}: tensor(s) the Llama config does not describe: {unexpected[:8]} '
                     f'(in {stored[unexpected[0]].file})')
  for path, (hf_name, transpose) in table.items():
    if hf_name not in stored:
      raise ValueError(f'{folder}: missing tensor {hf_name!r}')
    want = tuple(abstract[path].shape)
    got = stored[hf_name].shape[::-1] if transpose else stored[hf_name].shape
    if got != want:
      raise ValueError(f'{folder / stored[hf_name].file}: {hf_name!r} has shape {stored[hf_name].shape}, '
                       f'expected {want[::-1] if transpose else want} from config.json')
  params = {}
  for path in sorted(table, key=lambda p: (stored[table[p][0]].file, stored[table[p][0]].offset)):
    hf_name, transpose = table[path]
    t, var = stored[hf_name], abstract[path]
    # One mapping per tensor: only its pages become resident, and only until it is on the devices.
    view = np.memmap(folder / t.file, t.dtype, mode='r', offset=t.offset, shape=t.shape)
    if mesh is None:
      sharding = SingleDeviceSharding(jax.local_devices()[0])
    else:
      sharding = sharding_lib.named_sharding(mesh, var.get_metadata().get('logical_axes'), var.shape, rules)
    params[path] = _read_array(view, tuple(var.shape), transpose, config.param_dtype, sharding)
    params[path].block_until_ready()  # frees the source (and with it the mapping) before the next read
  return params


TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json')


def check_tokenizer_files(folder) -> None:
  """Raises naming the folder when it holds none of the files a tokenizer is read from (checked before
  any weight is loaded: a model without its tokenizer is of no use here)."""
  folder = epath.Path(folder)
  if not any((folder / name).exists() for name in TOKENIZER_FILES):
    raise ValueError(f'{folder}: no tokenizer files (none of {", ".join(TOKENIZER_FILES)}); copy the '
                     "checkpoint's tokenizer files there (save_pretrained writes tokenizer.json)")


def load_tokenizer(folder):
  """The folder's tokenizer (local files only; no remote code); a folder without a usable one is one
  error naming it."""
  from transformers import AutoTokenizer
  check_tokenizer_files(folder)
  try:
    return AutoTokenizer.from_pretrained(os.fspath(folder), local_files_only=True, trust_remote_code=False)
  except (ValueError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'{folder}: no usable tokenizer (expected tokenizer.json with tokenizer_config.json, as '
                     f'save_pretrained writes them): {first}') from None


# ---------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_dir(path, replace: bool = True) -> Iterator[epath.Path]:
  """Yields a temporary sibling folder that becomes `path` once the block succeeds.

  With `replace=False` an existing `path` (another process finished first) is kept and ours dropped.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.temp_path(path)
  tmp.mkdir()
  try:
    yield tmp
  except BaseException:
    _remove(tmp)
    raise
  if path.exists():
    if not replace:
      _remove(tmp)
      return
    old = files.temp_path(path)
    path.rename(old)
    tmp.rename(path)
    _remove(old)
  else:
    tmp.rename(path)


def _remove(folder: epath.Path) -> None:
  try:
    folder.rmtree()
  except OSError:  # cleaning up after the fact: never hide the real outcome
    pass


def shard_plan(specs: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
  """Consecutive groups of at most `max_shard_bytes` (a bigger tensor gets a shard of its own)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    nbytes = math.prod(spec.shape) * spec.dtype.itemsize
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


def save_safetensors(folder, specs: Sequence[TensorSpec], max_shard_bytes: int | None = None) -> None:
  """`model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` when
  the tensors exceed `max_shard_bytes`. Each file is streamed tensor by tensor (`write_safetensors`)."""
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  shards = shard_plan(specs, max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  weight_map, total = {}, 0
  for file, shard in zip(names, shards):
    total += write_safetensors(folder / file, shard)
    weight_map.update({spec.name: file for spec in shard})
  if len(shards) > 1:
    write_json(folder / INDEX_FILE, {'metadata': {'total_size': total}, 'weight_map': weight_map})


def write_safetensors(path, specs: Sequence[TensorSpec]) -> int:
  """One safetensors file: the header, from the declared shapes and dtypes, then each tensor's bytes as its
  `load()` produces them, so only one tensor is in host memory at a time (a 7B model's merged export
  never holds a shard, let alone the model). Returns the bytes of tensor data."""
  codes = {dtype: code for code, dtype in _DTYPES.items()}
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for spec in specs:
    dtype = np.dtype(spec.dtype)
    if dtype not in codes:
      raise ValueError(f'{spec.name}: cannot store {dtype}; expected one of {sorted(map(str, codes))}')
    size = math.prod(spec.shape) * dtype.itemsize
    header[spec.name] = {'dtype': codes[dtype], 'shape': list(spec.shape), 'data_offsets': [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # the format pads the header to 8 bytes
  with epath.Path(path).open('wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob)
    for spec in specs:
      value = np.asarray(spec.load())
      if value.shape != tuple(spec.shape) or value.dtype != spec.dtype:
        raise ValueError(f'{spec.name}: produced {value.dtype}{list(value.shape)}, declared '
                         f'{spec.dtype}{list(spec.shape)}')
      f.write(np.ascontiguousarray(value).tobytes())
      del value
  return offset


@functools.lru_cache(maxsize=None)
def _to_stored(transpose: bool, dtype: str):
  """Jitted inverse of `_to_param`: our layout back to HF's [out, in], cast, on the devices."""
  return jax.jit(lambda x: (x.T if transpose else x).astype(dtype))


def export_specs(config: llama.LlamaConfig, params: Mapping[str, jax.Array | Callable[[], jax.Array]],
                 dtype: str) -> list[TensorSpec]:
  """HF tensors (transposed back to [out, in], cast to `dtype`) for {our path: array, or a function giving
  it} base params; each is computed (a merged LoRA kernel, say), converted on its devices and fetched to
  the host only when its shard is written, so the model is never held twice."""
  specs = []
  shapes = llama_names.param_shapes(config)
  for path, (hf_name, transpose) in llama_names.hf_param_names(config).items():
    array = params[path]
    shape = shapes[path][::-1] if transpose else shapes[path]

    def load(array=array, transpose=transpose):
      value = array() if callable(array) else array
      return np.asarray(jax.device_get(_to_stored(transpose, dtype)(value)))

    specs.append(TensorSpec(hf_name, shape, np.dtype(dtype), load))
  return specs


def save_folder(out_dir, config: llama.LlamaConfig, params: Mapping[str, jax.Array | Callable[[], jax.Array]],
                tokenizer,
                dtype: str, max_shard_bytes: int | None) -> None:
  """A complete HF folder (config.json, safetensors, generation_config.json, tokenizer), atomically."""
  hf_config = dict(llama_names.config_to_hf(config), torch_dtype=str(np.dtype(dtype)))
  with atomic_dir(out_dir) as tmp:
    write_json(tmp / 'config.json', hf_config)
    write_json(tmp / 'generation_config.json', generation_config(hf_config))
    save_safetensors(tmp, export_specs(config, params, dtype), max_shard_bytes)
    tokenizer.save_pretrained(os.fspath(tmp))
