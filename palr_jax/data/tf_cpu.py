"""TensorFlow for tf.data only: it shares the process with JAX and must never take GPU/TPU memory."""
import contextlib


def tensorflow():
  """`tensorflow`, with every accelerator hidden from it (a no-op once TF has initialized its devices)."""
  import tensorflow as tf
  for kind in ('GPU', 'TPU'):
    with contextlib.suppress(RuntimeError, ValueError):  # TF already initialized, or no such kind
      tf.config.set_visible_devices([], kind)
  return tf
