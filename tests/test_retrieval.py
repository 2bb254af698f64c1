"""Retriever: top-K and ranks vs numpy, the item-sharded top-K, iALS solves vs closed form, BPR, the
cross-fitted train candidates (no leak of the target), and the retrieve CLI on a tiny dataset."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from palr_jax import defaults as common
from palr_jax import sharding
from palr_jax.data import interactions
from palr_jax.retrieval import candidates
from palr_jax.retrieval import mf
from palr_jax.retrieval import topk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def retriever_config(**overrides):
  c = common.get_config().retriever
  c.update(dict(factors=8, reg=0.5, alpha=4.0, iterations=6, solve_chunk=64, num_candidates=5,
                user_batch=16, folds=2, transition_weight=0.0))
  c.update(overrides)
  return c


def random_problem(num_users=37, num_items=101, factors=8, seed=0):
  rng = np.random.default_rng(seed)
  users = rng.normal(size=(num_users, factors)).astype(np.float32)
  items = rng.normal(size=(num_items, factors)).astype(np.float32)
  histories = [rng.choice(num_items, size=rng.integers(0, 30), replace=False) for _ in range(num_users)]
  targets = np.array([rng.choice(np.setdiff1d(np.arange(num_items), h)) for h in histories])
  return users, items, histories, targets


def numpy_top_k(users, items, histories, targets, k):
  scores = users.astype(np.float64) @ items.T.astype(np.float64)
  target_scores = scores[np.arange(len(users)), targets]
  for u, h in enumerate(histories):
    scores[u, h] = -np.inf
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return (np.take_along_axis(scores, order, axis=1), order,
          (scores >= target_scores[:, None]).sum(axis=1) - 1)   # ties count against the target


# ------------------------------------------------------------------------------------------ top-K


def test_top_k_matches_numpy_with_history_mask():
  users, items, histories, targets = random_problem()
  scores, indices, ranks = topk.top_k(users, items, histories, 7, user_batch=16, targets=targets)
  ref_scores, ref_indices, ref_ranks = numpy_top_k(users, items, histories, targets, 7)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ranks, ref_ranks)
  for u, h in enumerate(histories):
    assert not set(indices[u]) & set(h)
  hits = ranks < 7
  np.testing.assert_array_equal(indices[hits, ranks[hits]], targets[hits])


def test_top_k_without_targets_returns_no_ranks():
  users, items, histories, _ = random_problem()
  scores, indices, ranks = topk.top_k(users, items, histories, 3, user_batch=64)
  assert ranks is None and scores.shape == indices.shape == (37, 3)


@pytest.mark.parametrize('num_items,k', [(101, 20), (96, 5)])
def test_sharded_top_k_equals_single_device(num_items, k):
  """101 items over 8 devices pads to 104 (13 per shard, fewer than k=20); 96 divides evenly."""
  mesh = sharding.make_mesh(common.get_config().mesh)
  assert mesh.devices.size == 8
  users, items, histories, targets = random_problem(num_items=num_items, seed=1)
  single = topk.top_k(users, items, histories, k, user_batch=16, targets=targets)
  sharded = topk.top_k(users, items, histories, k, user_batch=16, targets=targets, mesh=mesh)
  np.testing.assert_array_equal(sharded[1], single[1])
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6)
  np.testing.assert_array_equal(sharded[2], single[2])
  assert sharded[1].max() < num_items


def test_user_with_short_catalog_gets_minus_inf_tail():
  items = np.eye(4, dtype=np.float32)
  scores, indices, _ = topk.top_k(np.ones((1, 4), np.float32), items, [np.array([0, 1, 2])], 2,
                                  user_batch=1)
  assert indices[0, 0] == 3 and np.isneginf(scores[0, 1])


def test_top_k_rejects_bad_arguments():
  users, items, histories, targets = random_problem()
  with pytest.raises(ValueError, match='k=102'):
    topk.top_k(users, items, histories, 102, user_batch=8)
  with pytest.raises(ValueError, match='36 histories for 37 users'):
    topk.top_k(users, items, histories[1:], 3, user_batch=8)
  with pytest.raises(ValueError, match='targets'):
    topk.top_k(users, items, histories, 3, user_batch=8, targets=targets + 101)
  with pytest.raises(ValueError, match='width=2'):
    topk.pad_histories([np.arange(3)], width=2)


def test_pad_histories():
  np.testing.assert_array_equal(topk.pad_histories([np.array([4, 2]), np.array([], int)]),
                                [[4, 2], [-1, -1]])


# ------------------------------------------------------------------------------------------ iALS


def closed_form_user(items, history, reg, alpha):
  """x = (Y^T C Y + reg I)^-1 Y^T C p with dense C = 1 + alpha r, p = 1[r > 0] (Hu et al. eq. 4)."""
  r = np.bincount(history, minlength=len(items)).astype(np.float64)
  c, p, y = 1 + alpha * r, (r > 0).astype(np.float64), items.astype(np.float64)
  return np.linalg.solve(y.T @ (c[:, None] * y) + reg * np.eye(y.shape[1]), y.T @ (c * p))


def test_fold_in_equals_dense_closed_form():
  rng = np.random.default_rng(0)
  items = rng.normal(size=(50, 6)).astype(np.float32)
  histories = [np.array([3, 7, 7, 20]), np.array([], np.int64), np.arange(40), np.array([49])]
  config = retriever_config(reg=0.3, alpha=2.5, solve_chunk=32)  # several chunk widths and sizes
  got = np.asarray(mf.fold_in_users(items, histories, config))
  for u, h in enumerate(histories):
    np.testing.assert_allclose(got[u], closed_form_user(items, h, 0.3, 2.5), rtol=2e-4, atol=1e-5)
  np.testing.assert_array_equal(got[1], 0)


def block_histories(num_users=24, items_per_block=10, length=6, seed=0):
  """Two taste groups: even users consume items 0..9, odd users items 10..19."""
  rng = np.random.default_rng(seed)
  return [rng.choice(items_per_block, size=length, replace=False) + items_per_block * (u % 2)
          for u in range(num_users)]


def unseen_own_group_auc(scores, histories):
  """Mean over users of P(an unseen own-group item outscores an other-group item)."""
  aucs = []
  for u, h in enumerate(histories):
    own = np.setdiff1d(np.arange(10) + 10 * (u % 2), h)
    other = np.arange(10) + 10 * (1 - u % 2)
    aucs.append((scores[u, own][:, None] > scores[u, other][None, :]).mean())
  return np.mean(aucs)


def test_fit_ials_learns_groups_and_ends_with_exact_user_step():
  histories = block_histories()
  config = retriever_config(factors=4)
  users, items = mf.fit_ials(histories, 20, config, jax.random.key(0))
  scores = np.asarray(users @ items.T)
  assert unseen_own_group_auc(scores, histories) > 0.95
  np.testing.assert_allclose(mf.fold_in_users(items, histories, config), users, rtol=1e-4, atol=1e-5)


def test_cg_solver_matches_cholesky():
  """CG half-steps (enough steps to converge on F = 4) reproduce the exact fit; a few warm-started steps
  stay close, and both end with the exact user step."""
  histories = block_histories(num_users=40, length=7)
  exact = mf.fit_ials(histories, 20, retriever_config(factors=4), jax.random.key(2))
  converged = mf.fit_ials(histories, 20, retriever_config(factors=4, solver='cg', cg_steps=8),
                          jax.random.key(2))
  for a, b in zip(exact, converged):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
  users, items = mf.fit_ials(histories, 20, retriever_config(factors=4, solver='cg', cg_steps=3),
                             jax.random.key(2))
  exact_scores, scores = np.asarray(exact[0] @ exact[1].T), np.asarray(users @ items.T)
  assert np.linalg.norm(scores - exact_scores) < 0.05 * np.linalg.norm(exact_scores)
  assert unseen_own_group_auc(scores, histories) > 0.95
  np.testing.assert_allclose(mf.fold_in_users(items, histories, retriever_config(factors=4)), users,
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='solver'):
    mf.fit_ials(histories, 20, retriever_config(solver='lu'), jax.random.key(0))


def test_cg_chunk_solve_equals_closed_form():
  """One chunk's CG solve from a cold start with F steps equals the dense closed form per row."""
  rng = np.random.default_rng(3)
  items = rng.normal(size=(30, 5)).astype(np.float32)
  histories = [np.array([1, 4, 4, 9]), np.arange(12), np.array([29])]
  rows, cols, counts = mf.interaction_counts(histories, 30)
  chunks = mf._chunks(rows, cols, counts, 3, 5, 64)
  got = np.asarray(mf._solve_side(items, chunks, 3, 0.7, 3.0, np.zeros((3, 5), np.float32), cg_steps=10))
  for u, h in enumerate(histories):
    np.testing.assert_allclose(got[u], closed_form_user(items, h, 0.7, 3.0), rtol=1e-3, atol=1e-4)


