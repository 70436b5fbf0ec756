"""Training: state, the sharded train step, the loop with periodic validation and checkpoints, evaluation.

`train_and_evaluate(config, workdir)` trains (resuming from the latest checkpoint in `workdir` if there is
one), then evaluates the best checkpoint's EMA weights on the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unisegdiff_jax import checkpointing
from unisegdiff_jax import diffusion
from unisegdiff_jax import ensemble
from unisegdiff_jax import evaluate as evaluate_lib
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import losses
from unisegdiff_jax import pretrain
from unisegdiff_jax import schedules
from unisegdiff_jax import writers
from unisegdiff_jax.models import denoiser as denoiser_lib


class ConfigError(ValueError):
  """A configuration that cannot run; the message is one line naming the field."""


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient under `config.train.nonfinite='stop'`."""


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any


# ---------------------------------------------------------------------------------------------------------
# Validation before any compute.


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
  for field in ('global_batch_size',):
    batch = config.train[field]
    if batch <= 0 or batch % num_devices:
      raise ConfigError(f'config.train.{field}={batch} is not divisible by the {num_devices} devices: '
                        f'use a multiple of {num_devices}')
  if config.sampling.batch_size <= 0 or config.sampling.batch_size % num_devices:
    raise ConfigError(f'config.sampling.batch_size={config.sampling.batch_size} is not divisible by the '
                      f'{num_devices} devices: use a multiple of {num_devices}')
  if config.pretrain.encoder_mode not in pretrain.ENCODER_MODES:
    raise ConfigError(f"config.pretrain.encoder_mode='{config.pretrain.encoder_mode}': use frozen or finetune")
  if config.train.nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"config.train.nonfinite='{config.train.nonfinite}': use stop or skip")
  if not 0.0 <= config.train.recycling <= 1.0:
    raise ConfigError(f'config.train.recycling={config.train.recycling}: a probability in [0, 1]')
  if config.diffusion.timestep_sampling not in ('uniform', 'balanced'):
    raise ConfigError(f"config.diffusion.timestep_sampling='{config.diffusion.timestep_sampling}': "
                      'use uniform or balanced')
  try:
    ensemble.settings_from_config(config)  # sampler (staged | ddim | ddpm), its steps, ensemble_size, fusion
  except ensemble.EnsembleConfigError as err:
    raise ConfigError(str(err)) from None
  for dim in config.model.denoiser.attention_levels:
    if not 0 <= dim < levels:
      raise ConfigError(f'config.model.denoiser.attention_levels has level {dim}; levels are 0..{levels - 1}')
  input_pipeline.mixture_weights(config.data)  # raises on a malformed list
  return process


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as err:
    raise ConfigError(f'workdir {workdir} is not writable: {err.strerror or err}') from None


# ---------------------------------------------------------------------------------------------------------
# State, optimiser, step.


def make_optimizer(config: ml_collections.ConfigDict, pretrained_names=()) -> optax.GradientTransformation:
  """Clipping + AdamW with warm-up and cosine decay; pre-trained top-level subtrees (phase 1) are frozen
  (`config.pretrain.encoder_mode='frozen'`) or fine-tuned at `finetune_lr_multiplier` times the rate."""
  schedule = schedules.warmup_cosine(config.optim.learning_rate, config.optim.warmup_steps,
                                     config.train.num_steps)
  adamw = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  if pretrained_names:
    if config.pretrain.encoder_mode == 'frozen':
      pretrained_tx = optax.set_to_zero()
    else:
      pretrained_tx = optax.chain(optax.adamw(schedule, weight_decay=config.optim.weight_decay),
                                  optax.scale(config.pretrain.finetune_lr_multiplier))

    def labels(params):
      return {'params': {name: jax.tree_util.tree_map(
          lambda _, n=name: 'pretrained' if n in pretrained_names else 'train', sub)
                         for name, sub in params['params'].items()}}

    adamw = optax.multi_transform({'train': adamw, 'pretrained': pretrained_tx}, labels)
  return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm), adamw)


