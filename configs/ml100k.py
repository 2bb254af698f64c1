"""PALR on MovieLens-100K (the embedded default: atomic files from the recbole wheel), CPU-sized.

Variants (`configs/ml100k.py:ARG`):
  ''      the default run
  quick   a smoke run of the whole pipeline in minutes on a laptop CPU
  full    the paper-sized run
For now the variants share the retriever settings: iALS from configs/common.py (64 factors, reg 30,
alpha 10, 15 iterations; chosen on valid Recall@20), test HR@10 0.140, NDCG@10 0.074, HR@50 0.391
(mean of seeds 0-2; `implicit` ALS 0.138 / 0.070 / 0.356, RecBole BPR 0.124 / 0.067 / 0.353).

Run:
  python -m palr_jax.main --config configs/ml100k.py:quick --workdir runs/ml100k-quick
Retriever stage alone:
  python -m palr_jax.retrieve --config configs/ml100k.py --workdir runs/ml100k
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

VARIANTS = ('', 'quick', 'full')


def get_config(arg: str = ''):
  if arg not in VARIANTS:
    raise ValueError(f'configs/ml100k.py: unknown variant {arg!r}; expected one of {VARIANTS}')
  c = common.get_config()
  c.data.source = 'recbole'
  c.data.path = ''
  c.data.name = 'ml-100k'
  c.model.spec = 'smollm2'
  if arg == 'quick':
    # Smoke run of the whole pipeline on a 2-core CPU: stats profiles, 10 candidates, short prompts,
    # a few hundred training prompts per variant, a seeded subset of users for the LLM evaluation.
    c.retriever.num_candidates = 10
    c.profiles.kind = 'stats'
    c.prompts.max_history = 8
    c.prompts.max_examples_per_user = 1
    c.prompts.max_title_tokens = 16
    c.prompts.max_length = 512
    c.prompts.batches.pack = False
    c.prompts.batches.length_buckets = (128, 192, 256, 384, 512)
    c.train.batch_size = 8
    c.train.num_steps = 24
    c.train.warmup_steps = 3
    c.train.learning_rate = 1e-3
    c.train.max_loss_tokens = 32
    c.train.log_every = 5
    c.train.eval_every = 12
    c.train.checkpoint_every = 12
    c.train.keep_latest = 1
    c.train.keep_best = 1
    c.train.valid_batches = 4
    c.eval.max_users = 48
    c.eval.bootstrap_samples = 1000
    c.rank.batch_size = 8
    c.rank.v1_mode = 'likelihood'
  elif arg == 'full':
    # All users, LLM-written profiles, the paper's setup at SmolLM2 scale (hours on a 2-core CPU).
    c.profiles.kind = 'llm'
    c.prompts.max_examples_per_user = 3
    c.train.batch_size = 16
    c.train.num_steps = 1500
    c.train.learning_rate = 5e-4
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.eval.max_users = 0
  return c
