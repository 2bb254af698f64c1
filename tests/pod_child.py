"""One process of the main job (`python -m palr_jax.main`), as tests/test_pod.py launches it, with test
hooks chosen by $PALR_TEST_HOOK (none: the plain command):

  slow:DIR      training palr_v1, create DIR/training.<process> when step 2's batch is drawn, then take
                3 s per batch: a test sends SIGTERM while training runs (the processes stop at step 3)
  fail_train    process 1 raises at palr_v1's second batch, while process 0 waits in the step's collectives
  fail_report   process 0 raises in the report stage, while process 1 waits at the stage's barrier
  own_inputs    process 1 sees its own copy of the input files (other mtimes), as a host of a pod does

  python tests/pod_child.py --config tests/pipeline_fixtures.py:FOLDER,llm --workdir W [main flags]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
import jax  # noqa: E402

from palr_jax import main, runner  # noqa: E402
from palr_jax.stages import report  # noqa: E402
from palr_jax.train import loop  # noqa: E402


class Batches:
  """A training iterator that calls `hook(batches drawn)` before each batch."""

  def __init__(self, inner, hook):
    self.inner, self.hook, self.drawn = inner, hook, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.drawn += 1
    self.hook(self.drawn)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def hook_training(hook) -> None:
  real = loop.train

  def train(config, workdir, model, train_iter, *args, **kwargs):
    if os.fspath(workdir).endswith('palr_v1'):
      train_iter = Batches(train_iter, hook)
    return real(config, workdir, model, train_iter, *args, **kwargs)
  loop.train = train


def fail(where: str):
  raise RuntimeError(f'injected failure in process {jax.process_index()} ({where})')


def install(hook: str) -> None:
  name, _, arg = hook.partition(':')
  if name == 'slow':
    def slow(drawn):
      if drawn == 2:
        open(os.path.join(arg, f'training.{jax.process_index()}'), 'w').close()
      if drawn >= 2:
        time.sleep(3)
    hook_training(slow)
  elif name == 'fail_train':
    hook_training(lambda drawn: jax.process_index() == 1 and drawn == 2 and fail('training'))
  elif name == 'fail_report':
    real = report.run
    report.run = lambda ctx: fail('report') if jax.process_index() == 0 else real(ctx)  # declare reads it
  elif name == 'own_inputs':
    real_identity = runner.input_identity
    # Each host sees its own copy of the inputs: the identities differ by process (process 0's decides).
    runner.input_identity = lambda paths, *args: [[row[0], f'{row[1]}+{jax.process_index()}']
                                                  for row in real_identity(paths, *args)]
  elif name:
    raise ValueError(f'PALR_TEST_HOOK={hook!r}')


if __name__ == '__main__':
  install(os.environ.get('PALR_TEST_HOOK', ''))
  main._define_flags()  # pylint: disable=protected-access
  app.run(main.main)
