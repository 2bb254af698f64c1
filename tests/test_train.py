"""palr_jax/train.py: the global-token-mean loss, mesh-independent gradients, accumulation, the optimizer,
checkpoint policy, restore onto another mesh, exact resume after kill -9, and overfitting a tiny model."""
import dataclasses
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

from palr_jax import sharding
from palr_jax.train import checkpointing, loop, progress
from palr_jax.train import step as train_step
import train_child as tc

CHILD = os.path.join(os.path.dirname(__file__), 'train_child.py')
MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4)]


def reference_loss(model, batch):
  """(mean over every loss token, mean of per-row means) of -log softmax(full logits at t-1)[token t],
  in float64 numpy."""
  logits = model(*(jnp.asarray(batch[k]) for k in ('input_ids', 'positions', 'segment_ids')))
  logp = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)
  losses = [[] for _ in logp]
  for b, t in zip(*np.nonzero(batch['loss_mask'])):
    if t > 0 and batch['segment_ids'][b, t] == batch['segment_ids'][b, t - 1] != 0:
      losses[b].append(-logp[b, t - 1, batch['input_ids'][b, t]])
  return np.concatenate(losses).mean(), np.mean([np.mean(row) for row in losses])


@pytest.fixture(scope='module')
def single_device():
  config = tc.tiny_config((1, 1, 1))
  model = tc.tiny_model(config)
  examples = tc.synthetic_examples(8, 16)
  return model, examples, tc.grads_on_mesh(config, model, examples)


def test_loss_is_the_global_token_mean():
  config = tc.tiny_config((1, 1, 1), max_loss_tokens=0)
  model = tc.tiny_model(config)
  examples = tc.synthetic_examples(8, 24, seed=3, response=(1, 12))
  # Very different response lengths, and a packed row whose second segment starts with a loss token:
  # that token has no context in its segment and must not count.
  examples['loss_mask'][0] = 0
  examples['loss_mask'][0, 20:] = 1
  examples['segment_ids'][0] = np.where(np.arange(24) < 12, 1, 2)
  examples['positions'][0] = np.concatenate([np.arange(12), np.arange(12)])
  examples['input_ids'][0, :] = np.arange(1, 25)
  examples['loss_mask'][0, 12] = 1
  lengths = examples['loss_mask'].sum(1)
  assert lengths.min() <= 2 and lengths.max() >= 10
  want, mean_of_row_means = reference_loss(model, examples)
  assert abs(want - mean_of_row_means) > 1e-3  # Far beyond rtol=1e-5: the definitions differ here.
  loss, _ = tc.grads_on_mesh(config, model, examples)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # One row per device, and logits only at the <= 12 loss tokens of each row: still the global mean.
  loss_12, _ = tc.grads_on_mesh(tc.tiny_config((8, 1, 1), max_loss_tokens=12), model, examples)
  np.testing.assert_allclose(loss_12, want, rtol=1e-5)
  weights = train_step.loss_weights({k: jnp.asarray(v) for k, v in examples.items()})
  assert int(weights.sum()) == int(lengths.sum()) - 1 and weights[0, 12] == 0


