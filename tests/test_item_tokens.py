"""Collaborative item tokens (palr_jax/model/item_tokens.py): the soft-token path equals the text path when
the projector outputs the token's own embedding; the projector is sharded, trained (gradients reach it),
checkpointed, restored and exported beside the PEFT adapter."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from palr_jax import sharding
from palr_jax.data import interactions, pipeline, prompts
from palr_jax.hub import peft
from palr_jax.model import item_tokens, llama, lora, rerank
from palr_jax.train import checkpointing, loop
from palr_jax.train import step as train_step
from test_llama import dense_inputs, forward
from prompt_fixtures import tiny_config, tiny_interactions, tiny_tokenizer, write_candidates
import train_child as tc

NUM_ITEMS = 5
TOKENS = np.array([7, 11, 13, 17, 19])   # the token whose embedding item i's soft token reproduces


def identity_projector(model):
  """Makes item i's soft token equal the embedding row of TOKENS[i]: one-hot factors, fc1 = I, so the
  hidden layer is gelu(1) e_i, and fc2's row i = embedding[TOKENS[i]] / gelu(1)."""
  module = item_tokens.attach(model, np.eye(NUM_ITEMS, dtype=np.float32), NUM_ITEMS, nnx.Rngs(3))
  table = np.asarray(model.embed_tokens.embedding[...], np.float32)
  g = float(jax.nn.gelu(jnp.float32(1.0)))
  module.fc1.kernel.set_value(jnp.eye(NUM_ITEMS, dtype=jnp.float32))
  module.fc2.kernel.set_value(jnp.asarray(table[TOKENS] / g))
  return module


def placeholder_batch(seed=0, b=2, t=12):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, tc.TINY['vocab_size'], (b, t)).astype(np.int32)
  items = np.full((b, t), -1, np.int32)
  for row in range(b):
    at = np.sort(rng.choice(np.arange(2, t), 3, replace=False))
    items[row, at] = rng.integers(0, NUM_ITEMS, 3)
  return ids, items


@pytest.mark.parametrize('with_lora', [False, True])
def test_item_token_path_equals_text_path_with_the_tokens_own_embedding(with_lora):
  model = llama.Llama(llama.LlamaConfig(**tc.TINY), nnx.Rngs(0))
  if with_lora:
    lora.apply_lora(model, tc.tiny_config().lora, nnx.Rngs(1))
  ids, items = placeholder_batch()
  text_ids = np.where(items >= 0, TOKENS[np.maximum(items, 0)], ids)   # the text path: the tokens themselves
  plain = np.asarray(forward(model, *dense_inputs(text_ids)))
  identity_projector(model)
  hybrid = np.asarray(forward(model, *dense_inputs(ids), item_ids=jnp.asarray(items)))
  np.testing.assert_allclose(hybrid, plain, rtol=1e-5, atol=1e-5)
  # A different projector changes the logits from the first placeholder on, never before it (causal).
  model.item_tokens.fc2.bias.set_value(jnp.full(model.config.hidden_size, 0.5, jnp.float32))
  moved = np.asarray(forward(model, *dense_inputs(ids), item_ids=jnp.asarray(items)))
  for row in range(len(ids)):
    first = int(np.argmax(items[row] >= 0))
    np.testing.assert_allclose(moved[row, :first], plain[row, :first], rtol=1e-5, atol=1e-5)
    assert np.abs(moved[row, first:] - plain[row, first:]).max() > 1e-3
  # No item ids: the token path, placeholders embed as their own tokens.
  np.testing.assert_allclose(np.asarray(forward(model, *dense_inputs(text_ids), item_ids=jnp.full_like(
      jnp.asarray(items), -1))), plain, rtol=1e-6, atol=1e-6)


def test_item_ids_without_a_projector_is_an_error():
  model = llama.Llama(llama.LlamaConfig(**tc.TINY), nnx.Rngs(0))
  ids, items = placeholder_batch()
  with pytest.raises(ValueError, match='no item projector'):
    model(*dense_inputs(ids), item_ids=jnp.asarray(items))


