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
  return c
