"""Phase 0: pre-train the conditioning encoder as a plain segmenter (BCE + Dice), then hand it to phase 1.

The segmenter (encoder + light decoder) is also the non-diffusion baseline: its evaluation is reported in
`summary.json["pretrained_segmenter"]` beside the diffusion model's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unisegdiff_jax import losses
from unisegdiff_jax import schedules
from unisegdiff_jax import train_state
from unisegdiff_jax.models import denoiser as denoiser_lib

ENCODER_MODES = ('frozen', 'finetune')


def build_segmenter(config: ml_collections.ConfigDict):
  return denoiser_lib.build_segmenter(config.model, config.pretrain.decoder_width)


def make_optimizer(config: ml_collections.ConfigDict):
  """Clipping + AdamW at unit rate on the packed parameters; the step applies `schedule_args(config)`."""
  return train_state.PackedOptimizer(optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm),
                                                 optax.adamw(schedules.unit_rate,
                                                             weight_decay=config.pretrain.weight_decay)))


def schedule_args(config: ml_collections.ConfigDict):
  """Phase 0's learning-rate schedule, as its train step's `schedule` argument."""
  pre = config.pretrain
  return schedules.schedule_args(pre.learning_rate, pre.warmup_steps, pre.num_steps)


def init_params(segmenter, config: ml_collections.ConfigDict, rng: jax.Array):
  size = config.data.image_size
  return segmenter.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))


def segmentation_loss(logits: jnp.ndarray, mask: jnp.ndarray):
  prob = jnp.clip(jax.nn.sigmoid(logits), 1e-6, 1 - 1e-6)
  bce = optax.sigmoid_binary_cross_entropy(logits, mask).reshape(mask.shape[0], -1).mean(1)
  dice = losses.soft_dice_loss(prob, mask)
  loss = jnp.mean(bce + dice)
  return loss, {'loss': loss, 'bce': jnp.mean(bce), 'dice_loss': jnp.mean(dice)}


def with_pretrained(params: Any, pretrained: Any, names=('encoder',)) -> Any:
  """`params` with the named top-level subtrees replaced by the pre-trained ones."""
  inner = dict(params['params'])
  for name in names:
    inner[name] = pretrained['params'][name]
  return {**params, 'params': inner}
