"""The embedded SmolLM2-135M-Instruct Q4_1 GGUF, converted by us, against transformers' own GGUF loader.

transformers dequantizes and un-permutes the same file independently, so equal logits and greedy tokens
check our dequantization, the q/k un-permutation and the config mapping on a real model. About 75 s of
CPU time (conversion, two loads, two compiles), hence `slow`; CI runs it.
"""
import math

from flax import nnx
import jax
import numpy as np
import pytest
import torch
import transformers

from palr_jax.defaults import get_config
from palr_jax.hub import load
from palr_jax.model import decode

pytestmark = pytest.mark.slow

ENGLISH = ("The history of the city begins in the early nineteenth century, when a small group of settlers "
           "built a mill on the banks of the river. Over the following decades the town grew into an "
           "important centre of trade, and by the end of the century it had a railway station, three "
           "schools and a public library. Today it is known for its museums, its parks and the annual "
           "music festival that attracts visitors from all over the country.")
TITLES = 'Amélie (2001), Léon: The Professional 1994 — 12345 ½'
MESSAGES = [{'role': 'user', 'content': 'Name three movies like Toy Story.'}]


@pytest.fixture(scope='module')
def ours(tmp_path_factory):
  c = get_config().model
  c.spec, c.cache_dir = 'smollm2', str(tmp_path_factory.mktemp('cache'))
  c.dtype = c.param_dtype = 'float32'  # the reference's; a module fixture is built before conftest pins 'auto'
  return load.load_model(c)


@pytest.fixture(scope='module')
def theirs():
  path = load.smollm2_gguf()
  model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope='module')
def our_logits(ours):
  """Logits [T, V] of one sequence; right-padded to 128 so every call reuses one compiled forward."""
  graphdef, state = nnx.split(ours[0])
  forward = jax.jit(lambda state, ids, pos, seg: nnx.merge(graphdef, state)(ids, pos, seg))

  def logits(ids):
    padded = np.zeros((1, 128), np.int32)
    padded[0, :len(ids)] = ids
    segments = (np.arange(128) < len(ids)).astype(np.int32)[None]
    return np.asarray(forward(state, padded, np.arange(128, dtype=np.int32)[None], segments))[0, :len(ids)]

  return logits


def their_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def perplexity(logits, ids):
  """exp(mean next-token negative log-likelihood) of ids[1:] given the logits at ids[:-1]."""
  logp = np.asarray(jax.nn.log_softmax(logits[:-1].astype(np.float64), axis=-1))
  return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def test_config(ours):
  _, _, config = ours
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
          config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
  assert config.tie_word_embeddings and config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)


def test_logits_and_greedy_tokens_match_transformers(ours, theirs, our_logits):
  model, tokenizer, config = ours
  their_model, their_tokenizer = theirs
  text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  assert ids == their_tokenizer(text, add_special_tokens=False)['input_ids']
  diff = np.abs(our_logits(ids) - their_logits(their_model, ids)).max()
  assert diff <= 1e-3, diff

  (greedy,) = decode.generate(model, [ids], max_new_tokens=32, eos_ids=config.eos_token_ids,
                              pad_id=config.pad_token_id, buckets=get_config().batching.length_buckets)
  with torch.no_grad():
    out = their_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=32, do_sample=False, pad_token_id=2)
  assert len(greedy) == 32 and greedy == out[0, len(ids):].tolist()
  assert tokenizer.decode(greedy).startswith('1. ')  # a numbered list, as asked


def test_perplexity_on_english(ours, theirs, our_logits):
  tokenizer = ours[1]
  ids = tokenizer(ENGLISH)['input_ids']
  assert len(ids) <= 128
  ppl = perplexity(our_logits(ids), np.asarray(ids))
  assert ppl == pytest.approx(perplexity(their_logits(theirs[0], ids), np.asarray(ids)), rel=1e-3)
  assert ppl < 15, ppl  # 10.2 measured; keeping llama.cpp's q/k row order instead gives 51


def test_tokenizer(ours, theirs):
  _, tokenizer, _ = ours
  their_tokenizer = theirs[1]
  plain = "Amélie, Léon: The Professional — Toy Story's sequel! <|im_end|> naïve café"
  assert tokenizer(plain)['input_ids'] == their_tokenizer(plain)['input_ids']
  # SmolLM2's tokenizer.json pre-tokenizes with Digits(individual_digits) then ByteLevel (llama.cpp's
  # 'smollm' pre-tokenizer splits \p{N} the same way). transformers 5.24 builds this GGUF's tokenizer
  # without the digit split, so compare on digits once it is given SmolLM2's own pre-tokenizer.
  from tokenizers import pre_tokenizers
  their_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  ids = tokenizer(TITLES)['input_ids']
  assert ids == their_tokenizer(TITLES)['input_ids']
  tokens = tokenizer.convert_ids_to_tokens(ids)
  assert tokens[tokens.index('ĠProfessional') + 1:][:5] == ['Ġ', '1', '9', '9', '4']
  assert tokenizer.decode(ids) == TITLES
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
      '<|im_start|>', '<|im_end|>', '<|im_end|>', '<|endoftext|>')


def test_chat_template(ours, theirs):
  _, tokenizer, _ = ours
  for messages in (MESSAGES, [{'role': 'system', 'content': 'Be brief.'}] + MESSAGES):
    for gen in (False, True):
      mine = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert mine == theirs[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  assert mine == ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName three movies like Toy '
                  'Story.<|im_end|>\n<|im_start|>assistant\n')
