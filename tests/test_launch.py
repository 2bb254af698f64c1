"""Launchers: the exact commands of --dry-run (TPU VM pod, SLURM, local), option errors, and a real
2-process local run joined by jax.distributed."""
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
TRAIN = ['python', '-m', 'palr_jax.main', '--config', 'configs/ml1m_llama2_7b.py:v4-32', '--workdir',
         'gs://bucket/palr run']


def launch(script, *args, env=None):
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture
def gcloud(tmp_path):
  """A stand-in `gcloud` on PATH: it logs every call, answers `describe` with the next line of STATES
  (NONE: the slice does not exist) and the job-status `cat` with the next line of EXITS (RUNNING: no
  status yet); READY and 0 once they run out."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
pop() {{ if [ -s "$1" ]; then head -n1 "$1"; sed -i 1d "$1"; else echo "$2"; fi; }}
case "$*" in
  *" describe "*) out=$(pop {tmp_path}/STATES READY); [ "$out" = NONE ] && exit 1; echo "$out";;
  *"--command cat "*) out=$(pop {tmp_path}/EXITS 0); [ "$out" = RUNNING ] && exit 1; echo "$out";;
esac
""")
  (bin_dir / 'gcloud').chmod(0o755)

  def run(*args, states=(), exits=()):
    (tmp_path / 'STATES').write_text(''.join(f'{s}\n' for s in states))
    (tmp_path / 'EXITS').write_text(''.join(f'{e}\n' for e in exits))
    (tmp_path / 'calls').write_text('')
    out = launch('tpu_vm.sh', *args, env={'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'TMPDIR': str(tmp_path)})
    return out, (tmp_path / 'calls').read_text().splitlines()
  return run


TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']
QR = ['gcloud', 'compute', 'tpus', 'queued-resources']


def install_lines(tmp_path, name, where, nodes):
  archive = str(tmp_path / f'palr-jax-{name}.tar.gz')
  install = ('set -e; command -v python3.11 >/dev/null || { sudo apt-get update -q && sudo apt-get '
             'install -y -q python3.11 python3.11-venv; }; mkdir -p palr-jax && tar -xzf palr-jax.tar.gz '
             '-C palr-jax && cd palr-jax && { [ -x .venv/bin/python ] || python3.11 -m venv .venv; } && '
             '.venv/bin/pip install -q -r launch/requirements-tpu.txt && .venv/bin/pip install -q '
             '--no-deps -r requirements-assets.txt && .venv/bin/pip install -q --no-deps -e .')
  return [shlex.join(['tar', '-czf', archive, '-C', str(ROOT), '--exclude=.git', '--exclude=.venv',
                      '--exclude=runs', '--exclude=cache', '--exclude=__pycache__', '--exclude=*.egg-info',
                      '--exclude=.pytest_cache', '.']),
          *(shlex.join([*TPU, 'scp', archive, f'{n}:palr-jax.tar.gz', *where, '--worker=all']) for n in nodes),
          *(shlex.join([*TPU, 'ssh', n, *where, '--worker=all', '--command', install]) for n in nodes)]


def submit_lines(name, where, nodes, command, log_dir='logs'):
  job = f'{shlex.join(command)}; echo $? > {log_dir}/{name}.exit'
  remote = (f'set -e; cd palr-jax && . .venv/bin/activate && mkdir -p {log_dir} && rm -f {log_dir}/{name}.exit '
            f'&& {{ setsid nohup bash -c {shlex.quote(job)} > {log_dir}/{name}.log 2>&1 < /dev/null & }}')
  return [shlex.join([*TPU, 'ssh', n, *where, '--worker=all', '--command', remote]) for n in nodes]


def commands(stdout: str) -> list[str]:
  """The lines --dry-run prints for commands that change or run something (not the # questions)."""
  return [line for line in stdout.splitlines() if not line.startswith('# ')]


def test_tpu_vm_dry_run_creates_installs_and_starts_detached(tmp_path, gcloud):
  out, calls = gcloud('--name', 'palr-v4', '--zone', 'us-central2-b', '--type', 'v4-16', '--project', 'proj',
                      '--dry-run', '--', *TRAIN, states=['NONE'])
  assert out.returncode == 0, out.stderr
  where = ['--zone=us-central2-b', '--project=proj']
  assert commands(out.stdout) == [
      shlex.join([*TPU, 'create', 'palr-v4', *where, '--accelerator-type=v4-16', '--version=tpu-ubuntu2204-base']),
      *install_lines(tmp_path, 'palr-v4', where, ['palr-v4']),
      *submit_lines('palr-v4', where, ['palr-v4'], TRAIN)]
  # Only questions reached gcloud (the expected lines are shlex.join's: valid shell, the job's words intact).
  assert calls == [' '.join(['compute', 'tpus', 'tpu-vm', 'describe', 'palr-v4', *where, '--format=value(state)'])]


def test_tpu_vm_detached_job_outlives_its_session_and_records_its_status(tmp_path, gcloud):
  """The remote command of a submission, run here by bash as ssh would on a worker: it returns while the
  job still runs (the job waits for a file that is written only after the command returned), and the job
  writes its output and exit status into the log folder."""
  go = tmp_path / 'go'
  out, _ = gcloud('--name', 'd', '--zone', 'z', '--no-setup', '--log-dir', 'job logs', '--dry-run', '--',
                  'sh', '-c', f"while [ ! -e '{go}' ]; do sleep 0.05; done; echo \"it's done\"; exit 75")
  words = shlex.split(commands(out.stdout)[-1])
  home = tmp_path / 'worker'
  (home / 'palr-jax' / '.venv' / 'bin').mkdir(parents=True)
  (home / 'palr-jax' / '.venv' / 'bin' / 'activate').write_text('')
  subprocess.run(['bash', '-c', words[words.index('--command') + 1]], cwd=home, check=True, timeout=30)
  status = home / 'palr-jax' / 'job logs' / 'd.exit'
  assert not status.exists()  # the job is still waiting: the command did not wait for it
  go.write_text('')
  start = time.time()
  while not status.exists() and time.time() - start < 30:
    time.sleep(0.1)
  assert status.read_text() == '75\n'
  assert (home / 'palr-jax' / 'job logs' / 'd.log').read_text() == "it's done\n"


def test_tpu_vm_reuses_a_ready_slice_and_recreates_a_preempted_one(tmp_path, gcloud):
  out, _ = gcloud('--name', 'p', '--zone', 'z', '--no-setup', '--attach', '--dry-run', '--', 'hostname',
                  states=['READY'])
  assert out.returncode == 0, out.stderr
  assert commands(out.stdout) == [
      "gcloud compute tpus tpu-vm ssh p --zone=z --worker=all --command 'set -o pipefail; cd palr-jax "
      "&& . .venv/bin/activate && hostname 2>&1 | sed -u \"s/^/[$(hostname)] /\"'"]
  # `describe` succeeds on a PREEMPTED slice: it is deleted and created again, and set up even with
  # --no-setup (a new slice has nothing installed).
  out, _ = gcloud('--name', 'p', '--zone', 'z', '--type', 'v5litepod-16', '--spot', '--no-setup', '--dry-run',
                  states=['PREEMPTED'])
  assert commands(out.stdout)[:2] == [
      'gcloud compute tpus tpu-vm delete p --zone=z --quiet',
      'gcloud compute tpus tpu-vm create p --zone=z --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite '
      '--spot']
  assert commands(out.stdout)[2:] == install_lines(tmp_path, 'p', ['--zone=z'], ['p'])
  out, _ = gcloud('--name', 'p', '--zone', 'z', '--no-setup', '--dry-run', states=['NONE'])
  assert out.returncode == 2 and 'pass --type to create it' in out.stderr
  out, _ = gcloud('--name', 'p', '--zone', 'z', '--delete', '--dry-run')
  assert out.stdout.splitlines() == ['gcloud compute tpus tpu-vm delete p --zone=z --quiet']
  out, _ = gcloud('--name', 'p', '--zone', 'z', '--delete', '--dry-run', '--', 'x')
  assert out.returncode == 2 and 'add --watch (or --attach)' in out.stderr


def test_tpu_vm_queued_spot_multislice(tmp_path, gcloud):
  """Two v5e-16 slices as one queued resource: created with a node count, installed and started on both
  nodes; the slice count becomes the mesh's dcn_data."""
  out, calls = gcloud('--name', 'ms', '--zone', 'us-west4-a', '--type', 'v5litepod-16', '--slices', '2', '--spot',
                      '--setup-command', 'gcloud storage cp -r gs://b/model assets/', '--dry-run', '--', *TRAIN,
                      states=['NONE'])
  assert out.returncode == 0, out.stderr
  where = ['--zone=us-west4-a']
  nodes = ['ms-0', 'ms-1']
  setup = [shlex.join([*TPU, 'ssh', n, *where, '--worker=all', '--command',
                       'set -e; cd palr-jax && gcloud storage cp -r gs://b/model assets/']) for n in nodes]
  assert commands(out.stdout) == [
      shlex.join([*QR, 'create', 'ms', *where, '--accelerator-type=v5litepod-16',
                  '--runtime-version=v2-alpha-tpuv5-lite', '--node-count=2', '--node-prefix=ms', '--spot']),
      *install_lines(tmp_path, 'ms', where, nodes), *setup,
      *submit_lines('ms', where, nodes, [*TRAIN, '--config.mesh.dcn_data=2'])]
  assert calls == ['compute tpus queued-resources describe ms --zone=us-west4-a --format=value(state.state)']
  # One slice through a queued resource names its node; a dcn_data that contradicts --slices is refused.
  out, _ = gcloud('--name', 'q', '--zone', 'z', '--type', 'v4-8', '--queued', '--no-setup', '--dry-run',
                  states=['NONE'])
  assert commands(out.stdout)[0] == shlex.join([*QR, 'create', 'q', '--zone=z', '--accelerator-type=v4-8',
                                                 '--runtime-version=tpu-ubuntu2204-base', '--node-id=q'])
  out, _ = gcloud('--name', 'q', '--zone', 'z', '--slices', '2', '--dry-run', '--', *TRAIN, '--config.mesh.dcn_data=4')
  assert out.returncode == 2 and 'sets --config.mesh.dcn_data=4' in out.stderr


def test_tpu_vm_watch_recreates_a_preempted_slice_and_resubmits(tmp_path, gcloud):
  """--watch, on states a stand-in gcloud plays back: the job runs; the queued resource is SUSPENDED (its
  Spot slice preempted) -> deleted, created, set up (assets again) and resubmitted; the job exits 75
  (SIGTERM, checkpoint saved) -> resubmitted; then it finishes, the watch ends with its status and
  --delete deletes the slice."""
  out, calls = gcloud('--name', 'w', '--zone', 'z', '--type', 'v5litepod-16', '--queued', '--spot', '--watch',
                      '--poll', '0', '--setup-command', 'fetch-assets', '--no-setup', '--delete', '--dry-run', '--',
                      *TRAIN,
                      states=['ACTIVE', 'ACTIVE', 'SUSPENDED', 'NONE', 'ACTIVE', 'ACTIVE'],
                      exits=['RUNNING', '75', '0'])
  assert out.returncode == 0, out.stderr
  where = ['--zone=z']
  create = shlex.join([*QR, 'create', 'w', *where, '--accelerator-type=v5litepod-16',
                       '--runtime-version=v2-alpha-tpuv5-lite', '--node-id=w', '--spot'])
  setup = shlex.join([*TPU, 'ssh', 'w', *where, '--worker=all', '--command', 'set -e; cd palr-jax && fetch-assets'])
  submit = submit_lines('w', where, ['w'], TRAIN)
  assert commands(out.stdout) == [
      *submit,                                                        # the slice is up: start the job
      shlex.join([*QR, 'delete', 'w', *where, '--force', '--quiet']), create,  # SUSPENDED
      *install_lines(tmp_path, 'w', where, ['w']), setup, *submit,
      *submit,                                                        # exit 75
      shlex.join([*QR, 'delete', 'w', *where, '--force', '--quiet'])]  # done: --delete
  assert 'the slice is SUSPENDED; resubmitting (1 of at most 20)' in out.stderr
  assert 'exit 75); resubmitting (2 of at most 20)' in out.stderr and 'the job finished' in out.stderr
  status = ' '.join(['compute', 'tpus', 'tpu-vm', 'ssh', 'w', *where, '--worker=0', '--command',
                      'cat palr-jax/logs/w.exit 2>/dev/null'])
  assert calls.count(status) == 3
  # A failed job ends the watch with its status; endless preemptions end it after --max-restarts.
  out, _ = gcloud('--name', 'w', '--zone', 'z', '--watch', '--poll', '0', '--no-setup', '--dry-run', '--', 'x',
                  exits=['3'])
  assert out.returncode == 3 and 'failed with exit status 3' in out.stderr
  out, _ = gcloud('--name', 'w', '--zone', 'z', '--watch', '--poll', '0', '--max-restarts', '1', '--no-setup',
                  '--dry-run', '--', 'x', exits=['75', '75'])
  assert out.returncode == 1 and '1 resubmissions; giving up' in out.stderr


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
      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9', 'srun', '--wait=120', '--label', 'bash', '-c', task,
      'bash', *TRAIN]), '# on exit code 75: scontrol requeue 4242']


