"""Stages `finetune_<variant>`: the variant's PALR instruction examples, then LoRA fine-tuning on the mesh.

One stage per variant of `config.variants` that has training tasks (PALR v1: Recommend; v2: Recommend and
Recommend_Retrieval). Writes, under `W/<variant>/`: `checkpoints/` (orbax: adapters, optimizer state,
data-iterator state, config), `tensorboard/`, and `adapters/step_<N>/`, each kept checkpoint's adapters
as a PEFT folder (what ranking, export and the tools read); the tokenized examples go to
`W/examples/<examples fingerprint>/`, shared by every run that would build the same ones.

Processes: collective. Process 0 builds and writes the examples once while the others wait; then every
process feeds its rows of each global batch to the jitted step on the global mesh.

Training state belongs to its fingerprint: `W/<variant>/run.json` names the fingerprint the checkpoints
were written under, and when it differs (any training option, the examples, the base model changed) the
old checkpoints are cleared, with a log line, instead of resumed. A run stopped by SIGTERM saves, and the
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
from palr_jax.model import item_tokens
from palr_jax.stages import base
from palr_jax.stages import retriever
from palr_jax.train import checkpointing
from palr_jax.train import loop

# Collaborative item tokens (palr_jax/model/item_tokens.py), hashed only for a variant that sets them.
ITEM_TOKEN_KEYS = ('item_tokens', 'item_token_curriculum_steps', 'item_projector_hidden')
HASHES = ('seed', 'prompts', 'retriever.num_candidates', 'model.spec', 'model.dtype', 'model.param_dtype',
          'model.remat', 'model.attention', 'lora', 'train', 'batching', 'mesh')


def declare(config) -> list[base.Stage]:
  return [base.Stage(
      name=f'finetune_{variant}', run=functools.partial(run, variant=variant),
      hashes=HASHES + (f'variants.{variant}.tasks', f'variants.{variant}.task_repeats') + (
          (f'variants.{variant}.retrieval_loss',) if 'recommend_retrieval' in config.variants[variant].tasks
          else ()) + tuple(f'variants.{variant}.{k}' for k in ITEM_TOKEN_KEYS if k in config.variants[variant]),
      upstream=('retriever', 'profiles'),
      outputs=(f'{variant}/checkpoints', f'{variant}/{checkpointing.ADAPTERS}', f'{variant}/tensorboard'),
      processes=base.COLLECTIVE, scratch=('examples', f'{variant}/run.json'),
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
  _bind_to_fingerprint(run_dir, ctx.fingerprint)
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
  result = loop.train(config, run_dir, model, train_batches, valid_batches, choice_ids=choice_ids,
                      item_curriculum_steps=int(config.variants[variant].get('item_token_curriculum_steps', 0)))
  logging.info('%s: trained to step %d in %.1f s', variant, result['step'], time.perf_counter() - start)
  if result['step'] < config.train.num_steps:
    raise distributed.Preempted(f'{variant}: training stopped at step {result["step"]} of '
                                f'{config.train.num_steps} (checkpoint saved)')
  start = time.perf_counter()
  checkpointing.write_adapters(run_dir, model, config.lora, str(ctx.hf_folder), meta.get('item_token_id'))
  logging.info('%s: adapters written in %.1f s', variant, time.perf_counter() - start)


def _bind_to_fingerprint(run_dir, fingerprint: str) -> None:
  """Clears checkpoints written under another fingerprint, so a changed option never resumes them."""
  record = run_dir / 'run.json'
  if distributed.is_leader():
    try:
      old = files.read_json(record).get('fingerprint') if record.exists() else None
    except (ValueError, AttributeError):  # damaged: treat as another fingerprint
      old = 'unreadable'
    if old != fingerprint:
      if old is not None or (run_dir / 'checkpoints').exists():
        logging.warning('%s: written under fingerprint %s, this run is %s: clearing its checkpoints, '
                        'adapters and TensorBoard events', run_dir, old, fingerprint)
        for name in ('checkpoints', checkpointing.ADAPTERS, 'tensorboard'):
          if (run_dir / name).exists():
            (run_dir / name).rmtree()
      files.atomic_write_json(record, {'fingerprint': fingerprint})
  distributed.barrier(f'bind-{run_dir.name}')
