"""Stage `report`: HR@K / NDCG@K of every method with paired-bootstrap intervals -> results.json, results.md,
predictions/test.jsonl, test_predictions.jsonl, plots/.

`test_predictions.jsonl` is the evidence: one line per (user, method), `{"user": raw user id, "method",
"ranked_item_ids": [raw item ids]}` for every method of the report (`retriever`: its top K; each LLM method
and fused row under its own name; `palr`: the LLM method chosen on valid), from which `python -m
palr_jax.tools.recompute` recomputes every test HR@K / NDCG@K from the raw data.

Processes: host (process 0 evaluates and writes; seconds of CPU).
"""
from __future__ import annotations

from collections.abc import Sequence
import io

from etils import epath
import numpy as np

from palr_jax import files
from palr_jax import metrics
from palr_jax import variants
from palr_jax.stages import base
from palr_jax.stages import rank
from palr_jax.train import progress

FUSED = '+fusion'
EVIDENCE = 'test_predictions.jsonl'
PALR = 'palr'  # the method name, in the evidence, of the LLM method chosen on valid
OUTPUTS = ('results.json', 'results.md', 'predictions/test.jsonl', EVIDENCE, 'plots/hr_at_k.png',
           'plots/loss.png')


def declare(config) -> base.Stage:
  return base.Stage(
      name='report', run=run, hashes=('seed', 'eval', 'export.variant'),
      upstream=('rank', *(f'finetune_{v}' for v in variants.trained_variants(config))), outputs=OUTPUTS,
      processes=base.HOST,
      per_process='process 0 computes the metrics and writes the report, predictions and plots; the others wait')


def run(ctx) -> None:
  config, workdir, inter = ctx.config, ctx.workdir, ctx.inter
  ks = [int(k) for k in config.eval.ks]
  rankings = files.read_json(workdir / 'rankings.json')
  users = np.asarray(rankings['users'])
  results = {'dataset': inter.name, 'ks': ks, 'methods': list(rankings['methods']),
             'checkpoint_steps': {m: v.get('checkpoint_step') for m, v in rankings['methods'].items()
                                  if v.get('checkpoint_step') is not None}}
  if len(users) < rankings['num_users']:
    results['users_note'] = (f'Evaluated on a seeded subset of {len(users)} of {rankings["num_users"]} users '
                             f'(config.eval.max_users = {config.eval.max_users}, seed {config.seed}).')
  else:
    results['users_note'] = f'Evaluated on all {len(users)} users.'
  methods = dict(rankings['methods'])
  results['fusion'] = fused_methods(config, methods)
  results['methods'] = list(methods)
  results['palr'] = chosen_on_valid(config, methods)
  for which in rank.SPLITS:
    per_user = {m: metrics.per_user_metrics(np.asarray(v[which]['ranks']), ks) for m, v in methods.items()}
    results[which] = {'num_users': len(users),
                      **metrics.compare(per_user, ks, int(config.eval.bootstrap_samples), int(config.seed)),
                      'reordering': metrics.reordering(
                          {m: v[which]['items'] for m, v in methods.items()},
                          methods['retriever'][which]['targets'],
                          ranks={m: v[which]['ranks'] for m, v in methods.items()})}
  files.atomic_write_json(workdir / 'results.json', results)
  # The fingerprint says which config, inputs and upstream outputs these numbers come from (the run's time
  # stays out: a report rerun on the same inputs writes the same bytes).
  files.atomic_write_text(workdir / 'results.md', markdown_report(results, ks, ctx.fingerprint))

  final = next((m for m in (f'{config.export.variant}{FUSED}', config.export.variant) if m in methods),
               'retriever')
  test = methods[final]['test']
  files.atomic_write_jsonl(workdir / 'predictions' / 'test.jsonl', [
      {'user': str(inter.user_ids[u]), 'user_index': int(u), 'target': int(t),
       'target_id': str(inter.item_ids[t]), 'rank': r, 'method': final, 'ranked_items': items,
       'ranked_item_ids': [str(inter.item_ids[i]) for i in items]}
      for u, t, r, items in zip(users.tolist(), test['targets'], test['ranks'], test['items'])])
  files.atomic_write_jsonl(workdir / EVIDENCE, evidence_rows(methods, results['palr'], users, inter))
  files.atomic_write_bytes(workdir / 'plots' / 'hr_at_k.png', plot_hr_at_k(results, ks))
  files.atomic_write_bytes(workdir / 'plots' / 'loss.png', plot_losses(
      {v: read_losses(workdir / v / 'tensorboard') for v in variants.trained_variants(config)}))


