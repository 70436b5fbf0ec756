"""Hierarchical conditioning encoder: the image -> features at len(widths) scales (1, 1/2, 1/4, ...)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from unisegdiff_jax.models import layers


class ConditioningEncoder(nn.Module):
  """A small residual CNN; scale i has `widths[i]` channels at resolution H / 2**i.

  The same module is the backbone of the phase-0 segmenter and the conditioning network of the denoiser.
  """
  widths: Sequence[int] = (32, 64, 128, 128)
  blocks_per_scale: int = 1
  num_groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jnp.ndarray, *, train: bool = False) -> list[jnp.ndarray]:
    h = nn.Conv(self.widths[0], (3, 3), dtype=self.dtype, name='stem')(image)
    features = []
    for level, width in enumerate(self.widths):
      if level > 0:
        h = layers.Downsample(width, dtype=self.dtype, name=f'down_{level}')(h)
      for block in range(self.blocks_per_scale):
        h = layers.ResBlock(width, self.num_groups, dtype=self.dtype,
                            name=f'level_{level}_block_{block}')(h, train=train)
      features.append(h)
    return features
