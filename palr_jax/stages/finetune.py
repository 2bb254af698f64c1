"""Stages `finetune_<variant>`: the variant's PALR instruction examples, then LoRA fine-tuning on the mesh.

One stage per variant of `config.variants` that has training tasks (PALR v1: Recommend; v2: Recommend and
Recommend_Retrieval). Writes, under `W/<variant>/`: `checkpoints/` (orbax: adapters, optimizer state,
data-iterator state, config), `tensorboard/`, and `adapters/step_<N>/`, each kept checkpoint's adapters
as a PEFT folder (what ranking, export and the tools read); the tokenized examples go to
`W/examples/<examples fingerprint>/`, shared by every run that would build the same ones.

Processes: collective. Process 0 builds and writes the examples once while the others wait; then every
process feeds its rows of each global batch to the jitted step on the global mesh.

Checkpoint choice: orbax keeps the latest and the best by `config.train.best_metric`; with
'valid_ndcg10', a variant that ranks by tag scores ranks a seeded sample of valid users' candidates at each
evaluation (`palr_jax/train/valid_rank.py`) and `train.early_stop_patience` may end training early (the
stage then completes normally). Test data is never read here.

Training state belongs to its fingerprint: `W/<variant>/run.json` names the fingerprint the checkpoints
were written under, and when it differs (any training option, the examples, the base model changed) the
old checkpoints, adapters and events are set aside in `W/<variant>/previous/` (not resumed), only once the
examples are written and the model is loaded, and deleted once the new adapters are written; the old
command run again before that takes them back. The mesh is not part of the fingerprint: a run resumes on
another process count or mesh shape, its checkpoint resharded onto the new mesh. A run stopped by SIGTERM
saves, and the
stage is not recorded as done: the job exits with `distributed.PREEMPTED_EXIT_CODE`, and the same
command resumes from the saved step.
"""
from __future__ import annotations

import functools
import time

from absl import logging
from flax import nnx

from palr_jax import distributed
from palr_jax import files
from palr_jax import rng
from palr_jax import sharding
from palr_jax import variants
from palr_jax.data import pipeline
from palr_jax.hub import load
from palr_jax.model import item_tokens
from palr_jax.stages import base
from palr_jax.stages import retriever
from palr_jax.train import checkpointing
from palr_jax.train import loop
from palr_jax.train import valid_rank

PREVIOUS = 'previous'  # another fingerprint's training state, set aside until this run is complete
STATE = ('checkpoints', checkpointing.ADAPTERS, 'tensorboard')
# Collaborative item tokens (palr_jax/model/item_tokens.py), hashed only for a variant that sets them.
ITEM_TOKEN_KEYS = ('item_tokens', 'item_token_curriculum_steps', 'item_projector_hidden')

# Not `mesh`: a checkpoint restores onto any mesh (orbax reshards), so a job resumed on another topology (a
# v5e-16 slice back as a v4-32, 1 -> 2 SLURM nodes) goes on from its checkpoint. The global batch
# (`train.batch_size`) and the data order (`seed`, `batching`) stay in: the same run needs both.
HASHES = ('seed', 'prompts', 'retriever.num_candidates', 'model.spec', 'model.dtype', 'model.param_dtype',
          'model.remat', 'model.attention', 'lora', 'train', 'batching')


def declare(config) -> list[base.Stage]:
  return [base.Stage(
      name=f'finetune_{variant}', run=functools.partial(run, variant=variant),
      hashes=HASHES + (f'variants.{variant}.tasks', f'variants.{variant}.task_repeats') + (
          (f'variants.{variant}.retrieval_loss',) if 'recommend_retrieval' in config.variants[variant].tasks
          else ()) + ((f'variants.{variant}.use_profile',)
                      if config.variants[variant].get('use_profile', None) is not None else ())
      + tuple(f'variants.{variant}.{k}' for k in ITEM_TOKEN_KEYS if k in config.variants[variant])
      + ((f'variants.{variant}.rank_task', f'variants.{variant}.rank_mode', 'rank.batch_size')   # the ranker
         if config.train.get('best_metric', 'valid_loss') == 'valid_ndcg10' else ()),
      upstream=('retriever', 'profiles'),
      outputs=(f'{variant}/checkpoints', f'{variant}/{checkpointing.ADAPTERS}', f'{variant}/tensorboard'),
      processes=base.COLLECTIVE, scratch=('examples', f'{variant}/run.json', f'{variant}/{PREVIOUS}'),
      inputs=tuple(load.model_files(config.model.spec)),
      resumes=functools.partial(resumes, variant=variant),
      per_process='process 0 writes the examples once; then every process feeds its rows of each global batch '
           'to the step on the global mesh; all write orbax checkpoints, process 0 the PEFT adapters')
      for variant in variants.trained_variants(config)]


