"""Launchers: the exact commands of --dry-run (TPU VM pod, SLURM, local), option errors, and a real
2-process local run joined by jax.distributed."""
import os
import pathlib
import shlex
import socket
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
TRAIN = ['python', '-m', 'palr_jax.main', '--config', 'configs/ml1m_llama2_7b.py:v4-32', '--workdir',
         'gs://bucket/palr run']


def launch(script, *args, env=None):
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=120)


def test_tpu_vm_dry_run_two_hosts(tmp_path):
  out = launch('tpu_vm.sh', '--name', 'palr-v4', '--zone', 'us-central2-b', '--type', 'v4-16',
               '--project', 'proj', '--log', str(tmp_path / 'run.log'), '--delete', '--dry-run', '--',
               *TRAIN, env={'TMPDIR': str(tmp_path)})
  assert out.returncode == 0, out.stderr
  tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  where = ['--zone=us-central2-b', '--project=proj']
  install = ('set -e; command -v python3.11 >/dev/null || { sudo apt-get update -q && sudo apt-get '
             'install -y -q python3.11 python3.11-venv; }; mkdir -p palr-jax && tar -xzf palr-jax.tar.gz '
             '-C palr-jax && cd palr-jax && { [ -x .venv/bin/python ] || python3.11 -m venv .venv; } && '
             '.venv/bin/pip install -q -r launch/requirements-tpu.txt && .venv/bin/pip install -q '
             '--no-deps -r requirements-assets.txt && .venv/bin/pip install -q --no-deps -e .')
  run = (f'set -o pipefail; cd palr-jax && . .venv/bin/activate && {shlex.join(TRAIN)} 2>&1 | '
         'sed -u "s/^/[$(hostname)] /"')
  archive = str(tmp_path / 'palr-jax-palr-v4.tar.gz')
  assert out.stdout.splitlines() == [
      shlex.join([*tpu, 'describe', 'palr-v4', *where]) + ' >/dev/null 2>&1 || ' + shlex.join(
          [*tpu, 'create', 'palr-v4', *where, '--accelerator-type=v4-16', '--version=tpu-ubuntu2204-base']),
      shlex.join(['tar', '-czf', archive, '-C', str(ROOT), '--exclude=.git', '--exclude=.venv',
                  '--exclude=runs', '--exclude=cache', '--exclude=__pycache__', '--exclude=*.egg-info',
                  '--exclude=.pytest_cache', '.']),
      shlex.join([*tpu, 'scp', archive, 'palr-v4:palr-jax.tar.gz', *where, '--worker=all']),
      shlex.join([*tpu, 'ssh', 'palr-v4', *where, '--worker=all', '--command', install]),
      shlex.join([*tpu, 'ssh', 'palr-v4', *where, '--worker=all', '--command', run])
      + f' 2>&1 | tee -a {tmp_path}/run.log',
      shlex.join([*tpu, 'delete', 'palr-v4', *where, '--quiet']),
  ]
  # The printed lines are valid shell: the remote command survives the round trip unchanged.
  words = shlex.split(out.stdout.splitlines()[4])
  assert words[words.index('--command') + 1] == run


def test_tpu_vm_reuse_and_delete_only():
  out = launch('tpu_vm.sh', '--name', 'p', '--zone', 'z', '--no-setup', '--dry-run', '--', 'hostname')
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      'gcloud compute tpus tpu-vm describe p --zone=z >/dev/null',
      "gcloud compute tpus tpu-vm ssh p --zone=z --worker=all --command 'set -o pipefail; cd palr-jax "
      "&& . .venv/bin/activate && hostname 2>&1 | sed -u \"s/^/[$(hostname)] /\"'"]
  out = launch('tpu_vm.sh', '--name', 'p', '--zone', 'z', '--delete', '--dry-run')
  assert out.stdout.splitlines() == ['gcloud compute tpus tpu-vm delete p --zone=z --quiet']
  out = launch('tpu_vm.sh', '--name', 'p', '--zone', 'z', '--type', 'v5litepod-16', '--spot',
               '--no-setup', '--dry-run')
  assert out.stdout.splitlines() == [
      'gcloud compute tpus tpu-vm describe p --zone=z >/dev/null 2>&1 || gcloud compute tpus tpu-vm '
      'create p --zone=z --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot']


