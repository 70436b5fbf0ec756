"""The learning-rate schedule as a program argument: the same rates as optax's warm-up + cosine schedule, and
the unit-rate optimiser scaled by it makes the same updates as optax's AdamW with that schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unisegdiff_jax import schedules

CASES = [(1e-3, 10, 100), (3e-4, 0, 50), (2e-3, 50, 20), (1e-4, 5, 1), (1e-3, 1, 2), (5e-4, 300, 2500)]


def _optax_schedule(peak, warmup_steps, num_steps):
  """The schedule as it was built from optax before the rate became an argument (the reference)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=min(warmup_steps, max(num_steps - 1, 1)),
      decay_steps=max(num_steps, warmup_steps + 1), end_value=0.0)


@pytest.mark.parametrize('peak, warmup, num_steps', CASES)
def test_rates_match_optax(peak, warmup, num_steps):
  counts = np.arange(0, num_steps + 3)
  ours = jax.jit(jax.vmap(schedules.learning_rate, in_axes=(0, None)))(counts, schedules.schedule_args(
      peak, warmup, num_steps))
  reference = np.asarray(_optax_schedule(peak, warmup, num_steps)(jnp.asarray(counts)))
  np.testing.assert_allclose(np.asarray(ours), reference, rtol=2e-5, atol=1e-10)


def test_one_program_for_every_schedule():
  rate = jax.jit(schedules.learning_rate)
  values = [float(rate(7, schedules.schedule_args(*case))) for case in CASES]
  assert rate._cache_size() == 1  # pylint: disable=protected-access
  assert len(set(values)) > 1


def test_unit_rate_adamw_scaled_by_the_schedule_is_optax_adamw_with_it():
  rs = np.random.RandomState(0)
  params = {'w': jnp.asarray(rs.randn(5, 3), jnp.float32), 'b': jnp.asarray(rs.randn(3), jnp.float32)}
  peak, warmup, num_steps = 1e-2, 3, 10
  reference_tx = optax.adamw(_optax_schedule(peak, warmup, num_steps), weight_decay=0.05)
  unit_tx = optax.adamw(schedules.unit_rate, weight_decay=0.05)
  args = schedules.schedule_args(peak, warmup, num_steps)
  p_ref, p_unit = params, params
  s_ref, s_unit = reference_tx.init(params), unit_tx.init(params)
  assert jax.tree_util.tree_structure(s_ref) == jax.tree_util.tree_structure(s_unit)  # checkpoint layout kept
  for step in range(num_steps + 2):
    grads = jax.tree_util.tree_map(lambda x, s=step: jnp.sin(x * (s + 1)), p_ref)
    u_ref, s_ref = reference_tx.update(grads, s_ref, p_ref)
    u_unit, s_unit = unit_tx.update(grads, s_unit, p_unit)
    rate = schedules.learning_rate(step, args)
    p_ref = optax.apply_updates(p_ref, u_ref)
    p_unit = optax.apply_updates(p_unit, jax.tree_util.tree_map(lambda u, r=rate: r * u, u_unit))
    for a, b in zip(jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(p_unit)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
