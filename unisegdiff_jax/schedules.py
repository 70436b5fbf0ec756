"""The learning-rate schedule both training phases use: linear warm-up from 0, then cosine decay to 0.

Its three numbers (peak rate, warm-up steps, decay end) are an argument of the jitted train step, not
constants compiled into it: runs that differ only in length or rate share one compiled program (and one
persistent-cache entry). The optimisers run at unit rate; the step scales their update by
`learning_rate(state.step, args)`.
"""

import jax.numpy as jnp
import numpy as np


def schedule_args(peak_value: float, warmup_steps: int, num_steps: int) -> np.ndarray:
  """[peak, warm-up steps, decay end] as float32; warm-up is shortened for runs shorter than it."""
  warmup = min(warmup_steps, max(num_steps - 1, 1))
  return np.asarray([peak_value, warmup, max(num_steps, warmup_steps + 1)], np.float32)


def learning_rate(count, args) -> jnp.ndarray:
  """The rate after `count` optimiser steps: peak * count / warm-up, then peak * (1 + cos(pi * progress)) / 2
  with progress going from 0 at the end of warm-up to 1 at the decay end (and staying there)."""
  peak, warmup, end = args[0], args[1], args[2]
  count = jnp.asarray(count, jnp.float32)
  warming = peak * count / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((count - warmup) / (end - warmup), 0.0, 1.0)
  return jnp.where(count < warmup, warming, 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress)))


def unit_rate(count) -> float:
  """The optimisers' own rate (the step applies `learning_rate`). A schedule rather than the constant 1 so
  that optax keeps its step count in the optimiser state, whose layout checkpoints rely on."""
  del count
  return 1.0
