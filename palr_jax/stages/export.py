"""Stage `export`: the chosen variant (`config.export.variant`, at the checkpoint the report evaluated on
test) as a merged Hugging Face folder (`W/export/merged`) and as a PEFT adapter (`W/export/peft`).

The writing is `palr_jax.exporter.export_model`, the library call behind both this stage and
`python -m palr_jax.tools.export`.

Processes: host. Process 0 loads the base on its own devices (the host-local mesh), adds the adapters
from their PEFT folder (no orbax, no collective) and writes; the others wait.
"""
from __future__ import annotations

from palr_jax import exporter
from palr_jax import files
from palr_jax import score_head
from palr_jax.stages import base
from palr_jax.train import checkpointing


def declare(config) -> base.Stage:
  variant = config.export.variant
  return base.Stage(
      name='export', run=run, hashes=('export', 'model.spec', 'model.cache_dir'),
      upstream=('rank', f'finetune_{variant}'), outputs=tuple(f'export/{f}' for f in config.export.formats),
      processes=base.HOST,
      per_process='process 0 loads the base on its host-local mesh, adds the adapters from their PEFT folder and '
           'writes the merged model tensor by tensor; the others wait')


def run(ctx) -> None:
  config, workdir = ctx.config, ctx.workdir
  variant = config.export.variant
  rankings = files.read_json(workdir / 'rankings.json')
  step = rankings['methods'].get(variant, {}).get('checkpoint_step')
  if step is None:
    step = checkpointing.adapter_steps(workdir / variant)[-1]
  ctx.drop_models()  # the inference copy of the base: export loads its own, in fp32
  model_config = config.model.copy_and_resolve_references()
  model_config.param_dtype = 'float32'  # merge W + (alpha/r) A B in fp32, then store as the base is stored
  for fmt in config.export.formats:
    exporter.export_model(model_config, workdir / 'export' / fmt, fmt, workdir=workdir / variant, step=step,
                 overwrite=True, mesh=ctx.local_mesh, rules=config.mesh.rules)
    head = checkpointing.adapter_dir(workdir / variant, step) / score_head.FILE
    if fmt == 'peft' and head.exists():  # the residual head's two scalars, beside the adapter they go with
      score_head.save(workdir / 'export' / fmt, *score_head.load(head.parent))
