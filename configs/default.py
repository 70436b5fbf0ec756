"""Every configuration field, with its default. Organ configs import this and override a few fields.

Config files take an argument: `--config=configs/synthetic.py:smoke` or `...:smoke,eps_only`. Tokens:
  smoke        shrink everything so the whole run takes well under two minutes on a CPU (tests, CI)
  cpu          a profile that trains to a meaningful result on a 2-core CPU in about 30 minutes
  plain        the pre-2026-11-27 method (frozen encoder, no coarse logits, no self-conditioning, the
               `three_stage` preset with an MSE x0 stage, auxiliary weight 0.1, the staged 10-NFE sampler);
               the method sweep's one-change-at-a-time arms start from it
  <preset>     a stage-table preset from unisegdiff_jax.diffusion.STAGE_PRESETS (eps_only, x0_only,
               v_only, two_stage, three_stage)
  scratch | frozen | finetune
               the encoder: no phase-0 pre-training (trained jointly) | pre-trained and frozen
               | pre-trained and fine-tuned at pretrain.finetune_lr_multiplier times the learning rate (default)

The default method ("anchored", x0-only, one DDIM step; README "Defaults and why") and why: docs/RESULTS.md,
`method`, `targets` and `control` sweeps.
Any field can also be overridden: `--config.diffusion.stages='0:1000 eps steps=10'`.
"""

import os

import ml_collections

from unisegdiff_jax import diffusion

