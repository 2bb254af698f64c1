"""palr_jax.model.rerank against plain references: unpadded full forwards, brute-force constrained greedy decoding
without a KV cache, hand-summed log-probabilities and hand-computed catalog ranks."""
import json
from types import SimpleNamespace

from etils import epath

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from palr_jax import defaults
from palr_jax import metrics
from palr_jax.data import interactions
from palr_jax.data import prompts
from palr_jax.model import decode
from palr_jax.model import attention
from palr_jax.model import rerank as rank
from palr_jax.stages import rank as rank_stage
from palr_jax import sharding as sharding_lib
from palr_jax.sharding import Placement
from palr_jax.model.llama import Llama, LlamaConfig, init_cache
from prompt_fixtures import tiny_config, tiny_interactions, tiny_tokenizer, write_candidates

VOCAB = 64
BUCKETS = (8, 16, 32)


def tiny_llama():
  config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)
  model = Llama(config, nnx.Rngs(0))
  kernel = model.lm_head.kernel  # Logits spread over a few units: greedy choices are far from ties.
  kernel.value = jax.random.normal(jax.random.key(1), kernel.value.shape) * 0.5
  return model


@nnx.jit
def _forward(model, ids, positions, segments):
  return jax.nn.log_softmax(model(ids, positions, segments), axis=-1)


def forward_logprobs(model, tokens, width=None):
  """log-softmax [T, V] of one sequence by a plain full forward (no cache), unpadded unless `width`
  asks for right padding (which causal attention keeps away from the T real positions)."""
  length = len(tokens)
  width = width or length
  ids, segments = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
  ids[0, :length], segments[0, :length] = tokens, 1
  positions = np.arange(width, dtype=np.int32)[None]
  return np.asarray(_forward(model, ids, positions, segments))[0, :length]


def random_prompts(rng, lengths):
  return [rng.integers(3, VOCAB, n) for n in lengths]


@pytest.fixture(scope='module')
def model():
  return tiny_llama()


# ------------------------------------------------------------------------------------- score mode


@pytest.mark.parametrize('batch_size,buckets', [(2, BUCKETS), (3, (32,)), (8, (20, 24))])
def test_score_tags_equals_unpadded_forward(model, batch_size, buckets):
  rng = np.random.default_rng(0)
  prompts = random_prompts(rng, (3, 9, 17, 5, 1, 20, 12))
  tags = rng.integers(0, VOCAB, (len(prompts), 5))
  scores = rank.score_tags(model, prompts, tags, batch_size=batch_size, buckets=buckets)
  expected = np.stack([forward_logprobs(model, p)[-1, t] for p, t in zip(prompts, tags)])
  assert scores.shape == (7, 5) and scores.dtype == np.float32
  np.testing.assert_allclose(scores, expected, atol=2e-5)


def test_score_tags_ragged_candidates(model):
  rng = np.random.default_rng(1)
  prompts = random_prompts(rng, (4, 6))
  scores = rank.score_tags(model, prompts, [[5, 6, 7], [8]], batch_size=2, buckets=BUCKETS)
  assert np.isneginf(scores[1, 1:]).all() and np.isfinite(scores[0]).all()
  np.testing.assert_allclose(scores[1, 0], forward_logprobs(model, prompts[1])[-1, 8], atol=2e-5)
  orders = rank.order_from_scores(scores)
  assert sorted(orders[0].tolist()) == [0, 1, 2] and orders[1].tolist() == [0]


