"""Export a (LoRA-tuned) model as a Hugging Face folder or a PEFT adapter folder.

  # merged: config.json, model.safetensors (sharded above --max-shard-size), generation_config.json, tokenizer
  python -m palr_jax.export --model smollm2 --workdir runs/ml100k --out runs/ml100k/export/merged
  # PEFT: adapter_config.json + adapter_model.safetensors, for peft.PeftModel.from_pretrained(base, DIR)
  python -m palr_jax.export --model smollm2 --workdir runs/ml100k --out runs/ml100k/export/peft --format peft

`--model` is smollm2 | hf:DIR | gguf:FILE (the base); `--workdir` is the run that trained the adapter
(its latest orbax checkpoint, or a PEFT folder: `palr_jax.checkpoints.apply_trained_adapter`). Without --workdir, `merged` re-exports the base (e.g. a GGUF as an
HF folder). Only numpy and safetensors write the files: no torch at run time.
"""
from __future__ import annotations

import argparse
import re

import jax

from configs.common import get_config
from palr_jax import checkpoints
from palr_jax.checkpoints import hf, peft
from palr_jax.model import llama, lora

_SIZE = re.compile(r'(\d+(?:\.\d+)?)\s*([KMG]?B?)', re.IGNORECASE)
_UNITS = {'': 1, 'B': 1, 'K': 1e3, 'KB': 1e3, 'M': 1e6, 'MB': 1e6, 'G': 1e9, 'GB': 1e9}


def parse_size(text: str) -> int:
  """'5GB' / '500MB' / '123' -> bytes (decimal units, as transformers' max_shard_size)."""
  m = _SIZE.fullmatch(text.strip())
  if not m:
    raise argparse.ArgumentTypeError(f'--max-shard-size: expected e.g. 5GB, 500MB or a byte count, got {text!r}')
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def export(model_config, out: str, fmt: str, workdir: str = '', max_shard_bytes: int = 5 * 10**9,
           dtype: str = '', step: int | None = None) -> None:
  """Loads the base (+ the workdir's adapter, from checkpoint `step`, default the latest) and writes
  `out` in `fmt` ('merged' | 'peft')."""
  if jax.process_count() > 1:
    raise RuntimeError('export: run on a single process (it gathers every tensor to this host)')
  if fmt not in ('merged', 'peft'):
    raise ValueError(f"export: --format must be 'merged' or 'peft', got {fmt!r}")
  model, tokenizer, config = checkpoints.load_model(model_config)
  trained = bool(workdir)
  if trained:
    source, lora_config = checkpoints.apply_trained_adapter(model, workdir, step)
    print(f'adapter: {source}')
  elif fmt == 'peft':
    raise ValueError('export: --format peft needs --workdir (the run that trained the adapter)')
  base = checkpoints.hf_folder(model_config)
  if fmt == 'peft':
    peft.save_adapter(out, model, lora_config, str(base))
    return
  merged = lora.merge_lora(model) if trained else model
  params = {path: var.value for path, var in llama.named_params(merged).items()}
  hf.save_folder(out, config, params, tokenizer, dtype or hf.stored_dtype(base), max_shard_bytes)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='smollm2', help='smollm2 | hf:DIR | gguf:FILE (the base model)')
  parser.add_argument('--workdir', default='', help='run folder holding the trained LoRA adapter')
  parser.add_argument('--out', required=True, help='folder to write (replaced atomically)')
  parser.add_argument('--format', default='merged', choices=('merged', 'peft'))
  parser.add_argument('--max-shard-size', type=parse_size, default='5GB',
                      help='merged: split model.safetensors above this size (default 5GB)')
  parser.add_argument('--dtype', default='', choices=('', 'float32', 'bfloat16', 'float16'),
                      help='merged: tensor dtype (default: as the base checkpoint stores it)')
  parser.add_argument('--cache-dir', default='', help='GGUF conversion cache (default ~/.cache/palr_jax)')
  args = parser.parse_args(argv)
  c = get_config().model
  c.spec, c.cache_dir = args.model, args.cache_dir
  c.param_dtype = 'float32'  # merge W + (alpha/r) A B in fp32, then cast to --dtype
  export(c, args.out, args.format, args.workdir, args.max_shard_size, args.dtype)
  print(f'wrote {args.format} export to {args.out}')


if __name__ == '__main__':
  main()
