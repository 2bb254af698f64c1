"""One check of the whole config before anything is computed; every program runs it first.

A bad value raises `ConfigError`: one line naming the key and what was expected. The programs print it
and exit with code 2 (palr_jax/cli.py). Two layers:
  check_config(config)       the values alone: sizes, choices, names that refer to each other. Pure and
                             fast, so it also runs for every point of a sweep before the first one starts.
  check_environment(...)     what the values point at on this machine, for the stages about to run: the
                             data (read, filtered and split as the stages will; K against each user's
                             unwatched items), the model (its spec resolvable, config, tokenizer and weight files
                             present and whole; no weights read), the mesh and the batch sizes that must
                             divide over it, the workdir (created, written to).
The libraries keep their own checks, so a config built in code is still checked where it is used; these
make the failure early: a run must not spend an hour on the retriever and a fine-tune before it reads a
bad `num_candidates`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import os
import re
import uuid

from etils import epath
import numpy as np

from palr_jax import exporter
from palr_jax import fingerprint
from palr_jax import precision
from palr_jax import variants
from palr_jax.data import interactions
from palr_jax.data import profile_text
from palr_jax.data import prompts
from palr_jax.model import attention
from palr_jax.model import scan
from palr_jax.train import step
from palr_jax.train import valid_rank

DTYPES = ('float32', 'bfloat16', 'float16')
MODEL_DTYPES = DTYPES + (precision.AUTO,)  # 'auto': palr_jax/precision.py
RETRIEVERS = ('ials', 'bpr')
REDUCES = ('sum', 'mean')

# Sizes: (key, least value). Every other size is a count that must be at least 1.
_SIZES = {
    'retriever': {'factors': 1, 'iterations': 1, 'num_candidates': 1, 'folds': 2, 'max_train_positions': 0,
                  'user_batch': 1, 'solve_chunk': 1, 'epochs': 1, 'batch_size': 1, 'transition_items': 1,
                  'transition_window': 1, 'transition_top_m': 1, 'score_chunk': 1},
    'eval': {'max_users': 0, 'bootstrap_samples': 1},
    'rank': {'batch_size': 1, 'max_items': 1, 'orders': 1},
    'lora': {'rank': 1},
    'train': {'num_steps': 1, 'batch_size': 1, 'microbatches': 1, 'max_loss_tokens': 0, 'warmup_steps': 0,
              'log_every': 1, 'valid_batches': 0, 'eval_every': 0, 'checkpoint_every': 1, 'keep_latest': 1,
              'keep_best': 0, 'rank_valid_users': 0, 'early_stop_patience': 0},
    'profiles': {'max_history': 1, 'top_genres': 0, 'top_keywords': 0, 'max_new_tokens': 1, 'batch_size': 1},
    'prompts': {'max_history': 1, 'max_examples_per_user': 1, 'max_title_tokens': 1, 'max_length': 1},
    'batching': {'pack_window': 1, 'shuffle_buffer': 0, 'prefetch': 0},
    'data': {'k_core': 0, 'min_history': 3},
}
# Real numbers: (key, least value, whether the least value itself is allowed, greatest value or None).
_NUMBERS = {
    'retriever': {'reg': (0, True, None), 'alpha': (0, True, None), 'init_scale': (0, False, None),
                  'bpr_reg': (0, True, None), 'learning_rate': (0, False, None),
                  'transition_weight': (0, True, 1), 'transition_decay': (0, False, 1)},
    'lora': {'alpha': (0, False, None), 'dropout': (0, True, 1)},
    'train': {'learning_rate': (0, False, None), 'final_lr_fraction': (0, True, 1), 'adam_b1': (0, True, 1),
              'adam_b2': (0, True, 1), 'adam_eps': (0, False, None), 'weight_decay': (0, True, None),
              'grad_clip_norm': (0, True, None), 'peak_tflops_per_device': (0, True, None)},
    'data': {'rating_threshold': (0, True, None)},
}
_CHOICES = {
    'data.source': interactions.SOURCES, 'data.repeats': interactions.REPEATS,
    'retriever.model': RETRIEVERS, 'rank.reduce': REDUCES, 'profiles.kind': profile_text.KINDS,
    'prompts.candidate_order': prompts.CANDIDATE_ORDERS, 'prompts.missed_target': prompts.MISSED_TARGETS,
    'model.dtype': MODEL_DTYPES, 'model.param_dtype': MODEL_DTYPES, 'model.remat': tuple(scan.REMAT_POLICIES),
    'model.attention': attention.ATTENTION_IMPLEMENTATIONS, 'lora.dtype': DTYPES,
    'train.lr_decay': step.LR_DECAYS, 'prompts.positions': prompts.POSITIONS,
    'prompts.train_order': ('users', 'shuffled'),
    'train.best_metric': valid_rank.METRICS,
}
_SPEC = re.compile(r'smollm2|(hf|gguf):.+')


class ConfigError(ValueError):
  """A bad config value, flag or input path, found before anything was computed; the message is one line."""


def bad(key: str, value, expected: str) -> ConfigError:
  return ConfigError(f'config.{key}={value!r}: expected {expected}')


def value(config, key: str):
  """`config.<key>`, or a ConfigError naming the missing key."""
  try:
    return fingerprint.config_value(config, key)
  except (KeyError, AttributeError):
    raise ConfigError(f'config.{key}: missing; configs start from palr_jax.defaults.get_config()') from None


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _reraise(check: Callable, *args) -> None:
  """Runs a library's own check of a config section, its ValueError becoming a ConfigError."""
  try:
    check(*args)
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None


