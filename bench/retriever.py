"""Retriever speed and quality against named peers, on ML-100K (leave-one-out, test protocol).

1. Fit: our jitted iALS (exact Cholesky solves) vs `implicit` 0.7.3 ALS (CPU, conjugate gradient, all
   cores as its own threads, BLAS single-threaded as implicit asks), same train+valid data, same factors / reg /
   iterations and the same confidences
   (implicit weighs a positive by alpha_implicit * r, ours by 1 + alpha * r, so alpha_implicit = 1 + alpha).
   Both are scored with the same ranking code: test HR@10 / NDCG@10 / HR@50 over the catalog minus history.
   Our seed s uses the key the retriever stage gives its test model, so these are the numbers of
   `python -m palr_jax.main --stages retriever --config.seed=s` (no search grid in the config).
2. Top-K for all users: our jitted, user-batched, history-masked `topk.top_k` vs numpy (BLAS matmul,
   mask, `argpartition`, sort of the top K), on ML-100K and on a larger synthetic catalog.
Times are the best of `--repeats` warm runs (the first, compiling, call is reported apart).
3. `--synthetic USERS ITEMS EVENTS`: the retriever stage at catalog scale (issue 28). Writes a synthetic
   RecBole catalog (Zipf item popularity, and a sequential chain: an event follows its predecessor's item
   + 1 with probability --chain) to a temp folder, runs `python -m palr_jax.main --stages retriever` of
   `--synthetic_config` on it in a child process, and prints its wall seconds and the peak RSS of its
   process tree (sampled every 0.2 s, and the kernel's own high-water mark of the child).

  python bench/retriever.py [--config configs/ml100k.py] [--repeats 3] [--write bench/RESULTS.md]
  python bench/retriever.py --synthetic 200000 100000 5000000 [--synthetic_config configs/ml100k.py:quick]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

import results as results_md
from palr_jax import metrics as evaluate
from palr_jax import rng
from palr_jax.data import interactions
from palr_jax.retrieval import mf
from palr_jax.retrieval import topk


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def best_of(fn, repeats: int):
  """(result, first-call seconds, best of `repeats` further calls)."""
  start = time.perf_counter()
  out = fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return out, first, min(times, default=first)


def numpy_top_k(users, items, histories, k, batch):
  """Reference: scores by BLAS, history to -inf, argpartition then sort of the K survivors."""
  out = []
  for lo in range(0, len(users), batch):
    scores = users[lo:lo + batch] @ items.T
    rows = np.repeat(np.arange(scores.shape[0]), [len(h) for h in histories[lo:lo + batch]])
    scores[rows, np.concatenate(histories[lo:lo + batch])] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    out.append(np.take_along_axis(part, order, axis=1))
  return np.concatenate(out)


def jax_top_k(users, items, histories, k, batch):
  return topk.top_k(users, items, histories, k, user_batch=batch)[1]


def headline(ranks) -> dict[str, float]:
  m = evaluate.metrics_from_ranks(ranks, (10, 50))
  return {'HR@10': m['HR@10'], 'NDCG@10': m['NDCG@10'], 'HR@50': m['HR@50']}


def fit_ours(histories, num_items, rconfig, seed):
  key = rng.jax_key(seed, 'test')
  return jax.block_until_ready(mf.fit_ials(histories, num_items, rconfig, key))


def fit_implicit(histories, num_items, rconfig, seed):
  import implicit
  import scipy.sparse
  import threadpoolctl
  rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
  matrix = scipy.sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(histories))),
                                   shape=(len(histories), num_items))  # duplicates sum, as our counts
  model = implicit.cpu.als.AlternatingLeastSquares(
      factors=int(rconfig.factors), regularization=float(rconfig.reg), alpha=1.0 + float(rconfig.alpha),
      iterations=int(rconfig.iterations), random_state=seed, num_threads=0)
  with threadpoolctl.threadpool_limits(1, 'blas'):  # implicit's own advice: its threads, not BLAS's
    model.fit(matrix, show_progress=False)
  return model.user_factors, model.item_factors


def write_synthetic(directory: str, num_users: int, num_items: int, num_events: int, chain: float,
                    zipf: float, seed: int = 0) -> str:
  """RecBole atomic files `synthetic.{inter,item}` under `directory`; returns the dataset name.

  Users get at least 5 events (lengths ~ 5 + geometric, scaled to about `num_events` in total); each
  event is a Zipf(`zipf`)-popular item, or with probability `chain` its predecessor's item + 1 (mod I).
  """
  rng = np.random.default_rng(seed)
  mean_extra = max(num_events / num_users - 5, 1e-3)
  lengths = 5 + rng.geometric(1 / (1 + mean_extra), num_users) - 1
  total = int(lengths.sum())
  popularity = 1.0 / np.arange(1, num_items + 1) ** zipf
  ids = rng.permutation(num_items)     # popular items are spread over the id range
  draws = ids[rng.choice(num_items, total, p=popularity / popularity.sum())]
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  restart = rng.random(total) >= chain
  restart[starts] = True
  segment = np.cumsum(restart) - 1
  segment_start = np.flatnonzero(restart)
  items = (draws[segment_start][segment] + np.arange(total) - segment_start[segment]) % num_items
  users = np.repeat(np.arange(num_users), lengths)
  times = np.arange(total) - np.repeat(starts, lengths)
  name = 'synthetic'
  with open(os.path.join(directory, f'{name}.inter'), 'w') as f:
    f.write('user_id:token\titem_id:token\trating:float\ttimestamp:float\n')
    for lo in range(0, total, 1 << 20):
      hi = min(lo + (1 << 20), total)
      f.write(''.join(f'u{u}\ti{i}\t5\t{t}\n' for u, i, t in
                      zip(users[lo:hi].tolist(), items[lo:hi].tolist(), times[lo:hi].tolist())))
  with open(os.path.join(directory, f'{name}.item'), 'w') as f:
    f.write('item_id:token\tmovie_title:token_seq\n')
    f.write(''.join(f'i{i}\tItem {i}\n' for i in range(num_items)))
  print(f'synthetic catalog: {num_users} users, {num_items} items, {total} events '
        f'(Zipf {zipf}, chain {chain}) in {directory}', flush=True)
  return name


def tree_rss(pid: int) -> int:
  """Bytes resident in a process and its descendants now (0 once it is gone)."""
  import psutil
  try:
    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
  except psutil.NoSuchProcess:
    return 0
  total = 0
  for p in procs:
    try:
      total += p.memory_info().rss
    except psutil.NoSuchProcess:
      pass
  return total


def synthetic(args) -> int:
  """Runs the retriever stage on a synthetic catalog; prints wall seconds and peak RSS."""
  num_users, num_items, num_events = args.synthetic
  with tempfile.TemporaryDirectory(prefix='palr-synthetic-') as tmp:
    data = os.path.join(tmp, 'data')
    os.makedirs(data)
    start = time.perf_counter()
    name = write_synthetic(data, num_users, num_items, num_events, args.chain, args.zipf)
    print(f'written in {time.perf_counter() - start:.1f} s', flush=True)
    cmd = [sys.executable, '-m', 'palr_jax.main', '--config', args.synthetic_config, '--workdir',
           os.path.join(tmp, 'work'), '--stages', 'retriever', f'--config.data.path={data}',
           f'--config.data.name={name}'] + [f'--config.{o}' for o in args.override]
    print(' '.join(cmd), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    peak = 0

    def echo():  # the child's log as it comes, tqdm redraws (\r) included, each line cut to 300 characters
      pending = b''
      while chunk := os.read(child.stdout.fileno(), 1 << 16):
        *done, pending = re.split(rb'[\r\n]', pending + chunk)
        for line in done:
          if line.strip():
            print(line.decode(errors='replace')[-300:], flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    # A SIGTERM (e.g. `timeout`) or --timeout_s stops the stage too, and the figures so far are printed.
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(child.pid, signal.SIGKILL))
    while child.poll() is None:
      peak = max(peak, tree_rss(child.pid))
      if args.timeout_s and time.perf_counter() - start > args.timeout_s:
        os.killpg(child.pid, signal.SIGKILL)
      time.sleep(0.2)
    wall = time.perf_counter() - start
    reader.join()
    high_water = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    gib = max(peak, high_water) / 2**30
    print(f'retriever stage on {num_users} users x {num_items} items x {num_events} events: exit '
          f'{child.returncode}, wall {wall:.1f} s, peak RSS of the process tree {gib:.2f} GiB (sampled '
          f'{peak / 2**30:.2f} GiB, child high-water {high_water / 2**30:.2f} GiB); load average '
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores', flush=True)
    return child.returncode


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--synthetic', type=int, nargs=3, metavar=('USERS', 'ITEMS', 'EVENTS'),
                      help='time the retriever stage on a synthetic catalog of this size instead')
  parser.add_argument('--synthetic_config', default='configs/ml100k.py:quick')
  parser.add_argument('--override', action='append', default=[],
                      help='with --synthetic: a config override KEY=VALUE (repeatable)')
  parser.add_argument('--chain', type=float, default=0.3, help='with --synthetic: P(next item = item + 1)')
  parser.add_argument('--zipf', type=float, default=1.0, help='with --synthetic: popularity exponent')
  parser.add_argument('--timeout_s', type=float, default=0,
                      help='with --synthetic: stop the stage after this many seconds (0: never)')
  parser.add_argument('--config', default='configs/ml100k.py')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--seeds', type=int, default=3, help='quality: mean over this many seeds')
  parser.add_argument('--write', default='', help='update the "## Retriever" section of this file')
  args = parser.parse_args()
  if args.synthetic:
    return synthetic(args)
  config = load_config(args.config)
  rconfig = config.retriever
  inter = interactions.load(config.data)
  split = interactions.leave_one_out(inter)
  num_items = len(inter.item_ids)
  seen = [np.append(t, v) for t, v in zip(split.train, split.valid)]
  k = 50

  lines = []
  def say(text=''):
    print(text, flush=True)
    lines.append(text)

  say(f'ML-100K: {len(seen)} users, {num_items} items, {sum(map(len, seen))} train+valid events; '
      f'iALS factors={rconfig.factors} reg={rconfig.reg} alpha={rconfig.alpha} '
      f'iterations={rconfig.iterations}; mean of {args.seeds} seeds, times best of {args.repeats}.')
  say()
  say('| model | first fit s (compile) | fit s | test HR@10 | NDCG@10 | HR@50 (mean ± std over seeds) |')
  say('|---|---|---|---|---|---|')
  fit_times = {}
  for name, fit in (('palr_jax iALS (jit, Cholesky)', fit_ours), ('implicit 0.7.3 ALS (CG, 2 threads)', fit_implicit)):
    quality, firsts, bests = [], [], []
    for seed in range(args.seeds):
      (users, items), first, best = best_of(lambda: fit(seen, num_items, rconfig, seed),
                                            args.repeats if seed == 0 else 0)
      firsts.append(first)
      bests.append(best)
      ranks = topk.top_k(np.asarray(users), np.asarray(items), seen, 1, user_batch=rconfig.user_batch,
                         targets=split.test)[2]
      quality.append(headline(ranks))
    fit_times[name] = min(bests)
    cells = ' | '.join(f'{np.mean([q[m] for q in quality]):.4f} ± {np.std([q[m] for q in quality]):.4f}'
                       for m in ('HR@10', 'NDCG@10', 'HR@50'))
    say(f'| {name} | {firsts[0]:.2f} | {fit_times[name]:.2f} | {cells} |')
  ours, theirs = fit_times.values()
  say()
  say(f'fit time ratio implicit / ours: {theirs / ours:.2f}x')
  say()

  say(f'Top-{k} for all users (history masked), user batch {rconfig.user_batch}:')
  say()
  say('| catalog | users x items x factors | jax first call s | jax s | numpy s | numpy / jax |')
  say('|---|---|---|---|---|---|')
  users, items = (np.asarray(a) for a in fit_ours(seen, num_items, rconfig, 0))
  rng = np.random.default_rng(0)
  synthetic_users, synthetic_items = 4096, 32768
  cases = [('ML-100K', users, items, seen),
           ('synthetic', rng.normal(size=(synthetic_users, 64)).astype(np.float32),
            rng.normal(size=(synthetic_items, 64)).astype(np.float32),
            [rng.choice(synthetic_items, size=rng.integers(20, 500), replace=False)
             for _ in range(synthetic_users)])]
  for name, u, v, histories in cases:
    ours_out, first, ours_s = best_of(lambda: jax_top_k(u, v, histories, k, rconfig.user_batch), args.repeats)
    ref_out, _, ref_s = best_of(lambda: numpy_top_k(u, v, histories, k, rconfig.user_batch), args.repeats)
    agree = (ours_out == ref_out).mean()
    say(f'| {name} | {u.shape[0]} x {v.shape[0]} x {u.shape[1]} | {first:.3f} | {ours_s:.3f} | '
        f'{ref_s:.3f} | {ref_s / ours_s:.2f}x |')
    if agree < 0.999:
      say(f'WARNING: {name}: top-{k} agrees with numpy on only {agree:.4f} of entries')
  say()
  say(f'Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), '
      f'jax {jax.__version__} on {jax.devices()[0].platform}; run {datetime.date.today().isoformat()}; '
      f'load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores).')

  if args.write:
    results_md.write_section('Retriever', '`python bench/retriever.py`\n\n' + '\n'.join(lines), args.write)


if __name__ == '__main__':
  sys.exit(main())
