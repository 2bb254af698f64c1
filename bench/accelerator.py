"""One accelerator run: correctness on the chip, then the speeds that matter, written to bench/RESULTS.md.

Made for a lent GPU machine (one H100/H200-class GPU, ~15 minutes of machine time, no network, its own
Python image: JAX with CUDA, flax, optax, orbax, transformers, peft, torch; no tensorflow, tensorflow-
datasets, gguf or tensorboard): every model is built in place with random weights, nothing is read from a
hub, and nothing on these paths imports TensorFlow. `bench/accelerator.sh` is the entry point (it adds the
carried ml-collections wheel when the image lacks it).

Checks, in order, each timed against the --budget-s (default 420 s, so the run ends within 8 minutes):
  parity    logits of our Llama against transformers' LlamaForCausalLM (torch fp32) on left-padded rows:
            ours in fp32 (highest matmul precision), and in bf16 with attention='auto' (cuDNN flash
            attention on a GPU) and 'xla'; max |diff| over the logit scale and top-1 agreement
  train     the LoRA train step (r=8 on q/v, AdamW, logits at the loss positions only) on SmolLM2-135M's
            shape and on a Llama-3.2-1B-shaped model (random weights, bf16): s/step, tokens/s, MFU =
            model FLOPs (`step_flops`: 4 per frozen weight per token, the work a LoRA step needs) over
            the chip's dense bf16 peak, and the device's peak memory
  rank      users/s ranking K=20 candidates: score mode (one forward, the tag logits) against greedy
            generation constrained to the candidates (a KV cache, one call per written item)
  profiles  generation tokens/s (greedy, batch of prompts, 128 new tokens), as the profile stage runs it

  bench/accelerator.sh [--results bench/RESULTS.md] [--budget-s 420]
  bench/accelerator.sh --cpu-smoke --results /tmp/x.md   # the same code on tiny shapes, on CPU (a test)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Dense bf16 peak FLOP/s per chip, by a substring of jax's device_kind (vendor data sheets, no sparsity).
PEAK_BF16 = (('H200', 989e12), ('H100', 989e12), ('GH200', 989e12), ('B200', 2250e12), ('A100', 312e12),
             ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12), ('TPU v6', 918e12), ('TPU v5p', 459e12),
             ('TPU v5', 197e12), ('TPU v4', 275e12))

SHAPES = {
    'SmolLM2-135M': dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    'Llama-1B': dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
    'tiny': dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, tie_word_embeddings=True),
}
# (shape, batch, length, timed steps) per train-step row; the smoke run uses the tiny shape.
TRAIN = {'gpu': (('SmolLM2-135M', 16, 1024, 5), ('Llama-1B', 8, 2048, 5)), 'smoke': (('tiny', 2, 64, 2),)}
RESPONSE = 48  # loss tokens per row, at its end, as a PALR answer


def device_peak(smoke: bool) -> tuple[float, str]:
  """(dense bf16 FLOP/s of one device, where that figure comes from)."""
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_BF16:
    if name.lower() in kind.lower():
      return peak, f'{kind}: {peak / 1e12:.0f} TFLOP/s dense bf16 (data sheet)'
  a = jnp.ones((1024, 1024), jnp.bfloat16)
  dot = jax.jit(lambda x: x @ x)
  dot(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    dot(a).block_until_ready()
  peak = 5 * 2 * 1024 ** 3 / (time.perf_counter() - start)
  return peak, f'{kind}: {peak / 1e9:.0f} GFLOP/s measured (1024^2 bf16 matmul)' + (' (smoke)' if smoke else '')


def llama_config(shape: str, **runtime):
  from palr_jax.model import llama  # pylint: disable=g-import-not-at-top
  return llama.LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, **runtime)


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


# ------------------------------------------------------------------------------------------ parity


def check_parity(smoke: bool) -> list[dict]:
  """Our logits against transformers' (torch fp32) on the same random weights and left-padded rows."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from palr_jax.hub import llama_names  # pylint: disable=g-import-not-at-top
  from palr_jax.model import attention, llama  # pylint: disable=g-import-not-at-top
  shape = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=64, max_position_embeddings=512, rope_theta=10000.0)
  base = llama.LlamaConfig(**shape)
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(**llama_names.config_to_hf(base), attn_implementation='eager')
  hf = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith('norm.weight') else 0.05 * torch.randn_like(p))
  weights = llama_names.params_from_hf_state_dict(base, {k: v.numpy() for k, v in hf.state_dict().items()})
  rng = np.random.default_rng(0)
  lengths, t = [128, 96, 128, 40], 128  # even lengths: cuDNN's flash kernel applies
  ids = np.zeros((len(lengths), t), np.int32)
  mask = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    ids[b, t - n:], mask[b, t - n:] = rng.integers(3, base.vocab_size, n), 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  valid = mask.astype(bool)
  rows = []
  for dtype, impl, limit in (('float32', 'xla', 2e-3), ('bfloat16', 'auto', 5e-2), ('bfloat16', 'xla', 5e-2)):
    config = llama.LlamaConfig(**shape, dtype=dtype, param_dtype=dtype, attention=impl)
    model = llama.Llama(config, rngs=nnx.Rngs(0))
    llama.assign_params(model, weights)
    kind = attention.attention_kind(impl, jax.default_backend(), jnp.dtype(dtype), config.head_dim, (t, t))
    with jax.default_matmul_precision('highest' if dtype == 'float32' else 'default'):
      ours = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, ids, positions, mask), np.float32)
    diff = float(np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max())
    top1 = float((ours.argmax(-1) == ref.argmax(-1))[valid].mean())
    ok = diff <= limit and top1 >= (0.999 if dtype == 'float32' else 0.9)
    rows.append({'check': f'logits {dtype}, attention={impl} (runs {kind})', 'max abs diff / max abs logit': diff,
                 'top-1 agreement': top1, 'limit': limit, 'ok': ok})
  return rows


