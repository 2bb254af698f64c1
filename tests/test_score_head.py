"""palr_jax/score_head.py: the residual score head (gate * tag logit + scale * z): the scale's fit, the
retriever's order at gate 0 (ranking a tiny random model's tag scores), the tag loss with the head against a
hand computation, the gate's gradient and first step, and the scalars saved and read back."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

from palr_jax import score_head
from palr_jax.model import rerank
from palr_jax.train import step as train_step
import train_child as tc


def test_standardize():
  z = score_head.standardize([3.0, 1.0, 2.0])
  np.testing.assert_allclose(z, (np.array([3, 1, 2]) - 2) / np.std([3, 1, 2]), rtol=1e-6)
  assert not score_head.standardize([5.0, 5.0]).any()


def test_fit_scale_maximizes_the_softmax_likelihood():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(200, 6))
  labels = np.array([rng.choice(6, p=scipy.special.softmax(1.7 * row)) for row in z])
  a = score_head.fit_scale(z, labels)
  nll = lambda s: -np.sum(scipy.special.log_softmax(s * z, axis=1)[np.arange(200), labels])  # noqa: E731
  assert nll(a) <= min(nll(a - 1e-3), nll(a + 1e-3))  # a stationary point of a concave objective
  assert 1.0 < a < 2.5
  assert score_head.fit_scale(np.zeros((0, 3)), np.zeros(0)) == 0.0


def test_gate_zero_ranks_exactly_as_the_retriever():
  """A tiny random model's tag scores, passed through the head at gate 0: every user's order is the
  retriever's (ties in the retriever's score included: they keep its order)."""
  config = tc.tiny_config((1, 1, 1))
  model = tc.tiny_model(config)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, 40, size=int(n)) for n in rng.integers(5, 14, size=6)]
  tags = [rng.choice(np.arange(40, 64), size=7, replace=False) for _ in prompts]
  llm = rerank.score_tags(model, prompts, tags, batch_size=2, buckets=(16,))
  assert np.isfinite(llm).all() and np.ptp(llm, axis=1).min() > 0  # the LLM alone would reorder
  for n in range(len(prompts)):
    retriever = np.sort(rng.normal(size=7))[::-1].copy()
    retriever[3] = retriever[4]  # a tie: the retriever's order keeps position 3 before 4
    shuffled = rng.permutation(7)  # the candidates as the prompt showed them
    z = score_head.standardize(retriever[shuffled])
    scores = score_head.residual_scores(llm[n], z, gate=0.0, scale=1.3)
    order = shuffled[score_head.retriever_consistent_order(scores, shuffled)]
    np.testing.assert_array_equal(order, np.arange(7))
    # With a gate the LLM moves candidates; the head still returns a permutation.
    moved = score_head.residual_scores(llm[n], z, gate=50.0, scale=1.3)
    assert sorted(score_head.retriever_consistent_order(moved, shuffled).tolist()) == list(range(7))


def _tag_batch():
  batch = tc.synthetic_examples(4, 12, seed=5, response=(2, 4))
  choice_ids = np.array([7, 11, 13, 21, 40], np.int32)
  for b in range(4):
    t = int(np.flatnonzero(batch['loss_mask'][b])[0])
    batch['input_ids'][b, t] = choice_ids[b]
    batch['loss_mask'][b, t] = 2
  z = np.stack([score_head.standardize(r) for r in np.random.default_rng(2).normal(size=(4, 5))])
  per_token = np.zeros((*batch['input_ids'].shape, 5), np.float32)  # z at each row's tag token only
  for b in range(4):
    per_token[b, np.flatnonzero(batch['loss_mask'][b] == 2)[0]] = z[b]
  batch['candidate_z'] = per_token
  return batch, choice_ids, z


def test_tag_loss_with_the_head_equals_a_hand_computation():
  config = tc.tiny_config((1, 1, 1), max_loss_tokens=0)
  model = tc.tiny_model(config)
  batch, choice_ids, z = _tag_batch()
  gate, scale = 0.7, 1.9
  logits = np.asarray(model(*(jnp.asarray(batch[k]) for k in ('input_ids', 'positions', 'segment_ids'))),
                      np.float64)
  logp = scipy.special.log_softmax(logits, axis=-1)
  want = 0.0
  for b, t in zip(*np.nonzero(batch['loss_mask'])):
    token = batch['input_ids'][b, t]
    if batch['loss_mask'][b, t] == 2:
      assert batch['candidate_z'][b, t].any()
      k = scipy.special.log_softmax(gate * logits[b, t - 1, choice_ids] + scale * z[b])
      want -= k[list(choice_ids).index(token)]
    else:
      want -= logp[b, t - 1, token]
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  head = {score_head.GATE: jnp.float32(gate), score_head.SCALE: jnp.float32(scale)}
  got = train_step.loss_sum(model, jbatch, 0, config.mesh.rules, choice_ids, head)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize('microbatches', [1, 2])
def test_gradient_reaches_the_gate_and_one_step_moves_it(microbatches):
  config = tc.tiny_config((1, 1, 1), max_loss_tokens=0, warmup_steps=0)  # step 0 has a learning rate
  model = tc.tiny_model(config)
  batch, choice_ids, z = _tag_batch()
  parts, values, frozen = train_step.split_model(model)
  values = train_step.with_head(values, scale=1.0)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, grads, _ = train_step.loss_and_grad(parts, values, frozen, jbatch, jax.random.key(0),
                                            microbatches=microbatches, max_loss_tokens=0,
                                            rules=config.mesh.rules, choice_ids=choice_ids)
  assert float(jnp.abs(grads[score_head.GATE])) > 0 and float(jnp.abs(grads[score_head.SCALE])) > 0
  optimizer = train_step.make_optimizer(config.train)
  state = train_step.init_state(values, optimizer)
  updates, _ = optimizer.update(grads, state['opt_state'], state['lora'])
  new = optax.apply_updates(state['lora'], updates)
  assert float(new[score_head.GATE]) != 0.0 and new[score_head.GATE].dtype == jnp.float32


def test_save_and_load(tmp_path):
  path = score_head.save(tmp_path / 'peft', 0.125, -2.5)
  assert path.name == score_head.FILE
  assert score_head.load(tmp_path / 'peft') == (0.125, -2.5)
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / score_head.FILE).write_bytes(b'nonsense')
  with pytest.raises(ValueError, match='score_head.safetensors'):
    score_head.load(tmp_path / 'bad')


def test_rank_stage_residual_row_at_gate_zero_is_the_retriever_order():
  """The rank stage's residual path: tag scores of the shown (shuffled) candidates -> scores in the
  retriever's order; at gate 0 the stage's order (retriever-consistent ties) is the retriever's list."""
  from palr_jax.data import prompts
  from palr_jax.stages import rank
  row = {'items': [9, 4, 7, 1, 3], 'scores': [2.0, 1.5, 1.5, 0.3, -1.0]}
  shown = (7, 1, 9, 3, 4)
  example = prompts.Example(task='recommend_retrieval', split='test', user=0, position=5, target=7,
                            history=(), candidates=shown, prompt='', answer='', input_ids=np.zeros(1, np.int32),
                            loss_mask=np.zeros(1, np.int32), prompt_length=1)
  tag_scores = np.array([-0.1, -3.0, -5.0, -0.2, -0.4])  # the LLM alone would put 7 first
  for gate, want in ((0.0, [9, 4, 7, 1, 3]), (100.0, [7, 3, 4, 1, 9])):
    scores, reordered = rank.residual_row(row, example, tag_scores, (gate, 2.0))
    assert reordered.candidates == tuple(row['items'])
    order = score_head.retriever_consistent_order(scores, np.arange(5))
    assert [row['items'][j] for j in order] == want
  with pytest.raises(ValueError, match='not the retriever'):
    rank.residual_row({'items': [9, 4], 'scores': [1.0, 0.0]}, example, tag_scores, (0.0, 1.0))