def test_emptied_user_leaves_item_factors_as_if_absent():
  histories = block_histories()
  config = retriever_config(factors=4)
  emptied = [h if u != 3 else h[:0] for u, h in enumerate(histories)]
  users, items = mf.fit_ials(emptied, 20, config, jax.random.key(1))
  _, items_without = mf.fit_ials(histories[:3] + histories[4:], 20, config, jax.random.key(1))
  np.testing.assert_allclose(items, items_without, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(users[3], 0)


def test_fit_rejects_bad_input():
  with pytest.raises(ValueError, match='row 1 holds item index 20'):
    mf.fit_ials([np.array([1]), np.array([20])], 20, retriever_config(), jax.random.key(0))
  with pytest.raises(ValueError, match="model='svd'"):
    mf.fit([np.array([1])], 20, retriever_config(model='svd'), jax.random.key(0))


def test_fit_bpr_learns_groups():
  histories = block_histories()
  config = retriever_config(model='bpr', factors=4, learning_rate=0.05, epochs=40, batch_size=32,
                            bpr_reg=1e-4)
  users, items = mf.fit(histories, 20, config, jax.random.key(0))
  scores = np.asarray(users @ items.T)
  assert unseen_own_group_auc(scores, histories) > 0.95


# ------------------------------------------------------------------------------------------ candidates


def test_train_positions_skip_repeats_and_keep_most_recent():
  train = [np.array([5, 6, 5, 7, 8]), np.array([1]), np.array([2, 3])]
  users, positions = candidates.train_positions(train, 0)
  np.testing.assert_array_equal(users, [0, 0, 0, 2])
  np.testing.assert_array_equal(positions, [1, 3, 4, 1])  # p=2 repeats item 5
  users, positions = candidates.train_positions(train, 2)
  np.testing.assert_array_equal(positions, [3, 4, 1])


def test_user_folds_are_balanced_and_seeded():
  folds = candidates.user_folds(11, 3, jax.random.key(0))
  assert sorted(np.bincount(folds)) == [3, 4, 4]
  np.testing.assert_array_equal(folds, candidates.user_folds(11, 3, jax.random.key(0)))
  with pytest.raises(ValueError, match='folds=1'):
    candidates.user_folds(11, 1, jax.random.key(0))


def test_cross_fit_rows_never_see_their_target():
  """User 0 alone consumed item 20, its last train target: the fold model never saw the pair."""
  train = block_histories()
  train[0] = np.append(train[0], 20)
  config = retriever_config(factors=4, num_candidates=8)
  folds = (np.arange(24) // 2) % 2       # both taste groups in both folds
  users, positions = candidates.train_positions(train, 3)
  ranking = candidates.cross_fit_fold(train, 21, folds, 0, users, positions, config, jax.random.key(0))
  assert set(ranking.users.tolist()) == {u for u in range(24) if folds[u] == 0}

  # Reference built independently: item factors fitted on the other fold's users only.
  _, items = mf.fit_ials([h for u, h in enumerate(train) if folds[u] == 1], 21, config,
                         jax.random.key(0))
  items = np.asarray(items, np.float64)
  np.testing.assert_array_equal(items[20], 0)   # nobody else has item 20
  for n, (u, p) in enumerate(zip(ranking.users, ranking.positions)):
    prefix, target = train[u][:p], train[u][p]
    assert ranking.targets[n] == target and target not in prefix
    scores = items @ closed_form_user(items, prefix, config.reg, config.alpha)
    target_score = scores[target]
    scores[prefix] = -np.inf
    assert (scores > target_score + 1e-5).sum() <= ranking.ranks[n] <= (scores > target_score - 1e-5).sum() - 1
    assert not set(ranking.items[n].tolist()) & set(prefix.tolist())
    if ranking.ranks[n] < 8:   # the item at the target's rank scores as high (a tie or the target)
      assert ranking.scores[n][ranking.ranks[n]] == pytest.approx(target_score, abs=1e-5)
      assert target in ranking.items[n]

  # The row for item 20 ranks it behind the user's 4 unseen own-group items; a model that saw the
  # pair (a leaky fit on all users) ranks it higher.
  (row,) = np.flatnonzero((ranking.users == 0) & (ranking.positions == len(train[0]) - 1))
  assert ranking.ranks[row] >= 4
  _, leaky_items = mf.fit_ials(train, 21, config, jax.random.key(0))
  leaky_items = np.asarray(leaky_items, np.float64)
  leaky = leaky_items @ closed_form_user(leaky_items, train[0][:-1], config.reg, config.alpha)
  leaky[train[0][:-1]] = -np.inf
  assert (leaky > leaky[20]).sum() < ranking.ranks[row]


def test_rows_use_raw_ids():
  ranking = candidates.Ranking(users=np.array([1]), targets=np.array([2]), scores=np.array([[0.5, 0.25]]),
                               items=np.array([[2, 0]]), ranks=np.array([0]), positions=np.array([3]))
  (row,) = candidates.rows(ranking, np.array(['u0', 'u1']), np.array(['a', 'b', 'c']))
  assert row == {'user': 'u1', 'user_index': 1, 'target': 2, 'target_id': 'c', 'items': [2, 0],
                 'item_ids': ['c', 'a'], 'scores': [0.5, 0.25], 'target_rank': 0, 'position': 3}


# ------------------------------------------------------------------------------------------ CLI


def write_tiny_recbole(directory, num_users=12, num_items=15, length=7, seed=0):
  """A RecBole atomic dataset with raw ids unlike the dense indices (u100.., i500..)."""
  rng = np.random.default_rng(seed)
  lines = ['user_id:token\titem_id:token\trating:float\ttimestamp:float']
  for u in range(num_users):
    for t, i in enumerate(rng.choice(num_items, size=length, replace=False)):
      lines.append(f'u{100 + u}\ti{500 + i}\t4\t{1000 * u + t}')
  (directory / 'tiny.inter').write_text('\n'.join(lines) + '\n')
  items = ['item_id:token\tmovie_title:token_seq'] + [f'i{500 + i}\tMovie {i}' for i in range(num_items)]
  (directory / 'tiny.item').write_text('\n'.join(items) + '\n')


def test_retrieve_cli_writes_candidates_and_results(tmp_path):
  data, workdir = tmp_path / 'data', tmp_path / 'work'
  data.mkdir()
  write_tiny_recbole(data)
  overrides = dict(factors=4, iterations=2, folds=2, num_candidates=3, max_train_positions=2,
                   transition_weight=0.0)
  cmd = [sys.executable, '-m', 'palr_jax.main', '--config', os.path.join(REPO, 'configs/ml100k.py'),
         '--workdir', str(workdir), '--stages', 'retriever', f'--config.data.path={data}', '--config.data.name=tiny',
         '--config.eval.ks=(1,3)', '--config.retriever.search.reg=(0.1,1.0)']
  cmd += [f'--config.retriever.{k}={v}' for k, v in overrides.items()]
  cmd += [f'--config.retriever.search.transition_{k}=()' for k in ('weight', 'items', 'window', 'decay')]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'retriever: done in' in proc.stdout and 'test HR@10' not in proc.stderr  # library logs: W/logs
  assert 'test HR@10' in ''.join(p.read_text() for p in (workdir / 'logs').rglob('palr_jax.main.*.log.INFO.*'))

  data_config = common.get_config().data
  data_config.path, data_config.name = str(data), 'tiny'
  inter = interactions.load(data_config)
  split = interactions.leave_one_out(inter)
  rows = {}
  for name in ('train', 'valid', 'test'):
    with open(workdir / 'candidates' / f'{name}.jsonl') as f:
      rows[name] = [json.loads(line) for line in f]
  keys = {'user', 'user_index', 'target', 'target_id', 'items', 'item_ids', 'scores', 'target_rank'}
  assert len(rows['valid']) == len(rows['test']) == 12
  assert len(rows['train']) == 12 * 2  # 5 train items each: positions 3 and 4
  for name, expected in (('train', keys | {'position'}), ('valid', keys), ('test', keys)):
    for row in rows[name]:
      assert set(row) == expected
      assert len(row['items']) == len(row['scores']) == 3
      u = row['user_index']
      assert row['user'] == inter.user_ids[u] and row['target_id'] == inter.item_ids[row['target']]
      assert row['item_ids'] == [inter.item_ids[i] for i in row['items']]
      assert row['scores'] == sorted(row['scores'], reverse=True)
      rank = row['target_rank']
      if row['target'] in row['items']:
        assert row['items'].index(row['target']) <= rank  # earlier only when tied (ties count against it)
      else:
        assert rank >= 3                                  # fewer than 3 items score at least as high
  for row in rows['valid']:
    u = row['user_index']
    assert row['target'] == split.valid[u] and not set(row['items']) & set(split.train[u].tolist())
  for row in rows['test']:
    u = row['user_index']
    seen = set(split.train[u].tolist()) | {int(split.valid[u])}
    assert row['target'] == split.test[u] and not set(row['items']) & seen
  for row in rows['train']:
    u, p = row['user_index'], row['position']
    assert row['target'] == split.train[u][p] and not set(row['items']) & set(split.train[u][:p].tolist())

  results = json.loads((workdir / 'retriever_results.json').read_text())
  assert [p['reg'] for p in results['search']] == [0.1, 1.0]
  assert results['hyperparameters']['reg'] in (0.1, 1.0)
  for split in ('valid', 'test', 'train'):
    assert {'HR@1', 'NDCG@3', 'Recall@3', 'MRR'} <= set(results[split])
  ranks = np.array([r['target_rank'] for r in rows['test']])
  assert results['test']['HR@3'] == pytest.approx((ranks < 3).mean())
  assert json.loads((workdir / 'retriever.fingerprint.json').read_text())['stage'] == 'retriever'


def test_search_grid():
  from palr_jax.stages import retriever as retrieve
  config = common.get_config().retriever
  assert retrieve.search_grid(config) == [{}]
  config.search.factors, config.search.reg = (8, 16), (0.1,)
  assert retrieve.search_grid(config) == [{'factors': 8, 'reg': 0.1}, {'factors': 16, 'reg': 0.1}]
  config.search.bogus = (1,)
  with pytest.raises(ValueError, match="'bogus'"):
    retrieve.search_grid(config)
  del config.search['bogus'], config.search['alpha']
  config.search.alpha = 5.0
  with pytest.raises(ValueError, match='search.alpha=5.0: expected a tuple'):
    retrieve.search_grid(config)


# ------------------------------------------------------------------ sparse transitions (issue 28)


def loop_counts(histories, num_items, window, decay):
  """Dense [I, I] decayed successor counts by the definition (the retriever's table before issue 28)."""
  out = np.zeros((num_items, num_items))
  for h in histories:
    for t in range(len(h)):
      for d in range(1, window + 1):
        if t + d < len(h):
          out[h[t], h[t + d]] += decay ** (d - 1)
  return out


def test_sparse_table_equals_dense_counts_and_keeps_each_rows_top_m():
  from palr_jax.retrieval import transitions
  rng = np.random.default_rng(3)
  histories = [rng.integers(0, 40, rng.integers(0, 25)) for _ in range(30)] + [np.zeros(0, np.int64)]
  dense = loop_counts(histories, 40, 3, 0.6)
  full = transitions.transition_table(histories, 40, 3, 0.6, top_m=40)
  np.testing.assert_allclose(full.dense(), dense, rtol=1e-6)
  assert full.width == (dense > 0).sum(1).max()
  cut = transitions.transition_table(histories, 40, 3, 0.6, top_m=3)
  for i in range(40):
    row = cut.indices[cut.indptr[i]:cut.indptr[i + 1]]
    support = np.flatnonzero(dense[i] > 0)
    expected = sorted(support, key=lambda j: (-round(dense[i, j], 5), j))[:3]  # largest, then smaller item
    assert row.tolist() == expected
    np.testing.assert_allclose(cut.values[cut.indptr[i]:cut.indptr[i + 1]], dense[i, expected], rtol=1e-6)
  with pytest.raises(ValueError, match='transition_top_m'):
    transitions.transition_table(histories, 40, 1, 1.0, top_m=0)
  with pytest.raises(ValueError, match='num_items=40'):
    transitions.transition_table([np.array([1, 40])], 40, 1, 1.0, top_m=4)


@pytest.mark.parametrize('top_m', [2, 64])
def test_sparse_fused_rank_equals_dense_scorer_single_and_sharded(top_m):
  """candidates.rank with the sparse table equals the fused scores by definition over the kept counts
  (all of them when top_m >= every row's support), on one device and item-sharded over 8."""
  from palr_jax.retrieval import transitions
  rng = np.random.default_rng(4)
  num_users, num_items = 29, 61
  users = rng.normal(size=(num_users, 5)).astype(np.float32)
  items = rng.normal(size=(num_items, 5)).astype(np.float32)
  histories = [rng.choice(num_items, rng.integers(2, 15), replace=False) for _ in range(num_users)]
  targets = np.array([rng.choice(np.setdiff1d(np.arange(num_items), h)) for h in histories])
  config = retriever_config(transition_weight=0.35, transition_items=3, transition_window=2,
                            transition_decay=0.7, transition_top_m=top_m, num_candidates=6)
  table = candidates.transition_table(histories, num_items, config)
  dense = loop_counts(histories, num_items, 2, 0.7)
  if top_m == 64:
    np.testing.assert_allclose(table.dense(), dense, rtol=1e-6)
  recent, weights = transitions.recent_items(histories, 3, 0.7)
  mf_scores = users.astype(np.float64) @ items.T.astype(np.float64)
  tr = np.stack([sum(w * table.dense()[i].astype(np.float64) for i, w in zip(r, ws) if i >= 0)
                 for r, ws in zip(recent, weights)])
  z = lambda x: (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)  # noqa: E731
  scores = 0.65 * z(mf_scores) + 0.35 * z(tr)
  target_scores = scores[np.arange(num_users), targets]
  for u, h in enumerate(histories):
    scores[u, h] = -np.inf
  expected_ranks = (scores >= target_scores[:, None]).sum(1) - 1
  expected_items = np.argsort(-scores, axis=1, kind='stable')[:, :6]
  mesh = sharding.make_mesh(common.get_config().mesh)
  for m in (None, mesh):
    got = candidates.rank(users, items, histories, np.arange(num_users), targets, config, m, table=table)
    np.testing.assert_array_equal(got.ranks, expected_ranks)
    np.testing.assert_array_equal(got.items, expected_items)


@pytest.mark.parametrize('weight', [0.0, 0.35, 0.9])
def test_fused_top_k_equals_reference_path_with_pessimistic_ties(weight):
  """top_k's one-device fused path (moments from item statistics and sparse entries, the affine map on
  the top values only) equals the reference `_scores` path: items, ranks, scores; with tied items
  (duplicate item vectors, zero user vectors) the target still ranks after its ties."""
  from palr_jax.retrieval import transitions
  rng = np.random.default_rng(6)
  num_users, num_items = 41, 90
  users = rng.normal(size=(num_users, 6)).astype(np.float32)
  users[:5] = 0  # every MF score tied
  items = rng.normal(size=(num_items, 6)).astype(np.float32)
  items[45:] = items[:45]  # pairs of identical items
  histories = [rng.choice(num_items, rng.integers(1, 12), replace=False) for _ in range(num_users)]
  targets = np.array([rng.choice(np.setdiff1d(np.arange(num_items), h)) for h in histories])
  table = transitions.transition_table(histories, num_items, 2, 0.7, 16)
  recent, weights = transitions.recent_items(histories, 3, 0.7)
  kw = dict(user_batch=16, targets=targets, transitions=table, recent=recent, recent_weights=weights,
            transition_weight=weight)
  ref = topk.top_k(users, items, histories, 7, fused=False, **kw)
  got = topk.top_k(users, items, histories, 7, fused=True, **kw)
  np.testing.assert_array_equal(got[2], ref[2])
  np.testing.assert_array_equal(got[1], ref[1])
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
  assert (ref[2][:5] > 0).all()  # tied scores count against the target


def test_blocked_top_k_equals_lax_top_k_with_ties():
  rng = np.random.default_rng(7)
  for n in (topk._BLOCK * 40, topk._BLOCK * 40 + 77):
    x = rng.normal(size=(12, n)).astype(np.float32)
    x[:4] = np.round(x[:4])  # many ties, across blocks
    x[4] = 0.0
    x[5, ::3] = -np.inf
    x[6, :n - 3] = -np.inf  # fewer than k finite
    for k in (1, 5, 10):
      want = jax.lax.top_k(x, k)
      got = topk._blocked_top_k(x, k)
      np.testing.assert_array_equal(got[1], want[1])
      np.testing.assert_array_equal(got[0], want[0])


def test_padded_blocked_catalog_top_k_equals_reference():
  """A catalog of whole blocks and more (items padded to blocks, padding never a candidate): the same
  items, ranks and tie order as the reference path; integer factors, so every score is exact."""
  rng = np.random.default_rng(8)
  num_items = topk._BLOCK * 8 + 123
  users = rng.integers(-2, 3, size=(9, 3)).astype(np.float32)
  users[0] = 0  # every item tied: the target ranks last among the unmasked
  items = rng.integers(-2, 3, size=(num_items, 3)).astype(np.float32)
  histories = [rng.choice(num_items, 30, replace=False) for _ in range(9)]
  targets = np.array([rng.choice(np.setdiff1d(np.arange(num_items), h)) for h in histories])
  ref = topk.top_k(users, items, histories, 2, user_batch=4, targets=targets, fused=False)
  got = topk.top_k(users, items, histories, 2, user_batch=4, targets=targets)
  for a, b in zip(got, ref):
    np.testing.assert_array_equal(a, b)
  assert ref[2][0] == num_items - 30 - 1


def test_catalog_of_200k_items_with_few_events_needs_no_i_squared_memory():
  """The table of 200,000 items (a dense one: 160 GB) and a fused top-K over them, in little memory."""
  import resource
  import tracemalloc
  from palr_jax.retrieval import transitions
  num_items = 200_000
  rng = np.random.default_rng(5)
  histories = [rng.choice(num_items, 20, replace=False) for _ in range(40)]
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  tracemalloc.start()
  table = transitions.transition_table(histories, num_items, 3, 0.7, top_m=512)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 32 * 2**20                     # I x I float32 would be 160 GB
  assert table.num_items == num_items and len(table.indices) == 40 * (19 + 18 + 17)
  config = retriever_config(factors=4, iterations=2, transition_weight=0.3, transition_items=2,
                            transition_window=3, transition_decay=0.7, num_candidates=10)
  user_factors, item_factors = mf.fit(histories, num_items, config, jax.random.key(0))
  targets = np.array([h[-1] for h in histories])
  prefixes = [h[:-1] for h in histories]
  ranking = candidates.rank(user_factors, item_factors, prefixes, np.arange(40), targets, config,
                            table=candidates.transition_table(histories, num_items, config))
  # The table counts the whole histories: each query's last two items lead to its target, which no other
  # item of the 200,000 is led to from them, so it ranks first and heads its candidates.
  np.testing.assert_array_equal(ranking.ranks, 0)
  np.testing.assert_array_equal(ranking.items[:, 0], targets)
  grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss
  assert grown < 2 * 2**30


def test_score_chunk_bounds_the_user_batch():
  config = retriever_config(user_batch=1024, score_chunk=1 << 21)
  assert candidates.user_batch(config, 1682) == 1024
  assert candidates.user_batch(config, 100_000) == 20
  assert candidates.user_batch(config, 10_000_000) == 1


def test_validation_refuses_shard_items_on_several_processes(monkeypatch):
  """The retriever runs on process 0 alone: a global-mesh top-K there would wait for the other processes
  forever (issue 27). One process: the sharded path runs (test above) and validation lets it through."""
  from palr_jax import validate
  config = common.get_config()
  config.retriever.shard_items = True
  validate.check_mesh(config, train=False, rank=False, profiles=False, retriever=True)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(validate.ConfigError, match=r'^config.retriever.shard_items=True: expected False on '
                                                 r'several processes \(2 here\)'):
    validate.check_mesh(config, train=False, rank=False, profiles=False, retriever=True)
  config.retriever.shard_items = False  # check_environment passes retriever=shard_items
  validate.check_mesh(config, train=False, rank=False, profiles=False, retriever=False)