# ------------------------------------------------------------------------------------------- train


def bench_train(shape: str, batch: int, length: int, steps: int, peak: float) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from palr_jax import defaults, sharding  # pylint: disable=g-import-not-at-top
  from palr_jax.model import llama, lora  # pylint: disable=g-import-not-at-top
  from palr_jax.train import progress  # pylint: disable=g-import-not-at-top
  from palr_jax.train import step as train  # pylint: disable=g-import-not-at-top
  c = defaults.get_config()
  c.train.update(batch_size=batch, microbatches=1, max_loss_tokens=RESPONSE, warmup_steps=0, lr_decay='constant')
  c.mesh.fsdp = 1
  rules = c.mesh.rules
  config = llama_config(shape, dtype='bfloat16', param_dtype='bfloat16', remat='none')
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  model = lora.apply_lora(llama.Llama(config, rngs=nnx.Rngs(0)), c.lora, nnx.Rngs(1))
  laid = train.setup(model, c.train, mesh, rules)
  frozen, state = laid.frozen, laid.initial_state()
  lora_params = sum(v.size for v in laid.values.values())
  del model
  step = laid.train_step(c.train, rules, 0)
  rng = np.random.default_rng(0)
  loss_mask = np.zeros((batch, length), np.int32)
  loss_mask[:, -RESPONSE:] = 1
  host = {'input_ids': rng.integers(3, config.vocab_size, (batch, length)).astype(np.int32),
          'positions': np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
          'segment_ids': np.ones((batch, length), np.int32), 'loss_mask': loss_mask}
  device_batch = train.device_batch(host, mesh, rules, c.train)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(state, frozen, device_batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, frozen, device_batch)
  float(metrics['loss'])
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, frozen, device_batch)
  loss = float(metrics['loss'])  # waits for the last step
  seconds = (time.perf_counter() - start) / steps
  flops = progress.step_flops(config, lora_params, batch, length, RESPONSE)
  params = sum(x.size for x in jax.tree.leaves(frozen))
  return {'model': f'{shape} ({params / 1e9:.2f}B, random weights)', 'batch': f'{batch} x {length}',
          's / step': seconds, 'tokens/s': batch * length / seconds, 'MFU': flops / seconds / peak,
          'compile s': compile_s, 'loss': loss, 'peak device memory GiB': peak_memory_gib(),
          'XLA temp GiB': compiled.memory_analysis().temp_size_in_bytes / 2**30}


# -------------------------------------------------------------------------------------------- rank


