"""benchmarks/device.sh (the accelerator check) run here on CPU at a tiny size, from a JPEG pack and without
TFDS in the loop: benchmarks.run's JSON lines (mirrored to --out) and the short run's test summary. No timing
asserts."""

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT
from unisegdiff_jax import packs

EXPECTED = {'train/compile_s', 'train/first_call_s', 'train/step_s', 'train/images_per_s', 'train/flops_per_step',
            'train/data_wait_fraction', 'inference/s_per_nfe', 'inference/s_per_image', 'flops/denoiser_per_nfe',
            'flops/feature_projection_fraction'}


@pytest.fixture(scope='module')
def bench(tiny_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp('bench')
  assert packs.main(['--datasets=synthetic_lesions/tiny', '--image_size=32', '--image_format=jpeg',
                     f'--out={root / "packs"}', f'--data_dir={tiny_data_dir}']) == 0
  out = root / 'out'
  env = dict(os.environ, JAX_PLATFORMS='cpu', OUT=str(out), CONFIG='configs/synthetic.py:smoke',
             PACKS=str(root / 'packs'), DTYPES='float32', BENCH_ONLY='train,inference,flops', BENCH_STEPS='1',
             BENCH_DDIM='10', BENCH_ARGS='--config.sampling.batch_size=2', PRE_STEPS='2', TRAIN_STEPS='4',
             RUN_ARGS='--config.pretrain.enabled=False')  # the short run: phase 1 only (the loop is the same)
  done = subprocess.run(['bash', 'benchmarks/device.sh'], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stdout[-4000:]
  return done.stdout.splitlines(), out


def _records(bench):
  with open(bench[1] / 'bench_float32.jsonl') as f:
    return [json.loads(line) for line in f.read().splitlines()]


def test_every_line_is_a_measurement(bench):
  records = _records(bench)
  assert records
  for record in records:
    assert {'name', 'value', 'unit', 'device', 'config', 'num_devices', 'dtype'} <= set(record), record
    assert 'error' not in record, record
    assert record['config'] == 'configs/synthetic.py:smoke' and record['dtype'] == 'float32'
  names = [r['name'] for r in records]
  assert EXPECTED <= set(names)
  assert names.count('inference/s_per_nfe') == 2 and names.count('inference/s_per_image') == 3


def test_out_file_has_the_printed_lines(bench):
  printed = [line for line in bench[0] if line.startswith('{"name"')]
  with open(bench[1] / 'bench_float32.jsonl') as f:
    assert f.read().splitlines() == printed


def test_values_are_sane(bench):
  records = {r['name']: r for r in _records(bench)}
  assert records['train/step_s']['value'] > 0
  flops = records['train/flops_per_step']['value']
  assert flops is None or flops > 0
  assert 0.0 <= records['train/data_wait_fraction']['value'] <= 1.0


def test_the_short_run_trained_and_evaluated_from_the_pack(bench):
  with open(bench[1] / 'kvasir256_summary.json') as f:
    summary = json.load(f)
  assert summary['checkpoint_step'] == 4 and 0.0 <= summary['mean']['dice'] <= 1.0
  assert list(summary['datasets']) == ['synthetic_lesions']
  assert 'hardware: ' in (bench[1] / 'log.txt').read_text()


def test_table_has_a_row_per_line_with_rounded_values(tmp_path):
  from benchmarks import table  # pylint: disable=g-import-not-at-top
  lines = [{'name': 'train/step_s', 'value': 0.123456, 'unit': 's', 'device': 'cpu', 'dtype': 'float32',
            'num_devices': 2, 'config': 'c', 'overrides': {}, 'steps': 10, 'images_per_s': 129.61234},
           {'name': 'memory/device_peak', 'value': None, 'unit': None, 'device': 'cpu', 'dtype': 'float32',
            'num_devices': 1, 'error': 'not reported'}]
  path = tmp_path / 'b.jsonl'
  path.write_text('\n'.join(json.dumps(l) for l in lines) + '\n')
  rows = table.table([str(path)]).splitlines()
  assert len(rows) == 4
  assert rows[2] == '| `train/step_s` | 0.123 s | cpu, float32, 2 | steps=10, images_per_s=130 |'
  assert rows[3] == '| `memory/device_peak` | error: not reported | cpu, float32, 1 |  |'