def fused_methods(config, methods: dict) -> dict:
  """Adds `<method>+fusion` to `methods` for each LLM method that scored the candidates: z(retriever score)
  + b z(LLM score), b chosen on valid (`config.eval.fusion_weights`, best `config.eval.fusion_metric`)
  and carried to test. Returns {method: {'weight': b, 'valid_by_weight': {b: metric}}}."""
  weights = tuple(float(w) for w in config.eval.fusion_weights)
  retriever = methods['retriever']
  chosen = {}
  for method in [m for m in methods if m in config.variants]:
    if not weights or 'scores' not in methods[method]['valid']:
      continue
    best, by_weight = metrics.choose_fusion_weight(retriever['valid'], methods[method]['valid'], weights,
                                                   config.eval.fusion_metric)
    methods[f'{method}{FUSED}'] = {which: metrics.fuse(retriever[which], methods[method][which], best)
                                   for which in rank.SPLITS}
    chosen[method] = {'weight': best, 'valid_by_weight': by_weight}
  return chosen


def chosen_on_valid(config, methods: dict) -> dict | None:
  """The LLM method (a variant or its fused row) with the best valid `config.eval.fusion_metric` (the
  first of equals, in report order): {'method', 'metric', 'valid'}; None without LLM methods."""
  metric = str(config.eval.fusion_metric)
  k = int(metric.split('@')[1])
  scores = {m: metrics.metrics_from_ranks(v['valid']['ranks'], [k])[metric] for m, v in methods.items()
            if m.removesuffix(FUSED) in config.variants}
  if not scores:
    return None
  best = max(scores, key=lambda m: (scores[m], -list(scores).index(m)))
  return {'method': best, 'metric': metric, 'valid': scores[best]}


def evidence_order(items: Sequence[int], target: int, rank: float) -> list[int]:
  """`items` with the target moved to its counted rank where the two differ (a method's rank counts
  ties against the target, its order keeps the retriever's order among equals), so that the target's
  place in the written list is the rank the metrics used."""
  items = [int(i) for i in items]
  if target in items and rank < len(items) and items.index(target) != int(rank):
    items.remove(target)
    items.insert(int(rank), target)
  return items


def evidence_rows(methods: dict, palr: dict | None, users: np.ndarray, inter) -> list[dict]:
  """The lines of `test_predictions.jsonl`: every method's test list per user, raw ids, plus `palr`."""
  named = [(m, m) for m in methods] + ([(PALR, palr['method'])] if palr else [])
  out = []
  for name, method in named:
    test = methods[method]['test']
    for u, t, r, items in zip(users.tolist(), test['targets'], test['ranks'], test['items']):
      out.append({'user': str(inter.user_ids[u]), 'method': name,
                  'ranked_item_ids': [str(inter.item_ids[i]) for i in evidence_order(items, int(t), r)]})
  return out


def read_losses(logdir: epath.Path) -> dict[str, list[tuple[int, float]]]:
  """{'train': [(step, loss)], 'valid': [(step, loss)]} from the trainer's TensorBoard event files."""
  paths = sorted(epath.Path(logdir).glob('events.out.tfevents.*'))
  return {kind: sorted(progress.scalars(paths, f'{kind}/loss').items()) for kind in ('train', 'valid')}


