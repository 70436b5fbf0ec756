"""The two training phases as small objects the loop runs: phase 0 (the segmenter) and phase 1 (diffusion).

A `Phase` carries its directory and schedule, how to build its initial state, its jitted step, and its
inference function for the shared `inference.Engine` (built once per phase, so validation compiles once).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unisegdiff_jax import checkpointing
from unisegdiff_jax import config_checks
from unisegdiff_jax import diffusion
from unisegdiff_jax import ensemble
from unisegdiff_jax import inference
from unisegdiff_jax import pretrain
from unisegdiff_jax import sampling
from unisegdiff_jax import train_state
from unisegdiff_jax.models import denoiser as denoiser_lib


@dataclasses.dataclass
class Runtime:
  """What every phase runs on: the device mesh, its shardings, the writer and the run's rng streams."""
  mesh: Mesh
  replicated: NamedSharding
  batch_sharding: NamedSharding
  writer: Any
  step_rng: jax.Array
  eval_rng: jax.Array
  workdir: str = ''


def create_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('data',))


def make_runtime(config: ml_collections.ConfigDict, writer: Any = None, workdir: str = '') -> Runtime:
  mesh = create_mesh()
  _, step_rng, eval_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  return Runtime(mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P('data')), writer, step_rng, eval_rng,
                 workdir)


@dataclasses.dataclass
class Phase:
  """One training phase and how to run inference with it."""
  name: str
  directory: str  # checkpoints in <directory>/checkpoints, evaluation in <directory>/eval/<split>
  num_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  init_params: Callable[[], Any]  # jit-able random initialisation (no weights baked in as constants)
  start: Callable[[Any], Any]  # params -> params with pre-trained / external weights put in (eager)
  optimizer: Any
  step_fn: Callable  # (state, batch, rng) -> (state, metrics): a BoundStep (this run's schedule bound)
  members: Callable  # (params, images, per-image keys [B, 2]) -> member probabilities [K, B, S, S, 1]
  settings: ensemble.Settings  # sampler label, ensemble size, fusion, threshold
  nfe: int  # network evaluations per image, all members together
  _engine: inference.Engine | None = None

  def engine(self, config: ml_collections.ConfigDict, runtime: Runtime) -> inference.Engine:
    if self._engine is None:
      self._engine = inference.Engine(self.members, self.settings, image_size=config.data.image_size,
                                      batch_size=config.sampling.batch_size, mesh=runtime.mesh)
    return self._engine

  def make_state(self, params) -> train_state.TrainState:
    return train_state.new_state(params, self.optimizer)

  def initial_state(self, runtime: Runtime) -> train_state.TrainState:
    """Random init (jitted), pre-trained or external weights put in, then the optimiser state: the weights
    are arguments of the programs, not constants compiled into them."""
    params = self.start(jax.jit(self.init_params, out_shardings=runtime.replicated)())
    return jax.jit(self.make_state, out_shardings=runtime.replicated)(params)

  def abstract_state(self, sharding: NamedSharding):
    shapes = jax.eval_shape(lambda: self.make_state(self.init_params()))
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)

  def restore_ema(self, config, runtime: Runtime, checkpoint_step: int | None = None):
    """(EMA params, step) of this phase's checkpoint (best by validation Dice unless a step is given)."""
    abstract = self.abstract_state(runtime.replicated).ema_params
    return inference.restore_ema_params(os.path.join(self.directory, 'checkpoints'), abstract,
                                        checkpoint_step=checkpoint_step, keep=config.train.keep_checkpoints)


def _init_rng(config: ml_collections.ConfigDict, phase_index: int) -> jax.Array:
  return jax.random.fold_in(jax.random.split(jax.random.PRNGKey(config.seed), 3)[0], phase_index)


def _schedule(config, directory: str, name: str, pre: bool) -> dict:
  section = config.pretrain if pre else config.train
  return dict(name=name, directory=directory, num_steps=section.num_steps,
              eval_every_steps=section.eval_every_steps if pre else config.train.eval_every_steps,
              checkpoint_every_steps=config.train.checkpoint_every_steps)


@dataclasses.dataclass
class BoundStep:
  """A jitted train step (state, batch, rng, schedule) with its run's learning-rate schedule bound: called,
  traced and lowered with (state, batch, rng)."""
  jitted: Any
  schedule: jax.Array

  def __call__(self, state, batch, rng):
    return self.jitted(state, batch, rng, self.schedule)

  def trace(self, state, batch, rng):
    return self.jitted.trace(state, batch, rng, self.schedule)

  def lower(self, state, batch, rng):
    return self.jitted.lower(state, batch, rng, self.schedule)