# ---------------------------------------------------------------------------------- the values


def check_config(config) -> None:
  """Every value of the config, alone and against the others; raises the first ConfigError."""
  if not _is_int(value(config, 'seed')):
    raise bad('seed', config.seed, 'an integer')
  for section in _SIZES.keys() | _NUMBERS.keys():
    for key in {**_SIZES.get(section, {}), **_NUMBERS.get(section, {})}:
      _check_value(section, key, value(config, f'{section}.{key}'))
  for key, options in _CHOICES.items():
    if value(config, key) not in options:
      raise bad(key, value(config, key), f'one of {tuple(options)}')
  _check_data(config)
  _check_retriever_search(config)
  _check_eval(config)
  _check_variants(config)
  _check_prompts(config)
  _check_model(config)
  _check_batching(config)
  _check_mesh_config(config)


def _check_value(section: str, key: str, v, name: str = '') -> None:
  """A size or a real number of `_SIZES` / `_NUMBERS`, reported as `name` (default section.key)."""
  name = name or f'{section}.{key}'
  if key in _SIZES.get(section, {}):
    least = _SIZES[section][key]
    if not _is_int(v) or v < least:
      raise bad(name, v, f'an integer >= {least}')
  if key in _NUMBERS.get(section, {}):
    low, closed, high = _NUMBERS[section][key]
    if not _is_number(v) or v < low or (v == low and not closed) or (high is not None and v > high):
      raise bad(name, v, f'a number {">=" if closed else ">"} {low}' + (f' and <= {high}' if high is not None else ''))


def _check_data(config) -> None:
  d = config.data
  if d.source not in ('recbole', 'tfds') and not d.path:
    raise bad('data.path', d.path, f'the folder of the {d.source!r} files (only recbole has an embedded default)')


def _check_retriever_search(config) -> None:
  for name, values in value(config, 'retriever.search').items():
    if not isinstance(values, (tuple, list)):
      raise bad(f'retriever.search.{name}', values, 'a tuple of values')
    if name == 'search' or name not in config.retriever:
      raise bad(f'retriever.search.{name}', values, 'an axis named after a retriever key')
    for v in values:  # each point of the grid must be a valid value of its key
      _check_value('retriever', name, v, f'retriever.search.{name}')


def _check_eval(config) -> None:
  ks = value(config, 'eval.ks')
  if not isinstance(ks, (tuple, list)) or not ks or not all(_is_int(k) and k >= 1 for k in ks):
    raise bad('eval.ks', ks, 'a non-empty tuple of integers >= 1, e.g. (5, 10, 20)')
  methods = value(config, 'eval.methods')
  if not isinstance(methods, (tuple, list)) or not methods or len(set(methods)) != len(methods):
    raise bad('eval.methods', methods, 'a non-empty tuple of distinct method names')
  unknown = [m for m in methods if m != 'retriever' and m not in config.variants]
  if unknown:
    raise bad('eval.methods', tuple(methods), f'"retriever" or keys of config.variants '
              f'{tuple(config.variants)}; unknown {unknown}')
  weights = value(config, 'eval.fusion_weights')
  if not isinstance(weights, (tuple, list)) or not all(_is_number(w) and w >= 0 for w in weights):
    raise bad('eval.fusion_weights', weights, 'a tuple of numbers >= 0 (() = no fused rows)')
  metric = value(config, 'eval.fusion_metric')
  if not (isinstance(metric, str) and re.fullmatch(r'(HR|NDCG)@\d+', metric)):
    raise bad('eval.fusion_metric', metric, "'NDCG@k' or 'HR@k'")


