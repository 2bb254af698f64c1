"""Config fingerprints: a short hash of the config values a stage (or a cache) depends on.

The runner hashes each stage's `hashes` keys with its upstream digests and input identities
(palr_jax/runner.py); the data pipeline hashes the keys its example cache depends on.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
import hashlib
import json
from typing import Any


def plain(value: Any) -> Any:
  """Config values as JSON-stable plain Python (ConfigDicts, tuples, numpy scalars)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if hasattr(value, 'item') and callable(value.item):
    return value.item()
  return value


def config_value(config, key: str) -> Any:
  """`config.a.b` for the dotted key 'a.b'."""
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def of(config, keys: Sequence[str], upstream: Iterable[str] = (), extra: Any = None) -> str:
  """Hash of `config.<key>` for each dotted key (a section or a value), upstream fingerprints and `extra`
  (anything JSON-able, e.g. the identity of input files)."""
  payload = {key: plain(config_value(config, key)) for key in keys}
  payload['_upstream'] = list(upstream)
  if extra is not None:
    payload['_extra'] = plain(extra)
  blob = json.dumps(payload, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]
