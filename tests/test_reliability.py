"""Reliability: resume determinism, SIGTERM / kill -9 recovery, non-finite policy, unusable workdirs and
checkpoints, a full disk during a save, and hostile image folders.

Every training here uses one tiny model (2 levels, 16 px, 3 NFE) whose train step does not depend on the
test (same num_steps, same warm-up), so the step compiles once and every later run, in this process or in a
`main.py` subprocess, loads it from the persistent compilation cache that main.py uses.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import ROOT
from unisegdiff_jax import checkpointing
from unisegdiff_jax import host
from unisegdiff_jax import phases
from unisegdiff_jax import train
from unisegdiff_jax import train_state

# HLO-relevant fields are the same in every run (num_steps is in the learning-rate schedule); runs are cut
# short with max_steps_per_run, a signal or an error instead.
TINY = {
    'pretrain.enabled': False,  # phase 1 only (phase 0 runs the same run_phase loop)
    'data.image_size': 16,
    'data.max_val_examples': 4,
    'data.max_eval_examples': 8,
    'model.encoder.widths': (8, 8),
    'model.denoiser.channel_mult': (1, 1),
    'model.denoiser.attention_levels': (),
    'diffusion.stages': '500:1000 x0 loss=mse steps=1; 200:500 v steps=1; 0:200 eps steps=1',
    'train.num_steps': 1000,
    'train.log_every_steps': 2,
    'train.eval_every_steps': 1000,
    'train.checkpoint_every_steps': 1000,
}
# The non-finite runs need their own step (the injected step is a constant in it); they share it.
NONFINITE = {'train.num_steps': 8, 'train.checkpoint_every_steps': 2,
             'train.eval_every_steps': 1000}

CACHE_DIR = host.compilation_cache_dir()


@pytest.fixture(scope='module', autouse=True)
def persistent_compilation_cache():
  """The cache main.py uses, also in this process (restored afterwards)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_compilation_cache_dir', CACHE_DIR)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  compilation_cache.reset_cache()
  yield
  jax.config.update('jax_compilation_cache_dir', old_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old_min)
  compilation_cache.reset_cache()


def _config(smoke_config, **overrides):
  config = smoke_config
  for key, value in {**TINY, **overrides}.items():
    section, *path, field = key.split('.')
    node = config[section]
    for part in path:
      node = node[part]
    node[field] = value
  return config


def _flag(key, value):
  if isinstance(value, tuple):
    value = '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
  return f'--config.{key}={value}'


def _main_args(tiny_data_dir, workdir, **overrides):
  return [sys.executable, os.path.join(ROOT, 'main.py'), '--config=configs/synthetic.py:smoke',
          f'--workdir={workdir}', f'--config.data.data_dir={tiny_data_dir}',
          *[_flag(k, v) for k, v in {**TINY, **overrides}.items()]]


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=CACHE_DIR, TF_CPP_MIN_LOG_LEVEL='2')


def _run_main(tiny_data_dir, workdir, timeout=240, **overrides):
  return subprocess.run(_main_args(tiny_data_dir, workdir, **overrides), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


class _Background:
  """main.py in a subprocess, its output in files (no pipe to fill up)."""

  def __init__(self, tiny_data_dir, workdir, log_dir, **overrides):
    self.out_path, self.err_path = os.path.join(log_dir, 'stdout'), os.path.join(log_dir, 'stderr')
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.proc = subprocess.Popen(_main_args(tiny_data_dir, workdir, **overrides), cwd=ROOT, env=_env(),
                                   stdout=out, stderr=err)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.proc.poll() is None:  # a failed assertion: leave no training behind
      self.proc.kill()
      self.proc.wait()
    return False

  def output(self):
    with open(self.out_path) as out, open(self.err_path) as err:
      return out.read(), err.read()

  def wait_for(self, predicate, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if predicate():
        return
      if self.proc.poll() is not None:
        pytest.fail(f'main.py exited ({self.proc.returncode}) too early:\n{self.output()[1][-3000:]}')
      time.sleep(0.05)
    self.proc.kill()
    pytest.fail(f'timed out:\n{self.output()[1][-3000:]}')

  def logged_step(self):
    steps = [int(s) for s in re.findall(r'\[(\d+)\] train/', self.output()[1])]
    return max(steps, default=0)

  def finish(self, timeout=120):
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      pytest.fail(f'main.py did not exit within {timeout} s:\n{self.output()[1][-3000:]}')
    return self.proc.returncode, *self.output()


def _complete_steps(ckpt_dir):
  """Finished checkpoint steps (orbax renames a step's temporary directory when it is complete)."""
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []


def _abstract_state(config):
  model, optimizer, _ = phases.diffusion_parts(config, train.validate_config(config))
  return jax.eval_shape(lambda: train_state.create_train_state(model, config, optimizer, jax.random.PRNGKey(0)))


def _restore(config, workdir, step=None, with_data_iter=True):
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), async_save=False)
  step = manager.latest_step() if step is None else step
  state, iter_state = checkpointing.restore(manager, step, _abstract_state(config),
                                            with_data_iter=with_data_iter)
  manager.close()
  return step, state, iter_state


