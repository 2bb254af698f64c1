"""Launchers: the exact commands of --dry-run (TPU VM pod, SLURM, local), option errors, a real 2-process
local run joined by jax.distributed, and the TPU watcher against a stand-in gcloud/ssh that fails, flaps,
loses slices and exit files (issue 27): no failed call ends the watch, no error reads as a lost slice,
nothing is installed or started over a running job, and --delete deletes only after a real end."""
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
TRAIN = ['python', '-m', 'palr_jax.main', '--config', 'configs/ml1m_llama2_7b.py:v4-32', '--workdir',
         'gs://bucket/palr run']


def launch(script, *args, env=None, timeout=120):
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout)


NOT_FOUND = ("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'projects/p/locations/z/nodes/n' "
             'was not found')


@pytest.fixture
def gcloud(tmp_path):
  """A stand-in `gcloud` (and `tar`) on PATH: it logs every call to `calls` and answers
  - `describe` with the next line of STATES: a state, NONE (NOT_FOUND: the slice does not exist) or ERROR
    (gcloud fails otherwise: an auth refresh); READY once they run out;
  - the job probe (ssh to worker 0) with the next line of JOBS: running, none, exit N, or FAIL (ssh
    refused, exit 255); `exit 0` once they run out;
  - `ssh ... --command set -o pipefail ...` (--attach) on node N: touches started.N; the first slice's
    session waits (up to 10 s) for the last slice's, as jax.distributed.initialize does, then prints a line;
  - any other call that contains the PATTERN of FAILS's first line, `ok PATTERN` or `fail PATTERN`, passes
    or fails (exit 255) and drops that line."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
pop() {{ if [ -s "$1" ]; then head -n1 "$1"; sed -i 1d "$1"; else echo "$2"; fi; }}
case "$*" in
  *" describe "*)
    out=$(pop {tmp_path}/STATES READY)
    [ "$out" = NONE ] && {{ echo "{NOT_FOUND}" >&2; exit 1; }}
    [ "$out" = ERROR ] && {{ echo "ERROR: (gcloud.auth) There was a problem refreshing your auth tokens" >&2; exit 1; }}
    echo "$out";;
  *"--command if [ -s "*)
    out=$(pop {tmp_path}/JOBS 'exit 0')
    [ "$out" = FAIL ] && {{ echo "ssh: connect to host 10.0.0.2 port 22: Connection refused" >&2; exit 255; }}
    echo "$out";;
  *"--command set -o pipefail"*)
    touch {tmp_path}/started.$5
    case $5 in *-0) for i in $(seq 200); do [ -e {tmp_path}/started.${{5%-0}}-1 ] && break; sleep 0.05; done
                    [ -e {tmp_path}/started.${{5%-0}}-1 ] || exit 1;; esac
    echo "[$5] hello";;
  *)
    if [ -s {tmp_path}/FAILS ]; then
      line=$(head -n1 {tmp_path}/FAILS)
      case "$*" in *"${{line#* }}"*)
        sed -i 1d {tmp_path}/FAILS
        [ "${{line%% *}}" = fail ] && {{ echo "ERROR: refused" >&2; exit 255; }};;
      esac
    fi;;
esac
exit 0
""")
  (bin_dir / 'tar').write_text(f'#!/bin/sh\necho "tar $*" >> {tmp_path}/calls\n')
  for tool in ('gcloud', 'tar'):
    (bin_dir / tool).chmod(0o755)

  def run(*args, states=(), jobs=(), fails=(), timeout=60):
    for name, lines in (('STATES', states), ('JOBS', jobs), ('FAILS', fails)):
      (tmp_path / name).write_text(''.join(f'{s}\n' for s in lines))
    (tmp_path / 'calls').write_text('')
    out = launch('tpu_vm.sh', *args, env={'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'TMPDIR': str(tmp_path)},
                 timeout=timeout)
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
  logs = f'{log_dir}/{name}'
  job = f'trap : TERM; {shlex.join(command)}; echo $? > {logs}.exit.tmp && mv {logs}.exit.tmp {logs}.exit'
  stale = f'[ -f {logs}.pid ] && kill -0 -- -"$(cat {logs}.pid)" 2>/dev/null'
  remote = (f'set -e; cd palr-jax && . .venv/bin/activate && mkdir -p {log_dir} && if {stale}; then kill -TERM -- '
            f'-"$(cat {logs}.pid)"; for i in $(seq 60); do {stale} || break; sleep 1; done; kill -KILL -- '
            f'-"$(cat {logs}.pid)" 2>/dev/null || true; fi; rm -f {logs}.exit && {{ setsid nohup bash -c '
            f'{shlex.quote(job)} >> {logs}.log 2>&1 < /dev/null & echo $! > {logs}.pid; }}')
  return [shlex.join([*TPU, 'ssh', n, *where, '--worker=all', '--command', remote]) for n in nodes]


def commands(stdout: str) -> list[str]:
  """The lines --dry-run prints for commands that change or run something (not the # questions)."""
  return [line for line in stdout.splitlines() if not line.startswith('# ')]


def questions(stdout: str) -> list[list[str]]:
  """The questions --dry-run asked (`# LINE -> ANSWER`), as argument lists."""
  return [shlex.split(line[2:].rsplit(' -> ', 1)[0]) for line in stdout.splitlines() if line.startswith('# ')]


def remote(words: list[str]) -> str:
  return words[words.index('--command') + 1]


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


def start_job(tmp_path, gcloud, job, home):
  """The remote command of a submission, run here by bash as ssh would on a worker, and the probe the
  watcher sends to worker 0; returns the probe (run it with `probe()`)."""
  out, _ = gcloud('--name', 'd', '--zone', 'z', '--no-setup', '--log-dir', 'job logs', '--dry-run', '--', *job,
                  jobs=['none'])
  (home / 'palr-jax' / '.venv' / 'bin').mkdir(parents=True, exist_ok=True)
  (home / 'palr-jax' / '.venv' / 'bin' / 'activate').write_text('')
  (ask,) = [q for q in questions(out.stdout) if 'ssh' in q]
  subprocess.run(['bash', '-c', remote(shlex.split(commands(out.stdout)[-1]))], cwd=home, check=True, timeout=90)
  return lambda: subprocess.run(['bash', '-c', remote(ask)], cwd=home, capture_output=True, text=True).stdout.strip()


def wait_for(probe, want, timeout=30):
  deadline = time.time() + timeout
  while (got := probe()) != want and time.time() < deadline:
    time.sleep(0.1)
  return got


def test_tpu_vm_detached_job_outlives_its_session_and_records_its_status(tmp_path, gcloud):
  """The job returns at once, runs detached, appends its output to the log and records its exit status;
  the watcher's probe says running, then the status."""
  home = tmp_path / 'worker'
  go = home / 'palr-jax' / 'go'
  probe = start_job(tmp_path, gcloud,
                    ['sh', '-c', "while [ ! -e go ]; do sleep 0.05; done; echo \"it's done\"; exit 75"],
                    home)
  assert wait_for(probe, 'running') == 'running'  # the submission returned while the job waits
  go.touch()
  assert wait_for(probe, 'exit 75') == 'exit 75'
  assert (home / 'palr-jax' / 'job logs' / 'd.exit').read_text() == '75\n'
  assert (home / 'palr-jax' / 'job logs' / 'd.log').read_text() == "it's done\n"
  probe = start_job(tmp_path, gcloud, ['sh', '-c', 'echo again'], home)  # a resubmission: the log grows
  assert wait_for(probe, 'exit 0') == 'exit 0'
  assert (home / 'palr-jax' / 'job logs' / 'd.log').read_text() == "it's done\nagain\n"


def test_tpu_vm_job_status_survives_sigterm_and_a_lost_wrapper_reads_as_no_job(tmp_path, gcloud):
  """A VM stop sends SIGTERM to every process: the wrapper outlives it and records the job's own status
  (75); a wrapper killed outright leaves no status, and the probe then says `none` (not running: the
  watcher resubmits) instead of `running` forever. A resubmission stops a job left from before first."""
  home = tmp_path / 'worker'
  probe = start_job(tmp_path, gcloud, ['sh', '-c', 'trap "exit 75" TERM; touch started; while :; do sleep 0.1; done'],
                    home)
  pid = int((home / 'palr-jax' / 'job logs' / 'd.pid').read_text())
  assert wait_for(probe, 'running') == 'running'  # the detached job may take a moment on a busy box
  deadline = time.time() + 30
  while not (home / 'palr-jax' / 'started').exists() and time.time() < deadline:
    time.sleep(0.05)
  os.killpg(pid, signal.SIGTERM)
  assert wait_for(probe, 'exit 75') == 'exit 75'

  probe = start_job(tmp_path, gcloud, ['sleep', '300'], home)
  pid = int((home / 'palr-jax' / 'job logs' / 'd.pid').read_text())
  assert wait_for(probe, 'running') == 'running'
  os.killpg(pid, signal.SIGKILL)  # the whole job and its wrapper, as a VM reset does
  assert wait_for(probe, 'none') == 'none'

  probe = start_job(tmp_path, gcloud, ['sleep', '300'], home)
  old = int((home / 'palr-jax' / 'job logs' / 'd.pid').read_text())
  start_job(tmp_path, gcloud, ['sleep', '300'], home)  # the stale copy is stopped before the new one starts
  new = int((home / 'palr-jax' / 'job logs' / 'd.pid').read_text())
  try:
    assert new != old and wait_for(probe, 'running') == 'running'
    with pytest.raises(ProcessLookupError):
      os.killpg(old, 0)
  finally:
    os.killpg(new, signal.SIGKILL)


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


def test_tpu_vm_never_installs_over_or_starts_a_second_copy_of_a_running_job(tmp_path, gcloud):
  """The same command again while the job runs (a second watcher, a rerun after the first watcher died):
  neither the checkout is replaced nor the job started again; with --watch it is watched to its end."""
  out, calls = gcloud('--name', 'r', '--zone', 'z', '--watch', '--poll', '0', '--', 'x', jobs=['running', 'exit 0'])
  assert out.returncode == 0, out.stderr
  assert 'the job r is running on r: not installing over it' in out.stderr
  assert 'not starting the job r again' in out.stderr and 'the job finished' in out.stderr
  assert not [c for c in calls if c.startswith('tar') or ' scp ' in c or 'setsid' in c], calls


def test_tpu_vm_queued_spot_multislice(tmp_path, gcloud):
  """Two v5e-16 slices as one queued resource: created with a node count, installed and started on both
  nodes; the slice count becomes the main job's dcn_data (and only the main job's)."""
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
  other = ['python', '-c', 'import jax; print(jax.devices())']
  out, _ = gcloud('--name', 'ms', '--zone', 'z', '--slices', '2', '--no-setup', '--dry-run', '--', *other)
  assert commands(out.stdout) == submit_lines('ms', ['--zone=z'], nodes, other)
  # One slice through a queued resource names its node; a dcn_data that contradicts --slices is refused.
  out, _ = gcloud('--name', 'q', '--zone', 'z', '--type', 'v4-8', '--queued', '--no-setup', '--dry-run',
                  states=['NONE'])
  assert commands(out.stdout)[0] == shlex.join([*QR, 'create', 'q', '--zone=z', '--accelerator-type=v4-8',
                                                 '--runtime-version=tpu-ubuntu2204-base', '--node-id=q'])
  out, _ = gcloud('--name', 'q', '--zone', 'z', '--slices', '2', '--dry-run', '--', *TRAIN, '--config.mesh.dcn_data=4')
  assert out.returncode == 2 and 'sets --config.mesh.dcn_data=4' in out.stderr


def test_tpu_vm_attach_starts_every_slice_at_once_with_a_log_each(tmp_path, gcloud):
  """--attach --slices 2: slice 0's process waits for slice 1's (jax.distributed.initialize); one session
  after another would never get there. Each slice's stream goes to its own log."""
  out, calls = gcloud('--name', 'ms', '--zone', 'z', '--slices', '2', '--no-setup', '--attach', '--log',
                      str(tmp_path / 'run.log'), '--', *TRAIN, jobs=['none'])
  assert out.returncode == 0, out.stdout + out.stderr
  for node in ('ms-0', 'ms-1'):
    assert (tmp_path / f'run.log.{node}').read_text() == f'[{node}] hello\n'
  sessions = [c for c in calls if 'set -o pipefail' in c]
  assert len(sessions) == 2 and all("palr run' --config.mesh.dcn_data=2 2>&1" in c for c in sessions), sessions


def test_tpu_vm_watch_recreates_a_preempted_slice_and_resubmits(tmp_path, gcloud):
  """--watch, on states a stand-in gcloud plays back: the job runs; the queued resource is SUSPENDED (its
  Spot slice preempted) -> deleted, created, set up (assets again) and resubmitted; the job exits 75
  (SIGTERM) -> resubmitted; then it finishes, the watch ends with its status and --delete deletes the slice."""
  out, calls = gcloud('--name', 'w', '--zone', 'z', '--type', 'v5litepod-16', '--queued', '--spot', '--watch',
                      '--poll', '0', '--setup-command', 'fetch-assets', '--no-setup', '--delete', '--dry-run', '--',
                      *TRAIN,
                      states=['ACTIVE', 'ACTIVE', 'SUSPENDED', 'ACTIVE', 'ACTIVE', 'ACTIVE'],
                      jobs=['none', 'running', 'exit 75', 'exit 0'])
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
  assert 'exit 75) and resumes from the workdir; resubmitting (2 of at most 20)' in out.stderr
  assert 'the job finished' in out.stderr
  assert len([c for c in calls if ' ssh w --zone=z --worker=0 ' in c]) == 4
  # A failed job ends the watch with its status; endless preemptions end it after --max-restarts.
  out, _ = gcloud('--name', 'w', '--zone', 'z', '--watch', '--poll', '0', '--no-setup', '--dry-run', '--', 'x',
                  jobs=['none', 'exit 3'])
  assert out.returncode == 3 and 'failed with exit status 3' in out.stderr
  out, _ = gcloud('--name', 'w', '--zone', 'z', '--watch', '--poll', '0', '--max-restarts', '1', '--no-setup',
                  '--dry-run', '--', 'x', jobs=['none', 'exit 75', 'exit 143'])
  assert out.returncode == 1 and '1 resubmissions; giving up' in out.stderr
  assert 'stopped by SIGTERM (exit 143)' in out.stderr  # 143 (SIGTERM) is resubmitted like 75


def submits(calls):
  return [c for c in calls if 'setsid' in c]


def test_tpu_vm_watch_survives_a_refused_ssh_and_deletes_only_at_the_end(tmp_path, gcloud):
  """A reclaimed slice that still reads ACTIVE refuses ssh: the resubmission after exit 75 fails once and
  the probe twice. The watch goes on, resubmits, and --delete deletes the slice once, after the job's end."""
  out, calls = gcloud('--name', 'f', '--zone', 'z', '--watch', '--poll', '0', '--no-setup', '--delete', '--', 'x',
                      jobs=['none', 'exit 75', 'FAIL', 'FAIL', 'running', 'exit 0'], fails=['ok setsid', 'fail setsid'])
  assert out.returncode == 0, out.stderr
  assert 'starting the job failed; trying again (1 of at most 10 failures in a row)' in out.stderr
  assert 'worker 0 of f did not answer (ssh: connect to host 10.0.0.2 port 22: Connection refused' in out.stderr
  assert len(submits(calls)) == 3  # the first, the refused one, the resubmission
  deletes = [i for i, c in enumerate(calls) if ' delete ' in c]
  assert deletes == [len(calls) - 1]


def test_tpu_vm_watch_reads_a_gcloud_error_as_unknown_not_as_a_lost_slice(tmp_path, gcloud):
  """`describe` fails (an auth refresh) while the job runs: nothing is created, installed or started; the
  job is found running when gcloud answers again. Errors without end give up, leaving the slice (no
  --delete) and the job alone."""
  out, calls = gcloud('--name', 'g', '--zone', 'z', '--type', 'v4-8', '--watch', '--poll', '0', '--no-setup',
                      '--delete', '--', 'x', states=['READY', 'ERROR', 'ERROR', 'READY', 'READY'],
                      jobs=['none', 'running', 'exit 0'])
  assert out.returncode == 0, out.stderr
  assert 'gcloud could not describe g (ERROR: (gcloud.auth) There was a problem refreshing' in out.stderr
  assert not [c for c in calls if ' create ' in c or c.startswith('tar') or ' scp ' in c], calls
  assert len(submits(calls)) == 1
  out, calls = gcloud('--name', 'g', '--zone', 'z', '--type', 'v4-8', '--watch', '--poll', '0', '--max-errors', '3',
                      '--delete', '--', 'x', states=['READY'] + ['ERROR'] * 10, jobs=['none'])
  assert out.returncode == 1 and '3 failures in a row: giving up watching' in out.stderr
  assert not [c for c in calls if ' delete ' in c or ' create ' in c], calls
  # Only NOT_FOUND means gone: the slice is created again (and set up), then the job resubmitted.
  out, calls = gcloud('--name', 'g', '--zone', 'z', '--type', 'v4-8', '--watch', '--poll', '0', '--', 'x',
                      states=['READY', 'NONE', 'CREATING', 'READY', 'READY'], jobs=['none', 'exit 0'])
  assert out.returncode == 0, out.stderr
  assert 'the slice is gone; resubmitting (1 of at most 20)' in out.stderr
  assert len([c for c in calls if ' create ' in c]) == 1 and len(submits(calls)) == 2


def test_tpu_vm_watch_restarts_a_job_that_died_without_an_exit_status(tmp_path, gcloud):
  """The slice comes back READY after a VM stop: no job runs and no exit file is left (the wrapper died
  with it). The watcher resubmits (the job resumes) instead of waiting forever."""
  out, calls = gcloud('--name', 'v', '--zone', 'z', '--watch', '--poll', '0', '--', 'x',
                      jobs=['none', 'running', 'none', 'running', 'exit 0'], timeout=30)
  assert out.returncode == 0, out.stderr
  assert 'the job is not running and left no exit status' in out.stderr
  assert len(submits(calls)) == 2


def test_tpu_vm_watch_deletes_the_slice_when_the_user_interrupts_it(tmp_path, gcloud):
  bin_dir = tmp_path / 'bin'
  (tmp_path / 'JOBS').write_text('none\n' + 'running\n' * 10000)
  (tmp_path / 'calls').write_text('')
  proc = subprocess.Popen(['bash', str(LAUNCH / 'tpu_vm.sh'), '--name', 'i', '--zone', 'z', '--watch', '--poll', '1',
                           '--delete', '--', 'x'], stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'TMPDIR': str(tmp_path)})
  deadline = time.time() + 30
  while 'setsid' not in (tmp_path / 'calls').read_text() and time.time() < deadline:
    time.sleep(0.1)
  # Ctrl-C: the terminal signals the whole foreground group, so a child the watcher waits on ends too.
  os.killpg(proc.pid, signal.SIGINT)
  assert proc.wait(timeout=30) == 130, proc.stderr.read()
  assert (tmp_path / 'calls').read_text().splitlines()[-1] == 'compute tpus tpu-vm delete i --zone=z --quiet'


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


