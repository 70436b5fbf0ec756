"""Noise schedules, forward process, the stage table and target conversions.

Masks live in {-1, +1}. With alpha_bar_t = prod_{s<=t} (1 - beta_s) and
a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t):

    x_t = a_t * x0 + s_t * eps                 (q_sample)
    v_t = a_t * eps - s_t * x0                 (velocity target)

so that x0 = a_t x_t - s_t v and eps = s_t x_t + a_t v. Every prediction target (x0, eps or v) converts to
the pair (x0_hat, eps_hat) with `prediction_to_x0_eps`; the loss and the sampler share that one function.

The stage table splits the timesteps [0, T) into ordered, half-open ranges, each with its own prediction
target. It is written as a short string so that sweeps can override it from the command line::

    "500:1000 x0 loss=bce_dice steps=1; 200:500 v steps=4; 0:200 eps steps=5"

Each stage: `start:end target [loss=mse|bce_dice] [weight=1.0] [steps=1] [transform=none|blur:SIGMA|down:F]`.
The string may also be a preset name (see `STAGE_PRESETS`). `transform` coarsens the mask target (only for
x0 stages): `blur:2` Gaussian-blurs it with sigma 2 px, `down:4` average-pools by 4 and upsamples back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = ('x0', 'eps', 'v')
LOSSES = ('mse', 'bce_dice')

# Our reconstruction: UniSegDiff's exact stage boundaries are not published.
STAGE_PRESETS = {
    'three_stage': '500:1000 x0 loss=mse steps=1; 200:500 v steps=4; 0:200 eps steps=5',
    'two_stage': '500:1000 x0 steps=1; 0:500 eps steps=9',
    'eps_only': '0:1000 eps steps=10',
    'x0_only': '0:1000 x0 steps=10',
    'v_only': '0:1000 v steps=10',
}
DEFAULT_STAGES = STAGE_PRESETS['three_stage']


class StageTableError(ValueError):
  """A stage table that cannot be used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Stage:
  start: int  # inclusive
  end: int  # exclusive
  target: str = 'eps'
  loss: str = 'mse'
  weight: float = 1.0
  sample_steps: int = 1
  transform: str = 'none'


def _parse_transform(text: str) -> str:
  if text == 'none':
    return text
  kind, _, value = text.partition(':')
  try:
    number = float(value)
  except ValueError:
    number = -1.0
  if kind not in ('blur', 'down') or number <= 0 or (kind == 'down' and number != int(number)):
    raise StageTableError(
        f"bad transform '{text}': use none, blur:SIGMA (SIGMA > 0) or down:F (integer F > 0)")
  return text


