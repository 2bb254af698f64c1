"""The sequence-aware retriever: transition counts and queries against loops, fused top-K against numpy,
ties counted against the target, and no leak of a held-out or later event into the transitions."""
import jax
import numpy as np
import pytest

from palr_jax import defaults
from palr_jax import metrics
from palr_jax import sharding
from palr_jax.retrieval import candidates
from palr_jax.retrieval import topk
from palr_jax.retrieval import transitions


def dense_counts(histories, num_items, window, decay):
  """The dense [I, I] table the retriever used before the sparse one (issue 28), as a reference."""
  counts = np.zeros(num_items * num_items, np.float64)
  for d in range(1, window + 1):
    src = [np.asarray(h[:-d], np.int64) for h in histories if len(h) > d]
    if not src:
      break
    dst = np.concatenate([np.asarray(h[d:], np.int64) for h in histories if len(h) > d])
    counts += decay ** (d - 1) * np.bincount(np.concatenate(src) * num_items + dst,
                                             minlength=num_items * num_items)
  return counts.reshape(num_items, num_items).astype(np.float32)


def test_transition_counts_and_queries_equal_loops():
  rng = np.random.default_rng(0)
  histories = [rng.integers(0, 9, rng.integers(0, 12)) for _ in range(15)]
  counts = transitions.transition_table(histories, 9, window=3, decay=0.5, top_m=9).dense()
  expected = np.zeros((9, 9))
  for h in histories:
    for t in range(len(h)):
      for d in range(1, 4):
        if t + d < len(h):
          expected[h[t], h[t + d]] += 0.5 ** (d - 1)
  np.testing.assert_allclose(counts, expected)
  items, weights = transitions.recent_items(histories, 4, decay=0.7)
  for h, row, w in zip(histories, items, weights):
    last = list(h[::-1][:4])
    assert row.tolist() == last + [-1] * (4 - len(last))
    np.testing.assert_allclose(w, [0.7 ** k if k < len(last) else 0.0 for k in range(4)], rtol=1e-6)
  with pytest.raises(ValueError, match='transition_window'):
    transitions.transition_table(histories, 9, window=0, decay=1.0, top_m=9)


def numpy_fused(users, items, table, recent, weights, w, histories, targets, k):
  """Fused scores by the definition: z over the catalog of each of MF and transitions, mixed, masked."""
  mf = users.astype(np.float64) @ items.T.astype(np.float64)
  tr = np.stack([sum(wt * table[i].astype(np.float64) for i, wt in zip(r, ws) if i >= 0) + 0 * mf[0]
                 for r, ws in zip(recent, weights)])
  z = lambda x: (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)  # noqa: E731
  scores = (1 - w) * z(mf) + w * z(tr)
  target_scores = scores[np.arange(len(users)), targets]
  for u, h in enumerate(histories):
    scores[u, h] = -np.inf
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return order, (scores >= target_scores[:, None]).sum(1) - 1


def fused_problem(seed=0, num_users=23, num_items=37):
  rng = np.random.default_rng(seed)
  users = rng.normal(size=(num_users, 6)).astype(np.float32)
  items = rng.normal(size=(num_items, 6)).astype(np.float32)
  histories = [rng.choice(num_items, rng.integers(1, 12), replace=False) for _ in range(num_users)]
  targets = np.array([rng.choice(np.setdiff1d(np.arange(num_items), h)) for h in histories])
  table = dense_counts(histories, num_items, 2, 0.5) + rng.random((num_items, num_items)) * 0.01
  recent, weights = transitions.recent_items(histories, 3, 0.8)
  return users, items, histories, targets, table.astype(np.float32), recent, weights


@pytest.mark.parametrize('sharded', [False, True])
def test_fused_top_k_equals_numpy(sharded):
  users, items, histories, targets, table, recent, weights = fused_problem()
  mesh = sharding.make_mesh(defaults.get_config().mesh) if sharded else None
  _, got, ranks = topk.top_k(users, items, histories, 5, user_batch=8, targets=targets, mesh=mesh,
                             transitions=transitions.Table.from_dense(table), recent=recent, recent_weights=weights,
                             transition_weight=0.4)
  order, expected_ranks = numpy_fused(users, items, table, recent, weights, 0.4, histories, targets, 5)
  np.testing.assert_array_equal(got, order)
  np.testing.assert_array_equal(ranks, expected_ranks)


