"""User-item interactions: readers for the supported sources and the chronological leave-one-out split.

`load(config.data)` reads one source into `Events` (the rows in file order), filters them, and indexes
them into `Interactions`. Sources (`config.data.source`):
  recbole  RecBole atomic files `<name>.inter`, `<name>.item`, optional `<name>.user` (path '' = the
           ML-100K shipped in the installed recbole wheel, located with importlib, never imported).
  ml-100k  GroupLens `u.data`, `u.item`, optional `u.user` (latin-1).
  ml-1m    GroupLens `ratings.dat`, `movies.dat`, optional `users.dat` (`::`-separated, latin-1).
  amazon   `reviews_<Category>_5.json.gz` + `meta_<Category>.json.gz` (2014 release: metadata lines are
           Python literals, parsed with `ast.literal_eval`).
  tfds     TFDS `movielens/100k-ratings` or `movielens/1m-ratings`, already prepared in a data_dir.

Conventions that decide results:
  * Dense indices: users and items are numbered in order of first appearance among the rows that
    survive filtering, so the numbering is a pure function of the file and the filter settings.
  * Order: each user's events are sorted by timestamp with a stable sort, so events with equal
    timestamps keep the source's row order; ties are never broken by item id. This rule decides many
    test targets: in ML-100K, 415 of the 943 users have equal timestamps on their last two events,
    and breaking ties by ascending item id instead would change the test item of 281 users (both
    checked in tests/test_interactions.py). Amazon timestamps have day resolution, so ties there are
    common too. TFDS row order is the order of the prepared records, not the GroupLens file order.
  * Timestamps are sorted on their exact parsed values and stored as int64 (fractions floored).
  * Duplicates: rows with the same user, item and timestamp are one event; every copy after the first is
    dropped (the log says how many) before anything else. A file with every row written twice reads as
    the file once; kept, the copies would make a user's test target equal their valid target.
  * Repeat consumption, the same user and item at a later time (`config.data.repeats`):
      keep          (default) every event stays; a repeat may be the valid or the test target. The
                    retriever ranks the catalog minus the history, so a repeat target is not masked
                    (docs/ARCHITECTURE.md), and no reranker can learn it from the candidates.
      drop_targets  the valid and test targets are each user's last two first consumptions: a repeat
                    that comes after the valid target's first consumption is dropped. Repeats before it
                    stay in train, as the history the user had; dropping (not keeping) the later ones
                    keeps train strictly before the valid target in time, and a repeat of the valid item
                    between valid and test would otherwise put the valid target into the test history.
                    Users left with too few events are then dropped by the filters below.
  * Filtering: keep rating >= `rating_threshold` (0 keeps all), then drop users with fewer than
    max(`k_core`, `min_history`) events and items with fewer than `k_core` events, repeated until
    nothing changes. `leave_one_out` needs 3 events per user, so configs use `min_history >= 3`.
  * The catalog is the items that keep at least one event; metadata of other items is ignored. Catalog
    items without a row in the item file (shown as "item <id>") are counted on the terminal and refused
    above `config.data.max_missing_item_fraction`; an item id with two rows is one item when the rows are
    the same (counted on the terminal), an error when they differ.
  * Users dropped for having fewer than `min_history` events are counted on the terminal; when none is
    left, the error says how many events the users had and how many are needed.
  * Text files may start with a UTF-8 byte-order mark; a GroupLens file (latin-1) that has one is read
    as UTF-8, which the mark says it is.

Bad input raises `DataError` naming the file and, where there is one, the line (`path:line: ...`);
validate.py loads the data before anything is computed, so the programs print it as one line (exit 2).
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import importlib.util
import json
import math
import os
import re

from absl import logging
import numpy as np

SOURCES = ('recbole', 'ml-100k', 'ml-1m', 'amazon', 'tfds')
REPEATS = ('keep', 'drop_targets')
_BOM = b'\xef\xbb\xbf'

# RecBole's FeatureType values; `*_seq` fields are space-separated.
RECBOLE_TYPES = ('token', 'token_seq', 'float', 'float_seq')
RECBOLE_TITLE_COLUMNS = ('movie_title', 'title')
RECBOLE_GENRE_COLUMNS = ('class', 'genre', 'categories')

ML100K_GENRES = (
    'unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime', 'Documentary',
    'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller',
    'War', 'Western')
# ML-1M (and TFDS) code tables, from the ML-1M README.
ML1M_AGES = {1: 'Under 18', 18: '18-24', 25: '25-34', 35: '35-44', 45: '45-49', 50: '50-55', 56: '56+'}
ML1M_OCCUPATIONS = (
    'other/not specified', 'academic/educator', 'artist', 'clerical/admin', 'college/grad student',
    'customer service', 'doctor/health care', 'executive/managerial', 'farmer', 'homemaker',
    'K-12 student', 'lawyer', 'programmer', 'retired', 'sales/marketing', 'scientist', 'self-employed',
    'technician/engineer', 'tradesman/craftsman', 'unemployed', 'writer')
TFDS_FIELDS = ('user_id', 'movie_id', 'movie_title', 'movie_genres', 'user_rating', 'timestamp')


class DataError(ValueError):
  """Unreadable or inconsistent input data; the message names the file (and line) at fault."""


@dataclasses.dataclass(frozen=True)
class Interactions:
  name: str
  user_ids: np.ndarray          # [U] raw ids as str; dense user index u -> raw id
  item_ids: np.ndarray          # [I] raw ids as str; dense item index i -> raw id
  sequences: list[np.ndarray]   # per user, int32 item indices in time order (stable: ties keep file order)
  timestamps: list[np.ndarray]  # per user, int64, aligned with sequences
  titles: list[str]             # per item ('' when the source has none)
  genres: list[tuple[str, ...]]  # per item, genres / categories (may be empty)
  user_features: dict[str, np.ndarray]  # optional per-user attributes (age, gender, occupation ...)


@dataclasses.dataclass(frozen=True)
class Split:
  """Chronological leave-one-out, aligned with `Interactions` users."""
  train: list[np.ndarray]       # per user: all items before the valid item
  valid: np.ndarray             # [U] int32, second-last item
  test: np.ndarray              # [U] int32, last item


@dataclasses.dataclass(frozen=True)
class Events:
  """One source's interaction rows in file order, before filtering and indexing."""
  path: str                     # the interaction file (named in errors)
  user_ids: np.ndarray          # [V] str raw user ids, in order of first appearance
  item_ids: np.ndarray          # [W] str raw item ids, in order of first appearance
  users: np.ndarray             # [N] int64 index into user_ids, one per row
  items: np.ndarray             # [N] int64 index into item_ids
  ratings: np.ndarray | None    # [N] float64; None when the source has no ratings
  timestamps: np.ndarray        # [N] float64
  titles: dict[str, str]        # raw item id -> title
  genres: dict[str, tuple[str, ...]]  # raw item id -> genres
  user_features: dict[str, dict[str, str]]  # raw user id -> {feature: value}
  item_path: str = ''           # the item metadata file (named in messages)


