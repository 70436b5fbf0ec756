"""Building blocks shared by the encoder and the denoiser: residual blocks, attention, embeddings."""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


def group_count(channels: int, max_groups: int) -> int:
  """Largest divisor of `channels` not above `max_groups` (GroupNorm needs groups | channels)."""
  for groups in range(min(max_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def sinusoidal_embedding(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
  """Transformer-style sinusoidal embedding of integer timesteps t [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice with a residual path; FiLM (scale/shift) from `cond` when given."""
  channels: int
  num_groups: int = 8
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond: Optional[jnp.ndarray] = None, *, train: bool = False):
    h = nn.GroupNorm(group_count(x.shape[-1], self.num_groups), dtype=self.dtype)(x)
    h = nn.swish(h)
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
    h = nn.GroupNorm(group_count(self.channels, self.num_groups), dtype=self.dtype)(h)
    if cond is not None:
      scale_shift = nn.Dense(2 * self.channels, dtype=self.dtype,
                             kernel_init=nn.initializers.zeros)(nn.swish(cond))
      scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
      h = h * (1.0 + scale) + shift
    h = nn.swish(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), dtype=self.dtype)(x)
    return x + h


class SelfAttention(nn.Module):
  """Multi-head self-attention over the spatial positions, with a residual connection."""
  num_heads: int = 4
  num_groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.GroupNorm(group_count(c, self.num_groups), dtype=self.dtype)(x).reshape(b, h * w, c)
    heads = self.num_heads if c % self.num_heads == 0 else 1
    y = nn.MultiHeadDotProductAttention(num_heads=heads, dtype=self.dtype,
                                        out_kernel_init=nn.initializers.zeros)(y, y)
    return x + y.reshape(b, h, w, c)


class Downsample(nn.Module):
  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), dtype=self.dtype)(x)


class Upsample(nn.Module):
  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), dtype=self.dtype)(x)
