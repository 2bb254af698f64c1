"""The tiny pipeline of the end-to-end tests: a small RecBole dataset, a tiny random Llama with the prompt
fixtures' tokenizer, and the config that runs every stage on them in seconds.

It is also a config file, so child processes run the real command on it:
  python -m palr_jax.main --config tests/pipeline_fixtures.py:FOLDER[,llm] --workdir W
(FOLDER holds data/ and model/, written by `write_fixtures`; `llm` makes the profiles LLM-written).
"""
from __future__ import annotations

import builtins
import io
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a config file

from tests import prompt_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top

NUM_USERS, NUM_ITEMS = 24, 16


def write_dataset(folder) -> None:
  """RecBole atomic files: users drift through the fixture's titles so MF has signal to learn."""
  rng = np.random.default_rng(0)
  rows = ['user_id:token\titem_id:token\trating:float\ttimestamp:float']
  for u in range(NUM_USERS):
    start = int(rng.integers(NUM_ITEMS))
    length = int(rng.integers(6, 10))
    for t in range(length):
      item = (start + t + int(rng.integers(0, 2))) % NUM_ITEMS
      rows.append(f'u{u}\t{item + 1}\t{int(rng.integers(1, 6))}\t{1000 * u + 10 * t}')
  items = ['item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq']
  for i, (title, genres) in enumerate(zip(prompt_fixtures.TITLES, prompt_fixtures.GENRES)):
    items.append(f'{i + 1}\t{title}\t{1990 + i}\t{" ".join(genres)}')
  folder.mkdir(parents=True)
  (folder / 'tiny.inter').write_text('\n'.join(rows) + '\n')
  (folder / 'tiny.item').write_text('\n'.join(items) + '\n')


def write_model(folder) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = prompt_fixtures.tiny_tokenizer()
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
      bos_token_id=tokenizer.convert_tokens_to_ids('<|im_start|>'),
      eos_token_id=tokenizer.convert_tokens_to_ids('<|im_end|>'),
      pad_token_id=tokenizer.pad_token_id)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  tokenizer.save_pretrained(folder)


def write_fixtures(folder) -> None:
  write_dataset(folder / 'data')
  write_model(folder / 'model')


def config(folder):
  """Every stage on the fixtures under `folder` (data/, model/): 4 training steps, 4 candidates."""
  c = prompt_fixtures.tiny_config(num_candidates=4)
  c.data.source, c.data.path, c.data.name = 'recbole', str(folder / 'data'), 'tiny'
  c.model.spec = f'hf:{folder / "model"}'
  c.retriever.factors, c.retriever.iterations, c.retriever.folds = 8, 3, 2
  c.retriever.reg = 1.0
  c.prompts.max_examples_per_user = 2
  c.batching.pack = False
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.warmup_steps = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.valid_batches = 1
  c.train.async_checkpoints = False
  c.rank.batch_size = 8
  c.rank.max_items = 3
  c.eval.ks = (1, 3, 5)
  c.eval.bootstrap_samples = 50
  return c


def use_ram_filesystem(monkeypatch) -> None:
  """Lets etils.epath open TensorFlow's in-memory `ram://` filesystem the way it opens gs:// (through
  tf.io.gfile): a workdir that is no POSIX path, offline. It lives as long as this process."""
  from etils.epath import backend, gpath, register  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpath, '_URI_PREFIXES', gpath._URI_PREFIXES + ('ram://',))
  monkeypatch.setattr(gpath, '_URI_SCHEMES', gpath._URI_SCHEMES | {'ram'})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, 'ram://', '/ram/')
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'ram', backend.tf_backend)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, 'ram://', gpath.PosixGPath)


LOCAL_IO = {builtins: ('open',), io: ('open',), os: ('open', 'makedirs', 'mkdir', 'rename', 'replace', 'remove',
                                                      'unlink', 'rmdir', 'listdir', 'scandir', 'stat'),
            shutil: ('rmtree', 'copy', 'copy2', 'copyfile', 'copytree', 'move')}


def forbid_local_io(monkeypatch, prefix: str) -> list[str]:
  """Makes every open/os/shutil call on a path starting with `prefix` raise (the workdir must be reached
  through epath); returns the list of such calls, to check afterwards in case a caller swallowed one."""
  calls = []

  def guard(module, name):
    real = getattr(module, name)

    def guarded(*args, **kwargs):
      for arg in args[:2]:
        if isinstance(arg, (str, os.PathLike)) and str(os.fspath(arg)).startswith(prefix):
          calls.append(f'{module.__name__}.{name}({os.fspath(arg)!r})')
          raise AssertionError(f'{calls[-1]}: a workdir path reached without epath')
      return real(*args, **kwargs)
    monkeypatch.setattr(module, name, guarded)

  for module, names in LOCAL_IO.items():
    for name in names:
      guard(module, name)
  return calls


def get_config(arg: str):
  """Config-file entry: 'FOLDER' or 'FOLDER,llm' (LLM-written profiles, 8 new tokens each)."""
  import pathlib  # pylint: disable=g-import-not-at-top
  folder, *options = arg.split(',')
  c = config(pathlib.Path(folder))
  if 'llm' in options:
    c.profiles.kind, c.profiles.max_new_tokens, c.profiles.batch_size = 'llm', 8, 8
    c.profiles.max_history = 3
  return c
