"""Training checkpoints (orbax) and the adapters a run trained.

A checkpoint under `W/<variant>/checkpoints/<step>` holds the train state (adapters, optimizer state,
step), every process's data-iterator state and the config, never the frozen base; orbax writes it
asynchronously, and only finalized steps count. `write_adapters` writes each kept checkpoint's adapters
as a PEFT folder; palr_jax/adapters.py adds a run's adapters to a model for inference.

Restoring fails in one line, never in orbax's traceback: adapters of other shapes than the model's are
found before any array is read, with the config keys whose saved value differs from this run's (say
`config.lora.rank`); a checkpoint that cannot be read (a chunk cut short) names the step folder and what
to do.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging as py_logging
import os
import re
import tempfile
from typing import Any

from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from palr_jax import files
from palr_jax import fingerprint
from palr_jax.hub import peft
from palr_jax.model import lora
from palr_jax import score_head

ITEMS = ('state', 'data', 'config')  # the items of a checkpoint step
ADAPTERS = 'adapters'   # W/adapters/step_<N>: each kept checkpoint's adapters as a PEFT folder


# Where orbax (tensorstore) can write the arrays itself: local paths and gs://. Elsewhere (any other
# filesystem etils.epath knows) it works on a local mirror (`_MirroredManager`).
_ORBAX_URLS = ('gs://',)


def orbax_manager(directory: epath.PathLike, options: ocp.CheckpointManagerOptions | None = None
                  ) -> ocp.CheckpointManager:
  """The orbax manager of a trainer's `W/checkpoints`, whose steps hold the items state, data and config.

  A local `directory` is made absolute first (orbax refuses relative paths, and the README's workdirs
  are relative); gs:// is used as it is; any other URL gets a local mirror (`_MirroredManager`).
  """
  directory = epath.Path(directory)
  text = os.fspath(directory)
  if files.is_local(text):
    directory = epath.Path(os.path.abspath(text))
  elif not text.startswith(_ORBAX_URLS):
    return _MirroredManager(directory, options)
  return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)


class _MirroredManager(ocp.CheckpointManager):
  """Orbax on a folder tensorstore cannot write (e.g. TensorFlow's ram://, an fsspec filesystem): orbax
  works on a local folder that mirrors it, pulled when the manager opens, pushed (finished steps copied,
  deleted steps deleted, through epath) after every save, which is therefore synchronous. One process
  only: on several, orbax writes every process's shards into one folder, which must be shared storage.
  """

  def __init__(self, remote: epath.Path, options: ocp.CheckpointManagerOptions | None):
    if jax.process_count() > 1:
      raise ValueError(f'{remote}: orbax checkpoints of a multi-process job need a folder every process '
                       f'writes through tensorstore ({", ".join(_ORBAX_URLS)} or a shared local path)')
    self.remote = remote
    local = epath.Path(tempfile.gettempdir()) / 'palr-orbax' / hashlib.sha256(str(remote).encode()).hexdigest()[:16]
    _mirror_steps(remote, local)
    super().__init__(local, item_names=ITEMS, options=options)

  def save(self, *args, **kwargs) -> bool:
    saved = super().save(*args, **kwargs)
    self.wait_until_finished()
    _mirror_steps(self.directory, self.remote)
    return saved

  def delete(self, step: int) -> None:
    super().delete(step)
    _mirror_steps(self.directory, self.remote)


def _mirror_steps(src: epath.Path, dst: epath.Path) -> None:
  """Makes dst's finished step folders those of src (orbax's temporary folders are not steps)."""
  def steps(folder):
    return {p.name for p in folder.iterdir() if p.name.isdigit()} if folder.exists() else set()
  have, want = steps(dst), steps(src)
  for name in have - want:
    (dst / name).rmtree()
  for name in sorted(want - have):
    files.copy_tree(src / name, dst / name)


def checkpoint_steps(workdir) -> list[int]:
  """The finalized orbax checkpoint steps of a training run (`W/checkpoints`), oldest first."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.exists():
    return []
  return sorted(orbax_manager(directory).all_steps())


