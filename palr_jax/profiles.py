"""User profiles: a short text about each user's taste, written by the LLM (PALR) or from statistics.

`config.profiles.kind`:
  llm    the model writes the profile from the user's titles + genres (+ attributes such as age and
         occupation when the data has them), prompt template in config, greedy decoding with the KV cache
         (`palr_jax.model.generate`, jitted; users sorted by prompt length and batched with a fixed batch
         size, prompt lengths bucketed, so a run compiles a handful of shapes, not one per user).
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

Files: `W/profiles.jsonl`, one row per user in user order: {"user": raw id, "user_index": u,
"profile": text, "items": number of source items}, written atomically when complete. LLM runs are
resumable: finished batches are appended (and flushed) to `W/profiles.<fingerprint>.partial.jsonl`; a
restart with the same fingerprint skips the users already there (a torn last line from a kill is
dropped), a different fingerprint starts over.

CLI: python -m palr_jax.profiles --config configs/ml100k.py --workdir W [--show 5]
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
import json
import os
import re
import string
import time

from absl import app, flags, logging
from etils import epath
import numpy as np

from palr_jax import stages
from palr_jax.data import prompts

KINDS = ('llm', 'stats')
_STOPWORDS = frozenset(
    'the and for with from that this what when where your their about into over under after before '
    'than then them they have will would there here other night'.split())


def profiles_fingerprint(config) -> str:
  sections = ['data', 'profiles', 'prompts.max_examples_per_user']
  if config.profiles.kind == 'llm':
    sections += ['model.spec', 'model.dtype', 'model.param_dtype']
  return stages.fingerprint(config, sections)


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


def _chat_ids(tokenizer, system: str, text: str) -> list[int]:
  messages = ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': text}]
  prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return tokenizer(prompt, add_special_tokens=False)['input_ids']


def _row(inter, user: int, profile: str, items: int) -> dict:
  return {'user': str(inter.user_ids[user]), 'user_index': user, 'profile': profile, 'items': items}


def _check_row(row, inter, where: str) -> int:
  if not isinstance(row, dict) or not {'user', 'user_index', 'profile'} <= set(row):
    raise ValueError(f'{where}: expected an object with user, user_index, profile')
  u = row['user_index']
  if not isinstance(u, int) or not 0 <= u < len(inter.user_ids) or str(inter.user_ids[u]) != row['user']:
    raise ValueError(f'{where}: user_index {u!r} / user {row["user"]!r} do not match the data '
                     f'({len(inter.user_ids)} users); the file belongs to another data config')
  return u


def read_profiles(path, inter) -> list[str]:
  """Profile text per user index from `profiles.jsonl`; every user must be present exactly once."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; run python -m palr_jax.profiles first')
  out: list[str | None] = [None] * len(inter.user_ids)
  for line_no, line in enumerate(path.read_text().splitlines(), 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{line_no}: not a JSON object ({e.msg})') from None
    u = _check_row(row, inter, f'{path}:{line_no}')
    if out[u] is not None:
      raise ValueError(f'{path}:{line_no}: user {row["user"]} appears twice')
    out[u] = row['profile']
  missing = [str(inter.user_ids[u]) for u, p in enumerate(out) if p is None]
  if missing:
    raise ValueError(f'{path}: no profile for {len(missing)} users (first: {missing[:3]})')
  return out


def _read_partial(path, inter) -> dict[int, dict]:
  """Rows of a partial file; a torn last line (killed mid-write) is dropped and the file rewritten."""
  path = epath.Path(path)
  if not path.exists():
    return {}
  lines = path.read_text().split('\n')
  rows: dict[int, dict] = {}
  torn = False
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if line_no == len(lines):          # no newline after it: the write was cut short
        torn = True
        continue
      raise ValueError(f'{path}:{line_no}: not a JSON object (a corrupt partial file; delete it)') from None
    rows.setdefault(_check_row(row, inter, f'{path}:{line_no}'), row)
  if torn:
    logging.warning('profiles: %s: dropped a torn last line', path)
    stages.atomic_write_jsonl(path, rows.values())
  return rows


def generate_profiles(config, inter, split, model, tokenizer, partial_path) -> list[dict]:
  """LLM profiles for every user, resuming from `partial_path`; returns the rows in user order."""
  from palr_jax.model import generate   # noqa: PLC0415 (jax model code only when the LLM is used)

  cfg = config.profiles
  done = _read_partial(partial_path, inter)
  sources = {u: profile_items(split, u, config.prompts.max_examples_per_user) for u in range(len(inter.user_ids))}
  todo = [u for u in sources if u not in done]
  requests = {u: _chat_ids(tokenizer, cfg.system, llm_request(inter, sources[u], u, cfg)) for u in todo}
  todo.sort(key=lambda u: (len(requests[u]), u))    # similar lengths share a batch and a bucket
  eos = sorted({int(tokenizer.eos_token_id), *model.config.eos_token_ids})
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
  logging.info('profiles: %d users done, %d to write', len(done), len(todo))
  start = time.perf_counter()
  epath.Path(partial_path).parent.mkdir(parents=True, exist_ok=True)
  with open(os.fspath(partial_path), 'a', encoding='utf-8') as f:
    for b in range(0, len(todo), cfg.batch_size):
      users = todo[b:b + cfg.batch_size]
      batch = [requests[u] for u in users]
      batch += [batch[0]] * (cfg.batch_size - len(batch))      # a fixed batch size: no new shape
      out = generate.generate(model, batch, max_new_tokens=cfg.max_new_tokens, eos_ids=eos, pad_id=pad)
      for u, ids in zip(users, out):
        text = clean_profile(tokenizer.decode(ids, skip_special_tokens=True))
        done[u] = _row(inter, u, text, len(sources[u]))
        f.write(json.dumps(done[u], ensure_ascii=False) + '\n')
      f.flush()
      os.fsync(f.fileno())
      rate = (b + len(users)) / (time.perf_counter() - start)
      logging.info('profiles: %d/%d users (%.2f users/s)', b + len(users), len(todo), rate)
  return [done[u] for u in range(len(inter.user_ids))]


def make_profiles(config, workdir, inter, split, load_model=None) -> list[str]:
  """Writes `W/profiles.jsonl` for `config.profiles.kind` and returns the profile per user.

  `load_model()` -> (model, tokenizer) is called only for kind 'llm' (and only if users remain).
  """
  cfg = config.profiles
  if cfg.kind not in KINDS:
    raise ValueError(f'config.profiles.kind = {cfg.kind!r}: expected one of {KINDS}')
  check_template(cfg)
  workdir = epath.Path(workdir)
  if cfg.kind == 'stats':
    rows = []
    for u in range(len(inter.user_ids)):
      items = profile_items(split, u, config.prompts.max_examples_per_user)
      rows.append(_row(inter, u, stats_profile(inter, items, cfg), len(items)))
  else:
    if load_model is None:
      raise ValueError("config.profiles.kind = 'llm' needs a model: pass load_model")
    partial = workdir / f'profiles.{profiles_fingerprint(config)}.partial.jsonl'
    model, tokenizer = load_model()
    rows = generate_profiles(config, inter, split, model, tokenizer, partial)
  stages.atomic_write_jsonl(workdir / 'profiles.jsonl', rows)
  for stale in workdir.glob('profiles.*.partial.jsonl'):
    stale.unlink()
  return [r['profile'] for r in rows]


def current_profiles(config, workdir, inter, split) -> list[str]:
  """The profiles for `config`: `W/profiles.jsonl` if written for this config, else stats profiles
  computed in memory (kind 'stats'); kind 'llm' without a current file is an error."""
  workdir = epath.Path(workdir)
  if stages.is_current(workdir, 'profiles', profiles_fingerprint(config), ['profiles.jsonl']):
    return read_profiles(workdir / 'profiles.jsonl', inter)
  if config.profiles.kind == 'stats':
    return [stats_profile(inter, profile_items(split, u, config.prompts.max_examples_per_user), config.profiles)
            for u in range(len(inter.user_ids))]
  raise FileNotFoundError(f'{workdir / "profiles.jsonl"}: missing or written for another config; run '
                          f'python -m palr_jax.profiles --config ... --workdir {workdir}')


# ------------------------------------------------------------------------------------------ CLI


def run(config, workdir, show: int) -> None:
  """Profiles stage (skipped when `W/profiles.fingerprint.json` is current); prints `show` examples."""
  from palr_jax import checkpoints
  from palr_jax.data import interactions

  workdir = epath.Path(workdir)
  inter = interactions.load(config.data)
  split = interactions.leave_one_out(inter)

  def load():
    model, tokenizer, _ = checkpoints.load_model(config.model)
    return model, tokenizer

  start = time.perf_counter()
  ran = stages.run_stage(workdir, 'profiles', profiles_fingerprint(config),
                         lambda: make_profiles(config, workdir, inter, split, load), outputs=['profiles.jsonl'])
  seconds = time.perf_counter() - start
  texts = read_profiles(workdir / 'profiles.jsonl', inter)
  if ran:
    print(f'{len(texts)} {config.profiles.kind} profiles in {seconds:.1f} s '
          f'({len(texts) / seconds:.2f} users/s) -> {workdir / "profiles.jsonl"}')
  for u in range(min(show, len(texts))):
    print(f'user {inter.user_ids[u]}: {texts[u]}')


if __name__ == '__main__':
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (W).')
  _SHOW = flags.DEFINE_integer('show', 5, 'Print this many profiles.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(lambda argv: run(_CONFIG.value, _WORKDIR.value, _SHOW.value))
