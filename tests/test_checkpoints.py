"""HF / GGUF import, safetensors writing, merged and PEFT export, all against transformers / peft."""
import json
import os
import shutil

import gguf as gguf_lib
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from palr_jax.defaults import get_config
from palr_jax import adapters
from palr_jax import sharding
from palr_jax.hub import gguf, hf, llama_names
from palr_jax.hub.load import load_model
from palr_jax.model import llama, lora

BF16 = np.dtype(ml_dtypes.bfloat16)
VOCAB_EXTRA = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def model_config(spec, **overrides):
  c = get_config().model
  c.spec = spec
  c.update(overrides)
  return c


def tiny_hf_model(vocab_size=None, tie=False, dtype=torch.float32, seed=0, **kw):
  """A random LlamaForCausalLM with non-trivial weights (random norms too: a swapped name shows)."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=vocab_size or len(byte_level_vocab()[0]), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2, **kw)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.rand_like(p) + 0.5 if 'norm' in name else torch.randn_like(p) * 0.2)
  return model.to(dtype)


def byte_level_vocab():
  """Control tokens, the 256 byte-level symbols, and the first merges they imply on English text."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  tokens = VOCAB_EXTRA + sorted(bytes_to_unicode().values())
  merges = []
  for a, b in [('Ġ', 't'), ('h', 'e'), ('Ġt', 'he'), ('i', 'n'), ('Ġ', 'a'), ('e', 'r'), ('o', 'n'),
               ('Ġ', 's'), ('r', 'e'), ('Ġ', 'm'), ('o', 'v'), ('ov', 'i'), ('Ġm', 'ovi'), ('Ġmovi', 'e')]:
    merges.append(f'{a} {b}')
    tokens.append(a + b)
  return tokens, merges


