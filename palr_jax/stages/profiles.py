"""Stage `profiles`: a short text about each user's taste -> `W/profiles.jsonl` (palr_jax/data/profile_text.py
says what it is written from, and why that never leaks a target).

Processes: sharded. Users are sorted by the length of their request and dealt round-robin to the
processes, so every process gets a similar share of short and long prompts; each writes its batches of
finished profiles as part files `W/profiles.parts/<fingerprint>/<first user>.jsonl` (one object per part:
no appends, fine on object stores), then process 0 joins them into `profiles.jsonl`. A killed run resumes
from the parts of the same fingerprint (process 0 lists them for every process, so all cut their shares
from one list); parts of another fingerprint are deleted.
"""
from __future__ import annotations

import time

from absl import logging

from palr_jax import distributed
from palr_jax import files
from palr_jax.data import interactions
from palr_jax.data import profile_text
from palr_jax.hub import load
from palr_jax.model import decode
from palr_jax.stages import base
from palr_jax.train import progress

PARTS = 'profiles.parts'


def declare(config) -> base.Stage:
  hashes = ('data', 'profiles', 'prompts.max_examples_per_user')
  inputs = tuple(interactions.source_files(config.data))
  if config.profiles.kind == 'llm':
    hashes += ('model.spec', 'model.dtype', 'model.param_dtype', 'batching.length_buckets')
    inputs += tuple(load.model_files(config.model.spec))
  return base.Stage(
      name='profiles', run=run, merge=merge, hashes=hashes, outputs=('profiles.jsonl',),
      processes=base.SHARDED, inputs=inputs, scratch=(PARTS,), resumes=resumes,
      per_process='every process generates the profiles of its share of the users on its host-local mesh and '
           'writes them as part files; process 0 joins them into profiles.jsonl')


def _parts(ctx):
  return ctx.workdir / PARTS / ctx.fingerprint


def resumes(ctx) -> str | None:
  done = len(finished(ctx))
  return f'with {done} of {len(ctx.inter.user_ids)} users\' profiles already written' if done else None


def finished(ctx) -> dict[int, dict]:
  """{user index: row} of the part files already written for this fingerprint."""
  folder = _parts(ctx)
  done: dict[int, dict] = {}
  if folder.exists():
    for part in sorted(folder.glob('*.jsonl')):
      try:
        rows = profile_text.rows_by_user(files.read_jsonl(part), ctx.inter, str(part))
      except ValueError as e:  # cut short or not ours: its users are written again, never trusted
        logging.warning('%s: a damaged part file, its users are written again (%s)', part, e)
        continue
      for u, row in rows.items():
        done.setdefault(u, row)
  return done


def finished_users(ctx) -> list[int]:
  """The users whose profiles are written, as process 0 lists them, on every process: each process's
  share is cut from the same list, even when a fast process has written a new part by the time a slow
  one would list the folder itself."""
  return distributed.from_leader('profiles-finished', sorted(finished(ctx)) if distributed.is_leader() else None)


def run(ctx) -> None:
  config = ctx.config
  cfg = config.profiles
  if cfg.kind not in profile_text.KINDS:
    raise ValueError(f'config.profiles.kind = {cfg.kind!r}: expected one of {profile_text.KINDS}')
  profile_text.check_template(cfg)
  if cfg.kind == 'stats':
    if distributed.is_leader():
      files.atomic_write_jsonl(_parts(ctx) / '0.jsonl', profile_text.stats_profiles(ctx.inter, ctx.split, config))
    return
  generate_profiles(ctx)


def generate_profiles(ctx) -> None:
  """LLM profiles of this process's share of the users not written yet, one part file per batch."""
  config, inter, split = ctx.config, ctx.inter, ctx.split
  cfg = config.profiles
  done = set(finished_users(ctx))
  sources = {u: profile_text.profile_items(split, u, config.prompts.max_examples_per_user)
             for u in range(len(inter.user_ids))}
  todo = [u for u in sources if u not in done]
  tokenizer = ctx.tokenizer
  requests = {u: profile_text.chat_ids(tokenizer, cfg.system, profile_text.llm_request(inter, sources[u], u, cfg))
              for u in todo}
  todo.sort(key=lambda u: (len(requests[u]), u))    # similar lengths share a batch and a bucket
  mine = distributed.share(todo)
  logging.info('profiles: %d users done, %d to write, %d of them by this process', len(done), len(todo),
               len(mine))
  if not mine:
    return
  model = ctx.base_model(ctx.local_mesh)
  eos = sorted({int(tokenizer.eos_token_id), *model.config.eos_token_ids})
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
  start = time.perf_counter()
  batch_size = int(cfg.batch_size)
  bar = progress.bar(len(mine), 'profiles')
  for b in range(0, len(mine), batch_size):
    users = mine[b:b + batch_size]
    out = decode.generate(model, [requests[u] for u in users], max_new_tokens=int(cfg.max_new_tokens),
                          eos_ids=eos, pad_id=pad, buckets=config.batching.length_buckets,
                          batch_size=batch_size, placement=ctx.placement)
    rows = [profile_text.row(inter, u, profile_text.clean_profile(tokenizer.decode(ids, skip_special_tokens=True)),
                             len(sources[u])) for u, ids in zip(users, out)]
    files.atomic_write_jsonl(_parts(ctx) / f'{users[0]}.jsonl', rows)
    bar.update(len(users))
    logging.info('profiles: %d/%d users of this process (%.2f users/s)', b + len(users), len(mine),
                 (b + len(users)) / (time.perf_counter() - start))
  bar.close()


def merge(ctx) -> None:
  """Process 0: every user's part row -> profiles.jsonl; the parts (of every fingerprint) go."""
  done = finished(ctx)
  missing = [str(ctx.inter.user_ids[u]) for u in range(len(ctx.inter.user_ids)) if u not in done]
  if missing:
    raise RuntimeError(f'{_parts(ctx)}: no profile for {len(missing)} users (first: {missing[:3]})')
  files.atomic_write_jsonl(ctx.workdir / 'profiles.jsonl', [done[u] for u in range(len(ctx.inter.user_ids))])
  (ctx.workdir / PARTS).rmtree()
