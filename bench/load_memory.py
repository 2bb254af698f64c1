"""Host memory of loading a sharded HF checkpoint: does it stay near the size of the loaded arrays?

Writes a synthetic ~1B-parameter Llama (bf16, several safetensors shards) to a temp folder, then loads it
in a fresh subprocess per row while a thread samples the process RSS (psutil). `hf.load_params` maps one
tensor at a time and sends each device's slice from the mapping to the device, so the peak above the
post-import baseline should stay below `final arrays + largest shard file` (ratio <= 1: PASS); on this
CPU backend the "devices" are host memory, so the arrays themselves count. The control row reads every
file whole first (`safetensors.numpy.load_file`), then places the tensors: about twice the arrays.

  python bench/load_memory.py [--layers 20] [--shard-mb 500] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def hf_config(layers: int) -> dict:
  return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': VOCAB,
          'hidden_size': HIDDEN, 'intermediate_size': FFN, 'num_hidden_layers': layers,
          'num_attention_heads': HEADS, 'num_key_value_heads': KV_HEADS, 'rms_norm_eps': 1e-5,
          'rope_theta': 10000.0, 'max_position_embeddings': 2048, 'tie_word_embeddings': False,
          'torch_dtype': 'bfloat16'}


def write_checkpoint(folder: str, layers: int, shard_bytes: int) -> None:
  """Random bf16 tensors with HF names and [out, in] shapes, generated shard by shard."""
  import ml_dtypes
  from palr_jax.hub import hf
  head_dim = HIDDEN // HEADS
  shapes = {'model.embed_tokens.weight': (VOCAB, HIDDEN)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    shapes.update({
        p + 'input_layernorm.weight': (HIDDEN,), p + 'post_attention_layernorm.weight': (HIDDEN,),
        p + 'self_attn.q_proj.weight': (HEADS * head_dim, HIDDEN),
        p + 'self_attn.k_proj.weight': (KV_HEADS * head_dim, HIDDEN),
        p + 'self_attn.v_proj.weight': (KV_HEADS * head_dim, HIDDEN),
        p + 'self_attn.o_proj.weight': (HIDDEN, HEADS * head_dim),
        p + 'mlp.gate_proj.weight': (FFN, HIDDEN), p + 'mlp.up_proj.weight': (FFN, HIDDEN),
        p + 'mlp.down_proj.weight': (HIDDEN, FFN)})
  shapes.update({'model.norm.weight': (HIDDEN,), 'lm_head.weight': (VOCAB, HIDDEN)})
  bf16 = np.dtype(ml_dtypes.bfloat16)

  def random(shape, seed):
    return (np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.02).astype(bf16)

  specs = [hf.TensorSpec(name, shape, bf16, lambda shape=shape, i=i: random(shape, i))
           for i, (name, shape) in enumerate(shapes.items())]
  hf.save_safetensors(folder, specs, shard_bytes)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf_config(layers), f)


def naive_load(folder: str, config) -> dict:
  """The control: every file read whole into host memory (safetensors.numpy), then put on the device."""
  import jax
  from safetensors.numpy import load_file
  from palr_jax.hub import hf
  from palr_jax.hub import llama_names
  tensors = {}
  for file in sorted({t.file for t in hf.stored_tensors(folder).values()}):
    tensors.update(load_file(os.path.join(folder, file)))
  return {path: jax.device_put(np.ascontiguousarray(tensors[name].T if transpose else tensors[name]))
          for path, (name, transpose) in llama_names.hf_param_names(config).items()}


def child(folder: str, devices: int, loader: str) -> None:
  """Runs in a fresh process: import, baseline RSS, load while sampling, print one JSON line."""
  import jax
  jax.config.update('jax_num_cpu_devices', devices)
  import psutil
  from palr_jax.defaults import get_config
  from palr_jax import sharding
  from palr_jax.hub import hf
  proc = psutil.Process()
  c = get_config()
  c.model.param_dtype = 'bfloat16'
  config = hf.llama_config(folder, c.model)
  mesh = sharding.make_mesh(c.mesh) if devices > 1 else None
  jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
  baseline = proc.memory_info().rss
  peak, done = [baseline], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], proc.memory_info().rss)
      time.sleep(0.002)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  start = time.perf_counter()
  if loader == 'naive':
    params = naive_load(folder, config)
  else:
    params = hf.load_params(folder, config, mesh, c.mesh.rules if mesh else None)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  done.set()
  thread.join()
  peak[0] = max(peak[0], proc.memory_info().rss)
  arrays = sum(s.data.nbytes for p in params.values() for s in p.addressable_shards)
  params_count = sum(p.size for p in params.values())
  print(json.dumps({'loader': loader, 'devices': devices, 'baseline': baseline, 'peak': peak[0], 'arrays': arrays,
                    'params': params_count, 'seconds': seconds}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=20)
  parser.add_argument('--shard-mb', type=int, default=500)
  parser.add_argument('--keep', default='', help='write the checkpoint here and keep it (default: temp)')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  parser.add_argument('--devices', type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument('--loader', default='palr', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.devices, args.loader)
    return
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as folder:
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(folder, 'config.json')):
      start = time.perf_counter()
      write_checkpoint(folder, args.layers, args.shard_mb << 20)
      print(f'wrote checkpoint in {time.perf_counter() - start:.0f} s', file=sys.stderr)
    files = [f for f in os.listdir(folder) if f.endswith('.safetensors')]
    largest = max(os.path.getsize(os.path.join(folder, f)) for f in files)
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    gib = lambda n: n / 2**30  # noqa: E731
    rows = []
    for loader, devices in (('palr', 1), ('palr', 8), ('naive', 1)):
      out = subprocess.run([sys.executable, __file__, '--child', folder, '--devices', str(devices),
                            '--loader', loader],
                           check=True, capture_output=True, text=True, cwd=root,
                           env=dict(os.environ, PYTHONPATH=root))
      r = json.loads(out.stdout.strip().splitlines()[-1])
      above = r['peak'] - r['baseline']
      ratio = above / (r['arrays'] + largest)
      name = 'hf.load_params' if loader == 'palr' else 'control: load_file + device_put'
      rows.append(f"| {name} | {devices} | {r['params'] / 1e9:.2f}B | {gib(total):.2f} ({len(files)} files, "
                  f"largest {gib(largest):.2f}) | {gib(r['arrays']):.2f} | {gib(above):.2f} | "
                  f"{above / r['arrays']:.2f} | {ratio:.2f} {'PASS' if ratio <= 1 else 'FAIL'} | "
                  f"{r['seconds']:.1f} |")
  print('| loader | devices | params | checkpoint GiB | final arrays GiB | RSS peak above baseline GiB | '
        'peak / arrays | peak / (arrays + largest shard) | load s |')
  print('|---|---|---|---|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