def init_params(model, config: ml_collections.ConfigDict, rng: jax.Array):
  size = config.data.image_size
  image = jnp.zeros((1, size, size, 3), jnp.float32)
  x_t = jnp.zeros((1, size, size, 1), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  return model.init(rng, image, x_t, t, t)


def create_train_state(model, config: ml_collections.ConfigDict, optimizer, rng: jax.Array) -> TrainState:
  params = init_params(model, config, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=params)


def train_step(state: TrainState, batch: dict, base_rng: jax.Array, *, model, optimizer,
               process: diffusion.StagedDiffusion, config: ml_collections.ConfigDict):
  """One optimiser step on a (sharded) global batch. Non-finite updates are never applied."""
  rng = jax.random.fold_in(base_rng, state.step)
  loss_rng, dropout_rng = jax.random.split(rng)

  def loss_fn(params):
    conditioning = model.apply(params, batch['image'], train=True, method=model.encode)  # once per step

    def predict(x_t, t, stage_id, self_cond):
      return model.apply(params, conditioning, x_t, t, stage_id, self_cond, train=True,
                         rngs={'dropout': dropout_rng}, method=model.denoise)
    loss, metrics = losses.staged_loss(predict, batch['mask'], loss_rng, process,
                                       timestep_sampling=config.diffusion.timestep_sampling,
                                       aux_weight=config.loss.aux_weight, aux_max_t=config.loss.aux_max_t,
                                       self_condition=config.model.self_condition,
                                       recycling=config.train.recycling)
    return _inject_nonfinite(loss, state, config), metrics

  return _apply_gradients(state, jax.value_and_grad(loss_fn, has_aux=True)(state.params), optimizer, config)


# ---------------------------------------------------------------------------------------------------------
# The loop.


def create_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('data',))


def _global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then checkpoint and exit 0)."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C means now
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def make_segment_fn(model, process, config, sampler: str | None = None, ddim_steps: int | None = None):
  """(segment, NFE per image) for config.sampling: sampler, its steps and the ensemble (K members in one
  batched call, fused by config.sampling.fusion; NFE counts every member)."""
  settings = ensemble.settings_from_config(config, sampler=sampler, num_steps=ddim_steps)
  segment, _, nfe = ensemble.make_segment_fn(model, process, settings)
  return segment, nfe


@dataclasses.dataclass
class Phase:
  """One training phase (phase 0: the segmenter; phase 1: the diffusion model) and how to evaluate it."""
  name: str
  directory: str  # checkpoints in <directory>/checkpoints, evaluation in <directory>/eval/<split>
  num_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  init_state: Callable[[], TrainState]
  step_fn: Callable  # jitted (state, batch, rng) -> (state, metrics)
  segment: Callable  # (params, images, per-image keys [B, 2]) -> probability
  nfe: int
  sampler: str
  ensemble_size: int = 1
  threshold: float | None = None  # None: config.sampling.threshold


@dataclasses.dataclass
class _Runtime:
  mesh: Mesh
  replicated: NamedSharding
  batch_sharding: NamedSharding
  writer: Any
  step_rng: jax.Array
  eval_rng: jax.Array


def _abstract(init_state: Callable[[], TrainState], sharding: NamedSharding):
  shapes = jax.eval_shape(init_state)
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _evaluate_phase(phase: Phase, params, config, split: str, out_dir: str | None, step: int,
                    runtime: _Runtime, max_examples: int, extra: dict | None = None) -> dict:
  return evaluate_lib.evaluate(phase.segment, params, config, split, out_dir, step=step, nfe=phase.nfe,
                               sampler=phase.sampler, rng=runtime.eval_rng, max_examples=max_examples,
                               batch_sharding=runtime.batch_sharding, extra=extra,
                               ensemble_size=phase.ensemble_size, threshold=phase.threshold)


