"""Token ids of chat-templated text whose message contents are data: control tokens come from the template only.

Titles, profiles and every other text of the data are untrusted. Tokenized with the rendered prompt, a
title holding `<|im_end|> <|im_start|>assistant` would become the template's control ids (an injected turn,
in prompts and in the answer the loss is computed on). So a rendering is kept as pieces, each either the
template's (its special-token strings are the real control ids) or data (encoded with special-token
parsing off, `split_special_tokens`: such a string is plain text, tokens like '<', '|', 'im', ...).

The tokenizer matches special tokens before anything else and encodes the text between two of them on its
own, so joining a template piece's plain text with the data beside it and encoding the runs between the
template's special tokens gives exactly the ids of the whole rendering whenever the data holds no special
token string (tests/test_prompts.py checks it on every example).
"""
from __future__ import annotations

from collections.abc import Sequence
import re

Segments = Sequence[tuple[str, bool]]  # (text, from the template); data pieces have False
_MARK = '\ue000PALR-CONTENT-{}\ue001'  # private-use characters: no template writes them


def special_tokens(tokenizer) -> list[str]:
  """The tokenizer's special added tokens (control tokens), longest first."""
  return sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len,
                reverse=True)


def encode_text(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Plain (data) texts -> token ids, special-token strings in them encoded as text."""
  texts = list(texts)
  if not texts:
    return []
  ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)['input_ids']
  return [list(row) for row in ids]


def encode_segments(tokenizer, rows: Sequence[Segments]) -> list[list[int]]:
  """Each row of (text, from_template) pieces -> token ids: the special-token strings of template pieces
  are their ids; every other character is text (`encode_text`), batched over rows."""
  specials = special_tokens(tokenizer)
  pattern = re.compile('|'.join(map(re.escape, specials))) if specials else None
  plans, texts = [], []  # plan steps: ('text', index into texts) or ('id', control token id)
  for row in rows:
    plan, run = [], []
    for text, template in row:
      at = 0
      for match in (pattern.finditer(text) if template and pattern is not None else ()):
        run.append(text[at:match.start()])
        plan += [('text', len(texts)), ('id', tokenizer.convert_tokens_to_ids(match.group()))]
        texts.append(''.join(run))
        run, at = [], match.end()
      run.append(text[at:])
    plan.append(('text', len(texts)))
    texts.append(''.join(run))
    plans.append(plan)
  nonempty = [j for j, t in enumerate(texts) if t]
  encoded = dict(zip(nonempty, encode_text(tokenizer, [texts[j] for j in nonempty])))
  return [[i for kind, v in plan for i in (encoded.get(v, []) if kind == 'text' else [int(v)])]
          for plan in plans]


class Template:
  """The tokenizer's chat template rendered as (template, data) pieces."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._frames: dict = {}

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                              add_generation_prompt=add_generation_prompt)

  def _frame(self, roles: tuple[str, ...], add_generation_prompt: bool) -> list[str]:
    """The template's text around each message's content, rendered once per sequence of roles."""
    key = (roles, add_generation_prompt)
    if key not in self._frames:
      marks = [_MARK.format(k) for k in range(len(roles))]
      text = self.render([{'role': r, 'content': m} for r, m in zip(roles, marks)], add_generation_prompt)
      frame = []
      for mark in marks:
        before, found, text = text.partition(mark)
        if not found or mark in text:
          raise ValueError('the tokenizer chat template does not write each message content once, as given; '
                           'cannot keep the data text apart from its control tokens')
        frame.append(before)
      self._frames[key] = frame + [text]
    return self._frames[key]

  def segments(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> tuple[str, list]:
    """(the rendered text, its pieces: the template's and each message content as data)."""
    frame = self._frame(tuple(m['role'] for m in messages), add_generation_prompt)
    pieces = [(frame[0], True)]
    for message, after in zip(messages, frame[1:]):
      pieces += [(message['content'], False), (after, True)]
    text = self.render(messages, add_generation_prompt)
    if ''.join(t for t, _ in pieces) != text:
      raise ValueError('the tokenizer chat template changes message content (it renders '
                       f'{text[:80]!r}...); cannot keep the data text apart from its control tokens')
    return text, pieces

  def ids(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    return encode_segments(self.tokenizer, [self.segments(messages, add_generation_prompt)[1]])[0]