PER_GPU = 'case ${CUDA_VISIBLE_DEVICES:-} in ""|*,*) devices=$SLURM_LOCALID;; *) devices=0;; esac'


@pytest.mark.parametrize('tasks,devices', [(2, 'devices=0,1,2,3,4,5,6,7'), (16, PER_GPU)])
def test_slurm_dry_run_two_nodes(slurm_env, tasks, devices):
  out = launch('slurm_gpu.sbatch', '--dry-run', '--', *TRAIN,
               env={**slurm_env, 'SLURM_NTASKS': str(tasks)})
  assert out.returncode == 0, out.stderr
  port = 61440 + 4242 % 4096
  task = (f'{devices}; export JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS=$devices && . .venv/bin/activate '
          '&& exec "$@"')
  assert out.stdout.splitlines() == [shlex.join([
      'env', f'JAX_COORDINATOR_ADDRESS=gpu-a17:{port}', f'JAX_NUM_PROCESSES={tasks}',
      'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9', 'srun', '--wait=120', '--label', 'bash', '-c', task,
      'bash', *TRAIN]), '# on exit code 75 or 143 (or a failure after SIGTERM): scontrol requeue 4242']


@pytest.mark.parametrize('tasks,visible,local_id,want', [
    (16, '3', '3', '0'),                  # SLURM binds one GPU to each task: CUDA calls it 0
    (16, '0,1,2,3,4,5,6,7', '3', '3'),    # every task sees the node's GPUs: its own is SLURM_LOCALID
    (16, None, '5', '5'),
    (2, '0,1,2,3,4,5,6,7', '0', '0,1,2,3,4,5,6,7')])
