"""The stage-aware diffusion loss, plus BCE and soft Dice on mask estimates.

Every sample picks its target (x0, eps or v), its clean mask (coarsened or not), its loss kind and its
weight from its timestep through lookup arrays: one jit-compiled function, no Python branch per sample.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from unisegdiff_jax import diffusion

# The logit of a {-1,+1}-scaled mask estimate x: LOGIT_SCALE * x (so x = +-1 means p = 0.982 / 0.018). BCE
# on this logit keeps a gradient for the most wrong pixels, where a probability clipped from (x + 1) / 2
# would give none.
LOGIT_SCALE = 4.0


def bce_dice_from_x0(x0_hat: jnp.ndarray, truth: jnp.ndarray) -> jnp.ndarray:
  """Per-sample BCE (on the logit LOGIT_SCALE * x0_hat, numerically stable) + soft Dice."""
  logits = LOGIT_SCALE * x0_hat
  bce = jnp.maximum(logits, 0) - logits * truth + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return bce.reshape(bce.shape[0], -1).mean(axis=1) + soft_dice_loss(jax.nn.sigmoid(logits), truth)


def soft_dice_loss(prob: jnp.ndarray, truth: jnp.ndarray, smooth: float = 1.0) -> jnp.ndarray:
  """Per-sample 1 - soft Dice."""
  p = prob.reshape(prob.shape[0], -1)
  g = truth.reshape(truth.shape[0], -1)
  return 1.0 - (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def staged_loss(predict: Callable[..., jnp.ndarray], mask: jnp.ndarray, rng: jax.Array,
                process: diffusion.StagedDiffusion, *, timestep_sampling: str = 'uniform',
                aux_weight: float = 0.0, aux_max_t: int | None = None, self_condition: bool = False,
                recycling: float = 0.0, t: jnp.ndarray | None = None):
  """The UniSegDiff training loss for one batch.

  Args:
    predict: (x_t, t, stage_id, self_cond) -> network output [B, H, W, 1]; closes over params and the
      image. `self_cond` is the previous x0 estimate (zeros = none) when `self_condition`, else None.
    mask: [B, H, W, 1] in {0, 1}.
    rng: randomness for timesteps, noise and the self-conditioning / recycling coin flips.
    process: the staged diffusion (schedule + stage table + mask scale).
    aux_weight, aux_max_t: BCE + Dice on the implied x0 of every sample with t < aux_max_t. For eps
      targets it is scaled by min(1, sqrt(ab) / sqrt(1 - ab)), so its gradient on the network output stays
      bounded where x0 = (x_t - s eps) / a amplifies it (by up to 157x at t = 999 on the linear schedule).
    self_condition: Chen et al.'s self-conditioning: for half the samples a first, gradient-free pass gives
      an x0 estimate that the second pass sees as an extra input (the sampler feeds the previous step's).
    recycling: the probability that a sample whose stage predicts x0 builds x_t from the model's own
      (gradient-free) x0 estimate of pure noise at t = T-1 instead of the truth (Fu et al.'s recycling),
      so training sees what sampling sees after its first step; the target stays the true x0.
    t: fixed timesteps [B] (analysis); default: drawn by `timestep_sampling`.
  Returns:
    (scalar loss, dict of scalar metrics incl. per-stage losses).
  """
  batch = mask.shape[0]
  t_rng, eps_rng, sc_rng, rec_rng, rec_noise_rng = jax.random.split(rng, 5)
  alpha_bar = jnp.asarray(process.alpha_bar)
  lookup = process.lookup
  scale = process.mask_scale
  x0 = process.mask_to_x0(mask)
  if t is None:
    t = diffusion.sample_timesteps(t_rng, batch, process, timestep_sampling)
  eps = jax.random.normal(eps_rng, x0.shape, x0.dtype)
  stage_id = jnp.take(jnp.asarray(lookup.stage_id), t)
  target_id = jnp.take(jnp.asarray(lookup.target_id), t)

  # The clean mask as each stage sees it (static loop over stages, not over samples); x_t is built from
  # the sample's own stage's mask, so a coarsened stage is a consistent diffusion process.
  x0_by_stage = jnp.stack([diffusion.transform_mask(x0, s.transform) for s in process.stages])
  target, x0_stage = diffusion.select_targets(
      x0_by_stage, eps, t, alpha_bar, jnp.asarray(lookup.target_id), jnp.asarray(lookup.stage_id))
  x_t = diffusion.q_sample(x0_stage, eps, t, alpha_bar)
  no_sc = jnp.zeros_like(x0) if self_condition else None

  if recycling > 0:
    t_max = jnp.full((batch,), process.num_timesteps - 1, jnp.int32)
    noise = jax.random.normal(rec_noise_rng, x0.shape, x0.dtype)
    first = predict(noise, t_max, jnp.take(jnp.asarray(lookup.stage_id), t_max), no_sc)
    own_x0, _ = diffusion.prediction_to_x0_eps(first, noise, t_max, jnp.take(jnp.asarray(lookup.target_id), t_max),
                                               alpha_bar)
    own_x0 = jax.lax.stop_gradient(jnp.clip(own_x0, -scale, scale))
    use = (jax.random.uniform(rec_rng, (batch,)) < recycling) & (target_id == 0)
    x_t = jnp.where(diffusion.broadcast_like(use, x_t), diffusion.q_sample(own_x0, eps, t, alpha_bar), x_t)

  self_cond = no_sc
  if self_condition:
    first = predict(x_t, t, stage_id, no_sc)
    estimate, _ = diffusion.prediction_to_x0_eps(first, x_t, t, target_id, alpha_bar)
    estimate = jax.lax.stop_gradient(jnp.clip(estimate, -scale, scale))
    use = jax.random.uniform(sc_rng, (batch,)) < 0.5
    self_cond = jnp.where(diffusion.broadcast_like(use, estimate), estimate, 0.0)
  prediction = predict(x_t, t, stage_id, self_cond)
  x0_hat, _ = diffusion.prediction_to_x0_eps(prediction, x_t, t, target_id, alpha_bar)
  unit_x0_hat = x0_hat / scale

  mse = jnp.mean(jnp.square(prediction - target).reshape(batch, -1), axis=1)
  stage_bce_dice = bce_dice_from_x0(unit_x0_hat, (x0_stage / scale + 1.0) * 0.5)
  loss_id = jnp.take(jnp.asarray(lookup.loss_id), t)
  main = jnp.where(loss_id == 0, mse, stage_bce_dice) * jnp.take(jnp.asarray(lookup.weight), t)

  ab = jnp.take(alpha_bar, t)
  aux_scale = jnp.where(target_id == 1, jnp.minimum(1.0, jnp.sqrt(ab / (1.0 - ab))), 1.0)
  aux = bce_dice_from_x0(unit_x0_hat, mask)
  aux_on = (t < (process.num_timesteps if aux_max_t is None else aux_max_t)).astype(jnp.float32)
  per_sample = main + aux_weight * aux_on * aux_scale * aux
  loss = jnp.mean(per_sample)

  metrics = {'loss': loss, 'main_loss': jnp.mean(main), 'aux_loss': jnp.mean(aux)}
  for i in range(process.num_stages):
    in_stage = (stage_id == i).astype(jnp.float32)
    metrics[f'loss_stage{i}'] = jnp.sum(per_sample * in_stage) / jnp.maximum(jnp.sum(in_stage), 1.0)
  return loss, metrics