def run_phase(phase: Phase, config: ml_collections.ConfigDict, runtime: _Runtime):
  """Trains one phase, resuming from its latest checkpoint. Returns (best EMA params, best step) or None
  when stopped early (signal or max_steps_per_run) after checkpointing."""
  abstract_state = _abstract(phase.init_state, runtime.replicated)
  ckpt_dir = os.path.join(phase.directory, 'checkpoints')
  checkpointing.log_half_written(ckpt_dir)
  manager = checkpointing.create_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  train_iter = input_pipeline.create_train_iterator(config)
  latest = manager.latest_step()
  if latest is not None:
    state, iter_state = checkpointing.restore(manager, latest, abstract_state)
    if iter_state is not None:
      train_iter.set_state(iter_state)
    logging.info('%s: resuming from checkpoint step %d in %s', phase.name, latest, ckpt_dir)
    print(f'Resuming {phase.name} from checkpoint step {latest} in {ckpt_dir}', flush=True)
  else:
    state = jax.jit(phase.init_state, out_shardings=runtime.replicated)()
  param_count = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  logging.info('%s: %d parameters; devices: %d (%s)', phase.name, param_count, jax.device_count(),
               jax.devices()[0].device_kind)

  writer, prefix = runtime.writer, '' if phase.name == 'diffusion' else f'{phase.name}/'
  step = start_step = int(state.step)
  if step >= phase.num_steps:
    logging.info('%s: already trained (%d steps)', phase.name, step)
  hooks = []
  if jax.process_index() == 0 and step < phase.num_steps:
    hooks.append(writers.ProgressHook(phase.num_steps, writer, config.train.log_every_steps))
  stopped, train_metrics, pending = None, [], []
  with _StopRequest() as stop:
    while step < phase.num_steps:
      batch = _global_batch(next(train_iter), runtime.batch_sharding)
      state, metrics = phase.step_fn(state, batch, runtime.step_rng)
      step += 1
      pending.append(metrics)  # device arrays: the host does not wait for this step here
      for hook in hooks:
        hook(step)
      run_limit = config.train.max_steps_per_run
      limit_reached = run_limit > 0 and step - start_step >= run_limit and step < phase.num_steps
      stopping = stop.signal_name is not None or limit_reached
      log_now = step % config.train.log_every_steps == 0 or step == phase.num_steps
      if (log_now or stopping or step % phase.eval_every_steps == 0
          or step % phase.checkpoint_every_steps == 0):
        # The only host-device sync of the loop: at log, validation, checkpoint and stop steps.
        train_metrics += _check_finite(jax.device_get(pending), step, phase, config, manager)
        pending = []
      if log_now:
        summary = {k: float(np.mean([m[k] for m in train_metrics])) for k in train_metrics[0]}
        writer.write_scalars(step, {f'{prefix}train/{k}': v for k, v in summary.items()})
        train_metrics = []
      if step % phase.eval_every_steps == 0 or step == phase.num_steps:
        val = _evaluate_phase(phase, state.ema_params, config, config.data.val_split, None, step, runtime,
                              config.data.max_val_examples)
        writer.write_scalars(step, {f'{prefix}val/dice': val['mean']['dice'], f'{prefix}val/iou': val['mean']['iou']})
        logging.info('%s step %d: validation Dice %.4f', phase.name, step, val['mean']['dice'])
        checkpointing.save(manager, step, state, train_iter.get_state(),
                           {checkpointing.BEST_METRIC: val['mean']['dice']})
      elif step % phase.checkpoint_every_steps == 0:
        checkpointing.save(manager, step, state, train_iter.get_state())
      if stopping:
        if manager.latest_step() != step:
          checkpointing.save(manager, step, state, train_iter.get_state())
        stopped = stop.signal_name or f'max_steps_per_run={run_limit} reached'
        break
  writer.flush()
  checkpointing.wait_until_finished(manager)  # a failed async save: CheckpointError, one line
  if stopped:
    message = f'{stopped}: saved {phase.name} checkpoint step {step} in {ckpt_dir}; rerun the same command to resume'
    logging.warning(message)
    print(message, flush=True)
    manager.close()
    return None
  best = checkpointing.best_step(manager)
  if best != step:
    state, _ = checkpointing.restore(manager, best, abstract_state, with_data_iter=False)
  manager.close()
  return state.ema_params, best


