"""What a training run reports: model FLOPs of a step, and TensorBoard scalars with a progress bar, written
and read back through etils.epath (local, gs:// or any filesystem epath knows)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
import contextlib
import os
import socket
import struct
import tempfile
import time

from etils import epath
import jax
import tqdm

from palr_jax import files


def _tensorboard():
  """tensorboard's event protos, CRC and record writer, imported when events are written or read: the
  accelerator bench uses `step_flops` on machines without tensorboard."""
  from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c  # pylint: disable=g-import-not-at-top
  from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
  return event_pb2, summary_pb2, masked_crc32c, record_writer


def step_flops(model_config, lora_params: int, batch: int, length: int, logit_positions: int) -> float:
  """Model FLOPs of one LoRA step (forward + backward, remat recompute not counted).

  Frozen matmuls need the forward and the input gradient only: 4 FLOPs per weight per token, not the
  6 of full fine-tuning; adapters add 6 per weight per token; attention adds 12 L T heads head_dim per
  token (PaLM's count); the LM head runs at `logit_positions` per row, not at every token.
  """
  m = model_config
  d, h = m.hidden_size, m.head_dim
  per_layer = d * h * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * d * m.intermediate_size
  tokens = batch * length
  return float(tokens * (4 * m.num_layers * per_layer + 6 * lora_params + 12 * m.num_layers * length * m.num_heads * h)
               + 4 * d * m.vocab_size * batch * logit_positions)


def bar(total: int, desc: str, unit: str = 'user') -> tqdm.tqdm:
  """A progress bar (items/s) for a long loop of a stage, on process 0 only (disabled elsewhere): users
  ranked, profiles written. Advance it with `.update(n)`; close it (or use it as a context manager)."""
  return tqdm.tqdm(total=total, desc=desc, unit=unit, disable=jax.process_index() != 0)


class MetricWriter:
  """TensorBoard scalars and a tqdm bar, from process 0 only (elsewhere every call is a no-op).

  Events are framed by tensorboard's own RecordWriter into an etils.epath file, flushed after every event,
  so a preempted run loses none of its curve. On a local logdir that file is the one TensorBoard reads; on
  any other (gs://, any epath filesystem) it is a local file, copied to the logdir at `sync` (the trainer
  calls it at each checkpoint) and at `close`: an object store rewrites an object whole on every flush,
  which at every step would run into its write-rate limit and upload the curve again and again.
  """

  def __init__(self, logdir: epath.Path, num_steps: int, start_step: int):
    self.active = jax.process_index() == 0
    self.bar = tqdm.tqdm(total=num_steps, initial=start_step, unit='step', disable=not self.active)
    self.remote = None
    if self.active:
      self.event_pb2, self.summary_pb2, _, record_writer = _tensorboard()
      logdir = epath.Path(logdir)
      logdir.mkdir(parents=True, exist_ok=True)
      name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2'
      path = logdir / name
      if not files.is_local(logdir):
        self.remote, self.local_dir = path, tempfile.TemporaryDirectory(prefix='palr-events-')
        path = epath.Path(self.local_dir.name) / name
      self.path = path
      self.file = contextlib.ExitStack()  # epath's gs:// / gfile files are context managers, not files
      self.records = record_writer.RecordWriter(self.file.enter_context(path.open('wb')))
      self._write(self.event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    self.records.write(event.SerializeToString())
    self.records.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    summary_pb2 = self.summary_pb2
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._write(self.event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))
    self.bar.set_postfix({k.split('/')[-1]: f'{v:.4g}' for k, v in scalars.items()}, refresh=False)

  def advance(self) -> None:
    self.bar.update(1)

  def sync(self) -> None:
    """Copies the local events file to a non-local logdir (nothing to do on a local one)."""
    if self.active and self.remote is not None:
      self.records.flush()
      files.copy_file(self.path, self.remote)

  def close(self) -> None:
    self.bar.close()
    if self.active:
      self.records.flush()
      self.file.close()
      if self.remote is not None:
        files.copy_file(self.path, self.remote)
        self.local_dir.cleanup()


def read_events(path) -> list:
  """The events (tensorboard Event protos) of one TensorBoard event file, its TFRecord framing and CRCs
  checked. A record cut short (a writer killed mid-write) ends the list; a damaged one raises."""
  event_pb2, _, masked_crc32c, _ = _tensorboard()
  path = epath.Path(path)
  data, events, at = path.read_bytes(), [], 0
  while at + 12 <= len(data):
    header = data[at:at + 8]
    (length,), (header_crc,) = struct.unpack('<Q', header), struct.unpack('<I', data[at + 8:at + 12])
    if header_crc != masked_crc32c(header):
      raise ValueError(f'{path}: damaged record header at byte {at}')
    if at + 16 + length > len(data):
      break
    body = data[at + 12:at + 12 + length]
    if struct.unpack('<I', data[at + 12 + length:at + 16 + length])[0] != masked_crc32c(body):
      raise ValueError(f'{path}: damaged record at byte {at}')
    events.append(event_pb2.Event.FromString(body))
    at += 16 + length
  return events


def scalars(paths: Iterable, tag: str) -> dict[int, float]:
  """{step: value} of `tag` over event files in the order given (a resumed run rewrites its steps: the
  later file wins)."""
  out = {}
  for path in paths:
    for event in read_events(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[int(event.step)] = (value.simple_value if value.HasField('simple_value')
                                  else float(value.tensor.float_val[0]))
  return out