def test_slurm_task_picks_the_gpus_cuda_numbers_for_it(slurm_env, tmp_path, tasks, visible, local_id, want):
  """The task line srun runs, run here by bash in a task's environment: JAX_LOCAL_DEVICE_IDS as CUDA
  numbers the task's GPUs."""
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  (tmp_path / 'venv' / 'bin' / 'activate').write_text('')
  out = launch('slurm_gpu.sbatch', '--dry-run', '--venv', str(tmp_path / 'venv'), '--', 'x',
               env={**slurm_env, 'SLURM_NTASKS': str(tasks)})
  words = shlex.split(out.stdout.splitlines()[0])
  task = words[words.index('-c') + 1]
  env = {k: v for k, v in os.environ.items() if k != 'CUDA_VISIBLE_DEVICES'}
  env.update(SLURM_PROCID='11', SLURM_LOCALID=local_id, **({'CUDA_VISIBLE_DEVICES': visible} if visible else {}))
  got = subprocess.run(['bash', '-c', task, 'bash', 'sh', '-c', 'echo $JAX_PROCESS_ID $JAX_LOCAL_DEVICE_IDS'],
                       capture_output=True, text=True, env=env, check=True).stdout
  assert got == f'11 {want}\n'


@pytest.mark.parametrize('code,restarts,sigterm,requeued', [
    (75, 0, False, True), (75, 0, True, True), (75, 20, False, False), (143, 0, False, True), (1, 0, False, False),
    (1, 0, True, True), (2, 0, True, False), (0, 0, False, False), (0, 0, True, False)])