def test_score_tags_rejects_bad_input(model):
  with pytest.raises(ValueError, match=r'config.batching.length_buckets'):
    rank.score_tags(model, [np.arange(40) % VOCAB], [[1, 2]], batch_size=1, buckets=BUCKETS)
  with pytest.raises(ValueError, match=r'prompts\[1\] has token ids outside'):
    rank.score_tags(model, [[1, 2], [3, VOCAB]], [[1], [2]], batch_size=1, buckets=BUCKETS)
  with pytest.raises(ValueError, match=r'prompts\[0\] must be a non-empty'):
    rank.score_tags(model, [[]], [[1]], batch_size=1, buckets=BUCKETS)
  with pytest.raises(ValueError, match='2 prompts but 1 rows'):
    rank.score_tags(model, [[1], [2]], [[1]], batch_size=1, buckets=BUCKETS)
  with pytest.raises(ValueError, match='tag_token_ids must lie'):
    rank.score_tags(model, [[1]], [[VOCAB]], batch_size=1, buckets=BUCKETS)


def test_order_from_scores_ties_keep_retriever_order():
  scores = np.array([[1.0, 3.0, 1.0, 3.0], [0.0, -np.inf, 2.0, -np.inf]])
  orders = rank.order_from_scores(scores)
  assert orders[0].tolist() == [1, 3, 0, 2]
  assert orders[1].tolist() == [2, 0]


# ---------------------------------------------------------------------------------- generate mode


def reference_generate(model, prompt, candidates, separator, max_items):
  """Greedy decoding under the candidate constraint, by full forwards over the whole text each step."""
  candidates = [list(c) for c in candidates]
  text, order, partial = list(prompt), [], []
  limit = min(max_items, len(candidates))

  def finish(k, separator_left):
    order.append(k)
    partial.clear()
    if len(order) < limit:
      text.extend(separator_left)

  while len(order) < limit:
    match = [k for k, c in enumerate(candidates) if k not in order and c[:len(partial)] == partial]
    following = sorted({candidates[k][len(partial)] for k in match if len(candidates[k]) > len(partial)})
    ends = [k for k in match if len(candidates[k]) == len(partial)]
    if ends and not following:
      finish(ends[0], separator)
      continue
    options = following + ([separator[0]] if ends and separator[0] not in following else [])
    logp = forward_logprobs(model, text, width=64)[-1]
    token = options[int(np.argmax(logp[options]))]
    text.append(token)
    if token in following:
      partial.append(token)
    else:
      finish(ends[0], separator[1:])
  return order


def tagged_candidates(rng, num, tag_base=40):
  return [np.concatenate([[tag_base + k], rng.integers(3, 30, rng.integers(1, 5))]) for k in range(num)]


def title_candidates():
  """Titles only: shared prefixes, one title a prefix of another, two identical titles."""
  return [np.array(t) for t in ([5, 6], [5, 6, 7], [5, 8, 9], [10, 11], [10, 11], [12], [5, 6, 7, 13])]


@pytest.mark.parametrize('style', ['tagged', 'titles'])
def test_generate_equals_bruteforce_greedy(model, style):
  rng = np.random.default_rng(2)
  prompts = random_prompts(rng, (7, 3, 15, 10, 4))
  if style == 'tagged':
    candidates = [tagged_candidates(rng, 6) for _ in prompts]
    separator, max_items = [1, 2], 4
  else:
    candidates = [title_candidates() for _ in prompts]
    separator, max_items = [1], 10
  orders = rank.generate_ranking(model, prompts, candidates, separator=separator, max_items=max_items,
                                 batch_size=2, buckets=BUCKETS)
  for prompt, cands, order in zip(prompts, candidates, orders):
    assert len(order) == min(max_items, len(cands)) and len(set(order)) == len(order)
    assert order == reference_generate(model, prompt, cands, separator, max_items)
  if style == 'titles':  # Both identical titles are written, the shorter of the prefix pair too.
    assert all({3, 4, 0} <= set(order) for order in orders)


