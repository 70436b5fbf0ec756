"""Samplers: the staged sampler (DDIM steps within each stage, a per-stage budget) and plain DDIM.

Both run one `lax.scan` over a fixed descending list of timesteps; each step converts the network output
with the conversion of the stage that owns that timestep (`diffusion.prediction_to_x0_eps`), clips the
mask estimate to [-1, 1] and takes a deterministic DDIM step (eta = 0) to the next visited timestep. The
encoder runs once per image. Results are deterministic given the seed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unisegdiff_jax import diffusion


def sampler_timesteps(process: diffusion.StagedDiffusion, sampler: str, ddim_steps: int = 100) -> np.ndarray:
  """The descending timesteps a sampler evaluates; their count is the NFE per image."""
  if sampler == 'staged':
    return diffusion.staged_timesteps(process.stages)
  if sampler == 'ddim':
    return diffusion.ddim_timesteps(process.num_timesteps, ddim_steps)
  raise ValueError(f"unknown sampler '{sampler}': choose staged or ddim")


def ddim_sample(denoise: Callable, features, noise: jnp.ndarray, timesteps: np.ndarray,
                process: diffusion.StagedDiffusion, *, return_trajectory: bool = False):
  """Deterministic DDIM over `timesteps` (descending), stage-aware conversions.

  Args:
    denoise: (features, x_t, t [B], stage_id [B]) -> prediction.
    noise: x_T, [B, H, W, 1].
  Returns:
    x0 estimate [B, H, W, 1] in [-1, 1]; with return_trajectory also the x0 estimate after every step
    [N, B, H, W, 1] (the "anytime" estimates).
  """
  alpha_bar = jnp.asarray(process.alpha_bar)
  stage_id_of_t = jnp.asarray(process.lookup.stage_id)
  target_id_of_t = jnp.asarray(process.lookup.target_id)
  ts = jnp.asarray(timesteps, jnp.int32)
  next_ts = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])
  batch = noise.shape[0]

  def step(x, t_pair):
    t, t_next = t_pair
    t_vec = jnp.full((batch,), t, jnp.int32)
    prediction = denoise(features, x, t_vec, jnp.take(stage_id_of_t, t_vec))
    x0_hat, _ = diffusion.prediction_to_x0_eps(prediction, x, t_vec, jnp.take(target_id_of_t, t_vec),
                                               alpha_bar)
    x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    ab, ab_next = alpha_bar[t], jnp.where(t_next >= 0, alpha_bar[jnp.maximum(t_next, 0)], 1.0)
    eps_hat = (x - jnp.sqrt(ab) * x0_hat) / jnp.sqrt(1.0 - ab)
    x_next = jnp.sqrt(ab_next) * x0_hat + jnp.sqrt(1.0 - ab_next) * eps_hat
    return x_next, (x0_hat if return_trajectory else None)

  x0, trajectory = jax.lax.scan(step, noise, (ts, next_ts))
  return (x0, trajectory) if return_trajectory else x0


def probability_from_x0(x0: jnp.ndarray) -> jnp.ndarray:
  return jnp.clip((x0 + 1.0) * 0.5, 0.0, 1.0)


def make_segment_fn(model, process: diffusion.StagedDiffusion, timesteps: np.ndarray):
  """A jit-able (params, images [B,S,S,3], rng) -> foreground probability [B,S,S,1]."""

  def segment(params, images, rng):
    features = model.apply(params, images, method=model.encode)

    def denoise(feats, x_t, t, stage_id):
      return model.apply(params, feats, x_t, t, stage_id, method=model.denoise)

    noise = jax.random.normal(rng, images.shape[:-1] + (1,), jnp.float32)
    return probability_from_x0(ddim_sample(denoise, features, noise, timesteps, process))

  return segment
