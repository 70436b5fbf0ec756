"""Ensembles of diffusion samples: K members in one batched call, fusion and per-pixel uncertainty.

The K members of an ensemble differ only in their noise: the encoder runs once per image, its features are
repeated K times along the batch axis (image-major: rows b*K .. b*K+K-1 belong to image b, so a batch
sharded over devices stays local to its device) and the denoiser runs on the [B*K] batch. Every image brings
its own key (`case_keys`: from the run's seed and the case's name), and member k starts from the noise of
`member_key(key, k)`: a case's result does not depend on the batch it is in, its position, or the batch
size (evaluation, sweep and predict agree).

Fusion of the member probabilities [K, ...] (`fuse`):
  mean    the mean probability; the mask is mean >= threshold.
  vote    the fraction of members whose probability is >= threshold; the mask is a majority
          (fraction >= 0.5, so a tie with an even K counts as lesion).
  staple  binary STAPLE (Warfield et al. 2004) on the thresholded members, per image: EM over each member's
          sensitivity and specificity with a fixed foreground prior (the mean member label); the fused
          probability is the posterior foreground probability; the mask is posterior >= 0.5.
`mask_threshold(fusion, threshold)` is the threshold that turns a fused probability into the fused mask.

Uncertainty (`Fused`): `std`, the standard deviation of the member probabilities (0 when members agree),
and `entropy`, the binary entropy of the fused probability in bits ([0, 1]). `uncertainty_map` is what
predict writes: 2 * std (in [0, 1]) for an ensemble, the entropy for a single sample.

Config (read with .get so older configs work): config.sampling.ensemble_size (1), config.sampling.fusion
('mean'), config.sampling.sampler (staged | ddim | ddpm), config.sampling.ddpm_steps.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unisegdiff_jax import diffusion
from unisegdiff_jax import sampling

FUSIONS = ('mean', 'vote', 'staple')


class EnsembleConfigError(ValueError):
  """A bad ensemble / sampler setting; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class Settings:
  sampler: str
  num_steps: int | None  # None for the staged sampler
  ensemble_size: int
  fusion: str
  threshold: float

  @property
  def stochastic(self) -> bool:
    return self.sampler == 'ddpm'

  @property
  def label(self) -> str:
    return self.sampler if self.num_steps is None else f'{self.sampler}:{self.num_steps}'


def settings_from_config(config: ml_collections.ConfigDict, *, sampler: str | None = None,
                         num_steps: int | None = None, ensemble_size: int | None = None,
                         fusion: str | None = None) -> Settings:
  """The sampler / ensemble settings of `config.sampling`, each overridable; validated."""
  sampling_config = config.sampling
  sampler = sampler or sampling_config.sampler
  if sampler not in sampling.SAMPLERS:
    raise EnsembleConfigError(f"config.sampling.sampler='{sampler}': use {', '.join(sampling.SAMPLERS)}")
  if sampler == 'staged':
    num_steps = None
  elif num_steps is None:
    num_steps = int(sampling_config.ddim_steps if sampler == 'ddim'
                    else sampling_config.get('ddpm_steps', sampling.DEFAULT_DDPM_STEPS))
  ensemble_size = int(ensemble_size if ensemble_size is not None else sampling_config.get('ensemble_size', 1))
  fusion = fusion or sampling_config.get('fusion', 'mean')
  if ensemble_size < 1:
    raise EnsembleConfigError(f'config.sampling.ensemble_size={ensemble_size}: use 1 or more')
  if fusion not in FUSIONS:
    raise EnsembleConfigError(f"config.sampling.fusion='{fusion}': use {', '.join(FUSIONS)}")
  num_timesteps = int(config.diffusion.num_timesteps)
  if num_steps is not None and not 1 <= num_steps <= num_timesteps:
    field = 'ddim_steps' if sampler == 'ddim' else 'ddpm_steps'
    raise EnsembleConfigError(f'config.sampling.{field}={num_steps}: use 1..{num_timesteps}')
  return Settings(sampler, num_steps, ensemble_size, fusion, float(sampling_config.threshold))


def member_key(rng: jax.Array, k: int) -> jax.Array:
  return rng if k == 0 else jax.random.fold_in(rng, k)


def case_keys(rng: jax.Array, names: Sequence[str], batch_size: int) -> np.ndarray:
  """One sampling key per case [batch_size, 2] (uint32): fold_in(rng, crc32(name)); padding rows get
  fold_in(rng, 0). The same case gets the same noise in every batch, position and batch size."""
  ids = [zlib.crc32(name.encode('utf-8')) & 0x7FFFFFFF for name in names]
  ids += [0] * (batch_size - len(ids))
  return np.asarray(jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(ids, jnp.uint32)))


