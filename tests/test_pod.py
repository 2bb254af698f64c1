"""The main job as a pod: `python -m palr_jax.main` on the tiny pipeline (LLM profiles, two fine-tuned
variants, ranking, report, export) as 2 processes x 4 CPU devices joined by jax.distributed on 127.0.0.1,
against the same command as 1 process x 8 devices. The pod gets the same results, rankings, profiles and
adapters; SIGTERM during training exits with the preemption code and the rerun resumes to the same
results; an error in any one process ends every process, non-zero, within a minute."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from palr_jax import distributed
from palr_jax.train import progress
from tests import pipeline_fixtures
from tests.test_multiprocess import free_port

pytest.importorskip('transformers')

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILD = ROOT / 'tests' / 'pod_child.py'
SAME = ('results.json', 'predictions/test.jsonl', 'rankings.json', 'profiles.jsonl', 'candidates/train.jsonl',
        'export/peft/adapter_config.json')


class Job:
  """The processes of one job, each logging to W/../<name>.<process>.log."""

  def __init__(self, fixtures, workdir, processes: int, hook: str = '', flags=()):
    self.logs = [workdir.parent / f'{workdir.name}.{hook.split(":")[0] or "run"}.{i}.log' for i in range(processes)]
    port = free_port()
    self.procs = []
    for i in range(processes):
      env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
             'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': str(8 // processes), 'PALR_TEST_HOOK': hook}
      if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
      with open(self.logs[i], 'w') as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, str(CHILD), '--config', f'{ROOT}/tests/pipeline_fixtures.py:{fixtures},llm',
             '--workdir', str(workdir), *flags], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))

  def output(self, i: int) -> str:
    return self.logs[i].read_text()

  def outputs(self) -> str:
    return '\n'.join(self.output(i)[-4000:] for i in range(len(self.procs)))

  def wait(self, timeout: float = 900) -> tuple[list[int], list[float]]:
    """(exit codes, exit times); kills every process and fails when they outlive `timeout`."""
    deadline, ended = time.time() + timeout, [None] * len(self.procs)
    while None in ended:
      for i, p in enumerate(self.procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.time()
      if time.time() > deadline:
        for p in self.procs:
          p.kill()
        pytest.fail('the job outlived its timeout:\n' + self.outputs())
      time.sleep(0.2)
    return [p.returncode for p in self.procs], ended

  def succeed(self) -> None:
    codes, _ = self.wait()
    assert codes == [0] * len(codes), self.outputs()


def assert_all_end_within_a_minute(job: Job, culprit: int, watchdog: bool) -> None:
  """Every process exits non-zero within a minute of the first; with `watchdog`, the others were ended by
  fail_fast's watchdog (else their own collective with the dead process may fail first)."""
  codes, ended = job.wait()
  assert all(c != 0 for c in codes), codes
  assert max(ended) - min(ended) < 60, ended
  assert 'injected failure' in job.output(culprit)
  for i in set(range(len(codes))) - {culprit}:
    assert ('another process failed' in job.output(i)) or not watchdog, job.output(i)[-3000:]


@pytest.fixture(scope='module')
def fixtures(tmp_path_factory):
  folder = tmp_path_factory.mktemp('fixtures')
  pipeline_fixtures.write_fixtures(folder)
  return folder


@pytest.fixture(scope='module')
def one(fixtures):
  """The same command as one process with 8 devices: the reference."""
  workdir = fixtures / 'one'
  Job(fixtures, workdir, 1).succeed()
  return workdir


def assert_same_outputs(workdir, reference) -> None:
  """SAME byte for byte, except the LLM's candidate scores in rankings.json: the mesh differs (2 x 4
  devices against 1 x 8), so their sums run in another order (~1e-7 relative)."""
  for name in SAME:
    got, want = ((w / name).read_text() for w in (workdir, reference))
    if name != 'rankings.json':
      assert got == want, name
      continue
    got, want = json.loads(got), json.loads(want)
    for method, splits in want['methods'].items():
      for which, entry in splits.items():
        if isinstance(entry, dict) and 'scores' in entry:
          a, b = got['methods'][method][which].pop('scores'), entry.pop('scores')
          assert len(a) == len(b), (method, which)
          for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), rtol=1e-5, atol=1e-5)
    assert got == want


def assert_same_tensors(workdir, reference, name: str) -> None:
  got, want = (safetensors.numpy.load_file(w / name) for w in (workdir, reference))
  assert sorted(got) == sorted(want) and want, name
  for key, value in want.items():
    assert np.abs(value).max() > 0, key
    np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6, err_msg=f'{name}: {key}')


def loss_curve(workdir, variant='palr_v1'):
  return progress.scalars(sorted((workdir / variant / 'tensorboard').iterdir()), 'train/loss')


