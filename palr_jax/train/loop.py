"""The training loop: LoRA fine-tuning of the Llama on a device mesh, read top to bottom.

`train` builds the train state on the mesh (or restores the latest checkpoint, on whatever mesh the
config now asks for), runs the jitted step over this process's rows of each global batch, logs, evaluates,
checkpoints, and stops at `num_steps` or at a preemption.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import time

from absl import logging
from etils import epath
from flax import nnx
import jax
import numpy as np

from palr_jax import distributed
from palr_jax import sharding
from palr_jax.train import checkpointing, progress
from palr_jax.train.step import (DataIterator, check_batch_layout, device_batch, evaluate, make_eval_step,
                                 setup, with_lora_values, with_shardings)


def train(config, workdir: epath.PathLike, model: nnx.Module, train_iter: DataIterator,
          valid_batches: Iterable[Mapping[str, np.ndarray]] | None = None, *,
          choice_ids: Sequence[int] | None = None, item_curriculum_steps: int = 0) -> dict[str, float]:
  """Trains `model`'s LoRA adapters per `config.train` on the mesh `config.mesh`; resumes from `workdir`.

  Writes WORKDIR/checkpoints and WORKDIR/tensorboard. On return the model holds the trained adapters
  and the result is the last logged scalars plus `step`, the step reached: `num_steps`, or less when a
  SIGTERM stopped training early (after saving a checkpoint there, from which the next call resumes).
  `valid_batches` is iterated afresh at every evaluation (a list or a tf.data.Dataset, not a one-shot
  iterator) and yields batches like `train_iter`; pad a short last batch with rows of segment_ids 0. Run
  under `distributed.initialize()` on a pod: every process calls `train` with its own `train_iter`.
  `choice_ids`: the candidates' tag tokens, among which loss tokens marked 2 (a tag) are classified.
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

  # Abstract state -> shardings -> state created in place on the mesh; the base is only laid out.
  laid = setup(model, c, mesh, rules)
  parts, frozen, abstract, shardings = laid.parts, laid.frozen, laid.abstract, laid.shardings

  manager = checkpointing.checkpoint_manager(workdir / 'checkpoints', c)
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
    if start % c.checkpoint_every and start != c.num_steps:
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
  with jax.set_mesh(mesh), distributed.training_window():
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

      valid_loss = None
      if valid_batches is not None and (step == c.num_steps or (c.eval_every and step % c.eval_every == 0)):
        valid_loss = evaluate(eval_step, state['lora'], frozen, valid_batches, mesh, rules, c)
        writer.write(step, {'valid/loss': valid_loss})
        last['valid/loss'] = valid_loss

      # Every process asks at every step, so all stop at the same step when any got a SIGTERM.
      preempted = distributed.any_process(distributed.preemption_requested())
      if step % c.checkpoint_every == 0 or step == c.num_steps or preempted:
        checkpointing.save_checkpoint(manager, step, state, train_iter.get_state(), config, valid_loss)
      writer.advance()
      last['step'] = step
      if preempted:
        logging.warning('train: preempted at step %d; checkpoint saved', step)
        break

  manager.wait_until_finished()
  manager.close()
  writer.close()
  nnx.update(model, with_lora_values(parts.lora, state['lora']))
  return last