def _one_error_line(stderr):
  lines = [l for l in stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1. Interrupt + resume gives bit-identical training.


def test_resumed_training_is_bit_identical(smoke_config, tmp_path, capsys):
  overrides = {'train.eval_every_steps': 6, 'train.checkpoint_every_steps': 3}
  config = _config(smoke_config, **overrides)
  config.train.max_steps_per_run = 12
  assert train.train_and_evaluate(config, str(tmp_path / 'a')) == {'stopped_in': 'diffusion'}

  config.train.max_steps_per_run = 5
  assert train.train_and_evaluate(config, str(tmp_path / 'b')) == {'stopped_in': 'diffusion'}
  config.train.max_steps_per_run = 7
  assert train.train_and_evaluate(config, str(tmp_path / 'b')) == {'stopped_in': 'diffusion'}
  assert 'Resuming diffusion from checkpoint step 5 in' in capsys.readouterr().out

  step_a, state_a, iter_a = _restore(config, str(tmp_path / 'a'))
  step_b, state_b, iter_b = _restore(config, str(tmp_path / 'b'))
  assert step_a == step_b == 12 and int(state_a.step) == 12
  flat_a, flat_b = checkpointing.flatten_with_names(state_a), checkpointing.flatten_with_names(state_b)
  assert flat_a.keys() == flat_b.keys()
  assert any(k.startswith('ema_params/') for k in flat_a) and any(k.startswith('opt_state/') for k in flat_a)
  for name in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), err_msg=name)
  assert iter_a == iter_b


# ---------------------------------------------------------------------------------------------------------
# 2 + 3. SIGTERM -> checkpoint and exit 0 -> resume; kill -9 (+ a half-written save) -> resume.


def test_sigterm_then_kill9_then_resume(tiny_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  ckpt_dir = os.path.join(workdir, 'checkpoints')

  # SIGTERM while training: the current step finishes, is checkpointed (with the data iterator), exit 0.
  (tmp_path / 'log1').mkdir()
  with _Background(tiny_data_dir, workdir, str(tmp_path / 'log1')) as run:
    run.wait_for(lambda: run.logged_step() >= 2)
    run.proc.send_signal(signal.SIGTERM)
    code, out, err = run.finish()
  assert code == 0, err[-3000:]
  match = re.search(r'SIGTERM: saved diffusion checkpoint step (\d+) in (\S+); rerun the same command to resume',
                    out)
  assert match, out + err[-2000:]
  stopped = int(match.group(1))
  assert stopped >= 2 and os.path.samefile(match.group(2), ckpt_dir)
  assert _complete_steps(ckpt_dir)[-1] == stopped
  assert os.path.isdir(os.path.join(ckpt_dir, str(stopped), 'data_iter'))
  assert 'Test Dice' not in out

  # The rerun resumes there; killed with SIGKILL once it has written a newer checkpoint.
  (tmp_path / 'log2').mkdir()
  with _Background(tiny_data_dir, workdir, str(tmp_path / 'log2'), **{'train.checkpoint_every_steps': 2}) as run:
    run.wait_for(lambda: max(_complete_steps(ckpt_dir), default=0) > stopped)
    run.proc.kill()
    code, out, _ = run.finish()
  assert code == -signal.SIGKILL
  assert f'Resuming diffusion from checkpoint step {stopped} in {ckpt_dir}' in out
  latest = _complete_steps(ckpt_dir)[-1]
  assert latest > stopped
  # An interrupted save leaves an orbax temporary directory: simulate one for a later step.
  fake = os.path.join(ckpt_dir, '999.orbax-checkpoint-tmp-123')
  os.makedirs(os.path.join(fake, 'state'))
  with open(os.path.join(fake, 'state', 'garbage'), 'wb') as f:
    f.write(b'\0' * 100)

  # The next rerun ignores it (with a warning), resumes from the latest complete step and trains on.
  out = _run_main(tiny_data_dir, workdir, **{'train.max_steps_per_run': 2})
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'Resuming diffusion from checkpoint step {latest} in' in out.stdout
  assert 'ignoring the half-written checkpoint' in out.stderr and fake in out.stderr
  assert f'saved diffusion checkpoint step {latest + 2} in' in out.stdout
  assert 999 not in _complete_steps(ckpt_dir) and _complete_steps(ckpt_dir)[-1] == latest + 2


# ---------------------------------------------------------------------------------------------------------
# 4. Non-finite loss: stop (exit 1, one line, last good checkpoint kept) or skip (train on to the end).


def test_nonfinite_stop_is_a_one_line_user_error(smoke_config, tmp_path, inject_nonfinite):
  from unisegdiff_jax import errors  # pylint: disable=g-import-not-at-top
  inject_nonfinite(5)
  config = _config(smoke_config, **NONFINITE)
  with pytest.raises(train.NonFiniteError) as err:
    train.train_and_evaluate(config, str(tmp_path))
  line = str(err.value)
  assert isinstance(err.value, errors.USER_ERRORS) and '\n' not in line  # main.py prints it as one line
  assert 'non-finite loss or gradient at step 5' in line and 'latest checkpoint (4)' in line, line
  assert _complete_steps(str(tmp_path / 'checkpoints')) == [2, 4]


def test_nonfinite_skip_trains_to_the_end(smoke_config, tmp_path, caplog, inject_nonfinite):
  inject_nonfinite(5)
  config = _config(smoke_config, **NONFINITE)
  config.train.nonfinite = 'skip'
  with caplog.at_level('WARNING'):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary['mean']['dice'] <= 1.0
  assert any('skipped step 5: non-finite' in r.getMessage() for r in caplog.records)
  step, state, _ = _restore(config, str(tmp_path))
  assert step == int(state.step) == config.train.num_steps == 8
  for leaf in jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state)):
    assert np.all(np.isfinite(np.asarray(leaf)))


