"""Fixed-shape batches of token sequences: the one length policy of training, ranking and generation.

A jitted function compiles once per input shape, so sequences are padded to the smallest of
`config.batching.length_buckets` that holds them and batches always have the same number of rows
(rows past the data are empty: segment 0). Inference prompts are left-padded, so the last column is
every row's last prompt token; training rows (data/pipeline.py) are right-padded or packed.

Batch layout (docs/ARCHITECTURE.md): int32 [B, T] `input_ids`, `positions`, `segment_ids` (0 = padding),
and for training `loss_mask`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

BATCH_KEYS = ('input_ids', 'positions', 'segment_ids', 'loss_mask')


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `length`."""
  fits = [int(b) for b in sorted(buckets) if b >= length]
  if not fits:
    raise ValueError(f'a sequence of {length} tokens exceeds the largest length bucket {max(buckets)} '
                     '(config.batching.length_buckets)')
  return fits[0]


def left_padded_batches(prompts: Sequence[np.ndarray], batch_size: int, buckets: Sequence[int]
                        ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
  """Yields (indices into prompts, ids, positions, segment_ids) of `batch_size` rows each, prompts
  sorted longest first (similar lengths share a batch) and left-padded to a length bucket.

  Rows past len(indices) are empty (segment 0 throughout).
  """
  if batch_size < 1:
    raise ValueError(f'batch size must be >= 1, got {batch_size}')
  lengths = np.array([len(p) for p in prompts])
  order = np.argsort(-lengths, kind='stable')
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = bucket_length(int(lengths[rows].max()), buckets)
    ids, positions, segments = np.zeros((3, batch_size, width), np.int32)
    for b, n in enumerate(rows):
      length = lengths[n]
      ids[b, width - length:] = prompts[n]
      positions[b, width - length:] = np.arange(length)
      segments[b, width - length:] = 1
    yield rows, ids, positions, segments
