"""Stage `rank`: each LLM method reranks the retriever's candidates of the evaluation users -> rankings.json.

The methods are the variants named in `config.eval.methods`: the base model (zero-shot) or a fine-tuned
variant, each ranking with the prompt of its `rank_task` by its `rank_mode` (`rank_users`). A tuned
variant is evaluated on test with the kept checkpoint that has the best valid HR@10. The candidates the
LLM does not order keep the retriever's order, and a target the retriever missed keeps its retriever rank,
so every method's ranks are over the whole catalog minus the history. Ranks are pessimistic: a target
counts every candidate the LLM scored at least as high (`catalog_rank`), an unscored target every
candidate, so ties (an untrained model's, generation's arbitrary choices) never put it ahead.

Processes: sharded. The evaluation users are dealt to the processes; each ranks its share on its own
devices (the host-local mesh: the model is loaded per host, no collective crosses hosts, a slow host
delays only the final barrier) and writes one part file per (method, split, checkpoint) under
`W/rank_parts/<fingerprint>/`. Choosing a variant's checkpoint needs every process's valid ranks, so the
processes meet at a barrier between valid and test. Process 0 then joins the parts into
`W/rankings.json` and removes them. A killed stage resumes at the first part this process had not written;
a damaged part is redone.

`W/rankings.json`: {"users": [u...], "num_users": N, "methods": {method: {"valid"|"test": {"ranks",
"targets", "items", "scores"}, "checkpoint_step", "valid_hr10_by_step"}}}; `items` is each user's
candidate list as the method ordered it, `scores` the retriever's or the LLM's score of each candidate in
the retriever's order (what the report fuses). With transitions fused into the retriever, the MF model
alone is a method too (its own top K as `items`, no scores).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from palr_jax import adapters
from palr_jax import distributed
from palr_jax import files
from palr_jax import rng
from palr_jax import variants
from palr_jax.data import prompts
from palr_jax.hub import load
from palr_jax.model import rerank
from palr_jax import score_head
from palr_jax.stages import base
from palr_jax.stages import retriever
from palr_jax.train import checkpointing
from palr_jax.train import progress

SPLITS = ('valid', 'test')
PARTS = 'rank_parts'
PART_KEYS = ('users', 'targets', 'items', 'ranks', 'scores')  # what a part file holds, per user


def llm_methods(config) -> list[str]:
  """The LLM methods to evaluate: `config.eval.methods` other than the retriever, each a variant."""
  out = [m for m in config.eval.methods if m != 'retriever']
  unknown = [m for m in out if m not in config.variants]
  if unknown:
    raise ValueError(f'config.eval.methods: {unknown} are not variants (config.variants: '
                     f'{list(config.variants)}) or "retriever"')
  return out


def declare(config) -> base.Stage:
  methods = llm_methods(config)
  trained = [m for m in methods if tuple(config.variants[m].tasks)]
  return base.Stage(
      name='rank', run=run, merge=merge,
      hashes=('seed', 'eval.max_users', 'eval.methods', 'rank', 'prompts', 'retriever.num_candidates',
              'model.spec', 'model.dtype', 'model.param_dtype', 'batching.length_buckets',
              *(f'variants.{m}' for m in methods)),
      upstream=('retriever', 'profiles', *(f'finetune_{m}' for m in trained)), outputs=('rankings.json',),
      processes=base.SHARDED, scratch=(PARTS,), resumes=resumes,
      inputs=tuple(load.model_files(config.model.spec)),
      per_process='every process ranks its share of the evaluation users on its host-local mesh (adapters from '
           'their PEFT folders) and writes part files; process 0 joins them into rankings.json')


def resumes(ctx) -> str | None:
  folder = ctx.workdir / PARTS / ctx.fingerprint
  done = sorted({p.name.split('.p')[0] for p in folder.glob('*.json')}) if folder.exists() else []
  return f'with {len(done)} (method, split, checkpoint) rankings already written: {", ".join(done)}' if done else None


def eval_users(num_users: int, config) -> np.ndarray:
  """All users, or a seeded subset of `config.eval.max_users` (sorted), the same for every method."""
  n = int(config.eval.max_users)
  if n <= 0 or n >= num_users:
    return np.arange(num_users)
  return np.sort(rng.numpy_rng(config.seed, 'eval_users').choice(num_users, n, replace=False))


# ------------------------------------------------------------------------------------ ranking


def rank_users(model, builder: prompts.PromptBuilder, examples: Sequence[prompts.Example], mode: str, config,
               placement, advance: Callable[[int], None] | None = None) -> list[np.ndarray]:
  """For each example, the LLM's score of each of its `candidates` (float [K], higher is better; -inf for
  a candidate it did not rank): the tag's log-probability (score), the answer's log-likelihood
  (likelihood), or minus the position it was written at (generate, at most `rank.max_items` written;
  tied choices share a score, `rerank.generate_scores`). `order_from_scores` turns them into orders;
  `advance(n)` is called as batches of n examples finish."""
  c = config.rank
  ranking_prompts = [builder.ranking_prompt(e) for e in examples]
  common = dict(batch_size=int(c.batch_size), buckets=tuple(config.batching.length_buckets),
                placement=placement, progress=advance)
  hybrid = builder.item_token_id is not None   # collaborative item tokens: the items at the placeholders
  if hybrid and mode != 'score':
    raise ValueError(f"rank_mode {mode!r}: a variant with item_tokens ranks in 'score' mode only")
  if mode in ('score', 'residual'):  # residual: the head is applied per user in rank_split
    if any(e.task != 'recommend_retrieval' for e in examples):
      raise ValueError(f"rank_mode {mode!r} reads the candidates' tags: it needs rank_task "
                       "'recommend_retrieval'")
    tags = [builder.tag_ids[:len(e.candidates)] for e in examples]
    items = [np.concatenate([e.item_ids[:e.prompt_length], np.full(len(p) - e.prompt_length, -1, np.int32)])
             for e, p in zip(examples, ranking_prompts)] if hybrid else None
    scores = rerank.score_tags(model, ranking_prompts, tags, item_ids=items, **common)
  elif mode == 'generate':  # generation stops items by the trie: the answers' content is enough
    answers = [builder.candidate_answers(e, end_of_turn=False) for e in examples]
    scores = rerank.generate_scores(model, ranking_prompts, answers, separator=builder.encode_text(c.separator),
                                    max_items=int(c.max_items), **common)
  elif mode == 'likelihood':  # whole answers, end-of-turn included: a title that is a prefix of another
    answers = [builder.candidate_answers(e, end_of_turn=True) for e in examples]  # gains nothing
    scores = rerank.score_continuations(model, ranking_prompts, answers, reduce=c.reduce, **common)
  else:
    raise ValueError(f'rank_mode: expected one of {variants.RANK_MODES}, got {mode!r}')
  return [np.asarray(row[:len(e.candidates)], np.float64) for row, e in zip(scores, examples)]


def mean_over_orders(runs: Sequence[tuple[Sequence[prompts.Example], Sequence[np.ndarray]]]) -> list[np.ndarray]:
  """Each candidate's score averaged over the runs [(examples, rank_users' scores)], the same users in each
  run with their candidates in another order, aligned to the first run's order (`config.rank.orders`:
  a tag's log-probability then says less about where it was shown)."""
  first = runs[0][0]
  out = []
  for n, example in enumerate(first):
    by_item = [dict(zip(examples[n].candidates, np.asarray(scores[n]).tolist())) for examples, scores in runs]
    if any(set(d) != set(example.candidates) for d in by_item):
      raise ValueError(f'rank: user {example.user} was shown other candidates in another order')
    out.append(np.mean([[d[i] for i in example.candidates] for d in by_item], axis=0))
  return out


