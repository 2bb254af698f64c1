"""Causal self-attention on CPU, forward + backward: palr_jax's 'blocked' kernel vs XLA's attention
(`jax.nn.dot_product_attention`, what 'auto' ran before) and torch's SDPA (what torch + peft runs).

SmolLM2-135M's attention shape (9 query heads over 3 KV heads, head_dim 64), B = 4 rows, bf16 inputs,
lengths 192-1024 (the `:quick` and `:full` length buckets). One measurement is the median of --reps calls of
the jitted gradient of sum(out ** 2) w.r.t. q, k, v, after one call that compiles. All rows see the same
causal mask (no padding), and each implementation's output is checked against the fp32 reference first.

  python bench/attention.py [--reps 7] [--lengths 192,256,384,512,768,1024] [--write bench/RESULTS.md]
The last line is `speedup_vs_xla=<x>` at T = 512 (the train-step bench's length).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import results as results_md  # noqa: E402

B, HEADS, KV_HEADS, HEAD_DIM = 4, 9, 3, 64


def timed(fn, reps: int) -> float:
  fn()
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def jax_side(impl: str, t: int, reps: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from palr_jax.model import attention  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, t, n, HEAD_DIM)), jnp.bfloat16)
             for n in (HEADS, KV_HEADS, KV_HEADS))
  segments = jnp.ones((B, t), jnp.int32)
  mask = attention.attention_mask(segments, segments)
  want = attention.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, 'reference')
  got = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, mask, impl))(q, k, v)
  error = float(jnp.abs(got.astype(jnp.float32) - want).max())
  if error > 0.05:
    raise AssertionError(f'{impl} attention at T={t}: max error {error} against the fp32 reference')
  grad = jax.jit(jax.grad(lambda q, k, v: (attention.dot_product_attention(q, k, v, mask, impl)
                                           .astype(jnp.float32) ** 2).sum(), argnums=(0, 1, 2)))
  return timed(lambda: jax.block_until_ready(grad(q, k, v)), reps)


def torch_side(t: int, reps: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  g = torch.Generator().manual_seed(0)
  q = torch.randn(B, HEADS, t, HEAD_DIM, generator=g).to(torch.bfloat16).requires_grad_()
  k, v = (torch.randn(B, KV_HEADS, t, HEAD_DIM, generator=g).to(torch.bfloat16).requires_grad_()
          for _ in range(2))

  def step():
    q.grad = k.grad = v.grad = None
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    (out.float() ** 2).sum().backward()

  return timed(step, reps)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--reps', type=int, default=7)
  parser.add_argument('--lengths', default='192,256,384,512,768,1024')
  parser.add_argument('--write', default='', help='RESULTS.md to put the table in (a quiet machine only)')
  parser.add_argument('--force', action='store_true', help='measure on a busy machine (writes nothing)')
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(',')]
  load = results_md.quiet_or_exit('bench/attention.py', force=args.force and not args.write)
  rows, at_512 = [], None
  for t in lengths:
    xla, blocked = jax_side('xla', t, args.reps), jax_side('blocked', t, args.reps)
    sdpa = torch_side(t, args.reps)
    rows.append(f'| {t} | {xla * 1e3:.1f} | {blocked * 1e3:.1f} | {sdpa * 1e3:.1f} | {xla / blocked:.2f}x | '
                f'{sdpa / blocked:.2f}x |')
    print(rows[-1], flush=True)
    if t == 512:
      at_512 = xla / blocked
  from palr_jax.model import attention  # pylint: disable=g-import-not-at-top
  head = (f'`python bench/attention.py --reps {args.reps}` ({platform.machine()}, {os.cpu_count()} cores, '
          f'{datetime.date.today()}, load average {load:.2f} before). Forward + backward of one layer\'s causal '
          f'attention, B={B}, {HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}, bf16; medians in ms. Blocked: '
          f'{attention.ATTENTION_BLOCK} query rows per block.\n\n'
          '| T | XLA (jax.nn.dot_product_attention) | palr_jax blocked | torch SDPA | blocked vs XLA | '
          'blocked vs torch |\n|---|---|---|---|---|---|\n')
  if args.write:
    results_md.write_section('Attention on CPU', head + '\n'.join(rows), args.write)
  if at_512 is not None:
    print(f'speedup_vs_xla={at_512:.2f}')


if __name__ == '__main__':
  main()
