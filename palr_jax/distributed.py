"""The job: `jax.distributed` start-up, host barriers, preemption, and failing fast on every process.

`initialize` must run before anything touches a device. One process per host (TPU VM worker, SLURM task,
GPU node); afterwards `jax.devices()` lists every device of the job and the global mesh spans them all.

What a multi-process job needs beyond that, and how it is done here:
- Barriers (`barrier`) are host-level, through the coordination service's `wait_at_barrier`: they need no
  device and no mesh, so processes that each work on a host-local mesh can meet.
- Failing fast (`fail_fast`): an exception in any process is published under a key of the coordination
  service, and every process runs a watchdog thread that ends its process with exit code 1 when the key
  appears. The failing process itself leaves with `os._exit`, skipping jax's atexit shutdown, whose barrier
  would wait for peers that are blocked in a collective (process 0, which hosts the service, first waits a
  few polls so that the others read the key). A process killed outright stops heartbeating; the service
  then fails the others after `HEARTBEAT_SECONDS`; a lost process 0 takes the service with it, and the
  others' coordination clients abort.
- Preemption: every stage resumes (training from its last checkpoint, profiles and ranking from their
  part files, the others by running again), so any SIGTERM ends the job with `PREEMPTED_EXIT_CODE` (75),
  which the launchers resubmit. In training the first SIGTERM only sets a flag (`preemption_requested`);
  the process that got it publishes a step to stop at under a key of the coordination service, which
  every process looks up at each step (`training_window.stop_here`: a host RPC, no device collective, so
  the steps stay pipelined), so all stop at the same step, save, and exit 75. Outside training, or on a
  second SIGTERM, the process exits 75 at once, whatever its
  main thread is blocked in (a thread acts on the signal, `install_signal_handlers`), and on a
  multi-process job the others' watchdogs follow with 75 too.
- A shared workdir (`check_shared_workdir`): every process must see the files process 0 writes there; a
  folder on each host's own disk is refused at start, not found out stages later.
"""
from __future__ import annotations

import atexit
from collections.abc import Mapping, Sequence
import importlib.util
import itertools
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any
import uuid

from absl import flags
from absl import logging
from etils import epath
import jax

from palr_jax import files

COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0; default $JAX_COORDINATOR_ADDRESS, or '
    'auto-detected on TPU VMs and under SLURM.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the job; default $JAX_NUM_PROCESSES.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process, 0-based; default $JAX_PROCESS_ID.')

# Exit code of a job that saved a checkpoint on SIGTERM and should be resubmitted (EX_TEMPFAIL).
PREEMPTED_EXIT_CODE = 75
HEARTBEAT_SECONDS = 30
_FAILED_KEY = 'palr_jax/failed'
_BARRIER_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # a host-only stage can keep the others waiting for hours
_barriers = itertools.count()


_PREEMPTED_PREFIX = 'preempted: '  # a _FAILED_KEY value that makes the other processes exit 75, not 1


class Preempted(Exception):
  """Training stopped early on SIGTERM after saving; the job should exit with PREEMPTED_EXIT_CODE."""


