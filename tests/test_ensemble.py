"""Samplers (DDPM / DDIM / staged: NFE, determinism, oracle recovery, anytime estimates) and ensemble fusion."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import conftest
from unisegdiff_jax import diffusion
from unisegdiff_jax import ensemble
from unisegdiff_jax import inference
from unisegdiff_jax import phases
from unisegdiff_jax import sampling


def _process(stages='three_stage', num_timesteps=1000):
  config = ml_collections.ConfigDict(dict(num_timesteps=num_timesteps, schedule='linear', beta_start=1e-4,
                                          beta_end=0.02, stages=stages))
  return diffusion.from_config(config)


def _oracle(process):
  """A denoiser that knows x0 (passed as `features`) and returns the exact target of the stage owning t."""
  alpha_bar = jnp.asarray(process.alpha_bar)
  target_of_t = jnp.asarray(process.lookup.target_id)

  def denoise(x0, x_t, t, stage_id, self_cond=None):
    del stage_id
    ab = jnp.take(alpha_bar, t)[:, None, None, None]
    a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    eps = (x_t - a * x0) / s
    v = a * eps - s * x0
    kind = jnp.take(target_of_t, t)[:, None, None, None]
    return jnp.where(kind == 0, x0, jnp.where(kind == 1, eps, v))

  return denoise


def _x0_and_noise(seed=0, shape=(2, 8, 8, 1)):
  rng = np.random.RandomState(seed)
  x0 = jnp.asarray(np.where(rng.rand(*shape) > 0.5, 1.0, -1.0), jnp.float32)
  noise = jnp.asarray(rng.randn(*shape), jnp.float32)
  return x0, noise


def _run(sampler, process, denoise, features, noise, num_steps=None, rng=None, trajectory=False):
  timesteps = sampling.timesteps_for(process, sampler, num_steps)
  return sampling.sample(denoise, features, noise, timesteps, process, stochastic=sampler == 'ddpm',
                         rng=rng if rng is not None else jax.random.PRNGKey(0), return_trajectory=trajectory)


# ---------------------------------------------------------------------------------------------------------
# Timesteps and NFE.


def test_timesteps_and_nfe_counts():
  process = _process()
  assert len(sampling.timesteps_for(process, 'staged')) == 1 + 4 + 5
  assert len(sampling.timesteps_for(process, 'ddim', 7)) == 7
  assert len(sampling.timesteps_for(process, 'ddpm', 50)) == 50
  assert len(sampling.timesteps_for(process, 'ddpm')) == sampling.DEFAULT_DDPM_STEPS
  for name, steps in (('ddim', 13), ('ddpm', 1000)):
    ts = sampling.timesteps_for(process, name, steps)
    assert ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
  with pytest.raises(ValueError, match='unknown sampler'):
    sampling.timesteps_for(process, 'euler', 10)
  with pytest.raises(ValueError, match='stage table'):
    sampling.timesteps_for(process, 'staged', 10)
  sampling_config = ml_collections.ConfigDict(dict(sampler='ddpm', ddim_steps=20))
  assert len(sampling.config_timesteps(process, sampling_config)) == sampling.DEFAULT_DDPM_STEPS
  assert len(sampling.config_timesteps(process, sampling_config, 'ddim')) == 20


@pytest.mark.parametrize('sampler,steps,expected', [('staged', None, 10), ('ddim', 6, 6), ('ddpm', 9, 9)])
def test_each_sampler_calls_the_denoiser_once_per_step(sampler, steps, expected):
  process = _process()
  calls = []
  oracle = _oracle(process)

  def counting(x0, x_t, t, stage_id, self_cond=None):
    jax.debug.callback(lambda: calls.append(1))
    return oracle(x0, x_t, t, stage_id)

  x0, noise = _x0_and_noise()
  out, trajectory = _run(sampler, process, counting, x0, noise, steps, trajectory=True)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert len(calls) == expected
  assert trajectory.shape == (expected,) + x0.shape


# ---------------------------------------------------------------------------------------------------------
# Oracle recovery: the exact target at every step gives back x0.


@pytest.mark.parametrize('stages,sampler,steps', [
    ('three_stage', 'staged', None), ('three_stage', 'ddim', 8), ('three_stage', 'ddpm', 25),
    ('eps_only', 'ddim', 8), ('v_only', 'ddpm', 25), ('two_stage', 'staged', None)])
def test_oracle_denoiser_recovers_x0(stages, sampler, steps):
  process = _process(stages)
  x0, noise = _x0_and_noise(1)
  out, trajectory = _run(sampler, process, _oracle(process), x0, noise, steps, trajectory=True)
  np.testing.assert_allclose(out, x0, atol=1e-3)
  # Every intermediate estimate is (close to) x0 as well: the DDPM noise never reaches the estimate.
  np.testing.assert_allclose(trajectory, jnp.broadcast_to(x0, trajectory.shape), atol=5e-3)


def test_ddpm_returns_the_last_estimate_exactly():
  process = _process()
  x0, noise = _x0_and_noise(2)
  # A deliberately wrong (but fixed) denoiser: the result is x0_hat of the last step, not a noisy x.
  def constant_x0(feats, x_t, t, stage_id, self_cond=None):
    del feats, t, stage_id
    return jnp.full_like(x_t, 0.25)  # at t=0 (eps stage) this is an eps prediction

  out, trajectory = _run('ddpm', process, constant_x0, None, noise, 20, trajectory=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(trajectory[-1]))


def test_two_ddim_steps_by_hand():
  """DDIM over [600, 300] with an eps model, written out in numpy: convert, clip, step, convert, clip."""
  process = _process('0:1000 eps steps=2')
  _, noise = _x0_and_noise(3)
  weights = jnp.linspace(-0.5, 0.5, 64).reshape(1, 8, 8, 1)

  def linear(feats, x_t, t, stage_id, self_cond=None):
    return 0.7 * x_t + weights + 1e-4 * t[:, None, None, None]

  out = sampling.ddim_sample(linear, None, noise, np.array([600, 300]), process)
  x, w = np.asarray(noise, np.float64), np.asarray(weights, np.float64)
  for t, t_next in ((600, 300), (300, -1)):
    ab = float(process.alpha_bar[t])
    ab_next = 1.0 if t_next < 0 else float(process.alpha_bar[t_next])
    eps = 0.7 * x + w + 1e-4 * t
    x0 = np.clip((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), -1, 1)
    eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
    x = np.sqrt(ab_next) * x0 + np.sqrt(1 - ab_next) * eps
  np.testing.assert_allclose(out, x, atol=1e-5)
  assert 0 < np.mean(np.abs(x)) and np.all(np.abs(x) <= 1)


def test_self_conditioned_sampler_feeds_the_previous_estimate():
  """x0 model = 0.1 t / 1000 + 0.5 * (previous estimate): three steps give 0.01 + 0.5 (0.05 + 0.5 0.09)."""
  process = _process('0:1000 x0 steps=3')
  _, noise = _x0_and_noise(5)

  def model(feats, x_t, t, stage_id, self_cond):
    return 0.1 * t[:, None, None, None] / 1000.0 + 0.0 * x_t + 0.5 * self_cond

  out = sampling.ddim_sample(model, None, noise, np.array([900, 500, 100]), process)
  np.testing.assert_allclose(out, np.full(noise.shape, 0.01 + 0.5 * (0.05 + 0.5 * 0.09)), atol=1e-6)


def test_ddpm_is_deterministic_given_the_key_and_stochastic_across_keys():
  process = _process()
  _, noise = _x0_and_noise(4)

  def shrink(feats, x_t, t, stage_id, self_cond=None):
    return 0.5 * x_t

  a = _run('ddpm', process, shrink, None, noise, 10, rng=jax.random.PRNGKey(1))
  b = _run('ddpm', process, shrink, None, noise, 10, rng=jax.random.PRNGKey(1))
  c = _run('ddpm', process, shrink, None, noise, 10, rng=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_stage_end_estimates_are_the_anytime_segmentations():
  process = _process()
  ts = sampling.timesteps_for(process, 'staged')
  stage_ids, indices = sampling.stage_end_indices(ts, process)
  np.testing.assert_array_equal(stage_ids, [0, 1, 2])
  np.testing.assert_array_equal(indices, [0, 4, 9])
  # DDIM with 3 steps visits t = 999, 500 (both stage 0 ... 500 is in stage 0: [500, 1000)) and 0.
  ddim_ids, ddim_idx = sampling.stage_end_indices(sampling.timesteps_for(process, 'ddim', 3), process)
  np.testing.assert_array_equal(ddim_ids, [0, 2])
  np.testing.assert_array_equal(ddim_idx, [1, 2])

  _, noise = _x0_and_noise(5)

  def shrink(feats, x_t, t, stage_id, self_cond=None):
    return 0.3 * x_t + 0.1 * stage_id[:, None, None, None]

  ids, estimates = sampling.anytime_sample(shrink, None, noise, process)
  np.testing.assert_array_equal(ids, [0, 1, 2])
  assert estimates.shape == (3,) + noise.shape
  np.testing.assert_allclose(estimates[-1], sampling.ddim_sample(shrink, None, noise, ts, process), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Fusion and uncertainty on hand-made members.


def test_mean_fusion_and_std_by_hand():
  members = np.array([[0.2, 0.9, 0.6], [0.4, 0.7, 0.2], [0.6, 0.8, 0.4]], np.float32)  # [K=3, 3 pixels]
  fused = ensemble.fuse(members, 'mean', 0.5)
  np.testing.assert_allclose(fused.prob, [0.4, 0.8, 0.4], atol=1e-6)
  np.testing.assert_array_equal(fused.mask, [False, True, False])
  expected_std = np.sqrt(np.mean((members - members.mean(0)) ** 2, axis=0))
  np.testing.assert_allclose(fused.std, expected_std, atol=1e-6)
  np.testing.assert_allclose(fused.std[0], np.sqrt(((0.2 - 0.4) ** 2 + 0 + (0.6 - 0.4) ** 2) / 3), atol=1e-6)
  np.testing.assert_allclose(fused.uncertainty_map(), np.clip(2 * expected_std, 0, 1), atol=1e-6)
  assert fused.ensemble_size == 3


def test_vote_fusion_is_the_majority_of_thresholded_members():
  members = np.array([[0.9, 0.1, 0.6, 0.4], [0.8, 0.2, 0.4, 0.4], [0.1, 0.9, 0.7, 0.45]], np.float32)
  fused = ensemble.fuse(members, 'vote', 0.5)
  np.testing.assert_allclose(fused.prob, [2 / 3, 1 / 3, 2 / 3, 0.0], atol=1e-6)
  np.testing.assert_array_equal(fused.mask, [True, False, True, False])
  # Mean fusion disagrees with the vote on pixel 0 only in confidence, on pixel 3 not at all.
  assert ensemble.mask_threshold('vote', 0.3) == 0.5 and ensemble.mask_threshold('mean', 0.3) == 0.3


def test_staple_with_one_bad_rater_gives_the_majority():
  rng = np.random.RandomState(0)
  truth = np.zeros((32, 32), bool)
  truth[8:20, 6:22] = True
  bad = rng.rand(32, 32) > 0.5  # a random rater
  members = np.stack([truth, truth, bad]).astype(np.float32)
  posterior, sensitivity, specificity = ensemble.staple(members > 0.5)
  majority = members.sum(0) >= 2
  np.testing.assert_array_equal(posterior >= 0.5, majority)
  np.testing.assert_array_equal(majority, truth)
  assert sensitivity[2] < 0.7 and specificity[2] < 0.7 and sensitivity[0] > 0.99 and specificity[0] > 0.99
  fused = ensemble.fuse(members, 'staple', 0.5)
  np.testing.assert_array_equal(fused.mask, majority)
  np.testing.assert_allclose(fused.prob, posterior, atol=1e-6)
  assert fused.prob[truth].min() > 0.9 and fused.prob[~truth].max() < 0.1


def test_staple_trusts_the_reliable_rater_where_raters_split():
  # Three raters, each wrong on a few pixels: STAPLE's mask is the majority where two of them agree.
  truth = np.zeros((20, 20), bool)
  truth[5:15, 4:16] = True
  raters = np.stack([truth] * 3)
  raters[0, 5, 4:7] = False
  raters[1, 14, 10:13] = False
  raters[2, 0:2, 0:3] = True
  posterior, _, _ = ensemble.staple(raters)
  np.testing.assert_array_equal(posterior >= 0.5, raters.sum(0) >= 2)


def test_staple_of_identical_raters_is_their_labels():
  labels = np.zeros((10, 10), bool)
  labels[2:5, 3:8] = True
  posterior, _, _ = ensemble.staple(np.stack([labels] * 4))
  np.testing.assert_array_equal(posterior >= 0.5, labels)
  empty, _, _ = ensemble.staple(np.zeros((3, 5, 5), bool))
  assert not (empty >= 0.5).any()


@pytest.mark.parametrize('fusion', ensemble.FUSIONS)
def test_agreeing_members_have_zero_uncertainty(fusion):
  member = np.zeros((6, 6), np.float32)
  member[1:4, 2:5] = 1.0
  fused = ensemble.fuse(np.stack([member] * 3), fusion, 0.5)
  np.testing.assert_array_equal(fused.mask, member > 0.5)
  np.testing.assert_allclose(fused.std, 0.0)
  np.testing.assert_allclose(fused.uncertainty_map(), 0.0, atol=1e-6)
  np.testing.assert_allclose(fused.entropy, 0.0, atol=1e-6)


def test_binary_entropy_in_bits():
  np.testing.assert_allclose(ensemble.binary_entropy(np.array([0.0, 0.5, 1.0, 0.25])),
                             [0.0, 1.0, 0.0, 0.811278], atol=1e-5)
  single = ensemble.fuse(np.array([[0.5, 0.0, 0.9]], np.float32), 'mean', 0.5)
  np.testing.assert_allclose(single.uncertainty_map(), ensemble.binary_entropy(np.array([0.5, 0.0, 0.9])),
                             atol=1e-6)


def test_settings_from_config_reads_new_fields_with_defaults():
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config('smoke')
  settings = ensemble.settings_from_config(config)
  assert (settings.sampler, settings.ensemble_size, settings.fusion) == ('ddim', 1, 'mean')  # the default
  assert settings.num_steps == 1 and settings.label == 'ddim:1'
  staged = ensemble.settings_from_config(config, sampler='staged')
  assert staged.num_steps is None and staged.label == 'staged'
  ddpm = ensemble.settings_from_config(config, sampler='ddpm', ensemble_size=3, fusion='staple')
  assert ddpm.stochastic and ddpm.num_steps == sampling.DEFAULT_DDPM_STEPS and ddpm.label == 'ddpm:100'
  with pytest.raises(ensemble.EnsembleConfigError, match='fusion'):
    ensemble.settings_from_config(config, fusion='median')
  with pytest.raises(ensemble.EnsembleConfigError, match='ensemble_size'):
    ensemble.settings_from_config(config, ensemble_size=0)
  with pytest.raises(ensemble.EnsembleConfigError, match='ddim_steps'):
    ensemble.settings_from_config(config, sampler='ddim', num_steps=5000)


# ---------------------------------------------------------------------------------------------------------
# The batched ensemble with a real (tiny, untrained) model.


@pytest.fixture(scope='module')
def tiny_model():
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from unisegdiff_jax.models import denoiser as denoiser_lib  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config('smoke')
  config.data.image_size = 16
  config.model.encoder.widths = (8,)
  config.model.denoiser.channel_mult = (1,)
  config.model.denoiser.attention_levels = ()
  config.diffusion.stages = '500:1000 x0 steps=1; 0:500 eps steps=2'
  process = diffusion.from_config(config.diffusion)
  # With the phase-0 decoder, so the conditioning folded into the batch is {features, coarse_logits}.
  model = denoiser_lib.build_model(config.model, process.num_stages, coarse_logits_decoder_width=8)
  # Random weights without compiling model.init (~10 s on a small CPU).
  t = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 1)), t, t))
  params = conftest.random_params(shapes)
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  return model, process, params, images


@pytest.mark.parametrize('sampler,steps,fusion', [('staged', None, 'staple'), ('ddpm', 3, 'mean')])
def test_ensemble_members_fold_into_the_batch(tiny_model, sampler, steps, fusion):
  model, process, params, images = tiny_model
  settings = ensemble.Settings(sampler, steps, 3, fusion, 0.5)
  members_fn, nfe = phases.diffusion_members(model, process, settings)
  members3 = jax.jit(members_fn)
  ts = sampling.timesteps_for(process, sampler, steps)
  assert nfe == 3 * len(ts)
  keys = ensemble.case_keys(jax.random.PRNGKey(7), ['a', 'b'], 2)
  a = np.asarray(members3(params, images, keys))
  assert a.shape == (3, 2, 16, 16, 1) and np.all((a >= 0) & (a <= 1))
  np.testing.assert_array_equal(a, np.asarray(members3(params, images, keys)))  # same keys, same members
  other = ensemble.case_keys(jax.random.PRNGKey(8), ['a', 'b'], 2)
  assert np.abs(a - np.asarray(members3(params, images, other))).max() > 1e-4
  assert np.abs(a[0] - a[1]).max() > 1e-4 and np.abs(a[1] - a[2]).max() > 1e-4  # members differ
  # The engine fuses the same members (on the device for mean, STAPLE per image on the host).
  engine = inference.Engine(members_fn, settings, image_size=16, batch_size=2)
  out = engine.run(params, np.asarray(images), ['a', 'b'], jax.random.PRNGKey(7))
  assert out.prob.shape == (2, 16, 16, 1)
  for b in range(2):
    np.testing.assert_allclose(out.prob[b], ensemble.fuse(a[:, b], fusion, 0.5).prob, atol=1e-5)
    np.testing.assert_allclose(out.std[b], a[:, b].std(axis=0), atol=1e-5)
  if sampler == 'staged':
    # Member 0 of any ensemble (so an ensemble of one) is the one-member sample.
    one, _ = phases.diffusion_members(model, process, ensemble.Settings(sampler, steps, 1, 'mean', 0.5))
    np.testing.assert_allclose(a[0], np.asarray(jax.jit(one)(params, images, keys))[0], atol=1e-5)


@pytest.mark.parametrize('sampler,steps', [('staged', None), ('ddpm', 3)])
def test_a_cases_result_does_not_depend_on_its_batch(tiny_model, sampler, steps):
  """Through the inference engine: image 'b' alone, after image 'a', or in a bigger engine batch: the same
  fused probability and member spread."""
  model, process, params, images = tiny_model
  settings = ensemble.Settings(sampler, steps, 2, 'mean', 0.5)
  members_fn, _ = phases.diffusion_members(model, process, settings)
  rng = jax.random.PRNGKey(3)
  images = np.asarray(images)
  small = inference.Engine(members_fn, settings, image_size=16, batch_size=2)
  big = inference.Engine(members_fn, settings, image_size=16, batch_size=4)
  pair = small.run(params, images, ['a', 'b'], rng)
  alone = small.run(params, images[1:], ['b'], rng)
  bigger = big.run(params, np.concatenate([images, images[:1]]), ['a', 'b', 'c'], rng)
  for out, index in ((alone, 0), (bigger, 1)):
    np.testing.assert_allclose(out.prob[index], pair.prob[1], atol=1e-5)
    np.testing.assert_allclose(out.std[index], pair.std[1], atol=1e-5)
  assert np.abs(pair.std[1]).max() > 1e-4  # the two members differ: the check is not vacuous
