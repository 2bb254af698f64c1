"""Shows what the model is trained on: rendered PALR examples with the loss-masked answer marked.

  python -m palr_jax.tools.show_prompts --config configs/ml100k.py:quick --workdir W --show 3 [--split train]

For each task of `--variant` (default palr_v2), `--show` examples of the split (the last one of each of the
first users) are decoded from their token ids, exactly as the trainer sees them; the tokens the loss is
computed on are wrapped in [[ ]]. Needs the retriever's `W/candidates/` (recommend_retrieval) and the
profiles stage's `W/profiles.jsonl` (`python -m palr_jax.main ... --stages retriever,profiles`); stats
profiles are computed here when the file is missing.
"""
from __future__ import annotations

from collections.abc import Sequence
import itertools

from absl import flags
from etils import epath
from ml_collections import config_flags
import numpy as np

from palr_jax import cli
from palr_jax import validate
from palr_jax.data import interactions
from palr_jax.data import profile_text
from palr_jax.data import prompts
from palr_jax.hub import hf, load

def marked_text(tokenizer, input_ids: Sequence[int], loss_mask: Sequence[int], left: str = '[[',
                right: str = ']]') -> str:
  """The decoded example with every run of loss tokens wrapped in `left` ... `right`."""
  out = []
  for masked, run in itertools.groupby(zip(input_ids, loss_mask), key=lambda t: bool(t[1])):
    text = tokenizer.decode([int(i) for i, _ in run])
    out.append(f'{left}{text}{right}' if masked else text)
  return ''.join(out)


def show_examples(config, inter, split, tokenizer, profiles, candidates, which: str, show: int,
                  tasks: Sequence[str]) -> str:
  """Up to `show` examples per task (one per user: its last), rendered with `marked_text`."""
  builder = prompts.PromptBuilder(config, inter, tokenizer, tasks)
  users = range(min(show, len(inter.user_ids)))
  examples = prompts.build_examples(builder, split, which, profiles, candidates, users=users)
  blocks = []
  for task in tasks:
    last = {e.user: e for e in examples if e.task == task}
    for e in last.values():
      title = inter.titles[e.target]
      head = (f'── {task} · {which} · user {inter.user_ids[e.user]} · target {inter.item_ids[e.target]} '
              f'{title!r} · {len(e.input_ids)} tokens, {int(np.sum(e.loss_mask))} in the loss ──')
      blocks.append(head + '\n' + marked_text(tokenizer, e.input_ids, e.loss_mask))
  return '\n\n'.join(blocks)


def _define_flags() -> None:
  """Only when run as a program (tests import this module beside others that define --config)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).')
  flags.DEFINE_string('workdir', None, 'Run directory (W) holding candidates/ and profiles.jsonl.')
  flags.DEFINE_integer('show', 3, 'Examples per task.')
  flags.DEFINE_enum('split', 'train', prompts.SPLITS, 'Which examples.')
  flags.DEFINE_string('variant', 'palr_v2', 'Whose tasks (a key of config.variants).')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  f = flags.FLAGS
  config, workdir, which = f.config, epath.Path(f.workdir), f.split
  validate.check_config(config)
  if f.variant not in config.variants:
    raise validate.ConfigError(f'--variant {f.variant!r}: not in config.variants ({list(config.variants)})')
  if not workdir.is_dir():
    raise validate.ConfigError(f'--workdir {workdir}: no such folder (a run of `palr_jax.main --stages '
                               'retriever,profiles`)')
  validate.check_data_files(config.data)
  validate.check_model(config.model)
  variant = config.variants[f.variant]
  tasks = tuple(variant.tasks) or (variant.rank_task,)
  inter = interactions.load(config.data)
  split = interactions.leave_one_out(inter)
  tokenizer = hf.load_tokenizer(load.hf_folder(config.model))
  texts = None
  if config.prompts.use_profile:
    path = workdir / 'profiles.jsonl'
    if path.exists() or config.profiles.kind != 'stats':
      texts = profile_text.read_profiles(path, inter)
    else:
      texts = [r['profile'] for r in profile_text.stats_profiles(inter, split, config)]
  candidates = (prompts.read_candidates(workdir / 'candidates' / f'{which}.jsonl', split, which)
                if 'recommend_retrieval' in tasks else None)
  print(show_examples(config, inter, split, tokenizer, texts, candidates, which, f.show, tasks))


if __name__ == '__main__':
  cli.run(main, _define_flags)
