"""Shows what the model is trained on: rendered PALR examples with the loss-masked answer marked.

  python -m palr_jax.prompts --config configs/ml100k.py --workdir W --show 3 [--split train]

For each task, `--show` examples of the split (the last one of each of the first users) are decoded from
their token ids, exactly as the trainer sees them; the tokens the loss is computed on are wrapped in
[[ ]]. Needs `W/candidates/` (recommend_retrieval) and, for `profiles.kind = 'llm'`, `W/profiles.jsonl`.
"""
from __future__ import annotations

from collections.abc import Sequence
import itertools

from absl import app, flags
from etils import epath
import numpy as np

from palr_jax.data import prompts


def marked_text(tokenizer, input_ids: Sequence[int], loss_mask: Sequence[int], left: str = '[[',
                right: str = ']]') -> str:
  """The decoded example with every run of loss tokens wrapped in `left` ... `right`."""
  out = []
  for masked, run in itertools.groupby(zip(input_ids, loss_mask), key=lambda t: bool(t[1])):
    text = tokenizer.decode([int(i) for i, _ in run])
    out.append(f'{left}{text}{right}' if masked else text)
  return ''.join(out)


def show_examples(config, inter, split, tokenizer, profiles, candidates, which: str, show: int) -> str:
  """Up to `show` examples per task (one per user: its last), rendered with `marked_text`."""
  builder = prompts.PromptBuilder(config, inter, tokenizer)
  users = range(min(show, len(inter.user_ids)))
  examples = prompts.build_examples(builder, split, which, profiles, candidates, users=users)
  blocks = []
  for task in config.prompts.tasks:
    last = {e.user: e for e in examples if e.task == task}
    for e in last.values():
      title = inter.titles[e.target]
      head = (f'── {task} · {which} · user {inter.user_ids[e.user]} · target {inter.item_ids[e.target]} '
              f'{title!r} · {len(e.input_ids)} tokens, {int(np.sum(e.loss_mask))} in the loss ──')
      blocks.append(head + '\n' + marked_text(tokenizer, e.input_ids, e.loss_mask))
  return '\n\n'.join(blocks)


def run(config, workdir, show: int, which: str) -> None:
  from palr_jax import checkpoints, profiles
  from palr_jax.checkpoints import hf
  from palr_jax.data import interactions

  workdir = epath.Path(workdir)
  inter = interactions.load(config.data)
  split = interactions.leave_one_out(inter)
  tokenizer = hf.load_tokenizer(checkpoints.hf_folder(config.model))
  texts = profiles.current_profiles(config, workdir, inter, split) if config.prompts.use_profile else None
  candidates = (prompts.read_candidates(workdir / 'candidates' / f'{which}.jsonl', split, which)
                if 'recommend_retrieval' in config.prompts.tasks else None)
  print(show_examples(config, inter, split, tokenizer, texts, candidates, which, show))


if __name__ == '__main__':
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).')
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (W) holding candidates/ and profiles.jsonl.')
  _SHOW = flags.DEFINE_integer('show', 3, 'Examples per task.')
  _SPLIT = flags.DEFINE_enum('split', 'train', prompts.SPLITS, 'Which examples.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(lambda argv: run(_CONFIG.value, _WORKDIR.value, _SHOW.value, _SPLIT.value))