def test_slurm_requeues_a_preempted_job(slurm_env, tmp_path, code, restarts, sigterm, requeued):
  """The job (a stand-in srun) exits with `code`: 75 (SIGTERM in any stage) or 143 (killed by SIGTERM)
  requeues the job with scontrol, unless it was requeued --max-requeues times already; after a SIGTERM
  to the batch shell (preemption, the time limit) any failure but a bad config (2) does too; the script
  exits with the job's code, and the requeued run appends to the same output file."""
  bin_dir = pathlib.Path(slurm_env['PATH'].split(':')[0])
  signal_it = f'touch {tmp_path}/started; sleep 2; ' if sigterm else ''
  (bin_dir / 'srun').write_text(f'#!/bin/sh\n{signal_it}exit {code}\n')
  (bin_dir / 'srun').chmod(0o755)
  log = f'{{ echo "$*" >> {tmp_path}/calls; exit 0; }}'
  (bin_dir / 'scontrol').write_text((bin_dir / 'scontrol').read_text().replace('|| exit 1', f'|| {log}'))
  proc = subprocess.Popen(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), '--', 'python', '-m', 'palr_jax.main'],
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **slurm_env, 'SLURM_NTASKS': '2', 'SLURM_RESTART_COUNT': str(restarts)})
  if sigterm:
    while not (tmp_path / 'started').exists():
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == code
  err = proc.stderr.read()
  calls = (tmp_path / 'calls').read_text().splitlines() if (tmp_path / 'calls').exists() else []
  assert calls == (['requeue 4242'] if requeued else []), err
  assert ('not requeueing' in err) == (code == 75 and not requeued)
  assert ('SIGTERM: waiting for the job to save and exit' in err) == sigterm  # it outlived the signal
  text = (LAUNCH / 'slurm_gpu.sbatch').read_text()
  assert '#SBATCH --requeue' in text and '#SBATCH --open-mode=append' in text


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
  out = launch('local.sh', '--processes', '2', '--cpu-devices', '4', '--port', str(free_port()), '--venv', sys.prefix,
               '--', 'python', '-c', code, env={'PYTHONPATH': str(ROOT)})
  assert out.returncode == 0, out.stdout + out.stderr
  assert sorted(line for line in out.stdout.splitlines() if 'job' in line) == ['[0] job 0 2 8', '[1] job 1 2 8']
  out = launch('local.sh', '--processes', '2', '--venv', sys.prefix, '--', 'python', '-c',
               'import os, sys, time; i = int(os.environ["JAX_PROCESS_ID"]); '
               'sys.exit(3) if i else time.sleep(60)')
  assert out.returncode == 3  # The first failure stops the other process and is the exit status.


