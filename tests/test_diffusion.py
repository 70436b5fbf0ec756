"""Analytic identities of the forward process, target conversions and the stage table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unisegdiff_jax import diffusion


@pytest.fixture
def alpha_bar():
  return jnp.asarray(diffusion.make_alpha_bar('linear', 1000), jnp.float32)


def _random_batch(seed, batch=6, size=8):
  rng = np.random.RandomState(seed)
  x0 = np.where(rng.rand(batch, size, size, 1) > 0.5, 1.0, -1.0).astype(np.float32)
  eps = rng.randn(batch, size, size, 1).astype(np.float32)
  t = rng.randint(0, 1000, size=batch).astype(np.int32)
  return jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t)


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_schedule_is_decreasing_from_one_to_near_zero(schedule):
  ab = diffusion.make_alpha_bar(schedule, 1000)
  assert ab.shape == (1000,)
  assert np.all(np.diff(ab) < 0)
  assert 0.99 < ab[0] <= 1.0 and ab[-1] < 0.01


def test_q_sample_matches_closed_form(alpha_bar):
  x0, eps, t = _random_batch(0)
  x_t = diffusion.q_sample(x0, eps, t, alpha_bar)
  ab = np.asarray(alpha_bar)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-6, atol=1e-6)


def test_q_sample_marginal_variance(alpha_bar):
  # For x0 in {-1, 1}, Var[x_t] = ab * 1 + (1 - ab) * 1 = 1 at every t.
  eps = jax.random.normal(jax.random.PRNGKey(0), (20000, 1, 1, 1))
  x0 = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(1), 0.5, (20000, 1, 1, 1)), 1.0, -1.0)
  for t in (0, 300, 999):
    x_t = diffusion.q_sample(x0, eps, jnp.full((20000,), t), alpha_bar)
    assert abs(float(jnp.var(x_t)) - 1.0) < 0.05


@pytest.mark.parametrize('target', ['x0', 'eps', 'v'])
def test_every_target_converts_back_to_x0_and_eps(alpha_bar, target):
  x0, eps, t = _random_batch(1)
  t = jnp.clip(t, 1, 998)
  x_t = diffusion.q_sample(x0, eps, t, alpha_bar)
  truth = {'x0': x0, 'eps': eps, 'v': diffusion.velocity(x0, eps, t, alpha_bar)}[target]
  target_id = jnp.full(t.shape, diffusion.TARGETS.index(target), jnp.int32)
  x0_hat, eps_hat = diffusion.prediction_to_x0_eps(truth, x_t, t, target_id, alpha_bar)
  tol = 2e-3 if target == 'eps' else 1e-4  # eps -> x0 divides by sqrt(ab_t)
  np.testing.assert_allclose(x0_hat, x0, atol=tol)
  np.testing.assert_allclose(eps_hat, eps, atol=tol)


def test_velocity_identity(alpha_bar):
  x0, eps, t = _random_batch(2)
  ab = jnp.take(alpha_bar, t)[:, None, None, None]
  v = diffusion.velocity(x0, eps, t, alpha_bar)
  x_t = diffusion.q_sample(x0, eps, t, alpha_bar)
  np.testing.assert_allclose(jnp.sqrt(ab) * x_t - jnp.sqrt(1 - ab) * v, x0, atol=1e-5)
  np.testing.assert_allclose(jnp.sqrt(1 - ab) * x_t + jnp.sqrt(ab) * v, eps, atol=1e-5)


def test_mixed_targets_convert_per_sample(alpha_bar):
  x0, eps, t = _random_batch(3)
  x_t = diffusion.q_sample(x0, eps, t, alpha_bar)
  kinds = jnp.array([0, 1, 2, 2, 1, 0], jnp.int32)
  v = diffusion.velocity(x0, eps, t, alpha_bar)
  prediction = jnp.stack([[x0, eps, v][int(k)][i] for i, k in enumerate(kinds)])
  x0_hat, eps_hat = diffusion.prediction_to_x0_eps(prediction, x_t, t, kinds, alpha_bar)
  for i, k in enumerate(np.asarray(kinds)):
    tol = 1e-4 if k != 1 else 0.05  # eps -> x0 divides by sqrt(ab_t), which is small at large t
    np.testing.assert_allclose(x0_hat[i], x0[i], atol=tol)
    np.testing.assert_allclose(eps_hat[i], eps[i], atol=1e-3)


# ----- stage table ------------------------------------------------------------------------------------


def test_default_table_is_the_documented_reconstruction():
  stages = diffusion.parse_stage_table(diffusion.DEFAULT_STAGES, 1000)
  assert [(s.start, s.end, s.target) for s in stages] == [(500, 1000, 'x0'), (200, 500, 'v'), (0, 200, 'eps')]
  assert sum(s.sample_steps for s in stages) <= 10


@pytest.mark.parametrize('name', sorted(diffusion.STAGE_PRESETS))
def test_presets_tile_the_timesteps(name):
  stages = diffusion.parse_stage_table(name, 1000)
  covered = np.zeros(1000, int)
  for s in stages:
    covered[s.start:s.end] += 1
  assert np.all(covered == 1)


@pytest.mark.parametrize('spec, message', [
    ('500:1000 x0; 0:400 eps', 'gap'),
    ('400:1000 x0; 0:500 eps', 'overlap'),
    ('0:900 eps', 'gap'),
    ('0:1001 eps', 'overlap'),
    ('0:1000 epsilon', 'unknown target'),
    ('0:1000 eps loss=l1', 'unknown loss'),
    ('0:1000 eps transform=blur:2', 'needs target x0'),
    ('0:1000 x0 transform=blur:-1', 'bad transform'),
    ('0:1000 x0 colour=red', 'bad stage option'),
    ('0-1000 x0', 'expected'),
    ('', 'empty'),
])
def test_bad_tables_are_rejected_with_one_line(spec, message):
  with pytest.raises(diffusion.StageTableError) as err:
    diffusion.parse_stage_table(spec, 1000)
  assert message in str(err.value)
  assert '\n' not in str(err.value)


def test_stage_options_parse():
  stages = diffusion.parse_stage_table('600:1000 x0 loss=bce_dice weight=2 steps=2 transform=down:4; 0:600 v', 1000)
  assert stages[0] == diffusion.Stage(600, 1000, 'x0', 'bce_dice', 2.0, 2, 'down:4')
  assert stages[1] == diffusion.Stage(0, 600, 'v')


def test_lookup_arrays_match_stage_of():
  stages = diffusion.parse_stage_table('three_stage', 1000)
  lookup = diffusion.stage_lookup(stages, 1000)
  for t in (0, 199, 200, 499, 500, 999):
    i = diffusion.stage_of(stages, t)
    assert lookup.stage_id[t] == i
    assert diffusion.TARGETS[lookup.target_id[t]] == stages[i].target


def test_vectorised_target_selection_matches_a_python_loop(alpha_bar):
  process = diffusion.from_config(_diffusion_config('500:1000 x0 transform=blur:1; 200:500 v; 0:200 eps'))
  x0, eps, _ = _random_batch(4, batch=9)
  t = jnp.array([0, 150, 199, 200, 350, 499, 500, 800, 999], jnp.int32)
  x0_by_stage = jnp.stack([diffusion.transform_mask(x0, s.transform) for s in process.stages])
  target, x0_sel = diffusion.select_targets(x0_by_stage, eps, t, alpha_bar,
                                            jnp.asarray(process.lookup.target_id),
                                            jnp.asarray(process.lookup.stage_id))
  for i, ti in enumerate(np.asarray(t)):
    stage = process.stages[diffusion.stage_of(process.stages, int(ti))]
    clean = diffusion.transform_mask(x0[i:i + 1], stage.transform)[0]
    expected = {'x0': clean, 'eps': eps[i],
                'v': diffusion.velocity(x0[i:i + 1], eps[i:i + 1], t[i:i + 1], alpha_bar)[0]}[stage.target]
    np.testing.assert_allclose(target[i], expected, atol=1e-6)
    np.testing.assert_allclose(x0_sel[i], clean, atol=1e-6)


def test_transforms_coarsen_but_preserve_constants():
  ones = jnp.ones((1, 16, 16, 1))
  np.testing.assert_allclose(diffusion.transform_mask(ones, 'blur:2'), ones, atol=1e-5)
  square = jnp.full((1, 16, 16, 1), -1.0).at[:, 4:12, 4:12].set(1.0)
  blurred = diffusion.transform_mask(square, 'blur:1.5')
  assert float(blurred[0, 8, 8, 0]) > 0.9 and -1 < float(blurred[0, 4, 8, 0]) < 1
  np.testing.assert_allclose(blurred.mean(), square.mean(), atol=0.05)
  pooled = diffusion.transform_mask(square.at[0, 0, 0, 0].set(1.0), 'down:4')
  np.testing.assert_allclose(pooled[0, :4, :4, 0], np.full((4, 4), (1 - 15) / 16))


def test_staged_timesteps_descend_and_count_the_budget():
  stages = diffusion.parse_stage_table('three_stage', 1000)
  ts = diffusion.staged_timesteps(stages)
  assert len(ts) == sum(s.sample_steps for s in stages) == 10
  assert ts[0] == 999 and np.all(np.diff(ts) < 0) and ts[-1] >= 0
  per_stage = [sum(s.start <= t < s.end for t in ts) for s in stages]
  assert per_stage == [s.sample_steps for s in stages]


def test_one_ddim_step_starts_from_pure_noise():
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 1), [999])
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 2), [999, 0])


def test_ddim_timesteps():
  ts = diffusion.ddim_timesteps(1000, 100)
  assert len(ts) == 100 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)


def test_balanced_timestep_sampling_is_uniform_over_stages():
  process = diffusion.from_config(_diffusion_config('900:1000 x0; 0:900 eps'))
  t = diffusion.sample_timesteps(jax.random.PRNGKey(0), 20000, process, 'balanced')
  share = float(jnp.mean(t >= 900))
  assert abs(share - 0.5) < 0.02
  t = diffusion.sample_timesteps(jax.random.PRNGKey(0), 20000, process, 'uniform')
  assert abs(float(jnp.mean(t >= 900)) - 0.1) < 0.02
  assert int(t.min()) >= 0 and int(t.max()) < 1000


def _diffusion_config(stages):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(num_timesteps=1000, schedule='linear', beta_start=1e-4,
                                        beta_end=0.02, stages=stages))
