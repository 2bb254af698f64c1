"""The training loop: LoRA fine-tuning of the Llama on a device mesh, read top to bottom.

`train` builds the train state on the mesh (or restores the latest checkpoint, on whatever mesh the
config now asks for), runs the jitted step over this process's rows of each global batch, logs, evaluates,
checkpoints, and stops at `num_steps` or at a preemption.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import time

from absl import logging
from etils import epath
from flax import nnx
import jax
import numpy as np

from palr_jax import distributed
from palr_jax import sharding
from palr_jax import score_head
from palr_jax.train import checkpointing, progress
from palr_jax.train import valid_rank as valid_rank_lib
from palr_jax.train.step import (DataIterator, check_batch_layout, device_batch, evaluate, make_eval_step,
                                 setup, with_lora_values, with_shardings)


def train(config, workdir: epath.PathLike, model: nnx.Module, train_iter: DataIterator,
          valid_batches: Iterable[Mapping[str, np.ndarray]] | None = None, *,
          choice_ids: Sequence[int] | None = None,
          valid_rank: Callable[[nnx.Module], float] | None = None,
          head_scale: float | None = None, item_curriculum_steps: int = 0) -> dict[str, float]:
  """Trains `model`'s LoRA adapters per `config.train` on the mesh `config.mesh`; resumes from `workdir`.

  Writes WORKDIR/checkpoints and WORKDIR/tensorboard. On return the model holds the trained adapters
  and the result is the last logged scalars plus `step`, the step reached: `num_steps`, or less when a
  SIGTERM stopped training early (after saving a checkpoint there, from which the next call resumes).
  `valid_batches` is iterated afresh at every evaluation (a list or a tf.data.Dataset, not a one-shot
  iterator) and yields batches like `train_iter`; pad a short last batch with rows of segment_ids 0. Run
  under `distributed.initialize()` on a pod: every process calls `train` with its own `train_iter`.
  `choice_ids`: the candidates' tag tokens, among which loss tokens marked 2 (a tag) are classified.

  `valid_rank(model) -> NDCG@10` (`train.valid_rank.ValidRanker`): at every evaluation the model with the
  current adapters ranks a valid sample; `config.train.best_metric` ('valid_loss' | 'valid_ndcg10') is
  what orbax keeps the best checkpoints by, and with `config.train.early_stop_patience` = n > 0 training
  stops (saving there; the result has `stopped_early`) after n evaluations without improving on it.
  'valid_ndcg10' without a `valid_rank` (a variant that does not rank by tag scores) falls back to the
  valid loss, with a log line.
  `head_scale`: also train the residual score head (palr_jax/score_head.py) from gate 0 and this
  scale; its batches carry `candidate_z`, and the result holds its final `score_head.gate` / `.scale`.
  `item_curriculum_steps`: batches with `item_ids` are read text-only for that many steps (`make_train_step`).
  """
  c = config.train
  rules = config.mesh.rules
  mesh = sharding.make_mesh(config.mesh)
  check_batch_layout(c, mesh, rules)
  if c.checkpoint_every < 1 or c.log_every < 1:
    raise ValueError(f'config.train: checkpoint_every={c.checkpoint_every} and log_every={c.log_every} '
                     'must be >= 1')
  if valid_batches is not None and iter(valid_batches) is valid_batches:
    raise TypeError('train: valid_batches must be re-iterable (a list or a tf.data.Dataset), not an iterator')
  workdir = epath.Path(workdir)
  metric = valid_rank_lib.check_metric(c.get('best_metric', 'valid_loss'))
  if metric == 'valid_ndcg10' and valid_rank is None:
    logging.info('train: config.train.best_metric = valid_ndcg10 needs a ranking of valid candidates by tag '
                 'scores, which this run does not have: checkpoints kept by valid_loss')
    metric = 'valid_loss'
  patience = int(c.get('early_stop_patience', 0))
  if patience < 0:
    raise ValueError(f'config.train.early_stop_patience = {patience}: must be >= 0 (0 = off)')

  # Abstract state -> shardings -> state created in place on the mesh; the base is only laid out.
  laid = setup(model, c, mesh, rules, head_scale)
  parts, frozen, abstract, shardings = laid.parts, laid.frozen, laid.abstract, laid.shardings

  manager = checkpointing.checkpoint_manager(workdir / 'checkpoints', c, metric)
  start = manager.latest_step() or 0
  if start:
    try:
      state, data_state = checkpointing.restore_checkpoint(manager, start, with_shardings(abstract, shardings),
                                                           config)
    except BaseException:
      manager.close()  # its threads would otherwise print their own errors under this one
      raise
    train_iter.set_state(data_state)
    logging.info('train: resumed from step %d', start)
    evaluated = patience > 0 and c.eval_every and start % c.eval_every == 0   # a best kept for early stop
    if start % c.checkpoint_every and start != c.num_steps and not evaluated:
      # A preemption save, there only to resume from: gone once used, the run keeps (and ranking evaluates)
      # the checkpoints of an uninterrupted run. A hard kill before the next save replays from the last.
      manager.delete(start)
  else:
    state = laid.initial_state()

  choices = None if choice_ids is None else np.asarray(choice_ids, np.int32)
  train_step = laid.train_step(c, rules, config.seed, choices, item_curriculum_steps)
  eval_step = make_eval_step(parts, c, rules, choices)
  lora_params = sum(v.size for v in abstract['lora'].values())
  writer = progress.MetricWriter(workdir / 'tensorboard', c.num_steps, start)
  pending, timed_flops, timed_steps, clock = [], 0.0, 0, time.perf_counter()
  last = {'step': start}
  best, evals_since_best = None, 0   # early stopping counts this run's evaluations (not before a resume)
  # Log steps wait for the step's results: there, every process has started the step (its collectives).
  window = distributed.training_window(sync_every=c.log_every, last_step=c.num_steps)
  with jax.set_mesh(mesh), window:
    shapes = set()
    for step in range(start + 1, c.num_steps + 1):
      batch = device_batch(next(train_iter), mesh, rules, c)
      shape = batch['input_ids'].shape
      compiled_at = time.perf_counter()
      state, metrics = train_step(state, frozen, batch)
      pending.append(metrics)
      if shape not in shapes:  # a new shape compiles: say how long that step took
        shapes.add(shape)
        jax.block_until_ready(metrics)
        logging.info('train: step %d, batch %s: %.1f s (compiled for this shape)', step, shape,
                     time.perf_counter() - compiled_at)
      if step == start + 1:  # Compilation stays out of the throughput.
        jax.block_until_ready(metrics)
        clock = time.perf_counter()
      else:
        b, t = batch['input_ids'].shape
        logit_positions = t - 1 if c.max_loss_tokens <= 0 else min(c.max_loss_tokens, t - 1)
        timed_flops += progress.step_flops(model.config, lora_params, b, t, logit_positions)
        timed_steps += 1

      if step % c.log_every == 0 or step == c.num_steps:
        got = jax.device_get(pending)
        now = time.perf_counter()
        scalars = {'train/loss': np.mean([m['loss'] for m in got]),
                   'train/grad_norm': np.mean([m['grad_norm'] for m in got]),
                   'train/learning_rate': got[-1]['learning_rate']}
        if timed_steps:
          scalars['train/tokens_per_s'] = sum(m['tokens'] for m in got[-timed_steps:]) / (now - clock)
          if c.peak_tflops_per_device > 0:
            peak = c.peak_tflops_per_device * 1e12 * jax.device_count()
            scalars['train/mfu'] = timed_flops / (now - clock) / peak
        writer.write(step, scalars)
        last = {'step': step, **{k: float(v) for k, v in scalars.items()}}
        pending, timed_flops, timed_steps, clock = [], 0.0, 0, now

      valid_loss, valid_metrics, stop, save_best = None, {}, False, False
      if valid_batches is not None and (step == c.num_steps or (c.eval_every and step % c.eval_every == 0)):
        valid_loss = evaluate(eval_step, state['lora'], frozen, valid_batches, mesh, rules, c)
        writer.write(step, {'valid/loss': valid_loss})
        last['valid/loss'] = valid_loss
        if valid_rank is not None:
          ndcg = float(valid_rank(parts.merge(state['lora'], frozen, jax.random.key(0))))
          valid_metrics['valid_ndcg10'] = ndcg
          writer.write(step, {'valid/ndcg10': ndcg})
          last['valid/ndcg10'] = ndcg
          logging.info('train: step %d, valid loss %.4f, valid NDCG@10 among the candidates %.4f', step,
                       valid_loss, ndcg)
        value = valid_loss if metric == 'valid_loss' else valid_metrics[metric]
        improved = valid_rank_lib.better(metric, value, best)
        if improved:
          best, evals_since_best = value, 0
        else:
          evals_since_best += 1
        stop = 0 < patience <= evals_since_best and step < c.num_steps
        # With early stopping, training may end before the next scheduled save: a new best is saved now.
        save_best = improved and patience > 0

      # After the log step's device_get: every process stops at the same step when any got a SIGTERM,
      # agreed through the coordination service, not a device collective (training_window.stop_here).
      preempted = window.stop_here(step)
      if step % c.checkpoint_every == 0 or step == c.num_steps or preempted or stop or save_best:
        checkpointing.save_checkpoint(manager, step, state, train_iter.get_state(), config, valid_loss,
                                      valid_metrics)
        writer.sync()  # a non-local logdir gets the curve here, not at every event
      writer.advance()
      last['step'] = step
      if preempted:
        logging.warning('train: preempted at step %d; checkpoint saved', step)
        break
      if stop:
        logging.info('train: early stop at step %d: %s has not improved on %.4f for %d evaluations', step,
                     metric, best, evals_since_best)
        last['stopped_early'] = True
        break

  checkpointing.finish_saves(manager, last.get('step'))
  manager.close()
  writer.close()
  nnx.update(model, with_lora_values(parts.lora, state['lora']))
  for key in score_head.HEAD_KEYS:
    if key in state['lora']:
      last[key] = float(jax.device_get(state['lora'][key]))
  return last
