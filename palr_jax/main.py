"""PALR end to end: the ordered list of stages and the command that runs them.

  python -m palr_jax.main --config configs/ml100k.py:quick --workdir runs/ml100k-quick
  python -m palr_jax.main --config configs/ml100k.py --workdir runs/ml100k --stages retriever

  retriever       MF retriever -> candidates/{train,valid,test}.jsonl        (stages/retriever.py)
  profiles        an LLM-written (or stats) profile per user -> profiles.jsonl (stages/profiles.py)
  finetune_<v>    instruction examples + LoRA fine-tuning of each trained variant (stages/finetune.py)
  rank            each LLM method reranks the candidates -> rankings.json    (stages/rank.py)
  report          HR@K / NDCG@K with bootstrap intervals -> results.json/md    (stages/report.py)
  export          the chosen variant as merged HF folder and PEFT adapter     (stages/export.py)

The runner (palr_jax/runner.py) skips every stage whose outputs are current: the same command again does
nothing, a killed job resumes at the stage it was in (training from its last checkpoint, ranking from
its last finished part), and changing an option reruns exactly the stages that read it. `--stages`
runs the named stages (and any upstream stage that is not current); `--rerun` forces stages to run again
from scratch (their outputs and resumable work are deleted first; the stages that read them then rerun
when the new outputs differ). With `--shared_dir` (sweeps), finished stage outputs are kept there by
fingerprint and shared.

Before anything is computed, `plan` checks the config and what it points at (palr_jax/validate.py).
Exit codes: 0 done; 1 failed (on a multi-process job: in any process, and every process exits); 2 a bad
config or flag, or a multi-process job whose workdir is not shared between its hosts (one line on stderr;
nothing was computed); distributed.PREEMPTED_EXIT_CODE (75): stopped by SIGTERM in any stage (training
saves a checkpoint first; the other stages resume from their part files), rerun to resume. docs/pods.md
says what each process of a pod does and what the launchers do on each exit code.
"""
from __future__ import annotations

import gc
import hashlib
import os
import sys

if '--verbose' not in sys.argv and __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TensorFlow's C++ INFO lines, printed at its import

import tempfile
import time

from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from palr_jax import cli
from palr_jax import distributed
from palr_jax import files
from palr_jax import lock
from palr_jax import precision
from palr_jax import runner
from palr_jax import validate
from palr_jax.stages import base
from palr_jax.stages import context
from palr_jax.stages import export
from palr_jax.stages import finetune
from palr_jax.stages import profiles
from palr_jax.stages import rank
from palr_jax.stages import report
from palr_jax.stages import retriever

# The pipeline, in order. Each module's `declare(config)` returns its stage(s); adding a stage is one entry.
STAGES = (retriever.declare, profiles.declare, finetune.declare, rank.declare, report.declare, export.declare)


def stages(config) -> list[base.Stage]:
  out = []
  for declare in STAGES:
    declared = declare(config)
    out.extend(declared if isinstance(declared, list) else [declared])
  return out


def plan(config, workdir, *, only=(), rerun=()) -> list[base.Stage]:
  """The stages a run goes through (`only` those and their upstream), after checking the config and, for
  those stages, the files, model, mesh and workdir it names: a `validate.ConfigError` here means nothing
  was computed."""
  validate.check_config(config)
  config = precision.resolve(config)  # 'auto' dtypes: the stages are declared with what they will run
  try:
    todo = stages(config)
    if only:
      todo = runner.with_upstream(todo, only)
  except (ValueError, FileNotFoundError) as e:  # a stage name, or a model the declarations cannot find
    raise validate.ConfigError(str(e).splitlines()[0]) from None
  unknown = sorted(set(rerun) - {s.name for s in todo})
  if unknown:
    raise validate.ConfigError(f'--rerun: unknown stage(s) {unknown}; stages: {[s.name for s in todo]}')
  validate.check_environment(config, [s.name for s in todo], workdir)
  return todo


def run(config, workdir, shared_dir=None, *, only=(), rerun=(), say=None) -> dict | None:
  """Runs every stage that is not current (or `only` those and their upstream); returns results.json's
  content when the report is among those stages (run now or current), else None."""
  workdir = epath.Path(workdir)
  validate.check_config(config)
  config = precision.resolve(config)  # once: every stage, fingerprint and config.json see the concrete dtypes
  todo = plan(config, workdir, only=only, rerun=rerun)
  ctx = context.Context(config, workdir)
  job = runner.Runner(workdir, shared_dir, say=say)
  if any('model.dtype' in s.hashes for s in todo):  # a stage that runs the LLM: say in what precision
    job.say(f'precision: {precision.note(config)}')
  if distributed.is_leader():
    files.atomic_write_text(workdir / 'config.json', config.to_json_best_effort(indent=2) + '\n')
  for stage in todo:
    if stage.name in rerun:
      job.forget(stage)
  distributed.barrier('main-start')
  for stage in todo:
    job.run(stage, ctx)
  results = workdir / 'results.json'
  if not any(s.name == 'report' for s in todo):  # W's results.json, if any, is from an earlier run
    return None
  return files.read_json(results) if results.exists() else None


def results_heading(workdir) -> str:
  """The line printed above results.md: the run that wrote it (this one, or an earlier one)."""
  record = runner.read_record(workdir, 'report') or {}
  return f'results.md: report of run {record.get("run", "unrecorded")}, fingerprint {record.get("fingerprint")}'


# ------------------------------------------------------------------------------------------- CLI

