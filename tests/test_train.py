"""Training step, checkpoint round trip (with the data iterator), 1-vs-8-device equality, validation."""

import copy
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT
from tests.conftest import xla_flags
from unisegdiff_jax import checkpointing
from unisegdiff_jax import diffusion
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import phases
from unisegdiff_jax import schedules
from unisegdiff_jax import train
from unisegdiff_jax import train_state
from unisegdiff_jax.models import denoiser as denoiser_lib


_SETUPS = {}


def _setup(config):
  """(process, model, optimizer, initial state, step) for a config. The jitted step and initial state are built
  once per config up to its learning-rate schedule (and fault injection) in this module, so tests that share a
  model share its compiled program; `step` binds this config's schedule."""
  schedule_free = copy.deepcopy(config)
  schedule_free.optim.learning_rate, schedule_free.optim.warmup_steps, schedule_free.train.num_steps = 0.0, 0, 0
  key = (schedule_free.to_json_best_effort(sort_keys=True), train_state.apply_gradients)
  if key not in _SETUPS:
    config = copy.deepcopy(config)  # the tests go on to mutate theirs
    process = train.validate_config(config)
    model = denoiser_lib.build_model(config.model, process.num_stages)
    optimizer = train_state.make_optimizer(config)
    state = jax.jit(lambda r: train_state.create_train_state(model, config, optimizer, r))(jax.random.PRNGKey(0))
    jitted = jax.jit(functools.partial(train_state.train_step, model=model, optimizer=optimizer,
                                       process=process, config=config))
    _SETUPS[key] = process, model, optimizer, state, jitted
  process, model, optimizer, state, jitted = _SETUPS[key]
  return process, model, optimizer, state, functools.partial(jitted, schedule=jnp.asarray(
      train_state.schedule_args(config)))


def _fixed_batch(config, seed=0):
  size, batch = config.data.image_size, config.train.global_batch_size
  rng = np.random.RandomState(seed)
  mask = np.zeros((batch, size, size, 1), np.float32)
  for i in range(batch):
    r, c = rng.randint(4, size - 12, size=2)
    mask[i, r:r + 10, c:c + 10] = 1
  image = np.concatenate([mask * 1.6 - 0.8 + 0.1 * rng.randn(batch, size, size, 1)] * 3, axis=-1)
  return {'image': jnp.asarray(image, jnp.float32), 'mask': jnp.asarray(mask)}


def test_training_lowers_the_loss_on_a_fixed_batch(smoke_config):
  config = smoke_config
  config.optim.warmup_steps = 1
  config.train.num_steps = 60
  config.optim.learning_rate = 3e-3
  _, _, _, state, step = _setup(config)
  batch = _fixed_batch(config)
  rng = jax.random.PRNGKey(7)

  def eval_loss(s):  # the same timesteps and noise every time: fold_in of a fixed step
    _, metrics = step(s.replace(step=jnp.zeros((), jnp.int32)), batch, rng)
    return float(metrics['loss'])

  before = eval_loss(state)
  for _ in range(40):
    state, metrics = step(state, batch, rng)
  after = eval_loss(state)
  assert after < 0.7 * before, (before, after)
  assert float(metrics['finite']) == 1.0


def test_second_training_step_does_not_recompile(smoke_config):
  """Nor does a run of another length or learning rate: the schedule is an argument of the program."""
  _, _, _, state, step = _setup(smoke_config)
  state, _ = step(state, _fixed_batch(smoke_config, 0), jax.random.PRNGKey(0))
  state, _ = step(state, _fixed_batch(smoke_config, 1), jax.random.PRNGKey(1))  # new data, new key, new step
  other = jnp.asarray(schedules.schedule_args(3e-3, 7, 12345))
  state, _ = step(state, _fixed_batch(smoke_config, 2), jax.random.PRNGKey(2), schedule=other)
  assert step.func._cache_size() == 1  # pylint: disable=protected-access


def test_nonfinite_step_is_not_applied(smoke_config, inject_nonfinite):
  config = smoke_config
  inject_nonfinite(2)
  _, _, _, state, step = _setup(config)
  batch = _fixed_batch(config)
  state1, m1 = step(state, batch, jax.random.PRNGKey(0))
  state2, m2 = step(state1, batch, jax.random.PRNGKey(0))
  assert float(m1['finite']) == 1.0 and float(m2['finite']) == 0.0
  assert int(state2.step) == 2
  for a, b in zip(jax.tree_util.tree_leaves(state1.params), jax.tree_util.tree_leaves(state2.params)):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_includes_the_data_iterator(smoke_config, tmp_path):
  config = smoke_config
  _, _, _, state, _ = _setup(config)
  iterator = input_pipeline.create_train_iterator(config)
  next(iterator)
  next(iterator)
  manager = checkpointing.create_manager(str(tmp_path / 'ckpt'), keep=2)
  checkpointing.save(manager, 2, state, iterator.get_state(), {'val_dice': 0.5}, wait=True)
  expected_next = next(iterator)

  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, iter_state = checkpointing.restore(manager, 2, abstract)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(a, b)
  fresh = input_pipeline.create_train_iterator(config)
  fresh.set_state(iter_state)
  got = next(fresh)
  np.testing.assert_array_equal(got['image'], expected_next['image'])
  np.testing.assert_array_equal(got['mask'], expected_next['mask'])
  assert manager.metrics(2)['val_dice'] == 0.5