def checkpoint_manager(directory: epath.PathLike, train_config, metric: str = 'valid_loss'
                       ) -> ocp.CheckpointManager:
  """Async orbax manager keeping the last `keep_latest` checkpoints and the `keep_best` by `metric`
  (valid loss, lowest best; or valid NDCG@10, highest best: `train.valid_rank`).

  Leftovers of a save that a crash interrupted are removed on start; only finalized steps count.
  """
  c = train_config
  policies = ocp.checkpoint_managers
  lower_is_better = metric == 'valid_loss'
  keep = policies.AnyPreservationPolicy([
      policies.LatestN(c.keep_latest),
      policies.BestN(get_metric_fn=lambda m: m[metric], reverse=lower_is_better, n=c.keep_best,
                     keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(preservation_policy=keep, enable_async_checkpointing=c.async_checkpoints,
                                         cleanup_tmp_directories=True, create=True)
  return orbax_manager(directory, options)


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  blob = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]


def _out_of_space(error: BaseException) -> bool:
  """Whether `error` (or one it came from) is a full disk; tensorstore says so only in its message."""
  seen = 0
  while error is not None and seen < 20:
    if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(error):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def finish_saves(manager: ocp.CheckpointManager, step: int | None = None) -> None:
  """`manager.wait_until_finished()`; a full disk (here or in `save_checkpoint`) ends in one line."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
    if not _out_of_space(e):
      raise
    raise _disk_full(manager, step, e) from None


def _disk_full(manager, step, error) -> OSError:
  py_logging.getLogger(__name__).error('checkpoint save failed: %s', error)  # the full spec, in the log
  where = f' of step {step}' if step is not None else ''
  return OSError(errno.ENOSPC, f'{manager.directory}: no space left on device while saving the checkpoint{where}; '
                 'free space and rerun the same command (it resumes from the last complete checkpoint)')


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, data_state: dict, config,
                    valid_loss: float | None, valid_metrics: dict[str, float] | None = None) -> None:
  """Starts an async save of the train state, every process's iterator state and the config;
  `valid_metrics` (e.g. valid_ndcg10) are recorded beside `valid_loss` for the best-checkpoint policy."""
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({'processes': gather_json(data_state)}),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
  recorded = None if valid_loss is None else {'valid_loss': valid_loss, **(valid_metrics or {})}
  try:
    manager.save(step, args=args, metrics=recorded, force=True)
  except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
    if not _out_of_space(e):
      raise
    raise _disk_full(manager, step, e) from None


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config saved with checkpoint `step`, as plain JSON."""
  return _restore(manager, step, ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _restore(manager: ocp.CheckpointManager, step: int, args):
  """`manager.restore`, an unreadable checkpoint (a chunk cut short, a file missing) one line."""
  try:
    return manager.restore(step, args=args)
  except Exception as e:  # noqa: BLE001 - TensorStore and orbax raise many kinds; each means the same here
    raise _damaged(_step_dir(manager, step), e) from None


def _damaged(where: str, error: Exception) -> ValueError:
  """One line for a checkpoint that cannot be read: the innermost reason of a TensorStore error (the file
  and what is wrong with it), without the spec dump that follows it."""
  text = str(error).split(' [tensorstore_spec')[0].strip()
  files_named = re.findall(r'local file "([^"]+)"', text)
  reason = text.splitlines()[-1].rsplit(': ', 1)[-1][:200] if text else type(error).__name__
  if files_named:
    reason = f'{os.path.basename(files_named[-1])}: {reason}'
  return ValueError(f'{where}: cannot read this checkpoint ({reason}); it is damaged or incomplete: delete '
                    'its step folder to resume from an earlier checkpoint, or rerun the stage from scratch '
                    '(palr_jax.main --rerun STAGE)')


def check_adapter_shapes(manager: ocp.CheckpointManager, step: int, expected: dict[str, tuple], config=None
                         ) -> None:
  """Raises one line when checkpoint `step`'s adapters ({dotted name: shape}) are not `expected`, naming
  the config keys whose value this run (`config`) changed since the checkpoint was written."""
  path = os.path.join(_step_dir(manager, step), 'state')
  absl_logger = py_logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(py_logging.ERROR)  # orbax warns that the per-step metadata file is not there
  try:
    tree = getattr(ocp.PyTreeCheckpointer().metadata(path).item_metadata, 'tree', None)
  except Exception:  # noqa: BLE001 - unreadable: the restore itself then says what is damaged
    tree = None
  finally:
    absl_logger.setLevel(level)
  if not isinstance(tree, dict):
    return
  stored = {name: tuple(meta.shape) for name, meta in (tree.get('lora') or {}).items()
            if name in expected or name not in score_head.HEAD_KEYS}  # the head's scalars: restore_head
  if stored == {name: tuple(shape) for name, shape in expected.items()}:
    return
  wrong = sorted(set(stored) ^ set(expected)) or sorted(n for n in expected if stored[n] != tuple(expected[n]))
  name = wrong[0]
  detail = f'{name}: stored {stored.get(name, "absent")}, this model {tuple(expected.get(name, ())) or "absent"}'
  changed = changed_keys(saved_config(manager, step), config) if config is not None else []
  changed = [c for c in changed if c[0].split('.')[0] in ('lora', 'model')][:3] or changed[:3]
  said = ''.join(f'; config.{k} was {old!r} when it was written, is {new!r} now' for k, old, new in changed)
  raise ValueError(f'{_step_dir(manager, step)}: its LoRA adapters do not fit this model ({detail}){said}; '
                   'a changed lora/model option needs a fresh run folder or --rerun of its stage')


def changed_keys(saved: dict, config) -> list[tuple[str, Any, Any]]:
  """(dotted key, saved value, current value) of every config value that differs, in key order."""
  return [(k, a, b) for k, a, b in _leaf_pairs(saved, fingerprint.plain(config)) if a != b]


def _leaf_pairs(a, b, prefix: str = ''):
  for key in sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else ():
    x, y = a.get(key), b.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      yield from _leaf_pairs(x, y, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', x, y


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state, config=None
                       ) -> tuple[Any, dict]:
  """(train state laid out as `abstract_state`'s shardings, this process's data-iterator state).

  The shardings are the current mesh's, whatever mesh wrote the checkpoint. Adapters of other shapes
  (`config`: the run's config, to name what changed) and an unreadable checkpoint are one-line errors.
  """
  check_adapter_shapes(manager, step, {k: v.shape for k, v in abstract_state['lora'].items()}, config)
  restored = _restore(manager, step, ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=ocp.args.JsonRestore()))
  states = restored.data['processes']
  if len(states) == jax.process_count():
    return restored.state, states[jax.process_index()]
  if all(s == states[0] for s in states):
    return restored.state, states[0]
  raise ValueError(f'checkpoint step {step}: {len(states)} processes saved different data-iterator states; '
                   f'they cannot be spread over {jax.process_count()} processes')


def adapter_dir(workdir, step: int) -> epath.Path:
  return epath.Path(workdir) / ADAPTERS / f'step_{step}'


def adapter_steps(workdir) -> list[int]:
  """Steps whose adapters were written as PEFT folders (`write_adapters`), oldest first."""
  root = epath.Path(workdir) / ADAPTERS
  if not root.exists():
    return []
  return sorted(int(p.name[5:]) for p in root.iterdir()
                if p.name.startswith('step_') and p.name[5:].isdigit() and (p / peft.CONFIG_FILE).exists())


def restore_adapters(model: nnx.Module, directory: epath.Path, step: int) -> None:
  """Sets the model's adapters (in place, keeping their shardings) from orbax checkpoint `step`."""
  manager = orbax_manager(directory)
  if step not in manager.all_steps():
    raise FileNotFoundError(f'{directory}: no checkpoint for step {step}; have {sorted(manager.all_steps())}')
  flat = nnx.to_flat_state(lora.lora_state(model))  # the trainer's keys: dotted module paths
  key = lambda path: '.'.join(map(str, path))  # noqa: E731
  target = {key(path): jax.ShapeDtypeStruct(var.value.shape, var.value.dtype, sharding=var.value.sharding)
            for path, var in flat}
  check_adapter_shapes(manager, step, {k: v.shape for k, v in target.items()})
  restored = _restore(manager, step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={'lora': target}, restore_args=ocp.checkpoint_utils.construct_restore_args({'lora': target}),
      partial_restore=True)))['state']['lora']
  nnx.update(model, nnx.from_flat_state([(path, var.replace(restored[key(path)])) for path, var in flat]))