def test_a_scorer_that_cannot_tell_items_apart_ranks_the_target_last():
  """Every score equal: the target is ranked behind every unmasked item, so HR@K is 0, never 1."""
  rng = np.random.default_rng(1)
  histories = [rng.choice(50, 5, replace=False) for _ in range(12)]
  targets = np.array([np.setdiff1d(np.arange(50), h)[0] for h in histories])
  _, _, ranks = topk.top_k(np.zeros((12, 4), np.float32), np.ones((50, 4), np.float32), histories, 10,
                           user_batch=16, targets=targets)
  np.testing.assert_array_equal(ranks, 50 - 5 - 1)
  assert metrics.metrics_from_ranks(ranks, [10])['HR@10'] == 0.0
  # The same through the fused path: zero factors and an all-zero transition table.
  table = transitions.Table.from_dense(np.zeros((50, 50), np.float32))
  recent, weights = transitions.recent_items(histories, 3, 1.0)
  _, _, ranks = topk.top_k(np.zeros((12, 4), np.float32), np.ones((50, 4), np.float32), histories, 10,
                           user_batch=16, targets=targets, transitions=table, recent=recent,
                           recent_weights=weights, transition_weight=0.5)
  np.testing.assert_array_equal(ranks, 50 - 5 - 1)


def test_cross_fitted_transitions_never_count_the_users_own_events():
  """User 0 alone goes from item 30 to item 31, its last training target: a leaky table (counting user 0)
  ranks item 31 first from the query item 30; the cross-fitted one cannot tell it from unseen items."""
  rng = np.random.default_rng(2)
  train = [rng.permutation(30)[:8] for _ in range(10)]
  train[0] = np.concatenate([train[0], [30, 31]])
  config = defaults.get_config().retriever
  config.update(factors=4, reg=1.0, alpha=2.0, iterations=3, num_candidates=5, folds=2, user_batch=16,
                transition_weight=1.0, transition_items=1, transition_window=1, transition_decay=1.0)
  folds = np.arange(10) % 2
  users, positions = candidates.train_positions(train, 1)
  ranking = candidates.cross_fit_fold(train, 32, folds, 0, users, positions, config, jax.random.key(0))
  (row,) = np.flatnonzero(ranking.users == 0)
  assert ranking.targets[row] == 31 and ranking.positions[row] == 9
  table = candidates.transition_table([h if folds[u] else h[:0] for u, h in enumerate(train)], 32,
                                      config).dense()
  assert table[30, 31] == 0 and table[:, 31].sum() == 0 and table[:, 30].sum() == 0
  assert ranking.ranks[row] == 32 - 9 - 1                  # tied with every unmasked item: ranked last
  leaky = candidates.transition_table(train, 32, config)
  assert leaky.dense()[30, 31] == 1
  leaky_ranking = candidates.rank(np.zeros((1, 4), np.float32), np.ones((32, 4), np.float32),
                                  [train[0][:9]], np.array([0]), np.array([31]), config, table=leaky)
  assert leaky_ranking.ranks[0] == 0


def test_held_out_items_are_not_counted_by_the_retriever_stage(tmp_path):
  """The stage's valid table is counted from train only, its test table from train + valid: a user's
  valid (test) item, planted so that only that user reaches it, gets no transition score for them."""
  from palr_jax.stages import context, retriever
  from palr_jax.data import interactions as interactions_lib
  from tests import pipeline_fixtures
  pipeline_fixtures.write_dataset(tmp_path / 'data')
  config = pipeline_fixtures.config(tmp_path)
  config.retriever.update(transition_weight=1.0, transition_items=1, transition_window=1)
  inter = interactions_lib.load(config.data)
  # Plant: user 0's valid and test items become two new items nobody else has.
  seqs = [s.copy() for s in inter.sequences]
  num = len(inter.item_ids)
  seqs[0][-2:] = [num, num + 1]
  planted = interactions_lib.Interactions(
      name='tiny', user_ids=inter.user_ids, item_ids=np.append(inter.item_ids, ['P1', 'P2']), sequences=seqs,
      timestamps=inter.timestamps, titles=inter.titles + ['P1', 'P2'], genres=inter.genres + [(), ()],
      user_features=inter.user_features)
  ctx = context.Context(config, tmp_path / 'w')
  ctx.inter, ctx.split = planted, interactions_lib.leave_one_out(planted)
  retriever.run(ctx)
  import json
  rows = {which: [json.loads(line) for line in (tmp_path / 'w' / 'candidates' / f'{which}.jsonl').open()]
          for which in ('valid', 'test')}
  valid, test = rows['valid'][0], rows['test'][0]
  assert valid['target'] == num and test['target'] == num + 1
  unmasked = num + 2 - len(set(ctx.split.train[0].tolist()))
  assert valid['target_rank'] == unmasked - 1             # no transition score: ranked last among ties
  assert test['target_rank'] == unmasked - 1 - 1          # (the valid item joins the history)
