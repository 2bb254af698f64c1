"""The residual score head: the LLM learns a correction to the retriever, not a ranking from scratch.

Candidate k of a user scores `gate * tag_logit_k + scale * z_k`, where `z_k` is the retriever's score of k
standardized over the user's K candidates and `tag_logit_k` the LLM's logit (or log-probability: the
softmax over the candidates is the same) of k's tag at the answer position. `scale` starts at the 1-D
softmax fit of the retriever's z on the train examples (`fit_scale`) and `gate` at 0, so the untrained
model ranks exactly as the retriever; the tag loss (palr_jax/train/step.py) then trains both, fp32,
beside the LoRA adapters. The two scalars are checkpointed with the adapters (train-state keys `HEAD_KEYS`)
and exported beside the PEFT adapter as `score_head.safetensors` (`save` / `load`).
"""
from __future__ import annotations

from collections.abc import Sequence

from etils import epath
import numpy as np

FILE = 'score_head.safetensors'
GATE, SCALE = 'score_head.gate', 'score_head.scale'
HEAD_KEYS = (GATE, SCALE)


def standardize(scores: Sequence[float]) -> np.ndarray:
  """float32 [K]: (s - mean) / std over one user's candidates (0 where they are all equal)."""
  s = np.asarray(scores, np.float64)
  std = s.std() if s.size else 0.0
  return ((s - s.mean()) / std if std > 1e-12 else np.zeros_like(s)).astype(np.float32)


def fit_scale(z: np.ndarray, labels: np.ndarray, steps: int = 20) -> float:
  """The scale a maximizing sum_n log softmax(a z_n)[label_n] (Newton steps; the log-likelihood is concave
  in a). z: [N, K], labels: [N] (the target's candidate index). 0 without examples."""
  z = np.asarray(z, np.float64)
  labels = np.asarray(labels, np.int64)
  if not len(z):
    return 0.0
  picked = z[np.arange(len(z)), labels]
  a = 0.0
  for _ in range(steps):
    logits = a * z
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    mean = (p * z).sum(axis=1)
    grad = float(np.sum(picked - mean))
    hess = float(np.sum((p * z * z).sum(axis=1) - mean * mean))
    if hess <= 1e-12:
      break
    step = grad / hess
    a += float(np.clip(step, -10.0, 10.0))
    if abs(step) < 1e-8:
      break
  return float(a)


def residual_scores(tag_scores: np.ndarray, z: np.ndarray, gate: float, scale: float) -> np.ndarray:
  """gate * tag score + scale * z, float64, the same shape; a gate of exactly 0 ignores the LLM (even
  where it gave -inf)."""
  tag_scores = np.asarray(tag_scores, np.float64)
  out = float(scale) * np.asarray(z, np.float64)
  if float(gate) != 0.0:
    out = out + float(gate) * tag_scores
  return out


def retriever_consistent_order(scores: np.ndarray, retriever_positions: Sequence[int]) -> np.ndarray:
  """Candidate indices (as given) by descending `scores`; equal scores keep the retriever's order
  (`retriever_positions[k]`: candidate k's place in the retriever's list), as the retriever ranks them."""
  scores = np.asarray(scores, np.float64)
  return np.lexsort((np.asarray(retriever_positions, np.int64), -scores))


def save(folder, gate: float, scale: float) -> epath.Path:
  """Writes `folder/score_head.safetensors` (two fp32 scalars, temp name then rename)."""
  from safetensors.numpy import save as st_save
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / FILE
  tmp = folder / f'.{FILE}.tmp'
  tmp.write_bytes(st_save({'gate': np.asarray(gate, np.float32), 'scale': np.asarray(scale, np.float32)},
                          metadata={'format': 'palr_jax.score_head', 'score': 'gate * tag_logit + scale * z'}))
  tmp.rename(path)
  return path


def load(folder) -> tuple[float, float]:
  """(gate, scale) from `folder/score_head.safetensors`."""
  from safetensors.numpy import load as st_load
  path = epath.Path(folder) / FILE
  try:
    tensors = st_load(path.read_bytes())
    return float(tensors['gate']), float(tensors['scale'])
  except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError on a bad header)
    raise ValueError(f'{path}: expected a safetensors file with fp32 scalars "gate" and "scale" ({e})') from e