def catalog_rank(ranked: Sequence[int], target: int, retriever_rank: int,
                 scores: dict[int, float] | None = None) -> int:
  """0-based rank of the target over the catalog. Among the candidates `ranked`: with the LLM's `scores`
  (item -> score, -inf or absent = none), the number of other candidates scoring at least the target's
  (ties count against it; an unscored target ties with every unscored candidate, so it ranks last);
  without, its place in `ranked`. When the retriever missed it: its retriever rank (items before it: the K
  candidates, then the same others)."""
  ranked = list(ranked)
  if target in ranked:
    if scores is None:
      return ranked.index(target)
    row = np.asarray([scores.get(i, -np.inf) for i in ranked], np.float64)
    return rerank.pessimistic_rank(row, ranked.index(target))
  if retriever_rank < len(ranked):
    raise ValueError(f'rank: target {target} has retriever rank {retriever_rank} < {len(ranked)} but is '
                     f'not among the candidates {ranked}')
  return int(retriever_rank)


def rank_split(ctx, model, builder, which: str, users: np.ndarray, mode: str,
               advance: Callable[[float], None] | None = None, head: tuple[float, float] = (0.0, 1.0)) -> dict:
  """Ranks `users`' candidates of split `which`: {'users', 'targets', 'items' (each user's candidates as
  the LLM ordered them), 'ranks' (over the catalog), 'scores' (the LLM's score of each candidate in the
  retriever's order, None where it gave none)}. `advance(n)`: n more users ranked (a fraction per
  candidate order when `rank.orders` > 1). Mode 'residual' scores `gate * tag score + scale *
  z(retriever score)` with `head` = (gate, scale); equals keep the retriever's order."""
  rows = _candidate_rows(ctx, which)
  candidates = prompts.read_candidates(ctx.workdir / 'candidates' / f'{which}.jsonl', ctx.split, which)
  orders = int(ctx.config.rank.orders) if mode in ('score', 'residual') else 1
  profiles, user_list, runs = ctx.profiles(), [int(u) for u in users], []
  for order in range(orders):
    examples = prompts.build_examples(builder, ctx.split, which, profiles, candidates, users=user_list,
                                      insert_target=False, order=order)
    per_order = advance if advance is None or orders == 1 else (lambda n: advance(n / orders))
    runs.append((examples, rank_users(model, builder, examples, mode, ctx.config, ctx.placement, per_order)))
  examples, llm_scores = runs[0][0], mean_over_orders(runs)
  items, ranks, scores = [], [], []
  for e, row_scores, u in zip(examples, llm_scores, users):
    row = rows[int(u)]
    if mode == 'residual':
      row_scores, e = residual_row(row, e, row_scores, head)
      chosen = list(row['items'])  # the candidates in the retriever's order
      chosen = [chosen[j] for j in score_head.retriever_consistent_order(row_scores, np.arange(len(chosen)))]
    else:
      chosen = [e.candidates[j] for j in rerank.order_from_scores(row_scores[None])[0]]
    ranked = chosen + [i for i in row['items'] if i not in set(chosen)]
    items.append(ranked)
    by_item = dict(zip(e.candidates, row_scores.tolist()))
    ranks.append(catalog_rank(ranked, e.target, int(row['target_rank']), by_item))
    scores.append([by_item[i] if np.isfinite(by_item.get(i, -np.inf)) else None for i in row['items']])
  return {'users': [int(u) for u in users], 'targets': [e.target for e in examples], 'items': items,
          'ranks': ranks, 'scores': scores}