def test_tag_loss_is_a_softmax_over_the_candidates_tags():
  """Where loss_mask is 2 (a Recommend_Retrieval answer's tag) the loss is -log softmax over the K tag
  tokens only, elsewhere over the vocabulary; computed by hand from the full logits."""
  config = tc.tiny_config((1, 1, 1), max_loss_tokens=0)
  model = tc.tiny_model(config)
  batch = tc.synthetic_examples(4, 12, seed=5, response=(2, 4))
  choice_ids = np.array([7, 11, 13, 21, 40], np.int32)
  for b in range(4):  # each row's first answer token becomes a tag answer among the choices
    t = int(np.flatnonzero(batch['loss_mask'][b])[0])
    batch['input_ids'][b, t] = choice_ids[b]
    batch['loss_mask'][b, t] = 2
  logits = model(*(jnp.asarray(batch[k]) for k in ('input_ids', 'positions', 'segment_ids')))
  logp = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)
  tag_logp = scipy.special.log_softmax(np.asarray(logits, np.float64)[..., choice_ids], axis=-1)
  want = 0.0
  for b, t in zip(*np.nonzero(batch['loss_mask'])):
    token = batch['input_ids'][b, t]
    want -= (tag_logp[b, t - 1, list(choice_ids).index(token)] if batch['loss_mask'][b, t] == 2
             else logp[b, t - 1, token])
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  got = train_step.loss_sum(model, jbatch, 0, config.mesh.rules, choice_ids)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  plain = float(train_step.loss_sum(model, jbatch, 0, config.mesh.rules))  # without choices: every token
  assert abs(plain - want) > 1e-3                                        # over the whole vocabulary


@pytest.mark.parametrize('mesh', MESHES)
def test_loss_and_grads_do_not_depend_on_the_mesh(single_device, mesh):
  model, examples, (want_loss, want_grads) = single_device
  assert all(np.abs(g).max() > 1e-5 for g in want_grads.values())  # B != 0: every adapter is live.
  loss, grads = tc.grads_on_mesh(tc.tiny_config(mesh), model, examples)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
  assert grads.keys() == want_grads.keys()
  for k in grads:
    np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_micro_batches_accumulate_to_the_full_batch_gradient(single_device):
  model, examples, (want_loss, want_grads) = single_device
  loss, grads = tc.grads_on_mesh(tc.tiny_config((1, 2, 4), microbatches=4), model, examples, microbatches=4)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
  for k in grads:
    np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_dropout_masks_are_a_function_of_the_key():
  config = tc.tiny_config((1, 1, 1))
  config.lora.dropout = 0.5
  parts, values, frozen = train_step.split_model(tc.tiny_model(config))
  batch = {k: jnp.asarray(v) for k, v in tc.synthetic_examples(8, 16).items()}
  loss = jax.jit(lambda key: train_step.loss_and_grad(parts, values, frozen, batch, key, microbatches=1,
                                                 max_loss_tokens=8, rules=config.mesh.rules)[0])
  assert loss(jax.random.key(0)) == loss(jax.random.key(0)) != loss(jax.random.key(1))


def test_batch_checks():
  config = tc.tiny_config((2, 4, 1))
  mesh = sharding.make_mesh(config.mesh)
  rules = config.mesh.rules
  with pytest.raises(ValueError, match='batch_size=8 must be a multiple of microbatches=2 x 8'):
    train_step.check_batch_layout(tc.tiny_config((2, 4, 1), microbatches=2).train, mesh, rules)
  good = tc.synthetic_examples(8, 16)
  with pytest.raises(ValueError, match=r"missing key\(s\) \['loss_mask'\]"):
    train_step.device_batch({k: v for k, v in good.items() if k != 'loss_mask'}, mesh, rules, config.train)
  with pytest.raises(ValueError, match=r'positions has shape \(8, 15\)'):
    train_step.device_batch({**good, 'positions': good['positions'][:, 1:]}, mesh, rules, config.train)
  too_long = {**good, 'loss_mask': np.ones_like(good['loss_mask'])}
  with pytest.raises(ValueError, match='a row has 16 loss tokens, more than config.train.max_loss_tokens=8'):
    train_step.device_batch(too_long, mesh, rules, config.train)


