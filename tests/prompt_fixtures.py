"""Shared fixtures of the prompt, profile and pipeline tests: a tiny byte-level BPE tokenizer with
SmolLM2's ChatML chat template, a small Interactions with a duplicated title, and candidate files."""
from __future__ import annotations

import json

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from palr_jax.defaults import get_config
from palr_jax.data import interactions

# SmolLM2-135M-Instruct's template (from its GGUF), verbatim.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']

TITLES = ['Toy Story', 'GoldenEye', 'Sabrina', 'Heat', 'Sabrina', 'Casino', 'Fargo', 'Babe',
          'Clueless', 'Rob Roy', 'Jumanji', 'Balto', 'Get Shorty', 'Copycat', 'Nixon', 'Othello']
GENRES = [('Animation', 'Comedy'), ('Action', 'Thriller'), ('Comedy', 'Romance'), ('Action', 'Crime'),
          ('Comedy', 'Romance'), ('Crime', 'Drama'), ('Crime', 'Drama'), ('Comedy', 'Drama'),
          ('Comedy',), ('Drama', 'War'), ('Adventure',), ('Animation',), ('Comedy', 'Crime'),
          ('Crime', 'Thriller'), ('Drama',), ('Drama',)]
SEQUENCES = [[0, 1, 3, 5, 6, 2, 7, 8, 9, 4], [2, 10, 11, 0, 12, 13], [5, 6, 7, 3, 4],
             [1, 0, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
  """Byte-level BPE trained in-process on the fixture's titles and template words."""
  corpus = TITLES + [' '.join(g) for g in GENRES] + [
      'A user watched these movies, oldest first:', 'Recommend the movie the user will watch next.',
      'Which candidate will the user watch next? Answer with its letter and title.', 'Candidates:',
      'Profile: likes comedy and drama', 'You are a helpful AI assistant named SmolLM, trained by Hugging Face',
      'user assistant system'] * 3
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>',
                                 chat_template=CHATML, clean_up_tokenization_spaces=False)


def tiny_interactions(sequences=SEQUENCES, titles=TITLES) -> interactions.Interactions:
  users = len(sequences)
  return interactions.Interactions(
      name='tiny', user_ids=np.array([f'u{u}' for u in range(users)]),
      item_ids=np.array([str(i + 1) for i in range(len(titles))]),
      sequences=[np.asarray(s, np.int32) for s in sequences],
      timestamps=[np.arange(len(s), dtype=np.int64) for s in sequences],
      titles=list(titles), genres=list(GENRES[:len(titles)]),
      user_features={'age': np.array(['24', '53', '23', '33'][:users]),
                     'gender': np.array(['M', 'F', 'M', 'F'][:users]),
                     'occupation': np.array(['technician', 'other', 'writer', 'artist'][:users]),
                     'zip_code': np.array(['85711', '94043', '32067', '15213'][:users])})


def tiny_config(num_candidates: int = 4):
  c = get_config()
  c.model.dtype = c.model.param_dtype = 'float32'  # not 'auto': subprocess runs match on every machine
  c.retriever.num_candidates = num_candidates
  c.prompts.max_examples_per_user = 3
  c.prompts.max_history = 5
  c.prompts.max_length = 256
  c.batching.length_buckets = (64, 128, 256)
  c.profiles.kind = 'stats'
  c.train.batch_size = 4
  c.train.max_loss_tokens = 0
  return c


def retrieve(num_items: int, history, count: int) -> list[int]:
  """A deterministic stand-in retriever: items by (7 * i) mod catalog, history masked."""
  seen = set(int(i) for i in history)
  order = sorted(range(num_items), key=lambda i: (7 * i) % num_items)
  return [i for i in order if i not in seen][:count]


def write_candidates(directory, inter, split, count: int) -> None:
  """candidates/{train,valid,test}.jsonl in the retriever's format (docs/ARCHITECTURE.md)."""
  directory.mkdir(parents=True, exist_ok=True)
  n = len(inter.item_ids)

  def row(u, target, history, **extra):
    items = retrieve(n, history, count)
    rank = items.index(target) if target in items else count + 5
    return {'user': str(inter.user_ids[u]), 'user_index': u, 'target': int(target), 'items': items,
            'item_ids': [str(inter.item_ids[i]) for i in items], 'scores': [float(-k) for k in range(len(items))],
            'target_rank': rank, **extra}

  rows = {'train': [], 'valid': [], 'test': []}
  for u, train in enumerate(split.train):
    for p in range(1, len(train)):
      rows['train'].append(row(u, train[p], train[:p], position=p))
    rows['valid'].append(row(u, split.valid[u], train))
    rows['test'].append(row(u, split.test[u], list(train) + [split.valid[u]]))
  for name, lines in rows.items():
    (directory / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