def cluster_kind(env: Mapping[str, str]) -> str | None:
  """'slurm' or 'tpu' where jax's own cluster detection applies; None for a single process."""
  if int(env.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_STEP_NODELIST' in env:
    return 'slurm'
  tpu_devices = os.path.exists('/dev/accel0') or os.path.isdir('/dev/vfio')
  if tpu_devices and importlib.util.find_spec('libtpu') is not None:
    return 'tpu'
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] | None = None) -> None:
  """Joins the job: explicit arguments, else JAX_* variables, else TPU / SLURM auto-detection.

  With none of these it does nothing: a single process needs no coordinator. Idempotent.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ if env is None else env
  coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
  if coordinator_address:
    num_processes = num_processes if num_processes is not None else _env_int(env, 'JAX_NUM_PROCESSES')
    process_id = process_id if process_id is not None else _env_int(env, 'JAX_PROCESS_ID')
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
  elif num_processes is not None or process_id is not None:
    raise ValueError('distributed: --num_processes/--process_id need --coordinator_address '
                     '(or $JAX_COORDINATOR_ADDRESS)')
  elif (kind := cluster_kind(env)) is not None:
    logging.info('distributed: auto-detecting the %s cluster', kind)
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_SECONDS)
  else:
    return
  install_signal_handlers()  # after jax's own, which it replaces
  logging.info('distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def initialize_from_flags() -> None:
  initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  """None when unset: jax then detects it on a known cluster or says that it is missing."""
  if name not in env:
    return None
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f'distributed: ${name} must be an integer, got {env[name]!r}') from None


# ------------------------------------------------------------------------------------------- the job


def _client():
  from jax._src import distributed as jax_distributed  # the coordination service's client
  return jax_distributed.global_state.client


def is_leader() -> bool:
  """Process 0: the one that writes shared files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process of the job waits here until all have arrived (a no-op on one process)."""
  if jax.process_count() == 1:
    return
  _client().wait_at_barrier(f'palr_jax/{next(_barriers)}/{name}', _BARRIER_TIMEOUT_MS)


def from_leader(name: str, value: Any) -> Any:
  """Process 0's JSON-able `value` on every process, through the coordination service (no device): decisions that
  must agree, such as a stage's fingerprint, which hashes files each host may hold its own copy of.
  Every process calls it, in the same order; the others' `value` is ignored."""
  if jax.process_count() == 1:
    return value
  key = f'palr_jax/{next(_barriers)}/{name}'
  if is_leader():
    _client().key_value_set(key, json.dumps(value))
  return json.loads(_client().blocking_key_value_get(key, _BARRIER_TIMEOUT_MS))


def all_processes(name: str, value: Any) -> list:
  """Every process's JSON-able `value`, in process order, on every process (coordination service, no
  device). Every process calls it, in the same order."""
  if jax.process_count() == 1:
    return [value]
  key = f'palr_jax/{next(_barriers)}/{name}'
  _client().key_value_set(f'{key}/{jax.process_index()}', json.dumps(value))
  return [json.loads(_client().blocking_key_value_get(f'{key}/{i}', _BARRIER_TIMEOUT_MS))
          for i in range(jax.process_count())]


def check_shared_workdir(workdir) -> str | None:
  """On a multi-process job, None when every process reads the file process 0 writes under `workdir`;
  else one line naming the processes that do not (a workdir on each host's own disk, which would fail
  stages later, when one host looks for another's outputs). Every process calls it, at start."""
  if jax.process_count() == 1:
    return None
  workdir = epath.Path(workdir)
  token = uuid.uuid4().hex
  probe = workdir / f'.palr-shared-probe-{token}'
  if is_leader():
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      files.atomic_write_text(probe, token)
    except OSError:
      token = None  # an unusable workdir: validate.check_workdir says why, in every process
  token = from_leader('shared-workdir', token)
  if token is None:
    return None
  probe = workdir / f'.palr-shared-probe-{token}'
  try:
    seen = probe.read_text() == token
  except Exception:  # noqa: BLE001 - missing (FileNotFoundError, tf's NotFoundError) or unreadable
    seen = False
  blind = [i for i, ok in enumerate(all_processes('shared-workdir-read', seen)) if not ok]
  if is_leader():
    try:
      probe.unlink()
    except Exception:  # noqa: BLE001 - a leftover probe file is harmless
      pass
  if not blind:
    return None
  return (f'--workdir {workdir}: process(es) {blind} of {jax.process_count()} do not see the file process 0 '
          'wrote there: each host has its own folder; a multi-process job needs a workdir every host shares '
          '(gs://BUCKET/..., or a shared filesystem)')


