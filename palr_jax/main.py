"""PALR end to end: data -> retriever -> profiles -> instruction data -> LoRA fine-tune -> rank -> evaluate
-> export.

  python -m palr_jax.main --config configs/ml100k.py:quick --workdir runs/ml100k-quick

Every stage writes its outputs under the workdir and then `<stage>.fingerprint.json` with the hash of
the config sections it reads (palr_jax/stages.py): the same command again skips every finished stage, a
killed run resumes at the stage it was in (training from its last orbax checkpoint, ranking from its
last finished method/split/checkpoint in `W/rank_parts/`), and
changing, say, `--config.rank.mode` reruns only ranking and evaluation. With `shared_dir` (sweeps),
finished stage outputs are also kept there by fingerprint, so sweep points that share upstream settings
copy them instead of recomputing.

Methods compared (on the same valid/test users, chronological leave-one-out):
  retriever   the MF retriever's own ranking
  zero_shot   the base LLM reranks the retriever's candidates (Recommend_Retrieval prompt, tag scores)
  palr_v1     LoRA-tuned on Recommend only; ranks the candidates by `config.rank.v1_mode` (constrained
              generation of titles, or title likelihood) from its Recommend prompt
  palr_v2     LoRA-tuned on Recommend + Recommend_Retrieval; ranks by `config.rank.mode`
For the tuned models, the checkpoint used on test is the one with the best valid HR@10 among those the
trainer kept (latest N + best by valid loss). Candidates the LLM does not rank keep the retriever's order,
and the target's rank over the whole catalog is its retriever rank when the retriever missed it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import itertools
import json
import shutil
import time

from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
from ml_collections import config_flags
import numpy as np

from palr_jax import checkpoints
from palr_jax import distributed
from palr_jax import evaluate
from palr_jax import profiles as profiles_lib
from palr_jax import rank
from palr_jax import retrieve
from palr_jax import sharding
from palr_jax import stages
from palr_jax import train as train_lib
from palr_jax.data import interactions
from palr_jax.data import pipeline
from palr_jax.data import prompts

METHODS = ('retriever', 'zero_shot', 'palr_v1', 'palr_v2')
# PALR v1 trains on Recommend only; v2 on both tasks (the paper's two versions).
VARIANT_TASKS = {'palr_v1': ('recommend',), 'palr_v2': ('recommend', 'recommend_retrieval')}
MODEL_SECTIONS = ('model.spec', 'model.dtype', 'model.param_dtype', 'model.attention')


# ------------------------------------------------------------------------------------ helpers


def variant_config(config, variant: str):
  """The config a PALR variant trains with: the same settings, its own task list."""
  c = config.copy_and_resolve_references()
  c.prompts.tasks = VARIANT_TASKS[variant]
  return c


def eval_users(num_users: int, config) -> np.ndarray:
  """All users, or a seeded subset of `config.eval.max_users` (sorted), the same for every method."""
  n = int(config.eval.max_users)
  if n <= 0 or n >= num_users:
    return np.arange(num_users)
  rng = np.random.default_rng([int(config.seed), 0xE7A1])
  return np.sort(rng.choice(num_users, n, replace=False))


class _Take:
  """The first `n` items of a re-iterable, re-iterable (n = 0: all of them)."""

  def __init__(self, iterable, n: int):
    self.iterable, self.n = iterable, n

  def __iter__(self):
    return itertools.islice(iter(self.iterable), self.n or None)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Runner:
  """Runs stages in order with skip-when-current, optionally sharing outputs through `shared_dir`."""

  def __init__(self, workdir: epath.Path, shared_dir: epath.Path | None):
    self.workdir, self.shared_dir = workdir, shared_dir
    self.writer = jax.process_index() == 0
    self.ran: list[str] = []

  def __call__(self, stage: str, fp: str, fn: Callable[[], object], outputs: Sequence[str],
               collective: bool = False) -> None:
    """Runs `fn` unless `stage` is current. Only process 0 runs it and writes, the others wait at a
    barrier; a `collective` stage (training) runs on every process and process 0 records it."""
    if not stages.is_current(self.workdir, stage, fp, outputs) and self._from_shared(stage, fp, outputs):
      logging.info('stage %s: copied from %s', stage, self.shared_dir)
    _barrier(f'{stage}-start')
    if stages.is_current(self.workdir, stage, fp, outputs):
      logging.info('stage %s: current (fingerprint %s), skipped', stage, fp)
      return
    if self.writer or collective:
      logging.info('stage %s: running (fingerprint %s)', stage, fp)
      start = time.perf_counter()
      fn()
      logging.info('stage %s: done in %.1f s', stage, time.perf_counter() - start)
    if self.writer:
      stages.mark_done(self.workdir, stage, fp)
      self._to_shared(stage, fp, outputs)
    self.ran.append(stage)
    _barrier(f'{stage}-done')

  def _shared(self, stage: str, fp: str) -> epath.Path | None:
    return None if self.shared_dir is None else self.shared_dir / stage / fp

  def _from_shared(self, stage, fp, outputs) -> bool:
    src = self._shared(stage, fp)
    if not self.writer or src is None or not (src / 'done').exists():
      return False
    for name in outputs:
      _copy(src / name, self.workdir / name)
    stages.mark_done(self.workdir, stage, fp)
    return True

  def _to_shared(self, stage, fp, outputs) -> None:
    dst = self._shared(stage, fp)
    if not self.writer or dst is None or (dst / 'done').exists():
      return
    for name in outputs:
      _copy(self.workdir / name, dst / name)
    (dst / 'done').write_text(fp)


def _copy(src: epath.Path, dst: epath.Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  if src.is_dir():
    if dst.exists():
      shutil.rmtree(dst)
    shutil.copytree(src, dst)
  else:
    tmp = dst.parent / (dst.name + '.tmp')
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


# ------------------------------------------------------------------------------------ ranking


def _answer_prompt(builder: prompts.PromptBuilder, example: prompts.Example) -> list[int]:
  """Token ids up to where the answer's content starts (the assistant header included)."""
  ids = example.input_ids
  ones = np.flatnonzero(example.loss_mask)
  prompt = ids[:ones[0]] if ones.size else ids
  return list(prompt) + builder.encode(builder.answer_prefix)


