"""PALR instruction examples: Recommend and Recommend_Retrieval prompts, chat-templated and tokenized.

Tasks (templates are str.format strings in `config.prompts`):
  recommend            the last <= `max_history` titles of the history, oldest first [+ profile]
                       -> the next item's title.
  recommend_retrieval  the same + K = `config.retriever.num_candidates` candidates, each tagged with a
                       letter that is a single token in the rendered text -> the target's tag and title.
                       Titles are not unique (ML-100K has 22 duplicates): an item is identified by its
                       tag, never by its title.

Targets and the no-leakage rule. H(u) = {valid[u], test[u]} are the user's held-out items.
  train  targets slide over the last `max_examples_per_user` positions p >= 1 of train[u]
         (`prompts.positions = 'last'`) or over every position p >= 1 (`'all'`: every prefix, LlamaRec's
         way; Recommend_Retrieval then only where candidates/train.jsonl has a row), history
         train[u][:p]. Positions whose item is in H(u) are skipped and items of H(u) are removed from the
         history and from the candidate list (both only happen with repeat events), so no training prompt
         of u asks for, shows or offers a held-out item of u. Repeat targets (already in train[u][:p])
         are skipped too: the retriever masks the history, so at test time a repeat is never a
         candidate (and candidates/train.jsonl has no row for it).
  valid  history train[u], target valid[u].    test  history train[u] + [valid[u]], target test[u].
  The profile is one text per user, written from train[u] before its first 'last' training target
  (`palr_jax/profiles.py`), so it never contains a prompt's target or anything after it: with
  `positions = 'all'`, a prompt whose target comes before that point shows no profile. A variant can
  leave the profile out altogether (`variants.<v>.use_profile = False`: shorter prompts).

Candidates: train prompts take row (u, p) of `candidates/train.jsonl`, valid/test prompts the user's row
of `candidates/{valid,test}.jsonl`. With `insert_target`, a target the retriever missed replaces the last
candidate and moves to a seeded random position (`missed_target = 'insert'`, the paper's way), or the
Recommend_Retrieval example is left out (`'skip'`: the model then learns only the situations where its
answer can matter at test time, with the target where the retriever really put it). rank.py turns
`insert_target` off to see the retriever's list as is. Then the order is the retriever's or a seeded
shuffle (`candidate_order`).

Tokens: the tokenizer's own chat template renders [system] + user prompt with the generation prompt, and
the answer is what the template appends for the assistant message up to its end-of-turn token. The two
are tokenized separately, as at inference time, and `loss_mask` is 1 exactly on the answer tokens; with
`retrieval_loss='tag'` a Recommend_Retrieval answer is learned from its tag alone (`loss_mask` 2 there, 0
on the rest): the trainer's loss is then a softmax over the candidates' tags at that position (LlamaRec's
verbalizer), so the model is taught which candidate, not how to spell its title
(`Example.prompt_ids`, `Example.answer_ids`; ranking reads `PromptBuilder.ranking_prompt` and
`candidate_answers`). An
example longer than `max_length` loses its oldest history titles first; instruction, profile and
candidates are never cut (an example that still does not fit is an error). Titles are cut to
`max_title_tokens` tokens once, so a title reads the same in histories, candidate lists and answers.
Only the template writes control tokens: titles, profiles and the instruction text are encoded with
special-token parsing off (palr_jax/data/chat.py), so a title holding `<|im_end|>` stays text.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import string
from typing import NamedTuple

from etils import epath
import numpy as np

from palr_jax import files
from palr_jax.data import chat

TASKS = ('recommend', 'recommend_retrieval')
RETRIEVAL_LOSSES = ('tokens', 'tag')   # how a Recommend_Retrieval answer is learned (see "Tokens" above)
SPLITS = ('train', 'valid', 'test')
CANDIDATE_ORDERS = ('shuffle', 'retriever')
MISSED_TARGETS = ('insert', 'skip')
POSITIONS = ('last', 'all')     # training targets: the last max_examples_per_user of train[u], or all
SPEC_CHUNK = 256                # specs rendered and tokenized per batch: bounds the memory of a stream
_PROBE_TITLE = 'title'


@dataclasses.dataclass(frozen=True)
class Example:
  task: str
  split: str
  user: int                     # dense user index
  position: int                 # index of the target in the user's full sequence (train + valid + test)
  target: int                   # item index
  history: tuple[int, ...]      # items shown, oldest first, after truncation
  candidates: tuple[int, ...]   # recommend_retrieval: items in tag order; recommend, when ranking: the
                                # retriever's list in its order (not shown); else ()
  prompt: str                   # chat-templated text the model conditions on
  answer: str                   # chat-templated answer with its end-of-turn token ('' = no answer)
  input_ids: np.ndarray         # int32 [L]: prompt tokens then answer tokens
  loss_mask: np.ndarray         # int32 [L]: 1 on the answer tokens (or 2 on its tag alone, see above)
  prompt_length: int            # tokens of the prompt; the answer's follow
  item_ids: np.ndarray | None = None  # int32 [L] with item tokens: the item at each placeholder, else -1

  @property
  def prompt_ids(self) -> np.ndarray:
    """The prompt's tokens (through the chat template's generation prompt)."""
    return self.input_ids[:self.prompt_length]

  @property
  def answer_ids(self) -> np.ndarray:
    return self.input_ids[len(self.prompt_ids):]

  @property
  def target_tag_index(self) -> int | None:
    """Index of the target in `candidates` (its tag), None if absent."""
    hits = [j for j, i in enumerate(self.candidates) if i == self.target]
    return hits[0] if hits else None


class Spec(NamedTuple):
  """What an example says, before rendering."""
  task: str
  split: str
  user: int
  position: int
  target: int
  history: tuple[int, ...]
  profile: str
  candidates: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Candidates:
  path: str
  split: str
  rows: dict   # valid/test: user -> items; train: (user, position) -> items (retriever order)


def training_positions(num_train: int, max_examples: int, positions: str = 'last') -> range:
  """Target positions in train[u] for the training prompts, each with history: the last `max_examples`
  ('last'; also where the profile's source ends, see `profile_text.profile_items`) or all ('all')."""
  if max_examples < 1:
    raise ValueError(f'config.prompts.max_examples_per_user must be >= 1, got {max_examples}')
  if positions not in POSITIONS:
    raise ValueError(f'config.prompts.positions = {positions!r}: expected one of {POSITIONS}')
  if positions == 'all':
    return range(1, num_train)
  return range(max(1, num_train - max_examples), num_train)


def variant_use_profile(config, variant: str) -> bool:
  """Whether `variant`'s prompts show the profile: `prompts.use_profile` and, when the variant sets it,
  `variants.<variant>.use_profile` (False: compact prompts without it)."""
  own = config.variants[variant].get('use_profile', None)
  return bool(config.prompts.use_profile) and (own is None or bool(own))


def held_out(split, user: int) -> frozenset[int]:
  return frozenset((int(split.valid[user]), int(split.test[user])))


def read_candidates(path, split, which: str) -> Candidates:
  """Reads `candidates/{which}.jsonl`, checking each row's target against the split (stale files fail)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: not found; run the retriever stage first')
  keys = ('user_index', 'target', 'items') + (('position',) if which == 'train' else ())
  rows = {}
  for line_no, row in enumerate(files.read_jsonl(path), 1):
    where = f'{path}:{line_no}'
    missing = [k for k in keys if k not in row] if isinstance(row, dict) else list(keys)
    if missing:
      raise ValueError(f'{where}: missing keys {missing}; expected {list(keys)}')
    u, target = int(row['user_index']), int(row['target'])
    if not 0 <= u < len(split.train):
      raise ValueError(f'{where}: user_index {u} outside [0, {len(split.train)})')
    if which == 'train':
      p = int(row['position'])
      if not 0 <= p < len(split.train[u]):
        raise ValueError(f'{where}: position {p} outside train[{u}] (length {len(split.train[u])})')
      expected, key = int(split.train[u][p]), (u, p)
    else:
      expected, key = int(getattr(split, which)[u]), u
    if target != expected:
      raise ValueError(f'{where}: target {target} but the split says {expected}; the candidates are '
                       'stale for this data config: rerun the retriever (palr_jax.main ... --rerun retriever)')
    rows[key] = np.asarray(row['items'], np.int64)
  return Candidates(str(path), which, rows)


def cut_title(title: str, tokenizer, max_tokens: int) -> str:
  """One-line title of at most `max_tokens` tokens (cut at a token boundary)."""
  title = ' '.join(title.split())
  ids = chat.encode_text(tokenizer, [title])[0]
  if len(ids) <= max_tokens:
    return title
  return tokenizer.decode(ids[:max_tokens]).replace('\ufffd', '').strip()


def _fields(template: str) -> set[str]:
  return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_config(cfg, tasks: Sequence[str]) -> None:
  """`config.prompts` (templates, sizes, choices) for `tasks`; also run before any compute (validate.py)."""
  required = {
      'recommend': {'history'}, 'recommend_retrieval': {'history', 'candidates'},
      'recommend_response': {'title'}, 'recommend_retrieval_response': {'tag', 'title'},
      'history_line': {'title'}, 'candidate_line': {'tag', 'title'}, 'profile_block': {'profile'}}
  allowed = {'recommend': {'history', 'profile'}, 'recommend_retrieval': {'history', 'profile', 'candidates'}}
  for key, need in required.items():
    got = _fields(cfg[key])
    if not need <= got or not got <= allowed.get(key, need):
      raise ValueError(f'config.prompts.{key} = {cfg[key]!r}: needs the fields {sorted(need)} '
                       f'(allowed: {sorted(allowed.get(key, need))}), has {sorted(got)}')
  for key in ('max_history', 'max_examples_per_user', 'max_title_tokens', 'max_length'):
    if int(cfg[key]) < 1:
      raise ValueError(f'config.prompts.{key} = {cfg[key]}: must be >= 1')
  for key in ('candidate_line', 'recommend_retrieval_response'):
    if cfg[key].count('{tag}') != 1:
      raise ValueError(f'config.prompts.{key} = {cfg[key]!r}: needs exactly one {{tag}}')
  unknown = set(tasks) - set(TASKS)
  if unknown or not tasks:
    raise ValueError(f'tasks {tuple(tasks)}: expected a non-empty subset of {TASKS} (config.variants.*.tasks)')
  if cfg.candidate_order not in CANDIDATE_ORDERS:
    raise ValueError(f'config.prompts.candidate_order = {cfg.candidate_order!r}: expected one of '
                     f'{CANDIDATE_ORDERS}')
  if cfg.missed_target not in MISSED_TARGETS:
    raise ValueError(f'config.prompts.missed_target = {cfg.missed_target!r}: expected one of {MISSED_TARGETS}')
  if cfg.get('positions', 'last') not in POSITIONS:
    raise ValueError(f'config.prompts.positions = {cfg.positions!r}: expected one of {POSITIONS}')


def task_repeats(config, variant: str) -> dict[str, int]:
  """`config.variants.<variant>.task_repeats` checked: copies of each training example per task (missing
  = 1)."""
  given = dict(config.variants[variant].get('task_repeats') or {})
  unknown = set(given) - set(TASKS)
  bad = {t: n for t, n in given.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
  if unknown or bad:
    raise ValueError(f'config.variants.{variant}.task_repeats = {given}: expected task -> int >= 1 for tasks '
                     f'in {TASKS}' + (f'; unknown {sorted(unknown)}' if unknown else '')
                     + (f'; bad {bad}' if bad else ''))
  return {t: int(given.get(t, 1)) for t in TASKS}


def _special_tokens(tokenizer) -> list[str]:
  return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


class PromptBuilder:
  """Renders and tokenizes examples of `tasks` for one config and tokenizer.

  Titles are cut once, the chat template's answer framing is probed once (`answer_prefix`, what the
  template puts before an assistant message's content after the generation prompt, usually ''; and
  `answer_suffix`, its end-of-turn token), and (for recommend_retrieval) every tag is checked to be one
  token where it appears: `tag_ids[j]` is the token of tag j at the start of an answer, the token whose
  logit rank.py reads.
  """

  def __init__(self, config, inter, tokenizer, tasks: Sequence[str] = TASKS, retrieval_loss: str = 'tokens',
               use_profile: bool | None = None, item_tokens: bool = False):
    cfg = config.prompts
    # `use_profile`: a variant's choice (`variant_use_profile`); None = `prompts.use_profile`.
    self.use_profile = bool(cfg.use_profile) if use_profile is None else bool(use_profile)
    check_config(cfg, tasks)
    if retrieval_loss not in RETRIEVAL_LOSSES:
      raise ValueError(f'retrieval_loss {retrieval_loss!r}: expected one of {RETRIEVAL_LOSSES}')
    self.cfg, self.tokenizer, self.seed, self.tasks = cfg, tokenizer, int(config.seed), tuple(tasks)
    self.retrieval_loss = retrieval_loss
    self.template = chat.Template(tokenizer)
    self.num_candidates = int(config.retriever.num_candidates)
    self.titles = [cut_title(t or f'item {i}', tokenizer, cfg.max_title_tokens)
                   for t, i in zip(inter.titles, inter.item_ids)]
    self.answer_prefix, self.answer_suffix = self._probe_answer_framing()
    self.tags = list(cfg.tags)
    self.tag_ids = self._check_tags() if 'recommend_retrieval' in self.tasks else None
    # Collaborative item tokens: one placeholder token right after each shown title (`item_placeholder`).
    self.item_marker, self.item_token_id = (
        item_placeholder(tokenizer, self.chat_prompt('q'), cfg.get('item_token', '')) if item_tokens else ('', None))

  # Rendering.

  def _messages(self, user_text: str) -> list[dict]:
    system = [{'role': 'system', 'content': self.cfg.system}] if self.cfg.system else []
    return system + [{'role': 'user', 'content': user_text}]

  def chat_prompt(self, user_text: str) -> str:
    return self.template.render(self._messages(user_text))

  def prompt_segments(self, user_text: str) -> list[tuple[str, bool]]:
    """The chat prompt as (text, from the template) pieces: the messages' contents are data."""
    return self._marked(self.template.segments(self._messages(user_text))[1])

  def _marked(self, segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """`segments` with each item placeholder in the data text a control piece: the marker is appended to
    titles, which are otherwise encoded as plain text (`chat.encode_segments`), so it stays one token."""
    if self.item_token_id is None:
      return segments
    out = []
    for text, template in segments:
      for k, part in enumerate([text] if template else text.split(self.item_marker)):
        if k:
          out.append((self.item_marker, True))
        if part:
          out.append((part, template))
    return out

  def _probe_answer_framing(self) -> tuple[str, str]:
    """What the template puts around an assistant message: (text before it, text through end-of-turn)."""
    marker = 'PALR_ANSWER_PROBE'
    msgs = self._messages('q')
    prompt = self.chat_prompt('q')
    full = self.tokenizer.apply_chat_template(msgs + [{'role': 'assistant', 'content': marker}],
                                              tokenize=False)
    if not full.startswith(prompt) or marker not in full[len(prompt):]:
      raise ValueError('the tokenizer chat template renders the assistant turn so that the generation '
                       'prompt is not a prefix of it; cannot tell the answer tokens apart')
    tail = full[len(prompt):]
    start = tail.index(marker)
    rest = tail[start + len(marker):]
    ends = [rest.find(s) + len(s) for s in _special_tokens(self.tokenizer) if s in rest]
    if not ends:
      raise ValueError(f'the tokenizer chat template ends the assistant turn with {rest!r}: no special '
                       'end-of-turn token to train on')
    return tail[:start], rest[:min(ends)]

  def user_text(self, task: str, history: Sequence[int], profile: str,
                candidates: Sequence[int] = ()) -> str:
    cfg = self.cfg
    mark = self.item_marker
    lines = '\n'.join(cfg.history_line.format(title=self.titles[i] + mark) for i in history)
    block = cfg.profile_block.format(profile=profile) if self.use_profile and profile else ''
    cands = '\n'.join(cfg.candidate_line.format(tag=self.tags[j], title=self.titles[i] + mark)
                      for j, i in enumerate(candidates))
    return cfg[task].format(history=lines, profile=block, candidates=cands)

  def answer_segments(self, task: str, target: int, candidates: Sequence[int] = ()) -> list[tuple[str, bool]]:
    """The answer as rendered after the prompt: the template's prefix, the content (data), its end-of-turn;
    [] if the target is absent."""
    if task == 'recommend':
      content = self.cfg.recommend_response.format(title=self.titles[target])
    else:
      hits = [j for j, i in enumerate(candidates) if i == target]
      if not hits:
        return []
      content = self.cfg.recommend_retrieval_response.format(tag=self.tags[hits[0]],
                                                             title=self.titles[target])
    return [(self.answer_prefix, True), (content, False), (self.answer_suffix, True)]

  def answer_text(self, task: str, target: int, candidates: Sequence[int] = ()) -> str:
    """The answer as rendered after the prompt (content + end-of-turn); '' if the target is absent."""
    return ''.join(t for t, _ in self.answer_segments(task, target, candidates))

  def encode(self, text: str) -> list[int]:
    """Token ids of text the chat template wrote (its special-token strings are control tokens); data
    goes through `encode_text` or `chat.encode_segments`."""
    return chat.encode_segments(self.tokenizer, [[(text, True)]])[0] if text else []

  def encode_text(self, text: str) -> list[int]:
    """Token ids of plain text (data, config text shown as text): no control tokens."""
    return chat.encode_text(self.tokenizer, [text])[0] if text else []

  # Tags.

  def _single_token(self, text: str, starts: Sequence[int], tag_len: Sequence[int], where: str) -> list[int]:
    """Token ids of the spans [start, start+len) of `text`, each required to be exactly one token."""
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc['input_ids'], enc['offset_mapping']
    out = []
    for s, n in zip(starts, tag_len):
      e = s + n
      hit = [k for k, (a, b) in enumerate(offsets) if a < e and b > s]
      ok = len(hit) == 1 and offsets[hit[0]][1] == e and not text[offsets[hit[0]][0]:s].strip()
      if not ok:
        pieces = self.tokenizer.convert_ids_to_tokens([ids[k] for k in hit])
        raise ValueError(f'config.prompts.tags: tag {text[s:e]!r} is not a single token {where} '
                         f'(it tokenizes as {pieces} in {text[max(0, s - 12):e + 12]!r}); choose tags '
                         'that are single tokens of this tokenizer or change the template')
      out.append(ids[hit[0]])
    return out

  def _check_tags(self) -> np.ndarray:
    k, tags = self.num_candidates, self.tags
    if len(set(tags)) != len(tags):
      raise ValueError(f'config.prompts.tags = {self.cfg.tags!r}: tags must be distinct')
    if k > len(tags):
      raise ValueError(f'config.retriever.num_candidates = {k} exceeds the {len(tags)} tags of '
                       f'config.prompts.tags; at most {len(tags)} candidates can be tagged')
    line = self.cfg.candidate_line
    tag_at = line.format(tag='\0', title=_PROBE_TITLE).index('\0')
    lines = [line.format(tag=t, title=_PROBE_TITLE) for t in tags[:k]]
    prompt = self.chat_prompt(self.cfg.recommend_retrieval.format(
        history=self.cfg.history_line.format(title=_PROBE_TITLE), profile='',
        candidates='\n'.join(lines)))
    block = prompt.index('\n'.join(lines))
    starts = np.cumsum([block] + [len(s) + 1 for s in lines[:-1]]) + tag_at
    self._single_token(prompt, starts, [len(t) for t in tags[:k]], 'in the candidate list')
    resp = self.cfg.recommend_retrieval_response
    ids = []
    for t in tags[:k]:
      answer = self.answer_prefix + resp.format(tag=t, title=_PROBE_TITLE) + self.answer_suffix
      at = len(self.answer_prefix) + resp.format(tag='\0', title=_PROBE_TITLE).index('\0')
      ids += self._single_token(answer, [at], [len(t)], 'in the answer')
    return np.asarray(ids, np.int32)

  # Examples.

  def _prompt(self, spec: Spec, n: int) -> str:
    """The chat-templated prompt of `spec` with its `n` most recent history titles."""
    return self.chat_prompt(self._user_text(spec, n))

  def _user_text(self, spec: Spec, n: int) -> str:
    history = spec.history[len(spec.history) - n:]
    return self.user_text(spec.task, history, spec.profile, spec.candidates)

  def _prompt_ids(self, specs: Sequence[Spec], counts: Sequence[int]) -> tuple[list[str], list[list[int]]]:
    """The chat-templated prompts of `specs` with `counts` history titles, and their token ids."""
    rendered = [self.template.segments(self._messages(self._user_text(s, n))) for s, n in zip(specs, counts)]
    return [text for text, _ in rendered], chat.encode_segments(self.tokenizer,
                                                                [self._marked(p) for _, p in rendered])

  def _truncate(self, spec: Spec, answer_len: int) -> tuple[int, str, list[int]]:
    """The most recent history titles (at least one) whose prompt fits beside the answer."""
    budget = self.cfg.max_length - answer_len
    found, lo, hi = None, 1, len(spec.history) - 1
    while lo <= hi:
      mid = (lo + hi) // 2
      (prompt,), (ids,) = self._prompt_ids([spec], [mid])
      if len(ids) <= budget:
        found, lo = (mid, prompt, ids), mid + 1
      else:
        hi = mid - 1
    if found is None:
      n = min(len(spec.history), 1)
      raise ValueError(
          f'{spec.task} example of user {spec.user} (position {spec.position}) takes '
          f'{len(self._prompt_ids([spec], [n])[1][0]) + answer_len} tokens with {n} history title(s) > '
          f'config.prompts.max_length = {self.cfg.max_length}; instruction, profile and candidates are '
          'never cut: raise max_length or lower max_title_tokens / profiles.max_new_tokens')
    return found

  def examples(self, specs: Sequence[Spec]) -> list[Example]:
    """Renders and tokenizes (batched); an example over `max_length` loses its oldest titles first."""
    specs = [s._replace(history=tuple(int(i) for i in s.history)[-self.cfg.max_history:],
                        candidates=tuple(int(i) for i in s.candidates)) for s in specs]
    answer_segments = [self.answer_segments(s.task, s.target, s.candidates) for s in specs]
    answers = [''.join(t for t, _ in a) for a in answer_segments]
    answer_ids = chat.encode_segments(self.tokenizer, answer_segments)
    prompts, prompt_ids = self._prompt_ids(specs, [len(s.history) for s in specs])
    out = []
    for s, prompt, p_ids, answer, a_ids in zip(specs, prompts, prompt_ids, answers, answer_ids):
      n = len(s.history)
      if len(p_ids) + len(a_ids) > self.cfg.max_length:
        n, prompt, p_ids = self._truncate(s, len(a_ids))
      ids = np.asarray(p_ids + a_ids, np.int32)
      mask = np.zeros(len(ids), np.int32)
      if s.task == 'recommend_retrieval' and self.retrieval_loss == 'tag' and a_ids:
        mask[len(p_ids) + self._tag_index(a_ids, s)] = 2
      else:
        mask[len(p_ids):] = 1
      shown = s.history[len(s.history) - n:]
      items = None if self.item_token_id is None else self._item_ids(s, shown, ids, len(p_ids))
      out.append(Example(s.task, s.split, s.user, s.position, s.target, shown,
                         s.candidates, prompt, answer, ids, mask, len(p_ids), items))
    return out

  def _item_ids(self, spec: Spec, shown: Sequence[int], ids: np.ndarray, prompt_length: int) -> np.ndarray:
    """[L] int32: the item of each placeholder of the prompt (shown history, then the candidates the
    prompt lists), -1 elsewhere; the placeholders must be exactly those."""
    listed = tuple(spec.candidates) if '{candidates}' in self.cfg[spec.task] else ()
    want = list(shown) + list(listed)
    at = np.flatnonzero(ids == self.item_token_id)
    if len(at) != len(want) or (len(at) and at[-1] >= prompt_length):
      raise ValueError(f'{spec.task} example of user {spec.user}: {len(at)} item placeholder token(s) '
                       f'{self.item_marker!r} where {len(want)} titles are shown; the placeholder must be a '
                       'token no title or template produces (config.prompts.item_token)')
    out = np.full(len(ids), -1, np.int32)
    out[at] = np.asarray(want, np.int32)
    return out

  def _tag_index(self, answer_ids: Sequence[int], spec: Spec) -> int:
    """Where the target's tag token is in the answer's tokens (after the template's answer prefix)."""
    tag = int(self.tag_ids[list(spec.candidates).index(spec.target)])
    return list(answer_ids).index(tag)

  def choice_ids(self) -> np.ndarray:
    """The K candidates' tag tokens: what the tag loss and the score mode choose among (checked here for a
    builder without Recommend_Retrieval; ValueError when the tags are not single tokens)."""
    tag_ids = self.tag_ids if self.tag_ids is not None else self._check_tags()
    return np.asarray(tag_ids[:self.num_candidates], np.int32)

  # Ranking.

  def ranking_prompt(self, example: Example) -> list[int]:
    """Token ids up to where the answer's content starts: the prompt and the template's answer prefix."""
    return [int(i) for i in example.prompt_ids] + self.encode(self.answer_prefix)

  def candidate_answers(self, example: Example, end_of_turn: bool) -> list[list[int]]:
    """Token ids of the answer naming each of the example's candidates (in its order), as the model would
    write it after `ranking_prompt`: tag and title (recommend_retrieval) or title, with the end-of-turn
    token when `end_of_turn`."""
    end = self.answer_suffix if end_of_turn else ''
    if example.task == 'recommend_retrieval':
      texts = [self.cfg.recommend_retrieval_response.format(tag=self.tags[j], title=self.titles[i])
               for j, i in enumerate(example.candidates)]
    else:
      texts = [self.cfg.recommend_response.format(title=self.titles[i]) for i in example.candidates]
    return chat.encode_segments(self.tokenizer, [[(t, False), (end, True)] for t in texts])

  def visible_candidates(self, retrieved: np.ndarray, exclude: frozenset[int]) -> list[int]:
    """The K candidates as retrieved: the retriever's list minus `exclude`, cut to K."""
    return [int(i) for i in retrieved if int(i) not in exclude][:self.num_candidates]

  def arrange_candidates(self, retrieved: np.ndarray, target: int, exclude: frozenset[int],
                         rng: np.random.Generator, insert_target: bool) -> list[int]:
    """K candidates in tag order: retriever's list minus `exclude`, target inserted if missed, ordered."""
    items = self.visible_candidates(retrieved, exclude)
    if insert_target and target not in items:
      items = items[:self.num_candidates - 1]
      items.insert(int(rng.integers(len(items) + 1)), target)
    if self.cfg.candidate_order == 'shuffle':
      items = [items[j] for j in rng.permutation(len(items))]
    return items


def item_placeholder(tokenizer, template_text: str, name: str = '') -> tuple[str, int]:
  """(text, token id) of the placeholder whose position carries an item's soft token: `name` (a special
  token of the tokenizer), or else the highest-id special token that is neither bos, eos, pad nor in the
  rendered chat template (`template_text`), else unk, else pad. A special token is one token wherever it
  appears, and text never produces it."""
  specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
  if name:
    if name not in specials:
      raise ValueError(f'config.prompts.item_token = {name!r}: not a special token of the tokenizer '
                       f'(its special tokens: {sorted(specials)[:12]})')
    return name, specials[name]
  busy = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token}
  free = [(i, t) for t, i in specials.items() if t not in busy and t not in template_text]
  if free:
    i, t = max(free)
    return t, i
  for t in (tokenizer.unk_token, tokenizer.pad_token):
    if t and t in specials and t not in template_text and t not in (tokenizer.bos_token, tokenizer.eos_token):
      return t, specials[t]
  raise ValueError('collaborative item tokens: the tokenizer has no special token free for the item '
                   'placeholder (not bos/eos, not in the chat template); set config.prompts.item_token')


