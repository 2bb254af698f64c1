"""Host memory of exporting a merged model: does the export stage hold the model only once?

The export stage (`exporter.export_model`, process 0 of a pod on its own devices) loads the base in
fp32, adds a trained adapter from its PEFT folder and writes W + (alpha/r) A B tensor by tensor
(`lora.merged_params` + `hf.save_folder`). On the CPU backend the "devices" are host memory, so the loaded
fp32 base counts in the RSS; what matters is what writing adds on top of the loaded model: one merged
tensor and its copies on the way to the file (PASS: the write phase's peak above the RSS at its start <=
4 x the largest tensor in fp32), never the model again. The control row gathers every merged tensor to the
host first and writes them with safetensors' save_file: the whole merged model (and more) on top.

A synthetic ~1B-parameter Llama (bench/load_memory.py's, bf16) with a LoRA adapter (r 16 on q, k, v, o;
B random, so the merge is real) is written to a temp folder; each row runs in a fresh process while a
thread samples its RSS (psutil).

  python bench/export_memory.py [--layers 20] [--devices 8] [--write] [--force]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import load_memory  # noqa: E402
from bench import results as results_md  # noqa: E402

LORA = dict(rank=16, alpha=32.0, targets=(r'.*self_attn\.(q_proj|k_proj|v_proj|o_proj)',), dropout=0.0,
            dtype='float32')


def model_config(folder: str):
  from palr_jax.defaults import get_config  # pylint: disable=g-import-not-at-top
  c = get_config()
  c.model.spec = f'hf:{folder}'
  c.model.param_dtype = 'float32'  # what the export stage merges in
  c.lora.update(LORA)
  return c


def write_assets(folder: str, run: str, layers: int) -> None:
  """The checkpoint (with a stand-in tokenizer) and a trained-looking adapter at `run/adapters/step_1`."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  from palr_jax.hub import load, peft  # pylint: disable=g-import-not-at-top
  from palr_jax.model import lora  # pylint: disable=g-import-not-at-top
  from palr_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  load_memory.write_checkpoint(folder, layers, 500 << 20)
  words = Tokenizer(models.WordLevel({'<unk>': 0, '<s>': 1, '</s>': 2}, unk_token='<unk>'))
  PreTrainedTokenizerFast(tokenizer_object=words, eos_token='</s>', bos_token='<s>').save_pretrained(folder)
  c = model_config(folder)
  c.model.param_dtype = 'bfloat16'
  model, _, _ = load.load_model(c.model, c.lora)
  key = jax.random.key(0)
  for path, var in nnx.to_flat_state(lora.lora_state(model)):
    if path[-1] == 'lora_b':
      key, sub = jax.random.split(key)
      var.set_value(0.01 * jax.random.normal(sub, var.get_value().shape, var.get_value().dtype))
  peft.save_adapter(checkpointing.adapter_dir(run, 1), model, c.lora, folder)