@pytest.mark.parametrize('code,restarts,requeued', [(75, 0, True), (75, 20, False), (1, 0, False), (0, 0, False)])
def test_slurm_requeues_on_the_preemption_code(slurm_env, tmp_path, code, restarts, requeued):
  """The job (a stand-in srun) exits with `code`: 75 (checkpoint saved on SIGTERM) requeues the job with
  scontrol, unless it was requeued --max-requeues times already; the script exits with the job's code."""
  bin_dir = pathlib.Path(slurm_env['PATH'].split(':')[0])
  (bin_dir / 'srun').write_text(f'#!/bin/sh\nexit {code}\n')
  (bin_dir / 'srun').chmod(0o755)
  log = f'{{ echo "$*" >> {tmp_path}/calls; exit 0; }}'
  (bin_dir / 'scontrol').write_text((bin_dir / 'scontrol').read_text().replace('|| exit 1', f'|| {log}'))
  out = launch('slurm_gpu.sbatch', '--', 'python', '-m', 'palr_jax.main',
               env={**slurm_env, 'SLURM_NTASKS': '2', 'SLURM_RESTART_COUNT': str(restarts)})
  assert out.returncode == code, out.stderr
  calls = (tmp_path / 'calls').read_text().splitlines() if (tmp_path / 'calls').exists() else []
  assert calls == (['requeue 4242'] if requeued else [])
  assert ('not requeueing' in out.stderr) == (code == 75 and not requeued)
  assert '#SBATCH --requeue' in (LAUNCH / 'slurm_gpu.sbatch').read_text()


def test_slurm_script_outlives_a_sigterm_to_requeue(slurm_env, tmp_path):
  """SLURM's preemption signals the batch shell too: it waits for the job to save and exit, then requeues."""
  bin_dir = pathlib.Path(slurm_env['PATH'].split(':')[0])
  (bin_dir / 'srun').write_text(f'#!/bin/sh\ntouch {tmp_path}/started; sleep 2; exit 75\n')
  (bin_dir / 'srun').chmod(0o755)
  log = f'{{ echo "$*" >> {tmp_path}/calls; exit 0; }}'
  (bin_dir / 'scontrol').write_text((bin_dir / 'scontrol').read_text().replace('|| exit 1', f'|| {log}'))
  proc = subprocess.Popen(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), '--', 'python'], stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **slurm_env, 'SLURM_NTASKS': '2'})
  while not (tmp_path / 'started').exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 75, proc.stderr.read()
  assert 'waiting for the job to save and exit' in proc.stderr.read()
  assert (tmp_path / 'calls').read_text() == 'requeue 4242\n'


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
  assert "unknown option '--dryrun'" in out.stderr and 'usage:' in out.stderr
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
