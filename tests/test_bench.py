"""The bench scripts' own rules: the accelerator run works end to end (tiny, on CPU; it fails if anything
imported TensorFlow, tensorflow-datasets, gguf or tensorboard, which the accelerator image lacks), and the
train-step bench refuses to measure on a busy machine without touching what is recorded."""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

def test_accelerator_cpu_smoke_writes_every_section(tmp_path):
  results = tmp_path / 'RESULTS.md'
  results.write_text('# Benchmarks\n\n## Earlier\n\nkept\n')
  env = dict(os.environ, PYTHON=sys.executable)
  proc = subprocess.run([str(REPO / 'bench' / 'accelerator.sh'), '--cpu-smoke', '--results', str(results)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = results.read_text()
  assert '## Earlier\n\nkept' in text
  section = text.split('## Accelerator: cpu (cpu smoke)')[1]
  for name in ('Logit parity', 'LoRA train step: tiny', 'Ranking users/s', 'Profile generation'):
    assert f'**{name}' in section, name
  assert 'FAILED' not in section and 'skipped' not in section
  assert section.count('| yes |') == 3  # the three parity rows
  assert 'All checks passed.' in section  # includes: no TensorFlow, gguf or tensorboard was imported


def test_accelerator_refuses_a_cpu_only_machine_without_smoke(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHON=sys.executable)
  proc = subprocess.run([str(REPO / 'bench' / 'accelerator.sh'), '--results', str(tmp_path / 'R.md')],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'no accelerator' in proc.stderr
  assert not (tmp_path / 'R.md').exists()


def test_train_step_bench_refuses_a_busy_machine(tmp_path):
  results = tmp_path / 'RESULTS.md'
  results.write_text('# Benchmarks\n\n## Train step\n\nthe old table\n')
  before = results.read_text()
  proc = subprocess.run([sys.executable, str(REPO / 'bench' / 'train_step.py'), '--max-load', '-1', '--wait-s', '0',
                         '--results', str(results)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3
  assert 'would not be a measurement' in proc.stderr and 'Nothing was recorded' in proc.stderr
  assert results.read_text() == before
