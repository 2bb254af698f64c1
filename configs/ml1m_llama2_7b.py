"""PALR on MovieLens-1M with Llama-2-7B + LoRA, on a TPU or GPU pod (`:8xH100`, `:v5e-16`, `:v4-32`).

Run (8xH100 node; the data folder holds ratings.dat and movies.dat):
  python -m palr_jax.main --config configs/ml1m_llama2_7b.py:8xH100 \
    --config.model.spec=hf:/data/Llama-2-7b-hf --config.data.path=/data/ml-1m --workdir gs://BUCKET/palr/ml1m
TPU v5e-16 (4 hosts), from a workstation with gcloud: see docs/pods.md (launch/tpu_vm.sh).
Check memory first: python -m palr_jax.tools.check --config configs/ml1m_llama2_7b.py:v5e-16 --devices v5e-16
"""
from palr_jax import defaults


def get_config(arg: str = '8xH100'):
  c = defaults.get_config()
  c.data.source = 'ml-1m'
  c.data.path = '/path/to/ml-1m'
  c.data.name = 'ml-1m'
  c.retriever.num_candidates = 20
  return defaults.with_pod(c, arg or '8xH100')
