"""Multi-process start-up: `jax.distributed.initialize` from flags, the environment or the cluster.

Must run before anything touches a device. One process per host (TPU VM worker, SLURM task, GPU node);
afterwards `jax.devices()` lists every device of the job and the mesh spans them all.
"""
from __future__ import annotations

from collections.abc import Mapping
import importlib.util
import os

from absl import flags
from absl import logging
import jax

COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0; default $JAX_COORDINATOR_ADDRESS, or '
    'auto-detected on TPU VMs and under SLURM.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the job; default $JAX_NUM_PROCESSES.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'this process, 0-based; default $JAX_PROCESS_ID.')


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
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif num_processes is not None or process_id is not None:
    raise ValueError('distributed: --num_processes/--process_id need --coordinator_address '
                     '(or $JAX_COORDINATOR_ADDRESS)')
  elif (kind := cluster_kind(env)) is not None:
    logging.info('distributed: auto-detecting the %s cluster', kind)
    jax.distributed.initialize()
  else:
    return
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