def item_examples(n=16, length=16, seed=0):
  """Synthetic training rows with 3 placeholder positions each in the prompt; the answer depends on the item."""
  ex = tc.synthetic_examples(n, length, seed, response=(2, 3))
  rng = np.random.default_rng(seed + 1)
  ex['item_ids'] = np.full_like(ex['input_ids'], -1)
  for i in range(n):
    prompt = int(np.argmax(ex['loss_mask'][i] > 0))
    at = rng.choice(np.arange(prompt), min(3, prompt), replace=False)
    ex['item_ids'][i, at] = rng.integers(0, NUM_ITEMS, len(at))
  return ex


def test_gradients_reach_the_projector_and_a_step_changes_it():
  config = tc.tiny_config(mesh=(2, 2, 2), num_steps=2, warmup_steps=0)
  model = tc.tiny_model(config)
  item_tokens.attach(model, np.random.default_rng(0).normal(size=(NUM_ITEMS, 6)).astype(np.float32), 8,
                     nnx.Rngs(4))
  _, values, _ = train_step.split_model(model)
  names = {k for k in values if k.startswith('item_tokens.')}
  assert names == {f'item_tokens.fc{i}.{w}' for i in (1, 2) for w in ('kernel', 'bias')}  # factors stay frozen
  ex = item_examples()
  _, grads = tc.grads_on_mesh(config, model, ex)
  for name in names:
    assert np.abs(grads[name]).max() > 0, name
  # Without item ids the projector gets no gradient (it is not in the computation).
  _, plain = tc.grads_on_mesh(config, model, {k: v for k, v in ex.items() if k != 'item_ids'})
  assert all(not np.any(plain[name]) for name in names)
  # One real train step moves the projector's weights; the curriculum keeps it still (text-only) at step 0.
  mesh = sharding.make_mesh(config.mesh)
  rules = config.mesh.rules
  laid = train_step.setup(model, config.train, mesh, rules)
  batch = train_step.device_batch({k: v[:8] for k, v in ex.items()}, mesh, rules, config.train)
  assert 'item_ids' in batch
  for curriculum, moves in ((0, True), (5, False)):
    with jax.set_mesh(mesh):
      step = laid.train_step(config.train, rules, 0, item_curriculum_steps=curriculum)
      state, metrics = step(laid.initial_state(), laid.frozen, batch)
    before, after = laid.values['item_tokens.fc2.kernel'], state['lora']['item_tokens.fc2.kernel']
    assert np.isfinite(float(metrics['loss']))
    assert (np.abs(np.asarray(after) - np.asarray(before)).max() > 0) == moves, curriculum


