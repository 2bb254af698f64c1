"""The config's variants (`config.variants`): which are fine-tuned, and the ways a variant ranks.

Low on purpose: the stages, the config checks (palr_jax/validate.py) and the report all read these.
"""
from __future__ import annotations

# How a variant's LLM ranks its candidates (`variants.<name>.rank_mode`; palr_jax/stages/rank.py).
# 'residual': the tag scores through the residual score head (palr_jax/score_head.py), gate * tag
# logit + scale * z(retriever score); a variant ranked so is trained with the head in its tag loss.
RANK_MODES = ('score', 'generate', 'likelihood', 'residual')


def trained_variants(config) -> list[str]:
  """The variants that are fine-tuned (they have training tasks), in config order."""
  return [name for name, v in config.variants.items() if tuple(v.tasks)]
