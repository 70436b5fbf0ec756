"""Metric writers: clu's (TensorBoard) where clu and TensorFlow are installed, a logging fallback where not,
plus `scalars.jsonl` in the workdir (one JSON object per write: {"step": N, name: value, ...}) so curves can
be read back without TensorBoard (the experiment runner plots validation Dice against step from it).
"""

from __future__ import annotations

import json
import logging
import os
import time


class _LoggingWriter:
  """The subset of clu's MetricWriter this project uses, writing to the log only."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.5g}' for k, v in scalars.items()))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class Writer:
  """Forwards to a clu (or logging) writer and appends every scalar write to `<workdir>/scalars.jsonl`."""

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
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
    base = metric_writers.create_default_writer(workdir, just_logging=just_logging)
  except ImportError:
    base = _LoggingWriter()
  local = '://' not in workdir  # object stores (gs://) cannot append: there the clu writer's events suffice
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
