"""Ranking metrics against hand-computed values and a direct DCG computation; the paired bootstrap
against numpy."""
import math

import numpy as np
import pytest

from palr_jax import metrics as evaluate
from palr_jax.stages import report

LOG2_3 = math.log2(3)


def test_metrics_hand_computed():
  ranks = np.array([0, 1, 4, 9, 30])
  m = evaluate.metrics_from_ranks(ranks, ks=(1, 5, 10))
  assert set(m) == {'HR@1', 'HR@5', 'HR@10', 'NDCG@1', 'NDCG@5', 'NDCG@10', 'Recall@1', 'Recall@5',
                    'Recall@10', 'MRR'}
  assert m['HR@1'] == pytest.approx(1 / 5)
  assert m['HR@5'] == pytest.approx(3 / 5)
  assert m['HR@10'] == pytest.approx(4 / 5)
  assert m['NDCG@1'] == pytest.approx(1 / 5)
  assert m['NDCG@5'] == pytest.approx((1 + 1 / LOG2_3 + 1 / math.log2(6)) / 5)
  assert m['NDCG@10'] == pytest.approx((1 + 1 / LOG2_3 + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
  assert m['MRR'] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 31) / 5)
  for k in (1, 5, 10):
    assert m[f'Recall@{k}'] == m[f'HR@{k}']
  assert all(type(v) is float for v in m.values())


def test_per_user_metrics_values():
  per_user = evaluate.per_user_metrics([2, 0, 7], ks=(3,))
  np.testing.assert_allclose(per_user['HR@3'], [1, 1, 0])
  np.testing.assert_allclose(per_user['NDCG@3'], [1 / 2, 1, 0])  # log2(2 + 2) = 2
  np.testing.assert_allclose(per_user['MRR'], [1 / 3, 1, 1 / 8])
  assert per_user['HR@3'].shape == (3,)


def test_ndcg_matches_dcg_over_sorted_scores():
  """Ranks from random scores vs DCG computed on the sorted candidate list with a 0/1 relevance."""
  rng = np.random.default_rng(0)
  num_users, num_items, k = 50, 40, 10
  scores = rng.normal(size=(num_users, num_items))
  targets = rng.integers(0, num_items, num_users)
  ranks = (scores > scores[np.arange(num_users), targets][:, None]).sum(1)
  dcg, hits = [], []
  for u in range(num_users):
    relevance = (np.argsort(-scores[u])[:k] == targets[u]).astype(float)
    dcg.append((relevance / np.log2(np.arange(2, k + 2))).sum())
    hits.append(relevance.sum())
  m = evaluate.metrics_from_ranks(ranks, ks=(k,))
  assert m[f'NDCG@{k}'] == pytest.approx(np.mean(dcg))
  assert m[f'HR@{k}'] == pytest.approx(np.mean(hits))
  assert 0 < m[f'HR@{k}'] < 1  # the case exercises both hits and misses


def test_misses():
  # A target absent from a 3-item list (rank inf) is a miss even at a cutoff larger than the list.
  m = evaluate.metrics_from_ranks([2, math.inf], ks=(5,))
  assert m['HR@5'] == pytest.approx(0.5)
  assert m['NDCG@5'] == pytest.approx(0.5 / 2)
  assert m['MRR'] == pytest.approx(0.5 / 3)


@pytest.mark.parametrize('ranks, ks, match', [
    ([], (5,), 'non-empty'),
    ([[0, 1]], (5,), '1-D'),
    ([0, -1], (5,), '>= 0'),
    ([0, float('nan')], (5,), '>= 0'),
    ([0, 1], (), 'positive integers'),
    ([0, 1], (0,), 'positive integers'),
    ([0, 1], (2.5,), 'positive integers'),
])
def test_metric_input_errors(ranks, ks, match):
  with pytest.raises(ValueError, match=match):
    evaluate.metrics_from_ranks(ranks, ks)