def jit_step(step, replicated: NamedSharding, batch_sharding: NamedSharding, schedule: np.ndarray) -> BoundStep:
  """`step` jitted over the mesh (state donated) with the learning-rate schedule (schedules.schedule_args) as
  an argument, so that run length and rate are not compiled in."""
  jitted = jax.jit(step, in_shardings=(replicated, batch_sharding, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
  return BoundStep(jitted, jnp.asarray(schedule))


def _jit_step(step, runtime: Runtime, schedule: np.ndarray) -> BoundStep:
  return jit_step(step, runtime.replicated, runtime.batch_sharding, schedule)


def with_external_encoder(params, config):
  """Starts the encoder from a local weight file when `config.pretrain.external_weights` names one."""
  if not config.pretrain.external_weights:
    return params
  from unisegdiff_jax import weights  # pylint: disable=g-import-not-at-top
  encoder = weights.load_encoder_weights(config.pretrain.external_weights, params['params']['encoder'],
                                         config.pretrain.weights_name_map or None)
  return {**params, 'params': {**params['params'], 'encoder': encoder}}


def segmenter_phase(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime) -> Phase:
  """Phase 0: the encoder + light decoder trained as a plain segmenter (BCE + Dice)."""
  segmenter = pretrain.build_segmenter(config)
  optimizer = pretrain.make_optimizer(config)
  init_rng = _init_rng(config, 0)
  def step(state, batch, base_rng, schedule):
    del base_rng  # the segmenter's step is deterministic given the batch

    def loss_fn(params):
      return pretrain.segmentation_loss(segmenter.apply(params, batch['image'], train=True), batch['mask'])
    return train_state.apply_gradients(state, jax.value_and_grad(loss_fn, has_aux=True)(state.params),
                                       optimizer, config, schedule)

  def members(params, images, keys):
    del keys  # deterministic
    return jax.nn.sigmoid(segmenter.apply(params, images))[None]

  settings = ensemble.Settings('segmenter', None, 1, 'mean', float(config.sampling.threshold))
  return Phase(**_schedule(config, os.path.join(workdir, 'pretrain'), 'pretrain', True),
               init_params=lambda: pretrain.init_params(segmenter, config, init_rng),
               start=functools.partial(with_external_encoder, config=config), optimizer=optimizer,
               step_fn=_jit_step(step, runtime, pretrain.schedule_args(config)), members=members,
               settings=settings, nfe=1)


def diffusion_parts(config: ml_collections.ConfigDict, process: diffusion.StagedDiffusion):
  """(model, optimizer, pretrained subtree names) of phase 1 under the config's pre-training mode."""
  pre = config.pretrain
  uses_pretrained = pre.enabled or bool(pre.checkpoint)
  coarse_width = pre.decoder_width if (uses_pretrained and pre.coarse_logits) else 0
  model = denoiser_lib.build_model(config.model, process.num_stages,
                                   freeze_encoder=uses_pretrained and pre.encoder_mode == 'frozen',
                                   coarse_logits_decoder_width=coarse_width)
  names = (('encoder', 'decoder') if coarse_width else ('encoder',)) if uses_pretrained else ()
  return model, train_state.make_optimizer(config, pretrained_names=names), names


def diffusion_members(model, process: diffusion.StagedDiffusion, settings: ensemble.Settings):
  """(members function, NFE per image) of the sampler and ensemble in `settings`."""
  timesteps = sampling.timesteps_for(process, settings.sampler, settings.num_steps)
  members = ensemble.make_members_fn(model, process, timesteps, ensemble_size=settings.ensemble_size,
                                     stochastic=settings.stochastic)
  return members, len(timesteps) * settings.ensemble_size


def diffusion_phase(config: ml_collections.ConfigDict, workdir: str, runtime: Runtime,
                    process: diffusion.StagedDiffusion, pretrained_params=None) -> Phase:
  """Phase 1: the staged diffusion model, conditioned on the (pre-trained) encoder."""
  model, optimizer, names = diffusion_parts(config, process)
  init_rng = _init_rng(config, 1)

  def start(params):
    if pretrained_params is not None:
      return pretrain.with_pretrained(params, pretrained_params, names)
    return with_external_encoder(params, config) if not names else params

  step = functools.partial(train_state.train_step, model=model, optimizer=optimizer, process=process,
                           config=config)
  settings = config_checks.sampling_settings(config)
  members, nfe = diffusion_members(model, process, settings)
  return Phase(**_schedule(config, workdir, 'diffusion', False),
               init_params=lambda: train_state.init_params(model, config, init_rng), start=start,
               optimizer=optimizer, step_fn=_jit_step(step, runtime, train_state.schedule_args(config)),
               members=members, settings=settings, nfe=nfe)


def load_external_segmenter(config: ml_collections.ConfigDict, runtime: Runtime, phase: Phase):
  """Best EMA params of an existing phase-0 run (`config.pretrain.checkpoint`: a workdir or its
  pretrain/ or pretrain/checkpoints/ directory) and its step."""
  path = epath.Path(config.pretrain.checkpoint)
  candidates = [path / 'pretrain' / 'checkpoints']  # a run's workdir
  if path.name == 'pretrain':
    candidates.append(path / 'checkpoints')
  if path.name == 'checkpoints':
    candidates.append(path)
  for candidate in candidates:
    if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
      params, best = inference.restore_ema_params(str(candidate), phase.abstract_state(runtime.replicated).ema_params,
                                                  keep=config.train.keep_checkpoints)
      print(f'Using the pre-trained encoder of {candidate} (step {best})', flush=True)
      return params, best
  raise checkpointing.CheckpointError(
      f'config.pretrain.checkpoint={config.pretrain.checkpoint}: no phase-0 checkpoint found there')