def _rank_split(config, model, builder, split, which: str, users: np.ndarray, task: str, mode: str,
                profiles: Sequence[str], candidates: dict, mesh) -> dict:
  """Orders each user's candidates with `model`; returns {'users', 'targets', 'items', 'orders', 'ranks'}."""
  c = config.rank
  rows = [candidates[int(u)] for u in users]
  cands = prompts.Candidates(path=f'candidates/{which}.jsonl', split=which,
                             rows={int(u): np.asarray(r['items'], np.int64) for u, r in zip(users, rows)})
  examples = prompts.build_examples(builder, split, which, profiles, cands if task == 'recommend_retrieval'
                                    else None, users=[int(u) for u in users], insert_target=False)
  examples = [e for e in examples if e.task == task]
  prompt_ids = [_answer_prompt(builder, e) for e in examples]
  # Candidates in the order the model sees them (tag order for v2, retriever order for v1).
  shown = [np.asarray(e.candidates if task == 'recommend_retrieval' else r['items'], np.int64)
           for e, r in zip(examples, rows)]
  common = dict(batch_size=int(c.batch_size), buckets=tuple(c.buckets), mesh=mesh, rules=config.mesh.rules)
  if mode == 'score':
    tags = [builder.tag_ids[:len(s)] for s in shown]
    orders = rank.order_from_scores(rank.score_tags(model, prompt_ids, tags, **common))
  elif mode in ('generate', 'likelihood'):
    if task == 'recommend_retrieval':
      texts = [[config.prompts.recommend_retrieval_response.format(tag=builder.tags[j], title=builder.titles[i])
                for j, i in enumerate(s)] for s in shown]
    else:
      texts = [[config.prompts.recommend_response.format(title=builder.titles[i]) for i in s] for s in shown]
    # Likelihood scores whole answers (end-of-turn included), so a title that is a prefix of another
    # gets no advantage; generation stops items by the trie, so it needs only the content.
    end = builder.answer_suffix if mode == 'likelihood' else ''
    conts = [[builder.encode(t + end) for t in ts] for ts in texts]
    if mode == 'generate':
      orders = rank.generate_ranking(model, prompt_ids, conts, separator=builder.encode(c.separator),
                                     max_items=int(c.max_items), **common)
    else:
      orders = rank.order_from_scores(rank.score_continuations(model, prompt_ids, conts, reduce=c.reduce,
                                                               **common))
  else:
    raise ValueError(f"config.rank.mode: expected 'score', 'generate' or 'likelihood', got {mode!r}")
  # Orders index the candidates as shown (tag order may be shuffled); re-index them into the retriever's
  # order so candidates the model leaves unranked (generate mode) keep the retriever's order.
  retrieved = [np.asarray(r['items'], np.int64) for r in rows]
  orders = [np.asarray([int(np.flatnonzero(ret == s[j])[0]) for j in o], np.int64)
            for o, s, ret in zip(orders, shown, retrieved)]
  ranks = np.array([rank.target_rank(ret, o, e.target, r['target_rank'])
                    for ret, o, e, r in zip(retrieved, orders, examples, rows)], np.float64)
  return {'users': users, 'targets': np.array([e.target for e in examples]), 'items': retrieved,
          'orders': orders, 'ranks': ranks}


