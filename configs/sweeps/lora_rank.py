"""LoRA rank sweep on the quick ML-100K config, alpha = 2 x rank (the adapter scale alpha/rank stays 2).

  python -m palr_jax.tools.sweep --sweep configs/sweeps/lora_rank.py --workdir runs/sweep_lora_rank

Data, retriever and profiles do not depend on `lora`, so they are computed once in W/_shared; each point
fine-tunes, ranks and evaluates. Results: W/sweep.csv, W/sweep.md, W/sweep.png.
"""
from palr_jax.sweep.spec import axis, zip_

BASE_CONFIG = 'configs/ml100k.py:quick'


def get_sweep():
  return zip_(axis('lora.rank', [4, 8, 16, 32]), axis('lora.alpha', [8.0, 16.0, 32.0, 64.0]))