def share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
  """This process's share of `items` (every count-th item from its index: similar shares of a sorted list)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return list(items[index::count])


_state = {'requested': False, 'training': False, 'failing': False}  # this process's state


def preemption_requested() -> bool:
  return _state['requested']


_windows = itertools.count()


class training_window:
  """While inside, a first SIGTERM only asks the trainer to save and stop; outside (and on a second one)
  SIGTERM ends the process with PREEMPTED_EXIT_CODE (`install_signal_handlers`).

  `stop_here(step)` says, on every process alike, whether training stops after `step`. The trainer calls
  it once per step, after the step's host sync where it has one: `sync_every` is how often the loop
  waits for a step's results (its log steps; `last_step`, the final step, too). Why every process picks
  the same step without a device collective: the first process that finds the SIGTERM flag set at step
  s proposes the first sync step after s, under a key of the coordination service that only the first
  proposal sets; the others look the key up (a non-blocking host RPC) at every step. No process can have
  passed that step yet: to pass a sync step a process waits for the step's results, which need every
  process to have started the step, and the proposer has not gone beyond s. So a stop comes at most
  `sync_every` steps after the signal.
  """

  def __init__(self, sync_every: int = 1, last_step: int | None = None):
    self.sync_every, self.last_step = max(1, int(sync_every)), last_step
    self.key, self.stop = None, None

  def __enter__(self):
    _state['training'] = True
    self.key, self.stop = f'palr_jax/stop/{next(_windows)}', None  # every process enters in the same order
    return self

  def __exit__(self, *exc):
    _state['training'] = False

  def stop_here(self, step: int) -> bool:
    if jax.process_count() == 1:
      return _state['requested']
    if self.stop is None and _state['requested']:
      proposal = (step // self.sync_every + 1) * self.sync_every
      if self.last_step is not None:
        proposal = min(proposal, max(int(self.last_step), step))
      try:
        _client().key_value_set(self.key, str(proposal))
      except Exception:  # noqa: BLE001 - another process proposed first: its step holds
        pass
      self.stop = int(_client().blocking_key_value_get(self.key, _BARRIER_TIMEOUT_MS))
      logging.warning('SIGTERM: every process stops at step %d (this one is at %d)', self.stop, step)
    elif self.stop is None:
      try:
        value = _client().key_value_try_get(self.key)
      except Exception:  # noqa: BLE001 - not set (NotFound)
        value = None
      if value:
        self.stop = int(value)
        logging.warning('another process got SIGTERM: every process stops at step %d (this one is at %d)',
                        self.stop, step)
    if self.stop is None:
      return False
    if step > self.stop:  # the guarantee above broken: the processes would save different steps
      raise RuntimeError(f'preemption: asked to stop at step {self.stop}, already at step {step} '
                         f'(the trainer must wait for its results every sync_every={self.sync_every} steps)')
    return step == self.stop


_signals = {'read': None, 'write': None}


def install_signal_handlers() -> None:
  """SIGTERM: in training the first one asks the trainer to save and stop; any other ends the process with
  PREEMPTED_EXIT_CODE. Replaces the handler jax.distributed installs, which never ends the process.

  A Python handler alone would not do: Python runs it only when the main thread next runs Python code,
  and a process blocked at a barrier or in a collective may not for hours. Python's C-level handler also
  writes the signal's number to the wakeup fd, from whichever thread the kernel picked; a daemon thread
  reads it there and acts. Call it from the main thread (elsewhere it does nothing).
  """
  if threading.current_thread() is not threading.main_thread():
    return
  if _signals['read'] is None:
    _signals['read'], _signals['write'] = os.pipe()
    os.set_blocking(_signals['write'], False)
    threading.Thread(target=_read_signals, args=(_signals['read'],), daemon=True, name='palr-signals').start()
  signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the thread acts (the C handler wakes it)
  signal.set_wakeup_fd(_signals['write'], warn_on_full_buffer=False)


def _read_signals(fd: int) -> None:
  while True:
    for signum in os.read(fd, 64):
      if signum == signal.SIGTERM:
        _on_sigterm()


def _on_sigterm() -> None:
  if _state['training'] and not _state['requested']:
    _state['requested'] = True
    logging.warning('SIGTERM: saving a checkpoint at the next step, then exiting with code %d', PREEMPTED_EXIT_CODE)
    return
  where = 'in training, a second time' if _state['training'] else 'outside training'
  logging.warning('SIGTERM %s: exiting with code %d (the stage resumes from its files)', where,
                  PREEMPTED_EXIT_CODE)
  print(f'palr_jax: SIGTERM {where}; exiting with code {PREEMPTED_EXIT_CODE}: rerun the same command to resume',
        file=sys.stderr)
  if jax.process_count() > 1 and not _state['failing']:
    _state['failing'] = True  # its own watchdog leaves the exit to this thread
    try:  # the others' watchdogs (fail_fast) exit 75 too, rather than 1 or a heartbeat timeout
      _client().key_value_set(_FAILED_KEY, f'{_PREEMPTED_PREFIX}process {jax.process_index()} got SIGTERM')
    except Exception:  # noqa: BLE001 - another process set it first, or the service is gone
      pass
    if is_leader():  # the coordination service lives here: let the others' watchdogs read the key
      time.sleep(3)
  _exit(PREEMPTED_EXIT_CODE)


_at_exit: list = []


def at_exit(callback) -> None:
  """Runs `callback()` when the process ends: normally (atexit), and on the early exits here (SIGTERM, a
  failure in any process), which leave with os._exit and skip atexit. The main job uploads its logs so."""
  _at_exit.append(callback)
  atexit.register(_run_at_exit, callback)


def _run_at_exit(callback) -> None:
  try:
    callback()
  except Exception as e:  # noqa: BLE001 - leaving anyway; say why
    print(f'palr_jax: at exit: {type(e).__name__}: {e}', file=sys.stderr)


def _exit(code: int) -> None:
  for callback in _at_exit:
    _run_at_exit(callback)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 - leaving anyway
      pass
  logging.flush()
  os._exit(code)


def _watch(poll_seconds: float) -> None:
  while True:
    time.sleep(poll_seconds)
    try:
      failed = _client().key_value_try_get(_FAILED_KEY)
    except Exception:  # noqa: BLE001 - not set (NotFound), or the service is gone
      failed = None
      if not jax.distributed.is_initialized():
        return
    if failed and not _state['failing']:
      if failed.startswith(_PREEMPTED_PREFIX):
        logging.warning('%s; ending this one with code %d', failed, PREEMPTED_EXIT_CODE)
        print(f'palr_jax: {failed}; exiting with code {PREEMPTED_EXIT_CODE}', file=sys.stderr)
        if is_leader():  # the service lives here: let the other processes' watchdogs read the key too
          _state['failing'] = True
          time.sleep(3 * poll_seconds)
        _exit(PREEMPTED_EXIT_CODE)
      logging.error('another process failed (%s); ending this one', failed)
      print(f'palr_jax: another process failed ({failed}); exiting', file=sys.stderr)
      _exit(1)


def fail_fast(main, *args, poll_seconds: float = 1.0):
  """Runs `main(*args)`; on a multi-process job an exception in any process ends them all, non-zero.

  Returns main's result (one process, or all succeeded); `Preempted` exits with PREEMPTED_EXIT_CODE.
  """
  multi = jax.process_count() > 1
  if multi:
    threading.Thread(target=_watch, args=(poll_seconds,), daemon=True, name='palr-watchdog').start()
  try:
    return main(*args)
  except Preempted as e:
    logging.warning('%s', e)
    print(f'palr_jax: {e}; rerun the same command to resume (exit code {PREEMPTED_EXIT_CODE})',
          file=sys.stderr)
    if multi:  # every process stopped at the same step: leave the job together, not as a failure
      jax.distributed.shutdown()
    _exit(PREEMPTED_EXIT_CODE)
  except BaseException as e:  # noqa: BLE001 - every failure must reach the other processes
    if not multi or isinstance(e, SystemExit) and not e.code:
      raise
    where = f'process {jax.process_index()}: {type(e).__name__}: {e}'[:2000]
    traceback.print_exc()
    _state['failing'] = True  # its own watchdog leaves the exit to this thread
    try:
      _client().key_value_set(_FAILED_KEY, where)
    except Exception:  # noqa: BLE001 - another process set it first
      pass
    if is_leader():  # the coordination service lives here: let the others' watchdogs read the failure
      time.sleep(3 * poll_seconds)
    _exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