def test_pod_gets_the_results_of_one_process_then_a_failure_ends_every_process(fixtures, one, tmp_path):
  workdir = tmp_path / 'pod'
  job = Job(fixtures, workdir, 2, 'own_inputs')  # each host its own copy of the model: other mtimes
  job.succeed()
  assert_same_outputs(workdir, one)
  assert 'profile' in json.loads((workdir / 'profiles.jsonl').read_text().splitlines()[0])
  # Trained on the same global mesh, the adapters differ by the order of gloo's sums only (~1e-9); the
  # merged export, written by process 0 from its own 4 devices, likewise.
  for variant in ('palr_v1', 'palr_v2'):
    for step in (2, 4):
      assert_same_tensors(workdir, one, f'{variant}/adapters/step_{step}/adapter_model.safetensors')
    np.testing.assert_allclose(list(loss_curve(workdir, variant).values()), list(loss_curve(one, variant).values()),
                               rtol=1e-5)
  assert_same_tensors(workdir, one, 'export/merged/model.safetensors')
  leftovers = [str(p.relative_to(workdir)) for p in workdir.rglob('*') if '.tmp-' in p.name
               or p.name in ('rank_parts', 'profiles.parts')]
  assert not leftovers
  assert 'running' not in job.output(1)  # process 0 alone reports the stages

  # Process 0 fails in a host-only stage while process 1 waits at its barrier.
  failing = Job(fixtures, workdir, 2, 'fail_report', ['--rerun', 'report'])
  assert_all_end_within_a_minute(failing, culprit=0, watchdog=True)
  assert not (workdir / 'report.fingerprint.json').exists()


def test_preempted_pod_resumes_to_the_same_results(fixtures, one, tmp_path):
  workdir = tmp_path / 'pod'
  # Process 1 fails at its second training batch while process 0 waits in the step's collectives.
  assert_all_end_within_a_minute(Job(fixtures, workdir, 2, 'fail_train'), culprit=1, watchdog=False)

  # SIGTERM reaches both processes during palr_v1's training: they save at the same step and exit 75.
  job = Job(fixtures, workdir, 2, f'slow:{tmp_path}')
  deadline = time.time() + 600
  while not all((tmp_path / f'training.{i}').exists() for i in range(2)):
    assert time.time() < deadline and all(p.poll() is None for p in job.procs), job.output(0)[-5000:]
    time.sleep(0.2)
  for p in job.procs:
    p.send_signal(signal.SIGTERM)
  codes, _ = job.wait()
  assert codes == [distributed.PREEMPTED_EXIT_CODE] * 2, job.output(0)[-5000:]
  assert 'rerun the same command to resume' in job.output(0)
  assert not (workdir / 'finetune_palr_v1.fingerprint.json').exists()
  assert (workdir / 'profiles.fingerprint.json').exists()
  assert sorted(p.name for p in (workdir / 'palr_v1' / 'checkpoints').iterdir()) == ['2', '3']

  resumed = Job(fixtures, workdir, 2)
  resumed.succeed()
  # The terminal says what the run resumes; library INFO logs (absl lines from .py files) went to W/logs.
  assert 'finetune_palr_v1: resumes training from its checkpoint at step 3 of 4' in resumed.output(0)
  assert not re.search(r'^I\d{4} [\d:.]+ +\d+ \w+\.py:\d+\]', resumed.output(0), re.M), resumed.output(0)[-3000:]
  logs = ''.join(p.read_text() for p in (workdir / 'logs').glob('*/palr_jax.main.*.log.INFO.*'))
  assert 'train: resumed from step 3' in logs
  assert sorted(p.name for p in (workdir / 'logs').iterdir()) == ['0', '1']  # W/logs/<process>
  for variant in ('palr_v1', 'palr_v2'):  # the preemption save is gone once resumed from
    assert sorted(p.name for p in (workdir / variant / 'checkpoints').iterdir()) == ['2', '4']
  assert 'retriever: current, skipped' in resumed.output(0)
  assert_same_outputs(workdir, one)
  curve, want = loss_curve(workdir), loss_curve(one)
  assert sorted(curve) == sorted(want) == [1, 2, 3, 4]
  np.testing.assert_allclose([curve[s] for s in want], list(want.values()), rtol=1e-5)


def test_pods_doc_says_what_each_process_does():
  """docs/pods.md's table is the stages' own declaration (`Stage.per_process`), so it cannot drift from them."""
  from palr_jax import defaults, main  # pylint: disable=g-import-not-at-top
  from palr_jax.stages import base  # pylint: disable=g-import-not-at-top
  table = base.process_table(main.stages(defaults.get_config()))
  assert '| `rank` | sharded |' in table
  assert table in (ROOT / 'docs' / 'pods.md').read_text()
