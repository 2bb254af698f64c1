"""The decoder against transformers' generate / log-likelihoods, and sampling semantics."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from palr_jax import batching
from palr_jax.model import decode as gen
from palr_jax.model import llama, lora, rerank
from test_lora import lora_config, randomize_adapters
from test_llama import forward, jax_model, left_padded, make_config, torch_model

PAD = 0
BUCKETS = (16, 32, 64, 128)


@pytest.fixture(scope='module')
def models():
  config = make_config('gqa_4to1')
  tm = torch_model(config, seed=3)
  return config, tm, jax_model(config, tm)


@pytest.fixture(scope='module')
def prompts():
  rng = np.random.default_rng(0)
  return [list(map(int, rng.integers(3, 97, n))) for n in (7, 3, 11)]


def hf_generate(tm, rows, n, eos):
  ids, positions, _, mask = left_padded(rows, PAD)
  with torch.no_grad():
    out = tm.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                      max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=eos,
                      pad_token_id=PAD)
  new = out[:, ids.shape[1]:].numpy().tolist()
  result = []
  for row in new:  # HF pads rows that finished early; cut after the first EOS like ours
    stop = next((i for i, t in enumerate(row) if eos is not None and t == eos), len(row) - 1)
    result.append(row[:stop + 1])
  return result


def uncached_greedy(model, rows, n):
  """Greedy decoding by re-running the full forward on the growing left-padded batch (no cache)."""
  rows = [list(r) for r in rows]
  width = max(map(len, rows)) + n  # one shape, one compile
  for _ in range(n):
    ids, positions, segments, _ = left_padded(rows, PAD)
    shift = width - ids.shape[1]
    ids, positions, segments = (np.pad(a, ((0, 0), (shift, 0))) for a in (ids, positions, segments))
    logits = np.asarray(forward(model, ids, positions, segments))
    for r, t in zip(rows, logits[:, -1].argmax(-1)):
      r.append(int(t))
  return [r[-n:] for r in rows]


def test_greedy_matches_transformers_with_left_padding(models, prompts):
  config, tm, model = models
  expected = hf_generate(tm, prompts, 20, eos=None)
  assert all(len(r) == 20 for r in expected)
  got = gen.generate(model, prompts, max_new_tokens=20, eos_ids=(), pad_id=PAD, buckets=BUCKETS)
  assert got == expected
  assert uncached_greedy(model, prompts, 20) == expected
  # A row alone (no padding) decodes the same as inside the padded batch.
  assert gen.generate(model, prompts[1:2], max_new_tokens=20, eos_ids=(), pad_id=PAD,
                      buckets=BUCKETS) == expected[1:2]


def test_greedy_stops_per_row_at_eos(models, prompts):
  _, tm, model = models
  free = gen.generate(model, prompts, max_new_tokens=20, eos_ids=(), pad_id=PAD, buckets=BUCKETS)
  eos = free[0][4]  # a token row 0 produces: it must stop there, other rows at their own first hit
  got = gen.generate(model, prompts, max_new_tokens=20, eos_ids=eos, pad_id=PAD, buckets=BUCKETS)
  assert got[0] == free[0][:free[0].index(eos) + 1] and len(got[0]) <= 5
  assert got == hf_generate(tm, prompts, 20, eos=eos)
  other = free[2][-1]  # several EOS ids: each row stops at the first of any
  got = gen.generate(model, prompts, max_new_tokens=20, eos_ids=[eos, other], pad_id=PAD, buckets=BUCKETS)
  for row, full in zip(got, free):
    hits = [i for i, t in enumerate(full) if t in (eos, other)]
    assert row == (full[:hits[0] + 1] if hits else full)


def test_prompt_lengths_share_a_bucket_compile(models):
  _, _, model = models
  before = gen._generate._cache_size()
  gen.generate(model, [[5, 6, 7]] * 2, max_new_tokens=3, eos_ids=2, pad_id=PAD, buckets=BUCKETS)
  gen.generate(model, [[5, 6, 7, 8, 9, 10, 11]] * 2, max_new_tokens=3, eos_ids=2, pad_id=PAD, buckets=BUCKETS)
  assert gen._generate._cache_size() == before + 1
  buckets = (16, 32, 512, 768)
  assert [batching.bucket_length(n, buckets) for n in (1, 16, 17, 300, 513, 700)] == [16, 16, 32, 512, 768, 768]
  with pytest.raises(ValueError, match='exceeds the largest length bucket 768'):
    batching.bucket_length(769, buckets)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(models, prompts):
  _, _, model = models
  greedy = gen.generate(model, prompts, max_new_tokens=8, eos_ids=(), pad_id=PAD, buckets=BUCKETS)
  nucleus = gen.generate(model, prompts, max_new_tokens=8, eos_ids=(), pad_id=PAD, temperature=1.0,
                         top_p=1e-6, rng=jax.random.key(0), buckets=BUCKETS)
  assert nucleus == greedy
  a, b, c = (gen.generate(model, prompts, max_new_tokens=8, eos_ids=(), pad_id=PAD, temperature=2.0,
                          rng=jax.random.key(k), buckets=BUCKETS) for k in (1, 1, 2))
  assert a == b and a != c
  with pytest.raises(ValueError, match='rng'):
    gen.generate(model, prompts, max_new_tokens=2, eos_ids=(), pad_id=PAD, temperature=1.0, buckets=BUCKETS)
  with pytest.raises(ValueError, match=r'prompt_ids\[1\] is empty'):
    gen.generate(model, [[3], []], max_new_tokens=2, eos_ids=(), pad_id=PAD, buckets=BUCKETS)


def test_lora_model_in_train_mode_generates_deterministically(prompts):
  config = make_config('gqa_4to1')
  model = lora.apply_lora(llama.Llama(config), lora_config(dropout=0.5), nnx.Rngs(params=0, dropout=1))
  randomize_adapters(model)
  got = gen.generate(model, prompts, max_new_tokens=6, eos_ids=(), pad_id=PAD, buckets=BUCKETS)
  assert model.layers[0].self_attn.q_proj.dropout.deterministic is False  # caller's mode untouched
  assert got == gen.generate(lora.merge_lora(model), prompts, max_new_tokens=6, eos_ids=(), pad_id=PAD,
                             buckets=BUCKETS)


def test_sample_token_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2, 1e-9]] * 20000))
  tokens = np.asarray(gen.sample_token(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
  freq = np.bincount(tokens, minlength=4) / len(tokens)
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)  # nucleus {0, 1}, renormalised
  hot = np.asarray(gen.sample_token(logits, jax.random.key(1), temperature=2.0, top_p=1.0))
  p = np.sqrt([0.5, 0.3, 0.2]) / np.sqrt([0.5, 0.3, 0.2]).sum()  # softmax(log p / 2)
  np.testing.assert_allclose(np.bincount(hot, minlength=4)[:3] / len(hot), p, atol=0.015)


def test_continuation_scores_match_transformers_log_likelihood(models, prompts):
  _, tm, model = models
  continuations = [[5, 9], [17, 4, 4, 60], [8]]
  got = rerank.score_continuations(model, prompts, [[c] for c in continuations], reduce='sum', batch_size=2,
                                   buckets=BUCKETS)[:, 0]
  for b, (p, c) in enumerate(zip(prompts, continuations)):
    with torch.no_grad():
      logits = tm(input_ids=torch.tensor([p + c])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    expected = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))
    assert abs(got[b] - expected) < 1e-4, (b, got[b], expected)
  with pytest.raises(ValueError, match='2 prompts but 3 continuation lists'):
    rerank.score_continuations(model, prompts[:2], [[c] for c in continuations], reduce='sum', batch_size=2,
                               buckets=BUCKETS)