def build_examples(builder: PromptBuilder, split, which: str, profiles: Sequence[str] | None,
                   candidates: Candidates | None = None, *, users: Sequence[int] | None = None,
                   insert_target: bool = True, order: int = 0) -> list[Example]:
  """All examples of one split (`which`), users in order, then positions, then tasks, as a list
  (`iter_examples` streams them)."""
  return list(iter_examples(builder, split, which, profiles, candidates, users=users,
                            insert_target=insert_target, order=order))


def iter_examples(builder: PromptBuilder, split, which: str, profiles: Sequence[str] | None,
                  candidates: Candidates | None = None, *, users: Sequence[int] | None = None,
                  insert_target: bool = True, order: int = 0) -> Iterator[Example]:
  """The examples of `build_examples`, rendered and tokenized `SPEC_CHUNK` at a time and yielded one by
  one: memory stays that of one chunk however many examples there are (every prefix of every user)."""
  chunk = []
  for spec in iter_specs(builder, split, which, profiles, candidates, users=users,
                         insert_target=insert_target, order=order):
    chunk.append(spec)
    if len(chunk) == SPEC_CHUNK:
      yield from builder.examples(chunk)
      chunk = []
  if chunk:
    yield from builder.examples(chunk)


def iter_specs(builder: PromptBuilder, split, which: str, profiles: Sequence[str] | None,
               candidates: Candidates | None = None, *, users: Sequence[int] | None = None,
               insert_target: bool = True, order: int = 0) -> Iterator[Spec]:
  """What each example of one split says, users in order, then positions, then tasks.

  `profiles[u]` is the user's profile text ('' or None = none). `candidates` (from `read_candidates` for
  the same split) is needed when recommend_retrieval is a task. With `candidate_order = 'shuffle'`, each
  `order` > 0 draws other seeded shuffles of the same candidates (test-time averaging over orders).
  """
  if which not in SPLITS:
    raise ValueError(f'split {which!r}: expected one of {SPLITS}')
  tasks = builder.tasks
  if 'recommend_retrieval' in tasks and (candidates is None or candidates.split != which):
    raise ValueError(f'recommend_retrieval needs candidates/{which}.jsonl (read_candidates(..., {which!r}))')
  cfg = builder.cfg
  every = cfg.get('positions', 'last') == 'all'
  for u in range(len(split.train)) if users is None else users:
    heldout = held_out(split, u)
    profile = profiles[u] if profiles is not None else ''
    train = [int(i) for i in split.train[u]]
    # The profile is written from train[u] before this position (profile_text.profile_items): a training
    # prompt with an earlier target must not show it (it would hold the target or later events).
    profile_from = training_positions(len(train), cfg.max_examples_per_user).start
    if which == 'train':
      steps = [(p, train[p], [i for i in train[:p] if i not in heldout], heldout, (u, p))
               for p in training_positions(len(train), cfg.max_examples_per_user, cfg.get('positions', 'last'))
               if train[p] not in heldout and train[p] not in train[:p]]   # see "Targets" above
    elif which == 'valid':
      steps = [(len(train), int(split.valid[u]), train, frozenset(), u)]
    else:
      steps = [(len(train) + 1, int(split.test[u]), train + [int(split.valid[u])], frozenset(), u)]
    for p, target, history, exclude, key in steps:
      shown = (profile or '') if p >= profile_from else ''
      for task in tasks:
        cands = ()
        if task == 'recommend' and candidates is not None and not insert_target:   # ranking: keep the list
          cands = builder.visible_candidates(candidates.rows[key], exclude)
        if task == 'recommend_retrieval':
          if key not in candidates.rows:
            if every and which == 'train':   # every prefix: only those the retriever covered
              continue
            raise ValueError(f'{candidates.path}: no row for user_index {u}' +
                             (f' position {p}' if which == 'train' else '') +
                             '; candidates/train.jsonl must cover the last config.prompts.'
                             'max_examples_per_user positions (see config.retriever.max_train_positions)')
          if (insert_target and cfg.missed_target == 'skip'
              and target not in builder.visible_candidates(candidates.rows[key], exclude)):
            continue
          rng = np.random.default_rng((builder.seed, SPLITS.index(which), u, p) + ((order,) if order else ()))
          cands = builder.arrange_candidates(candidates.rows[key], target, exclude, rng, insert_target)
        yield Spec(task, which, u, p, target, tuple(history), shown, tuple(cands))
