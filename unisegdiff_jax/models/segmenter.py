"""Phase 0: the conditioning encoder plus a light UNet-style decoder, trained as a plain segmenter."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from unisegdiff_jax.models import layers
from unisegdiff_jax.models.encoder import ConditioningEncoder


class SegmentationDecoder(nn.Module):
  """Top-down decoder: project each encoder scale to `width`, upsample, add, refine; logits at full size."""
  width: int = 32
  num_groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], *, train: bool = False) -> jnp.ndarray:
    h = nn.Conv(self.width, (1, 1), dtype=self.dtype, name='lateral_top')(features[-1])
    for level in reversed(range(len(features) - 1)):
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = h + nn.Conv(self.width, (1, 1), dtype=self.dtype, name=f'lateral_{level}')(features[level])
      h = layers.ResBlock(self.width, self.num_groups, dtype=self.dtype, name=f'refine_{level}')(h, train=train)
    h = nn.swish(nn.GroupNorm(layers.group_count(self.width, self.num_groups), dtype=self.dtype)(h))
    return nn.Conv(1, (3, 3), dtype=self.dtype, name='logits')(h).astype(jnp.float32)


class Segmenter(nn.Module):
  """encoder + decoder. Its `encoder` subtree has exactly the diffusion model's encoder structure."""
  encoder: ConditioningEncoder
  decoder: SegmentationDecoder

  def __call__(self, image, *, train: bool = False):
    return self.decoder(self.encoder(image, train=train), train=train)