def test_projector_sharded_checkpointed_restored_and_exported(tmp_path):
  config = tc.tiny_config(mesh=(1, 4, 2), num_steps=2, checkpoint_every=2, warmup_steps=0)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.mesh.rules
  factors = np.random.default_rng(0).normal(size=(NUM_ITEMS, 6)).astype(np.float32)
  model = tc.tiny_model(config)
  item_tokens.attach(model, factors, 8, nnx.Rngs(4), mesh, rules)
  proj = model.item_tokens
  # Sharded by the rules table: hidden over `tensor`, the LLM width over `fsdp`, the factors replicated.
  assert proj.fc1.kernel.get_value().sharding.spec == jax.P(None, 'tensor')
  assert proj.fc2.kernel.get_value().sharding.spec == jax.P('tensor', 'fsdp')
  assert proj.factors.get_value().sharding.spec == jax.P(None, None)
  initial = np.asarray(proj.fc2.kernel.get_value())
  # Train two steps with item tokens: orbax checkpoints hold the projector with the adapters.
  ex = item_examples()
  result = loop.train(config, tmp_path / 'run', model, tc.ArrayIterator(ex, config.train.batch_size))
  assert result['step'] == 2
  trained = {k: np.asarray(v) for k, v in item_tokens.projector_tensors(model).items()}
  assert np.abs(trained['fc2.kernel'] - initial).max() > 0
  np.testing.assert_array_equal(trained['factors'], factors)
  # Restored from orbax into a fresh model with a fresh projector, on the mesh, keeping the shardings.
  fresh = tc.tiny_model(config, seed=5)
  item_tokens.attach(fresh, factors, 8, nnx.Rngs(9), mesh, rules)
  checkpointing.restore_adapters(fresh, tmp_path / 'run' / 'checkpoints', 2)
  for name, want in trained.items():
    np.testing.assert_array_equal(np.asarray(item_tokens.projector_tensors(fresh)[name]), want, err_msg=name)
  assert fresh.item_tokens.fc2.kernel.get_value().sharding.spec == jax.P('tensor', 'fsdp')
  # Exported beside the PEFT adapter, with its loader note; read back into a model that has no projector.
  steps = checkpointing.write_adapters(tmp_path / 'run', model, config.lora, 'tiny-base', placeholder_id=3)
  folder = checkpointing.adapter_dir(tmp_path / 'run', steps[-1])
  assert (folder / item_tokens.WEIGHTS_FILE).exists() and (folder / item_tokens.NOTE_FILE).exists()
  adapter = safetensors.numpy.load((folder / peft.WEIGHTS_FILE).read_bytes())
  assert adapter and not any('item' in k for k in adapter)   # the PEFT file stays PEFT's
  reloaded = tc.tiny_model(config, nonzero_b=False)   # the same base, other adapters (B = 0)
  peft.load_adapter(reloaded, folder, mesh, rules)
  for name, want in trained.items():
    np.testing.assert_allclose(np.asarray(item_tokens.projector_tensors(reloaded)[name]), want, err_msg=name)
  assert reloaded.item_tokens.placeholder_id == 3 and 'token id 3' in (folder / item_tokens.NOTE_FILE).read_text()
  assert reloaded.item_tokens.fc2.kernel.get_value().sharding.spec == jax.P('tensor', 'fsdp')
  # Exported again (the export stage's PEFT path): the same file contents, placeholder kept.
  peft.save_adapter(tmp_path / 'export', reloaded, config.lora, 'tiny-base')
  again = item_tokens.read_projector(tmp_path / 'export')
  assert again.pop('__placeholder_id__') == 3
  for name, want in trained.items():
    np.testing.assert_array_equal(again[name], want, err_msg=name)
  ids, items = placeholder_batch()
  want = np.asarray(forward(model, *dense_inputs(ids), item_ids=jnp.asarray(items)))
  got = np.asarray(forward(reloaded, *dense_inputs(ids), item_ids=jnp.asarray(items)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # A projector of another shape is refused with the file named.
  other = tc.tiny_model(config)
  item_tokens.attach(other, np.zeros((NUM_ITEMS + 1, 6), np.float32), 8, nnx.Rngs(0))
  with pytest.raises(ValueError, match='item_projector.safetensors: factors has shape'):
    item_tokens.load_projector(other, folder)


# ------------------------------------------------------------------------- prompts and TFRecords


@pytest.fixture(scope='module')
def hybrid(tmp_path_factory):
  """Train and valid examples of the fixture data, text-only and with item tokens."""
  tmp = tmp_path_factory.mktemp('hybrid')
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp / 'candidates', inter, split, count=4)
  config, tok = tiny_config(), tiny_tokenizer()
  out = {}
  for mode in (False, True):
    builder = prompts.PromptBuilder(config, inter, tok, item_tokens=mode)
    out[mode] = (builder, [e for which in ('train', 'valid') for e in prompts.build_examples(
        builder, split, which, ['likes comedy'] * 4,
        prompts.read_candidates(tmp / f'candidates/{which}.jsonl', split, which))])
  return tok, out, tmp


def test_hybrid_prompts_mark_every_shown_title_with_its_item(hybrid):
  tok, out, _ = hybrid
  builder, examples = out[True]
  _, plain = out[False]
  assert builder.item_marker == '<|endoftext|>' and builder.item_token_id == tok.convert_tokens_to_ids(
      '<|endoftext|>')   # the fixture's only special token outside the template (its pad)
  assert out[False][0].item_token_id is None and all(e.item_ids is None for e in plain)
  assert len(examples) == len(plain)
  for ex, text in zip(examples, plain):
    # The same prompt with the marker after each shown title: history (oldest first), then the candidates.
    shown = list(ex.history) + (list(ex.candidates) if ex.task == 'recommend_retrieval' else [])
    at = np.flatnonzero(ex.item_ids >= 0)
    np.testing.assert_array_equal(ex.item_ids[at], shown)
    assert np.all(ex.input_ids[at] == builder.item_token_id) and at.max() < ex.prompt_length
    assert np.sum(ex.input_ids == builder.item_token_id) == len(shown)
    assert ex.prompt.replace(builder.item_marker, '') == text.prompt and ex.answer == text.answer
    titles = [builder.titles[i] + builder.item_marker for i in shown]
    assert [t in ex.prompt for t in titles] == [True] * len(titles)
    np.testing.assert_array_equal(ex.answer_ids, text.answer_ids)   # answers never carry placeholders
    np.testing.assert_array_equal(ex.loss_mask[ex.prompt_length:], text.loss_mask[text.prompt_length:])


def test_item_ids_survive_tfrecords_padding_and_packing(hybrid):
  _, out, tmp = hybrid
  builder, examples = out[True]
  folder = pipeline.write_examples(tmp / 'ex', 1024, {'train': examples}, item_token_id=builder.item_token_id)
  path = folder / 'train.tfrecord'
  assert pipeline.has_item_ids(path)
  back = list(pipeline.read_tfrecord(path).as_numpy_iterator())
  for ex, rec in zip(examples, back):
    np.testing.assert_array_equal(rec['item_ids'] - 1, ex.item_ids)   # carried as item + 1 inside tf.data
  config = tiny_config()
  rows = np.arange(4)
  for pack in (False, True):
    config.batching.pack = pack
    config.batching.length_buckets = (64, 128, 256, 512, 1024)
    ds = pipeline.global_batches(pipeline.read_tfrecord(path), config.batching, batch_size=4, max_length=1024,
                                 drop_remainder=False)
    got = []
    for batch in pipeline._local(ds, rows, 0).as_numpy_iterator():
      assert set(batch) == {'input_ids', 'positions', 'segment_ids', 'loss_mask', 'item_ids'}
      assert np.all(batch['item_ids'][batch['segment_ids'] == 0] == -1)   # padding carries no item
      marked = batch['item_ids'] >= 0
      assert np.all(batch['input_ids'][marked] == builder.item_token_id)
      got += sorted(batch['item_ids'][marked].tolist())
    assert sorted(got) == sorted(int(i) for e in examples for i in e.item_ids if i >= 0)


def test_score_mode_with_item_tokens_equals_the_text_path():
  model = llama.Llama(llama.LlamaConfig(**tc.TINY), nnx.Rngs(0))
  identity_projector(model)
  rng = np.random.default_rng(3)
  prompts, items, texts = [], [], []
  for n in range(5):   # ragged prompts, left-padded in batches of 4
    length = int(rng.integers(6, 14))
    ids = rng.integers(1, tc.TINY['vocab_size'], length).astype(np.int32)
    item = np.full(length, -1, np.int32)
    at = rng.choice(length - 1, 2, replace=False)
    item[at] = rng.integers(0, NUM_ITEMS, 2)
    prompts.append(ids)
    items.append(item)
    texts.append(np.where(item >= 0, TOKENS[np.maximum(item, 0)], ids))
  tags = np.tile(np.arange(20, 24), (5, 1))
  common = dict(batch_size=4, buckets=(16,))
  want = rerank.score_tags(model, texts, tags, **common)
  got = rerank.score_tags(model, prompts, tags, item_ids=items, **common)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(rerank.score_tags(model, prompts, tags, **common) - want).max() > 1e-4   # the ids alone differ


def test_valid_ranker_scores_hybrid_prompts_with_their_items(hybrid):
  """The early-stopping ranker of an item-token variant renders hybrid prompts and passes their items."""
  from palr_jax.train import valid_rank
  tok, _, tmp = hybrid
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  config = tiny_config()
  config.train.rank_valid_users = 3
  ranker = {}
  for mode in (False, True):
    config.variants.palr_v2.item_tokens = mode
    ranker[mode] = valid_rank.build(config, inter, split, tok, None, tmp / 'candidates/valid.jsonl', 'palr_v2')
  assert ranker[False].item_ids is None and len(ranker[True].item_ids) == len(ranker[True]) == 3
  marker = tok.convert_tokens_to_ids('<|endoftext|>')
  for prompt, items, plain in zip(ranker[True].prompts, ranker[True].item_ids, ranker[False].prompts):
    prompt = np.asarray(prompt)
    assert len(items) == len(prompt) and np.all((items >= 0) == (prompt == marker))
    assert np.sum(items >= 0) > 0 and len(prompt) == len(plain) + np.sum(items >= 0)
