"""Phase 0 -> phase 1: the pre-trained encoder is handed over, frozen or fine-tuned; external weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import _fixed_batch
from unisegdiff_jax import phases
from unisegdiff_jax import pretrain
from unisegdiff_jax import train
from unisegdiff_jax import weights


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def _runtime(config, tmp_path):
  del tmp_path
  return phases.make_runtime(config)


def _pretrained_params(config):
  segmenter = pretrain.build_segmenter(config)
  params = pretrain.init_params(segmenter, config, jax.random.PRNGKey(42))
  return jax.tree_util.tree_map(lambda p: p + 0.01, params)  # distinguishable from any fresh init


@pytest.mark.parametrize('mode', ['frozen', 'finetune'])
def test_phase1_starts_from_the_pretrained_encoder(smoke_config, tmp_path, mode):
  config = smoke_config
  config.pretrain.encoder_mode = mode
  runtime = _runtime(config, tmp_path)
  process = train.validate_config(config)
  pretrained = _pretrained_params(config)
  phase = phases.diffusion_phase(config, str(tmp_path), runtime, process, pretrained)
  state = phase.initial_state(runtime)
  for a, b in zip(_leaves(state.params['params']['encoder']), _leaves(pretrained['params']['encoder'])):
    np.testing.assert_array_equal(a, b)
  batch = jax.device_put(_fixed_batch(config), runtime.batch_sharding)
  before_encoder = [np.asarray(x) for x in _leaves(state.params['params']['encoder'])]
  before_denoiser = [np.asarray(x) for x in _leaves(state.params['params']['denoiser'])]
  for _ in range(3):
    state, _ = phase.step_fn(state, batch, runtime.step_rng)
  encoder_moved = max(float(np.max(np.abs(np.asarray(a) - b)))
                      for a, b in zip(_leaves(state.params['params']['encoder']), before_encoder))
  denoiser_moved = max(float(np.max(np.abs(np.asarray(a) - b)))
                       for a, b in zip(_leaves(state.params['params']['denoiser']), before_denoiser))
  assert denoiser_moved > 0
  if mode == 'frozen':
    assert encoder_moved == 0.0
  else:
    assert encoder_moved > 0


def test_scratch_trains_the_encoder_jointly(smoke_config, tmp_path):
  config = smoke_config
  config.pretrain.enabled = False
  model, _, names = phases.diffusion_parts(config, train.validate_config(config))
  assert names == () and not model.freeze_encoder


def test_coarse_logits_add_an_input_channel(smoke_config, tmp_path):
  config = smoke_config
  config.pretrain.coarse_logits = True
  config.model.self_condition = False  # its channel is the other one the default adds
  runtime = _runtime(config, tmp_path)
  process = train.validate_config(config)
  pretrained = _pretrained_params(config)
  phase = phases.diffusion_phase(config, str(tmp_path), runtime, process, pretrained)
  state = phase.initial_state(runtime)
  assert state.params['params']['denoiser']['conv_in']['kernel'].shape[2] == 2
  for a, b in zip(_leaves(state.params['params']['decoder']), _leaves(pretrained['params']['decoder'])):
    np.testing.assert_array_equal(a, b)


def test_segmenter_phase_learns_and_reads_external_weights(smoke_config, tmp_path):
  config = smoke_config
  encoder = _pretrained_params(config)['params']['encoder']
  path = str(tmp_path / 'encoder.safetensors')
  weights.save_encoder_weights(path, encoder)
  config.pretrain.external_weights = path
  runtime = _runtime(config, tmp_path)
  phase = phases.segmenter_phase(config, str(tmp_path), runtime)
  state = phase.initial_state(runtime)
  for a, b in zip(_leaves(state.params['params']['encoder']), _leaves(encoder)):
    np.testing.assert_allclose(a, b, rtol=1e-7)
  batch = jax.device_put(_fixed_batch(config), runtime.batch_sharding)
  first = None
  for _ in range(25):
    state, metrics = phase.step_fn(state, batch, runtime.step_rng)
    first = float(metrics['loss']) if first is None else first
  assert float(metrics['loss']) < 0.8 * first
  prob = np.asarray(jax.jit(phase.members)(state.params, batch['image'], None))[0]  # K = 1
  assert prob.shape == batch['mask'].shape and float(prob.min()) >= 0 and float(prob.max()) <= 1
  # The segmenter's probability beats chance on its training batch (it has learned the squares).
  assert float(np.mean((prob >= 0.5) == (np.asarray(batch['mask']) > 0))) > 0.9


def test_wrong_external_weights_fail_with_one_line(smoke_config, tmp_path):
  config = smoke_config
  encoder = _pretrained_params(config)['params']['encoder']
  encoder = {**encoder, 'stem': {**encoder['stem'], 'kernel': jnp.zeros((3, 3, 1, 8))}}
  path = str(tmp_path / 'bad.npz')
  weights.save_encoder_weights(path, encoder)
  config.pretrain.external_weights = path
  runtime = _runtime(config, tmp_path)
  phase = phases.segmenter_phase(config, str(tmp_path), runtime)
  with pytest.raises(weights.WeightLoadError, match='mis-shaped') as err:
    phase.initial_state(runtime)
  assert '\n' not in str(err.value)