def _check_finite(fetched: list[dict], step: int, phase: Phase, config, manager) -> list[dict]:
  """Applies the non-finite policy to the metrics of the steps up to `step` (fetched in one transfer)."""
  first = step - len(fetched) + 1
  for offset, metrics in enumerate(fetched):
    if float(metrics['finite']) == 0.0:
      bad = first + offset
      if config.train.nonfinite == 'stop':
        checkpointing.wait_until_finished(manager)  # the last good checkpoint must finish writing first
        raise NonFiniteError(
            f'{phase.name}: non-finite loss or gradient at step {bad}: training stopped; the latest '
            f'checkpoint ({manager.latest_step()}) is the last good one. Set config.train.nonfinite=skip '
            'to skip such steps')
      logging.warning('%s: skipped step %d: non-finite loss or gradient', phase.name, bad)
  return fetched


def _make_runtime(config: ml_collections.ConfigDict, workdir: str) -> _Runtime:
  mesh = create_mesh()
  _, step_rng, eval_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  return _Runtime(mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P('data')), writer, step_rng, eval_rng)


def _init_rng(config: ml_collections.ConfigDict, phase_index: int) -> jax.Array:
  return jax.random.fold_in(jax.random.split(jax.random.PRNGKey(config.seed), 3)[0], phase_index)


def _phase_settings(config, directory: str, name: str, pre: bool) -> dict:
  section = config.pretrain if pre else config.train
  return dict(name=name, directory=directory, num_steps=section.num_steps,
              eval_every_steps=section.eval_every_steps if pre else config.train.eval_every_steps,
              checkpoint_every_steps=config.train.checkpoint_every_steps)


def segmenter_phase(config: ml_collections.ConfigDict, workdir: str, runtime: _Runtime) -> Phase:
  segmenter = pretrain.build_segmenter(config)
  optimizer = pretrain.make_optimizer(config)
  init_rng = _init_rng(config, 0)

  def init_state():
    params = pretrain.init_params(segmenter, config, init_rng)
    params = _with_external_encoder(params, config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=params)

  def step(state, batch, base_rng):
    del base_rng  # the segmenter's step is deterministic given the batch

    def loss_fn(params):
      loss, metrics = pretrain.segmentation_loss(segmenter.apply(params, batch['image'], train=True), batch['mask'])
      return _inject_nonfinite(loss, state, config), metrics
    return _apply_gradients(state, jax.value_and_grad(loss_fn, has_aux=True)(state.params), optimizer, config)

  jitted = jax.jit(step, in_shardings=(runtime.replicated, runtime.batch_sharding, runtime.replicated),
                   out_shardings=(runtime.replicated, runtime.replicated), donate_argnums=(0,))
  return Phase(**_phase_settings(config, os.path.join(workdir, 'pretrain'), 'pretrain', True),
               init_state=init_state, step_fn=jitted, segment=jax.jit(pretrain.make_segment_fn(segmenter)),
               nfe=1, sampler='segmenter')


def _with_external_encoder(params, config):
  """Starts the encoder from a local weight file when `config.pretrain.external_weights` names one."""
  if not config.pretrain.external_weights:
    return params
  from unisegdiff_jax import weights  # pylint: disable=g-import-not-at-top
  encoder = weights.load_encoder_weights(config.pretrain.external_weights, params['params']['encoder'],
                                         config.pretrain.weights_name_map or None)
  return {**params, 'params': {**params['params'], 'encoder': encoder}}


def _inject_nonfinite(loss, state, config):
  if config.train.debug_nonfinite_step > 0:  # fault injection for the tests of the non-finite policy
    loss = loss * jnp.where(state.step + 1 == config.train.debug_nonfinite_step, jnp.nan, 1.0)
  return loss


