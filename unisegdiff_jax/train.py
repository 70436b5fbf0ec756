"""Training: state, the sharded train step, the loop with periodic validation and checkpoints, evaluation.

`train_and_evaluate(config, workdir)` trains (resuming from the latest checkpoint in `workdir` if there is
one), then evaluates the best checkpoint's EMA weights on the test split.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unisegdiff_jax import checkpointing
from unisegdiff_jax import diffusion
from unisegdiff_jax import evaluate as evaluate_lib
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import losses
from unisegdiff_jax import sampling
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
  if config.train.nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"config.train.nonfinite='{config.train.nonfinite}': use stop or skip")
  if config.diffusion.timestep_sampling not in ('uniform', 'balanced'):
    raise ConfigError(f"config.diffusion.timestep_sampling='{config.diffusion.timestep_sampling}': "
                      'use uniform or balanced')
  if config.sampling.sampler not in ('staged', 'ddim'):
    raise ConfigError(f"config.sampling.sampler='{config.sampling.sampler}': use staged or ddim")
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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.learning_rate,
      warmup_steps=min(config.optim.warmup_steps, max(config.train.num_steps - 1, 1)),
      decay_steps=max(config.train.num_steps, config.optim.warmup_steps + 1), end_value=0.0)
  return optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip_norm),
      optax.adamw(schedule, weight_decay=config.optim.weight_decay))


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


def _all_finite(tree) -> jnp.ndarray:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves))


def train_step(state: TrainState, batch: dict, base_rng: jax.Array, *, model, optimizer,
               process: diffusion.StagedDiffusion, config: ml_collections.ConfigDict):
  """One optimiser step on a (sharded) global batch. Non-finite updates are never applied."""
  rng = jax.random.fold_in(base_rng, state.step)
  loss_rng, dropout_rng = jax.random.split(rng)

  def loss_fn(params):
    def predict(x_t, t, stage_id):
      return model.apply(params, batch['image'], x_t, t, stage_id, train=True, rngs={'dropout': dropout_rng})
    return losses.staged_loss(predict, batch['mask'], loss_rng, process,
                              timestep_sampling=config.diffusion.timestep_sampling,
                              aux_weight=config.loss.aux_weight, aux_max_t=config.loss.aux_max_t)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  finite = jnp.isfinite(loss) & _all_finite(grads)
  new_state = TrainState(step=step, params=params, opt_state=opt_state, ema_params=ema)
  # A non-finite step only advances the step counter (so the data and rng streams stay aligned).
  kept = state.replace(step=step)
  new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, kept)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['finite'] = finite.astype(jnp.float32)
  return new_state, metrics


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
  sampler = sampler or config.sampling.sampler
  timesteps = sampling.sampler_timesteps(process, sampler, ddim_steps or config.sampling.ddim_steps)
  return jax.jit(sampling.make_segment_fn(model, process, timesteps)), len(timesteps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if possible), then evaluates the best checkpoint on the test split."""
  process = validate_config(config)
  check_workdir(workdir)
  mesh = create_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  model = denoiser_lib.build_model(config.model, process.num_stages)
  optimizer = make_optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng, eval_rng = jax.random.split(rng, 3)

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  logging.info('stage table: %s', process.describe())
  train_iter = input_pipeline.create_train_iterator(config)

  abstract_state = jax.eval_shape(lambda: create_train_state(model, config, optimizer, init_rng))
  abstract_state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  checkpointing.log_half_written(ckpt_dir)
  manager = checkpointing.create_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None:
    state, iter_state = checkpointing.restore(manager, latest, abstract_state)
    if iter_state is not None:
      train_iter.set_state(iter_state)
    logging.info('resuming from checkpoint step %d in %s', latest, ckpt_dir)
    print(f'Resuming from checkpoint step {latest} in {ckpt_dir}', flush=True)
  else:
    state = jax.jit(lambda r: create_train_state(model, config, optimizer, r), out_shardings=replicated)(init_rng)
  param_count = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  logging.info('parameters: %d; devices: %d (%s)', param_count, jax.device_count(), jax.devices()[0].device_kind)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer, process=process, config=config),
      in_shardings=(replicated, batch_sharding, replicated), out_shardings=(replicated, replicated),
      donate_argnums=(0,))
  segment, nfe = make_segment_fn(model, process, config)

  num_steps = config.train.num_steps
  step = int(state.step)
  hooks = []
  if jax.process_index() == 0:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                 every_steps=config.train.log_every_steps))
  preempted = None
  train_metrics = []
  with _StopRequest() as stop, metric_writers.ensure_flushes(writer):
    while step < num_steps:
      batch = _global_batch(next(train_iter), batch_sharding)
      state, metrics = step_fn(state, batch, step_rng)
      step += 1
      if float(metrics['finite']) == 0.0:
        if config.train.nonfinite == 'stop':
          raise NonFiniteError(
              f'non-finite loss or gradient at step {step}: training stopped; the latest checkpoint '
              f'({manager.latest_step()}) is the last good one. Set config.train.nonfinite=skip to skip such steps')
        logging.warning('skipped step %d: non-finite loss or gradient', step)
      train_metrics.append(metrics)
      for hook in hooks:
        hook(step)
      if step % config.train.log_every_steps == 0 or step == num_steps:
        summary = {k: float(np.mean([m[k] for m in train_metrics])) for k in train_metrics[0]}
        writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
        train_metrics = []
      is_eval = step % config.train.eval_every_steps == 0 or step == num_steps
      if is_eval:
        val = evaluate_lib.evaluate(segment, state.ema_params, config, config.data.val_split, None, step=step,
                                    nfe=nfe, sampler=config.sampling.sampler, rng=eval_rng,
                                    max_examples=config.data.max_val_examples, batch_sharding=batch_sharding)
        writer.write_scalars(step, {'val/dice': val['mean']['dice'], 'val/iou': val['mean']['iou']})
        logging.info('step %d: validation Dice %.4f', step, val['mean']['dice'])
        checkpointing.save(manager, step, state, train_iter.get_state(), {checkpointing.BEST_METRIC: val['mean']['dice']})
      elif step % config.train.checkpoint_every_steps == 0:
        checkpointing.save(manager, step, state, train_iter.get_state())
      if stop.signal_name is not None:
        checkpointing.save(manager, step, state, train_iter.get_state(), wait=True)
        preempted = stop.signal_name
        break
  manager.wait_until_finished()
  if preempted:
    message = (f'{preempted} received: saved checkpoint step {step} in {ckpt_dir}; rerun the same command to '
               'resume')
    logging.warning(message)
    print(message, flush=True)
    manager.close()
    return {'preempted_at_step': step}

  best = checkpointing.best_step(manager)
  if best != step:
    state, _ = checkpointing.restore(manager, best, abstract_state, with_data_iter=False)
  manager.close()
  summary = evaluate_lib.evaluate(
      segment, state.ema_params, config, config.data.test_split,
      os.path.join(workdir, 'eval', config.data.test_split), step=best, nfe=nfe,
      sampler=config.sampling.sampler, rng=eval_rng, max_examples=config.data.max_eval_examples,
      batch_sharding=batch_sharding)
  writer.write_scalars(best, {'test/dice': summary['mean']['dice']})
  print(f"Test Dice {summary['mean']['dice']:.4f} (checkpoint step {best}, {nfe} NFE/image); "
        f"wrote {os.path.join(workdir, 'eval', config.data.test_split, 'summary.json')}", flush=True)
  return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, checkpoint_step: int | None = None,
                        split: str | None = None) -> dict:
  """`--mode=eval`: evaluates a checkpoint (best by validation Dice unless a step is given)."""
  process = validate_config(config)
  mesh = create_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  model = denoiser_lib.build_model(config.model, process.num_stages)
  optimizer = make_optimizer(config)
  init_rng, _, eval_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  abstract_state = jax.eval_shape(lambda: create_train_state(model, config, optimizer, init_rng))
  abstract_state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  manager = checkpointing.create_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  step = checkpoint_step if checkpoint_step is not None else checkpointing.best_step(manager)
  if step is None:
    raise checkpointing.CheckpointError(f'no checkpoint in {ckpt_dir}: train first (--mode=train)')
  if step not in manager.all_steps():
    raise checkpointing.CheckpointError(
        f'no checkpoint step {step} in {ckpt_dir} (kept steps: {list(manager.all_steps())})')
  state, _ = checkpointing.restore(manager, step, abstract_state, with_data_iter=False)
  manager.close()
  segment, nfe = make_segment_fn(model, process, config)
  split = split or config.data.test_split
  return evaluate_lib.evaluate(
      segment, state.ema_params, config, split, os.path.join(workdir, 'eval', split), step=step, nfe=nfe,
      sampler=config.sampling.sampler, rng=eval_rng, max_examples=config.data.max_eval_examples,
      batch_sharding=batch_sharding)