def test_paired_bootstrap_matches_numpy():
  rng = np.random.default_rng(1)
  a, b = rng.random(200), rng.random(200)
  got = evaluate.paired_bootstrap(a, b, samples=300, seed=7)
  ref_rng = np.random.default_rng(7)
  idx = ref_rng.integers(0, 200, size=(300, 200))  # same stream, drawn in one call
  means = (a - b)[idx].mean(axis=1)
  assert got.mean_diff == pytest.approx((a - b).mean())
  assert (got.low, got.high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
  assert got.low < got.mean_diff < got.high
  assert evaluate.paired_bootstrap(a, b, samples=300, seed=7) == got


def test_paired_bootstrap_normal_approximation():
  """For a large sample the percentile interval is close to mean +- 1.96 * sd / sqrt(n)."""
  rng = np.random.default_rng(2)
  b = rng.random(4000)
  a = b + rng.normal(0.05, 1.0, 4000)
  got = evaluate.paired_bootstrap(a, b, samples=2000, seed=0)
  d = a - b
  half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
  assert got.low == pytest.approx(d.mean() - half, abs=0.15 * half)
  assert got.high == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_paired_bootstrap_degenerate_and_errors():
  a = np.array([0.0, 1.0, 1.0, 0.0])
  assert evaluate.paired_bootstrap(a, a, 50, 0) == (0.0, 0.0, 0.0)
  shifted = evaluate.paired_bootstrap(a + 0.25, a, 50, 0)
  assert shifted == pytest.approx((0.25, 0.25, 0.25))
  with pytest.raises(ValueError, match='same users'):
    evaluate.paired_bootstrap(a, a[:3], 10, 0)
  with pytest.raises(ValueError, match='samples'):
    evaluate.paired_bootstrap(a, a, 0, 0)


def test_reordering_hand_computed():
  retriever = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
  llm = [[2, 1, 3], [4, 6, 5], [9, 8, 7]]
  targets = [2, 6, 99]    # the third user's target was not retrieved
  out = evaluate.reordering({'retriever': retriever, 'llm': llm}, targets, k=2)
  assert out['candidates'] == 3
  assert out['target_in_candidates'] == pytest.approx(2 / 3)
  assert out['methods']['llm'] == pytest.approx(
      {'top1_as_retriever': 1 / 3, 'top2_overlap': (1 + 0.5 + 0.5) / 3, 'HR@2_when_retrieved': 1.0})
  assert out['methods']['retriever'] == pytest.approx(
      {'top1_as_retriever': 1.0, 'top2_overlap': 1.0, 'HR@2_when_retrieved': 0.5})
  text = report.markdown_report({'test': {'num_users': 3, 'metrics': {}, 'vs_retriever': {},
                                              'reordering': out}}, [2])
  assert "the retriever's 3 candidates (the target is among them for 66.7% of users" in text
  assert '| llm | 0.3333 | 0.6667 | 1.0000 |' in text
  # With the methods' (pessimistic) ranks, a target first in a list of ties is no hit.
  tied = evaluate.reordering({'retriever': retriever, 'llm': retriever}, targets, k=2,
                             ranks={'retriever': [1, 2, 50], 'llm': [2, 2, 50]})
  assert tied['methods']['llm']['HR@2_when_retrieved'] == 0.0
  assert tied['methods']['retriever']['HR@2_when_retrieved'] == 0.5
  with pytest.raises(ValueError, match="needs the 'retriever' order"):
    evaluate.reordering({'llm': llm}, targets)
  with pytest.raises(ValueError, match='expected the same users everywhere'):
    evaluate.reordering({'retriever': retriever, 'llm': llm[:2]}, targets)


def test_fusion_weight_is_chosen_on_valid_and_carried_to_test():
  """Valid rewards trusting the retriever (its first candidate is the target), test the LLM; the weight
  chosen on valid (0) is used on test even though a larger one would score better there."""
  def split(targets, llm_first):
    items = [[1, 2, 3], [4, 5, 6]]
    return ({'items': items, 'scores': [[3.0, 2.0, 1.0]] * 2, 'targets': targets, 'ranks': [0.0, 0.0]},
            {'scores': [[0.0, 0.0, 5.0] if llm_first else [1.0, 0.0, 0.0]] * 2})
  valid_r, valid_l = split([1, 4], llm_first=True)      # the LLM prefers the last candidate: wrong on valid
  test_r, test_l = split([3, 6], llm_first=True)        # ... and right on test
  best, by_weight = evaluate.choose_fusion_weight(valid_r, valid_l, (0.0, 1.0, 4.0), 'NDCG@10')
  assert best == 0.0 and by_weight['0.0'] == 1.0 and by_weight['4.0'] < 1.0
  fused = evaluate.fuse(test_r, test_l, best)
  assert fused['ranks'] == [2.0, 2.0] and fused['items'][0] == [1, 2, 3]
  assert evaluate.fuse(test_r, test_l, 4.0)['ranks'] == [0.0, 0.0]
  # Ties count against the target; a target the retriever missed keeps its rank.
  flat = {'items': [[1, 2]], 'scores': [[1.0, 1.0]], 'targets': [2], 'ranks': [1.0]}
  assert evaluate.fuse(flat, {'scores': [[None, None]]}, 1.0)['ranks'] == [1.0]
  missed = {'items': [[1, 2]], 'scores': [[1.0, 0.5]], 'targets': [9], 'ranks': [17.0]}
  assert evaluate.fuse(missed, {'scores': [[0.0, 2.0]]}, 1.0)['ranks'] == [17.0]
  # LLM scores equal up to float32 rounding (a constant model's mean log-likelihoods) add nothing: the
  # retriever's order stands, not rounding noise blown up to unit z-scores.
  ordered = {'items': [[1, 2, 3]], 'scores': [[3.0, 2.0, 1.0]], 'targets': [1], 'ranks': [0.0]}
  noisy = {'scores': [[-5.9914646, -5.9914641, -5.9914650]]}
  assert evaluate.fuse(ordered, noisy, 4.0) == {'ranks': [0.0], 'items': [[1, 2, 3]], 'targets': [1]}


def test_report_fuses_each_llm_method_with_a_weight_from_valid():
  from palr_jax import defaults
  config = defaults.get_config()
  config.eval.fusion_weights = (0.0, 4.0)
  def entry(targets, llm):
    return {'items': [[1, 2, 3]], 'scores': [llm], 'targets': targets, 'ranks': [0.0]}
  methods = {'retriever': {'valid': entry([1], [3.0, 2.0, 1.0]), 'test': entry([3], [3.0, 2.0, 1.0])},
             'palr_v2': {'valid': entry([1], [0.0, 0.0, 5.0]), 'test': entry([3], [0.0, 0.0, 5.0])}}
  chosen = report.fused_methods(config, methods)
  assert chosen['palr_v2']['weight'] == 0.0
  assert chosen['palr_v2']['valid_by_weight'] == pytest.approx({'0.0': 1.0, '4.0': 1 / np.log2(3)})
  assert methods['palr_v2+fusion']['test']['ranks'] == [2.0]


def test_results_md_names_the_report_fingerprint():
  """Issue 29.10: results.md said nothing of the run it came from."""
  text = report.markdown_report({'test': {'num_users': 3, 'metrics': {}, 'vs_retriever': {}, 'reordering': {}}},
                                [1], 'abc123')
  assert 'Report fingerprint `abc123`' in text