def test_trained_head_is_checkpointed_and_exported_beside_the_adapter(tmp_path):
  """loop.train with the head: its scalars move, are saved in the orbax checkpoint with the adapters, read
  back (`restore_head`) and written as score_head.safetensors beside the PEFT adapter, equal; the
  adapters still restore from a checkpoint that holds the head."""
  from palr_jax.train import checkpointing, loop
  config = tc.tiny_config((8, 1, 1), max_loss_tokens=0, warmup_steps=0, num_steps=2, checkpoint_every=2)
  model = tc.tiny_model(config)
  batch, choice_ids, _ = _tag_batch()
  examples = {k: np.concatenate([v, v]) for k, v in batch.items()}  # 8 rows: one global batch
  last = loop.train(config, tmp_path, model, tc.ArrayIterator(examples, 8), choice_ids=choice_ids,
                    head_scale=1.5)
  gate, scale = last[score_head.GATE], last[score_head.SCALE]
  assert gate != 0.0 and scale != 1.5
  assert checkpointing.restore_head(tmp_path / 'checkpoints', 2) == pytest.approx((gate, scale), rel=1e-6)
  assert checkpointing.write_adapters(tmp_path, model, config.lora, 'tiny') == [2]
  assert score_head.load(checkpointing.adapter_dir(tmp_path, 2)) == pytest.approx((gate, scale), rel=1e-6)


def test_whole_pipeline_with_a_residual_variant(tmp_path):
  """Every stage with one residual variant: the head is trained from the fitted scale, written beside each
  kept PEFT adapter and the export, read back by the rank stage; its method's items are the candidates
  ordered by gate * tag score + scale * z (the stored scores)."""
  pytest.importorskip('transformers')
  import json
  from palr_jax import main as palr_main
  from palr_jax.train import checkpointing
  import pipeline_fixtures
  pipeline_fixtures.write_fixtures(tmp_path)
  config = pipeline_fixtures.config(tmp_path)
  v2 = config.variants.palr_v2.copy_and_resolve_references()
  for name in list(config.variants):
    del config.variants[name]
  config.variants.res = v2
  config.variants.res.rank_mode = 'residual'
  config.eval.methods = ('retriever', 'res')
  config.export.variant = 'res'
  config.export.formats = ('peft',)
  workdir = tmp_path / 'run'
  results = palr_main.run(config, workdir)
  steps = checkpointing.adapter_steps(workdir / 'res')
  heads = {s: score_head.load(checkpointing.adapter_dir(workdir / 'res', s)) for s in steps}
  meta = [json.loads(p.read_text()) for p in (workdir / 'examples').glob('*/meta.json')]
  assert [m['candidate_z_width'] for m in meta] == [4]
  assert all(gate != 0.0 for gate, _ in heads.values())
  ranked = json.loads((workdir / 'rankings.json').read_text())['methods']
  step = ranked['res']['checkpoint_step']
  assert score_head.load(workdir / 'export' / 'peft') == heads[step]
  for which in ('valid', 'test'):
    retr, res = ranked['retriever'][which], ranked['res'][which]
    for items, cands, scores in zip(res['items'], retr['items'], res['scores']):
      order = score_head.retriever_consistent_order(np.asarray(scores, np.float64), np.arange(len(cands)))
      assert items[:len(cands)] == [cands[j] for j in order]
  assert set(results['test']['metrics']) >= {'retriever', 'res', 'res+fusion'}
