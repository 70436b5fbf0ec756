"""The inference engine and the loop's host syncs: no recompilation of a second sampling batch, only the EMA
parameters read for inference, and no device-to-host transfer outside the loop's sync steps."""

import collections
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array

from tests import test_reliability as rel
from unisegdiff_jax import checkpointing
from unisegdiff_jax import ensemble
from unisegdiff_jax import inference
from unisegdiff_jax import phases
from unisegdiff_jax import train
from unisegdiff_jax import writers


def _members(params, images, keys):
  """A stand-in sampler: K = 2 members that depend on the image and on the per-image key."""
  noise = jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:-1] + (1,)))(keys)
  base = jax.nn.sigmoid(params['w'] * images.mean(-1, keepdims=True))
  return jnp.stack([base, 0.5 * base + 0.5 * noise])


def test_a_second_sampling_batch_does_not_recompile(caplog):
  settings = ensemble.Settings('staged', None, 2, 'mean', 0.5)
  engine = inference.Engine(_members, settings, image_size=8, batch_size=4)
  params, rng = {'w': jnp.float32(3.0)}, jax.random.PRNGKey(0)
  rs = np.random.RandomState(0)
  first = engine.run(params, rs.rand(3, 8, 8, 3).astype(np.float32), ['a', 'b', 'c'], rng)
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      second = engine.run(params, rs.rand(2, 8, 8, 3).astype(np.float32), ['d', 'e'], rng)
  finally:
    jax.config.update('jax_log_compiles', False)
  compiles = [r.getMessage() for r in caplog.records if 'Compiling' in r.getMessage()]
  assert not compiles, compiles
  assert first.prob.shape == (3, 8, 8, 1) and second.prob.shape == (2, 8, 8, 1)
  # The compile check can fail: a new batch shape does compile (and is logged).
  other = inference.Engine(_members, settings, image_size=8, batch_size=2)
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      other.run(params, rs.rand(2, 8, 8, 3).astype(np.float32), ['d', 'e'], rng)
  finally:
    jax.config.update('jax_log_compiles', False)
  assert any('Compiling' in r.getMessage() for r in caplog.records)


def test_inference_reads_only_the_ema_parameters(tmp_path):
  """A checkpoint whose optimiser state would not even fit the model: the EMA parameters still restore."""
  state = {'step': np.int32(7), 'params': {'w': np.ones((2, 3), np.float32)},
           'opt_state': {'mu': np.zeros((5, 5), np.float32)},
           'ema_params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  manager = checkpointing.create_manager(str(tmp_path / 'ckpt'), async_save=False)
  checkpointing.save(manager, 7, state, None, {checkpointing.BEST_METRIC: 0.5}, wait=True)
  manager.close()
  abstract = {'w': jax.ShapeDtypeStruct((2, 3), jnp.float32)}
  ema, step = inference.restore_ema_params(str(tmp_path / 'ckpt'), abstract)
  assert step == 7
  np.testing.assert_array_equal(np.asarray(ema['w']), state['ema_params']['w'])
  with pytest.raises(checkpointing.CheckpointError, match='ema_params/w has shape'):
    inference.restore_ema_params(str(tmp_path / 'ckpt'), {'w': jax.ShapeDtypeStruct((3, 3), jnp.float32)})


def test_the_loop_reads_from_the_device_only_at_sync_steps(smoke_config, tmp_path, monkeypatch):
  """Every device-to-host read of any jax.Array (state, metrics, anything) is counted against the step the
  loop is at: none may happen on the steps between the sync steps (log, validation, checkpoint, stop)."""
  # The reliability tests' tiny config and step count (their compiled step is reused); stopped at step 7.
  config = rel._config(smoke_config, **{'train.log_every_steps': 3, 'train.max_steps_per_run': 7})  # pylint: disable=protected-access
  process = train.validate_config(config)
  runtime = phases.make_runtime(config, writers.create_writer(str(tmp_path), just_logging=True))
  phase = phases.diffusion_phase(config, str(tmp_path), runtime, process)
  clock, reads, real_step = {'step': 0}, collections.Counter(), phase.step_fn

  def counted_step(state, batch, rng):
    clock['step'] += 1
    return real_step(state, batch, rng)

  phase.step_fn = counted_step
  value, to_numpy = array.ArrayImpl._value, array.ArrayImpl.__array__  # pylint: disable=protected-access
  monkeypatch.setattr(array.ArrayImpl, '_value',
                      property(lambda self: (reads.update([clock['step']]), value.fget(self))[1]))
  monkeypatch.setattr(array.ArrayImpl, '__array__',
                      lambda self, *a, **k: (reads.update([clock['step']]), to_numpy(self, *a, **k))[1])
  assert train.run_phase(phase, config, runtime) is None  # stopped by max_steps_per_run, after checkpointing
  monkeypatch.undo()
  assert clock['step'] == 7 and os.path.isdir(tmp_path / 'checkpoints' / '7')
  assert not {1, 2, 4, 5} & set(reads), reads  # the steps between the sync steps 3, 6 and 7 (the stop)
  assert reads[3] and reads[6] and reads[7], reads  # the counting sees the loop's own reads


def test_a_profile_of_the_chosen_steps_is_written(smoke_config, tmp_path):
  config = rel._config(smoke_config, **{'train.max_steps_per_run': 4, 'train.profile_first_step': 2,  # pylint: disable=protected-access
                                        'train.profile_num_steps': 2})
  runtime = phases.make_runtime(config, writers.create_writer(str(tmp_path), just_logging=True), str(tmp_path))
  phase = phases.diffusion_phase(config, str(tmp_path), runtime, train.validate_config(config))
  train.run_phase(phase, config, runtime)
  traces = list((tmp_path / 'profile' / 'diffusion').rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