# ------------------------------------------------------------------------------------------------
# Public entry points.


def load(data_config) -> Interactions:
  """Reads `data_config.source`, drops duplicates, filters (threshold, repeats, k-core, min_history) and
  indexes it."""
  key = (json.dumps(data_config.to_dict(), sort_keys=True, default=str),
         tuple((p, *_stat(p)) for p in source_files(data_config)))
  if _LOADED.get('key') != key:  # validate.py loads it before compute; the stages then reuse it
    _LOADED.clear()
    _LOADED.update(key=key, value=to_interactions(
        read_events(data_config), name=data_config.name,
        rating_threshold=float(data_config.rating_threshold), k_core=int(data_config.k_core),
        min_history=int(data_config.min_history), repeats=data_config.repeats,
        max_missing_item_fraction=float(data_config.get('max_missing_item_fraction', 1.0))))
  return _LOADED['value']


_LOADED: dict = {}  # the last data `load` read, with the config and file contents it was read from


def _stat(path: str) -> tuple[int, str]:
  """The file's size and content digest (a rewrite within the clock's resolution still shows)."""
  if not os.path.isfile(path):
    return -1, ''  # read_events says so
  h = hashlib.blake2b(digest_size=16)
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return os.path.getsize(path), h.hexdigest()


def read_events(data_config) -> Events:
  """Dispatches on `data_config.source` to the reader for it."""
  source, path, name = data_config.source, data_config.path, data_config.name
  if source == 'recbole':
    return read_recbole(path or embedded_ml100k_dir(), name)
  if source == 'tfds':
    return read_tfds(name, data_config.tfds_data_dir)
  if source not in SOURCES:
    raise DataError(f'config.data.source={source!r}: unknown source, expected one of {SOURCES}')
  if not path:
    raise DataError(f'config.data.path is empty: source {source!r} needs the directory of its files')
  if source == 'ml-100k':
    return read_ml100k(path)
  if source == 'ml-1m':
    return read_ml1m(path)
  return read_amazon(path, name)