def test_local_job_whose_hosts_each_have_their_own_workdir_exits_2_at_once(tmp_path):
  """The main job as 2 processes, each with its own local folder as --workdir (what a node-local disk is
  on a pod): every process exits 2 at start with one line, before the config's data is even looked at."""
  job = (f'exec python -m palr_jax.main --config {ROOT}/configs/ml100k.py:quick '
         f'--workdir {tmp_path}/host$JAX_PROCESS_ID')
  out = launch('local.sh', '--processes', '2', '--cpu-devices', '1', '--port', str(free_port()), '--venv',
               sys.prefix, '--', 'sh', '-c', job, env={'PYTHONPATH': str(ROOT)})
  assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
  lines = sorted(line for line in out.stdout.splitlines() if 'palr_jax.main:' in line)
  assert lines == [f'[{i}] palr_jax.main: --workdir {tmp_path}/host{i}: process(es) [1] of 2 do not see the file '
                   'process 0 wrote there: each host has its own folder; a multi-process job needs a workdir every '
                   'host shares (gs://BUCKET/..., or a shared filesystem)' for i in (0, 1)]


def test_local_passes_sigterm_on_and_exits_with_the_preemption_code(tmp_path):
  """SIGTERM to local.sh (a scheduler stopping it) reaches both processes, blocked outside training;
  local.sh waits for them and exits 75, the code every launcher resubmits."""
  code = ('import pathlib, sys, time; from palr_jax import distributed; distributed.install_signal_handlers(); '
          f'pathlib.Path("{tmp_path}", "ready." + sys.argv[1]).touch(); time.sleep(60)')
  proc = subprocess.Popen(['bash', str(LAUNCH / 'local.sh'), '--processes', '2', '--venv', sys.prefix, '--', 'sh',
                           '-c', f'exec python -c \'{code}\' $JAX_PROCESS_ID'], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
  deadline = time.time() + 60
  while len(list(tmp_path.glob('ready.*'))) < 2 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=60)[0]
  assert proc.returncode == 75, out[-3000:]
  assert sorted(line for line in out.splitlines() if 'palr_jax: SIGTERM' in line) == [
      f'[{i}] palr_jax: SIGTERM outside training; exiting with code 75: rerun the same command to resume'
      for i in (0, 1)]
