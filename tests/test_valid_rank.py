"""palr_jax/train/valid_rank.py: NDCG@10 among the candidates, on valid users only."""
import numpy as np
import pytest

from palr_jax.data import interactions
from palr_jax.model import rerank
from palr_jax.train import valid_rank
from prompt_fixtures import tiny_config, tiny_interactions, tiny_tokenizer, write_candidates


def test_ndcg_at_10_against_hand_computed_ranks():
  scores = [np.array([0.1, 0.9, 0.5]), np.array([1.0, 1.0, 0.0]), np.array([0.0] * 12 + [-1.0]),
            np.array([3.0, 2.0])]
  targets = [2, 1, 12, None]   # ranks 1, 1 (tie: retriever order), 12 (beyond 10), absent
  want = (1 / np.log2(3) + 1 / np.log2(3) + 0 + 0) / 4
  assert valid_rank.ndcg_at_10(scores, targets) == pytest.approx(want)
  assert valid_rank.ndcg_at_10([np.array([0.2, 0.1])], [0]) == 1.0


def test_metric_direction_and_sample():
  assert valid_rank.better('valid_ndcg10', 0.5, 0.4) and not valid_rank.better('valid_ndcg10', 0.4, 0.4)
  assert valid_rank.better('valid_loss', 1.0, 2.0) and valid_rank.better('valid_loss', 9.0, None)
  with pytest.raises(ValueError, match='config.train.best_metric'):
    valid_rank.check_metric('hr')
  users = valid_rank.sample_users(100, 10, seed=0)
  assert len(set(users)) == 10 and list(users) == sorted(users)
  np.testing.assert_array_equal(users, valid_rank.sample_users(100, 10, seed=0))
  np.testing.assert_array_equal(valid_rank.sample_users(5, 0, seed=0), np.arange(5))


def test_ranker_reads_valid_only(tmp_path, monkeypatch):
  inter = tiny_interactions()
  split = interactions.leave_one_out(inter)
  write_candidates(tmp_path, inter, split, count=4)
  (tmp_path / 'test.jsonl').unlink()   # no test data on disk: the ranker must not need it
  (tmp_path / 'train.jsonl').unlink()
  config = tiny_config()
  config.train.rank_valid_users = 3
  config.rank.batch_size = 2
  ranker = valid_rank.build(config, inter, split, tiny_tokenizer(), None, tmp_path / 'valid.jsonl', 'palr_v2')
  assert len(ranker) == 3 and set(ranker.users) <= set(range(4))
  # Scores that put the candidate of highest item index first: NDCG@10 computed from that order.
  calls = []

  def fake_score_tags(model, prompts, tags, **kw):
    calls.append(len(prompts))
    return np.stack([np.arange(len(t), dtype=np.float32)[::-1] for t in tags])

  monkeypatch.setattr(rerank, 'score_tags', fake_score_tags)
  got = ranker(model=None)
  want = valid_rank.ndcg_at_10([np.arange(len(t))[::-1] for t in ranker.tags], ranker.targets)
  assert calls == [3] and got == pytest.approx(want)
  assert any(t is not None for t in ranker.targets)