def _check_variants(config) -> None:
  for name, v in value(config, 'variants').items():
    key = f'variants.{name}'
    tasks = tuple(value(config, f'{key}.tasks'))
    if not set(tasks) <= set(prompts.TASKS):
      raise bad(f'{key}.tasks', tasks, f'a subset of {prompts.TASKS} (() for the untuned model)')
    if value(config, f'{key}.rank_task') not in prompts.TASKS:
      raise bad(f'{key}.rank_task', v.rank_task, f'one of {prompts.TASKS}')
    if value(config, f'{key}.retrieval_loss') not in prompts.RETRIEVAL_LOSSES:
      raise bad(f'{key}.retrieval_loss', v.retrieval_loss, f'one of {prompts.RETRIEVAL_LOSSES}')
    if value(config, f'{key}.rank_mode') not in variants.RANK_MODES:
      raise bad(f'{key}.rank_mode', v.rank_mode, f'one of {variants.RANK_MODES}')
    if v.rank_mode == 'score' and v.rank_task != 'recommend_retrieval':
      raise bad(f'{key}.rank_mode', v.rank_mode, "'generate' or 'likelihood' for rank_task "
                f"{v.rank_task!r} ('score' reads candidate tags: rank_task 'recommend_retrieval')")
    _reraise(prompts.task_repeats, config, name)
  if value(config, 'rank.orders') > 1 and config.prompts.candidate_order != 'shuffle':
    raise bad('rank.orders', config.rank.orders, "1 unless config.prompts.candidate_order is 'shuffle' (the "
              'other orders are other seeded shuffles of the candidates)')
  chosen = value(config, 'export.variant')
  trained = tuple(variants.trained_variants(config))
  if chosen not in trained:
    raise bad('export.variant', chosen, f'a trained variant (one with tasks): {trained}')
  formats = value(config, 'export.formats')
  if not isinstance(formats, (tuple, list)) or not formats or not set(formats) <= set(exporter.FORMATS):
    raise bad('export.formats', formats, f'a non-empty tuple of {exporter.FORMATS}')


def uses_tags(config) -> bool:
  """Whether any trained or evaluated variant shows tagged candidates (recommend_retrieval)."""
  used = set(variants.trained_variants(config)) | {m for m in config.eval.methods if m in config.variants}
  return any('recommend_retrieval' in (*config.variants[v].tasks, config.variants[v].rank_task) for v in used)


def _check_prompts(config) -> None:
  _reraise(prompts.check_config, config.prompts, prompts.TASKS)
  _reraise(profile_text.check_template, config.profiles)
  tags = value(config, 'prompts.tags')
  if not isinstance(tags, (tuple, list)) or not all(isinstance(t, str) and t for t in tags):
    raise bad('prompts.tags', tags, 'a tuple of non-empty strings')
  if len(set(tags)) != len(tags):
    raise bad('prompts.tags', tags, 'distinct tags')
  k = config.retriever.num_candidates
  if uses_tags(config) and k > len(tags):
    raise bad('retriever.num_candidates', k, f'at most the {len(tags)} tags of config.prompts.tags (each '
              'candidate is shown with a tag); lower it or add single-token tags')


def _check_model(config) -> None:
  spec = value(config, 'model.spec')
  if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
    raise bad('model.spec', spec, "'smollm2', 'hf:DIR' or 'gguf:FILE'")
  targets = value(config, 'lora.targets')
  if not isinstance(targets, (tuple, list)) or not targets:
    raise bad('lora.targets', targets, 'a non-empty tuple of regular expressions')
  for pattern in targets:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise bad('lora.targets', tuple(targets), f'regular expressions ({pattern!r}: {e})') from None


def _check_batching(config) -> None:
  buckets = value(config, 'batching.length_buckets')
  if (not isinstance(buckets, (tuple, list)) or not buckets or not all(_is_int(b) and b >= 1 for b in buckets)
      or list(buckets) != sorted(set(buckets))):
    raise bad('batching.length_buckets', buckets, 'a non-empty increasing tuple of integers >= 1')
  if max(buckets) < config.prompts.max_length:
    raise bad('batching.length_buckets', buckets,
              f'a largest bucket >= config.prompts.max_length={config.prompts.max_length}')


def _check_mesh_config(config) -> None:
  from palr_jax import sharding
  sizes = {a: value(config, f'mesh.{a}') for a in sharding.MESH_AXES}
  for axis, size in sizes.items():
    if not _is_int(size) or size == 0 or size < -1:
      raise bad(f'mesh.{axis}', size, 'an integer >= 1, or -1 for the remaining devices')
  if sum(s == -1 for s in sizes.values()) > 1:
    raise bad('mesh', sizes, 'at most one axis of size -1')


