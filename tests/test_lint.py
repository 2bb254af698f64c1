"""`ruff check` (rules in pyproject.toml) is clean over the package, configs, tests and benchmarks."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff(*args, cwd=ROOT):
  return subprocess.run([sys.executable, '-m', 'ruff', *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_check_is_clean():
  out = _ruff('check', '--output-format', 'concise', 'palr_jax', 'configs', 'tests', 'bench', 'launch')
  assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_finds_a_planted_unused_import(tmp_path):
  """The check reads this project's rules: an unused import in a file under the same config fails it."""
  (tmp_path / 'pyproject.toml').write_text((ROOT / 'pyproject.toml').read_text())
  (tmp_path / 'bad.py').write_text('import os\n')
  out = _ruff('check', '--output-format', 'concise', 'bad.py', cwd=tmp_path)
  assert out.returncode == 1 and 'F401' in out.stdout, out.stdout + out.stderr
