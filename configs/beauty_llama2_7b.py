"""PALR on Amazon Beauty (5-core) with Llama-2-7B + LoRA, on a TPU or GPU pod.

Run (8xH100 node; the data folder holds reviews_Beauty_5.json.gz and meta_Beauty.json.gz):
  python -m palr_jax.main --config configs/beauty_llama2_7b.py:8xH100 \
    --config.model.spec=hf:/data/Llama-2-7b-hf --config.data.path=/data/amazon --workdir gs://BUCKET/palr/beauty
TPU v4-32 (4 hosts):
  launch/tpu_vm.sh --name palr-v4 --zone us-central2-b --type v4-32 -- \
    python -m palr_jax.main --config configs/beauty_llama2_7b.py:v4-32 \
    --config.model.spec=hf:/data/Llama-2-7b-hf --config.data.path=/data/amazon --workdir gs://BUCKET/palr/beauty
"""
from palr_jax import defaults


def get_config(arg: str = '8xH100'):
  c = defaults.get_config()
  c.data.source = 'amazon'
  c.data.path = '/path/to/amazon'
  c.data.name = 'Beauty'
  c.data.k_core = 5
  c.retriever.num_candidates = 20
  # Templates speak of products, not movies.
  c.profiles.template = (
      'A customer bought these beauty products, oldest first:\n{history}\nCategories they bought most: '
      '{genres}.\n{user}In two sentences, describe this customer\'s preferences: product types, brands '
      'and needs. Do not list products.')
  intro = 'A customer bought these products, oldest first:\n{history}\n{profile}'
  c.prompts.recommend = intro + 'Recommend the product the customer will buy next. Answer with its title.'
  c.prompts.recommend_retrieval = (intro + 'Candidates:\n{candidates}\n'
                                   'Which candidate will the customer buy next? Answer with its letter and title.')
  c.prompts.max_title_tokens = 32
  return defaults.with_pod(c, arg or '8xH100')
