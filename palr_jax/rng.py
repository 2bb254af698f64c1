"""Named random streams of `config.seed`: each consumer draws from its own stream, so adding or reordering
one never changes another's numbers (a resumed or partly rerun job sees the same randomness)."""
from __future__ import annotations

import zlib

import jax
import numpy as np


def _name_code(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def jax_key(seed: int, name: str) -> jax.Array:
  """The JAX key of stream `name`."""
  return jax.random.fold_in(jax.random.key(int(seed)), _name_code(name))


def numpy_rng(seed: int, name: str, *more: int) -> np.random.Generator:
  """The numpy generator of stream `name` (optionally sub-streams `more`, e.g. a user index)."""
  return np.random.default_rng([int(seed), _name_code(name), *map(int, more)])
