"""Metric writers: the log, TensorBoard event files and `scalars.jsonl` in the workdir (one JSON object per
write: {"step": N, name: value, ...}) so curves can be read back without TensorBoard (the experiment runner plots
validation Dice against step from it).

A local workdir gets TensorBoard events from `TensorBoardWriter`, which needs only the `tensorboard` package's
protos: no TensorFlow import (3-4 s and several hundred MB per process), so training never imports TensorFlow
and logs the same way on machines without it. An object-store workdir (gs://...) uses clu's writer (TensorFlow's
file system), or the log alone where clu is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time


class _LoggingWriter:
  """The subset of clu's MetricWriter this project uses, writing to the log only."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.5g}' for k, v in scalars.items()))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing uses it."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC (little-endian)."""
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', _masked_crc(length)) + data + struct.pack('<I', _masked_crc(data))


class TensorBoardWriter:
  """Scalars to a TensorBoard event file in `logdir`, written with the tensorboard package's protos (no
  TensorFlow); every write also goes to the log, as clu's default writer does."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    self._log = _LoggingWriter()
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(logdir, f'events.out.tfevents.{now:.6f}.{socket.gethostname()}.{os.getpid()}')
    self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with
    self._write(self._event(wall_time=now, file_version='brain.Event:2'))

  def _write(self, event) -> None:
    self._file.write(tfrecord(event.SerializeToString()))

  def write_scalars(self, step: int, scalars: dict) -> None:
    self._log.write_scalars(step, scalars)
    values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._write(self._event(wall_time=time.time(), step=int(step), summary=self._summary(value=values)))
    self._file.flush()  # scalars are written at log steps only: TensorBoard shows them as they come

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class Writer:
  """Forwards to a TensorBoard, clu or logging writer and appends every scalar write to `<workdir>/scalars.jsonl`."""

  def __init__(self, base, jsonl_path: str | None):
    self._base = base
    self._path = jsonl_path

  def write_scalars(self, step: int, scalars: dict) -> None:
    self._base.write_scalars(step, scalars)
    if self._path is not None:
      with open(self._path, 'a') as f:
        f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')

  def flush(self) -> None:
    self._base.flush()

  def close(self) -> None:
    self._base.close()


def create_writer(workdir: str, *, just_logging: bool = False) -> Writer:
  """The log only for `just_logging` (processes other than 0); else the log, TensorBoard events and, for a
  local workdir, scalars.jsonl."""
  local = '://' not in workdir  # object stores (gs://) cannot append: there the clu writer's events suffice
  if just_logging:
    base = _LoggingWriter()
  elif local:
    base = TensorBoardWriter(workdir)
  else:
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
      base = metric_writers.create_default_writer(workdir)
    except ImportError:
      base = _LoggingWriter()
  return Writer(base, os.path.join(workdir, 'scalars.jsonl') if local and not just_logging else None)


def read_scalars(workdir: str) -> list[dict]:
  """The rows of `<workdir>/scalars.jsonl` (empty when there is none)."""
  path = os.path.join(workdir, 'scalars.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class ProgressHook:
  """Logs steps per second every `every_steps` (clu's ReportProgress without its TensorFlow import)."""

  def __init__(self, num_train_steps: int, writer: Writer, every_steps: int):
    self._total, self._writer, self._every = num_train_steps, writer, max(1, every_steps)
    self._last_step, self._last_time = None, None

  def __call__(self, step: int) -> None:
    if step % self._every and step != self._total:
      return
    now = time.perf_counter()
    if self._last_step is not None and step > self._last_step:
      rate = (step - self._last_step) / (now - self._last_time)
      self._writer.write_scalars(step, {'steps_per_sec': rate})
      logging.info('step %d / %d: %.2f steps/s', step, self._total, rate)
    self._last_step, self._last_time = step, now
