"""Shared by tests/test_train.py and tests/test_multiprocess.py: a tiny LoRA Llama, synthetic PALR-like
batches, an in-memory checkpointable iterator, and a child-process entry for runs that a test launches
as separate processes (several jax.distributed processes, or a run it kills with SIGKILL).

  python tests/train_child.py grads --out F.npz --meshes '8,1,1;2,4,1' [--coordinator H:P --num_processes N
      --process_id I --cpu_devices 4]
  python tests/train_child.py train --workdir W --steps N [--meshes 8,1,1] [--log_every K] [distributed flags]
      (exit 75 when SIGTERM stopped the run early, as the main job does)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def tiny_config(mesh=(1, 1, 1), **train):
  """palr_jax/defaults.py with a tiny train section; `mesh` = (data, fsdp, tensor)."""
  from palr_jax import defaults  # pylint: disable=g-import-not-at-top
  c = defaults.get_config()
  c.mesh.dcn_data, (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) = 1, mesh
  c.lora.rank, c.lora.alpha, c.lora.dropout = 4, 8.0, 0.0
  c.lora.targets = (r'.*self_attn\.(q_proj|v_proj)',)
  c.train.update(batch_size=8, num_steps=6, warmup_steps=2, learning_rate=1e-2, max_loss_tokens=8,
                 log_every=1, eval_every=0, checkpoint_every=2, keep_latest=10, keep_best=1)
  c.train.update(train)
  return c


def tiny_model(config, nonzero_b: bool = True, seed: int = 0):
  """Tiny fp32 Llama with LoRA per config.lora; B drawn non-zero (unless told not to) so that the A
  gradients are non-zero too."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from palr_jax.model import llama, lora  # pylint: disable=g-import-not-at-top
  model = llama.Llama(llama.LlamaConfig(**TINY), nnx.Rngs(seed))
  lora.apply_lora(model, config.lora, nnx.Rngs(seed + 1))
  if nonzero_b:
    key = jax.random.key(seed + 2)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
      if path[-1] == 'lora_b':
        key, sub = jax.random.split(key)
        var.set_value(0.1 * jax.random.normal(sub, var.get_value().shape, var.get_value().dtype))
  return model


def synthetic_examples(n: int, length: int, seed: int = 0, response=(2, 8), vocab: int = TINY['vocab_size']):
  """n right-padded prompt -> response rows, int32 [n, length]; loss_mask on the response tokens."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((n, length), np.int32) for k in ('input_ids', 'positions', 'segment_ids', 'loss_mask')}
  for i in range(n):
    resp = int(rng.integers(response[0], response[1] + 1))
    prompt = int(rng.integers(2, length - resp + 1))
    used = prompt + resp
    out['input_ids'][i, :used] = rng.integers(1, vocab, used)
    out['positions'][i, :used] = np.arange(used)
    out['segment_ids'][i, :used] = 1
    out['loss_mask'][i, prompt:used] = 1
  return out


class ArrayIterator:
  """Global batches cycling through in-memory examples; yields this process's `rows` of each.

  Its state is the number of batches consumed, so a restored iterator replays exactly.
  """

  def __init__(self, examples: dict[str, np.ndarray], batch_size: int, rows=None):
    self.examples, self.batch_size, self.position = examples, batch_size, 0
    self.rows = np.arange(batch_size) if rows is None else np.asarray(rows)

  def __iter__(self):
    return self

  def __next__(self):
    n = len(self.examples['input_ids'])
    idx = (self.position * self.batch_size + np.arange(self.batch_size)) % n
    self.position += 1
    return {k: v[idx][self.rows] for k, v in self.examples.items()}

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = int(state['position'])


def grads_on_mesh(config, model, examples, microbatches: int = 1):
  """(loss, {path: grad}) as numpy for one global batch on the mesh `config.mesh` (every process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from palr_jax import sharding  # pylint: disable=g-import-not-at-top
  from palr_jax.train import step as train_step  # pylint: disable=g-import-not-at-top
  rules = config.mesh.rules
  size = config.mesh.dcn_data * config.mesh.data * config.mesh.fsdp * config.mesh.tensor
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:size])
  parts, values, frozen = train_step.split_model(model)
  frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh, rules))
  values = jax.device_put(values, train_step.lora_values(sharding.state_shardings(parts.lora, mesh, rules)))
  rows = sharding.process_rows(mesh, rules, config.train.batch_size)
  batch = train_step.device_batch({k: v[rows] for k, v in examples.items()}, mesh, rules, config.train)
  with jax.set_mesh(mesh):
    step = jax.jit(lambda v, f, b: train_step.loss_and_grad(
        parts, v, f, b, jax.random.key(0), microbatches=microbatches, max_loss_tokens=config.train.max_loss_tokens,
        rules=rules)[:2], out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))
    loss, grads = step(values, frozen, batch)
  return float(loss.addressable_data(0)), {k: np.asarray(v.addressable_data(0)) for k, v in grads.items()}