# ------------------------------------------------------------------------------ the environment


def check_environment(config, stages: Sequence[str], workdir=None) -> None:
  """What the config points at, for the named stages: data files, the model, the mesh, the workdir."""
  if workdir is not None:
    check_workdir(workdir)
  check_data_files(config.data)
  llm_profiles = 'profiles' in stages and config.profiles.kind == 'llm'
  trains = any(s.startswith('finetune_') for s in stages)
  if llm_profiles or trains or 'rank' in stages or 'export' in stages:
    check_model(config.model)
  check_mesh(config, train=trains, rank='rank' in stages, profiles=llm_profiles,
             retriever='retriever' in stages and config.retriever.shard_items)
  check_data(config)  # last: reading the data takes seconds, the checks above none


def check_workdir(path) -> epath.Path:
  """Creates the workdir if needed and writes (then removes) a probe file there: a file in its place or a
  folder that cannot be written is an error now, not after the first stage."""
  path = epath.Path(path)
  if path.exists() and not path.is_dir():
    raise ConfigError(f'--workdir {path}: is a file; expected a folder (new or holding a run)')
  probe = path / f'.palr-write-probe-{uuid.uuid4().hex[:8]}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'--workdir {path}: cannot write there ({e.strerror or e})') from None
  return path


def check_data_files(data_config) -> None:
  try:
    paths = interactions.source_files(data_config)
  except interactions.DataError as e:
    raise ConfigError(str(e)) from None
  for path in paths:
    if not os.path.exists(path):
      raise ConfigError(f'config.data (source {data_config.source!r}, path {data_config.path!r}, name '
                        f'{data_config.name!r}): {path} not found')


def check_data(config) -> None:
  """Reads the data as the stages will (`interactions.load` keeps it for them), so a bad row is one line
  naming the file and row now; then `retriever.num_candidates` against the catalog and against each user's
  unwatched items (the retriever ranks the catalog minus the history, the target excepted)."""
  try:
    inter = interactions.load(config.data)
    split = interactions.leave_one_out(inter)
  except interactions.DataError as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  files_ = interactions.source_files(config.data)
  where = files_[0] if files_ else f'tfds {config.data.name!r}'
  k, num_items = int(config.retriever.num_candidates), len(inter.item_ids)
  if k > num_items:
    raise bad('retriever.num_candidates', k, f'at most the {num_items} items of the catalog ({where}, after '
              'filtering)')
  for u, train in enumerate(split.train):
    for history, target in ((train, split.valid[u]), (np.append(train, split.valid[u]), split.test[u])):
      watched = len(set(history.tolist()) - {int(target)})
      if num_items - watched < k:
        raise bad('retriever.num_candidates', k, f'at most {num_items - watched}: user '
                  f'{str(inter.user_ids[u])!r} of {where} has watched {watched} of the {num_items} items before '
                  'a held-out item, and the candidates are items not watched')


def check_model(model_config) -> None:
  """The model spec names files that are there and whole, read without loading any weight."""
  from palr_jax.hub import gguf, hf, load
  try:
    source = load.model_source(model_config.spec)
    if source.kind == 'gguf':
      gguf.check_file(source.path)
      return
    folder = source.path
    if not folder.is_dir():
      raise FileNotFoundError(f'{folder}: no such folder')
    hf.llama_config(folder, model_config)
    hf.check_tokenizer_files(folder)
    hf.stored_tensors(folder)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f'config.model.spec={model_config.spec!r}: {str(e).splitlines()[0]}') from None


def check_mesh(config, *, train: bool, rank: bool, profiles: bool, retriever: bool) -> None:
  """The mesh fits this job's devices, and each batch divides over the batch shards of the mesh it runs on:
  training over the global mesh, ranking and LLM profiles over each process's host-local mesh."""
  if not (train or rank or profiles or retriever):
    return
  import jax
  if retriever and jax.process_count() > 1:  # the stage runs on process 0 alone: a global mesh would hang
    raise bad('retriever.shard_items', True, f'False on several processes ({jax.process_count()} here): '
              'the retriever runs on process 0 alone and cannot shard over other hosts\' devices')
  from palr_jax import sharding
  rules = config.mesh.rules
  try:
    mesh = sharding.make_mesh(config.mesh)
    if train:
      step.check_batch_layout(config.train, mesh, rules)
    local = sharding.local_mesh(config.mesh)
    if rank:
      sharding.batch_axes_shards(local, rules, config.rank.batch_size, 'config.rank.batch_size')
    if profiles:
      sharding.batch_axes_shards(local, rules, config.profiles.batch_size, 'config.profiles.batch_size')
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None