def source_files(data_config) -> list[str]:
  """The files `read_events` reads for this config: the required ones always (validate.py checks that
  they exist before anything runs), the optional user file when it exists; a stage's fingerprint hashes
  them, so it sees them change."""
  source, path, name = data_config.source, data_config.path, data_config.name
  if source == 'recbole':
    base = path or embedded_ml100k_dir()
    prefix = os.path.join(base, name) if os.path.isdir(base) else base
    required, optional = [prefix + '.inter', prefix + '.item'], prefix + '.user'
  elif source == 'ml-100k':
    required, optional = [os.path.join(path, f) for f in ('u.data', 'u.item')], os.path.join(path, 'u.user')
  elif source == 'ml-1m':
    required = [os.path.join(path, f) for f in ('ratings.dat', 'movies.dat')]
    optional = os.path.join(path, 'users.dat')
  elif source == 'amazon':
    required = [os.path.join(path, f'reviews_{name}_5.json.gz'), os.path.join(path, f'meta_{name}.json.gz')]
    optional = None
  else:  # tfds: identified by name and data_dir, which the fingerprint hashes
    return []
  return required + ([optional] if optional and os.path.exists(optional) else [])


def leave_one_out(inter: Interactions) -> Split:
  """Last event -> test, second-last -> valid, the rest -> train (all users kept, same order)."""
  lengths = np.fromiter(map(len, inter.sequences), np.int64, len(inter.sequences))
  short = int((lengths < 3).sum())
  if short:
    raise DataError(
        f'{inter.name}: {short} users have fewer than 3 events; leave-one-out needs train >= 1 + valid '
        f'+ test, so load with config.data.min_history >= 3')
  return Split(
      train=[s[:-2] for s in inter.sequences],
      valid=np.array([s[-2] for s in inter.sequences], np.int32),
      test=np.array([s[-1] for s in inter.sequences], np.int32))


def embedded_ml100k_dir() -> str:
  """The ML-100K atomic files inside the installed recbole wheel (found without importing it)."""
  spec = importlib.util.find_spec('recbole')
  if spec is None or not spec.submodule_search_locations:
    raise DataError('config.data.path is empty (embedded ML-100K) but the recbole wheel is not '
                    'installed: pip install --no-deps recbole==1.2.1')
  return os.path.join(list(spec.submodule_search_locations)[0], 'dataset_example', 'ml-100k')


# ------------------------------------------------------------------------------------------------
# Filtering and indexing.