STAGE_PRESET_NAMES = tuple(diffusion.STAGE_PRESETS)  # one source of truth: the stage-table presets
PRETRAIN_PRESETS = ('scratch', 'frozen', 'finetune')
# The default stage table (since the second change of 2026-11-27): one x0 stage over all timesteps, trained by
# BCE + Dice on its logits (the segmenter's own loss). Inside the anchored method it ties or beats the
# three-stage table below (targets sweep: synthetic +0.8 [+0.7, +0.9], 3 seeds; Kvasir-SEG and BUSI equivalent
# within 1 point, 2 seeds each).
DEFAULT_STAGES = '0:1000 x0 loss=bce_dice steps=10'
# Earlier on 2026-11-27 the default was the `three_stage` boundaries and targets with a BCE + Dice x0 stage,
# sampled with 2 DDIM steps: the experiments' `three_stage_anchored` arm (experiments/sweeps.py).


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config()
  return apply_arguments(config, arg)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: comma-separated TFDS dataset names (a config may be named: 'synthetic_lesions/tiny').
  config.data = ml_collections.ConfigDict()
  config.data.datasets = 'synthetic_lesions'
  config.data.mixture_weights = ''  # comma-separated, one per dataset; '' = balanced per dataset
  config.data.data_dir = os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
  config.data.pack_dir = ''  # read resized numpy packs from here instead of TFDS (unisegdiff_jax.packs)
  config.data.train_split = 'train'
  config.data.val_split = 'val'
  config.data.test_split = 'test'
  config.data.image_size = 64
  config.data.augment = True
  config.data.max_rotation_degrees = 15.0
  config.data.cache_resized = True  # decode + resize each training image once, keep it in memory
  config.data.worker_count = 0  # grain worker processes; 0 = in the main process (threads prefetch)
  config.data.max_val_examples = 64  # periodic validation subset size (0 = all)
  config.data.max_eval_examples = 0  # final evaluation cap per dataset (0 = all)

  config.model = ml_collections.ConfigDict()
  config.model.dtype = 'float32'
  config.model.num_groups = 8
  config.model.encoder = ml_collections.ConfigDict()
  config.model.encoder.widths = (32, 64, 128, 128)
  config.model.encoder.blocks_per_scale = 1
  config.model.denoiser = ml_collections.ConfigDict()
  config.model.denoiser.base_width = 32
  config.model.denoiser.channel_mult = (1, 2, 4, 4)
  config.model.denoiser.num_res_blocks = 1
  config.model.denoiser.attention_levels = (3,)
  config.model.denoiser.num_heads = 4
  config.model.denoiser.dropout = 0.0
  # Self-conditioning (Chen et al., Analog Bits): the previous x0 estimate is an extra denoiser input.
  config.model.self_condition = True

  # Diffusion and the stage table (our reconstruction; UniSegDiff's exact values are unpublished).
  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.num_timesteps = 1000
  config.diffusion.schedule = 'linear'  # linear | cosine
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.stages = DEFAULT_STAGES  # a preset name or a table string, see diffusion.py
  config.diffusion.timestep_sampling = 'uniform'  # uniform | balanced (uniform over stages)
  config.diffusion.mask_scale = 1.0  # masks diffuse as {-mask_scale, +mask_scale} (Chen et al. use 0.1)

  config.loss = ml_collections.ConfigDict()
  config.loss.aux_weight = 1.0  # BCE + Dice on the implied x0 of every sample (the segmenter's weight)
  config.loss.aux_max_t = 1000  # the auxiliary term only for t < aux_max_t

  # Sampling used by validation and evaluation.
  config.sampling = ml_collections.ConfigDict()
  # One DDIM step (the x0 estimate at t = 999 from pure noise): on validation 1-2 steps beat the staged 10-NFE
  # sampler in every budget run, and for the x0-only table 1 step scored highest on all three decision sets
  # (docs/RESULTS.md, targets sweep's budget; a second step at t = 0 moves x0 by sqrt(1 - alpha_bar_0) = 0.01).
  config.sampling.sampler = 'ddim'  # staged | ddim | ddpm
  config.sampling.ddim_steps = 1
  config.sampling.ddpm_steps = 100  # ddpm: ancestral (eta = 1) steps over an evenly spaced subsequence
  config.sampling.ensemble_size = 1  # K samples per image in one batched call (NFE per image = K * steps)
  config.sampling.fusion = 'mean'  # mean | vote | staple: how the K samples are fused
  config.sampling.threshold = 0.5
  config.sampling.batch_size = 32

  # Phase 0: the conditioning encoder pre-trained as a plain segmenter (also the non-diffusion baseline).
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.enabled = True  # False: no pre-training, the encoder trains jointly in phase 1
  config.pretrain.num_steps = 500
  config.pretrain.eval_every_steps = 250
  config.pretrain.learning_rate = 3e-3
  config.pretrain.warmup_steps = 50
  config.pretrain.weight_decay = 1e-4
  config.pretrain.decoder_width = 32
  config.pretrain.encoder_mode = 'finetune'  # frozen | finetune: the encoder in phase 1
  config.pretrain.finetune_lr_multiplier = 0.1
  config.pretrain.coarse_logits = True  # give the segmenter's logits to the denoiser as an input channel
  config.pretrain.checkpoint = ''  # reuse a phase-0 run: its workdir (or pretrain/checkpoints dir)
  config.pretrain.external_weights = ''  # start the encoder from a local .npz / .safetensors file
  config.pretrain.weights_name_map = ''  # JSON {file name: model path} for external_weights

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip_norm = 1.0
  config.optim.ema_decay = 0.99

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 16
  config.train.num_steps = 2000
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 500  # periodic validation + checkpoint
  config.train.checkpoint_every_steps = 500
  config.train.keep_checkpoints = 2  # latest N (plus the best by validation Dice)
  config.train.nonfinite = 'stop'  # stop | skip: what a non-finite loss or gradient does
  config.train.num_overlay_cases = 12
  # Recycling (Fu et al.): the probability that an x0-stage sample's x_t is built from the model's own
  # gradient-free estimate of pure noise instead of the truth (0 = off).
  config.train.recycling = 0.0
  config.train.max_steps_per_run = 0  # > 0: checkpoint and exit 0 after this many steps (resume later)
  # > 0: a jax.profiler trace of steps [profile_first_step, + profile_num_steps) of each phase into
  # <workdir>/profile (TensorBoard's profile tab / Perfetto).
  config.train.profile_first_step = 0
  config.train.profile_num_steps = 5
  return config


