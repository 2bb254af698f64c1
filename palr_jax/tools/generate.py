"""Generate text from a base model, or from the LoRA adapter a run trained.

  python -m palr_jax.tools.generate --config.model.spec=smollm2 --chat --prompt "Name three movies like Toy Story."
  python -m palr_jax.tools.generate --config.model.spec=hf:/data/Llama-2-7b-hf --workdir runs/ml1m/palr_v2 \
      --prompt "..." --temperature 0.7 --top_p 0.9 --print_ids

Greedy unless --temperature > 0. `--chat` wraps the prompt as one user turn with the tokenizer's chat
template (and the generation prompt). `--workdir` adds the run's trained adapter
(`palr_jax.adapters.apply_trained_adapter`). `--config` defaults to palr_jax/defaults.py; the
model section is read (spec, dtype, cache_dir), and the one length policy (`batching.length_buckets`).
"""
from __future__ import annotations

import os

from absl import flags
from etils import epath
import jax
from ml_collections import config_flags

from palr_jax import adapters
from palr_jax import cli
from palr_jax import defaults
from palr_jax import validate
from palr_jax.hub import load
from palr_jax.model import decode

def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
  """Token ids of the prompt: as one chat user turn plus the assistant header, or as plain text."""
  if chat:
    if not tokenizer.chat_template:
      raise ValueError('--chat: this tokenizer has no chat template')
    text = tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)['input_ids']
  return tokenizer(prompt)['input_ids']


def stop_ids(config, tokenizer) -> tuple[list[int], int]:
  """(EOS ids: the model config's plus the tokenizer's, pad id)."""
  eos = list(config.eos_token_ids)
  if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
    eos.append(tokenizer.eos_token_id)
  if not eos:
    raise ValueError('generate: neither config.json nor the tokenizer names an EOS token')
  pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
  return eos, eos[0] if pad is None else pad


def _define_flags() -> None:
  """Only when run as a program (tests import this module beside others that define --config)."""
  config_flags.DEFINE_config_file('config', os.path.abspath(defaults.__file__), 'Config path.py[:arg].')
  flags.DEFINE_string('workdir', '', 'Apply the LoRA adapter trained in this run folder.')
  flags.DEFINE_string('prompt', None, 'The prompt.', required=True)
  flags.DEFINE_bool('chat', False, "Wrap the prompt in the tokenizer's chat template.")
  flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate at most.')
  flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_bool('print_ids', False, 'Also print prompt and output token ids.')


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  validate.check_config(config)
  validate.check_model(config.model)
  if f.workdir and not epath.Path(f.workdir).is_dir():
    raise validate.ConfigError(f'--workdir {f.workdir}: no such folder (the run folder that trained the adapter)')
  model, tokenizer, llama_config = load.load_model(config.model)
  if f.workdir:
    source, _ = adapters.apply_trained_adapter(model, f.workdir)
    print(f'[adapter: {source}]')
  ids = prompt_ids(tokenizer, f.prompt, f.chat)
  eos, pad = stop_ids(llama_config, tokenizer)
  buckets = [b for b in config.batching.length_buckets] + [-(-len(ids) // 256) * 256]
  (out,) = decode.generate(model, [ids], max_new_tokens=f.max_new_tokens, eos_ids=eos, pad_id=pad,
                           buckets=buckets, temperature=f.temperature, top_p=f.top_p, rng=jax.random.key(f.seed))
  if f.print_ids:
    print(f'prompt ids ({len(ids)}): {ids}')
    print(f'output ids ({len(out)}): {out}')
  print(tokenizer.decode(out, skip_special_tokens=True))


if __name__ == '__main__':
  cli.run(main, _define_flags)
