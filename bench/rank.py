"""LLM ranking speed and quality: score mode (tag logits, one forward pass) vs generate mode (greedy
decoding constrained to the candidates by a prefix trie), in one run on the same prompts.

A seeded sample of ML-100K test users; candidates are the retriever's top K (iALS fitted on train +
valid, as in the retriever stage), in retriever order, no target inserted; prompts are Recommend_Retrieval
with the fast statistics profile. The model is `config.model.spec` (SmolLM2-135M-Instruct by default),
zero-shot unless `--adapter W` applies the adapter trained in W. Each mode runs twice over all sampled
users: the first pass compiles every shape it meets (reported apart), the second gives users/s.
HR@10 / NDCG@10 are over the catalog: candidates the LLM did not rank keep retriever order, targets the
retriever missed keep their retriever rank.

  python bench/rank.py [--config palr_jax/defaults.py] [--users 32] [--adapter W] [--write bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import time

import jax
import numpy as np

import results as results_md
from palr_jax import adapters
from palr_jax import metrics
from palr_jax.data import interactions
from palr_jax.data import profile_text
from palr_jax.data import prompts
from palr_jax.hub import load
from palr_jax.model import rerank
from palr_jax.retrieval import candidates as candidates_lib
from palr_jax.retrieval import mf
from palr_jax.stages import rank


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def retriever_top_k(config, inter, split, users):
  """(top-K items [N, K], 0-based target ranks [N]) on test for `users`, fitted on train + valid."""
  seen = [np.append(t, v) for t, v in zip(split.train, split.valid)]
  user_factors, item_factors = mf.fit(seen, len(inter.item_ids), config.retriever,
                                      jax.random.key(config.seed))
  ranking = candidates_lib.rank(user_factors, item_factors, seen, np.arange(len(seen)), split.test,
                                config.retriever)
  return ranking.items[users], ranking.ranks[users]


def timed(fn, rows):
  """(result, seconds of a first pass that compiles every shape, seconds of a second, warm pass)."""
  start = time.perf_counter()
  fn(rows)
  first = time.perf_counter() - start
  start = time.perf_counter()
  out = fn(rows)
  return out, first, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='palr_jax/defaults.py')
  parser.add_argument('--users', type=int, default=32, help='seeded sample of test users')
  parser.add_argument('--adapter', default='', help='a run folder whose trained LoRA adapter to apply')
  parser.add_argument('--write', default='', help='update the "## Ranking" section of this file')
  args = parser.parse_args()
  config = load_config(args.config)
  rc = config.rank

  inter = interactions.load(config.data)
  split = interactions.leave_one_out(inter)
  users = np.sort(np.random.default_rng(config.seed).choice(len(split.train), args.users, replace=False))
  top_k, retriever_ranks = retriever_top_k(config, inter, split, users)
  targets = split.test[users]

  model, tokenizer, _ = load.load_model(config.model)
  source = 'zero-shot'
  if args.adapter:
    source, _ = adapters.apply_trained_adapter(model, args.adapter)

  config.prompts.candidate_order = 'retriever'
  builder = prompts.PromptBuilder(config, inter, tokenizer, ('recommend_retrieval',))
  user_profiles = [''] * len(split.train)
  for u in users:
    items = profile_text.profile_items(split, u, config.prompts.max_examples_per_user)
    user_profiles[u] = profile_text.stats_profile(inter, items, config.profiles)
  table = prompts.Candidates('(bench)', 'test', {int(u): top_k[n] for n, u in enumerate(users)})
  examples = prompts.build_examples(builder, split, 'test', user_profiles, table, users=users,
                                    insert_target=False)
  cands = [list(ex.candidates) for ex in examples]
  lengths = np.array([len(builder.ranking_prompt(ex)) for ex in examples])
  placement = None

  def ordered(mode, rows):
    scores = rank.rank_users(model, builder, [examples[n] for n in rows], mode, config, placement)
    return [(rerank.order_from_scores(s[None])[0], s) for s in scores]  # ranks count ties against the target

  def score(rows):
    return ordered('score', rows)

  def generate(rows):
    return ordered('generate', rows)

  rows = list(range(len(users)))
  results = {'retriever': ([(list(range(len(c))), None) for c in cands], 0.0, 0.0)}
  results['score'] = timed(score, rows)
  results['generate'] = timed(generate, rows)

  lines = [
      f'{datetime.date.today()}, {platform.node() or "host"}: {jax.devices()[0].platform} '
      f'({jax.device_count()} device(s), {os.cpu_count()} CPU cores), model `{config.model.spec}` '
      f'({source}), dtype {config.model.dtype}; {len(users)} seeded ML-100K test users, '
      f'K = {config.retriever.num_candidates} iALS candidates in retriever order (the retriever\'s own '
      f'recall@K on them: {np.mean(retriever_ranks < top_k.shape[1]):.3f}), stats profiles; prompts '
      f'{lengths.min()}-{lengths.max()} tokens (mean {lengths.mean():.0f}), batch {rc.batch_size}, '
      f'generate writes up to {rc.max_items} items separated by {rc.separator!r}.',
      '',
      '| mode | users/s | s (warm pass) | s (first pass, compiles) | HR@10 | NDCG@10 '
      '| items ranked per user |',
      '|---|---|---|---|---|---|---|',
  ]
  for mode, (orders, first_seconds, seconds) in results.items():
    ranks = [rank.catalog_rank([c[j] for j in o] + [i for i in c if i not in {c[j] for j in o}], t, r,
                               None if s is None else dict(zip(c, np.asarray(s).tolist())))
             for c, (o, s), t, r in zip(cands, orders, targets, retriever_ranks)]
    scores = metrics.metrics_from_ranks(ranks, (10,))
    speed = f'{len(users) / seconds:.3f} | {seconds:.1f} | {first_seconds:.1f}' if seconds else '- | - | -'
    lines.append(f'| {mode} | {speed} | {scores["HR@10"]:.4f} | '
                 f'{scores["NDCG@10"]:.4f} | {np.mean([len(o) for o, _ in orders]):.1f} |')
  print('\n'.join(lines))
  if args.write:
    results_md.write_section('Ranking', '`python bench/rank.py`\n\n' + '\n'.join(lines), args.write)


if __name__ == '__main__':
  main()