# ---------------------------------------------------------------------------------------------------------
# 5. Unusable workdir; a checkpoint of another config.


def test_unwritable_workdir_is_one_line(smoke_config, tmp_path):
  from unisegdiff_jax import errors  # pylint: disable=g-import-not-at-top
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  config = _config(smoke_config)
  with pytest.raises(train.ConfigError) as err:
    train.train_and_evaluate(config, str(blocker / 'run'))
  assert str(err.value) == f'workdir {blocker / "run"} is not writable: Not a directory'
  assert isinstance(err.value, errors.USER_ERRORS)


def test_checkpoint_of_another_config_is_refused(smoke_config, tiny_data_dir, tmp_path):
  config = _config(smoke_config)
  config.train.max_steps_per_run = 2
  assert train.train_and_evaluate(config, str(tmp_path)) == {'stopped_in': 'diffusion'}
  out = _run_main(tiny_data_dir, str(tmp_path), **{'model.denoiser.base_width': 16})
  assert out.returncode == 1
  line = _one_error_line(out.stderr)
  assert 'does not fit this config: params/' in line and 'has shape' in line, line
  assert _complete_steps(str(tmp_path / 'checkpoints')) == [2]


# ---------------------------------------------------------------------------------------------------------
# 6. A full disk (or another write failure) during a save.


def _tiny_state():
  return {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'step': np.asarray(1, np.int32)}


def _enospc(*_, **__):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'checkpoints/2.orbax-checkpoint-tmp/state')