def to_interactions(events: Events, *, name: str, rating_threshold: float, k_core: int,
                    min_history: int, repeats: str = 'keep', max_missing_item_fraction: float = 1.0
                    ) -> Interactions:
  """Drops duplicate rows, filters `events` and builds dense, time-ordered per-user sequences."""
  if not len(events.users):
    raise DataError(f'{events.path}: no interactions (no data rows); expected one row per interaction')
  if repeats not in REPEATS:
    raise DataError(f'config.data.repeats={repeats!r}: expected one of {REPEATS}')
  keep = ~_duplicates(events.users, events.items, events.timestamps)
  if not keep.all():
    logging.warning('%s: dropped %d duplicate rows of %s (same user, item and timestamp as an earlier row)',
                    name, (~keep).sum(), events.path)
  if rating_threshold > 0:
    if events.ratings is None:
      raise DataError(f'{events.path}: the source has no ratings, cannot apply '
                      f'rating_threshold={rating_threshold}')
    keep &= events.ratings >= rating_threshold
    logging.info('%s: rating >= %g keeps %d of %d interactions', name, rating_threshold, keep.sum(),
                 len(keep))
  before = keep
  while True:  # each filter can make the other drop more: repeat until nothing changes
    keep = _core_filter(events.users, events.items, keep, max(k_core, min_history), k_core, name)
    if repeats == 'keep' or not keep.any():
      break
    kept = keep & ~_late_repeats(events.users, events.items, events.timestamps, keep)
    if (kept == keep).all():
      break
    logging.info('%s: repeats=drop_targets dropped %d repeat events after users\' valid targets', name,
                 keep.sum() - kept.sum())
    keep = kept
  rows = np.flatnonzero(keep)
  if not rows.size:
    most = int(np.bincount(events.users[before]).max()) if before.any() else 0
    raise DataError(f'{events.path}: no interactions left after filtering (rating_threshold='
                    f'{rating_threshold}, k_core={k_core}, min_history={min_history}): each user needs '
                    f'{max(k_core, min_history)} events, and the {len(events.user_ids)} users have at most '
                    f'{most}')
  dropped = _distinct(events.users, before) - _distinct(events.users, keep)
  if dropped:
    logging.warning('%s: dropped %d of the %d users of %s (fewer than %d events: the max of '
                    'config.data.min_history and k_core, after k-core filtering of items)', name, dropped,
                    _distinct(events.users, before), events.path, max(k_core, min_history))
  users, user_order = _first_appearance(events.users[rows])
  items, item_order = _first_appearance(events.items[rows])
  times = events.timestamps[rows]
  order = np.lexsort((np.arange(len(rows)), times, users))  # row position: explicit stable tie rule
  flat_items = items[order].astype(np.int32)
  flat_times = np.floor(times[order]).astype(np.int64)
  flat_items.flags.writeable = flat_times.flags.writeable = False
  bounds = np.cumsum(np.bincount(users, minlength=len(user_order)))[:-1]
  user_ids = events.user_ids[user_order]
  item_ids = events.item_ids[item_order]
  missing = [i for i in item_ids.tolist() if i not in events.titles]
  if missing:
    where = events.item_path or 'the item file'
    if len(missing) > max_missing_item_fraction * len(item_ids):
      raise DataError(f'{where}: no row for {len(missing)} of the {len(item_ids)} items of {events.path} '
                      f'(e.g. {missing[:3]}); expected at most {max_missing_item_fraction:.1%} missing '
                      '(config.data.max_missing_item_fraction)')
    logging.warning('%s: %d of %d items of %s have no row in %s; prompts name them "item <id>"', name,
                    len(missing), len(item_ids), events.path, where)
  return Interactions(
      name=name,
      user_ids=user_ids,
      item_ids=item_ids,
      sequences=np.split(flat_items, bounds),
      timestamps=np.split(flat_times, bounds),
      titles=[events.titles.get(i, '') for i in item_ids.tolist()],
      genres=[events.genres.get(i, ()) for i in item_ids.tolist()],
      user_features=_user_feature_arrays(events.user_features, user_ids))


def _core_filter(users, items, keep, user_min, item_min, name):
  """Iteratively drops users with < user_min and items with < item_min kept events."""
  start = keep
  while True:
    user_counts = np.bincount(users[keep], minlength=users.max() + 1)
    item_counts = np.bincount(items[keep], minlength=items.max() + 1)
    drop = keep & ((user_counts[users] < user_min) | (item_counts[items] < item_min))
    if not drop.any():
      break
    keep = keep & ~drop
  if user_min or item_min:
    logging.info(
        '%s: dropped %d users with < %d events (max of min_history, k_core), %d items with < %d '
        'events (k_core), %d of %d interactions', name,
        _distinct(users, start) - _distinct(users, keep), user_min,
        _distinct(items, start) - _distinct(items, keep), item_min, start.sum() - keep.sum(),
        start.sum())
  return keep