def test_generate_grows_the_cache_when_padded_chunks_outgrow_it(model, monkeypatch):
  """With slots allocated exactly to the token budget, chunks padded to powers of two overflow it."""
  grown = []
  grow = decode.grow_cache
  monkeypatch.setattr(rank, 'CACHE_ROUND', 1)
  monkeypatch.setattr(decode, 'grow_cache', lambda cache, extra: grown.append(extra) or grow(cache, extra))
  rng = np.random.default_rng(5)
  prompts = random_prompts(rng, (7, 3, 15))
  candidates = [tagged_candidates(rng, 6) for _ in prompts]
  orders = rank.generate_ranking(model, prompts, candidates, separator=[1, 2], max_items=5, batch_size=4,
                                 buckets=BUCKETS)
  assert grown
  for prompt, cands, order in zip(prompts, candidates, orders):
    assert order == reference_generate(model, prompt, cands, [1, 2], 5)


def test_grown_cache_continues_like_a_full_forward(model):
  rng = np.random.default_rng(8)
  prompt, more = rng.integers(3, VOCAB, 6), rng.integers(3, VOCAB, 5)
  ids = prompt[None].astype(np.int32)
  cache = init_cache(model.config, 1, len(prompt))
  _, cache = model(ids, np.arange(6, dtype=np.int32)[None], np.ones_like(ids), cache=cache)
  cache = decode.grow_cache(cache, 5)
  logits, cache = model(more[None].astype(np.int32), np.arange(6, 11, dtype=np.int32)[None],
                        np.ones((1, 5), np.int32), cache=cache)
  assert cache.max_len == 11
  logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
  np.testing.assert_allclose(logp, forward_logprobs(model, np.concatenate([prompt, more]))[6:], atol=2e-5)


def test_generate_always_valid_distinct_candidates(model):
  rng = np.random.default_rng(3)
  prompts = random_prompts(rng, rng.integers(1, 30, 9))
  candidates = [[rng.integers(3, 12, rng.integers(1, 4)) for _ in range(rng.integers(0, 8))]
                for _ in prompts]
  orders = rank.generate_ranking(model, prompts, candidates, separator=[1], max_items=5, batch_size=4,
                                 buckets=BUCKETS)
  for cands, order in zip(candidates, orders):
    assert len(order) == min(5, len(cands)) and len(set(order)) == len(order)
    assert all(0 <= k < len(cands) for k in order)


def test_generate_rejects_bad_input(model):
  with pytest.raises(ValueError, match='separator must be non-empty'):
    rank.generate_ranking(model, [[1]], [[[2]]], separator=[], max_items=1, batch_size=1, buckets=BUCKETS)
  with pytest.raises(ValueError, match=r'candidates\[0\]\[1\] must be a non-empty'):
    rank.generate_ranking(model, [[1]], [[[2], []]], separator=[1], max_items=1, batch_size=1,
                          buckets=BUCKETS)
  with pytest.raises(ValueError, match='max_items'):
    rank.generate_ranking(model, [[1]], [[[2]]], separator=[1], max_items=0, batch_size=1, buckets=BUCKETS)


# -------------------------------------------------------------------------------- likelihood mode


@pytest.mark.parametrize('reduce', ['sum', 'mean'])
def test_score_continuations_equals_manual_sum(model, reduce):
  rng = np.random.default_rng(4)
  prompts = random_prompts(rng, (6, 2, 11))
  continuations = [[rng.integers(3, VOCAB, rng.integers(1, 6)) for _ in range(n)] for n in (4, 2, 3)]
  scores = rank.score_continuations(model, prompts, continuations, reduce=reduce, batch_size=2,
                                    buckets=BUCKETS)
  assert scores.shape == (3, 4) and np.isneginf(scores[1, 2:]).all() and np.isneginf(scores[2, 3])
  for n, (prompt, conts) in enumerate(zip(prompts, continuations)):
    for k, cont in enumerate(conts):
      logp = forward_logprobs(model, np.concatenate([prompt, cont]), width=32)
      token_logp = logp[np.arange(len(prompt) - 1, len(prompt) + len(cont) - 1), cont]
      expected = token_logp.sum() if reduce == 'sum' else token_logp.mean()
      np.testing.assert_allclose(scores[n, k], expected, atol=5e-5, err_msg=f'user {n} candidate {k}')


