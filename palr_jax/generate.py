"""Generate text from a base model, or from the LoRA adapter a run trained.

  python -m palr_jax.generate --model smollm2 --chat --prompt "Name three movies like Toy Story."
  python -m palr_jax.generate --model hf:/data/Llama-2-7b-hf --workdir runs/ml1m --prompt "..." \
      --temperature 0.7 --top-p 0.9 --print-ids

Greedy unless --temperature > 0. `--chat` wraps the prompt as one user turn with the tokenizer's chat
template (and the generation prompt). `--workdir` adds the run's trained adapter (latest orbax
checkpoint, else a PEFT folder; `palr_jax.checkpoints.apply_trained_adapter`).
"""
from __future__ import annotations

import argparse

import jax

from configs.common import get_config
from palr_jax import checkpoints
from palr_jax.model import generate as decoding


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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='smollm2', help='smollm2 | hf:DIR | gguf:FILE')
  parser.add_argument('--workdir', default='', help='apply the LoRA adapter trained in this run folder')
  parser.add_argument('--prompt', required=True)
  parser.add_argument('--chat', action='store_true', help="wrap the prompt in the tokenizer's chat template")
  parser.add_argument('--max-new-tokens', type=int, default=128)
  parser.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  parser.add_argument('--top-p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0, help='sampling seed')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='compute and parameter dtype')
  parser.add_argument('--print-ids', action='store_true', help='also print prompt and output token ids')
  parser.add_argument('--cache-dir', default='', help='GGUF conversion cache (default ~/.cache/palr_jax)')
  args = parser.parse_args(argv)

  c = get_config().model
  c.spec, c.cache_dir, c.dtype, c.param_dtype = args.model, args.cache_dir, args.dtype, args.dtype
  model, tokenizer, config = checkpoints.load_model(c)
  if args.workdir:
    source, _ = checkpoints.apply_trained_adapter(model, args.workdir)
    print(f'[adapter: {source}]')
  ids = prompt_ids(tokenizer, args.prompt, args.chat)
  eos, pad = stop_ids(config, tokenizer)
  (out,) = decoding.generate(model, [ids], max_new_tokens=args.max_new_tokens, eos_ids=eos, pad_id=pad,
                             temperature=args.temperature, top_p=args.top_p,
                             rng=jax.random.key(args.seed))
  if args.print_ids:
    print(f'prompt ids ({len(ids)}): {ids}')
    print(f'output ids ({len(out)}): {out}')
  print(tokenizer.decode(out, skip_special_tokens=True))


if __name__ == '__main__':
  main()
