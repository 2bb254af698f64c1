"""Export a model (the base, plus the adapters a run trained) as a merged Hugging Face folder or a PEFT
adapter folder: the library behind the `export` stage (palr_jax/stages/export.py) and
`python -m palr_jax.tools.export`.

`export_model` never destroys what it was not asked to replace: a non-empty destination needs `overwrite`,
and the current directory, the run folder the adapters come from and any folder holding it are refused.
The merged folder is written into a temporary folder, one merged tensor at a time (W + (alpha/r) A B
computed on the devices just before it is written, so the model is never held twice; bench/export_memory.py
measures the host memory), then moved into place, or written to a local temporary folder and copied when
the destination is not on local disk (gs://, any epath filesystem); a failure leaves neither the temporary
folder nor a partial export.
"""
from __future__ import annotations

import os
import re
import tempfile

from etils import epath
import jax

from palr_jax import adapters
from palr_jax import files
from palr_jax.hub import hf, load, peft
from palr_jax.model import item_tokens, llama, lora

FORMATS = ('merged', 'peft')
_SIZE = re.compile(r'(\d+(?:\.\d+)?)\s*([KMG]?B?)', re.IGNORECASE)
_UNITS = {'': 1, 'B': 1, 'K': 1e3, 'KB': 1e3, 'M': 1e6, 'MB': 1e6, 'G': 1e9, 'GB': 1e9}


def parse_size(text: str) -> int:
  """'5GB' / '500MB' / '123' -> bytes (decimal units, as transformers' max_shard_size)."""
  m = _SIZE.fullmatch(text.strip())
  if not m:
    raise ValueError(f'--max_shard_size: expected e.g. 5GB, 500MB or a byte count, got {text!r}')
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _local(path: epath.Path) -> bool:
  return '://' not in os.fspath(path)


def check_destination(out, run_dir=None, overwrite: bool = False) -> None:
  """Refuses an export that would destroy something: the current directory or a folder holding it, the
  run folder the adapters come from (or a folder inside or holding it), or, without `overwrite`, any
  existing non-empty file or folder."""
  out = epath.Path(out)
  if _local(out):
    target = os.path.realpath(out)
    cwd = os.path.realpath(os.getcwd())
    if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
      raise ValueError(f'export: --out {out} is the current directory or holds it; choose a new folder')
    if run_dir is not None and _local(epath.Path(run_dir)):
      run = os.path.realpath(run_dir)
      if run == target or run.startswith(target.rstrip(os.sep) + os.sep) or target.startswith(run + os.sep):
        raise ValueError(f'export: --out {out} would write into the run folder {run_dir} (or over it); '
                         'choose a folder outside it')
  if out.exists() and not overwrite and (not out.is_dir() or any(True for _ in out.iterdir())):
    raise ValueError(f'export: {out} exists and is not empty; pass --overwrite to replace it')


def export_model(model_config, out, fmt: str, *, workdir='', step: int | None = None,
                 max_shard_bytes: int = 5 * 10**9, dtype: str = '', overwrite: bool = False, mesh=None,
                 rules=None) -> str:
  """Loads the base (+ the adapters trained in `workdir`, checkpoint `step`, default the latest) and writes
  `out` as `fmt` ('merged' | 'peft'); returns where the adapters came from ('' for none)."""
  if fmt not in FORMATS:
    raise ValueError(f'export: --format must be one of {FORMATS}, got {fmt!r}')
  if fmt == 'peft' and not workdir:
    raise ValueError('export: --format peft needs --workdir (the run that trained the adapter)')
  out = epath.Path(out)
  check_destination(out, workdir or None, overwrite)
  model, tokenizer, config = load.load_model(model_config, mesh=mesh, rules=rules)
  source, lora_config = '', None
  if workdir:
    source, lora_config = adapters.apply_trained_adapter(model, workdir, step, mesh=mesh, rules=rules)
  base = load.hf_folder(model_config)
  if fmt == 'peft':
    if jax.process_index() == 0 and _local(out):
      with hf.atomic_dir(out) as tmp:  # replaces `out` (overwrite, or empty) only once the adapter is written
        peft.save_adapter(tmp, model, lora_config, str(base))
    elif jax.process_index() == 0:  # an object store: each file is written whole and moved into place
      peft.save_adapter(out, model, lora_config, str(base))
    return source
  params = lora.merged_params(model) if workdir else {p: v.value for p, v in llama.named_params(model).items()}
  dtype = dtype or hf.stored_dtype(base)
  if _local(out):
    hf.save_folder(out, config, params, tokenizer, dtype, max_shard_bytes)
    item_tokens.save_projector(out, model)   # collaborative item tokens: the projector beside the weights
  else:  # an object store: write locally, then copy
    with tempfile.TemporaryDirectory(prefix='palr-export-') as tmp:
      hf.save_folder(epath.Path(tmp) / 'merged', config, params, tokenizer, dtype, max_shard_bytes)
      item_tokens.save_projector(epath.Path(tmp) / 'merged', model)
      files.copy_tree(epath.Path(tmp) / 'merged', out)
  return source
