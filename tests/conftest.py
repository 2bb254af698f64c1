"""Test session set-up: 8 simulated CPU devices, TensorFlow kept off accelerators."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

# Must run before any device is touched.
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_matmuls():
  with jax.default_matmul_precision('float32'):
    yield


@pytest.fixture(autouse=True, scope='session')
def _auto_precision_is_float32():
  """model.dtype 'auto' (the default) is float32 in every test on every machine, module-scoped fixtures
  included: the tests compare with fp32 references. tests/test_precision.py fakes the machine itself."""
  from palr_jax import precision  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(precision, 'detect', lambda: ('float32', 'tests: float32 on every machine'))
    yield