@pytest.fixture
def slurm_env(tmp_path):
  """Two nodes of a SLURM allocation, with a stand-in for `scontrol show hostnames`."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'scontrol').write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                                    'printf "gpu-a17\\ngpu-a18\\n"\n')
  (bin_dir / 'scontrol').chmod(0o755)
  return {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '4242',
          'SLURM_JOB_NODELIST': 'gpu-a[17-18]', 'SLURM_NNODES': '2', 'SLURM_GPUS_ON_NODE': '8'}


@pytest.mark.parametrize('tasks,devices', [(2, '0,1,2,3,4,5,6,7'), (16, '$SLURM_LOCALID')])
def test_slurm_dry_run_two_nodes(slurm_env, tasks, devices):
  out = launch('slurm_gpu.sbatch', '--dry-run', '--', *TRAIN,
               env={**slurm_env, 'SLURM_NTASKS': str(tasks)})
  assert out.returncode == 0, out.stderr
  port = 61440 + 4242 % 4096
  task = (f'export JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS={devices} && . .venv/bin/activate '
          '&& exec "$@"')
  assert out.stdout.splitlines() == [shlex.join([
      'env', f'JAX_COORDINATOR_ADDRESS=gpu-a17:{port}', f'JAX_NUM_PROCESSES={tasks}',
      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9', 'srun', '--kill-on-bad-exit=1', '--label', 'bash', '-c', task,
      'bash', *TRAIN])]


def test_slurm_refuses_bad_layouts(slurm_env):
  out = launch('slurm_gpu.sbatch', '--dry-run', '--', 'x', env={**slurm_env, 'SLURM_NTASKS': '6'})
  assert out.returncode == 2 and '3 tasks per node with 8 GPUs' in out.stderr
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  out = subprocess.run(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), '--dry-run', '--', 'x'],
                       capture_output=True, text=True, env=env)
  assert out.returncode == 2 and 'run inside a SLURM allocation' in out.stderr


@pytest.mark.parametrize('script', ['tpu_vm.sh', 'slurm_gpu.sbatch', 'local.sh'])
def test_unknown_option_prints_usage(script):
  out = launch(script, '--dryrun', '--', 'true')
  assert out.returncode == 2
  assert f"unknown option '--dryrun'" in out.stderr and 'usage:' in out.stderr
  assert out.stdout == ''
  out = launch(script, '--help')
  assert out.returncode == 0 and out.stdout.startswith('usage:')


def test_local_dry_run():
  out = launch('local.sh', '--processes', '2', '--cpu-devices', '4', '--port', '2000', '--dry-run', '--',
               *TRAIN)
  assert out.returncode == 0, out.stderr
  activate = f'. {ROOT}/.venv/bin/activate && exec '
  assert out.stdout.splitlines() == [activate + shlex.join([
      'env', 'JAX_COORDINATOR_ADDRESS=127.0.0.1:2000', 'JAX_NUM_PROCESSES=2', f'JAX_PROCESS_ID={i}',
      'JAX_PLATFORMS=cpu', 'JAX_NUM_CPU_DEVICES=4', *TRAIN]) for i in (0, 1)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_local_two_processes_form_one_job():
  """The variables local.sh sets are the ones palr_jax.distributed reads: 2 x 4 CPU devices = 8."""
  code = ('import jax; from palr_jax import distributed; distributed.initialize(); '
          'print("job", jax.process_index(), jax.process_count(), jax.device_count())')
  out = launch('local.sh', '--processes', '2', '--cpu-devices', '4', '--port', str(free_port()), '--',
               'python', '-c', code)
  assert out.returncode == 0, out.stdout + out.stderr
  assert sorted(l for l in out.stdout.splitlines() if 'job' in l) == ['[0] job 0 2 8', '[1] job 1 2 8']
  out = launch('local.sh', '--processes', '2', '--', 'python', '-c',
               'import os, sys, time; i = int(os.environ["JAX_PROCESS_ID"]); '
               'sys.exit(3) if i else time.sleep(60)')
  assert out.returncode == 3  # The first failure stops the other process and is the exit status.