def _apply_gradients(state: TrainState, loss_and_grads, optimizer, config):
  (loss, metrics), grads = loss_and_grads
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  # One global norm catches any NaN/Inf gradient (per-leaf isfinite reductions made XLA's CPU compile 5x slower).
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = TrainState(step=step, params=params, opt_state=opt_state, ema_params=ema)
  # A non-finite step only advances the step counter (so the data and rng streams stay aligned).
  kept = state.replace(step=step)
  new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
  metrics['grad_norm'] = grad_norm
  metrics['finite'] = finite.astype(jnp.float32)
  return new_state, metrics


def diffusion_parts(config: ml_collections.ConfigDict, process: diffusion.StagedDiffusion):
  """(model, optimizer, pretrained subtree names) of phase 1 under the config's pre-training mode."""
  pre = config.pretrain
  uses_pretrained = pre.enabled or bool(pre.checkpoint)
  coarse_width = pre.decoder_width if (uses_pretrained and pre.coarse_logits) else 0
  model = denoiser_lib.build_model(config.model, process.num_stages,
                                   freeze_encoder=uses_pretrained and pre.encoder_mode == 'frozen',
                                   coarse_logits_decoder_width=coarse_width)
  names = (('encoder', 'decoder') if coarse_width else ('encoder',)) if uses_pretrained else ()
  return model, make_optimizer(config, pretrained_names=names), names


def diffusion_phase(config: ml_collections.ConfigDict, workdir: str, runtime: _Runtime,
                    process: diffusion.StagedDiffusion, pretrained_params=None) -> Phase:
  model, optimizer, names = diffusion_parts(config, process)
  init_rng = _init_rng(config, 1)

  def init_state():
    params = init_params(model, config, init_rng)
    if pretrained_params is not None:
      params = pretrain.with_pretrained(params, pretrained_params, names)
    elif not names:
      params = _with_external_encoder(params, config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=params)

  jitted = jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer, process=process, config=config),
      in_shardings=(runtime.replicated, runtime.batch_sharding, runtime.replicated),
      out_shardings=(runtime.replicated, runtime.replicated), donate_argnums=(0,))
  segment, nfe = make_segment_fn(model, process, config)
  settings = ensemble.settings_from_config(config)
  return Phase(**_phase_settings(config, workdir, 'diffusion', False), init_state=init_state, step_fn=jitted,
               segment=segment, nfe=nfe, sampler=config.sampling.sampler, ensemble_size=settings.ensemble_size,
               threshold=ensemble.mask_threshold(settings.fusion, settings.threshold))


def _load_external_segmenter(config: ml_collections.ConfigDict, runtime: _Runtime, phase: Phase):
  """Best EMA params of an existing phase-0 run (`config.pretrain.checkpoint`: a workdir or its
  pretrain/ or pretrain/checkpoints/ directory) and its step."""
  path = os.path.abspath(config.pretrain.checkpoint)
  candidates = [os.path.join(path, 'pretrain', 'checkpoints')]  # a run's workdir
  if os.path.basename(path) == 'pretrain':
    candidates.append(os.path.join(path, 'checkpoints'))
  if os.path.basename(path) == 'checkpoints':
    candidates.append(path)
  for candidate in candidates:
    if os.path.isdir(candidate) and any(n.isdigit() for n in os.listdir(candidate)):
      manager = checkpointing.create_manager(candidate, keep=config.train.keep_checkpoints)
      best = checkpointing.best_step(manager)
      state, _ = checkpointing.restore(manager, best, _abstract(phase.init_state, runtime.replicated),
                                       with_data_iter=False)
      manager.close()
      print(f'Using the pre-trained encoder of {candidate} (step {best})', flush=True)
      return state.ema_params, best
  raise checkpointing.CheckpointError(
      f'config.pretrain.checkpoint={config.pretrain.checkpoint}: no phase-0 checkpoint found there')