def markdown_report(results: dict, ks: Sequence[int], fingerprint: str = '') -> str:
  """results.md: one table per split, then each method's difference from the retriever with its
  95% paired-bootstrap interval (an interval that excludes 0 is a difference beyond sampling noise)."""
  lines = ['# PALR results', '']
  if fingerprint:
    lines += [f'Report fingerprint `{fingerprint}` (W/report.fingerprint.json names the run that wrote it).', '']
  if results.get('users_note'):
    lines += [results['users_note'], '']
  lines += ['Rows: `retriever` is what the LLM reranks (its first K items are the candidates); a row named '
            'after the MF model (`ials`, `bpr`) is that model alone, without the transitions fused into the '
            'retriever; each LLM method orders the candidates alone; `<method>+fusion` adds the retriever '
            'back, z(retriever score) + b z(LLM score), b chosen on valid. The LLM\'s own contribution is '
            '`<method>+fusion` against `retriever`. Ranks count ties against the target.', '']
  for method, f in (results.get('fusion') or {}).items():
    lines.append(f'- {method}{FUSED}: b = {f["weight"]:g}, chosen on valid from ' + ', '.join(
        f'{w}: {v:.4f}' for w, v in f['valid_by_weight'].items()))
  if results.get('fusion'):
    lines.append('')
  names = [f'{m}@{k}' for k in ks for m in ('HR', 'NDCG')]
  for split in ('valid', 'test'):
    if split not in results:
      continue
    block = results[split]
    lines += [f'## {split} ({block["num_users"]} users)', '',
              '| method | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
    for method, values in block['metrics'].items():
      lines.append(f'| {method} | ' + ' | '.join(f'{values[n]:.4f}' for n in names) + ' |')
    if block['vs_retriever']:
      lines += ['', 'Difference from the retriever, mean [95% paired-bootstrap interval]:', '',
                '| method | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
      for method, diffs in block['vs_retriever'].items():
        cells = [f'{d["mean_diff"]:+.4f} [{d["low"]:+.4f}, {d["high"]:+.4f}]'
                 for d in (diffs[n] for n in names)]
        lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    if block.get('reordering'):
      ro = block['reordering']
      cols = list(next(iter(ro['methods'].values())))
      lines += ['', f'How each method orders the retriever\'s {ro["candidates"]} candidates (the target is '
                f'among them for {ro["target_in_candidates"]:.1%} of users, which caps every reranker):', '',
                '| method | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
      for method, vals in ro['methods'].items():
        lines.append(f'| {method} | ' + ' | '.join(f'{vals[c]:.4f}' for c in cols) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot_hr_at_k(results: dict, ks: Sequence[int], split: str = 'test') -> bytes:
  """PNG: HR@K against K, one line per method."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for method, values in results[split]['metrics'].items():
    ax.plot(list(ks), [values[f'HR@{k}'] for k in ks], marker='o', label=method)
  ax.set_xlabel('K')
  ax.set_ylabel(f'HR@K ({split})')
  ax.set_xscale('log')
  ax.set_xticks(list(ks), [str(k) for k in ks])
  ax.grid(alpha=0.3)
  ax.legend()
  return _png(fig)


def plot_losses(curves: dict[str, dict[str, list]]) -> bytes:
  """PNG: training and validation loss per fine-tuned model: curves[name] = {'train': [(step, loss)],
  'valid': [(step, loss)]}."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, curve in curves.items():
    for kind, style in (('train', '-'), ('valid', 'o--')):
      points = curve.get(kind) or []
      if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, style, label=f'{name} {kind}')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (response tokens)')
  ax.grid(alpha=0.3)
  ax.legend()
  return _png(fig)


def _png(fig) -> bytes:
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format='png', dpi=120)
  plt.close(fig)
  return buf.getvalue()