def _define_flags() -> None:
  """Only when run as a program (tests import this module beside others that define --config)."""
  config_flags.DEFINE_config_file('config', None, 'Config file path.py[:arg].', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where every stage writes its outputs (local or gs://).')
  flags.DEFINE_string('shared_dir', None, 'Stage outputs shared by fingerprint (sweeps).')
  flags.DEFINE_list('stages', [], 'Run only these stages (and their upstream when not current).')
  flags.DEFINE_list('rerun', [], 'Run these stages again from scratch, even if current.')
  cli.define_compilation_cache_flag()
  flags.DEFINE_bool('force_unlock', False, 'Take the workdir lock (W/palr.lock) even when another job, '
                    'maybe on another host, holds it: only when that job is known to be gone.')
  flags.DEFINE_bool('verbose', False, 'Library INFO logs (absl, orbax, jax) on the terminal too; without it '
                    'they go to W/logs/ and the terminal shows stage lines, progress bars, warnings and '
                    'the results.')
  flags.mark_flags_as_required(['config', 'workdir'])


def log_process_guess(env=None) -> int:
  """This process's index before jax.distributed starts, for its log folder: --process_id, $JAX_PROCESS_ID,
  SLURM's task id, else 0 (`main` moves the log once jax says otherwise, as on TPU VMs)."""
  env = os.environ if env is None else env
  for value in (flags.FLAGS['process_id'].value if 'process_id' in flags.FLAGS else None, env.get('JAX_PROCESS_ID'),
                env.get('SLURM_PROCID')):
    try:
      if value is not None:
        return int(value)
    except ValueError:
      pass  # distributed.initialize names a malformed variable
  return 0


def log_to_files(workdir: epath.Path, process: int = 0) -> str:
  """Sends absl/Python logging (INFO and up) to a file under W/logs/<process>/ and keeps only palr_jax's
  warnings and errors on stderr (libraries' warnings stay in the file); returns the folder written to. A
  workdir not on local disk (gs://) gets the files of a local folder copied there by `upload_logs` (at exit,
  and on SIGTERM or a failure too), so a slice's logs outlive it."""
  fallback = os.path.join(tempfile.gettempdir(), 'palr_jax-logs',
                          hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:12], str(process))
  folder = os.path.join(os.fspath(workdir), 'logs', str(process)) if files.is_local(workdir) else fallback
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:  # an unusable workdir: validate's checks say so in one line
    folder = fallback
    os.makedirs(folder, exist_ok=True)
  logging.get_absl_handler().use_absl_log_file('palr_jax.main', folder)
  flags.FLAGS.stderrthreshold = 'warning'
  cli.library_logs_to_file()  # libraries' warnings (transformers, jax, orbax) only in the file
  return folder


def upload_logs(folder: str, workdir: epath.Path, process: int) -> None:
  """Copies the log files of `folder` to W/logs/<process>/ when W is not on local disk (else they are
  there already)."""
  if files.is_local(workdir):
    return
  logging.flush()
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if os.path.isfile(path) and not os.path.islink(path):
      files.copy_file(path, epath.Path(workdir) / 'logs' / str(process) / name)


def main(argv):
  del argv
  f = flags.FLAGS
  workdir = epath.Path(f.workdir)
  process = log_process_guess()
  logs = None if f.verbose else log_to_files(workdir, process)  # before anything logs (jax, distributed)
  cli.use_compilation_cache(f.compilation_cache)
  distributed.initialize_from_flags()
  distributed.install_signal_handlers()
  if logs and jax.process_index() != process:  # found out only now (a TPU VM's worker id)
    process = jax.process_index()
    logs = log_to_files(workdir, process)
  if logs and not files.is_local(workdir):
    distributed.at_exit(lambda: upload_logs(logs, workdir, process))
  problem = distributed.check_shared_workdir(f.workdir)  # a node-local workdir: exit 2 at once, every process
  if problem:
    raise validate.ConfigError(problem)
  plan(f.config, f.workdir, only=f.stages, rerun=f.rerun)  # bad config: exit 2 on every process, at once
  # One job per workdir: process 0 takes the lock, every process learns whether it did.
  held = distributed.from_leader('lock', lock.acquire(f.workdir, force=f.force_unlock)
                                 if distributed.is_leader() else None)
  if held:
    raise validate.ConfigError(held)
  try:
    _run_and_print(f, logs)
  finally:
    if distributed.is_leader():
      lock.release(f.workdir)


def _run_and_print(f, logs) -> None:
  if logs and distributed.is_leader():
    print(f'logs: {logs} (--verbose shows them here)')
  # The ~440k objects of the imports (jax, TensorFlow, transformers) live as long as the process: frozen, the
  # gc.collect() between stages no longer walks them (a visible cost per stage on a small CPU:
  # bench/RESULTS.md, ":quick end to end").
  gc.freeze()
  start = time.perf_counter()
  say = print if distributed.is_leader() else (lambda line: None)
  results = distributed.fail_fast(lambda: run(f.config, f.workdir, f.shared_dir, only=f.stages, rerun=f.rerun,
                                              say=say))
  workdir = epath.Path(f.workdir)
  if distributed.is_leader() and results is not None:
    print(results_heading(workdir))
    print((workdir / 'results.md').read_text())
  elif distributed.is_leader() and (workdir / 'results.md').exists():
    print(f'{workdir / "results.md"} is not printed: the report is not among --stages ({results_heading(workdir)}, '
          'earlier)')
  logging.info('done in %.0f s: %s', time.perf_counter() - start, workdir)


if __name__ == '__main__':
  cli.run(main, _define_flags)
