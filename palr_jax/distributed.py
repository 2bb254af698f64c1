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
- Preemption: in training, SIGTERM sets a flag (`preemption_requested`); the trainer asks `any_process` at
  every step whether any process got one, so all stop at the same step, save, and the job exits with
  `PREEMPTED_EXIT_CODE`. A SIGTERM outside training, or a second one, ends the process at once (the
  default action: whatever the main thread is blocked in).
"""
from __future__ import annotations

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

from absl import flags
from absl import logging
import jax
import numpy as np

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


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any; a collective: every process must call it."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.array([int(flag)], np.int32))).any())


def share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
  """This process's share of `items` (every count-th item from its index: similar shares of a sorted list)."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  return list(items[index::count])


_state = {'requested': False, 'training': False, 'failing': False}  # this process's state


def preemption_requested() -> bool:
  return _state['requested']


class training_window:
  """While inside, a first SIGTERM only asks the trainer to save and stop (our handler is installed on
  entry, from the main thread); on exit SIGTERM ends the process again (`install_signal_handlers`)."""

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, _on_sigterm)
    _state['training'] = True
    return self

  def __exit__(self, *exc):
    _state['training'] = False
    if threading.current_thread() is threading.main_thread():
      install_signal_handlers()


def _on_sigterm(signum, frame):
  """The first SIGTERM in training: a flag the trainer reads at the end of its step. A second one gets
  the default action (the process ends at once)."""
  del frame
  install_signal_handlers()
  if not _state['training']:
    _exit(128 + signum)
  _state['requested'] = True
  logging.warning('SIGTERM: saving a checkpoint at the next step, then exiting with code %d', PREEMPTED_EXIT_CODE)


def install_signal_handlers() -> None:
  """SIGTERM ends the process: the kernel's default action, replacing the handler jax.distributed
  installs, which never ends it. A Python handler would not do: Python runs it only when the main thread
  next runs Python code, and a process blocked at a barrier or in a collective may not for hours."""
  signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit(code: int) -> None:
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
