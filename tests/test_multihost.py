"""Multi-host, on one machine: two `main.py` processes (jax.distributed with a localhost coordinator, gloo CPU
collectives, one CPU device each) against one process with two CPU devices, on the same global mesh shape.

They must train to the same parameters, write the same summary.json and the same predictions, and a SIGTERM
to one of the two processes must stop both at the same step with one checkpoint.
"""

import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from PIL import Image

from tests import test_reliability as rel
from tests.conftest import xla_flags
from unisegdiff_jax import checkpointing

# Phase 1 only (phase 0 runs the same loop and engine; its summary is not compared below), short; eval small.
# log_every 2 makes every second step a sync step.
RUN = {'pretrain.enabled': False,
       'train.num_steps': 6, 'train.eval_every_steps': 6, 'train.checkpoint_every_steps': 6,
       'train.log_every_steps': 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int, process: int | None = None, port: int | None = None) -> dict:
  env = dict(rel._env(), XLA_FLAGS=xla_flags(f'--xla_force_host_platform_device_count={devices}'))  # pylint: disable=protected-access
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(key, None)
  if process is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(process))
  return env


def _start(args, env, log_dir, name):
  out = open(os.path.join(log_dir, f'{name}.out'), 'w')  # pylint: disable=consider-using-with
  err = open(os.path.join(log_dir, f'{name}.err'), 'w')  # pylint: disable=consider-using-with
  return subprocess.Popen(args, cwd=rel.ROOT, env=env, stdout=out, stderr=err), out, err


def _run_pair(args_of, log_dir, name, timeout=420):
  """Runs args_of(process) as processes 0 and 1 of one job; returns their (returncode, stdout, stderr)."""
  port = _free_port()
  started = [_start(args_of(p), _env(1, p, port), log_dir, f'{name}{p}') for p in (0, 1)]
  results = []
  try:
    for proc, out, err in started:
      proc.wait(timeout=timeout)
      out.close()
      err.close()
  finally:
    for proc, _, _ in started:
      if proc.poll() is None:
        proc.kill()
  for p, (proc, _, _) in enumerate(started):
    with open(os.path.join(log_dir, f'{name}{p}.out')) as o, open(os.path.join(log_dir, f'{name}{p}.err')) as e:
      results.append((proc.returncode, o.read(), e.read()))
  return results


def _ema(workdir, config):
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), async_save=False)
  step = manager.latest_step()
  local = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved from 2 devices, read onto this one
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                                    rel._abstract_state(config))  # pylint: disable=protected-access
  state, _ = checkpointing.restore(manager, step, abstract, with_data_iter=False)
  manager.close()
  return step, state.ema_params


def _comparable(summary):
  drop = ('seconds_per_image', 'device')
  out = {k: v for k, v in summary.items() if k not in drop}
  out.pop('pretrained_segmenter', None)
  return out


