"""GGUF (llama.cpp) -> Hugging Face folder, converted once and cached.

A GGUF holds quantized weights, llama.cpp's tensor names and layouts, and the tokenizer as metadata. We
dequantize it with the `gguf` package, undo llama.cpp's rotary row permutation of q/k, write an ordinary
HF folder (config.json, fp32 safetensors, tokenizer files) and from then on load that folder like any other
(`palr_jax.hub.hf`): one import path to test and to trust.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import gguf
import numpy as np
from etils import epath

from palr_jax.hub import hf

# Bump when the conversion's output changes, so stale cache folders are not reused.
CONVERTER_VERSION = 1

# llama.cpp tensor name -> HF LlamaForCausalLM name (per layer `blk.{i}.<key>.weight`, and global).
LAYER_TENSORS = {
    'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
GLOBAL_TENSORS = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
_LAYER_RE = re.compile(r'blk\.(\d+)\.(\w+)\.weight')

# llama.cpp `tokenizer.ggml.pre` -> how text is split before byte-level BPE (the merges were learned on
# these pieces, so a different split gives different ids). GPT-2's regex is ByteLevel's own `use_regex`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    'default': 'gpt2', 'gpt2': 'gpt2',
    'smollm': 'digits+gpt2', 'starcoder': 'digits+gpt2', 'refact': 'digits+gpt2',
    'llama3': 'llama3', 'llama-v3': 'llama3', 'llama-bpe': 'llama3', 'smaug-bpe': 'llama3',
}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


MAGIC = b'GGUF'


def check_file(path) -> None:
  """Raises naming `path` when it is missing or not a GGUF file (its first four bytes), reading nothing else."""
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: GGUF file not found')
  with path.open('rb') as f:
    head = f.read(len(MAGIC))
  if head != MAGIC:
    raise ValueError(f'{path}: not a GGUF file (it starts with {head!r}, a GGUF with {MAGIC!r})')


def open_reader(path) -> gguf.GGUFReader:
  """The file's GGUFReader; a missing, foreign or damaged file is one error naming it."""
  check_file(path)
  try:
    return gguf.GGUFReader(os.fspath(path))
  except (ValueError, OSError, IndexError, KeyError) as e:
    reason = str(e).splitlines()[0] if str(e) else ''
    raise ValueError(f'{path}: not a readable GGUF file ({type(e).__name__}: {reason})') from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """All key/value fields as Python values (strings, numbers, lists)."""
  return {name: field.contents() for name, field in reader.fields.items()
          if not name.startswith('GGUF.')}


def _require(metadata: dict, key: str, path) -> Any:
  if key not in metadata:
    raise ValueError(f'{path}: GGUF metadata has no {key!r}')
  return metadata[key]


