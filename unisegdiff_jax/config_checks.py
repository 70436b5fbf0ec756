"""Configuration checks that run before any compute, and their error type.

Imported by training, evaluation, sweep and predict alike; it imports no trainer, writer or TensorFlow.
"""

from __future__ import annotations

import jax
import ml_collections
from etils import epath

from unisegdiff_jax import diffusion
from unisegdiff_jax import ensemble
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import pretrain


class ConfigError(ValueError):
  """A configuration that cannot run; the message is one line naming the field."""


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None
                    ) -> diffusion.StagedDiffusion:
  """Checks everything that can be checked without compute; returns the staged diffusion process."""
  process = diffusion.from_config(config.diffusion)  # StageTableError on gaps, overlaps, bad names
  num_devices = jax.device_count() if num_devices is None else num_devices
  size = config.data.image_size
  levels = len(config.model.denoiser.channel_mult)
  if len(config.model.encoder.widths) != levels:
    raise ConfigError(f'config.model.encoder.widths has {len(config.model.encoder.widths)} scales but '
                      f'config.model.denoiser.channel_mult has {levels} levels: they must match')
  factor = 2 ** (levels - 1)
  if size <= 0 or size % factor:
    raise ConfigError(f'config.data.image_size={size} cannot be halved {levels - 1} times by the '
                      f'{levels}-level UNet: use a multiple of {factor}')
  for stage in process.stages:
    if stage.transform.startswith('down:') and size % int(float(stage.transform[5:])):
      raise ConfigError(f'stage transform {stage.transform} needs config.data.image_size divisible by it')
  for section, field in (('train', 'global_batch_size'), ('sampling', 'batch_size')):
    batch = config[section][field]
    if batch <= 0 or batch % num_devices:
      raise ConfigError(f'config.{section}.{field}={batch} is not divisible by the {num_devices} devices: '
                        f'use a multiple of {num_devices}')
  if config.pretrain.encoder_mode not in pretrain.ENCODER_MODES:
    raise ConfigError(f"config.pretrain.encoder_mode='{config.pretrain.encoder_mode}': use frozen or finetune")
  if config.train.nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"config.train.nonfinite='{config.train.nonfinite}': use stop or skip")
  if not 0.0 <= config.train.recycling <= 1.0:
    raise ConfigError(f'config.train.recycling={config.train.recycling}: a probability in [0, 1]')
  if config.diffusion.timestep_sampling not in ('uniform', 'balanced'):
    raise ConfigError(f"config.diffusion.timestep_sampling='{config.diffusion.timestep_sampling}': "
                      'use uniform or balanced')
  sampling_settings(config)
  for dim in config.model.denoiser.attention_levels:
    if not 0 <= dim < levels:
      raise ConfigError(f'config.model.denoiser.attention_levels has level {dim}; levels are 0..{levels - 1}')
  input_pipeline.mixture_weights(config.data)  # raises on a malformed list
  return process


def sampling_settings(config: ml_collections.ConfigDict, **overrides) -> ensemble.Settings:
  """`ensemble.settings_from_config` (sampler, steps, ensemble size, fusion) with ConfigError on bad values."""
  try:
    return ensemble.settings_from_config(config, **overrides)
  except ensemble.EnsembleConfigError as err:
    raise ConfigError(str(err)) from None


def check_workdir(workdir: str) -> epath.Path:
  """Creates `workdir` (a local path or a gs:// URL) and checks it is writable; returns it as an epath."""
  path = epath.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f'.write_test.{jax.process_index()}'  # one per process: they probe the same workdir
    probe.write_text('ok')
    probe.unlink()
  except OSError as err:
    raise ConfigError(f'workdir {workdir} is not writable: {err.strerror or err}') from None
  return path