def save_tokenizer(folder):
  """A small byte-level BPE tokenizer folder (what the HF export copies along)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  tokens, merges = byte_level_vocab()
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VOCAB_EXTRA])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>',
                                              bos_token='<|im_start|>', chat_template=CHAT_TEMPLATE)
  fast.save_pretrained(folder)
  return len(tokens)


def batch(vocab, b=2, t=7, seed=0):
  ids = np.random.RandomState(seed).randint(0, vocab, (b, t)).astype(np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  return ids, positions, np.ones((b, t), np.int32)


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids).long()).logits.float().numpy()


# -------------------------------------------------------------------------------------- config.json


LEGACY_LLAMA3 = {  # Meta-Llama-3.1-8B's config.json as transformers 4.x wrote it (sizes shrunk)
    'architectures': ['LlamaForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
    'bos_token_id': 128000, 'eos_token_id': [128001, 128008, 128009], 'hidden_act': 'silu',
    'hidden_size': 256, 'initializer_range': 0.02, 'intermediate_size': 512,
    'max_position_embeddings': 131072, 'mlp_bias': False, 'model_type': 'llama',
    'num_attention_heads': 8, 'num_hidden_layers': 2, 'num_key_value_heads': 2, 'pretraining_tp': 1,
    'rms_norm_eps': 1e-05,
    'rope_scaling': {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                     'original_max_position_embeddings': 8192, 'rope_type': 'llama3'},
    'rope_theta': 500000.0, 'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
    'transformers_version': '4.43.0.dev0', 'use_cache': True, 'vocab_size': 128256}


def write_config(folder, cfg):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'config.json').write_text(json.dumps(cfg))
  return folder


def test_legacy_llama3_config(tmp_path):
  cfg = hf.llama_config(write_config(tmp_path, LEGACY_LLAMA3), model_config('x', dtype='bfloat16'))
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (256, 2, 8, 2, 32)
  assert cfg.vocab_size == 128256 and cfg.intermediate_size == 512
  assert cfg.rope_theta == 500000.0 and cfg.rope_type == 'llama3'
  assert cfg.rope_scaling['factor'] == 8.0 and cfg.rope_scaling['original_max_position_embeddings'] == 8192
  assert cfg.eos_token_id == (128001, 128008, 128009) and cfg.bos_token_id == 128000
  assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 131072
  assert cfg.dtype == 'bfloat16' and cfg.param_dtype == 'float32'  # runtime from config.model, not the file
  # The parsed RoPE frequencies are the ones transformers computes from the same file.
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  ref, _ = ROPE_INIT_FUNCTIONS['llama3'](transformers.AutoConfig.from_pretrained(tmp_path), 'cpu')
  np.testing.assert_allclose(llama.rope_inv_freq(cfg), ref.numpy(), rtol=1e-6)


def test_v5_config_written_by_transformers(tmp_path):
  transformers.LlamaConfig(
      vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=1, rope_theta=250000.0, rope_scaling={'rope_type': 'linear', 'factor': 2.0},
      tie_word_embeddings=True, rms_norm_eps=1e-6, dtype='bfloat16').save_pretrained(tmp_path)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert 'rope_parameters' in written and 'rope_theta' not in written  # the v5 spelling
  cfg = hf.llama_config(tmp_path, model_config('x'))
  assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (3, 1, 16, True)
  assert cfg.rope_theta == 250000.0 and cfg.rope_type == 'linear' and cfg.rope_scaling['factor'] == 2.0
  assert cfg.rms_norm_eps == 1e-6


@pytest.mark.parametrize('change, words', [
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}, ['yarn']),
    ({'attention_bias': True}, ['attention_bias']),
    ({'mlp_bias': True}, ['mlp_bias']),
    ({'hidden_act': 'gelu'}, ['hidden_act']),
    ({'model_type': 'mistral', 'architectures': ['MistralForCausalLM']}, ['model_type', 'mistral']),
    ({'num_hidden_layers': None}, ['num_hidden_layers']),
])
def test_config_errors_name_file_and_key(tmp_path, change, words):
  cfg = {k: v for k, v in dict(LEGACY_LLAMA3, **change).items() if v is not None}
  folder = write_config(tmp_path, cfg)
  with pytest.raises(ValueError) as e:
    hf.llama_config(folder, model_config('x'))
  for word in [str(folder / 'config.json')] + words:
    assert word in str(e.value)


def test_missing_and_malformed_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    hf.llama_config(tmp_path, model_config('x'))
  (tmp_path / 'config.json').write_text('{"model_type": "llama",')
  with pytest.raises(ValueError, match=r'config.json: not valid JSON'):
    hf.llama_config(tmp_path, model_config('x'))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    hf.stored_tensors(tmp_path)
  with pytest.raises(ValueError, match="config.model.spec: expected 'smollm2'"):
    load_model(model_config('torch:foo'))


# --------------------------------------------------------------------------------- safetensors import


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('tie', [False, True])
def test_sharded_import_matches_transformers(tmp_path, dtype, tie):
  ref = tiny_hf_model(tie=tie, dtype=dtype)
  ref.save_pretrained(tmp_path, max_shard_size='20KB')
  save_tokenizer(tmp_path)
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  assert len(set(index['weight_map'].values())) > 2
  model, tokenizer, cfg = load_model(model_config(f'hf:{tmp_path}'))
  assert cfg.tie_word_embeddings == tie and hasattr(model, 'lm_head') == (not tie)
  ids, pos, seg = batch(cfg.vocab_size)
  ours = np.asarray(model(ids, pos, seg))
  # bf16 weights are read exactly and upcast: compare with transformers reading the folder in fp32.
  ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  np.testing.assert_allclose(ours, torch_logits(ref32, ids), atol=1e-4, rtol=0)
  assert tokenizer.convert_ids_to_tokens(tokenizer('the movie')['input_ids']) == ['t', 'he', 'Ġmovie']


def test_sharded_import_onto_mesh(tmp_path):
  ref = tiny_hf_model(dtype=torch.bfloat16)
  ref.save_pretrained(tmp_path, max_shard_size='20KB')
  cfg = hf.llama_config(tmp_path, model_config('x'))
  c = get_config()
  c.mesh.fsdp, c.mesh.tensor = 4, 2
  mesh = sharding.make_mesh(c.mesh)
  on_mesh = hf.load_params(tmp_path, cfg, mesh, c.mesh.rules)
  single = hf.load_params(tmp_path, cfg)
  state = {n: p.detach().float().numpy() for n, p in ref.state_dict().items()}
  for path, (hf_name, transposed) in llama_names.hf_param_names(cfg).items():
    want = state[hf_name].T if transposed else state[hf_name]
    np.testing.assert_array_equal(np.asarray(on_mesh[path]), want)
    np.testing.assert_array_equal(np.asarray(single[path]), want)
  q = on_mesh['layers.0.self_attn.q_proj.kernel']  # ('embed', 'heads') -> ('fsdp', 'tensor')
  assert q.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert {s.data.shape for s in q.addressable_shards} == {(32 // 4, 32 // 2)}
  emb = on_mesh['embed_tokens.embedding']  # ('vocab', 'embed'): 273 rows do not split over tensor=2
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')


def test_import_rejects_checkpoint_that_disagrees_with_config(tmp_path):
  ref = tiny_hf_model()
  ref.save_pretrained(tmp_path)
  save_tokenizer(tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  write_config(tmp_path, dict(cfg, intermediate_size=96))
  with pytest.raises(ValueError, match=r"model.safetensors: 'model.layers.0.mlp.gate_proj.weight' has "
                                       r'shape \(64, 32\), expected \(96, 32\)'):
    load_model(model_config(f'hf:{tmp_path}'))
  write_config(tmp_path, dict(cfg, num_hidden_layers=1))
  with pytest.raises(ValueError, match=r"does not describe: \['model.layers.1"):
    load_model(model_config(f'hf:{tmp_path}'))


# --------------------------------------------------------------------------------- safetensors export


def test_save_safetensors_shards_and_reads_back(tmp_path):
  rng = np.random.RandomState(0)
  values = {f't{i}': rng.randn(16, 8).astype(np.float32) for i in range(5)}
  specs = [hf.TensorSpec(k, v.shape, BF16, lambda v=v: v.astype(BF16)) for k, v in values.items()]
  hf.save_safetensors(tmp_path, specs, max_shard_bytes=16 * 8 * 2 * 2)  # two tensors per shard
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors',
                   'model-00003-of-00003.safetensors', hf.INDEX_FILE]
  index = json.loads((tmp_path / hf.INDEX_FILE).read_text())
  assert index['metadata']['total_size'] == 5 * 16 * 8 * 2
  assert index['weight_map']['t4'] == 'model-00003-of-00003.safetensors'
  stored = hf.stored_tensors(tmp_path)
  assert {k: (s.shape, s.dtype) for k, s in stored.items()} == {k: ((16, 8), BF16) for k in values}
  from safetensors import safe_open
  with safe_open(os.fspath(tmp_path / index['weight_map']['t2']), 'numpy') as f:
    np.testing.assert_array_equal(f.get_tensor('t2'), values['t2'].astype(BF16))
  bad = [hf.TensorSpec('x', (2, 2), np.dtype(np.float32), lambda: np.zeros((2, 3), np.float32))]
  with pytest.raises(ValueError, match=r'x: produced float32\[2, 3\], declared float32\[2, 2\]'):
    hf.save_safetensors(tmp_path / 'bad', bad)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
  with pytest.raises(RuntimeError):
    with hf.atomic_dir(tmp_path / 'out') as tmp:
      (tmp / 'half').write_text('x')
      raise RuntimeError('boom')
  assert list(tmp_path.iterdir()) == []
  with hf.atomic_dir(tmp_path / 'out') as tmp:
    (tmp / 'a').write_text('1')
  with hf.atomic_dir(tmp_path / 'out', replace=False) as tmp:
    (tmp / 'b').write_text('2')
  assert [p.name for p in tmp_path.iterdir()] == ['out']
  assert [p.name for p in (tmp_path / 'out').iterdir()] == ['a']


# --------------------------------------------------------------------------------------------- GGUF


def llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (the transform GGUF q/k weights went through)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp():
  w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
  np.testing.assert_array_equal(gguf.unpermute_qk(llama_cpp_permute(w, 6), 6), w)
  # A head's rows [half0 | half1] become interleaved pairs in llama.cpp's order.
  np.testing.assert_array_equal(llama_cpp_permute(w, 6)[:4, 0], w[[0, 4, 1, 5], 0])
  with pytest.raises(ValueError, match='does not split into 5 heads'):
    gguf.unpermute_qk(w, 5)


def write_gguf(path, ref, qtype=gguf_lib.GGMLQuantizationType.F32, pre='smollm'):
  """A GGUF the way llama.cpp's converter writes one for `ref` (q/k rows permuted), optionally quantized."""
  c = ref.config
  w = gguf_lib.GGUFWriter(os.fspath(path), 'llama')
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_rope_dimension_count(c.head_dim)
  w.add_vocab_size(c.vocab_size)
  tokens, merges = byte_level_vocab()
  assert len(tokens) == c.vocab_size
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([3] * len(VOCAB_EXTRA) + [1] * (len(tokens) - len(VOCAB_EXTRA)))
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_chat_template(CHAT_TEMPLATE)
  names = {v: k for k, v in gguf.GLOBAL_TENSORS.items()}
  for name, p in ref.state_dict().items():
    if name == 'lm_head.weight' and c.tie_word_embeddings:
      continue
    value = p.float().numpy()
    if name in names:
      gname = names[name]
    else:
      i, rest = name.removeprefix('model.layers.').split('.', 1)
      short = {v: k for k, v in gguf.LAYER_TENSORS.items()}[rest.removesuffix('.weight')]
      gname = f'blk.{i}.{short}.weight'
      if short == 'attn_q':
        value = llama_cpp_permute(value, c.num_attention_heads)
      elif short == 'attn_k':
        value = llama_cpp_permute(value, c.num_key_value_heads)
    if value.ndim == 2 and qtype != gguf_lib.GGMLQuantizationType.F32:
      w.add_tensor(gname, gguf_lib.quants.quantize(value, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gname, value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory):
  ref = tiny_hf_model(tie=True)
  path = tmp_path_factory.mktemp('gguf') / 'tiny.gguf'
  write_gguf(path, ref)
  return path, ref


def test_gguf_f32_round_trips_to_the_original_model(tiny_gguf, tmp_path):
  path, ref = tiny_gguf
  model, tokenizer, cfg = load_model(model_config(f'gguf:{path}', cache_dir=os.fspath(tmp_path)))
  assert cfg.tie_word_embeddings and (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
  ids, pos, seg = batch(cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(model(ids, pos, seg)), torch_logits(ref, ids), atol=1e-4, rtol=0)
  # Converted once into <cache>/<stem>-<hash>; a second load reuses the folder.
  (folder,) = tmp_path.iterdir()
  assert folder.name.startswith('tiny-') and folder == gguf.cache_dir_for(path, os.fspath(tmp_path))
  stamp = (folder / 'model.safetensors').stat().st_mtime_ns
  load_model(model_config(f'gguf:{path}', cache_dir=os.fspath(tmp_path)))
  assert (folder / 'model.safetensors').stat().st_mtime_ns == stamp
  # transformers reads the converted folder as the same model.
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  np.testing.assert_allclose(torch_logits(hf_model, ids), torch_logits(ref, ids), atol=1e-5, rtol=0)


def test_gguf_q8_matches_transformers_gguf_loader(tmp_path):
  ref = tiny_hf_model(seed=1)
  path = tmp_path / 'q8.gguf'
  write_gguf(path, ref, qtype=gguf_lib.GGMLQuantizationType.Q8_0)
  model, _, cfg = load_model(model_config(f'gguf:{path}', cache_dir=os.fspath(tmp_path / 'cache')))
  assert not cfg.tie_word_embeddings
  theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file='q8.gguf')
  ids, pos, seg = batch(cfg.vocab_size)
  ours = np.asarray(model(ids, pos, seg))
  np.testing.assert_allclose(ours, torch_logits(theirs, ids), atol=1e-4, rtol=0)
  assert np.abs(ours - torch_logits(ref, ids)).max() > 1e-4  # really quantized


def test_gguf_tokenizer_matches_transformers(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  ours = hf.load_tokenizer(gguf.cached_hf_dir(path, os.fspath(tmp_path)))
  theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  text = 'the movie<|im_end|> is in theaters, réellement!'
  assert ours(text)['input_ids'] == theirs(text)['input_ids']
  assert ours.convert_ids_to_tokens(ours(text)['input_ids'])[:4] == ['t', 'he', 'Ġmovie', '<|im_end|>']
  assert ours.decode(ours(text)['input_ids']) == text
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == ('<|im_start|>', '<|im_end|>', '<|im_end|>')
  msgs = [{'role': 'user', 'content': 'hi'}]
  assert (ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
          == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
          == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')
  # SmolLM2's pre-tokenizer: every digit on its own.
  assert ours.convert_ids_to_tokens(ours('in 1994')['input_ids']) == ['in', 'Ġ', '1', '9', '9', '4']


@pytest.mark.parametrize('pre, pieces', [
    ('gpt2', ['Toy', 'ĠStory', 'Ġ1995', ',', 'Ġ12345']),
    ('smollm', ['Toy', 'ĠStory', 'Ġ', '1', '9', '9', '5', ',', 'Ġ', '1', '2', '3', '4', '5']),
    ('llama-bpe', ['Toy', 'ĠStory', 'Ġ', '199', '5', ',', 'Ġ', '123', '45']),
])
def test_gguf_pre_tokenizer_follows_ggml_pre(pre, pieces):
  tokens, merges = byte_level_vocab()
  meta = {'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': pre, 'tokenizer.ggml.tokens': tokens,
          'tokenizer.ggml.merges': merges}
  split = gguf.build_tokenizer(meta, 'x.gguf').backend_tokenizer.pre_tokenizer.pre_tokenize_str
  assert [p for p, _ in split('Toy Story 1995, 12345')] == pieces


def test_gguf_metadata_errors(tmp_path):
  meta = {'general.architecture': 'qwen2'}
  with pytest.raises(ValueError, match=r"x.gguf: general.architecture is 'qwen2'"):
    gguf.hf_config_from_metadata(meta, 'x.gguf', has_output=False)
  meta = {'general.architecture': 'llama', 'llama.embedding_length': 64}
  with pytest.raises(ValueError, match=r"x.gguf: GGUF metadata has no 'llama.attention.head_count'"):
    gguf.hf_config_from_metadata(meta, 'x.gguf', has_output=False)
  with pytest.raises(ValueError, match=r"x.gguf: tokenizer.ggml.model is 'llama'"):
    gguf.build_tokenizer({'tokenizer.ggml.model': 'llama'}, 'x.gguf')
  with pytest.raises(ValueError, match=r"x.gguf: tokenizer.ggml.pre='qwen2' is not supported"):
    gguf.build_tokenizer({'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': 'qwen2'}, 'x.gguf')
  with pytest.raises(FileNotFoundError, match='nope.gguf: GGUF file not found'):
    gguf.cached_hf_dir(tmp_path / 'nope.gguf', os.fspath(tmp_path))


def test_loader_errors_name_the_file(base_folder, tiny_gguf, tmp_path, monkeypatch):
  """Issue: 'mmap length is greater than file size', 'GGUF magic invalid' and a missing tokenizer said
  after the weights had loaded, none naming the file."""
  cut = tmp_path / 'cut'
  shutil.copytree(base_folder, cut)
  with open(cut / hf.SINGLE_FILE, 'r+b') as f:
    f.truncate(os.path.getsize(cut / hf.SINGLE_FILE) - 64)
  with pytest.raises(ValueError, match=rf'^{cut / hf.SINGLE_FILE}: truncated: its header describes \d+ bytes, '
                                       rf'the file has \d+'):
    load_model(model_config(f'hf:{cut}'))
  (tmp_path / 'fake.gguf').write_bytes(b'PK\x03\x04 a zip file')
  with pytest.raises(ValueError, match=rf"^{tmp_path / 'fake.gguf'}: not a GGUF file \(it starts with b'PK"):
    load_model(model_config(f'gguf:{tmp_path / "fake.gguf"}', cache_dir=os.fspath(tmp_path / 'cache')))
  path, _ = tiny_gguf
  (tmp_path / 'half.gguf').write_bytes(path.read_bytes()[:os.path.getsize(path) // 2])
  with pytest.raises(ValueError, match=rf"^{tmp_path / 'half.gguf'}: not a readable GGUF file"):
    load_model(model_config(f'gguf:{tmp_path / "half.gguf"}', cache_dir=os.fspath(tmp_path / 'cache')))
  # No tokenizer files: said before any weight is read.
  notok = tmp_path / 'notok'
  notok.mkdir()
  for name in ('config.json', hf.SINGLE_FILE):
    shutil.copy(base_folder / name, notok / name)

  def never(*args, **kwargs):
    raise AssertionError('weights read before the tokenizer was checked')

  monkeypatch.setattr(hf, 'load_params', never)
  with pytest.raises(ValueError, match=rf'^{notok}: no tokenizer files \(none of tokenizer.json, '):
    load_model(model_config(f'hf:{notok}'))


# ------------------------------------------------------------------------------- LoRA export / adapters


def lora_section(targets=(r'.*self_attn\.(q_proj|v_proj)',), rank=4):
  c = get_config().lora
  c.targets, c.rank, c.alpha = targets, rank, 8.0
  return c


def tuned_model(folder, lora_config, seed=0):
  """Our model of `folder` with LoRA adapters set to random non-zero values (B = 0 would hide bugs)."""
  model, tokenizer, cfg = load_model(model_config(f'hf:{folder}'), lora_config)
  rng = np.random.RandomState(seed)
  for var in llama.named_params(model, nnx.LoRAParam).values():
    var.value = jax.numpy.asarray(rng.randn(*var.value.shape).astype(np.float32) * 0.3)
  return model, tokenizer, cfg


def eval_logits(model, ids, pos, seg):
  return np.asarray(nnx.view(model, deterministic=True, raise_if_not_found=False)(ids, pos, seg))


@pytest.fixture(scope='module')
def base_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('base')
  tiny_hf_model(seed=3).save_pretrained(folder)
  save_tokenizer(folder)
  return folder


@pytest.mark.parametrize('targets, written', [
    ((r'.*self_attn\.(q_proj|v_proj)',), ['q_proj', 'v_proj']),
    ((r'layers\.0\.self_attn\.q_proj', r'.*mlp\.down_proj'),
     r'model\.layers\.0\.mlp\.down_proj|model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.down_proj'),
])
def test_peft_folder_loads_in_peft_with_same_logits(base_folder, tmp_path, targets, written):
  import peft as hf_peft
  from palr_jax.hub import peft
  model, _, cfg = tuned_model(base_folder, lora_section(targets))
  peft.save_adapter(tmp_path / 'adapter', model, lora_section(targets), str(base_folder))
  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert adapter_config['target_modules'] == written
  assert (adapter_config['r'], adapter_config['lora_alpha'], adapter_config['peft_type'],
          adapter_config['task_type']) == (4, 8.0, 'LORA', 'CAUSAL_LM')
  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
  tuned = hf_peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  wrapped = {n.removeprefix('base_model.model.') for n, m in tuned.named_modules() if hasattr(m, 'lora_A')}
  assert wrapped == {lora.hf_module_path(p.removesuffix('.lora_a'))
                     for p in llama.named_params(model, nnx.LoRAParam) if p.endswith('lora_a')}
  ids, pos, seg = batch(cfg.vocab_size)
  np.testing.assert_allclose(eval_logits(model, ids, pos, seg), torch_logits(tuned, ids), atol=1e-4, rtol=0)
  # ... and reads back (a run's `adapter/` folder) into a fresh model as the same function.
  fresh, _, _ = load_model(model_config(f'hf:{base_folder}'))
  source, section = adapters.apply_trained_adapter(fresh, tmp_path)
  assert source == f'{tmp_path / "adapter"} (PEFT)' and (section.rank, section.alpha) == (4, 8.0)
  np.testing.assert_allclose(eval_logits(fresh, ids, pos, seg), eval_logits(model, ids, pos, seg), atol=1e-6)


@pytest.mark.parametrize('change, message', [
    ({'use_dora': True}, r"\['use_dora'\] set"),
    ({'rank_pattern': {'q_proj': 8}}, r"\['rank_pattern'\] set"),
    ({'bias': 'all'}, r"\['bias'\] set"),
    ({'peft_type': 'IA3'}, "peft_type is 'IA3'"),
    ({'target_modules': ['gate']}, r"target_modules \['gate'\] matches no module"),
])
def test_peft_adapter_config_errors(base_folder, tmp_path, change, message):
  from palr_jax.hub import peft
  model, _, _ = load_model(model_config(f'hf:{base_folder}'), lora_section())
  peft.save_adapter(tmp_path / 'adapter', model, lora_section(), 'base')
  cfg = json.loads((tmp_path / 'adapter' / peft.CONFIG_FILE).read_text())
  (tmp_path / 'adapter' / peft.CONFIG_FILE).write_text(json.dumps(dict(cfg, **change)))
  fresh, _, _ = load_model(model_config(f'hf:{base_folder}'))
  with pytest.raises(ValueError, match=f'adapter_config.json: {message}'):
    adapters.apply_trained_adapter(fresh, tmp_path)


def save_like_trainer(workdir, model, lora_config, step=7):
  """An orbax checkpoint laid out as palr_jax/train.py writes it: items state (step, lora values by
  dotted path, optimizer state), data, config (the whole config as JSON)."""
  import optax
  import orbax.checkpoint as ocp
  values = {'.'.join(map(str, p)): v.value for p, v in nnx.to_flat_state(lora.lora_state(model))}
  state = {'step': jax.numpy.int32(step), 'lora': values, 'opt_state': optax.adamw(1e-3).init(values)}
  config = get_config()
  config.lora = lora_config
  manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'data', 'config'),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({'processes': [{}]}),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort()))))
  manager.wait_until_finished()
  manager.close()