def test_score_continuations_with_blocked_attention(model):
  # Rows longer than one attention block: on CPU 'auto' runs the blocked kernel over prompt + answers.
  assert attention.attention_kind('auto', 'cpu', jnp.float32, 8, (120, 120)) == 'blocked'
  rng = np.random.default_rng(7)
  prompts = random_prompts(rng, (70, 41))
  continuations = [[rng.integers(3, VOCAB, n) for n in (5, 8, 3)], [rng.integers(3, VOCAB, 6)]]
  scores = rank.score_continuations(model, prompts, continuations, reduce='sum', batch_size=2, buckets=(80,))
  for n, (prompt, conts) in enumerate(zip(prompts, continuations)):
    for k, cont in enumerate(conts):
      logp = forward_logprobs(model, np.concatenate([prompt, cont]))
      expected = logp[np.arange(len(prompt) - 1, len(prompt) + len(cont) - 1), cont].sum()
      np.testing.assert_allclose(scores[n, k], expected, atol=5e-5, err_msg=f'user {n} candidate {k}')


def test_score_continuations_rejects_bad_reduce(model):
  with pytest.raises(ValueError, match='config.rank.reduce'):
    rank.score_continuations(model, [[1]], [[[2]]], reduce='max', batch_size=1, buckets=BUCKETS)


# ------------------------------------------------------------------------- a preferred candidate


def test_model_preferring_a_candidate_ranks_it_first():
  """A large constant direction in every embedding survives to the final norm; the head turns it into a
  large logit for token 20, so every mode must put the candidate written with token 20 first."""
  model = tiny_llama()
  emb = np.array(model.embed_tokens.embedding.value)
  emb[:, 0] = 1.0
  model.embed_tokens.embedding.value = emb
  kernel = np.array(model.lm_head.kernel.value)
  kernel[0] = 0.0
  kernel[0, 20] = 8.0
  model.lm_head.kernel.value = kernel
  rng = np.random.default_rng(6)
  prompts = random_prompts(rng, (5, 9, 13))
  tags = np.array([[41, 42, 20, 43], [20, 41, 42, 43], [41, 42, 43, 20]])
  best = np.argmax(tags == 20, axis=1)
  scores = rank.score_tags(model, prompts, tags, batch_size=2, buckets=BUCKETS)
  assert [o[0] for o in rank.order_from_scores(scores)] == best.tolist()
  candidates = [[np.array([t, 30 + k, 35]) for k, t in enumerate(row)] for row in tags]
  orders = rank.generate_ranking(model, prompts, candidates, separator=[1], max_items=2, batch_size=2,
                                 buckets=BUCKETS)
  assert [o[0] for o in orders] == best.tolist()
  titles = [[np.array([20, 20]) if t == 20 else np.array([t, 30 + k]) for k, t in enumerate(row)]
            for row in tags]
  scores = rank.score_continuations(model, prompts, titles, reduce='mean', batch_size=2, buckets=BUCKETS)
  assert np.argmax(scores, axis=1).tolist() == best.tolist()


# ------------------------------------------------------------------------------------- on a mesh


