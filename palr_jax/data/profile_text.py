"""User profiles, the library part: what a profile is written from, the LLM's request, the stats profile.

`config.profiles.kind`:
  llm    the model writes the profile from the user's titles + genres (+ attributes such as age and
         occupation when the data has them), prompt template in config (stage palr_jax/stages/profiles.py:
         greedy decoding with the KV cache, users batched and split over processes).
  stats  genre shares and frequent title words of the same items: no model, milliseconds; for quick runs
         and tests.

Leakage rule. A user's profile is ONE text, written from
    source(u) = train[u][:s_u] without H(u),   s_u = max(1, len(train[u]) - prompts.max_examples_per_user),
where s_u is the position of the user's first training target (`prompts.training_positions`) and
H(u) = {valid[u], test[u]} (only present in train[u] with repeat events). It serves every prompt of u:
  - training prompts have targets at positions >= s_u, so the profile contains neither the prompt's target
    nor anything after it;
  - valid and test prompts condition on train[u] (+ valid[u]), of which the source is a prefix.
Why not per split: a profile from all of train[u] used by training prompts would contain their targets
and later items (the model would learn to read the answer off the profile, which at test time does not
hold it); a profile per training prefix costs max_examples_per_user LLM generations per user. One
prefix profile costs one generation per user, and train and test prompts see the same text, so the model
is not trained on one kind of profile and tested on another. The price: the profile does not summarise
the user's last max_examples_per_user training items, which the prompts list explicitly anyway.

File: `W/profiles.jsonl`, one row per user in user order: {"user": raw id, "user_index": u,
"profile": text, "items": number of source items}.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
import re
import string

from etils import epath
import numpy as np

from palr_jax import files
from palr_jax.data import chat
from palr_jax.data import prompts

KINDS = ('llm', 'stats')
_STOPWORDS = frozenset(
    'the and for with from that this what when where your their about into over under after before '
    'than then them they have will would there here other night'.split())


def profile_items(split, user: int, max_examples: int) -> np.ndarray:
  """The items a user's profile is written from: train[u] before the first training target, minus H(u)."""
  train = split.train[user]
  start = prompts.training_positions(len(train), max_examples).start
  heldout = prompts.held_out(split, user)
  return np.asarray([i for i in train[:start] if int(i) not in heldout], np.int32)


def _title_words(title: str) -> set[str]:
  words = re.findall(r"[a-z][a-z']+", title.lower())
  return {w for w in words if len(w) >= 4 and w not in _STOPWORDS}


def genre_shares(inter, items: Sequence[int], top: int) -> list[tuple[str, int]]:
  """The `top` most frequent genres of `items` with their share in percent (ties by name)."""
  counts = Counter(g for i in items for g in inter.genres[i])
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
  return [(g, round(100 * n / len(items))) for g, n in ranked]


def _shares_text(shares) -> str:
  return ', '.join(f'{g} {p}%' for g, p in shares)


def stats_profile(inter, items: Sequence[int], cfg) -> str:
  """'Favourite genres: Drama 41%, Comedy 28%. Frequent title words: love, story.' ('' if nothing)."""
  parts = []
  shares = genre_shares(inter, items, cfg.top_genres)
  if shares:
    parts.append(f'Favourite genres: {_shares_text(shares)}.')
  words = Counter(w for i in items for w in _title_words(inter.titles[i]))
  frequent = sorted((w for w, n in words.items() if n >= 2), key=lambda w: (-words[w], w))[:cfg.top_keywords]
  if frequent:
    parts.append('Frequent title words: ' + ', '.join(frequent) + '.')
  return ' '.join(parts)


def user_features_text(inter, user: int, names: Sequence[str]) -> str:
  return ', '.join(f'{name} {inter.user_features[name][user]}' for name in names
                   if name in inter.user_features and str(inter.user_features[name][user]).strip())


def check_template(cfg) -> None:
  fields = {name for _, name, _, _ in string.Formatter().parse(cfg.template) if name is not None}
  if 'history' not in fields or not fields <= {'history', 'genres', 'user'}:
    raise ValueError(f'config.profiles.template = {cfg.template!r}: needs {{history}}, may use {{genres}} '
                     f'and {{user}}; has {sorted(fields)}')


def llm_request(inter, items: Sequence[int], user: int, cfg) -> str:
  """The user message asking for a profile: the source's last `max_history` titles, its genre shares
  (over the whole source) and the user's attributes."""
  titles = [' '.join(inter.titles[i].split()) or f'item {inter.item_ids[i]}' for i in list(items)[-cfg.max_history:]]
  genres = _shares_text(genre_shares(inter, items, cfg.top_genres)) or 'unknown'
  features = user_features_text(inter, user, cfg.user_features)
  return cfg.template.format(history='\n'.join(cfg.history_line.format(title=t) for t in titles), genres=genres,
                             user=cfg.user_line.format(features=features) if features else '')


def clean_profile(text: str) -> str:
  """One line without markdown emphasis, cut after its last complete sentence (if it has one)."""
  text = ' '.join(text.replace('**', '').split())
  end = max(text.rfind('. '), text.rfind('! '), text.rfind('? '))
  if text[-1:] in '.!?':
    return text
  return text[:end + 1] if end > 0 else text




def chat_ids(tokenizer, system: str, text: str) -> list[int]:
  """Token ids of one user turn in the tokenizer's chat template, with the generation prompt; the turn's
  text (titles: data) never becomes control tokens (palr_jax/data/chat.py)."""
  messages = ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': text}]
  return chat.Template(tokenizer).ids(messages)


def row(inter, user: int, profile: str, items: int) -> dict:
  return {'user': str(inter.user_ids[user]), 'user_index': user, 'profile': profile, 'items': items}


def check_row(row, inter, where: str) -> int:
  """The user index of a profile row, which must match the data."""
  if not isinstance(row, dict) or not {'user', 'user_index', 'profile'} <= set(row):
    raise ValueError(f'{where}: expected an object with user, user_index, profile')
  u = row['user_index']
  if not isinstance(u, int) or not 0 <= u < len(inter.user_ids) or str(inter.user_ids[u]) != row['user']:
    raise ValueError(f'{where}: user_index {u!r} / user {row["user"]!r} do not match the data '
                     f'({len(inter.user_ids)} users); the file belongs to another data config')
  return u


def rows_by_user(rows: Iterable[dict], inter, where: str) -> dict[int, dict]:
  """{user index: row}; a user twice is an error."""
  out: dict[int, dict] = {}
  for n, r in enumerate(rows, 1):
    u = check_row(r, inter, f'{where}:{n}')
    if u in out:
      raise ValueError(f'{where}:{n}: user {r["user"]} appears twice')
    out[u] = r
  return out


def read_profiles(path, inter) -> list[str]:
  """Profile text per user index from `profiles.jsonl`; every user must be present exactly once."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; run the profiles stage first '
                            '(python -m palr_jax.main ... --stages profiles)')
  by_user = rows_by_user(files.read_jsonl(path), inter, str(path))
  missing = [str(inter.user_ids[u]) for u in range(len(inter.user_ids)) if u not in by_user]
  if missing:
    raise ValueError(f'{path}: no profile for {len(missing)} users (first: {missing[:3]})')
  return [by_user[u]['profile'] for u in range(len(inter.user_ids))]


def stats_profiles(inter, split, config) -> list[dict]:
  """The stats profile row of every user."""
  out = []
  for u in range(len(inter.user_ids)):
    items = profile_items(split, u, config.prompts.max_examples_per_user)
    out.append(row(inter, u, stats_profile(inter, items, config.profiles), len(items)))
  return out
