"""The ranking metric training keeps checkpoints by and stops on: NDCG@10 among the candidates of a seeded
sample of valid users, ranked by the tag scores of the model being trained.

Why not the loss: the tag loss falls while the order of the candidates (what the ranking stage reports)
may not improve; NDCG@10 of that order is what checkpoint choice should follow (`config.train.best_metric
= 'valid_ndcg10'`). Valid only: the prompts are the valid split's (history train[u], candidates as the
retriever gave them, no target inserted), so no test event is read to choose a checkpoint. A user whose
target the retriever missed scores 0 whatever the order: the same for every checkpoint.

One forward per prompt (`rerank.score_tags`, LlamaRec's verbalizer), ties in the retriever's order.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from palr_jax import metrics
from palr_jax import rng
from palr_jax.data import prompts
from palr_jax.model import rerank

METRICS = ('valid_loss', 'valid_ndcg10')   # config.train.best_metric
HIGHER_IS_BETTER = {'valid_loss': False, 'valid_ndcg10': True}


def check_metric(name: str) -> str:
  if name not in METRICS:
    raise ValueError(f'config.train.best_metric = {name!r}: expected one of {METRICS}')
  return name


def better(metric: str, value: float, best: float | None) -> bool:
  """Whether `value` of `metric` improves on `best` (None: nothing yet)."""
  if best is None:
    return True
  return value > best if HIGHER_IS_BETTER[metric] else value < best


def sample_users(num_users: int, size: int, seed: int) -> np.ndarray:
  """A seeded subset of `size` valid users (sorted), or all when `size` <= 0 or >= `num_users`."""
  if size <= 0 or size >= num_users:
    return np.arange(num_users)
  return np.sort(rng.numpy_rng(seed, 'valid_rank_users').choice(num_users, size, replace=False))


def ndcg_at_10(scores: Sequence[np.ndarray], targets: Sequence[int | None]) -> float:
  """Mean NDCG@10 of the target among each user's candidates ordered by `scores` (higher first, ties in
  the given order); `targets[n]` is the target's index among user n's candidates, None if absent (0)."""
  ranks = []
  for row, target in zip(scores, targets):
    if target is None:
      ranks.append(np.inf)
      continue
    order = rerank.order_from_scores(np.asarray(row, np.float64)[None])[0]
    hit = np.flatnonzero(order == target)
    ranks.append(float(hit[0]) if hit.size else np.inf)
  if not ranks:
    raise ValueError('valid ranking: no users to rank')
  return float(metrics.per_user_metrics(ranks, (10,))['NDCG@10'].mean())


class ValidRanker:
  """`ranker(model) -> NDCG@10` of the sampled valid users: prompts and tags rendered once, scored by
  whatever adapters `model` holds at each evaluation."""

  def __init__(self, builder: prompts.PromptBuilder, examples: Sequence[prompts.Example], *, batch_size: int,
               buckets: Sequence[int], placement=None):
    if builder.tag_ids is None or any(e.task != 'recommend_retrieval' for e in examples):
      raise ValueError('valid ranking reads the candidates\' tags: it needs Recommend_Retrieval examples')
    self.prompts = [builder.ranking_prompt(e) for e in examples]
    self.tags = [builder.tag_ids[:len(e.candidates)] for e in examples]
    self.targets = [e.target_tag_index for e in examples]
    self.users = [e.user for e in examples]
    # Collaborative item tokens: the items at the prompts' placeholders (-1 past the prompt), as rank.py.
    self.item_ids = None if builder.item_token_id is None else [
        np.concatenate([e.item_ids[:e.prompt_length], np.full(len(p) - e.prompt_length, -1, np.int32)])
        for e, p in zip(examples, self.prompts)]
    self._common = dict(batch_size=int(batch_size), buckets=tuple(buckets), placement=placement)

  def __len__(self) -> int:
    return len(self.prompts)

  def __call__(self, model) -> float:
    scores = rerank.score_tags(model, self.prompts, self.tags, item_ids=self.item_ids, **self._common)
    return ndcg_at_10([row[:len(t)] for row, t in zip(scores, self.tags)], self.targets)


def build(config, inter, split, tokenizer, profiles, candidates_path, variant: str, placement=None
          ) -> ValidRanker:
  """The ranker of `variant` on `config.train.rank_valid_users` seeded valid users (its own profile
  choice; candidates from `candidates/valid.jsonl` at `candidates_path`)."""
  builder = prompts.PromptBuilder(config, inter, tokenizer, ('recommend_retrieval',),
                                  use_profile=prompts.variant_use_profile(config, variant),
                                  item_tokens=bool(config.variants[variant].get('item_tokens', False)))
  users = sample_users(len(split.train), int(config.train.rank_valid_users), int(config.seed))
  cands = prompts.read_candidates(candidates_path, split, 'valid')
  examples = prompts.build_examples(builder, split, 'valid', profiles, cands, users=[int(u) for u in users],
                                    insert_target=False)
  return ValidRanker(builder, examples, batch_size=int(config.rank.batch_size),
                     buckets=tuple(config.batching.length_buckets), placement=placement)
