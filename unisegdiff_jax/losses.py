"""The stage-aware diffusion loss, plus BCE and soft Dice on masks.

Every sample picks its target (x0, eps or v), its clean mask (coarsened or not), its loss kind and its
weight from its timestep through lookup arrays: one jit-compiled function, no Python branch per sample.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from unisegdiff_jax import diffusion

_PROB_EPS = 1e-4


def mask_probability(x0_hat: jnp.ndarray) -> jnp.ndarray:
  """The foreground probability implied by a {-1,+1}-scaled mask estimate."""
  return jnp.clip((x0_hat + 1.0) * 0.5, _PROB_EPS, 1.0 - _PROB_EPS)


def binary_cross_entropy(prob: jnp.ndarray, truth: jnp.ndarray) -> jnp.ndarray:
  """Per-sample mean BCE over all but the batch axis."""
  bce = -(truth * jnp.log(prob) + (1.0 - truth) * jnp.log(1.0 - prob))
  return bce.reshape(bce.shape[0], -1).mean(axis=1)


def soft_dice_loss(prob: jnp.ndarray, truth: jnp.ndarray, smooth: float = 1.0) -> jnp.ndarray:
  """Per-sample 1 - soft Dice."""
  p = prob.reshape(prob.shape[0], -1)
  g = truth.reshape(truth.shape[0], -1)
  return 1.0 - (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def bce_dice(prob: jnp.ndarray, truth: jnp.ndarray) -> jnp.ndarray:
  return binary_cross_entropy(prob, truth) + soft_dice_loss(prob, truth)


def staged_loss(predict: Callable[..., jnp.ndarray], mask: jnp.ndarray, rng: jax.Array,
                process: diffusion.StagedDiffusion, *, timestep_sampling: str = 'uniform',
                aux_weight: float = 0.0, aux_max_t: int | None = None):
  """The UniSegDiff training loss for one batch.

  Args:
    predict: (x_t, t, stage_id) -> network output [B, H, W, 1]; closes over params and the image.
    mask: [B, H, W, 1] in {0, 1}.
    rng: randomness for timesteps and noise.
    process: the staged diffusion (schedule + stage table).
  Returns:
    (scalar loss, dict of scalar metrics incl. per-stage losses).
  """
  batch = mask.shape[0]
  t_rng, eps_rng = jax.random.split(rng)
  alpha_bar = jnp.asarray(process.alpha_bar)
  lookup = process.lookup
  x0 = mask * 2.0 - 1.0
  t = diffusion.sample_timesteps(t_rng, batch, process, timestep_sampling)
  eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)
  x_t = diffusion.q_sample(x0, eps, t, alpha_bar)
  stage_id = jnp.take(jnp.asarray(lookup.stage_id), t)
  prediction = predict(x_t, t, stage_id)

  # The clean mask as each stage sees it (static loop over stages, not over samples).
  x0_by_stage = jnp.stack([diffusion.transform_mask(x0, s.transform) for s in process.stages])
  target, x0_stage = diffusion.select_targets(
      x0_by_stage, eps, t, alpha_bar, jnp.asarray(lookup.target_id), jnp.asarray(lookup.stage_id))
  target_id = jnp.take(jnp.asarray(lookup.target_id), t)
  x0_hat, _ = diffusion.prediction_to_x0_eps(prediction, x_t, t, target_id, alpha_bar)

  mse = jnp.mean(jnp.square(prediction - target).reshape(batch, -1), axis=1)
  prob = mask_probability(x0_hat)
  stage_bce_dice = bce_dice(prob, (x0_stage + 1.0) * 0.5)
  loss_id = jnp.take(jnp.asarray(lookup.loss_id), t)
  main = jnp.where(loss_id == 0, mse, stage_bce_dice) * jnp.take(jnp.asarray(lookup.weight), t)

  aux = bce_dice(prob, mask)
  aux_on = (t < (process.num_timesteps if aux_max_t is None else aux_max_t)).astype(jnp.float32)
  per_sample = main + aux_weight * aux_on * aux
  loss = jnp.mean(per_sample)

  metrics = {'loss': loss, 'main_loss': jnp.mean(main), 'aux_loss': jnp.mean(aux)}
  for i in range(process.num_stages):
    in_stage = (stage_id == i).astype(jnp.float32)
    metrics[f'loss_stage{i}'] = jnp.sum(per_sample * in_stage) / jnp.maximum(jnp.sum(in_stage), 1.0)
  return loss, metrics
