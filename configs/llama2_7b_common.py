"""Shared settings for the Llama-2-7B configs (ML-1M, Amazon Beauty) on TPU/GPU pods.

The mesh is picked by the config argument: `v4-32`, `v5e-16` or `8xH100` (default `8xH100`).
LoRA leaves the base frozen, so on GPUs with 80 GiB the bf16 base (13.5 GB) is replicated and the batch is
split over `data` (no weight all-gathers); on TPU v5e (16 GiB HBM) and v4 (32 GiB) the base is sharded
over `fsdp`.
"""
import ml_collections

MESHES = {
    # name: (dcn_data, data, fsdp, tensor)
    'v4-32': (1, 2, 8, 1),     # 16 chips, 4 hosts, 32 GiB HBM each
    'v5e-16': (1, 1, 16, 1),   # 16 chips, 4 hosts, 16 GiB HBM each
    '8xH100': (1, 8, 1, 1),    # one node, 80 GiB each
}


def apply_pod(c: ml_collections.ConfigDict, pod: str) -> ml_collections.ConfigDict:
  if pod not in MESHES:
    raise ValueError(f'config argument: unknown pod {pod!r}; expected one of {sorted(MESHES)}')
  c.mesh.dcn_data, c.mesh.data, c.mesh.fsdp, c.mesh.tensor = MESHES[pod]
  c.model.spec = 'hf:/path/to/Llama-2-7b-hf'   # override: --config.model.spec=hf:DIR
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'bfloat16'
  c.model.remat = 'dots'
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.targets = (r'.*self_attn\.(q_proj|k_proj|v_proj|o_proj)',)
  c.lora.dtype = 'float32'
  return c