def _duplicates(users, items, times) -> np.ndarray:
  """[N] bool: the row repeats an earlier row's user, item and timestamp."""
  order = np.lexsort((np.arange(len(users)), times, items, users))
  u, i, t = users[order], items[order], times[order]
  same = np.zeros(len(order), bool)
  same[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
  out = np.zeros(len(order), bool)
  out[order] = same
  return out


def _late_repeats(users, items, times, keep) -> np.ndarray:
  """[N] bool: kept rows that repeat an item their user had before and come after the user's second-last
  first consumption (the valid target), in the time order `to_interactions` uses."""
  rows = np.flatnonzero(keep)
  order = rows[np.lexsort((rows, times[rows], users[rows]))]
  u = users[order]
  first = np.zeros(len(order), bool)
  first[np.unique(u * (items.max() + 1) + items[order], return_index=True)[1]] = True
  starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
  sizes = np.diff(np.r_[starts, len(order)])
  counts = np.cumsum(first)                               # first consumptions up to each row, all users
  last = np.repeat(counts[starts + sizes - 1], sizes)     # ... up to the row's user's last row
  after = last - (counts - first)                         # the user's first consumptions at or after the row
  out = np.zeros(len(users), bool)
  out[order[~first & (after <= 1)]] = True
  return out


def _distinct(codes: np.ndarray, mask: np.ndarray) -> int:
  return int(np.count_nonzero(np.bincount(codes[mask])))


def _first_appearance(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Renumbers codes 0.. by first appearance; returns (dense codes, original code of each index)."""
  uniq, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
  order = np.argsort(first)
  rank = np.empty(len(uniq), np.int64)
  rank[order] = np.arange(len(uniq))
  return rank[inverse], uniq[order]


def _user_feature_arrays(features: dict[str, dict[str, str]], user_ids: np.ndarray):
  names = list(dict.fromkeys(k for f in features.values() for k in f))
  rows = [features.get(u, {}) for u in user_ids.tolist()]
  return {k: np.array([r.get(k, '') for r in rows], dtype=str) for k in names}


# ------------------------------------------------------------------------------------------------
# Delimited text.

_UNIT = '\x1f'  # ASCII unit separator: stands in for a multi-character field separator


def _read_bytes(path: str, encoding: str = 'utf-8') -> tuple[bytes, str]:
  """(the file's bytes with a byte-order mark, CRLF -> LF and trailing newlines dropped, its encoding:
  `encoding`, or UTF-8 when the file starts with a UTF-8 byte-order mark); missing -> DataError."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  with open(path, 'rb') as f:
    raw = f.read()
  if raw.startswith(_BOM):
    raw, encoding = raw[len(_BOM):], 'utf-8'
  if b'\r' in raw:
    raw = raw.replace(b'\r\n', b'\n')
  return raw.rstrip(b'\n'), encoding


def _decode(raw: bytes, encoding: str, path: str, first_line: int) -> str:
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = first_line + raw.count(b'\n', 0, e.start)
    raise DataError(f'{path}:{line}: not valid {encoding} text ({e.reason})') from None


def _columns(raw: bytes, sep: str, num_fields: int, encoding: str, path: str,
             first_line: int) -> list[list[str]]:
  """Splits lines of `raw` into `num_fields` columns of str; `first_line` numbers raw's first line.

  Field counts are checked per line on the bytes with numpy (the ASCII separator and newline bytes
  never occur inside a UTF-8 or latin-1 character); then one replace + split cuts every field and
  strided slices pick the columns, far faster than splitting line by line.
  """
  if not raw:
    return [[] for _ in range(num_fields)]
  unit = sep
  if len(sep) > 1:
    if _UNIT.encode() in raw:
      line = first_line + raw.count(b'\n', 0, raw.index(_UNIT.encode()))
      raise DataError(f'{path}:{line}: unexpected control character \\x1f')
    raw, unit = raw.replace(sep.encode(), _UNIT.encode()), _UNIT
  b = np.frombuffer(raw, np.uint8)
  line_ends = np.append(np.flatnonzero(b == ord('\n')), len(b))
  fields = np.diff(np.searchsorted(np.flatnonzero(b == ord(unit)), line_ends), prepend=0) + 1
  bad = np.flatnonzero(fields != num_fields)
  if bad.size:
    j = int(bad[0])
    raise DataError(f'{path}:{first_line + j}: expected {num_fields} {sep!r}-separated fields, '
                    f'found {fields[j]}' + (' (a tab or line break inside a value?)' if sep == '\t' else ''))
  flat = _decode(raw, encoding, path, first_line).replace(unit, '\n').split('\n')
  return [flat[j::num_fields] for j in range(num_fields)]


def _table(path: str, sep: str, num_fields: int) -> list[list[str]]:
  """A GroupLens file's columns (latin-1 unless it starts with a UTF-8 byte-order mark)."""
  raw, encoding = _read_bytes(path, 'latin-1')
  return _columns(raw, sep, num_fields, encoding, path, 1)


def _numbers(values: list[str], what: str, path: str, first_line: int) -> np.ndarray:
  """Parses finite float64 numbers; the first bad value is reported with its line."""
  try:
    out = np.fromiter(map(float, values), np.float64, len(values))
    if np.isfinite(out).all():
      return out
  except ValueError:
    pass
  j, v = next((j, v) for j, v in enumerate(values) if not _is_finite_number(v))
  raise DataError(f'{path}:{first_line + j}: {what} must be a finite number, got {v!r}')


def _is_finite_number(text: str) -> bool:
  try:
    return math.isfinite(float(text))
  except ValueError:
    return False


def _encode(values) -> tuple[np.ndarray, list]:
  """int64 codes numbering distinct values by first appearance, and the values in that order."""
  distinct = list(dict.fromkeys(values))
  index = {v: i for i, v in enumerate(distinct)}
  return np.fromiter(map(index.__getitem__, values), np.int64, len(values)), distinct


def _events(path, users, items, ratings, timestamps, titles, genres, user_features, item_path='') -> Events:
  user_codes, user_ids = _encode(users)
  item_codes, item_ids = _encode(items)
  return Events(
      path=path, user_ids=np.array(user_ids, dtype=str), item_ids=np.array(item_ids, dtype=str),
      users=user_codes, items=item_codes, ratings=ratings, timestamps=timestamps, titles=titles,
      genres=genres, user_features=user_features, item_path=item_path)


def _item_rows(columns: list[list[str]], path: str, first_line: int) -> list[list[str]]:
  """The item file's columns (ids first) with one row per id: a row repeating an earlier row of its id
  exactly is dropped (counted on the terminal); one that differs from it is a DataError naming both lines."""
  ids, first, repeats = columns[0], {}, []
  for j, item in enumerate(ids):
    k = first.setdefault(item, j)
    if k != j:
      if any(c[j] != c[k] for c in columns):
        raise DataError(f'{path}:{first_line + j}: item {item!r} has a second row, different from line '
                        f'{first_line + k}; expected one row per item')
      repeats.append(j)
  if not repeats:
    return columns
  logging.warning('%s: %d repeated item rows (each the same as its id\'s first row, e.g. line %d) ignored',
                  path, len(repeats), first_line + repeats[0])
  kept = sorted(first.values())
  return [[c[j] for j in kept] for c in columns]


# ------------------------------------------------------------------------------------------------
# RecBole atomic files.


def read_recbole(path: str, name: str) -> Events:
  """`<path>/<name>.inter|.item|.user` when `path` is a directory, else `<path>.inter` etc."""
  prefix = os.path.join(path, name) if os.path.isdir(path) else path
  inter_path = prefix + '.inter'
  inter = _recbole_table(inter_path, required=('user_id', 'item_id', 'timestamp'))
  item_path = prefix + '.item'
  items = _recbole_table(item_path, required=('item_id',))
  names = ['item_id'] + [c for c in items if c != 'item_id']
  items = dict(zip(names, _item_rows([items[c] for c in names], item_path, 2)))
  title_col = next((c for c in RECBOLE_TITLE_COLUMNS if c in items), None)
  genre_col = next((c for c in RECBOLE_GENRE_COLUMNS if c in items), None)
  titles = dict(zip(items['item_id'], items[title_col] if title_col else [''] * len(items['item_id'])))
  if title_col and 'release_year' in items:  # "Toy Story (1995)", as GroupLens writes it: fewer clashes
    titles = {i: f'{t} ({y})' if y and t else t
              for (i, t), y in zip(titles.items(), items['release_year'])}
  genres = {i: tuple(g.split()) for i, g in zip(items['item_id'], items[genre_col])} if genre_col else {}
  user_features = {}
  if os.path.exists(prefix + '.user'):
    users = _recbole_table(prefix + '.user', required=('user_id',))
    names = [c for c in users if c != 'user_id']
    for j, user in enumerate(users['user_id']):
      user_features[user] = {c: users[c][j] for c in names}
  ratings = _numbers(inter['rating'], 'rating', inter_path, 2) if 'rating' in inter else None
  return _events(inter_path, inter['user_id'], inter['item_id'], ratings,
                 _numbers(inter['timestamp'], 'timestamp', inter_path, 2), titles, genres,
                 user_features, item_path)


def _recbole_table(path: str, required: tuple[str, ...]) -> dict[str, list[str]]:
  """A RecBole atomic file as {column: values}; the header types each column `name:type`."""
  raw, encoding = _read_bytes(path)
  header, _, body = raw.partition(b'\n')
  if not header:
    raise DataError(f'{path}:1: empty header, expected tab-separated "name:type" columns')
  names = []
  for field in _decode(header, encoding, path, 1).split('\t'):
    column, _, kind = field.partition(':')
    if kind not in RECBOLE_TYPES:
      raise DataError(f'{path}:1: column {field!r} must be "name:type" with type in {RECBOLE_TYPES}')
    names.append(column)
  missing = [c for c in required if c not in names]
  if missing:
    raise DataError(f'{path}:1: missing required column(s) {missing}; header has {names}')
  return dict(zip(names, _columns(body, '\t', len(names), encoding, path, 2)))


# ------------------------------------------------------------------------------------------------
# GroupLens MovieLens.


def read_ml100k(directory: str) -> Events:
  """ML-100K: `u.data` (user item rating ts, tabs), `u.item` (`|`, 19 genre flags), `u.user`."""
  data_path = os.path.join(directory, 'u.data')
  user, item, rating, ts = _table(data_path, '\t', 4)
  item_path = os.path.join(directory, 'u.item')
  item_cols = _item_rows(_table(item_path, '|', 5 + len(ML100K_GENRES)), item_path, 1)
  flags = np.stack([_numbers(c, 'genre flag', item_path, 1) for c in item_cols[5:]], axis=1)
  genres = {i: tuple(g for g, f in zip(ML100K_GENRES, row) if f)
            for i, row in zip(item_cols[0], flags.tolist())}
  user_features = {}
  user_path = os.path.join(directory, 'u.user')
  if os.path.exists(user_path):
    cols = _table(user_path, '|', 5)
    for u, age, gender, occupation, zip_code in zip(*cols):
      user_features[u] = dict(age=age, gender=gender, occupation=occupation, zip_code=zip_code)
  return _events(data_path, user, item, _numbers(rating, 'rating', data_path, 1),
                 _numbers(ts, 'timestamp', data_path, 1), dict(zip(item_cols[0], item_cols[1])),
                 genres, user_features, item_path)


def read_ml1m(directory: str) -> Events:
  """ML-1M: `ratings.dat`, `movies.dat` (genres `|`-joined), `users.dat`; `::`-separated, latin-1."""
  data_path = os.path.join(directory, 'ratings.dat')
  user, item, rating, ts = _table(data_path, '::', 4)
  movie_path = os.path.join(directory, 'movies.dat')
  movie, title, genre = _item_rows(_table(movie_path, '::', 3), movie_path, 1)
  user_features = {}
  user_path = os.path.join(directory, 'users.dat')
  if os.path.exists(user_path):
    cols = _table(user_path, '::', 5)
    ages = _numbers(cols[2], 'age', user_path, 1)
    occupations = _numbers(cols[3], 'occupation', user_path, 1)
    for j, (u, gender, zip_code) in enumerate(zip(cols[0], cols[1], cols[4])):
      age, occupation = int(ages[j]), int(occupations[j])
      if age not in ML1M_AGES or not 0 <= occupation < len(ML1M_OCCUPATIONS):
        raise DataError(f'{user_path}:{j + 1}: age code {age} must be one of {sorted(ML1M_AGES)} and '
                        f'occupation code {occupation} in 0..{len(ML1M_OCCUPATIONS) - 1}')
      user_features[u] = dict(age=ML1M_AGES[age], gender=gender,
                              occupation=ML1M_OCCUPATIONS[occupation], zip_code=zip_code)
  return _events(data_path, user, item, _numbers(rating, 'rating', data_path, 1),
                 _numbers(ts, 'timestamp', data_path, 1), dict(zip(movie, title)),
                 {m: tuple(g.split('|')) if g else () for m, g in zip(movie, genre)}, user_features,
                 movie_path)


# ------------------------------------------------------------------------------------------------
# Amazon reviews (2014 release).

_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]*)['"]""")


def read_amazon(directory: str, category: str) -> Events:
  """`reviews_<category>_5.json.gz` (JSON lines) with titles/categories from `meta_<category>.json.gz`."""
  path = os.path.join(directory, f'reviews_{category}_5.json.gz')
  users, items, ratings, times = [], [], [], []
  for n, line in _gzip_lines(path):
    try:
      row = json.loads(line)
      values = row['reviewerID'], row['asin'], float(row['overall']), float(row['unixReviewTime'])
    except (ValueError, TypeError, KeyError) as e:
      raise DataError(f'{path}:{n}: expected a JSON object with reviewerID, asin, numeric overall and '
                      f'unixReviewTime ({type(e).__name__}: {e})') from None
    for out, v in zip((users, items, ratings, times), values):
      out.append(v)
  wanted = set(items)
  titles, genres, repeats = {}, {}, 0
  meta_path = os.path.join(directory, f'meta_{category}.json.gz')
  for n, line in _gzip_lines(meta_path):
    asin = _ASIN.search(line)
    if asin and asin.group(1) not in wanted:
      continue  # literal_eval is slow; most metadata lines describe items without 5-core reviews
    try:
      row = ast.literal_eval(line)
      asin = row['asin']
    except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError) as e:
      raise DataError(f'{meta_path}:{n}: expected a Python dict literal with an '
                      f'asin ({type(e).__name__}: {e})') from None
    if asin in titles:
      repeats += 1
      continue  # the first row of an id is kept, as for the other sources
    titles[asin] = str(row.get('title') or '')
    paths = row.get('categories') or ()  # a list of category paths, each a list of names
    genres[asin] = tuple(dict.fromkeys(
        c for p in paths for c in ([p] if isinstance(p, str) else p)))
  if repeats:
    logging.warning('%s: %d repeated item rows ignored (the first row of each asin is kept)', meta_path, repeats)
  return _events(path, users, items, np.array(ratings, np.float64), np.array(times, np.float64),
                 titles, genres, {}, meta_path)