def resumes(ctx, variant: str) -> str | None:
  """The checkpoint a killed training run restarts from (only one written under this fingerprint)."""
  run_dir = ctx.workdir / variant
  try:
    same = files.read_json(run_dir / 'run.json').get('fingerprint') == ctx.fingerprint
  except (FileNotFoundError, ValueError, AttributeError):
    return None
  folder = run_dir / 'checkpoints'  # listed, not opened with orbax: process 0 alone runs this
  steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if same and folder.exists() else []
  return f'training from its checkpoint at step {steps[-1]} of {ctx.config.train.num_steps}' if steps else None


def run(ctx, variant: str) -> None:
  config, workdir = ctx.config, ctx.workdir
  run_dir = workdir / variant
  upstream = [str(ctx.upstream[name]) for name in ('retriever', 'profiles')]
  fingerprint = pipeline.examples_fingerprint(config, variant, upstream)
  start = time.perf_counter()
  if distributed.is_leader():
    pipeline.build_and_write(config, workdir, ctx.inter, ctx.split, ctx.tokenizer, ctx.profiles(), variant,
                             upstream)
  distributed.barrier(f'examples-{variant}')
  logging.info('%s: examples ready in %.1f s', variant, time.perf_counter() - start)
  folder = pipeline.examples_dir(workdir, fingerprint)
  if folder is None:
    raise RuntimeError(f'{workdir}/examples/{fingerprint}: not written')

  mesh = ctx.mesh
  model = ctx.lora_model(mesh, config.lora, f'{variant}-lora')
  meta = files.read_json(folder / 'meta.json')
  if pipeline.item_tokens(config, variant):
    item_tokens.attach(model, item_tokens.read_factors(workdir / retriever.ITEM_FACTORS),
                       int(config.variants[variant].get('item_projector_hidden', 0)),
                       nnx.Rngs(params=rng.jax_key(int(config.seed), f'{variant}-projector')), mesh, config.mesh.rules)
  rows = sharding.process_rows(mesh, config.mesh.rules, int(config.train.batch_size))
  train_batches = pipeline.TrainBatches(folder / 'train.tfrecord', config, rows)
  valid_batches = pipeline.EvalBatches(folder / 'valid.tfrecord', config, rows, int(config.train.valid_batches))
  start = time.perf_counter()
  choice_ids = meta.get('choice_ids')  # used by tag-loss tokens only
  head_scale = meta.get('score_head_scale') if pipeline.writes_candidate_z(config, variant) else None
  if head_scale is not None:
    logging.info('%s: residual score head from gate 0, scale %.4f (fit on the train examples)', variant,
                 head_scale)
  # Only now, with the examples written and the model loaded, may another fingerprint's state be set aside.
  _bind_to_fingerprint(run_dir, ctx.fingerprint)
  ranker = _valid_ranker(ctx, variant, mesh)
  result = loop.train(config, run_dir, model, train_batches, valid_batches, choice_ids=choice_ids,
                      valid_rank=ranker, head_scale=head_scale,
                      item_curriculum_steps=int(config.variants[variant].get('item_token_curriculum_steps', 0)))
  logging.info('%s: trained to step %d in %.1f s%s', variant, result['step'], time.perf_counter() - start,
               ' (early stop)' if result.get('stopped_early') else '')
  # A SIGTERM agreed on for the last step (or later) still ends the job: the rerun finds the final
  # checkpoint and writes the adapters. A run that stopped early is finished (a rerun must not train on).
  if not result.get('stopped_early') and (result['step'] < config.train.num_steps
                                          or distributed.preemption_requested()):
    raise distributed.Preempted(f'{variant}: training stopped at step {result["step"]} of '
                                f'{config.train.num_steps} (checkpoint saved)')
  start = time.perf_counter()
  checkpointing.write_adapters(run_dir, model, config.lora, str(ctx.hf_folder), meta.get('item_token_id'))
  logging.info('%s: adapters written in %.1f s', variant, time.perf_counter() - start)
  if distributed.is_leader() and (run_dir / PREVIOUS).exists():
    (run_dir / PREVIOUS).rmtree()  # the new state is complete: the one set aside goes