def test_sharded_equals_single_device(model):
  config = defaults.get_config()
  config.mesh.fsdp, config.mesh.tensor = 4, 2
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = config.mesh.rules
  sharded = tiny_llama()
  state = nnx.state(sharded)
  nnx.update(sharded, jax.device_put(state, sharding_lib.state_shardings(state, mesh, rules)))
  rng = np.random.default_rng(7)
  prompts = random_prompts(rng, (3, 9, 14, 5))
  tags = rng.integers(0, VOCAB, (4, 4))
  candidates = [tagged_candidates(rng, 4) for _ in prompts]
  kw = dict(batch_size=4, buckets=BUCKETS)
  on_mesh = Placement(mesh, rules)
  np.testing.assert_allclose(rank.score_tags(sharded, prompts, tags, placement=on_mesh, **kw),
                             rank.score_tags(model, prompts, tags, **kw), atol=2e-5)
  assert (rank.generate_ranking(sharded, prompts, candidates, separator=[1], max_items=3, placement=on_mesh,
                                **kw)
          == rank.generate_ranking(model, prompts, candidates, separator=[1], max_items=3, **kw))
  np.testing.assert_allclose(
      rank.score_continuations(sharded, prompts, candidates, reduce='sum', placement=on_mesh, **kw),
      rank.score_continuations(model, prompts, candidates, reduce='sum', **kw), atol=5e-5)
  with pytest.raises(ValueError, match=r'batch_size=3 must be a multiple of the 4 batch shards'):
    rank.score_tags(sharded, prompts, tags, batch_size=3, buckets=BUCKETS, placement=on_mesh)


# ------------------------------------------------------------------------ ranks over the catalog


def test_mean_over_orders_aligns_scores_by_item():
  example = lambda user, candidates: SimpleNamespace(user=user, candidates=candidates)  # noqa: E731
  runs = [([example(0, (5, 7, 9)), example(1, (2, 3))], [np.array([-1.0, -2.0, -3.0]), np.array([-0.5, -4.0])]),
          ([example(0, (9, 5, 7)), example(1, (3, 2))], [np.array([-5.0, -3.0, -6.0]), np.array([-2.0, -1.5])])]
  got = rank_stage.mean_over_orders(runs)
  np.testing.assert_allclose(got[0], [(-1 - 3) / 2, (-2 - 6) / 2, (-3 - 5) / 2])   # items 5, 7, 9
  np.testing.assert_allclose(got[1], [(-0.5 - 1.5) / 2, (-4 - 2) / 2])             # items 2, 3
  np.testing.assert_allclose(rank_stage.mean_over_orders(runs[:1])[0], runs[0][1][0])
  runs[1][0][1] = example(1, (3, 4))
  with pytest.raises(ValueError, match='user 1 was shown other candidates'):
    rank_stage.mean_over_orders(runs)


def test_catalog_rank():
  candidates = [7, 3, 9, 4]  # retriever order
  ranked = [9, 7, 3, 4]      # the LLM wrote 9 then 7 (generate mode stops early); the rest keep their order
  assert rank_stage.catalog_rank(ranked, 9, retriever_rank=2) == 0
  assert rank_stage.catalog_rank(ranked, 4, retriever_rank=3) == 3
  assert rank_stage.catalog_rank(ranked, 2, retriever_rank=5) == 5  # missed by the retriever
  assert rank_stage.catalog_rank(candidates, 3, retriever_rank=1) == 1
  with pytest.raises(ValueError, match='not among the candidates'):
    rank_stage.catalog_rank(ranked, 2, retriever_rank=1)
  # With the LLM's scores, ties count against the target; unscored candidates tie with each other.
  scores = {9: -1.0, 7: -1.0, 3: -np.inf}
  assert rank_stage.catalog_rank(ranked, 9, 2, scores) == 1
  assert rank_stage.catalog_rank(ranked, 7, 0, scores) == 1
  assert rank_stage.catalog_rank(ranked, 3, 1, scores) == 3
  assert rank_stage.catalog_rank(ranked, 4, 3, scores) == 3
  assert rank_stage.catalog_rank(ranked, 2, 5, scores) == 5


def test_pessimistic_rank_counts_ties_against_the_target():
  scores = np.array([0.5, 2.0, 0.5, 0.5, -np.inf, -np.inf])
  assert [rank.pessimistic_rank(scores, k) for k in range(6)] == [3, 0, 3, 3, 5, 5]
  assert [rank.pessimistic_rank(np.zeros(8), k) for k in range(8)] == [7] * 8