def restore_head(directory: epath.Path, step: int) -> tuple[float, float] | None:
  """(gate, scale) of the residual score head trained beside the adapters in orbax checkpoint `step`, or
  None when that run had no head."""
  manager = orbax_manager(directory)
  path = os.path.join(_step_dir(manager, step), 'state')
  try:
    tree = getattr(ocp.PyTreeCheckpointer().metadata(path).item_metadata, 'tree', None)
  except Exception:  # noqa: BLE001 - unreadable: restore_adapters says what is damaged
    tree = None
  if not isinstance(tree, dict) or score_head.GATE not in (tree.get('lora') or {}):
    return None
  target = {k: jax.ShapeDtypeStruct((), np.float32) for k in score_head.HEAD_KEYS}
  restored = _restore(manager, step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={'lora': target}, restore_args=ocp.checkpoint_utils.construct_restore_args({'lora': target}),
      partial_restore=True)))['state']['lora']
  return tuple(float(np.asarray(jax.device_get(restored[k]))) for k in score_head.HEAD_KEYS)


def _host(x) -> np.ndarray:
  return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def write_adapters(workdir, model: nnx.Module, lora_config, base_name: str,
                   placeholder_id: int | None = None) -> list[int]:
  """After training, on every process (a collective): each kept checkpoint's adapters, gathered to the
  host, as the PEFT folder `W/adapters/step_<N>`, written by process 0. Inference stages, export and the
  tools read these, never orbax, so they need neither the global mesh nor the other processes.
  A model with collaborative item tokens gets `item_projector.safetensors` beside each adapter (its
  loader note names `placeholder_id`). Returns the steps."""
  workdir = epath.Path(workdir)
  steps = checkpoint_steps(workdir)
  for step in steps:
    restore_adapters(model, workdir / 'checkpoints', step)
    values = {'.'.join(map(str, path)): _host(var.value) for path, var in nnx.to_flat_state(lora.lora_state(model))}
    head = restore_head(workdir / 'checkpoints', step)
    if jax.process_index() == 0:
      peft.save_adapter(adapter_dir(workdir, step), model, lora_config, base_name, values, placeholder_id)
      if head is not None:  # beside the adapter: the rank stage's residual mode reads it there
        score_head.save(adapter_dir(workdir, step), *head)
  if jax.process_index() == 0:
    for old in set(adapter_steps(workdir)) - set(steps):
      adapter_dir(workdir, old).rmtree()
  return steps