def _move(src, dst) -> None:
  """A rename on a local disk; a copy, then a delete, on object stores (no folder renames there)."""
  if files.is_local(src):
    src.rename(dst)
    return
  files.copy_tree(src, dst)
  if src.is_dir():
    src.rmtree()
  else:
    src.unlink()


def _fingerprint_of(record) -> str | None:
  try:
    return files.read_json(record).get('fingerprint') if record.exists() else None
  except (ValueError, AttributeError):  # damaged: treat as another fingerprint
    return 'unreadable'


def _valid_ranker(ctx, variant: str, mesh):
  """The valid-sample ranker of `config.train.best_metric = 'valid_ndcg10'`, for a variant that ranks by
  tag scores after training on Recommend_Retrieval; None otherwise (the loop then keeps by valid loss)."""
  config = ctx.config
  v = config.variants[variant]
  if (config.train.best_metric != 'valid_ndcg10' or v.rank_mode != 'score'
      or v.rank_task != 'recommend_retrieval'):
    return None
  ranker = valid_rank.build(config, ctx.inter, ctx.split, ctx.tokenizer, ctx.profiles(),
                            ctx.workdir / 'candidates' / 'valid.jsonl', variant,
                            sharding.Placement(mesh, config.mesh.rules))
  logging.info('%s: checkpoints chosen on valid NDCG@10 of %d valid users\' candidates', variant, len(ranker))
  return ranker


def _bind_to_fingerprint(run_dir, fingerprint: str) -> None:
  """Makes `run_dir`'s training state the one of `fingerprint`, so a changed option never resumes another's.
  The state of another fingerprint is set aside in `PREVIOUS` (not deleted: it goes once the new run's
  adapters are written), and the state set aside for this fingerprint comes back: a changed option that
  fails in training, then the old command again, resumes the old state instead of training from scratch."""
  record = run_dir / 'run.json'
  if distributed.is_leader():
    old = _fingerprint_of(record)
    if old != fingerprint:
      aside = run_dir / PREVIOUS
      back = _fingerprint_of(aside / 'run.json') == fingerprint
      has_state = any((run_dir / name).exists() for name in STATE)
      if back:
        logging.warning('%s: written under fingerprint %s, this run is %s: its own state, set aside earlier, '
                        'comes back', run_dir, old, fingerprint)
        swap = run_dir / (PREVIOUS + '.swap')
        if swap.exists():
          swap.rmtree()
        _move(aside, swap)
        aside = swap
      if old is not None or has_state:
        if not back:
          logging.warning('%s: written under fingerprint %s, this run is %s: its checkpoints, adapters and '
                          'TensorBoard events are set aside in %s until this run has written its adapters',
                          run_dir, old, fingerprint, PREVIOUS)
        keep = run_dir / PREVIOUS
        if keep.exists():
          keep.rmtree()
        keep.mkdir(parents=True)
        for name in (*STATE, 'run.json'):
          if (run_dir / name).exists():
            _move(run_dir / name, keep / name)
      if back:
        for name in (*STATE, 'run.json'):
          if (aside / name).exists():
            _move(aside / name, run_dir / name)
        aside.rmtree()
      else:
        files.atomic_write_json(record, {'fingerprint': fingerprint})
  distributed.barrier(f'bind-{run_dir.name}')
