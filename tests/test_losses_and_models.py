"""The staged loss against a per-sample reference, BCE/Dice by hand, and model shapes/conditioning."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import conftest
from unisegdiff_jax import diffusion
from unisegdiff_jax import losses
from unisegdiff_jax.models import denoiser as denoiser_lib


def _process(stages='500:1000 x0 loss=bce_dice weight=2; 200:500 v; 0:200 eps weight=0.5'):
  return diffusion.from_config(ml_collections.ConfigDict(dict(
      num_timesteps=1000, schedule='linear', beta_start=1e-4, beta_end=0.02, stages=stages)))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _bce_dice_by_hand(x0_hat, truth):
  """BCE on the logit 4 * x0_hat plus soft Dice (smooth 1), per sample, in float64 numpy."""
  p = _sigmoid(4.0 * np.asarray(x0_hat)).reshape(len(x0_hat), -1)
  g = np.asarray(truth, np.float64).reshape(len(truth), -1)
  bce = -(g * np.log(p) + (1 - g) * np.log(1 - p)).mean(1)
  return bce + 1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)


def test_bce_and_dice_by_hand():
  x0_hat = jnp.array([[0.5, -0.25], [0.1, -1.0]]).reshape(1, 2, 2, 1)
  truth = jnp.array([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 2, 2, 1)
  p = _sigmoid(np.array([2.0, -1.0, 0.4, -4.0]))
  expected_bce = -(np.log(p[0]) + np.log(1 - p[1]) + np.log(p[2]) + np.log(1 - p[3])) / 4
  expected_dice = 1 - (2 * (p[0] + p[2]) + 1) / (p.sum() + 2 + 1)
  np.testing.assert_allclose(losses.bce_dice_from_x0(x0_hat, truth), [expected_bce + expected_dice], rtol=1e-5)
  np.testing.assert_allclose(losses.soft_dice_loss(jnp.asarray(p).reshape(1, 2, 2, 1), truth),
                             [expected_dice], rtol=1e-5)


def test_auxiliary_loss_has_a_gradient_on_the_most_wrong_pixels():
  """A pixel predicted far on the wrong side (x0_hat = -3 where the truth is 1) still gets a gradient."""
  truth = jnp.ones((1, 2, 2, 1))
  grad = jax.grad(lambda x: losses.bce_dice_from_x0(x, truth).sum())(jnp.full((1, 2, 2, 1), -3.0))
  assert np.all(np.asarray(grad) < -0.1)


def test_staged_loss_matches_a_per_sample_reference():
  process = _process()
  rng = np.random.RandomState(0)
  mask = jnp.asarray((rng.rand(8, 8, 8, 1) > 0.5).astype(np.float32))
  weights = jnp.asarray(rng.randn(8, 8, 8, 1).astype(np.float32))

  def predict(x_t, t, stage_id, self_cond):
    del stage_id, self_cond
    return jnp.tanh(x_t * weights + t[:, None, None, None] / 1000.0)

  key = jax.random.PRNGKey(3)
  loss, metrics = losses.staged_loss(predict, mask, key, process, aux_weight=0.3)

  # Reference: the same t / eps, then every sample's target and conversion written out by hand in numpy.
  t_rng, eps_rng = jax.random.split(key, 5)[:2]
  t = np.asarray(diffusion.sample_timesteps(t_rng, 8, process, 'uniform'))
  x0 = np.asarray(mask, np.float64) * 2 - 1
  eps = np.asarray(jax.random.normal(eps_rng, x0.shape), np.float64)
  ab_all = process.alpha_bar[t].astype(np.float64)[:, None, None, None]
  x_t_all = np.sqrt(ab_all) * x0 + np.sqrt(1 - ab_all) * eps
  pred_all = np.asarray(predict(jnp.asarray(x_t_all, jnp.float32), jnp.asarray(t), None, None), np.float64)
  total = []
  for i in range(8):
    ab = float(process.alpha_bar[t[i]])
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    x_t, pred = x_t_all[i:i + 1], pred_all[i:i + 1]
    stage = process.stages[diffusion.stage_of(process.stages, int(t[i]))]
    if stage.target == 'x0':
      target, x0_hat = x0[i:i + 1], pred
    elif stage.target == 'eps':
      target, x0_hat = eps[i:i + 1], (x_t - s * pred) / a
    else:
      target, x0_hat = a * eps[i:i + 1] - s * x0[i:i + 1], a * x_t - s * pred
    main = (float(np.mean((pred - target) ** 2)) if stage.loss == 'mse'
            else float(_bce_dice_by_hand(x0_hat, mask[i:i + 1])[0]))
    aux_scale = min(1.0, a / s) if stage.target == 'eps' else 1.0
    total.append(stage.weight * main + 0.3 * aux_scale * float(_bce_dice_by_hand(x0_hat, mask[i:i + 1])[0]))
  np.testing.assert_allclose(float(loss), np.mean(total), rtol=1e-4)
  assert set(metrics) >= {'loss', 'loss_stage0', 'loss_stage1', 'loss_stage2'}


def test_transformed_stage_builds_x_t_from_its_own_coarse_mask():
  """With transform=down:4 an x0 stage's x_t is q_sample of the coarse mask, so an oracle that returns the
  coarse mask has zero loss and the implied eps is the noise itself."""
  process = _process('0:1000 x0 transform=down:4')
  mask = jnp.asarray((np.random.RandomState(2).rand(4, 8, 8, 1) > 0.5).astype(np.float32))
  coarse = diffusion.transform_mask(mask * 2 - 1, 'down:4')
  seen = []

  def predict(x_t, t, stage_id, self_cond):
    del stage_id, self_cond
    seen.append((x_t, t))
    return coarse

  key = jax.random.PRNGKey(5)
  loss, _ = losses.staged_loss(predict, mask, key, process, aux_weight=0.0)
  assert float(loss) < 1e-10
  x_t, t = seen[0]
  eps = jax.random.normal(jax.random.split(key, 5)[1], mask.shape)
  ab = process.alpha_bar[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(ab) * coarse + np.sqrt(1 - ab) * eps, atol=1e-5)


def test_self_conditioning_feeds_a_gradient_free_first_estimate_to_half_the_samples():
  process = _process('0:1000 x0')
  mask = jnp.ones((64, 4, 4, 1))
  calls = []

  def predict(x_t, t, stage_id, self_cond):
    del t, stage_id
    calls.append(self_cond)
    return jnp.full_like(x_t, 0.25) + 0.0 * self_cond

  losses.staged_loss(predict, mask, jax.random.PRNGKey(0), process, self_condition=True)
  assert len(calls) == 2 and float(jnp.abs(calls[0]).max()) == 0.0  # first pass: no estimate yet
  fed = np.asarray(calls[1])[:, 0, 0, 0]
  assert set(np.round(fed, 6)) <= {0.0, 0.25} and 16 < int((fed == 0.25).sum()) < 48


def test_recycling_builds_x_t_from_the_models_own_estimate_for_x0_stages_only():
  process = _process('500:1000 x0; 0:500 eps')
  mask = jnp.ones((32, 4, 4, 1))
  seen = []

  def predict(x_t, t, stage_id, self_cond):
    del stage_id, self_cond
    seen.append((x_t, t))
    return jnp.full_like(x_t, -0.5)  # at t = T-1 an x0 stage: the model's own estimate is -0.5

  key = jax.random.PRNGKey(1)
  losses.staged_loss(predict, mask, key, process, recycling=1.0)
  (first_x, first_t), (x_t, t) = seen
  assert np.all(np.asarray(first_t) == 999)
  eps = jax.random.normal(jax.random.split(key, 5)[1], mask.shape)
  ab = process.alpha_bar[np.asarray(t)][:, None, None, None]
  source = np.where(np.asarray(t)[:, None, None, None] >= 500, -0.5, 1.0)  # recycled for x0 stages only
  np.testing.assert_allclose(x_t, np.sqrt(ab) * source + np.sqrt(1 - ab) * eps, atol=1e-5)


def test_mask_scale_scales_the_diffused_mask():
  process = _process('0:1000 x0')
  scaled = diffusion.from_config(ml_collections.ConfigDict(dict(
      num_timesteps=1000, schedule='linear', beta_start=1e-4, beta_end=0.02, stages='0:1000 x0', mask_scale=0.1)))
  mask = jnp.asarray([[0.0, 1.0]]).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(scaled.mask_to_x0(mask).ravel(), [-0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(scaled.x0_to_probability(jnp.array([-0.1, 0.0, 0.05, 0.2])), [0, 0.5, 0.75, 1])
  # An oracle in scaled units has zero loss.
  loss, _ = losses.staged_loss(lambda x_t, t, s, c: scaled.mask_to_x0(mask), mask, jax.random.PRNGKey(0), scaled)
  assert float(loss) < 1e-10 and process.mask_scale == 1.0


def test_perfect_prediction_has_zero_mse():
  process = _process('500:1000 x0; 200:500 v; 0:200 eps')
  mask = jnp.asarray((np.random.RandomState(1).rand(16, 8, 8, 1) > 0.5).astype(np.float32))
  key = jax.random.PRNGKey(0)
  t_rng, eps_rng = jax.random.split(key, 5)[:2]
  t = diffusion.sample_timesteps(t_rng, 16, process, 'uniform')
  eps = jax.random.normal(eps_rng, mask.shape)
  x0 = mask * 2 - 1
  alpha_bar = jnp.asarray(process.alpha_bar)
  oracle, _ = diffusion.select_targets(x0[None].repeat(3, 0), eps, t, alpha_bar,
                                       jnp.asarray(process.lookup.target_id), jnp.asarray(process.lookup.stage_id))
  loss, _ = losses.staged_loss(lambda x_t, tt, s, c: oracle, mask, key, process, aux_weight=0.0)
  assert float(loss) < 1e-10


def _tiny_model_config():
  return ml_collections.ConfigDict(dict(
      dtype='float32', num_groups=4,
      encoder=dict(widths=(8, 16, 16, 16), blocks_per_scale=1),
      denoiser=dict(base_width=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention_levels=(3,),
                    num_heads=2, dropout=0.0)))


def _random_params(model, *args, scale=0.2):
  """Random parameters of the model's shapes (eval_shape: nothing compiled; the zero-initialised output layer
  is live)."""
  return conftest.random_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), *args), scale)


def test_encoder_gives_four_scales_and_denoiser_keeps_the_mask_shape():
  """Shapes and parameter names by abstract evaluation (no compilation)."""
  model = denoiser_lib.build_model(_tiny_model_config(), num_stages=3)
  image, x_t = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 32, 32, 1))
  t = jnp.array([10, 900])
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, x_t, t, jnp.array([2, 0]))
  conditioning = jax.eval_shape(lambda p, i: model.apply(p, i, method=model.encode), params, image)
  assert [f.shape for f in conditioning["features"]] == [(2, 32, 32, 8), (2, 16, 16, 16), (2, 8, 8, 16), (2, 4, 4, 16)]
  out = jax.eval_shape(lambda p, c: model.apply(p, c, x_t, t, jnp.array([2, 0]), method=model.denoise),
                       params, conditioning)
  assert out.shape == (2, 32, 32, 1)
  # The attention module exists only at the lowest resolution.
  names = jax.tree_util.tree_leaves_with_path(params)
  attn = {jax.tree_util.keystr(p) for p, _ in names if 'attn' in jax.tree_util.keystr(p)}
  assert attn and all('_3_' in a or 'mid_attn' in a for a in attn)


def test_output_depends_on_image_time_and_stage():
  model = denoiser_lib.build_model(_tiny_model_config(), num_stages=3)
  rng = np.random.RandomState(0)
  image = jnp.asarray(rng.randn(1, 32, 32, 3).astype(np.float32))
  x_t = jnp.asarray(rng.randn(1, 32, 32, 1).astype(np.float32))
  params = _random_params(model, image, x_t, jnp.array([5]), jnp.array([0]), scale=0.1)
  apply = jax.jit(model.apply)  # one program for the four calls
  base = apply(params, image, x_t, jnp.array([5]), jnp.array([0]))
  for changed in (apply(params, image * 0.5, x_t, jnp.array([5]), jnp.array([0])),
                  apply(params, image, x_t, jnp.array([700]), jnp.array([0])),
                  apply(params, image, x_t, jnp.array([5]), jnp.array([1]))):
    assert float(jnp.max(jnp.abs(changed - base))) > 1e-4


def test_mismatched_scales_are_refused():
  config = _tiny_model_config()
  config.encoder.widths = (8, 16, 16)
  model = denoiser_lib.build_model(config, num_stages=1)
  with pytest.raises(ValueError, match='same length'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 1)),
               jnp.array([1]), jnp.array([0]))
