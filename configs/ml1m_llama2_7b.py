"""PALR on MovieLens-1M with Llama-2-7B + LoRA, on a TPU or GPU pod.

Run (8xH100 node; the data folder holds ratings.dat and movies.dat):
  python -m palr_jax.main --config configs/ml1m_llama2_7b.py:8xH100 \
    --config.model.spec=hf:/data/Llama-2-7b-hf --config.data.path=/data/ml-1m --workdir gs://BUCKET/palr/ml1m
TPU v5e-16 (4 hosts), from a workstation with gcloud:
  launch/tpu_vm.sh --name palr-v5e --zone us-west4-a --type v5litepod-16 -- \
    python -m palr_jax.main --config configs/ml1m_llama2_7b.py:v5e-16 \
    --config.model.spec=hf:/data/Llama-2-7b-hf --config.data.path=/data/ml-1m --workdir gs://BUCKET/palr/ml1m
Check memory first: python -m palr_jax.check --config configs/ml1m_llama2_7b.py:v5e-16 --devices v5e-16
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import llama2_7b_common  # noqa: E402


def get_config(arg: str = '8xH100'):
  c = common.get_config()
  c.data.source = 'ml-1m'
  c.data.path = '/path/to/ml-1m'
  c.data.name = 'ml-1m'
  c.retriever.num_candidates = 20
  return llama2_7b_common.apply_pod(c, arg or '8xH100')
