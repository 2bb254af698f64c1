"""TensorFlow for tf.data only: it shares the process with JAX and must never take GPU/TPU memory."""
import contextlib
import sys

# TensorFlow's import eagerly imports Keras (`keras.src.optimizers`, which pulls in matplotlib) unless that
# import fails, which it tolerates. tf.data needs neither: blocked for TF's import only, it saves import
# time and memory (bench/RESULTS.md, ":quick end to end"), and `import keras` (or `tf.keras`) still works
# afterwards.
_KERAS_EAGER = 'keras.src.optimizers'


def tensorflow():
  """`tensorflow`, with every accelerator hidden from it (a no-op once TF has initialized its devices)."""
  if 'tensorflow' not in sys.modules and _KERAS_EAGER not in sys.modules:
    sys.modules[_KERAS_EAGER] = None  # an ImportError for TF's eager `import_module`
    try:
      import tensorflow as tf
    finally:
      del sys.modules[_KERAS_EAGER]
  import tensorflow as tf
  for kind in ('GPU', 'TPU'):
    with contextlib.suppress(RuntimeError, ValueError):  # TF already initialized, or no such kind
      tf.config.set_visible_devices([], kind)
  return tf
