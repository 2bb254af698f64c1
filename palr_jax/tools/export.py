"""Export a (LoRA-tuned) model as a Hugging Face folder or a PEFT adapter folder.

  # merged: config.json, model.safetensors (sharded above --max_shard_size), generation_config.json, tokenizer
  python -m palr_jax.tools.export --config.model.spec=smollm2 --workdir runs/ml100k-quick/palr_v2 --out /tmp/merged
  # PEFT: adapter_config.json + adapter_model.safetensors, for peft.PeftModel.from_pretrained(base, DIR)
  python -m palr_jax.tools.export --config.model.spec=smollm2 --workdir runs/ml100k-quick/palr_v2 \
      --out /tmp/peft --format peft

The base is `config.model.spec` (smollm2 | hf:DIR | gguf:FILE; `--config` defaults to palr_jax/defaults.py);
`--workdir` is the run folder that trained the adapter (its adapters/step_N PEFT folders, else its latest
orbax checkpoint, else an exported PEFT folder). Without --workdir, `merged` re-exports the base (a GGUF as
an HF folder, say). A non-empty --out is refused unless --overwrite; the current directory and the run
folder itself always are. Only numpy and safetensors write the files: no torch at run time.
"""
from __future__ import annotations

import os

from absl import flags
from etils import epath
from ml_collections import config_flags

from palr_jax import cli
from palr_jax import defaults
from palr_jax import exporter
from palr_jax import validate

def _define_flags() -> None:
  """Only when run as a program (tests import this module beside others that define --config)."""
  config_flags.DEFINE_config_file('config', os.path.abspath(defaults.__file__),
                                  'Config path.py[:arg]; only its model section is read.')
  flags.DEFINE_string('workdir', '', 'Run folder holding the trained LoRA adapter.')
  flags.DEFINE_string('out', None, 'Folder to write.', required=True)
  flags.DEFINE_enum('format', 'merged', exporter.FORMATS, 'What to write.')
  flags.DEFINE_integer('step', None, 'Checkpoint step of the adapter (default: the latest).')
  flags.DEFINE_string('max_shard_size', '5GB', 'merged: split model.safetensors above this size.')
  flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16', 'float16'],
                    'merged: tensor dtype (default: as the base checkpoint stores it).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing non-empty --out.')


def main(argv):
  del argv
  f = flags.FLAGS
  validate.check_config(f.config)
  validate.check_model(f.config.model)
  if f.workdir and not epath.Path(f.workdir).is_dir():
    raise validate.ConfigError(f'--workdir {f.workdir}: no such folder (the run folder that trained the adapter)')
  model_config = f.config.model
  model_config.param_dtype = 'float32'  # merge W + (alpha/r) A B in fp32, then cast to --dtype
  try:  # export_model refuses a destination it would destroy before it loads anything
    source = exporter.export_model(model_config, f.out, f.format, workdir=f.workdir, step=f.step,
                                   max_shard_bytes=exporter.parse_size(f.max_shard_size), dtype=f.dtype,
                                   overwrite=f.overwrite)
  except (ValueError, FileNotFoundError) as e:
    raise validate.ConfigError(str(e)) from None
  if source:
    print(f'adapter: {source}')
  print(f'wrote {f.format} export to {f.out}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