def make_members_fn(model, process: diffusion.StagedDiffusion, timesteps: np.ndarray, *,
                    ensemble_size: int = 1, stochastic: bool = False) -> Callable:
  """A jit-able (params, images [B,S,S,3], keys [B, 2]) -> member probabilities [K, B, S, S, 1].

  One encoder pass per image, one denoiser pass per step on the [B*K] batch; image b's members draw their
  noise from keys[b] only.
  """
  k_members = int(ensemble_size)

  def members(params, images, keys):
    batch = images.shape[0]
    features = model.apply(params, images, method=model.encode)
    if k_members > 1:
      features = jax.tree_util.tree_map(lambda f: jnp.repeat(f, k_members, axis=0), features)

    def denoise(feats, x_t, t, stage_id, self_cond):
      return model.apply(params, feats, x_t, t, stage_id, self_cond, method=model.denoise)

    shape = images.shape[:-1] + (1,)
    row_keys = jnp.stack([jax.vmap(lambda key, k=k: member_key(key, k))(keys) for k in range(k_members)],
                         axis=1).reshape((batch * k_members,) + keys.shape[1:])  # image-major [B*K]
    noise = jax.vmap(lambda key: jax.random.normal(key, shape[1:], jnp.float32))(row_keys)
    step_keys = jax.vmap(lambda key: jax.random.fold_in(key, 1 << 30))(row_keys)
    x0 = sampling.sample(denoise, features, noise, timesteps, process, stochastic=stochastic, rng=step_keys)
    prob = sampling.probability_from_x0(x0, process).reshape((batch, k_members) + shape[1:])
    return jnp.moveaxis(prob, 1, 0)

  return members


# ---------------------------------------------------------------------------------------------------------
# Fusion and uncertainty (numpy).


def binary_entropy(prob: np.ndarray) -> np.ndarray:
  """Binary entropy in bits, in [0, 1]; 0 at p = 0 and p = 1."""
  p = np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
  with np.errstate(divide='ignore', invalid='ignore'):
    h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0))
  return (np.clip(h, 0.0, 1.0) + 0.0).astype(np.float32)  # + 0.0 turns -0.0 into 0.0


def staple(decisions: np.ndarray, *, max_iters: int = 50, tol: float = 1e-6, prior: float | None = None,
           init: float = 0.99) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Binary STAPLE by EM.

  Args:
    decisions: [K, ...] binary decisions of K raters over the same pixels.
    prior: the foreground prior f; default the mean of all decisions (fixed during EM).
  Returns:
    (posterior foreground probability [...], sensitivities [K], specificities [K]).
  """
  d = np.asarray(decisions).astype(np.float64)
  k_raters = d.shape[0]
  flat = d.reshape(k_raters, -1)
  f = float(flat.mean()) if prior is None else float(prior)
  f = min(max(f, 1e-6), 1 - 1e-6)
  p = np.full(k_raters, init)  # sensitivity
  q = np.full(k_raters, init)  # specificity
  eps = 1e-10
  w = flat.mean(axis=0)
  for _ in range(max_iters):
    p_c, q_c = np.clip(p, eps, 1 - eps), np.clip(q, eps, 1 - eps)
    log_a = np.log(f) + (flat * np.log(p_c)[:, None] + (1 - flat) * np.log(1 - p_c)[:, None]).sum(0)
    log_b = np.log(1 - f) + ((1 - flat) * np.log(q_c)[:, None] + flat * np.log(1 - q_c)[:, None]).sum(0)
    w_new = 1.0 / (1.0 + np.exp(np.clip(log_b - log_a, -700, 700)))
    p = (flat * w_new).sum(1) / max(w_new.sum(), eps)
    q = ((1 - flat) * (1 - w_new)).sum(1) / max((1 - w_new).sum(), eps)
    converged = np.max(np.abs(w_new - w)) < tol
    w = w_new
    if converged:
      break
  return w.reshape(d.shape[1:]).astype(np.float32), p, q


def mask_threshold(fusion: str, threshold: float) -> float:
  """The threshold that turns the fused probability of `fusion` into its fused mask (>=)."""
  return float(threshold) if fusion == 'mean' else 0.5


@dataclasses.dataclass
class Fused:
  prob: np.ndarray  # fused foreground probability (mean prob, vote fraction or STAPLE posterior)
  mask: np.ndarray  # bool
  std: np.ndarray  # std of the member probabilities (zeros for one member)
  entropy: np.ndarray  # binary entropy of `prob` in bits
  ensemble_size: int = 1

  def uncertainty_map(self) -> np.ndarray:
    """[0, 1]: 2 * std across members for an ensemble, the entropy of the probability for one sample."""
    if self.ensemble_size > 1:
      return np.clip(2.0 * self.std, 0.0, 1.0).astype(np.float32)
    return self.entropy


def fuse(members: np.ndarray, fusion: str = 'mean', threshold: float = 0.5) -> Fused:
  """Fuses member probabilities [K, ...] of ONE image (or a batch for mean / vote) into a `Fused`."""
  if fusion not in FUSIONS:
    raise EnsembleConfigError(f"unknown fusion '{fusion}': use {', '.join(FUSIONS)}")
  m = np.asarray(members, np.float32)
  k_members = m.shape[0]
  if fusion == 'mean':
    prob = m.mean(axis=0)
  elif fusion == 'vote':
    prob = (m >= threshold).mean(axis=0)
  else:
    prob = staple(m >= threshold)[0] if k_members > 1 else (m[0] >= threshold).astype(np.float32)
  prob = prob.astype(np.float32)
  return Fused(prob=prob, mask=prob >= mask_threshold(fusion, threshold), std=m.std(axis=0),
               entropy=binary_entropy(prob), ensemble_size=k_members)


def fuse_batch(members: np.ndarray, fusion: str = 'mean', threshold: float = 0.5) -> list[Fused]:
  """members [K, B, ...] -> one `Fused` per image (STAPLE runs per image)."""
  m = np.asarray(members)
  return [fuse(m[:, b], fusion, threshold) for b in range(m.shape[1])]