def test_export_cli_merged_and_peft_from_trainer_checkpoint(base_folder, tmp_path):
  import peft as hf_peft
  from palr_jax import exporter
  lora_config = lora_section((r'.*self_attn\.(q_proj|k_proj|v_proj|o_proj)', r'.*mlp\.up_proj'), rank=2)
  model, _, cfg = tuned_model(base_folder, lora_config, seed=5)
  save_like_trainer(tmp_path / 'run', model, lora_config)
  ids, pos, seg = batch(cfg.vocab_size, seed=1)
  ours = eval_logits(model, ids, pos, seg)

  exporter.export_model(model_config(f'hf:{base_folder}'), tmp_path / 'merged', 'merged', workdir=tmp_path / 'run',
                        max_shard_bytes=exporter.parse_size('30KB'))
  merged = tmp_path / 'merged'
  assert {'config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
          hf.INDEX_FILE} <= {p.name for p in merged.iterdir()}
  assert len(set(json.loads((merged / hf.INDEX_FILE).read_text())['weight_map'].values())) > 2
  assert json.loads((merged / 'generation_config.json').read_text()) == {
      'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 2}
  theirs = transformers.AutoModelForCausalLM.from_pretrained(merged)
  np.testing.assert_allclose(torch_logits(theirs, ids), ours, atol=1e-4, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(merged)
  assert tok.convert_ids_to_tokens(tok('the movie')['input_ids']) == ['t', 'he', 'Ġmovie']

  exporter.export_model(model_config(f'hf:{base_folder}'), tmp_path / 'export' / 'peft', 'peft',
                        workdir=tmp_path / 'run')
  (tmp_path / 'run' / 'export').mkdir()
  shutil.copytree(tmp_path / 'export' / 'peft', tmp_path / 'run' / 'export' / 'peft')
  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
  tuned = hf_peft.PeftModel.from_pretrained(base, tmp_path / 'run' / 'export' / 'peft').eval()
  np.testing.assert_allclose(torch_logits(tuned, ids), ours, atol=1e-4, rtol=0)

  # Without the orbax checkpoints the run's PEFT folder is found instead: same adapters.
  shutil.rmtree(tmp_path / 'run' / 'checkpoints')
  fresh, _, _ = load_model(model_config(f'hf:{base_folder}'))
  source, section = adapters.apply_trained_adapter(fresh, tmp_path / 'run')
  assert source.endswith('export/peft (PEFT)') and section.rank == 2
  np.testing.assert_allclose(eval_logits(fresh, ids, pos, seg), ours, atol=1e-5, rtol=0)


def test_export_bf16_and_errors(base_folder, tmp_path):
  from palr_jax import exporter
  exporter.export_model(model_config(f'hf:{base_folder}'), tmp_path / 'bf16', 'merged', dtype='bfloat16')
  assert json.loads((tmp_path / 'bf16' / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
  assert {str(t.dtype) for t in hf.stored_tensors(tmp_path / 'bf16').values()} == {'bfloat16'}
  # The fp32 base, rounded to bf16 (round-to-nearest-even, as torch does), read by transformers.
  ref = transformers.AutoModelForCausalLM.from_pretrained(base_folder).state_dict()
  bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'bf16').state_dict()
  assert set(bf16) == set(ref)
  for name, value in ref.items():
    torch.testing.assert_close(bf16[name], value.to(torch.bfloat16), rtol=0, atol=0)
  assert exporter.parse_size('5GB') == 5 * 10**9 and exporter.parse_size('30KB') == 30000
  with pytest.raises(ValueError, match='--format peft needs --workdir'):
    exporter.export_model(model_config(f'hf:{base_folder}'), tmp_path / 'x', 'peft')
  (tmp_path / 'untrained').mkdir()
  with pytest.raises(FileNotFoundError, match='no trained adapter'):
    exporter.export_model(model_config(f'hf:{base_folder}'), tmp_path / 'x', 'merged', workdir=tmp_path / 'untrained')
  assert not (tmp_path / 'x').exists()


def snapshot(root):
  """Every file (with its bytes) and folder under `root`, hidden ones included."""
  return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in root.rglob('*')}


def test_export_never_destroys(base_folder, tmp_path, monkeypatch):
  """Issue: export deleted a non-empty --out, the run's own folder (its checkpoints and TensorBoard
  events), and on `--out .` failed leaving a 517 MB temporary folder."""
  from palr_jax import exporter
  spec, lora_config = model_config(f'hf:{base_folder}'), lora_section(rank=2)
  run = tmp_path / 'W' / 'palr_v2'
  save_like_trainer(run, tuned_model(base_folder, lora_config, seed=1)[0], lora_config)
  (run / 'tensorboard').mkdir()
  (run / 'tensorboard' / 'events.out.tfevents.1').write_bytes(b'events')
  (tmp_path / 'D').mkdir()
  (tmp_path / 'D' / 'notes.txt').write_text('mine')
  before = snapshot(tmp_path)
  with pytest.raises(ValueError, match=r'D exists and is not empty; pass --overwrite to replace it'):
    exporter.export_model(spec, tmp_path / 'D', 'merged', workdir=run)
  for out in (run, run / 'merged', tmp_path / 'W'):  # the run folder, inside it, holding it: even with overwrite
    with pytest.raises(ValueError, match='would write into the run folder'):
      exporter.export_model(spec, out, 'merged', workdir=run, overwrite=True)
  monkeypatch.chdir(tmp_path / 'D')
  for out in ('.', '..'):
    with pytest.raises(ValueError, match='is the current directory or holds it; choose a new folder'):
      exporter.export_model(spec, out, 'merged', overwrite=True)
  assert snapshot(tmp_path) == before  # nothing deleted, no temporary folder left


def test_a_failed_export_leaves_the_old_one_and_no_temporary_folder(base_folder, tmp_path, monkeypatch):
  from palr_jax.hub import peft
  from palr_jax import exporter
  spec, lora_config = model_config(f'hf:{base_folder}'), lora_section(rank=2)
  save_like_trainer(tmp_path / 'run', tuned_model(base_folder, lora_config, seed=1)[0], lora_config)
  exporter.export_model(spec, tmp_path / 'merged', 'merged')
  exporter.export_model(spec, tmp_path / 'peft', 'peft', workdir=tmp_path / 'run')
  before = snapshot(tmp_path)

  def full_disk(folder, *args, **kwargs):
    (folder / 'partial.bin').write_bytes(b'half a tensor')
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(hf, 'save_safetensors', full_disk)
  monkeypatch.setattr(peft, 'save_adapter', full_disk)
  for out, fmt, workdir in (('merged', 'merged', ''), ('new', 'merged', ''), ('peft', 'peft', tmp_path / 'run')):
    with pytest.raises(OSError, match='No space left'):
      exporter.export_model(spec, tmp_path / out, fmt, workdir=workdir, overwrite=True)
  assert snapshot(tmp_path) == before


def test_trained_adapter_restores_onto_mesh(base_folder, tmp_path):
  lora_config = lora_section(rank=2)
  model, _, cfg = tuned_model(base_folder, lora_config, seed=9)
  save_like_trainer(tmp_path, model, lora_config)
  c = get_config()
  c.mesh.fsdp, c.mesh.tensor = 4, 2
  mesh = sharding.make_mesh(c.mesh)
  sharded, _, _ = load_model(model_config(f'hf:{base_folder}'), mesh=mesh, rules=c.mesh.rules)
  source, _ = adapters.apply_trained_adapter(sharded, tmp_path, mesh=mesh, rules=c.mesh.rules)
  assert source == f'{tmp_path / "checkpoints"}/7 (orbax)'
  a = llama.named_params(sharded, nnx.LoRAParam)['layers.1.self_attn.v_proj.lora_a'].value
  assert a.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)  # ('embed', 'lora_rank')
  ids, pos, seg = batch(cfg.vocab_size)
  np.testing.assert_allclose(eval_logits(sharded, ids, pos, seg), eval_logits(model, ids, pos, seg),
                             atol=1e-5, rtol=0)
  # A model that already has (other) adapters gets the checkpoint's values.
  other, _, _ = tuned_model(base_folder, lora_config, seed=10)
  adapters.apply_trained_adapter(other, tmp_path)
  np.testing.assert_allclose(eval_logits(other, ids, pos, seg), eval_logits(model, ids, pos, seg),
                             atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- damaged files, full disks


@pytest.mark.parametrize('header, says', [
    ([1, 2], 'its header is a JSON list, expected an object of tensors'),
    ({'w': {'dtype': 'F32', 'shape': [2]}}, "tensor 'w': expected dtype, shape and data_offsets"),
    ({'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0]}}, "tensor 'w': expected dtype"),
    ({'w': 'F32'}, "tensor 'w': expected dtype")])
def test_a_malformed_safetensors_header_names_the_file(tmp_path, header, says):
  """Issue 29.11: a header that is a list, or a tensor without data_offsets, raised a raw TypeError or
  KeyError naming no file."""
  blob = json.dumps(header).encode()
  (tmp_path / hf.SINGLE_FILE).write_bytes(len(blob).to_bytes(8, 'little') + blob + bytes(8))
  with pytest.raises(ValueError) as e:
    hf.stored_tensors(tmp_path)
  assert str(e.value).startswith(f'{tmp_path / hf.SINGLE_FILE}: not a safetensors file') and says in str(e.value)
  assert '\n' not in str(e.value)


def test_a_full_disk_during_a_checkpoint_save_is_one_line(tmp_path, monkeypatch):
  """Issue 29.11: a full disk ended with tensorstore's 3 KB spec as the error line."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from palr_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.train.async_checkpoints = False
  manager = checkpointing.checkpoint_manager(tmp_path / 'checkpoints', config.train)
  spec = json.dumps({'driver': 'zarr3', 'kvstore': {'path': str(tmp_path), 'driver': 'file'}, 'x': 'y' * 3000})

  def full(*args, **kwargs):
    try:
      raise OSError(28, 'No space left on device')
    except OSError as cause:
      raise ValueError(f'UNKNOWN: Error writing local file "{tmp_path}/d/x": [OS error: No space left on device] '
                       f'[tensorstore_spec={spec!r}]') from cause

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full)
  state = {'step': jax.numpy.array(1), 'lora': {'a': jax.numpy.ones((2,))}}
  with pytest.raises(OSError) as e:
    checkpointing.save_checkpoint(manager, 1, state, {'position': 1}, config, None)
  message = str(e.value)
  assert 'no space left on device while saving the checkpoint of step 1' in message and len(message) < 400
  assert str(tmp_path / 'checkpoints') in message
  monkeypatch.setattr(ocp.CheckpointManager, 'wait_until_finished', full)
  with pytest.raises(OSError, match='no space left on device while saving the checkpoint of step 3'):
    checkpointing.finish_saves(manager, 3)
  def other(*args):
    raise ValueError('other')

  monkeypatch.setattr(ocp.CheckpointManager, 'wait_until_finished', other)
  with pytest.raises(ValueError, match='other'):  # not a full disk: raised as it was
    checkpointing.finish_saves(manager, 3)