def apply_arguments(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the comma-separated config-file argument tokens (smoke, cpu, stage presets)."""
  for token in tokens(arg):
    if token == 'smoke':
      apply_smoke(config)
    elif token == 'cpu':
      apply_cpu(config)
    elif token == 'plain':
      apply_plain(config)
    elif token in STAGE_PRESET_NAMES:
      config.diffusion.stages = token
    elif token == 'scratch':
      config.pretrain.enabled = False
    elif token in ('frozen', 'finetune'):
      config.pretrain.enabled = True
      config.pretrain.encoder_mode = token
    else:
      raise ValueError(f"unknown config argument '{token}': use smoke, cpu, plain, a stage preset "
                       f"({', '.join(STAGE_PRESET_NAMES)}) or {', '.join(PRETRAIN_PRESETS)}")
  return config


def apply_plain(config: ml_collections.ConfigDict) -> None:
  """The method before the anchored default: what the `plain` token restores (field by field)."""
  config.pretrain.encoder_mode = 'frozen'
  config.pretrain.coarse_logits = False
  config.model.self_condition = False
  config.diffusion.stages = 'three_stage'
  config.loss.aux_weight = 0.1
  config.sampling.sampler = 'staged'
  config.sampling.ddim_steps = 100


def tokens(arg: str | None) -> list[str]:
  return [t.strip() for t in (arg or '').split(',') if t.strip()]


def apply_full_scale(config: ml_collections.ConfigDict) -> None:
  """Accelerator-sized defaults for the organ configs (256 px, GPU/TPU widths)."""
  config.data.image_size = 256
  config.model.encoder.widths = (64, 128, 256, 512)
  config.model.encoder.blocks_per_scale = 2
  config.model.denoiser.base_width = 64
  config.model.denoiser.channel_mult = (1, 2, 4, 8)
  config.model.denoiser.num_res_blocks = 2
  config.model.denoiser.attention_levels = (3,)
  config.model.num_groups = 32
  config.pretrain.decoder_width = 128
  config.pretrain.num_steps = 10_000
  config.pretrain.eval_every_steps = 2_000
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1_000
  config.optim.ema_decay = 0.999
  config.train.global_batch_size = 32
  config.train.num_steps = 60_000
  config.train.eval_every_steps = 5_000
  config.train.checkpoint_every_steps = 1_000
  config.sampling.batch_size = 32


def apply_cpu(config: ml_collections.ConfigDict) -> None:
  """A 2-core-CPU profile: 64 px, 1.4M-parameter denoiser; about 30 minutes for both phases."""
  config.data.image_size = 64
  config.model.encoder.widths = (16, 32, 64, 64)
  config.model.encoder.blocks_per_scale = 1
  config.model.denoiser.base_width = 16
  config.model.denoiser.channel_mult = (1, 2, 4, 4)
  config.model.denoiser.num_res_blocks = 1
  config.model.denoiser.attention_levels = (3,)
  config.model.num_groups = 8
  config.pretrain.decoder_width = 32
  config.pretrain.num_steps = 1_000
  config.pretrain.eval_every_steps = 500
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.99
  config.train.global_batch_size = 16
  config.train.num_steps = 2_500
  config.train.eval_every_steps = 500
  config.train.checkpoint_every_steps = 500
  config.sampling.batch_size = 32


def apply_smoke(config: ml_collections.ConfigDict) -> None:
  """Plumbing checks and tests: 32 px and a two-level model (XLA compiles its train step in about 8 s on the
  2-core CPU with the tests' optimisation level, against 13 s for four levels)."""
  config.data.image_size = 32
  config.data.max_val_examples = 8
  config.data.max_eval_examples = 16
  config.model.encoder.widths = (8, 16)
  config.model.denoiser.base_width = 8
  config.model.denoiser.channel_mult = (1, 2)
  config.model.denoiser.attention_levels = (1,)
  config.model.num_groups = 4
  config.sampling.batch_size = 8
  config.train.global_batch_size = 8
  config.train.num_steps = 20
  config.train.log_every_steps = 5
  config.train.eval_every_steps = 10
  config.train.checkpoint_every_steps = 10
  config.train.num_overlay_cases = 4
  config.optim.warmup_steps = 5
  config.pretrain.num_steps = 10
  config.pretrain.eval_every_steps = 10
  config.pretrain.decoder_width = 8
  config.pretrain.warmup_steps = 2