@pytest.fixture(scope='module')
def runs(tiny_data_dir, tmp_path_factory):
  """One process (2 devices) and two processes (1 device each): train + test evaluation, then predict."""
  root = tmp_path_factory.mktemp('multihost')
  logs = str(root)
  single, double = str(root / 'single'), str(root / 'double')
  done = subprocess.run(rel._main_args(tiny_data_dir, single, **RUN), cwd=rel.ROOT, env=_env(2),  # pylint: disable=protected-access
                        capture_output=True, text=True, timeout=420)
  assert done.returncode == 0, done.stderr[-3000:]
  pair = _run_pair(lambda p: rel._main_args(tiny_data_dir, double, **RUN), logs, 'train')  # pylint: disable=protected-access
  for code, _, err in pair:
    assert code == 0, err[-3000:]
  images = root / 'images'
  images.mkdir()
  rs = np.random.RandomState(0)
  for i in range(3):  # three images, sampling batch 8: one padded batch
    Image.fromarray((rs.rand(20 + i, 24, 3) * 255).astype(np.uint8)).save(images / f'img{i}.png')
  predict = lambda workdir, out: [*rel._main_args(tiny_data_dir, workdir, **RUN), '--mode=predict',  # pylint: disable=protected-access
                                  f'--input={images}', f'--output={out}']
  done = subprocess.run(predict(single, str(root / 'pred_single')), cwd=rel.ROOT, env=_env(2),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  pair = _run_pair(lambda p: predict(double, str(root / 'pred_double')), logs, 'predict', timeout=300)
  for code, _, err in pair:
    assert code == 0, err[-3000:]
  return root


def test_two_processes_train_to_the_same_parameters_and_summary(runs, smoke_config):
  config = rel._config(smoke_config, **RUN)  # pylint: disable=protected-access
  (step_1, ema_1), (step_2, ema_2) = _ema(str(runs / 'single'), config), _ema(str(runs / 'double'), config)
  assert step_1 == step_2 == RUN['train.num_steps']
  for a, b in zip(jax.tree_util.tree_leaves(ema_1), jax.tree_util.tree_leaves(ema_2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  summaries = []
  for name in ('single', 'double'):
    with open(runs / name / 'eval' / 'test' / 'summary.json') as f:
      summaries.append(json.load(f))
  assert summaries[0]['num_devices'] == summaries[1]['num_devices'] == 2
  one, two = _comparable(summaries[0]), _comparable(summaries[1])
  assert one.keys() == two.keys()
  for key in ('dice', 'iou', 'ece', 'miss_rate'):
    assert abs(one['mean'][key] - two['mean'][key]) < 1e-4, (key, one['mean'], two['mean'])
  assert one['datasets'].keys() == two['datasets'].keys()
  with open(runs / 'single' / 'eval' / 'test' / 'per_case.csv') as a, \
       open(runs / 'double' / 'eval' / 'test' / 'per_case.csv') as b:
    assert [r.split(',')[:2] for r in a.read().splitlines()] == [r.split(',')[:2] for r in b.read().splitlines()]


def test_two_processes_predict_the_same_masks(runs):
  names = sorted(os.listdir(runs / 'pred_single'))
  assert names == sorted(os.listdir(runs / 'pred_double')) and 'img2_mask.png' in names
  for name in names:
    if name.endswith('_mask.png') or name.endswith('_prob.png'):
      a = np.asarray(Image.open(runs / 'pred_single' / name), np.int32)
      b = np.asarray(Image.open(runs / 'pred_double' / name), np.int32)
      assert np.abs(a - b).max() <= 1, name  # probabilities to one grey level, masks equal but at the border


def test_sigterm_to_one_process_stops_both_at_the_same_step(tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  long_run = {**RUN, 'train.num_steps': 1000, 'train.eval_every_steps': 1000,
              'train.checkpoint_every_steps': 1000}
  port = _free_port()
  started = [_start(rel._main_args(tiny_data_dir, workdir, **long_run), _env(1, p, port), str(tmp_path), f'p{p}')  # pylint: disable=protected-access
             for p in (0, 1)]
  try:
    scalars = os.path.join(workdir, 'scalars.jsonl')
    deadline = time.time() + 300
    while time.time() < deadline:  # training is under way once process 0 has logged a step
      if os.path.exists(scalars) and '"train/loss"' in open(scalars).read():
        break
      assert all(proc.poll() is None for proc, _, _ in started), 'a process exited before training'
      time.sleep(0.5)
    started[1][0].send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=240) for proc, _, _ in started]
  finally:
    for proc, out, err in started:
      if proc.poll() is None:
        proc.kill()
      out.close()
      err.close()
  outs = [open(os.path.join(tmp_path, f'p{p}.out')).read() for p in (0, 1)]
  assert codes == [0, 0], [open(os.path.join(tmp_path, f'p{p}.err')).read()[-2000:] for p in (0, 1)]
  steps = [int(o.split('saved diffusion checkpoint step ')[1].split()[0]) for o in outs]
  assert steps[0] == steps[1] and steps[0] % long_run['train.log_every_steps'] == 0, steps
  assert rel._complete_steps(os.path.join(workdir, 'checkpoints')) == [steps[0]]  # pylint: disable=protected-access