def residual_row(row: dict, example, tag_scores: np.ndarray, head: tuple[float, float]):
  """(scores of the retriever's candidates in its order through the head, the example with its candidates
  in that order): z is the retriever's score standardized over the user's candidates."""
  items = list(row['items'])
  by_item = dict(zip(example.candidates, np.asarray(tag_scores, np.float64).tolist()))
  if set(by_item) != set(items):
    raise ValueError(f"rank: user {example.user}: the prompt's candidates are not the retriever's {items}")
  z = score_head.standardize(row['scores'])
  scores = score_head.residual_scores(np.array([by_item[i] for i in items]), z, *head)
  return scores, dataclasses.replace(example, candidates=tuple(items))


def _candidate_rows(ctx, which: str) -> dict[int, dict]:
  return {int(r['user_index']): r for r in files.read_jsonl(ctx.workdir / 'candidates' / f'{which}.jsonl')}


def _part(ctx, name: str, process: int | None = None) -> epath.Path:
  process = jax.process_index() if process is None else process
  return ctx.workdir / PARTS / ctx.fingerprint / f'{name}.p{process}of{jax.process_count()}.json'


def _ranked_part(ctx, name: str, compute) -> dict:
  """`compute()`, kept as this process's part file `name`: a stage killed part-way (hours on all users of
  a CPU run) resumes at the first (method, split, checkpoint) it had not finished."""
  path = _part(ctx, name)
  if path.exists():
    try:
      part = files.read_json(path)
    except ValueError as e:  # cut short or overwritten by something else: redone, never trusted
      part = e
    if isinstance(part, dict) and all(isinstance(part.get(key), list) for key in PART_KEYS):
      return part
    logging.warning('%s: a damaged part file (%s); ranking it again', path,
                    part if isinstance(part, ValueError) else 'not the rows a part holds')
  result = compute()
  files.atomic_write_json(path, result)
  return result


def _joined(ctx, name: str) -> dict:
  """Every process's part `name`, joined in user order."""
  parts = [files.read_json(_part(ctx, name, p)) for p in range(jax.process_count())]
  joined = {key: [x for p in parts for x in p[key]] for key in PART_KEYS}
  order = np.argsort(joined['users'], kind='stable')
  return {key: [values[i] for i in order] for key, values in joined.items()}


def _steps(ctx, method: str) -> list[int | None]:
  if not tuple(ctx.config.variants[method].tasks):
    return [None]  # the base model
  steps = checkpointing.adapter_steps(ctx.workdir / method)
  if not steps:
    raise FileNotFoundError(f'{ctx.workdir / method}/{checkpointing.ADAPTERS}: no trained adapters to rank with')
  return steps


def _name(method: str, which: str, step: int | None) -> str:
  return f'{method}-{which}' if step is None else f'{method}-{which}-{step}'


