"""The process's memory between stages: hand freed heap back to the OS, and measure each stage's peak RSS."""
from __future__ import annotations


def release_memory() -> None:
  """Between stages: drops compiled executables and garbage, and hands freed heap back to the OS, so the
  next stage's peak is its own (a stage's compiled shapes are not reused by the next one)."""
  import ctypes
  import gc

  import jax
  gc.collect()
  jax.clear_caches()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def reset_peak_rss() -> None:
  """Restarts the process's peak-RSS counter (Linux: /proc/self/clear_refs), so each stage reports its own."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def peak_rss_gib() -> float:
  """The process's peak resident memory since the last `reset_peak_rss` (Linux), else since it started."""
  try:
    with open('/proc/self/status') as f:
      return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 2**20
  except (OSError, StopIteration):
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