def _f32(x: float) -> float:
  """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
  return float(str(np.float32(x)))


def hf_config_from_metadata(metadata: dict[str, Any], path, has_output: bool) -> dict[str, Any]:
  """An HF Llama `config.json` dict from llama.cpp's `llama.*` / `tokenizer.ggml.*` keys.

  `has_output`: whether the file stores `output.weight`; without it the embeddings are tied.
  """
  arch = _require(metadata, 'general.architecture', path)
  if arch != 'llama':
    raise ValueError(f'{path}: general.architecture is {arch!r}; only llama GGUFs are supported')
  get = lambda key: _require(metadata, f'llama.{key}', path)  # noqa: E731
  hidden, heads = int(get('embedding_length')), int(get('attention.head_count'))
  head_dim = int(metadata.get('llama.attention.key_length', hidden // heads))
  rot_dim = int(metadata.get('llama.rope.dimension_count', head_dim))
  if rot_dim != head_dim:
    raise ValueError(f'{path}: llama.rope.dimension_count={rot_dim} != head_dim={head_dim} '
                     '(partial rotary embeddings are not Llama)')
  scaling = metadata.get('llama.rope.scaling.type', 'none')
  if scaling == 'none':
    rope_scaling = None
  elif scaling == 'linear':
    rope_scaling = {'rope_type': 'linear', 'factor': _f32(get('rope.scaling.factor'))}
  else:
    raise ValueError(f'{path}: llama.rope.scaling.type={scaling!r} is not supported (none | linear)')
  tokens = _require(metadata, 'tokenizer.ggml.tokens', path)
  token_id = lambda key: (int(metadata[f'tokenizer.ggml.{key}'])  # noqa: E731
                          if f'tokenizer.ggml.{key}' in metadata else None)
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': int(metadata.get('llama.vocab_size', len(tokens))),
      'hidden_size': hidden,
      'intermediate_size': int(get('feed_forward_length')),
      'num_hidden_layers': int(get('block_count')),
      'num_attention_heads': heads,
      'num_key_value_heads': int(metadata.get('llama.attention.head_count_kv', heads)),
      'head_dim': head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': int(get('context_length')),
      'rms_norm_eps': _f32(get('attention.layer_norm_rms_epsilon')),
      'rope_theta': _f32(metadata.get('llama.rope.freq_base', 10000.0)),
      'rope_scaling': rope_scaling,
      'attention_bias': False,
      'mlp_bias': False,
      'tie_word_embeddings': not has_output,
      'bos_token_id': token_id('bos_token_id'),
      'eos_token_id': token_id('eos_token_id'),
      'pad_token_id': token_id('padding_token_id'),
      'torch_dtype': 'float32',
  }


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation ([out, in] weight, out = num_heads * head_dim).

  HF Llama rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent pairs, so its
  converter reorders each head's rows from [half0, half1] to interleaved pairs
  (`reshape(heads, 2, head_dim // 2, ...).swapaxes(1, 2)`). Reading the interleaved order back as
  (heads, head_dim // 2, 2) and swapping again restores HF's order. k uses the kv head count.
  """
  out = weight.shape[0]
  if out % (2 * num_heads):
    raise ValueError(f'q/k weight with {out} rows does not split into {num_heads} heads of even size')
  return (weight.reshape(num_heads, out // num_heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def hf_tensor_specs(reader: gguf.GGUFReader, config: dict, path) -> list[hf.TensorSpec]:
  """One lazy float32 [out, in] HF tensor per GGUF tensor: dequantized (and q/k un-permuted) only when
  the shard holding it is written, so a big GGUF never sits dequantized in memory whole."""
  specs = []
  for t in reader.tensors:
    if t.name in GLOBAL_TENSORS:
      name, heads = GLOBAL_TENSORS[t.name], None
    else:
      m = _LAYER_RE.fullmatch(t.name)
      if not m or m.group(2) not in LAYER_TENSORS:
        raise ValueError(f'{path}: unexpected tensor {t.name!r} (only plain Llama tensors are supported)')
      name = f'model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.weight'
      heads = {'attn_q': config['num_attention_heads'],
               'attn_k': config['num_key_value_heads']}.get(m.group(2))
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first

    def load(t=t, shape=shape, heads=heads):
      weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
      weight = weight.reshape(shape)
      return unpermute_qk(weight, heads) if heads else weight

    specs.append(hf.TensorSpec(name, shape, np.dtype(np.float32), load))
  return specs


def build_tokenizer(metadata: dict[str, Any], path):
  """A transformers fast tokenizer from `tokenizer.ggml.*` metadata (byte-level BPE vocabularies).

  The split before BPE follows `tokenizer.ggml.pre` (SmolLM2: each digit alone, then GPT-2's regex, as
  in its own tokenizer.json); control tokens become special added tokens, user-defined ones plain added
  tokens, so both are matched whole; the chat template comes from `tokenizer.chat_template`.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  kind = metadata.get('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(f'{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE (gpt2) is supported')
  pre = metadata.get('tokenizer.ggml.pre', 'default')
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(f'{path}: tokenizer.ggml.pre={pre!r} is not supported; expected one of '
                     f'{sorted(_PRE_TOKENIZERS)}')
  tokens = _require(metadata, 'tokenizer.ggml.tokens', path)
  merges = [tuple(m.split(' ', 1)) for m in _require(metadata, 'tokenizer.ggml.merges', path)]
  token_types = metadata.get('tokenizer.ggml.token_type', [1] * len(tokens))

  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False, byte_fallback=False))
  split = _PRE_TOKENIZERS[pre]
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                        use_regex=split != 'llama3')
  tok.pre_tokenizer = {
      'gpt2': byte_level,
      'digits+gpt2': pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
      'llama3': pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), 'isolated'),
                                         byte_level]),
  }[split]
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, token_types) if k == _TOKEN_TYPE_CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, token_types) if k == _TOKEN_TYPE_USER_DEFINED])

  def special(key):
    i = metadata.get(f'tokenizer.ggml.{key}')
    return tokens[int(i)] if i is not None else None

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special('bos_token_id'), eos_token=special('eos_token_id'),
      unk_token=special('unknown_token_id'), pad_token=special('padding_token_id'),
      chat_template=metadata.get('tokenizer.chat_template'),
      add_bos_token=bool(metadata.get('tokenizer.ggml.add_bos_token', False)),
      add_eos_token=bool(metadata.get('tokenizer.ggml.add_eos_token', False)),
      model_max_length=int(metadata.get('llama.context_length', 0)) or None,
      clean_up_tokenization_spaces=False)


def convert(gguf_path, out_dir, max_shard_bytes: int = 2 << 30, replace: bool = True) -> None:
  """Writes the HF folder for `gguf_path` to `out_dir` (atomically: a temp folder, then a rename).

  `replace=False` keeps an `out_dir` that appeared meanwhile (another process converted first)."""
  gguf_path = epath.Path(gguf_path)
  reader = open_reader(gguf_path)
  metadata = read_metadata(reader)
  has_output = any(t.name == 'output.weight' for t in reader.tensors)
  config = hf_config_from_metadata(metadata, gguf_path, has_output)
  specs = hf_tensor_specs(reader, config, gguf_path)
  tokenizer = build_tokenizer(metadata, gguf_path)
  with hf.atomic_dir(out_dir, replace=replace) as tmp:
    hf.write_json(tmp / 'config.json', config)
    hf.write_json(tmp / 'generation_config.json', hf.generation_config(config))
    hf.save_safetensors(tmp, specs, max_shard_bytes)
    tokenizer.save_pretrained(os.fspath(tmp))


def cache_dir_for(gguf_path, cache_root: str = '') -> epath.Path:
  """`<cache_root or ~/.cache/palr_jax>/<stem>-<hash>`; the hash covers the file's identity and the
  converter version, so an edited file or a changed converter gets a fresh folder."""
  gguf_path = epath.Path(gguf_path).resolve()
  st = os.stat(gguf_path)
  key = f'{gguf_path}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}'
  digest = hashlib.sha256(key.encode()).hexdigest()[:12]
  root = epath.Path(cache_root) if cache_root else epath.Path('~/.cache/palr_jax').expanduser()
  return root / f'{gguf_path.stem}-{digest}'


def cached_hf_dir(gguf_path, cache_root: str = '') -> epath.Path:
  """The converted HF folder for `gguf_path`, converting on first use."""
  check_file(gguf_path)
  out = cache_dir_for(gguf_path, cache_root)
  if not (out / 'config.json').exists():
    convert(gguf_path, out, replace=False)
  return out
