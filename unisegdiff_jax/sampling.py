"""Samplers: the staged sampler (DDIM steps within each stage, a per-stage budget) and plain DDIM.

Both run one `lax.scan` over a fixed descending list of timesteps; each step converts the network output
with the conversion of the stage that owns that timestep (`diffusion.prediction_to_x0_eps`), clips the
mask estimate to [-mask_scale, mask_scale] and takes a deterministic DDIM step (eta = 0) to the next visited
timestep. The encoder runs once per image. A self-conditioned model gets the previous step's x0 estimate
(zeros at the first step). Results are deterministic given the seed.

`denoise` callables take (features, x_t, t [B], stage_id [B], self_cond) -> prediction; `self_cond` is the
previous x0 estimate, which a model without self-conditioning ignores.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unisegdiff_jax import diffusion


def _estimate(denoise: Callable, features, x, self_cond, t, t_next, process: diffusion.StagedDiffusion):
  """One network evaluation at timestep t: (x0_hat clipped to [-mask_scale, mask_scale], the eps it
  implies, alpha_bar of t_next, 1 when t_next = -1). The conversion is that of the stage owning t."""
  alpha_bar = jnp.asarray(process.alpha_bar)
  t_vec = jnp.full((x.shape[0],), t, jnp.int32)
  prediction = denoise(features, x, t_vec, jnp.take(jnp.asarray(process.lookup.stage_id), t_vec), self_cond)
  x0_hat, _ = diffusion.prediction_to_x0_eps(
      prediction, x, t_vec, jnp.take(jnp.asarray(process.lookup.target_id), t_vec), alpha_bar)
  x0_hat = jnp.clip(x0_hat, -process.mask_scale, process.mask_scale)
  ab = alpha_bar[t]
  ab_next = jnp.where(t_next >= 0, alpha_bar[jnp.maximum(t_next, 0)], 1.0)
  eps_hat = (x - jnp.sqrt(ab) * x0_hat) / jnp.sqrt(1.0 - ab)
  return x0_hat, eps_hat, ab_next


def ddim_sample(denoise: Callable, features, noise: jnp.ndarray, timesteps: np.ndarray,
                process: diffusion.StagedDiffusion, *, return_trajectory: bool = False):
  """Deterministic DDIM over `timesteps` (descending), stage-aware conversions.

  Args:
    denoise: (features, x_t, t [B], stage_id [B], self_cond) -> prediction.
    noise: x_T, [B, H, W, 1].
  Returns:
    x0 estimate [B, H, W, 1] in [-mask_scale, mask_scale]; with return_trajectory also the x0 estimate
    after every step [N, B, H, W, 1] (the "anytime" estimates).
  """
  return ddpm_sample(denoise, features, noise, timesteps, process, None, eta=0.0,
                     return_trajectory=return_trajectory)


def probability_from_x0(x0: jnp.ndarray, process: diffusion.StagedDiffusion) -> jnp.ndarray:
  return process.x0_to_probability(x0)


# ---------------------------------------------------------------------------------------------------------
# DDPM (ancestral) sampling, sampler selection by name and the "anytime" per-stage estimates.

SAMPLERS = ('staged', 'ddim', 'ddpm')
DEFAULT_DDPM_STEPS = 100


def timesteps_for(process: diffusion.StagedDiffusion, sampler: str, num_steps: int | None = None) -> np.ndarray:
  """The descending timesteps `sampler` evaluates (their count is the NFE per image and member).

  staged: the stage table's own budget (`num_steps` must be None); ddim / ddpm: `num_steps` evenly spaced
  timesteps (default: 100 for DDIM, DEFAULT_DDPM_STEPS for DDPM).
  """
  if sampler == 'staged':
    if num_steps is not None:
      raise ValueError('the staged sampler takes its budget from the stage table (steps=), not a step count')
    return diffusion.staged_timesteps(process.stages)
  if sampler in ('ddim', 'ddpm'):
    steps = num_steps if num_steps is not None else (100 if sampler == 'ddim' else DEFAULT_DDPM_STEPS)
    return diffusion.ddim_timesteps(process.num_timesteps, int(steps))
  raise ValueError(f"unknown sampler '{sampler}': choose from {', '.join(SAMPLERS)}")


def config_timesteps(process: diffusion.StagedDiffusion, sampling_config, sampler: str | None = None,
                     num_steps: int | None = None) -> np.ndarray:
  """`timesteps_for` with the step count read from `config.sampling` unless `num_steps` is given."""
  sampler = sampler or sampling_config.sampler
  if num_steps is None and sampler == 'ddim':
    num_steps = int(sampling_config.ddim_steps)
  elif num_steps is None and sampler == 'ddpm':
    num_steps = int(sampling_config.get('ddpm_steps', DEFAULT_DDPM_STEPS))
  return timesteps_for(process, sampler, num_steps)


def ddpm_sample(denoise: Callable, features, noise: jnp.ndarray, timesteps: np.ndarray,
                process: diffusion.StagedDiffusion, rng: jax.Array | None, *, eta: float = 1.0,
                return_trajectory: bool = False):
  """Stochastic (ancestral) sampling over `timesteps` (descending), stage-aware conversions.

  The generalised DDIM step of Song et al. (2021) with noise scale `eta`:
      sigma = eta * sqrt((1 - ab_next) / (1 - ab)) * sqrt(1 - ab / ab_next)
      x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next - sigma^2) eps_hat + sigma z,   z ~ N(0, I)
  eta = 1 over every timestep is ancestral DDPM (posterior variance beta_tilde); over a subsequence it is
  DDPM with the subsequence's own betas. eta = 0 is `ddim_sample`. The last step (to t = -1, ab = 1) has
  sigma = 0 and returns x0_hat exactly. Deterministic given `rng` (step i uses fold_in(rng, i)).

  Args/returns as `ddim_sample`, plus `rng` for the per-step noise (unused, may be None, when eta = 0):
  one key, or one key per row [B, 2] (then a row's noise does not depend on the other rows).
  """
  alpha_bar = jnp.asarray(process.alpha_bar)
  ts = jnp.asarray(timesteps, jnp.int32)
  next_ts = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])
  index = jnp.arange(ts.shape[0], dtype=jnp.int32)

  def step(carry, inputs):
    x, x0_prev = carry
    t, t_next, i = inputs
    x0_hat, eps_hat, ab_next = _estimate(denoise, features, x, x0_prev, t, t_next, process)
    x_next = jnp.sqrt(ab_next) * x0_hat
    if eta == 0.0:
      x_next = x_next + jnp.sqrt(1.0 - ab_next) * eps_hat
    else:
      ab = alpha_bar[t]
      sigma = eta * jnp.sqrt((1.0 - ab_next) / (1.0 - ab)) * jnp.sqrt(jnp.maximum(1.0 - ab / ab_next, 0.0))
      if rng.ndim == 2:  # per-row keys
        z = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], x.dtype))(rng)
      else:
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
      x_next = x_next + jnp.sqrt(jnp.maximum(1.0 - ab_next - sigma ** 2, 0.0)) * eps_hat + sigma * z
    return (x_next, x0_hat), (x0_hat if return_trajectory else None)

  (x0, _), trajectory = jax.lax.scan(step, (noise, jnp.zeros_like(noise)), (ts, next_ts, index))
  return (x0, trajectory) if return_trajectory else x0


def sample(denoise: Callable, features, noise: jnp.ndarray, timesteps: np.ndarray,
           process: diffusion.StagedDiffusion, *, stochastic: bool = False, rng: jax.Array | None = None,
           return_trajectory: bool = False):
  """`ddim_sample` (deterministic: staged, ddim) or `ddpm_sample` (stochastic: ddpm, needs `rng`)."""
  if stochastic:
    if rng is None:
      raise ValueError('stochastic (DDPM) sampling needs an rng')
    return ddpm_sample(denoise, features, noise, timesteps, process, rng, return_trajectory=return_trajectory)
  return ddim_sample(denoise, features, noise, timesteps, process, return_trajectory=return_trajectory)


def stage_end_indices(timesteps: np.ndarray, process: diffusion.StagedDiffusion
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(stage ids, step indices): for every stage the sampler visits, the index of its last visited step.

  Stages are in sampling order (highest noise first); a stage no timestep falls in is left out.
  """
  stage_of_step = np.asarray(process.lookup.stage_id)[np.asarray(timesteps)]
  stage_ids, indices = [], []
  for stage in range(process.num_stages):
    hits = np.nonzero(stage_of_step == stage)[0]
    if hits.size:
      stage_ids.append(stage)
      indices.append(int(hits[-1]))
  return np.asarray(stage_ids, np.int32), np.asarray(indices, np.int32)


def stage_end_estimates(trajectory: jnp.ndarray, timesteps: np.ndarray, process: diffusion.StagedDiffusion
                        ) -> tuple[np.ndarray, jnp.ndarray]:
  """(stage ids, x0 estimates [S', B, H, W, 1]) at the end of each stage, from a sampler's trajectory."""
  stage_ids, indices = stage_end_indices(timesteps, process)
  return stage_ids, trajectory[indices]


def anytime_sample(denoise: Callable, features, noise: jnp.ndarray, process: diffusion.StagedDiffusion
                   ) -> tuple[np.ndarray, jnp.ndarray]:
  """The staged sampler, returning the x0 estimate at the end of every stage ("anytime" segmentation).

  Returns (stage ids, estimates [S, B, H, W, 1]); the last estimate is the staged sampler's result.
  """
  timesteps = diffusion.staged_timesteps(process.stages)
  _, trajectory = ddim_sample(denoise, features, noise, timesteps, process, return_trajectory=True)
  return stage_end_estimates(trajectory, timesteps, process)