def _gzip_lines(path: str):
  """(line number, text) of a gzipped UTF-8 file's non-empty lines."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  try:
    with gzip.open(path, 'rt', encoding='utf-8-sig') as f:  # a byte-order mark is skipped
      for n, line in enumerate(f, 1):
        if line.strip():
          yield n, line
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: not a readable gzipped UTF-8 file ({e})') from None


# ------------------------------------------------------------------------------------------------
# TFDS MovieLens.


def read_tfds(name: str, data_dir: str) -> Events:
  """A prepared TFDS MovieLens ratings dataset (never downloads); '' data_dir = TFDS's default."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], 'GPU')  # keep TF off accelerators JAX owns
  except RuntimeError:
    pass  # TF already initialised its devices; nothing of ours runs on them
  where = f'tfds {name!r} in data_dir {data_dir or "(default)"!r}'
  try:
    ds, info = tfds.load(name, split='train', data_dir=data_dir or None, download=False,
                         shuffle_files=False, with_info=True)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'{where}: no such TFDS dataset, expected movielens/100k-ratings or '
                    'movielens/1m-ratings') from None
  except (AssertionError, ValueError) as e:  # not prepared in data_dir
    raise DataError(f'{where}: cannot load it without downloading ({e})') from None
  missing = [f for f in TFDS_FIELDS if f not in info.features]
  if missing:
    raise DataError(f'{where}: features {missing} missing, expected a movielens/*-ratings dataset')
  genre_names = info.features['movie_genres'].feature.names
  demographics = [f for f in ('user_gender', 'bucketized_user_age', 'raw_user_age',
                              'user_occupation_text', 'user_zip_code') if f in info.features]

  def project(ex):
    out = {f: ex[f] for f in TFDS_FIELDS + tuple(demographics) if f != 'movie_genres'}
    out['movie_genres'] = tf.reduce_sum(
        tf.one_hot(ex['movie_genres'], len(genre_names), dtype=tf.int32), axis=0)  # multi-hot
    return out

  batches = list(tfds.as_numpy(ds.map(project).batch(1 << 16)))
  if not batches:
    raise DataError(f'{where}: the train split is empty')
  col = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  users, user_ids = _encode(col['user_id'].tolist())
  items, item_ids = _encode(col['movie_id'].tolist())
  user_ids = [u.decode('utf-8') for u in user_ids]
  item_ids = [i.decode('utf-8') for i in item_ids]
  titles, genres = {}, {}
  for i, j in zip(item_ids, _first_rows(items)):
    titles[i] = col['movie_title'][j].decode('utf-8')
    genres[i] = tuple(g for g, f in zip(genre_names, col['movie_genres'][j]) if f)
  user_features = {}
  if demographics:
    user_features = {u: _tfds_user(col, j) for u, j in zip(user_ids, _first_rows(users))}
  return Events(
      path=where, user_ids=np.array(user_ids, dtype=str), item_ids=np.array(item_ids, dtype=str),
      users=users, items=items, ratings=col['user_rating'].astype(np.float64),
      timestamps=col['timestamp'].astype(np.float64), titles=titles, genres=genres,
      user_features=user_features)


def _first_rows(codes: np.ndarray) -> list[int]:
  """The first row of each dense code 0..V-1."""
  return np.unique(codes, return_index=True)[1].tolist()


def _tfds_user(col, j) -> dict[str, str]:
  out = {}
  if 'raw_user_age' in col:
    out['age'] = str(int(col['raw_user_age'][j]))
  elif 'bucketized_user_age' in col:
    age = int(col['bucketized_user_age'][j])
    out['age'] = ML1M_AGES.get(age, str(age))
  if 'user_gender' in col:
    out['gender'] = 'M' if col['user_gender'][j] else 'F'
  if 'user_occupation_text' in col:
    out['occupation'] = col['user_occupation_text'][j].decode('utf-8')
  if 'user_zip_code' in col:
    out['zip_code'] = col['user_zip_code'][j].decode('utf-8')
  return out