def test_preservation_keeps_latest_and_best(smoke_config, tmp_path):
  _, _, _, state, _ = _setup(smoke_config)
  manager = checkpointing.create_manager(str(tmp_path / 'ckpt'), keep=2, async_save=False)
  for step, dice in [(1, 0.2), (2, 0.9), (3, 0.3), (4, 0.4), (5, 0.1)]:
    checkpointing.save(manager, step, state, None, {'val_dice': dice})
  assert sorted(manager.all_steps()) == [2, 4, 5]
  assert checkpointing.best_step(manager) == 2


def test_restore_refuses_an_incompatible_config(smoke_config, tmp_path):
  _, _, _, state, _ = _setup(smoke_config)
  manager = checkpointing.create_manager(str(tmp_path / 'ckpt'), async_save=False)
  checkpointing.save(manager, 1, state)
  smoke_config.model.denoiser.base_width = 16
  _, _, _, other, _ = _setup(smoke_config)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other)
  with pytest.raises(checkpointing.CheckpointError, match='does not fit this config: params/') as err:
    checkpointing.restore(manager, 1, abstract)
  assert '\n' not in str(err.value)


@pytest.mark.parametrize('field, value, message', [
    ('data.image_size', 33, 'cannot be halved 1 times'),
    ('train.global_batch_size', 0, 'not divisible'),
    ('diffusion.stages', '0:500 eps', 'tile [0, 1000)'),
    ('diffusion.stages', '0:1000 noise', 'unknown target'),
    ('train.nonfinite', 'ignore', 'use stop or skip'),
    ('pretrain.encoder_mode', 'thaw', 'use frozen or finetune'),
    ('data.mixture_weights', '1,2', 'needs 1 non-negative weights'),
])
def test_config_validation_gives_one_line(smoke_config, field, value, message):
  section, key = field.split('.')
  smoke_config[section][key] = value
  with pytest.raises(ValueError, match=None) as err:
    train.validate_config(smoke_config)
  assert message in str(err.value) and '\n' not in str(err.value)


def test_batch_must_divide_the_device_count(smoke_config):
  smoke_config.train.global_batch_size = 12
  with pytest.raises(train.ConfigError, match='not divisible by the 8 devices'):
    train.validate_config(smoke_config, num_devices=8)


_DEVICE_SCRIPT = r'''
import functools, json, os, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from configs import synthetic
from tests.test_train import _fixed_batch
from unisegdiff_jax import train
from unisegdiff_jax import train_state
from unisegdiff_jax.models import denoiser as denoiser_lib
config = synthetic.get_config('smoke')
# A smaller model than smoke's (the property is about sharding, not size): 24 px, two 8-channel levels.
config.data.image_size = 24
config.model.encoder.widths, config.model.denoiser.channel_mult = (8, 8), (1, 1)
config.model.denoiser.attention_levels = ()
process = train.validate_config(config)
model = denoiser_lib.build_model(config.model, process.num_stages)
optimizer = train_state.make_optimizer(config)
initial = jax.jit(lambda r: train_state.create_train_state(model, config, optimizer, r))(jax.random.PRNGKey(0))
results = []
for count in (1, jax.device_count()):
  mesh = Mesh(np.asarray(jax.devices()[:count]), ('data',))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  step = jax.jit(functools.partial(train_state.train_step, model=model, optimizer=optimizer, process=process,
                                   config=config), in_shardings=(rep, data, rep, rep), out_shardings=(rep, rep))
  state, batch = jax.device_put(initial, rep), jax.device_put(_fixed_batch(config), data)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, jax.random.PRNGKey(1), train_state.schedule_args(config))
    losses.append(float(metrics['loss']))
  leaves = jax.tree_util.tree_leaves(state.params)
  results.append({{'devices': len(leaves[0].sharding.device_set), 'losses': losses,
                   'param_sum': float(sum(jnp.sum(jnp.abs(x)) for x in leaves))}})
print(json.dumps(results))
'''


def test_one_and_eight_devices_give_the_same_loss():
  """The same three steps from the same state on a 1-device and an 8-device mesh (one process with 8 forced
  CPU devices, so the initial state is computed once)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8'), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _DEVICE_SCRIPT.format(root=ROOT)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  one, eight = json.loads(out.stdout.strip().splitlines()[-1])
  assert one['devices'] == 1 and eight['devices'] == 8
  np.testing.assert_allclose(one['losses'], eight['losses'], rtol=2e-5)
  np.testing.assert_allclose(one['param_sum'], eight['param_sum'], rtol=2e-5)


def test_pretrain_mode_without_phase0_is_one_line_error(smoke_config, tmp_path):
  smoke_config.pretrain.enabled = False
  with pytest.raises(train.ConfigError, match='no phase 0 to train'):
    train.train_and_evaluate(smoke_config, str(tmp_path), pretrain_only=True)