def _load(config, mesh, lora_config=None, seed_name='lora'):
  rngs = nnx.Rngs(params=retrieve.stream_key(int(config.seed), seed_name),
                  dropout=retrieve.stream_key(int(config.seed), seed_name + '-dropout'))
  return checkpoints.load_model(config.model, lora_config, mesh, config.mesh.rules, rngs=rngs)


# ------------------------------------------------------------------------------------ the job


def run(config, workdir, shared_dir=None) -> dict:
  """Runs every stage that is not current; returns the results dict (also in W/results.json)."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  shared_dir = epath.Path(shared_dir) if shared_dir else None
  runner = Runner(workdir, shared_dir)
  mesh = sharding.make_mesh(config.mesh)
  ks = [int(k) for k in config.eval.ks]
  stages.atomic_write_text(workdir / 'config.json', config.to_json_best_effort(indent=2) + '\n')

  inter = interactions.load(config.data)
  split = interactions.leave_one_out(inter)

  # 1. Retriever: candidates/{train,valid,test}.jsonl.
  fp_retriever = stages.fingerprint(config, retrieve.SECTIONS)
  runner('retriever', fp_retriever, lambda: retrieve.run(config, workdir), retrieve.OUTPUTS)

  # 2. Profiles (the base LLM, or genre statistics).
  fp_profiles = profiles_lib.profiles_fingerprint(config)
  runner('profiles', fp_profiles, lambda: profiles_lib.make_profiles(
      config, workdir, inter, split, load_model=lambda: _load(config, mesh)[:2]), ['profiles.jsonl'])
  user_profiles = profiles_lib.read_profiles(workdir / 'profiles.jsonl', inter)
  tokenizer = checkpoints.hf.load_tokenizer(checkpoints.hf_folder(config.model))

  # 3-4. Instruction data and LoRA fine-tuning, per PALR variant.
  fp_train = {}
  for variant in ('palr_v1', 'palr_v2'):
    vconfig = variant_config(config, variant)
    fp_examples = pipeline.examples_fingerprint(vconfig)
    fp = stages.fingerprint(vconfig, ('train', 'lora', 'mesh', 'prompts.batches', *MODEL_SECTIONS),
                            upstream=(fp_examples, fp_retriever, fp_profiles))
    fp_train[variant] = fp

    def fine_tune(vconfig=vconfig, variant=variant):
      folder = pipeline.build_and_write(vconfig, workdir, inter, split, tokenizer, user_profiles)
      model, _, _ = _load(vconfig, mesh, vconfig.lora, seed_name=f'{variant}-lora')
      rows = sharding.process_rows(mesh, vconfig.mesh.rules, int(vconfig.train.batch_size))
      train_batches = pipeline.TrainBatches(folder / 'train.tfrecord', vconfig, rows)
      valid_batches = _Take(pipeline.EvalBatches(folder / 'valid.tfrecord', vconfig, rows),
                            int(vconfig.train.valid_batches))
      train_lib.train(vconfig, workdir / variant, model, train_batches, valid_batches)

    runner(f'train_{variant}', fp, fine_tune, [f'{variant}/checkpoints', f'{variant}/tensorboard'],
           collective=True)

  # 5. Ranking of the valid and test users by every method.
  fp_rank = stages.fingerprint(config, ('rank', 'eval.max_users', 'seed'),
                               upstream=(fp_retriever, fp_profiles, *fp_train.values()))
  runner('rank', fp_rank, lambda: _rank_all(config, workdir, inter, split, user_profiles, tokenizer, mesh,
                                            parts=workdir / 'rank_parts' / fp_rank), ['rankings.json'])

  # 6. Evaluation: results.json, results.md, predictions/test.jsonl, plots.
  fp_eval = stages.fingerprint(config, ('eval',), upstream=(fp_rank,))
  runner('evaluate', fp_eval, lambda: _evaluate(config, workdir, inter, ks),
         ['results.json', 'results.md', 'predictions/test.jsonl'])

  # 7. Export PALR v2 (best checkpoint): merged HF folder and PEFT adapter.
  fp_export = stages.fingerprint(config, ('model.spec',), upstream=(fp_rank,))
  if jax.process_count() == 1:
    runner('export', fp_export, lambda: _export(config, workdir), ['export/merged', 'export/peft'])
  elif runner.writer:  # export gathers every tensor to one host: run it there, after the job
    logging.warning('export skipped on a %d-process job; on one host run: python -m palr_jax.export '
                    '--model %s --workdir %s --out %s --format merged|peft', jax.process_count(),
                    config.model.spec, workdir / 'palr_v2', workdir / 'export' / 'merged')
  _barrier('main-done')
  return json.loads((workdir / 'results.json').read_text())


def _rank_part(parts: epath.Path, name: str, fn: Callable[[], dict]) -> dict:
  """`fn()` (a `_rank_split` result), kept in `parts/name.json` so that a ranking stage killed part-way
  (hours on all users of a CPU run) resumes at the first (method, split, checkpoint) it had not finished."""
  path = parts / f'{name}.json'
  if path.exists():
    d = json.loads(path.read_text())
    return {'users': np.asarray(d['users'], np.int64), 'targets': np.asarray(d['targets'], np.int64),
            'items': [np.asarray(x, np.int64) for x in d['items']],
            'orders': [np.asarray(x, np.int64) for x in d['orders']], 'ranks': np.asarray(d['ranks'], np.float64)}
  result = fn()
  stages.atomic_write_json(path, {'users': np.asarray(result['users']).tolist(),
                                  'targets': np.asarray(result['targets']).tolist(),
                                  'items': [np.asarray(x).tolist() for x in result['items']],
                                  'orders': [np.asarray(x).tolist() for x in result['orders']],
                                  'ranks': np.asarray(result['ranks']).tolist()})
  return result


def _rank_all(config, workdir, inter, split, user_profiles, tokenizer, mesh, parts: epath.Path) -> None:
  builder = prompts.PromptBuilder(variant_config(config, 'palr_v2'), inter, tokenizer)
  v1_builder = prompts.PromptBuilder(variant_config(config, 'palr_v1'), inter, tokenizer)
  users = eval_users(len(inter.user_ids), config)
  cands = {which: {int(r['user_index']): r for r in stages.read_jsonl(workdir / 'candidates' / f'{which}.jsonl')}
           for which in ('valid', 'test')}
  out = {'users': users.tolist(), 'num_users': len(inter.user_ids), 'methods': {}}

  def record(method, which, result, extra=None):
    entry = out['methods'].setdefault(method, {})
    entry[which] = {'ranks': result['ranks'].tolist(), 'targets': result['targets'].tolist(),
                    'items': [s[o].tolist() + s[np.setdiff1d(np.arange(len(s)), o)].tolist()
                              for s, o in zip(result['items'], result['orders'])]}
    entry.update(extra or {})

  for which in ('valid', 'test'):
    rows = [cands[which][int(u)] for u in users]
    out['methods'].setdefault('retriever', {})[which] = {
        'ranks': [float(r['target_rank']) for r in rows], 'targets': [int(r['target']) for r in rows],
        'items': [r['items'] for r in rows]}

  base, _, _ = _load(config, mesh)
  for which in ('valid', 'test'):
    record('zero_shot', which, _rank_part(parts, f'zero_shot-{which}', lambda: _rank_split(
        config, base, builder, split, which, users, 'recommend_retrieval', config.rank.mode, user_profiles,
        cands[which], mesh)))
  del base

  for variant, task, mode, b in (('palr_v1', 'recommend', config.rank.v1_mode, v1_builder),
                                 ('palr_v2', 'recommend_retrieval', config.rank.mode, builder)):
    vconfig = variant_config(config, variant)
    model, _, _ = _load(vconfig, mesh, vconfig.lora, seed_name=f'{variant}-lora')
    model.eval()
    steps = checkpoints.checkpoint_steps(workdir / variant)
    if not steps:
      raise FileNotFoundError(f'{workdir / variant}/checkpoints: no checkpoint to rank with')
    best, by_step = None, {}

    def ranked(which, step):
      def compute():
        checkpoints.apply_trained_adapter(model, workdir / variant, step=step)
        return _rank_split(vconfig, model, b, split, which, users, task, mode, user_profiles, cands[which], mesh)
      return _rank_part(parts, f'{variant}-{which}-{step}', compute)

    for step in steps:  # the checkpoint with the best valid HR@10
      valid = ranked('valid', step)
      by_step[step] = float(np.mean(valid['ranks'] < 10))
      logging.info('%s step %d: valid HR@10 %.4f', variant, step, by_step[step])
      if best is None or by_step[step] > by_step[best[0]]:
        best = (step, valid)
    step, valid = best
    test = ranked('test', step)
    record(variant, 'valid', valid, {'checkpoint_step': step, 'valid_hr10_by_step': by_step})
    record(variant, 'test', test)
    del model
  stages.atomic_write_json(workdir / 'rankings.json', out)
  shutil.rmtree(parts.parent, ignore_errors=True)  # rankings.json holds it all now


def _evaluate(config, workdir, inter, ks) -> None:
  rankings = json.loads((workdir / 'rankings.json').read_text())
  users = np.asarray(rankings['users'])
  results = {'dataset': inter.name, 'ks': ks, 'methods': list(rankings['methods']),
             'checkpoint_steps': {m: v.get('checkpoint_step') for m, v in rankings['methods'].items()
                                  if v.get('checkpoint_step') is not None}}
  if len(users) < rankings['num_users']:
    results['users_note'] = (f'Evaluated on a seeded subset of {len(users)} of {rankings["num_users"]} users '
                             f'(config.eval.max_users = {config.eval.max_users}, seed {config.seed}).')
  else:
    results['users_note'] = f'Evaluated on all {len(users)} users.'
  for which in ('valid', 'test'):
    per_user = {m: evaluate.per_user_metrics(np.asarray(v[which]['ranks']), ks)
                for m, v in rankings['methods'].items()}
    results[which] = {'num_users': len(users),
                      **evaluate.compare(per_user, ks, int(config.eval.bootstrap_samples), int(config.seed)),
                      'reordering': evaluate.reordering(
                          {m: v[which]['items'] for m, v in rankings['methods'].items()},
                          rankings['methods']['retriever'][which]['targets'])}
  stages.atomic_write_json(workdir / 'results.json', results)
  stages.atomic_write_text(workdir / 'results.md', evaluate.markdown_report(results, ks))

  final = 'palr_v2'
  test = rankings['methods'][final]['test']
  stages.atomic_write_jsonl(workdir / 'predictions' / 'test.jsonl', [
      {'user': str(inter.user_ids[u]), 'user_index': int(u), 'target': int(t),
       'target_id': str(inter.item_ids[t]), 'rank': r, 'ranked_items': items,
       'ranked_item_ids': [str(inter.item_ids[i]) for i in items]}
      for u, t, r, items in zip(users.tolist(), test['targets'], test['ranks'], test['items'])])
  evaluate.plot_hr_at_k(results, ks, workdir / 'plots' / 'hr_at_k.png')
  evaluate.plot_losses({v: read_losses(workdir / v / 'tensorboard') for v in VARIANT_TASKS},
                       workdir / 'plots' / 'loss.png')


def read_losses(logdir: epath.Path) -> dict[str, list[tuple[int, float]]]:
  """{'train': [(step, loss)], 'valid': [(step, loss)]} from the trainer's TensorBoard event files."""
  from tensorboard.backend.event_processing import event_file_loader
  curves = {'train': {}, 'valid': {}}
  for path in sorted(logdir.glob('events.out.tfevents.*')):
    for event in event_file_loader.EventFileLoader(str(path)).Load():
      for value in event.summary.value:
        kind = {'train/loss': 'train', 'valid/loss': 'valid'}.get(value.tag)
        if kind:
          number = value.simple_value if value.HasField('simple_value') else float(value.tensor.float_val[0])
          curves[kind][int(event.step)] = number  # a resumed run rewrites its steps: keep the last
  return {k: sorted(v.items()) for k, v in curves.items()}


def _export(config, workdir) -> None:
  from palr_jax import export
  rankings = json.loads((workdir / 'rankings.json').read_text())
  step = rankings['methods']['palr_v2'].get('checkpoint_step')
  for fmt in ('merged', 'peft'):
    export.export(config.model, str(workdir / 'export' / fmt), fmt, workdir=str(workdir / 'palr_v2'), step=step)


# ------------------------------------------------------------------------------------ CLI


_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file path.py[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where every stage writes its outputs.')
_SHARED = flags.DEFINE_string('shared_dir', None, 'Stage outputs shared by fingerprint (sweeps).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  distributed.initialize_from_flags()
  start = time.perf_counter()
  results = run(_CONFIG.value, _WORKDIR.value, _SHARED.value)
  print(epath.Path(_WORKDIR.value, 'results.md').read_text())
  logging.info('done in %.0f s: %s', time.perf_counter() - start, _WORKDIR.value)
  del results


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