def arm_kill(spec: str) -> None:
  """Test hook: SIGKILL this process when the async save of step N commits ('after:N') or just
  before it does, its files written but not committed ('inflight:N')."""
  import signal  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  mode, step = spec.split(':')
  commit = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if mode == 'inflight' and self.get_final().name == step:
      os.kill(os.getpid(), signal.SIGKILL)
    await commit(self)
    if mode == 'after' and self.get_final().name == step:
      os.kill(os.getpid(), signal.SIGKILL)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def run_config(mesh, steps: int, log_every: int = 1):
  """Config of the runs tests launch as processes (and replay in process): a constant rate after the
  warmup, so a run preempted at step S follows an S-step run's curve; dropout on, so a resumed run must
  replay its masks."""
  config = tiny_config(mesh, num_steps=steps, lr_decay='constant', log_every=log_every)
  config.lora.dropout = 0.1
  return config


class AnnouncingIterator(ArrayIterator):
  """Creates the file `started` once 3 batches were drawn: a test that preempts the run waits for it."""

  def __init__(self, *args, started: str):
    super().__init__(*args)
    self.started = started

  def __next__(self):
    if self.position == 3:
      open(self.started, 'w').close()
    return super().__next__()


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('mode', choices=('grads', 'train'))
  parser.add_argument('--meshes', default='8,1,1', help='data,fsdp,tensor[;...] (train: the first)')
  parser.add_argument('--out', help='grads: .npz written by process 0')
  parser.add_argument('--workdir', help='train: the workdir')
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--log_every', type=int, default=1)
  parser.add_argument('--coordinator')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--cpu_devices', type=int, default=8)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', args.cpu_devices)
  from palr_jax import distributed, sharding  # pylint: disable=g-import-not-at-top
  from palr_jax.train import loop  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  meshes = [tuple(int(x) for x in m.split(',')) for m in args.meshes.split(';')]
  with jax.default_matmul_precision('float32'):
    if args.mode == 'grads':
      out = {}
      for mesh in meshes:
        config = tiny_config(mesh)
        loss, grads = grads_on_mesh(config, tiny_model(config), synthetic_examples(8, 16))
        tag = '_'.join(map(str, mesh))
        out.update({f'{tag}/loss': loss, **{f'{tag}/{k}': v for k, v in grads.items()}})
      if jax.process_index() == 0:
        np.savez(args.out, **out)
    else:
      if os.environ.get('PALR_TEST_KILL'):
        arm_kill(os.environ['PALR_TEST_KILL'])
      config = run_config(meshes[0], args.steps, args.log_every)
      rows = sharding.process_rows(sharding.make_mesh(config.mesh), config.mesh.rules, config.train.batch_size)
      batches = AnnouncingIterator(synthetic_examples(24, 16), config.train.batch_size, rows,
                                   started=os.path.join(args.workdir, f'started.{jax.process_index()}'))
      reached = loop.train(config, args.workdir, tiny_model(config, nonzero_b=False), batches)['step']
  if args.coordinator:
    jax.distributed.shutdown()
  if args.mode == 'train' and reached < args.steps:
    sys.exit(distributed.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
  main(sys.argv[1:])
