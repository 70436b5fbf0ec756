"""The UNet denoiser over the noisy mask, and the full model (encoder + denoiser)."""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unisegdiff_jax.models import layers
from unisegdiff_jax.models.encoder import ConditioningEncoder
from unisegdiff_jax.models.segmenter import SegmentationDecoder, Segmenter


class Denoiser(nn.Module):
  """UNet over x_t conditioned on (t, stage) by FiLM and on encoder features at every matching scale.

  Level i runs at resolution H / 2**i with `base_width * channel_mult[i]` channels and fuses encoder scale i
  (a 1x1 projection added to the first block's input). Self-attention only at `attention_levels`.
  """
  base_width: int = 32
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 1
  attention_levels: Sequence[int] = (3,)
  num_heads: int = 4
  num_groups: int = 8
  num_stages: int = 3
  dropout: float = 0.0
  out_channels: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t, t, stage_id, features: Sequence[jnp.ndarray], *, train: bool = False):
    if len(features) != len(self.channel_mult):
      raise ValueError(f'the denoiser has {len(self.channel_mult)} levels but got {len(features)} '
                       'encoder scales: model.encoder.widths and model.denoiser.channel_mult must have '
                       'the same length')
    emb_dim = 4 * self.base_width
    cond = layers.sinusoidal_embedding(t, self.base_width)
    cond = nn.Dense(emb_dim, dtype=self.dtype, name='time_mlp_0')(cond)
    cond = nn.Dense(emb_dim, dtype=self.dtype, name='time_mlp_1')(nn.swish(cond))
    cond = cond + nn.Embed(self.num_stages, emb_dim, name='stage_embedding')(stage_id)

    def res_block(width, name):
      return layers.ResBlock(width, self.num_groups, self.dropout, dtype=self.dtype, name=name)

    def attention(name):
      return layers.SelfAttention(self.num_heads, self.num_groups, dtype=self.dtype, name=name)

    h = nn.Conv(self.base_width, (3, 3), dtype=self.dtype, name='conv_in')(x_t)
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      width = self.base_width * mult
      fused = nn.Conv(h.shape[-1], (1, 1), dtype=self.dtype, name=f'fuse_{level}')(features[level])
      h = h + fused
      for block in range(self.num_res_blocks):
        h = res_block(width, f'down_{level}_{block}')(h, cond, train=train)
        if level in self.attention_levels:
          h = attention(f'down_attn_{level}_{block}')(h)
        skips.append(h)
      if level < len(self.channel_mult) - 1:
        h = layers.Downsample(width, dtype=self.dtype, name=f'downsample_{level}')(h)
        skips.append(h)

    h = res_block(h.shape[-1], 'mid_0')(h, cond, train=train)
    h = attention('mid_attn')(h)
    h = res_block(h.shape[-1], 'mid_1')(h, cond, train=train)

    for level in reversed(range(len(self.channel_mult))):
      width = self.base_width * self.channel_mult[level]
      for block in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(width, f'up_{level}_{block}')(h, cond, train=train)
        if level in self.attention_levels:
          h = attention(f'up_attn_{level}_{block}')(h)
      if level > 0:
        h = layers.Upsample(width, dtype=self.dtype, name=f'upsample_{level}')(h)

    h = nn.GroupNorm(layers.group_count(h.shape[-1], self.num_groups), dtype=self.dtype)(h)
    h = nn.swish(h)
    out = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                  name='conv_out')(h)
    return out.astype(jnp.float32)


class UniSegDiffModel(nn.Module):
  """Conditioning encoder + denoiser. `encode` runs once per image; `denoise` once per sampler step.

  `freeze_encoder` stops gradients at the encoder output (phase 1 with a frozen pre-trained encoder, so
  no encoder backward pass is computed). With a `decoder` (the phase-0 segmentation head) the segmenter's
  coarse logits become an extra input channel of the denoiser. With `self_condition` the previous x0
  estimate is one more input channel (zeros when there is none yet).
  """
  encoder: ConditioningEncoder
  denoiser: Denoiser
  decoder: Optional[SegmentationDecoder] = None
  freeze_encoder: bool = False
  self_condition: bool = False

  def encode(self, image, *, train: bool = False):
    features = self.encoder(image, train=train)
    coarse = self.decoder(features, train=train) if self.decoder is not None else None
    if self.freeze_encoder:
      features = jax.lax.stop_gradient(features)
      coarse = jax.lax.stop_gradient(coarse) if coarse is not None else None
    return {'features': features, 'coarse_logits': coarse}

  def denoise(self, conditioning, x_t, t, stage_id, self_cond=None, *, train: bool = False):
    inputs = [x_t]
    if self.self_condition:
      inputs.append(jnp.zeros_like(x_t) if self_cond is None else self_cond)
    coarse = conditioning['coarse_logits']
    if coarse is not None:
      inputs.append(jnp.tanh(coarse * 0.5))  # tanh(l/2) = 2 sigmoid(l) - 1
    x_in = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
    return self.denoiser(x_in, t, stage_id, conditioning['features'], train=train)

  def __call__(self, image, x_t, t, stage_id, self_cond=None, *, train: bool = False):
    return self.denoise(self.encode(image, train=train), x_t, t, stage_id, self_cond, train=train)


def build_encoder(model_config: ml_collections.ConfigDict) -> ConditioningEncoder:
  return ConditioningEncoder(
      widths=tuple(model_config.encoder.widths),
      blocks_per_scale=model_config.encoder.blocks_per_scale,
      num_groups=model_config.num_groups, dtype=jnp.dtype(model_config.dtype))


def build_segmenter(model_config: ml_collections.ConfigDict, decoder_width: int) -> Segmenter:
  decoder = SegmentationDecoder(decoder_width, model_config.num_groups, dtype=jnp.dtype(model_config.dtype))
  return Segmenter(encoder=build_encoder(model_config), decoder=decoder)


def build_model(model_config: ml_collections.ConfigDict, num_stages: int, *, freeze_encoder: bool = False,
                coarse_logits_decoder_width: int = 0) -> UniSegDiffModel:
  """The diffusion model; `coarse_logits_decoder_width` > 0 adds the phase-0 decoder as an input."""
  dtype = jnp.dtype(model_config.dtype)
  denoiser = Denoiser(
      base_width=model_config.denoiser.base_width,
      channel_mult=tuple(model_config.denoiser.channel_mult),
      num_res_blocks=model_config.denoiser.num_res_blocks,
      attention_levels=tuple(model_config.denoiser.attention_levels),
      num_heads=model_config.denoiser.num_heads,
      num_groups=model_config.num_groups,
      num_stages=num_stages,
      dropout=model_config.denoiser.dropout,
      dtype=dtype)
  decoder = (SegmentationDecoder(coarse_logits_decoder_width, model_config.num_groups, dtype=dtype)
             if coarse_logits_decoder_width > 0 else None)
  return UniSegDiffModel(encoder=build_encoder(model_config), denoiser=denoiser, decoder=decoder,
                         freeze_encoder=freeze_encoder,
                         self_condition=bool(model_config.get('self_condition', False)))