def _cached_summary(path: str, step: int) -> dict | None:
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
    if summary.get('checkpoint_step') == step:
      return summary
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, pretrain_only: bool = False) -> dict:
  """Phase 0 (segmenter pre-training, unless disabled), phase 1 (diffusion), then test evaluation.

  Rerunning skips finished phases and resumes an unfinished one from its latest checkpoint. With
  `pretrain_only` it stops after phase 0 and its test evaluation (the experiment runner trains phase 0 once
  and hands it to every phase-1 arm through `config.pretrain.checkpoint`).
  """
  process = validate_config(config)
  if pretrain_only and not config.pretrain.enabled:
    raise ConfigError('--mode=pretrain with config.pretrain.enabled=False: there is no phase 0 to train')
  check_workdir(workdir)
  runtime = _make_runtime(config, workdir)
  logging.info('stage table: %s', process.describe())
  split = config.data.test_split

  pretrained, segmenter_summary = None, None
  if config.pretrain.enabled or config.pretrain.checkpoint:
    seg_phase = segmenter_phase(config, workdir, runtime)
    if config.pretrain.checkpoint:
      result = _load_external_segmenter(config, runtime, seg_phase)
    else:
      result = run_phase(seg_phase, config, runtime)
      if result is None:
        return {'stopped_in': 'pretrain'}
    pretrained, seg_step = result
    seg_dir = os.path.join(seg_phase.directory, 'eval', split)
    reused = (os.path.join(config.pretrain.checkpoint, 'pretrain', 'eval', split, 'summary.json')
              if config.pretrain.checkpoint else None)  # a phase-0 workdir's own evaluation
    segmenter_summary = ((reused and _cached_summary(reused, seg_step))
                         or _cached_summary(os.path.join(seg_dir, 'summary.json'), seg_step)
                         or _evaluate_phase(seg_phase, pretrained, config, split, seg_dir, seg_step, runtime,
                                            config.data.max_eval_examples))
    print(f"Pre-trained segmenter: test Dice {segmenter_summary['mean']['dice']:.4f} (step {seg_step})", flush=True)
    if pretrain_only:
      return segmenter_summary

  phase = diffusion_phase(config, workdir, runtime, process, pretrained)
  result = run_phase(phase, config, runtime)
  if result is None:
    return {'stopped_in': 'diffusion'}
  params, best = result
  out_dir = os.path.join(workdir, 'eval', split)
  extra = {'stage_table': process.describe(),
           'pretrain_mode': ((('external ' if config.pretrain.checkpoint else '') + config.pretrain.encoder_mode)
                             if segmenter_summary is not None else 'none (encoder trained jointly)')}
  if segmenter_summary is not None:
    extra['pretrained_segmenter'] = {k: segmenter_summary[k] for k in ('datasets', 'mean', 'checkpoint_step')}
  summary = _evaluate_phase(phase, params, config, split, out_dir, best, runtime, config.data.max_eval_examples,
                            extra=extra)
  runtime.writer.write_scalars(best, {'test/dice': summary['mean']['dice']})
  print(f"Test Dice {summary['mean']['dice']:.4f} (checkpoint step {best}, {phase.nfe} NFE/image); "
        f"wrote {os.path.join(out_dir, 'summary.json')}", flush=True)
  return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, checkpoint_step: int | None = None,
                        split: str | None = None, out_dir: str | None = None) -> dict:
  """`--mode=eval`: evaluates a diffusion checkpoint (best by validation Dice unless a step is given) and
  writes to `out_dir` (default <workdir>/eval/<split>)."""
  process = validate_config(config)
  runtime = _make_runtime(config, workdir)
  phase = diffusion_phase(config, workdir, runtime, process)
  params, step = load_params(config, workdir, phase, runtime, checkpoint_step)
  split = split or config.data.test_split
  return _evaluate_phase(phase, params, config, split, out_dir or os.path.join(workdir, 'eval', split), step,
                         runtime, config.data.max_eval_examples)


def load_params(config, workdir: str, phase: Phase, runtime: _Runtime, checkpoint_step: int | None = None):
  """EMA params of a phase's checkpoint (best by validation Dice unless a step is given) and the step."""
  state, step = checkpointing.restore_for_inference(
      os.path.join(phase.directory, 'checkpoints'), _abstract(phase.init_state, runtime.replicated),
      keep=config.train.keep_checkpoints, checkpoint_step=checkpoint_step)
  return state.ema_params, step