def control(c, run: str, out: str, mark) -> None:
  """Every merged tensor on the host, then one save_file: what tensor-by-tensor writing avoids."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from palr_jax.hub import hf, load  # pylint: disable=g-import-not-at-top
  from palr_jax.model import lora  # pylint: disable=g-import-not-at-top
  from palr_jax import adapters  # pylint: disable=g-import-not-at-top
  mesh, rules = _mesh(c), c.mesh.rules
  model, _, config = load.load_model(c.model, mesh=mesh, rules=rules)
  adapters.apply_trained_adapter(model, run, 1, mesh=mesh, rules=rules)
  specs = hf.export_specs(config, lora.merged_params(model), hf.stored_dtype(load.hf_folder(c.model)))
  mark()
  os.makedirs(out)
  save_file({s.name: np.ascontiguousarray(s.load()) for s in specs}, os.path.join(out, hf.SINGLE_FILE))


def _mesh(c):
  from palr_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(c.mesh)


def child(folder: str, run: str, devices: int, mode: str) -> None:
  """Runs in a fresh process: import, baseline RSS, export while sampling, print one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', devices)
  import psutil  # pylint: disable=g-import-not-at-top
  from palr_jax.hub import hf  # pylint: disable=g-import-not-at-top
  from palr_jax import exporter  # pylint: disable=g-import-not-at-top
  proc = psutil.Process()
  c = model_config(folder)
  jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
  baseline = proc.memory_info().rss
  peak, marks, done = [baseline], {}, threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], proc.memory_info().rss)
      time.sleep(0.002)

  def mark():  # the model is loaded with its adapter: the write phase starts
    marks['load_peak'], marks['loaded'] = peak[0], proc.memory_info().rss
    peak[0] = marks['loaded']

  real_save_folder = hf.save_folder

  def save_folder(*args, **kwargs):
    mark()
    return real_save_folder(*args, **kwargs)

  hf.save_folder = save_folder  # what export_model calls once the model is loaded
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix='palr-export-bench-') as tmp:
    out = os.path.join(tmp, 'merged')
    if mode == 'control':
      control(c, run, out, mark)
    else:
      exporter.export_model(c.model, out, 'merged', workdir=run, step=1, mesh=_mesh(c), rules=c.mesh.rules)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    stored = hf.stored_tensors(out)
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith('.safetensors'))
  print(json.dumps({'mode': mode, 'devices': devices, 'baseline': baseline, **marks, 'write_peak': peak[0],
                    'params': sum(math.prod(t.shape) for t in stored.values()),
                    'largest': max(math.prod(t.shape) for t in stored.values()), 'written': written,
                    'seconds': seconds}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', type=int, default=20)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--write', action='store_true', help='record the table in bench/RESULTS.md')
  parser.add_argument('--force', action='store_true', help='measure on a busy machine (smoke runs: no --write)')
  parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
  parser.add_argument('--mode', default='export', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child, args.devices, args.mode)
    return
  if args.write and args.force:
    parser.error('--force runs record nothing: drop --write')
  load = results_md.quiet_or_exit('bench/export_memory.py', args.force)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  gib = lambda n: n / 2**30  # noqa: E731
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folder, run = os.path.join(tmp, 'model'), os.path.join(tmp, 'run')
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {root!r}); '
                    f'from bench import export_memory as e; e.write_assets({folder!r}, {run!r}, {args.layers})'],
                   check=True, capture_output=True, cwd=root, env=env)
    print(f'wrote the checkpoint and adapter in {time.perf_counter() - start:.0f} s', file=sys.stderr)
    for mode in ('export', 'control'):
      out = subprocess.run([sys.executable, __file__, '--child', folder, run, '--devices', str(args.devices),
                            '--mode', mode], check=True, capture_output=True, text=True, cwd=root, env=env)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      added = r['write_peak'] - r['loaded']
      limit = 4 * 4 * r['largest']  # one tensor in fp32, its stored-dtype copy, host copies
      name = 'export_model (tensor by tensor)' if mode == 'export' else 'control: gather all, then save_file'
      rows.append(f"| {name} | {args.devices} | {r['params'] / 1e9:.2f}B | {gib(4 * r['params']):.2f} | "
                  f"{gib(r['load_peak'] - r['baseline']):.2f} | {gib(r['written']):.2f} | {gib(added):.2f} | "
                  f"{'PASS' if added <= limit else 'FAIL'} (<= {gib(limit):.2f}) | "
                  f"{gib(max(r['load_peak'], r['write_peak']) - r['baseline']):.2f} | {r['seconds']:.0f} |")
  table = '\n'.join([
      '| export | devices | params | fp32 base GiB | RSS peak loading GiB | written (bf16) GiB | '
      'writing adds GiB | <= 4 largest fp32 tensors | RSS peak overall GiB | s |',
      '|---|---|---|---|---|---|---|---|---|---|', *rows])
  print(table)
  if args.write:
    header = (f'`python bench/export_memory.py --write` ({platform.node()}, {os.cpu_count()} cores, '
              f'{datetime.date.today()}, load average {load:.2f} before; JAX CPU backend). A synthetic '
              f'{args.layers}-layer Llama (hidden 2048, vocab 32000, bf16) with a LoRA adapter (r 16 on q, k, v, '
              f'o) is exported merged on {args.devices} simulated devices, in a fresh process per row; RSS '
              'sampled every 2 ms, above the post-import baseline. On CPU the devices are host memory, so '
              'the loaded fp32 base counts; on an accelerator only what writing adds passes through the host.')
    results_md.write_section('Export memory', header + '\n\n' + table)


if __name__ == '__main__':
  main()