def parse_stage_table(spec: str, num_timesteps: int) -> tuple[Stage, ...]:
  """Parses and validates a stage table string (or preset name) into stages, highest t first."""
  spec = spec.strip()
  spec = STAGE_PRESETS.get(spec, spec)
  stages = []
  for chunk in [c.strip() for c in spec.split(';') if c.strip()]:
    fields = chunk.split()
    if len(fields) < 2 or ':' not in fields[0]:
      raise StageTableError(
          f"bad stage '{chunk}': expected 'start:end target [key=value ...]' or a preset "
          f"({', '.join(STAGE_PRESETS)})")
    try:
      start, end = (int(x) for x in fields[0].split(':'))
    except ValueError:
      raise StageTableError(f"bad stage range '{fields[0]}': expected integers 'start:end'") from None
    target = fields[1]
    if target not in TARGETS:
      raise StageTableError(f"unknown target '{target}' in stage '{chunk}': choose from {TARGETS}")
    options = {}
    for field in fields[2:]:
      key, eq, value = field.partition('=')
      if not eq or key not in ('loss', 'weight', 'steps', 'transform'):
        raise StageTableError(
            f"bad stage option '{field}' in '{chunk}': use loss=, weight=, steps=, transform=")
      options[key] = value
    loss = options.get('loss', 'mse')
    if loss not in LOSSES:
      raise StageTableError(f"unknown loss '{loss}' in stage '{chunk}': choose from {LOSSES}")
    try:
      weight = float(options.get('weight', 1.0))
      steps = int(options.get('steps', 1))
    except ValueError:
      raise StageTableError(f"bad weight or steps in stage '{chunk}'") from None
    if steps < 1 or weight < 0:
      raise StageTableError(f"stage '{chunk}': steps must be >= 1 and weight >= 0")
    transform = _parse_transform(options.get('transform', 'none'))
    if transform != 'none' and target != 'x0':
      raise StageTableError(f"stage '{chunk}': a target transform needs target x0, not {target}")
    if not start < end:
      raise StageTableError(f"stage '{chunk}': empty range {start}:{end}")
    if steps > end - start:
      raise StageTableError(f"stage '{chunk}': {steps} steps do not fit in {end - start} timesteps")
    stages.append(Stage(start, end, target, loss, weight, steps, transform))
  if not stages:
    raise StageTableError('empty stage table')
  stages.sort(key=lambda s: -s.start)
  expected_end = num_timesteps
  for stage in stages:
    if stage.end > expected_end:
      raise StageTableError(
          f'stage ranges overlap at t={stage.end - 1}: ranges must tile [0, {num_timesteps}) exactly')
    if stage.end < expected_end:
      raise StageTableError(
          f'stage ranges leave a gap [{stage.end}, {expected_end}): ranges must tile [0, {num_timesteps}) exactly')
    expected_end = stage.start
  if expected_end != 0:
    raise StageTableError(
        f'stage ranges leave a gap [0, {expected_end}): ranges must tile [0, {num_timesteps}) exactly')
  return tuple(stages)


def format_stage_table(stages: Sequence[Stage]) -> str:
  return '; '.join(
      f'{s.start}:{s.end} {s.target} loss={s.loss} weight={s.weight:g} steps={s.sample_steps} '
      f'transform={s.transform}' for s in stages)


@dataclasses.dataclass(frozen=True)
class StageLookup:
  """Per-timestep lookup arrays so jitted code selects by `jnp.take`, never by a Python branch."""
  stage_id: np.ndarray  # [T] int32, index into the stage tuple (0 = highest-noise stage)
  target_id: np.ndarray  # [T] int32, index into TARGETS
  loss_id: np.ndarray  # [T] int32, index into LOSSES
  weight: np.ndarray  # [T] float32


def stage_lookup(stages: Sequence[Stage], num_timesteps: int) -> StageLookup:
  stage_id = np.zeros(num_timesteps, np.int32)
  for i, s in enumerate(stages):
    stage_id[s.start:s.end] = i
  return StageLookup(
      stage_id=stage_id,
      target_id=np.array([TARGETS.index(stages[i].target) for i in stage_id], np.int32),
      loss_id=np.array([LOSSES.index(stages[i].loss) for i in stage_id], np.int32),
      weight=np.array([stages[i].weight for i in stage_id], np.float32),
  )


def stage_of(stages: Sequence[Stage], t: int) -> int:
  for i, s in enumerate(stages):
    if s.start <= t < s.end:
      return i
  raise ValueError(f't={t} is outside the stage table')


# ---------------------------------------------------------------------------------------------------------
# Schedules and the forward process.


def make_alpha_bar(schedule: str, num_timesteps: int, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> np.ndarray:
  """alpha_bar_t for t = 0..T-1 (float64 numpy; convert at use)."""
  if schedule == 'linear':
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)
  if schedule == 'cosine':
    s = 0.008
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    return np.cumprod(1.0 - betas)
  raise ValueError(f"unknown noise schedule '{schedule}': choose linear or cosine")


