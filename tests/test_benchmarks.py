"""benchmarks.run on the smoke config: one JSON line per measurement, mirrored to --out. No timing asserts."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXPECTED = {'train/compile_s', 'train/first_call_s', 'train/step_s', 'train/images_per_s', 'train/flops_per_step',
            'train/data_wait_fraction', 'inference/s_per_nfe', 'inference/s_per_image'}


@pytest.fixture(scope='module')
def bench(tiny_data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('bench') / 'bench.jsonl')
  done = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--config=configs/synthetic.py:smoke',
       f'--config.data.data_dir={tiny_data_dir}', '--only=train,inference', '--steps=3', f'--out={out}'],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  return done.stdout.splitlines(), out


def test_every_line_is_a_measurement(bench):
  lines, _ = bench
  records = [json.loads(line) for line in lines]
  assert records
  for record in records:
    assert {'name', 'value', 'unit', 'device', 'config', 'num_devices', 'dtype'} <= set(record), record
    assert 'error' not in record, record
    assert record['config'] == 'configs/synthetic.py:smoke' and record['dtype'] == 'float32'
  names = [r['name'] for r in records]
  assert EXPECTED <= set(names)
  assert names.count('inference/s_per_nfe') == 2 and names.count('inference/s_per_image') == 3


def test_out_file_has_the_same_lines(bench):
  lines, out = bench
  with open(out) as f:
    assert f.read().splitlines() == lines


def test_values_are_sane(bench):
  records = {r['name']: r for r in map(json.loads, bench[0])}
  assert records['train/step_s']['value'] > 0
  flops = records['train/flops_per_step']['value']
  assert flops is None or flops > 0
  assert 0.0 <= records['train/data_wait_fraction']['value'] <= 1.0