def test_decoder_scores_share_a_score_across_tied_choices():
  decoder = rank._Decoder([np.array([5]), np.array([6]), np.array([7]), np.array([8]), np.array([9])], [1], 4)
  decoder.order = [2, 0, 4, 1]  # 3 unwritten
  np.testing.assert_array_equal(decoder.scores(5), [-1, -3, 0, -np.inf, -2])
  decoder.ties = {1: {1}}       # position 1 could as well have been item 1 (written at 3): 1..3 tie
  np.testing.assert_array_equal(decoder.scores(5), [-3, -3, 0, -np.inf, -3])
  decoder.ties = {0: {4}, 2: {3}}  # 0..2 tie; 2 could have been the unwritten 3: 0..3 tie with the tail
  assert np.isneginf(decoder.scores(5)).all()


def test_generate_scores_without_ties_are_the_written_order(model):
  rng = np.random.default_rng(3)
  prompts_ = random_prompts(rng, (7, 3, 15))
  candidates = [tagged_candidates(rng, 6) for _ in prompts_]
  kw = dict(separator=[1, 2], max_items=4, batch_size=2, buckets=BUCKETS)
  orders = rank.generate_ranking(model, prompts_, candidates, **kw)
  scores = rank.generate_scores(model, prompts_, candidates, **kw)
  for order, row in zip(orders, scores):
    expected = np.full(6, -np.inf)
    expected[order] = -np.arange(len(order))
    np.testing.assert_array_equal(row, expected)


def constant_llama(vocab):
  """Every logit 0: the model cannot tell any candidate from another."""
  config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=8)
  model = Llama(config, nnx.Rngs(0))
  model.lm_head.kernel.value = jnp.zeros_like(model.lm_head.kernel.value)
  return model


@pytest.mark.parametrize('mode,task,max_items', [('score', 'recommend_retrieval', 4),
                                                 ('likelihood', 'recommend_retrieval', 4),
                                                 ('likelihood', 'recommend', 4),
                                                 ('generate', 'recommend_retrieval', 4),
                                                 ('generate', 'recommend', 2)])
def test_a_constant_model_ranks_every_target_last(tmp_path, mode, task, max_items):
  """The issue's all-zero model: every candidate ties, so the target is last among the (up to) 4, in every
  mode (its prompt position gave HR@1 > 0 before)."""
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp_path / 'candidates', inter, split, count=4)
  tok = tiny_tokenizer()
  config = tiny_config(num_candidates=4)
  config.prompts.candidate_order = 'retriever'
  config.rank.reduce, config.rank.max_items, config.rank.batch_size = 'mean', max_items, 2
  builder = prompts.PromptBuilder(config, inter, tok, tasks=(task,))
  ctx = SimpleNamespace(workdir=epath.Path(tmp_path), split=split, config=config, placement=Placement(),
                        profiles=lambda: None)
  users = np.arange(len(split.train))
  out = rank_stage.rank_split(ctx, constant_llama(len(tok)), builder, 'test', users, mode)
  rows = [json.loads(line) for line in (tmp_path / 'candidates' / 'test.jsonl').read_text().splitlines()]
  retrieved = [r['target'] in r['items'] for r in rows]
  assert any(retrieved) and not all(retrieved)  # (user 3 has 3 unwatched items: 3 candidates)
  assert out['ranks'] == [len(r['items']) - 1 if hit else r['target_rank'] for hit, r in zip(retrieved, rows)]
  if mode != 'likelihood':  # exact ties keep the retriever's order (mean log-likelihoods differ in their last bits)
    assert out['items'] == [r['items'] for r in rows]
  assert [sorted(x) for x in out['items']] == [sorted(r['items']) for r in rows]
  assert all(metrics.metrics_from_ranks(out['ranks'], [1, 2])[f'HR@{k}'] == 0 for k in (1, 2))  # K < ties