def synthetic_users(vocab: int, users: int, k: int, prompt: tuple[int, int], seed: int = 0):
  """Prompts of random tokens and, per user, K candidates: a one-token tag then 6 title tokens."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(3, vocab, rng.integers(*prompt)).tolist() for _ in range(users)]
  tags = np.arange(10, 10 + k)
  candidates = [[[int(tags[j])] + rng.integers(100, vocab, 6).tolist() for j in range(k)] for _ in range(users)]
  return prompts, np.broadcast_to(tags, (users, k)), candidates


def bench_rank(shape: str, users: int, k: int, batch: int, prompt: tuple[int, int]) -> list[dict]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from palr_jax import defaults  # pylint: disable=g-import-not-at-top
  from palr_jax.model import llama, rerank  # pylint: disable=g-import-not-at-top
  config = llama_config(shape, dtype='bfloat16', param_dtype='bfloat16')
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  buckets = tuple(defaults.get_config().batching.length_buckets)
  prompts, tags, candidates = synthetic_users(config.vocab_size, users, k, prompt)
  modes = {
      'score (tag logits, one forward)': lambda: rerank.score_tags(model, prompts, tags, batch_size=batch,
                                                                  buckets=buckets),
      'generate (constrained greedy, 10 items)': lambda: rerank.generate_ranking(
          model, prompts, candidates, separator=[13], max_items=10, batch_size=batch, buckets=buckets),
  }
  rows = []
  for mode, fn in modes.items():
    start = time.perf_counter()
    fn()  # compiles every shape it meets
    first = time.perf_counter() - start
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    rows.append({'mode': mode, 'users': users, 'users/s': users / seconds, 'first pass s (compiles)': first})
  rows[0]['score / generate'] = rows[0]['users/s'] / rows[1]['users/s']
  return rows


def bench_profiles(shape: str, prompts_n: int, new_tokens: int, prompt: tuple[int, int], batch: int) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from palr_jax import defaults  # pylint: disable=g-import-not-at-top
  from palr_jax.model import decode, llama  # pylint: disable=g-import-not-at-top
  config = llama_config(shape, dtype='bfloat16', param_dtype='bfloat16')
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  prompts, _, _ = synthetic_users(config.vocab_size, prompts_n, 1, prompt, seed=1)
  kwargs = dict(max_new_tokens=new_tokens, eos_ids=[config.vocab_size - 1], pad_id=0, batch_size=batch,
                buckets=tuple(defaults.get_config().batching.length_buckets))
  start = time.perf_counter()
  decode.generate(model, prompts, **kwargs)
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = decode.generate(model, prompts, **kwargs)
  seconds = time.perf_counter() - start
  tokens = sum(len(o) for o in out)
  return {'model': shape, 'prompts': prompts_n, 'batch': batch, 'new tokens': tokens, 'tokens/s': tokens / seconds,
          'first pass s (compiles)': first}


# ------------------------------------------------------------------------------------------- report


def fmt(value) -> str:
  if value is None:
    return '-'
  if isinstance(value, bool):
    return 'yes' if value else 'NO'
  if isinstance(value, float):
    return f'{value:.3g}' if abs(value) < 100 else f'{value:,.0f}'
  return str(value)


def table(rows: list[dict]) -> list[str]:
  keys = list(dict.fromkeys(k for r in rows for k in r))
  return (['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
          + ['| ' + ' | '.join(fmt(r.get(k)) for k in keys) + ' |' for r in rows])


def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cpu-smoke', action='store_true', help='tiny shapes on CPU: the code paths, no figures')
  parser.add_argument('--results', default=os.path.join(ROOT, 'bench', 'RESULTS.md'))
  parser.add_argument('--budget-s', type=float, default=420.0, help='skip what would start after this long')
  args = parser.parse_args(argv)
  smoke = args.cpu_smoke
  begin = time.perf_counter()
  device = jax.devices()[0]
  if not smoke and device.platform == 'cpu':
    print('bench/accelerator.sh: no accelerator (jax.devices() is CPU); use --cpu-smoke for the code paths.',
          file=sys.stderr)
    return 2
  peak, peak_source = device_peak(smoke)
  sections: dict[str, list[str]] = {}
  failures = []

  def run(name: str, fn):
    if time.perf_counter() - begin > args.budget_s:
      sections[name] = [f'skipped: the run had used its {args.budget_s:.0f} s budget']
      return
    start = time.perf_counter()
    try:
      rows = fn()
      sections[name] = table(rows) + ['', f'({time.perf_counter() - start:.0f} s)']
      failures.extend(f'{name}: {r.get("check")}' for r in rows if r.get('ok') is False)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      sections[name] = [f'FAILED: {type(e).__name__}: {str(e)[:300]}']
      failures.append(name)
    print(f'{name}: {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)

  run('Logit parity with transformers (torch fp32)', lambda: check_parity(smoke))
  for shape, batch, length, steps in TRAIN['smoke' if smoke else 'gpu']:
    run(f'LoRA train step: {shape}', lambda s=shape, b=batch, t=length, n=steps: [bench_train(s, b, t, n, peak)])
  rank_args = ('tiny', 8, 20, 4, (40, 60)) if smoke else ('SmolLM2-135M', 512, 20, 64, (300, 450))
  run('Ranking users/s', lambda: bench_rank(*rank_args))
  profile_args = ('tiny', 4, 8, (20, 40), 2) if smoke else ('SmolLM2-135M', 256, 128, (300, 450), 64)
  run('Profile generation', lambda: [bench_profiles(*profile_args)])

  absent = {'tensorflow', 'tensorflow_datasets', 'gguf', 'tensorboard'}  # not in the accelerator image
  forbidden = sorted({m.split('.')[0] for m in sys.modules} & absent)
  if forbidden:
    failures.append(f'imported {forbidden}: the accelerator image has none of them')
  title = f'Accelerator: {device.device_kind}' + (' (cpu smoke)' if smoke else '')
  body = [f'`bench/accelerator.sh{" --cpu-smoke" if smoke else ""}`, {datetime.date.today().isoformat()}, '
          f'{platform.node() or "host"}: jax {jax.__version__} on {jax.device_count()} x {device.device_kind} '
          f'({device.platform}); peak {peak_source}; total {time.perf_counter() - begin:.0f} s.'
          + (' Smoke run: tiny shapes, the figures mean nothing.' if smoke else ''), '']
  for name, lines in sections.items():
    body += [f'**{name}**', ''] + lines + ['']
  body.append(f'Failures: {", ".join(failures)}' if failures else 'All checks passed.')
  import results as results_md  # pylint: disable=g-import-not-at-top; bench/results.py, beside this file
  results_md.write_section(title, '\n'.join(body), args.results)
  print('\n'.join([f'## {title}', ''] + body))
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