def _best_step(ctx, method: str) -> tuple[int | None, dict[int, float]]:
  """The checkpoint with the best valid HR@10 over all processes' parts (the first of equals)."""
  by_step = {}
  for step in _steps(ctx, method):
    ranks = np.asarray(_joined(ctx, _name(method, 'valid', step))['ranks'], np.float64)
    by_step[step] = float(np.mean(ranks < 10))
  best = max(by_step, key=lambda s: (by_step[s], -(s or 0)))
  return best, by_step


def trained_head(ctx, method: str, step: int | None, mode: str) -> tuple[float, float]:
  """(gate, scale) of the residual head: read beside the PEFT adapter of checkpoint `step`
  (`score_head.safetensors`); the base model's is (0, 1), which ranks as the retriever."""
  if mode != 'residual' or step is None:
    return (0.0, 1.0)
  return score_head.load(checkpointing.adapter_dir(ctx.workdir / method, step))


def run(ctx) -> None:
  config = ctx.config
  mine = np.asarray(distributed.share(eval_users(len(ctx.inter.user_ids), config)), np.int64)
  for method in llm_methods(config):
    variant = config.variants[method]
    builder = prompts.PromptBuilder(config, ctx.inter, ctx.tokenizer, tasks=(variant.rank_task,),
                                    use_profile=prompts.variant_use_profile(config, method),
                                    item_tokens=bool(variant.get('item_tokens', False)))
    model = ctx.base_model(ctx.local_mesh)
    steps = _steps(ctx, method)

    def ranked(which, step, model=model, builder=builder, method=method, mode=variant.rank_mode):
      def compute():
        start = time.perf_counter()
        if step is not None:
          adapters.apply_trained_adapter(model, ctx.workdir / method, step, mesh=ctx.local_mesh,
                                              rules=config.mesh.rules)
        at = '' if step is None else f' (checkpoint {step})'
        with progress.bar(len(mine), f'rank {method} {which}{at}') as bar:
          out = rank_split(ctx, model, builder, which, mine, mode, bar.update,
                           head=trained_head(ctx, method, step, mode))
        logging.info('rank: %s %s (checkpoint %s, %s): %d users in %.1f s', method, which, step, mode,
                     len(mine), time.perf_counter() - start)
        return out
      return _ranked_part(ctx, _name(method, which, step), compute)

    for step in steps:
      ranked('valid', step)
    if len(steps) > 1:
      distributed.barrier(f'rank-{method}-valid')
    best, by_step = _best_step(ctx, method) if len(steps) > 1 else (steps[0], None)
    if by_step:
      logging.info('%s: valid HR@10 by checkpoint %s; test with step %d', method, by_step, best)
    ranked('test', best)


def merge(ctx) -> None:
  """Process 0: the parts -> rankings.json, with the retriever's own rows (and, when it fuses transitions,
  the MF model's alone); the parts go."""
  config = ctx.config
  users = eval_users(len(ctx.inter.user_ids), config)
  out = {'users': users.tolist(), 'num_users': len(ctx.inter.user_ids), 'methods': {}}
  baselines = files.read_json(ctx.workdir / retriever.BASELINES)
  for name, splits in baselines.items():  # the MF model alone, ranks over the catalog for all users
    out['methods'][name] = {which: {'ranks': [float(splits[which]['ranks'][u]) for u in users],
                                    'targets': [int(t) for t in getattr(ctx.split, which)[users]],
                                    'items': [splits[which]['items'][u] for u in users]} for which in SPLITS}
  out['methods']['retriever'] = {}
  for which in SPLITS:
    rows = _candidate_rows(ctx, which)
    picked = [rows[int(u)] for u in users]
    out['methods']['retriever'][which] = {'ranks': [float(r['target_rank']) for r in picked],
                                          'targets': [int(r['target']) for r in picked],
                                          'items': [r['items'] for r in picked],
                                          'scores': [r['scores'] for r in picked]}
  for method in llm_methods(config):
    steps = _steps(ctx, method)
    best, by_step = _best_step(ctx, method) if steps != [None] else (None, None)
    entry = out['methods'][method] = {}
    for which in SPLITS:
      part = _joined(ctx, _name(method, which, best))
      if part['users'] != users.tolist():
        raise RuntimeError(f'rank: the parts of {method} {which} cover users {part["users"][:5]}..., '
                           f'expected {users.tolist()[:5]}...')
      entry[which] = {'ranks': [float(r) for r in part['ranks']], 'targets': part['targets'],
                      'items': part['items'], 'scores': part['scores']}
    if best is not None:
      entry.update(checkpoint_step=best, valid_hr10_by_step={str(k): v for k, v in by_step.items()})
  files.atomic_write_json(ctx.workdir / 'rankings.json', out)
  (ctx.workdir / PARTS).rmtree()  # rankings.json holds it all now
