"""Sweep files: a grid of config overrides, built with `axis`, `product` and `zip_`.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()`, returning a list of override dicts
`{'dotted.config.key': value}`, and may name the config it sweeps over in `BASE_CONFIG`:

  from palr_jax.sweep.spec import axis, product, zip_
  BASE_CONFIG = 'configs/ml100k.py:quick'
  def get_sweep():
    return product(axis('lora.rank', [4, 8, 16]), zip_(axis('lora.alpha', [8., 16.]), axis('seed', [0, 1])))

Each point is named by its overrides (`lora.rank=8,seed=0`, `point_name`) and applied to the base config
by `apply_overrides`. Running the points: palr_jax/sweep/run.py; the CLI: palr_jax/tools/sweep.py.
"""
from __future__ import annotations

from collections.abc import Sequence
import importlib.util
import itertools
import re
from typing import Any

from etils import epath
import ml_collections

Point = dict[str, Any]


class SweepError(ValueError):
  """A malformed sweep file or point; the message names the file and the point or key."""


def axis(key: str, values: Sequence[Any]) -> list[Point]:
  """One swept key: `axis('lora.rank', [4, 8])` -> [{'lora.rank': 4}, {'lora.rank': 8}]."""
  if not isinstance(key, str) or not key:
    raise SweepError(f'axis: key must be a dotted config key, got {key!r}')
  if isinstance(values, (str, bytes)) or not values:
    raise SweepError(f'axis {key!r}: values must be a non-empty list, got {values!r}')
  return [{key: v} for v in values]


def _merge(parts: Sequence[Point], how: str) -> Point:
  out: Point = {}
  for part in parts:
    clash = out.keys() & part.keys()
    if clash:
      raise SweepError(f'{how}: key(s) {sorted(clash)} appear in more than one axis')
    out.update(part)
  return out


def product(*axes: Sequence[Point]) -> list[Point]:
  """Every combination, the last axis varying fastest (like nested for-loops)."""
  return [_merge(combo, 'product') for combo in itertools.product(*axes)]


def zip_(*axes: Sequence[Point]) -> list[Point]:
  """Points taken together position by position; the axes must have equal lengths."""
  lengths = [len(a) for a in axes]
  if len(set(lengths)) > 1:
    raise SweepError(f'zip_: axes have different lengths {lengths}')
  return [_merge(combo, 'zip_') for combo in zip(*axes)]


def load_sweep(path: str) -> tuple[list[Point], str | None]:
  """The points of a sweep file and its BASE_CONFIG (None when it names none)."""
  spec = importlib.util.spec_from_file_location('palr_sweep_file', path)
  if spec is None or not epath.Path(path).exists():
    raise SweepError(f'{path}: sweep file not found')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_sweep', None)):
    raise SweepError(f'{path}: defines no get_sweep()')
  points = module.get_sweep()
  if not isinstance(points, list) or not points:
    raise SweepError(f'{path}: get_sweep() must return a non-empty list of dicts, got {points!r}')
  for i, point in enumerate(points):
    if not isinstance(point, dict) or not point or not all(isinstance(k, str) for k in point):
      raise SweepError(f'{path}: point {i} must be a non-empty dict of dotted config keys, got {point!r}')
  names = [point_name(p) for p in points]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f'{path}: points repeat: {dupes}')
  return points, getattr(module, 'BASE_CONFIG', None)


def point_name(point: Point) -> str:
  """A directory name from the overrides: `lora.rank=8,seed=0` (unsafe characters become '_')."""
  name = ','.join(f'{k}={format_value(v)}' for k, v in point.items())
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name)


def format_value(v: Any) -> str:
  return v if isinstance(v, str) else repr(v)


def apply_overrides(config: ml_collections.ConfigDict, point: Point, where: str = 'sweep'
                    ) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's values set; only existing keys, with the config's types."""
  config = config.copy_and_resolve_references()
  for key, value in point.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise SweepError(f'{where}: config has no key {key!r}')
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f'{where}: cannot set {key!r} to {value!r}: {e}') from None
  return config
