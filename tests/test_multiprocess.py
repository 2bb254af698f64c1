"""2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) against 1 process x 8:
the same loss and LoRA gradients on every mesh, the same training curve, a checkpoint holding both
processes' iterator states, and a clean, agreed stop when one process gets SIGTERM (preemption)."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from palr_jax import distributed
from palr_jax.train import checkpointing, loop, progress
import train_child as tc

CHILD = os.path.join(os.path.dirname(__file__), 'train_child.py')
MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(mode: str, *args: str) -> list[subprocess.Popen]:
  """Both processes of a 2 x 4-device job running `train_child.py mode args`."""
  port = free_port()
  return [subprocess.Popen([sys.executable, CHILD, mode, *args, '--coordinator', f'127.0.0.1:{port}',
                            '--num_processes', '2', '--process_id', str(i), '--cpu_devices', '4'],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def wait(procs, timeout=600):
  for p in procs:
    out = p.communicate(timeout=timeout)[0]
    assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope='module')
def two_process_grads(tmp_path_factory):
  out = tmp_path_factory.mktemp('grads') / 'grads.npz'
  wait(launch('grads', '--meshes', ';'.join(','.join(map(str, m)) for m in MESHES), '--out', str(out)))
  with np.load(out) as f:
    return dict(f)


@pytest.mark.parametrize('mesh', MESHES)
def test_two_processes_give_the_loss_and_grads_of_one(two_process_grads, mesh):
  config = tc.tiny_config(mesh)
  loss, grads = tc.grads_on_mesh(config, tc.tiny_model(config), tc.synthetic_examples(8, 16))
  tag = '_'.join(map(str, mesh))
  np.testing.assert_allclose(two_process_grads[f'{tag}/loss'], loss, rtol=1e-5, atol=1e-7)
  assert {k for k in two_process_grads if k.startswith(f'{tag}/')} == {f'{tag}/{k}' for k in grads} | {f'{tag}/loss'}
  for k, g in grads.items():
    assert np.abs(g).max() > 1e-5
    np.testing.assert_allclose(two_process_grads[f'{tag}/{k}'], g, rtol=1e-5, atol=1e-7, err_msg=k)


def lora_values(model) -> dict[str, np.ndarray]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from palr_jax.model import lora  # pylint: disable=g-import-not-at-top
  return {'.'.join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(lora.lora_state(model))}


def test_preempted_pod_stops_together_then_resumes_on_other_meshes(tmp_path, caplog):
  """2 x 4 devices with fsdp=8; SIGTERM to process 1 only: both stop at the same step (agreed through the
  coordination service, a log step: log_every=2), save it, and exit 75. The checkpoint then resumes as
  1 x 8 (in process) and as 1 x 4 with fsdp=4 (a process of 4 devices), to the adapters of an
  uninterrupted run (data order and dropout masks included)."""
  workdir = tmp_path / 'pod'
  workdir.mkdir()
  procs = launch('train', '--workdir', str(workdir), '--steps', '100000', '--meshes', '1,8,1', '--log_every', '2')
  deadline = time.time() + 600
  while not all((workdir / f'started.{i}').exists() for i in range(2)):
    assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate()[0][-4000:] for p in procs]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # One host, not the coordinator's, is told it will be preempted.
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [distributed.PREEMPTED_EXIT_CODE] * 2, [o[-4000:] for o in outs]

  (events,) = (workdir / 'tensorboard').iterdir()  # Process 0 writes, process 1 does not.
  pod_curve = progress.scalars([events], 'train/loss')
  stop = max(pod_curve)
  assert 4 <= stop < 100000 and stop % 2 == 0 and sorted(pod_curve) == list(range(2, stop + 1, 2))
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == stop  # The preemption save, at the step where both processes stopped.
  data = json.loads((workdir / 'checkpoints' / str(stop) / 'data' / 'metadata').read_text())
  assert data == {'processes': [{'position': stop}, {'position': stop}]}

  final = stop + 3
  examples = tc.synthetic_examples(24, 16)
  config = tc.run_config((1, 8, 1), final, log_every=2)
  reference = tc.tiny_model(config, nonzero_b=False)
  loop.train(config, tmp_path / 'one', reference, tc.ArrayIterator(examples, 8))
  want = lora_values(reference)
  one_curve = progress.scalars(list((tmp_path / 'one' / 'tensorboard').iterdir()), 'train/loss')
  np.testing.assert_allclose([pod_curve[s] for s in sorted(pod_curve)], [one_curve[s] for s in sorted(pod_curve)],
                             rtol=1e-5)

  shutil.copytree(workdir, tmp_path / 'four')
  as_four = subprocess.run([sys.executable, CHILD, 'train', '--workdir', str(tmp_path / 'four'), '--steps',
                            str(final), '--meshes', '1,4,1', '--log_every', '2', '--cpu_devices', '4'],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  assert as_four.returncode == 0, as_four.stdout[-4000:]

  resumed = tc.tiny_model(config, nonzero_b=False)
  with caplog.at_level(logging.INFO):
    result = loop.train(config, workdir, resumed, tc.ArrayIterator(examples, 8))
  assert result['step'] == final
  assert f'train: resumed from step {stop}' in caplog.text
  initial = lora_values(tc.tiny_model(config, nonzero_b=False))
  for name, model in (('1 x 8', resumed), ('1 x 4', tc.tiny_model(config, nonzero_b=False))):
    if name == '1 x 4':
      checkpointing.restore_adapters(model, tmp_path / 'four' / 'checkpoints', final)
    got = lora_values(model)
    assert sorted(got) == sorted(want) and want
    for key, value in want.items():
      assert np.abs(value - initial[key]).max() > 1e-4, key  # trained
      np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=f'{name}: {key}')
  # The 1 x 4 run went on from the checkpoint: its own events start after the preemption step.
  (own,) = [p for p in (tmp_path / 'four' / 'tensorboard').iterdir() if p.name != events.name]
  assert sorted(progress.scalars([own], 'train/loss')) == [stop + 2, final]


def test_cluster_detection_and_flag_errors(monkeypatch):
  assert distributed.cluster_kind({'SLURM_NTASKS': '4', 'SLURM_STEP_NODELIST': 'n[1-4]'}) == 'slurm'
  assert distributed.cluster_kind({'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'n1'}) is None
  assert distributed.cluster_kind({}) is None
  with pytest.raises(ValueError, match='--num_processes/--process_id need --coordinator_address'):
    distributed.initialize(num_processes=2, env={})
  with pytest.raises(ValueError, match=r"\$JAX_PROCESS_ID must be an integer, got 'x'"):
    distributed.initialize(env={'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1', 'JAX_NUM_PROCESSES': '2',
                                'JAX_PROCESS_ID': 'x'})
  called = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize', lambda *a, **k: called.append(a))
  distributed.initialize(env={})  # A single process: nothing to join.
  assert not called
  distributed.initialize(env={'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4',
                              'JAX_PROCESS_ID': '3'})
  assert called == [('10.0.0.1:1234', 4, 3)]


SIGTERMS = """
import os, signal, sys, time
from palr_jax import distributed
distributed.install_signal_handlers()
if sys.argv[1] == 'training':
  with distributed.training_window():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print('asked to stop:', distributed.preemption_requested(), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
elif sys.argv[1] in ('barrier', 'fail_fast'):  # process 1 waits for process 0, busy elsewhere for a minute
  distributed.initialize(sys.argv[2], 2, int(sys.argv[3]))
  def job():
    if sys.argv[3] == '0':
      time.sleep(60)
    print('waiting', flush=True)
    distributed.barrier('x')
  if sys.argv[1] == 'fail_fast':
    distributed.fail_fast(job, poll_seconds=0.2)
  else:
    job()
else:
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(10)
print('survived', flush=True)
"""


def sigterm_child(*args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-c', SIGTERMS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)})


@pytest.mark.parametrize('where', ['training', 'outside'])
def test_sigterm_outside_training_or_a_second_one_exits_with_the_preemption_code(where):
  """A first SIGTERM in training only asks the trainer to save and stop; any other ends the process at once
  with 75 (every stage resumes from its files, so the launchers resubmit; a job stuck elsewhere must not
  outlive its slice's billing)."""
  child = sigterm_child(where)
  out, err = child.communicate(timeout=120)
  assert 'survived' not in out, err[-3000:]
  assert ('asked to stop: True' in out) == (where == 'training'), err[-3000:]
  assert child.returncode == distributed.PREEMPTED_EXIT_CODE, err[-3000:]


@pytest.mark.parametrize('mode', ['barrier', 'fail_fast'])
def test_sigterm_ends_a_process_blocked_at_a_barrier_with_the_preemption_code(mode):
  """What once hung a pod: a process waiting at a host barrier (C++, for hours in a host-only stage)
  never ran a Python handler; the signal thread ends it with 75. Under fail_fast the other process (busy
  in Python, not at the barrier) follows with 75, not 1: the job as a whole is resumable."""
  port = free_port()
  procs = [sigterm_child(mode, f'127.0.0.1:{port}', str(i)) for i in range(2)]
  try:
    assert procs[1].stdout.readline() == 'waiting\n'
    time.sleep(1)
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(timeout=60) == distributed.PREEMPTED_EXIT_CODE, procs[1].stderr.read()[-3000:]
    if mode == 'fail_fast':
      assert procs[0].wait(timeout=60) == distributed.PREEMPTED_EXIT_CODE, procs[0].stderr.read()[-3000:]
  finally:
    for p in procs:
      p.kill()
      p.communicate()


SHARED = """
import sys
from palr_jax import distributed
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
print('verdict:', distributed.check_shared_workdir(sys.argv[3 + int(sys.argv[2])]), flush=True)
"""


@pytest.mark.parametrize('shared', [True, False])
def test_a_workdir_each_host_has_its_own_copy_of_is_refused(tmp_path, shared):
  """Two processes on one machine with two different local folders stand for hosts with node-local
  workdirs: process 0's probe file is not seen by process 1, and both get the same one-line verdict."""
  port = free_port()
  dirs = [str(tmp_path / 'w'), str(tmp_path / 'w')] if shared else [str(tmp_path / 'a'), str(tmp_path / 'b')]
  procs = [subprocess.Popen([sys.executable, '-c', SHARED, f'127.0.0.1:{port}', str(i), *dirs],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path), 'JAX_PLATFORMS': 'cpu'})
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  verdicts = [next(line for line in o[0].splitlines() if line.startswith('verdict:')) for o in outs]
  if shared:
    assert verdicts == ['verdict: None'] * 2
    assert list((tmp_path / 'w').iterdir()) == []  # the probe file is removed
  else:  # each names its own --workdir
    assert verdicts == [f'verdict: --workdir {d}: process(es) [1] of 2 do not see the file process 0 wrote there: '
                        'each host has its own folder; a multi-process job needs a workdir every host shares '
                        '(gs://BUCKET/..., or a shared filesystem)' for d in dirs]


def test_a_finetune_checkpoint_survives_a_new_mesh_not_a_new_global_batch_or_data_order():
  """The mesh (process count, axis sizes) is not in the finetune stage's fingerprint, so a job resumed on
  another topology keeps its checkpoints; the global batch and the data order are."""
  from palr_jax import defaults, fingerprint  # pylint: disable=g-import-not-at-top
  from palr_jax.stages import finetune  # pylint: disable=g-import-not-at-top
  config = defaults.get_config()
  stage = finetune.declare(config)[0]
  want = fingerprint.of(config, stage.hashes)
  other = config.copy_and_resolve_references()
  other.mesh.dcn_data, other.mesh.data, other.mesh.fsdp, other.mesh.tensor = 2, 2, 4, 1
  assert fingerprint.of(other, stage.hashes) == want
  bigger, reordered = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  bigger.train.batch_size *= 2
  reordered.seed += 1
  assert fingerprint.of(bigger, stage.hashes) != want and fingerprint.of(reordered, stage.hashes) != want


FINISHED = """
import sys
from palr_jax import distributed
from palr_jax.stages import profiles
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
# What each process would list: process 1 also sees user 7, whose part process 0 wrote since it listed.
profiles.finished = lambda ctx: {3: {}, 5: {}, **({7: {}} if distributed.jax.process_index() == 1 else {})}
users = profiles.finished_users(None)
todo = [u for u in range(10) if u not in users]
print('share:', users, distributed.share(todo), flush=True)
"""


def test_resumed_profiles_cut_every_share_from_process_0s_list():
  port = free_port()
  procs = [subprocess.Popen([sys.executable, '-c', FINISHED, f'127.0.0.1:{port}', str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path), 'JAX_PLATFORMS': 'cpu'})
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
  shares = [next(line for line in o[0].splitlines() if line.startswith('share:')) for o in outs]
  # Both agree that 3 and 5 are done; together the shares cover every other user once (7 included).
  assert shares == ['share: [3, 5] [0, 2, 6, 8]', 'share: [3, 5] [1, 4, 7, 9]']
