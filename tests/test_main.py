"""main.py end to end on the smoke config: outputs, resume, config overrides and one-line errors."""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.conftest import xla_flags


def _main(*args, env=None, timeout=600):
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def smoke_run(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  args = ['--config=configs/synthetic.py:smoke', f'--workdir={workdir}',
          f'--config.data.data_dir={tiny_data_dir}']
  first = _main(*args)
  assert first.returncode == 0, first.stderr[-4000:]
  return workdir, args, first


def test_train_writes_the_summary_contract(smoke_run):
  workdir, _, first = smoke_run
  with open(os.path.join(workdir, 'eval', 'test', 'summary.json')) as f:
    summary = json.load(f)
  entry = summary['datasets']['synthetic_lesions']
  assert entry['n'] == 8
  for block in (entry, summary['mean']):
    assert 0.0 <= block['dice'] <= 1.0 and 0.0 <= block['iou'] <= block['dice'] + 1e-9
    assert block['hd95'] >= 0.0
  assert summary['nfe_per_image'] == 1 and summary['checkpoint_step'] in (10, 20)  # the default: 1 DDIM step
  assert summary['seconds_per_image'] > 0
  with open(os.path.join(workdir, 'eval', 'test', 'per_case.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8 and {'case_id', 'dice', 'iou', 'hd95'} <= set(rows[0])
  assert abs(sum(float(r['dice']) for r in rows) / 8 - entry['dice']) < 1e-5
  assert os.path.getsize(os.path.join(workdir, 'eval', 'test', 'overlays.png')) > 0
  assert 'Test Dice' in first.stdout


def test_rerun_resumes_from_the_latest_checkpoint(smoke_run):
  """The same command again: phase 0 is not retrained and phase 1 resumes at its last step (20) instead of
  starting over (training on after a resume, and resuming after SIGTERM / kill -9, are test_reliability's)."""
  workdir, args, _ = smoke_run
  second = _main(*args)
  assert second.returncode == 0, second.stderr[-4000:]
  assert 'Resuming diffusion from checkpoint step 20' in second.stdout
  assert 'pretrain: already trained' in second.stderr or 'Resuming pretrain' in second.stdout
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())[-1] == 20
  assert 'Test Dice' in second.stdout


def test_eval_mode_evaluates_a_chosen_checkpoint(smoke_run):
  workdir, args, _ = smoke_run
  out = _main(*args, '--mode=eval', '--checkpoint_step=20', '--config.sampling.sampler=ddim',
              '--config.sampling.ddim_steps=4')
  assert out.returncode == 0, out.stderr[-4000:]
  with open(os.path.join(workdir, 'eval', 'test', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['checkpoint_step'] == 20 and summary['nfe_per_image'] == 4 and summary['sampler'] == 'ddim'


@pytest.mark.parametrize('override, env, message', [
    ('--config.train.global_batch_sise=8', None, 'global_batch_sise'),
    ("--config.diffusion.stages=500:1000 x0; 0:400 eps", None, 'gap [400, 500)'),
    ('--config.data.image_size=33', None, 'cannot be halved'),
    ('--config.train.global_batch_size=12', {'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=8')},
     'not divisible by the 8 devices'),
])
def test_bad_input_gets_one_line(tmp_path, tiny_data_dir, override, env, message):
  out = _main('--config=configs/synthetic.py:smoke', f'--workdir={tmp_path}',
              f'--config.data.data_dir={tiny_data_dir}', override, env=env, timeout=180)
  assert out.returncode != 0
  assert 'Traceback' not in out.stderr
  lines = [l for l in out.stderr.splitlines() if message in l]
  assert lines, out.stderr[-2000:]


def test_missing_dataset_names_the_build_command(tmp_path):
  out = _main('--config=configs/synthetic.py:smoke', f'--workdir={tmp_path}',
              f'--config.data.data_dir={tmp_path}/tfds', '--config.data.datasets=kvasir_seg', timeout=180)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert 'python -m data_prep.build kvasir_seg' in out.stderr


def test_a_finished_phase0_can_be_reused_by_another_run(smoke_run, tmp_path):
  """A shorter phase 1 than the smoke run's (run length is not compiled in: the smoke run's programs serve)."""
  workdir, args, _ = smoke_run
  other = str(tmp_path / 'reuse')
  out = _main('--config=configs/synthetic.py:smoke', f'--workdir={other}', args[2],
              f'--config.pretrain.checkpoint={workdir}', '--config.train.num_steps=4',
              '--config.train.eval_every_steps=4', '--config.train.checkpoint_every_steps=4')
  assert out.returncode == 0, out.stderr[-4000:]
  assert f'Using the pre-trained encoder of {os.path.join(workdir, "pretrain", "checkpoints")}' in out.stdout
  assert not os.path.exists(os.path.join(other, 'pretrain', 'checkpoints'))  # phase 0 was not rerun
  with open(os.path.join(other, 'eval', 'test', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['pretrain_mode'] == 'external finetune'  # the default encoder mode
  assert 0 <= summary['pretrained_segmenter']['mean']['dice'] <= 1