def broadcast_like(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """Per-sample values [B] reshaped to broadcast against `like` [B, ...]."""
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def q_sample(x0, eps, t, alpha_bar):
  """Forward process x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (t: int array [B])."""
  ab = broadcast_like(jnp.take(alpha_bar, t), x0)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def velocity(x0, eps, t, alpha_bar):
  ab = broadcast_like(jnp.take(alpha_bar, t), x0)
  return jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0


def prediction_to_x0_eps(prediction, x_t, t, target_id, alpha_bar):
  """Converts a network output to (x0_hat, eps_hat), per sample, by its target kind.

  `t` and `target_id` are int arrays of shape [B]; the three conversions are computed and selected with
  `jnp.where` (vectorised, no Python branch per sample). The eps -> x0 division is guarded at t where
  alpha_bar is tiny (not reached by the default table, which predicts x0 there).
  """
  ab = broadcast_like(jnp.take(alpha_bar, t), x_t)
  a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  kind = broadcast_like(target_id, x_t)
  # x0 target.
  x0_from_x0 = prediction
  eps_from_x0 = (x_t - a * prediction) / jnp.maximum(s, 1e-8)
  # eps target.
  x0_from_eps = (x_t - s * prediction) / jnp.maximum(a, 1e-8)
  eps_from_eps = prediction
  # v target.
  x0_from_v = a * x_t - s * prediction
  eps_from_v = s * x_t + a * prediction
  x0_hat = jnp.where(kind == 0, x0_from_x0, jnp.where(kind == 1, x0_from_eps, x0_from_v))
  eps_hat = jnp.where(kind == 0, eps_from_x0, jnp.where(kind == 1, eps_from_eps, eps_from_v))
  return x0_hat, eps_hat


def select_targets(x0_by_stage, eps, t, alpha_bar, target_id_of_t, stage_id_of_t):
  """Each sample's regression target and clean mask, chosen by its timestep (vectorised).

  x0_by_stage: [S, B, H, W, C], the clean mask as each stage sees it (coarsened or not).
  Returns (target, x0) with x0 the sample's own stage's clean mask.
  """
  stage = jnp.take(stage_id_of_t, t)
  x0 = jnp.take_along_axis(x0_by_stage, broadcast_like(stage, x0_by_stage[0])[None], axis=0)[0]
  kind = broadcast_like(jnp.take(target_id_of_t, t), eps)
  v = velocity(x0, eps, t, alpha_bar)
  return jnp.where(kind == 0, x0, jnp.where(kind == 1, eps, v)), x0


def transform_mask(x0: jnp.ndarray, transform: str) -> jnp.ndarray:
  """Coarsens a {-1,+1} mask batch [B, H, W, C] for an early stage's target."""
  if transform == 'none':
    return x0
  kind, _, value = transform.partition(':')
  if kind == 'blur':
    sigma = float(value)
    radius = max(1, int(math.ceil(3 * sigma)))
    xs = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel_1d = np.exp(-0.5 * (xs / sigma) ** 2)
    kernel_1d /= kernel_1d.sum()
    channels = x0.shape[-1]
    kernel = np.tile(np.outer(kernel_1d, kernel_1d)[:, :, None, None], (1, 1, 1, channels))
    padded = jnp.pad(x0, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode='edge')
    return jax.lax.conv_general_dilated(
        padded, jnp.asarray(kernel, x0.dtype), (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)
  factor = int(float(value))
  b, hgt, wid, c = x0.shape
  if hgt % factor or wid % factor:
    raise StageTableError(f'transform down:{factor} needs the image size to be divisible by {factor}')
  pooled = x0.reshape(b, hgt // factor, factor, wid // factor, factor, c).mean(axis=(2, 4))
  return jnp.repeat(jnp.repeat(pooled, factor, axis=1), factor, axis=2)


# ---------------------------------------------------------------------------------------------------------
# Sampling schedules: which timesteps the staged sampler visits.


def staged_timesteps(stages: Sequence[Stage]) -> np.ndarray:
  """Timesteps the staged sampler evaluates, descending: `sample_steps` evenly spaced ones per stage.

  Within a stage [start, end) with n steps, the visited timesteps are end-1-k*(end-start)/n for k < n: the
  stage's first evaluation is at its noisiest timestep and the steps are evenly spaced ("leading" spacing),
  so no evaluation is spent on two neighbouring timesteps at a stage boundary.
  """
  visited = []
  for s in stages:  # highest-t stage first
    stride = (s.end - s.start) / s.sample_steps
    visited.extend(int(np.floor(s.end - 1 - k * stride)) for k in range(s.sample_steps))
  out = np.array(visited, np.int32)
  if np.any(np.diff(out) >= 0):
    raise StageTableError('staged sampler timesteps are not strictly decreasing; lower steps=')
  return out


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced descending timesteps for plain DDIM with `num_steps` evaluations."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'DDIM steps must be in [1, {num_timesteps}], got {num_steps}')
  # From T-1 down: one step starts from pure noise at t = T-1 (not t = 0), and 0 is the last for n >= 2.
  return np.unique(np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32))[::-1].copy()


@dataclasses.dataclass(frozen=True, eq=False)
class StagedDiffusion:
  """Everything the loss and the sampler need to know about the diffusion process, built once."""
  stages: tuple[Stage, ...]
  num_timesteps: int
  alpha_bar: np.ndarray  # [T] float32
  lookup: StageLookup
  mask_scale: float = 1.0  # masks live in {-mask_scale, +mask_scale} (Chen et al.'s bit scale)

  @property
  def num_stages(self) -> int:
    return len(self.stages)

  def describe(self) -> str:
    scale = '' if self.mask_scale == 1.0 else f'mask_scale={self.mask_scale:g}; '
    return f'T={self.num_timesteps}; {scale}' + format_stage_table(self.stages)

  def mask_to_x0(self, mask: jnp.ndarray) -> jnp.ndarray:
    """{0, 1} mask -> the diffusion variable x0 in {-mask_scale, +mask_scale}."""
    return (mask * 2.0 - 1.0) * self.mask_scale

  def x0_to_probability(self, x0: jnp.ndarray) -> jnp.ndarray:
    """A (clipped) x0 estimate -> the foreground probability in [0, 1] (linear; 0.5 at x0 = 0)."""
    return jnp.clip((x0 / self.mask_scale + 1.0) * 0.5, 0.0, 1.0)


def from_config(diffusion_config) -> StagedDiffusion:
  """Builds the process from `config.diffusion` (raises StageTableError on a bad table)."""
  num_timesteps = int(diffusion_config.num_timesteps)
  if num_timesteps < 2:
    raise StageTableError(f'config.diffusion.num_timesteps must be >= 2, got {num_timesteps}')
  stages = parse_stage_table(diffusion_config.stages, num_timesteps)
  alpha_bar = make_alpha_bar(diffusion_config.schedule, num_timesteps, diffusion_config.beta_start,
                             diffusion_config.beta_end).astype(np.float32)
  mask_scale = float(diffusion_config.get('mask_scale', 1.0))
  if not mask_scale > 0:
    raise StageTableError(f'config.diffusion.mask_scale must be > 0, got {mask_scale}')
  return StagedDiffusion(stages, num_timesteps, alpha_bar, stage_lookup(stages, num_timesteps), mask_scale)


def sample_timesteps(rng, batch_size: int, process: StagedDiffusion, method: str) -> jnp.ndarray:
  """Training timesteps: `uniform` over [0, T), or `balanced` (a uniform stage, then uniform within it)."""
  if method == 'uniform':
    return jax.random.randint(rng, (batch_size,), 0, process.num_timesteps)
  if method == 'balanced':
    stage_rng, t_rng = jax.random.split(rng)
    starts = jnp.array([s.start for s in process.stages])
    lengths = jnp.array([s.end - s.start for s in process.stages])
    stage = jax.random.randint(stage_rng, (batch_size,), 0, process.num_stages)
    offset = jnp.floor(jax.random.uniform(t_rng, (batch_size,)) * lengths[stage]).astype(jnp.int32)
    return starts[stage] + offset
  raise ValueError(f"unknown timestep sampling '{method}': choose uniform or balanced")