def test_schedule_and_weight_decay_mask():
  config = tc.tiny_config(num_steps=12, warmup_steps=2, learning_rate=1.0, lr_decay='linear',
                          final_lr_fraction=0.1, weight_decay=0.5, grad_clip_norm=0.0)
  schedule = train_step.learning_rate_schedule(config.train)
  np.testing.assert_allclose([schedule(s) for s in (0, 1, 2, 7, 12)], [0, 0.5, 1.0, 0.55, 0.1], rtol=1e-6)
  config.train.lr_decay = 'cosine'
  np.testing.assert_allclose(train_step.learning_rate_schedule(config.train)(7), 0.1 + 0.9 * 0.5, rtol=1e-6)
  config.train.lr_decay = 'step'
  with pytest.raises(ValueError, match="config.train.lr_decay: expected 'cosine', 'linear' or 'constant'"):
    train_step.learning_rate_schedule(config.train)
  # With zero gradients only weight decay moves parameters: matrices shrink, vectors do not.
  config.train.lr_decay = 'constant'
  params = {'m': jnp.ones((2, 2)), 'v': jnp.ones((2,))}
  optimizer = train_step.make_optimizer(config.train)
  state = optimizer.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = optimizer.update(zeros, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params['m'], 1 - 0.5 * 0.5, rtol=1e-6)  # step 0 has lr 0; step 1 has 0.5.
  np.testing.assert_array_equal(params['v'], 1.0)


def test_checkpoints_keep_the_latest_and_the_best(tmp_path, monkeypatch):
  config = tc.tiny_config(keep_latest=2, keep_best=1)
  monkeypatch.chdir(tmp_path)  # a relative workdir, as in the README's command (orbax wants absolute)
  manager = checkpointing.checkpoint_manager('run/checkpoints', config.train)
  for step, valid_loss in zip(range(1, 6), (3.0, 1.0, 2.0, None, 5.0)):
    state = {'step': jnp.array(step), 'lora': {'a': jnp.full((2,), step, jnp.float32)}}
    checkpointing.save_checkpoint(manager, step, state, {'position': step}, config, valid_loss)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 5]  # best valid loss (2), the last two (4, 5).
  abstract = jax.eval_shape(lambda: state)
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  restored, data_state = checkpointing.restore_checkpoint(manager, 2, train_step.with_shardings(abstract, shardings))
  np.testing.assert_array_equal(restored['lora']['a'], [2.0, 2.0])
  assert data_state == {'position': 2}
  manager.close()
  assert checkpointing.checkpoint_steps('run') == [2, 4, 5]


def test_flop_count_matches_xla(single_device):
  """The analytic step FLOPs agree with XLA's count of the compiled loss-and-gradient (1 device)."""
  model, examples, _ = single_device
  config = tc.tiny_config((1, 1, 1))
  scanned = model.config
  model.config = dataclasses.replace(scanned, scan_layers=False)  # XLA counts a scan's body once
  try:
    parts, values, frozen = train_step.split_model(model)
  finally:
    model.config = scanned
  batch = {k: jnp.asarray(v) for k, v in examples.items()}
  step = jax.jit(lambda v, f, b: train_step.loss_and_grad(parts, v, f, b, jax.random.key(0), microbatches=1,
                                                      max_loss_tokens=8, rules=config.mesh.rules))
  xla = step.lower(values, frozen, batch).compile().cost_analysis()['flops']
  lora_params = sum(v.size for v in values.values())
  ours = progress.step_flops(model.config, lora_params, batch=8, length=16, logit_positions=8)
  assert 0.8 < ours / xla < 1.1, (ours, xla)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  examples = tc.synthetic_examples(24, 16)
  saved_on = tc.tiny_config((8, 1, 1), num_steps=2)
  model = tc.tiny_model(saved_on, nonzero_b=False)
  loop.train(saved_on, tmp_path, model, tc.ArrayIterator(examples, 8))
  trained = train_step.lora_values(nnx.state(model, nnx.LoRAParam))

  config = tc.tiny_config((2, 4, 1), num_steps=4)
  mesh = sharding.make_mesh(config.mesh)
  parts, values, _ = train_step.split_model(tc.tiny_model(config, nonzero_b=False))
  optimizer = train_step.make_optimizer(config.train)
  abstract = jax.eval_shape(lambda v: train_step.init_state(v, optimizer), values)
  shardings = train_step.state_shardings(abstract, parts, optimizer, mesh, config.mesh.rules)
  manager = checkpointing.checkpoint_manager(tmp_path / 'checkpoints', config.train)
  state, data_state = checkpointing.restore_checkpoint(manager, 2, train_step.with_shardings(abstract, shardings))
  manager.close()
  assert data_state == {'position': 2} and int(state['step']) == 2
  q_a = 'layers.0.self_attn.q_proj.lora_a'
  assert state['lora'][q_a].sharding.spec == jax.P('fsdp', None)
  assert dict(state['lora'][q_a].sharding.mesh.shape) == {'dcn_data': 1, 'data': 2, 'fsdp': 4, 'tensor': 1}
  for k, v in state['lora'].items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(trained[k]), err_msg=k)
  adam = state['opt_state'][1][0]
  assert adam.mu[q_a].sharding == state['lora'][q_a].sharding and int(adam.count) == 2

  # Training goes on from there on the new mesh as it would have on the old one.
  resumed = loop.train(config, tmp_path, tc.tiny_model(config, nonzero_b=False), tc.ArrayIterator(examples, 8))
  straight = loop.train(tc.tiny_config((8, 1, 1), num_steps=4), tmp_path / 'straight',
                         tc.tiny_model(config, nonzero_b=False), tc.ArrayIterator(examples, 8))
  assert resumed['step'] == straight['step'] == 4
  np.testing.assert_allclose(resumed['train/loss'], straight['train/loss'], rtol=1e-5)


