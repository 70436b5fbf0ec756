"""The metric writers: TensorBoard event files written without TensorFlow, read back by TensorBoard's own
reader; scalars.jsonl; no TensorFlow import on the training path."""

import glob
import json
import os
import subprocess
import sys

from tests.conftest import ROOT
from unisegdiff_jax import writers


def test_crc32c_matches_the_published_check_values():
  assert writers.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)
  assert writers.crc32c(b'') == 0
  assert writers.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_tensorboard_reads_back_every_scalar(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  writer = writers.create_writer(str(tmp_path))
  for step in (5, 10, 15):
    writer.write_scalars(step, {'train/loss': 1.0 / step, 'val/dice': step / 100.0})
  writer.close()
  events = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert len(events) == 1
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert sorted(acc.Tags()['scalars']) == ['train/loss', 'val/dice']
  loss = acc.Scalars('train/loss')
  assert [e.step for e in loss] == [5, 10, 15]
  assert [round(e.value, 6) for e in loss] == [round(1.0 / s, 6) for s in (5, 10, 15)]
  with open(tmp_path / 'scalars.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert rows == writers.read_scalars(str(tmp_path))
  assert [r['step'] for r in rows] == [5, 10, 15] and rows[1]['val/dice'] == 0.1


def test_a_corrupted_record_is_detected_by_its_crc(tmp_path):
  """The framing's CRCs are real: TensorBoard's reader accepts the file, and rejects a flipped byte."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  writer = writers.TensorBoardWriter(str(tmp_path))
  writer.write_scalars(1, {'x': 2.0})
  writer.close()
  assert [e.step for e in event_file_loader.EventFileLoader(writer.path).Load()] == [0, 1]
  data = bytearray(open(writer.path, 'rb').read())
  data[-6] ^= 0xFF  # inside the last record's payload
  with open(writer.path, 'wb') as f:
    f.write(bytes(data))
  assert [e.step for e in event_file_loader.EventFileLoader(writer.path).Load()] == [0]


def test_other_processes_only_log(tmp_path):
  writer = writers.create_writer(str(tmp_path), just_logging=True)
  writer.write_scalars(1, {'x': 1.0})
  writer.close()
  assert os.listdir(tmp_path) == []


def test_the_writer_does_not_import_tensorflow(tmp_path):
  script = ('import sys; from unisegdiff_jax import writers; w = writers.create_writer(sys.argv[1]); '
            "w.write_scalars(1, {'x': 1.0}); w.close(); print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == 'False'
