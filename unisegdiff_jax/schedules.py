"""The learning-rate schedule both training phases use."""

import optax


def warmup_cosine(peak_value: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_value`, then cosine decay to 0 at `num_steps` (valid for tiny runs)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_value, warmup_steps=min(warmup_steps, max(num_steps - 1, 1)),
      decay_steps=max(num_steps, warmup_steps + 1), end_value=0.0)