@pytest.fixture(scope='module')
def killed_runs(tmp_path_factory):
  """An uninterrupted 6-step run and two runs killed (-9) at the step-4 save, then resumed."""
  root = tmp_path_factory.mktemp('kill')
  command = lambda name: [sys.executable, CHILD, 'train', '--workdir', str(root / name), '--steps', '6']  # noqa: E731
  procs = [subprocess.Popen(command(name), env={**os.environ, 'PALR_TEST_KILL': kill} if kill else None,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for name, kill in (('straight', ''), ('inflight', 'inflight:4'), ('after', 'after:4'))]
  codes = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
  assert codes[0][0] == 0, codes[0][1][-3000:]
  assert codes[1][0] == codes[2][0] == -9, [c[1][-3000:] for c in codes[1:]]
  runs = {}
  for name in ('inflight', 'after'):
    logdir = root / name / 'tensorboard'
    before = set(logdir.iterdir())
    committed = sorted(int(p.name) for p in (root / name / 'checkpoints').iterdir() if p.name.isdigit())
    runs[name] = {'committed': committed, 'before': before}
  resumes = [subprocess.Popen(command(name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ('inflight', 'after')]
  for name, p in zip(('inflight', 'after'), resumes):
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
    logdir = root / name / 'tensorboard'
    runs[name]['resumed'] = progress.scalars(sorted(set(logdir.iterdir()) - runs[name]['before']), 'train/loss')
  straight = progress.scalars(sorted((root / 'straight' / 'tensorboard').iterdir()), 'train/loss')
  return straight, runs


@pytest.mark.parametrize('name, last_complete', [('inflight', 2), ('after', 4)])
def test_resume_after_kill_replays_the_same_losses(killed_runs, name, last_complete):
  straight, runs = killed_runs
  assert sorted(straight) == [1, 2, 3, 4, 5, 6]
  assert runs[name]['committed'] == [2, 4][:last_complete // 2]
  resumed = runs[name]['resumed']
  assert sorted(resumed) == list(range(last_complete + 1, 7))
  np.testing.assert_array_equal([resumed[s] for s in sorted(resumed)], [straight[s] for s in sorted(resumed)])


def test_overfits_eight_pairs_and_leaves_the_base_untouched(tmp_path):
  config = tc.tiny_config((2, 4, 1), num_steps=150, learning_rate=1e-2, warmup_steps=5, final_lr_fraction=0.01,
                          log_every=10, checkpoint_every=1000, max_loss_tokens=8, peak_tflops_per_device=0.1)
  config.lora.rank = 8
  config.lora.targets = (r'.*(q|k|v|o|gate|up|down)_proj',)
  model = tc.tiny_model(config, nonzero_b=False)
  # A random 0.02-std LM head caps logits near +-1, far from zero loss; scale it like a trained one.
  model.lm_head.kernel.set_value(model.lm_head.kernel.get_value() * 50)
  base = {k: np.array(v) for k, v in train_step.lora_values(nnx.state(model, nnx.Not(nnx.LoRAParam))).items()}
  adapters = train_step.lora_values(nnx.state(model, nnx.LoRAParam))
  examples = tc.synthetic_examples(8, 16, seed=7)
  valid = [examples]
  result = loop.train(config, tmp_path, model, tc.ArrayIterator(examples, 8), valid)
  assert result['step'] == 150
  assert result['valid/loss'] < 1e-2, result  # From log(64) = 4.16.
  (events,) = (tmp_path / 'tensorboard').iterdir()
  logged = {tag: progress.scalars([events], tag) for tag in ('train/loss', 'train/grad_norm', 'train/learning_rate',
                                                   'train/tokens_per_s', 'train/mfu', 'valid/loss')}
  assert sorted(logged['train/loss']) == list(range(10, 151, 10)) and logged['valid/loss'].keys() == {150}
  assert logged['train/loss'][10] > 1.0 > 0.01 > logged['train/loss'][150] == pytest.approx(result['train/loss'])
  assert all(0 < logged['train/mfu'][s] < 1 and logged['train/tokens_per_s'][s] > 0 for s in logged['train/mfu'])
  after = train_step.lora_values(nnx.state(model, nnx.Not(nnx.LoRAParam)))
  assert after.keys() == base.keys()
  for k, v in base.items():
    np.testing.assert_array_equal(np.asarray(after[k]), v, err_msg=k)
  trained = train_step.lora_values(nnx.state(model, nnx.LoRAParam))
  assert all(not np.array_equal(trained[k], adapters[k]) for k in trained if k.endswith('lora_b'))


def test_restore_errors_are_one_line(tmp_path, capfd):
  """Issue: lora.rank=4 died in an orbax shape error under dozens of lines; a truncated chunk ended in a
  TensorStore spec dump. Both are now one line naming the checkpoint (and the key that changed)."""
  examples = tc.synthetic_examples(8, 16)
  config = tc.tiny_config((8, 1, 1), num_steps=2)
  loop.train(config, tmp_path, tc.tiny_model(config), tc.ArrayIterator(examples, 8))
  other = tc.tiny_config((8, 1, 1), num_steps=4)
  other.lora.rank = 2
  with pytest.raises(ValueError) as e:
    loop.train(other, tmp_path, tc.tiny_model(other), tc.ArrayIterator(examples, 8))
  assert str(e.value) == (
      f'{tmp_path}/checkpoints/2: its LoRA adapters do not fit this model (layers.0.self_attn.q_proj.lora_a: '
      'stored (32, 4), this model (32, 2)); config.lora.rank was 4 when it was written, is 2 now; a changed '
      'lora/model option needs a fresh run folder or --rerun of its stage')
  assert 'Traceback' not in capfd.readouterr().err  # found before orbax starts reading: no thread noise
  # The adapters alone (what ranking and export read) fail the same way, without the config to compare.
  model = tc.tiny_model(other)
  with pytest.raises(ValueError, match=r'checkpoints/2: its LoRA adapters do not fit this model \(layers.0'):
    checkpointing.restore_adapters(model, tmp_path / 'checkpoints', 2)

  for chunk in (tmp_path / 'checkpoints' / '2' / 'state' / 'd').iterdir():  # cut every data chunk in half
    with open(chunk, 'r+b') as f:
      f.truncate(os.path.getsize(chunk) // 2)
  with pytest.raises(ValueError) as e:
    loop.train(tc.tiny_config((8, 1, 1), num_steps=4), tmp_path, tc.tiny_model(config), tc.ArrayIterator(examples, 8))
  message = str(e.value)
  assert message.startswith(f'{tmp_path}/checkpoints/2: cannot read this checkpoint (') and '\n' not in message
  assert 'is not valid for value of size' in message and 'tensorstore_spec' not in message
  assert message.endswith('it is damaged or incomplete: delete its step folder to resume from an earlier '
                          'checkpoint, or rerun the stage from scratch (palr_jax.main --rerun STAGE)')


class _ScriptedRanker:
  """A valid ranker whose NDCG@10 at the n-th evaluation is `values[n]`; records the adapters it saw."""

  def __init__(self, values):
    self.values, self.seen = list(values), []

  def __call__(self, model):
    self.seen.append({k: np.array(v) for k, v in train_step.lora_values(nnx.state(model, nnx.LoRAParam)).items()})
    return self.values[len(self.seen) - 1]


def test_checkpoint_chosen_by_valid_ndcg(tmp_path):
  config = tc.tiny_config((8, 1, 1), num_steps=8, eval_every=2, checkpoint_every=2, keep_latest=1, keep_best=1,
                          best_metric='valid_ndcg10')
  examples = tc.synthetic_examples(8, 16)
  ranker = _ScriptedRanker([0.2, 0.5, 0.3, 0.1])   # the loss is lowest last; NDCG best at step 4
  result = loop.train(config, tmp_path, tc.tiny_model(config), tc.ArrayIterator(examples, 8), [examples],
                      valid_rank=ranker)
  assert result['step'] == 8 and not result.get('stopped_early')
  assert len(ranker.seen) == 4
  # The ranker saw the adapters as trained so far: they change between evaluations.
  assert any(not np.array_equal(ranker.seen[0][k], ranker.seen[1][k]) for k in ranker.seen[0])
  recorded = {2: 0.2, 4: 0.5, 6: 0.3, 8: 0.1}
  kept = checkpointing.checkpoint_steps(tmp_path)
  assert kept == sorted({max(recorded, key=recorded.get), 8}) == [4, 8]
  (events,) = (tmp_path / 'tensorboard').iterdir()
  assert progress.scalars([events], 'valid/ndcg10') == pytest.approx(recorded)


def test_early_stop_after_patience_evaluations(tmp_path):
  config = tc.tiny_config((8, 1, 1), num_steps=20, eval_every=2, checkpoint_every=100, keep_latest=1, keep_best=1,
                          best_metric='valid_ndcg10', early_stop_patience=2)
  examples = tc.synthetic_examples(8, 16)
  ranker = _ScriptedRanker([0.3, 0.6, 0.6, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
  result = loop.train(config, tmp_path, tc.tiny_model(config), tc.ArrayIterator(examples, 8), [examples],
                      valid_rank=ranker)
  # Best 0.6 at step 4; steps 6 (equal) and 8 (worse) do not improve: stop at step 8, never seeing 0.9.
  assert result['step'] == 8 and result['stopped_early'] and len(ranker.seen) == 4
  assert checkpointing.checkpoint_steps(tmp_path) == [4, 8]


def test_best_metric_checked_and_falls_back_without_a_ranker(tmp_path):
  config = tc.tiny_config((8, 1, 1), num_steps=2, eval_every=1, best_metric='valid_hr')
  examples = tc.synthetic_examples(8, 16)
  with pytest.raises(ValueError, match='config.train.best_metric'):
    loop.train(config, tmp_path / 'a', tc.tiny_model(config), tc.ArrayIterator(examples, 8), [examples])
  config.train.best_metric = 'valid_ndcg10'   # no ranker: kept by valid loss
  result = loop.train(config, tmp_path / 'b', tc.tiny_model(config), tc.ArrayIterator(examples, 8), [examples])
  assert result['step'] == 2 and 'valid/ndcg10' not in result