def _fail_async_json_writes(monkeypatch, when=lambda directory: True):
  """The data-iterator item's write, in orbax's background commit, hits a full disk."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def save_fn(self, item, directory):
    if when(str(directory)):
      _enospc()
    return await original(self, item, directory)
  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', save_fn)


def test_disk_full_in_a_synchronous_save(tmp_path, monkeypatch):
  manager = checkpointing.create_manager(str(tmp_path / 'checkpoints'), async_save=False)
  checkpointing.save(manager, 1, _tiny_state(), {'batch': 1})
  monkeypatch.setattr(type(manager), 'save', _enospc)
  with pytest.raises(checkpointing.CheckpointError) as err:
    checkpointing.save(manager, 2, _tiny_state(), {'batch': 2})
  message = str(err.value)
  assert '\n' not in message
  assert message.startswith('no space left on device while writing checkpoint step 2 to ')
  assert 'the previous checkpoint step 1 is intact' in message
  monkeypatch.undo()
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tiny_state())
  state, iter_state = checkpointing.restore(checkpointing.create_manager(str(tmp_path / 'checkpoints')), 1,
                                            abstract)
  np.testing.assert_array_equal(state['w'], _tiny_state()['w'])
  assert iter_state == {'batch': 1}


def test_disk_full_in_an_async_save_is_reported_under_its_step(tmp_path, monkeypatch):
  from unisegdiff_jax import errors  # pylint: disable=g-import-not-at-top
  assert issubclass(checkpointing.CheckpointError, errors.USER_ERRORS)  # main prints `error: <message>`
  manager = checkpointing.create_manager(str(tmp_path / 'checkpoints'))
  checkpointing.save(manager, 1, _tiny_state(), {'batch': 1}, wait=True)
  _fail_async_json_writes(monkeypatch)
  checkpointing.save(manager, 2, _tiny_state(), {'batch': 2})  # returns: the write runs in the background
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'^no space left on device while writing checkpoint step 2 to .*; the previous '
                           r'checkpoint step 1 is intact: free disk space, then rerun'):
    checkpointing.save(manager, 3, _tiny_state(), {'batch': 3})  # the next save reports it
  assert _complete_steps(str(tmp_path / 'checkpoints')) == [1]


def test_disk_full_while_training_keeps_the_previous_checkpoint(smoke_config, tmp_path, monkeypatch):
  config = _config(smoke_config, **{'train.checkpoint_every_steps': 3})
  config.train.max_steps_per_run = 6
  _fail_async_json_writes(monkeypatch, when=lambda directory: '/6.orbax-checkpoint-tmp' in directory)
  with pytest.raises(checkpointing.CheckpointError) as err:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(err.value)
  assert '\n' not in message
  assert message.startswith('no space left on device while writing checkpoint step 6 to ')
  assert 'the previous checkpoint step 3 is intact' in message
  monkeypatch.undo()
  assert _complete_steps(str(tmp_path / 'checkpoints')) == [3]
  step, state, iter_state = _restore(config, str(tmp_path))
  assert step == int(state.step) == 3 and iter_state is not None


# ---------------------------------------------------------------------------------------------------------
# 7. A folder of hostile images, read file by file.


def test_hostile_image_folder_is_read_file_by_file(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tests.test_image_io import _noise_rgb, _png_claiming_size  # pylint: disable=g-import-not-at-top
  from unisegdiff_jax import image_io  # pylint: disable=g-import-not-at-top

  folder = tmp_path / 'images'
  folder.mkdir()
  Image.fromarray(_noise_rgb(64, 64)).save(folder / 'full.jpg', quality=95)
  data = (folder / 'full.jpg').read_bytes()
  (folder / 'truncated.jpg').write_bytes(data[:len(data) // 2])
  (folder / 'full.jpg').unlink()
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'text.png').write_text('not an image\n')
  _png_claiming_size(folder / 'bomb.png', 30000, 30000)
  Image.fromarray(np.full((5, 7), 40000, np.uint16)).save(folder / 'grey16.png')
  Image.fromarray(np.zeros((6, 4, 4), np.uint8), 'RGBA').save(folder / 'rgba.png')
  Image.new('CMYK', (8, 6), (0, 0, 0, 0)).save(folder / 'cmyk.jpg')
  palette = Image.new('P', (3, 2), 1)
  palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  palette.save(folder / 'palette.png')
  Image.new('RGB', (1, 1), (1, 2, 3)).save(folder / 'one.png')
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees to display: stored 20x40 (HxW) -> 40x20
  Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(folder / 'rotated.jpg', exif=exif)

  expected_shapes = {'grey16.png': (5, 7, 3), 'rgba.png': (6, 4, 3), 'cmyk.jpg': (6, 8, 3),
                     'palette.png': (2, 3, 3), 'one.png': (1, 1, 3), 'rotated.jpg': (40, 20, 3)}
  invalid = {'truncated.jpg', 'empty.png', 'text.png', 'bomb.png'}
  read, refused = {}, {}
  for path in sorted(folder.iterdir()):
    try:
      read[path.name] = image_io.read_image(path)
    except image_io.ImageReadError as err:
      refused[path.name] = str(err)
  assert set(read) == set(expected_shapes) and set(refused) == invalid
  for name, image in read.items():
    assert image.shape == expected_shapes[name] and image.dtype == np.uint8, name
  assert read['palette.png'][0, 0].tolist() == [255, 0, 0]
  assert read['grey16.png'][0, 0].tolist() == [156] * 3  # 40000 / 257, rounded
  for name, message in refused.items():
    assert '\n' not in message and str(folder / name) in message, message
