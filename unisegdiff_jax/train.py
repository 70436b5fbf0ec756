"""The training loop and the train / eval entry points.

`train_and_evaluate(config, workdir)` runs phase 0 (the segmenter, unless disabled or given by
`config.pretrain.checkpoint`) and phase 1 (diffusion), each resuming from its latest checkpoint, then
evaluates the best checkpoint's EMA weights on the test split. The state and step live in `train_state`,
the phases in `phases`, inference in `inference` and config checks in `config_checks`.

The host waits for the device only at sync steps (log, validation, checkpoint, stop). They are the only
blocks that allow device-to-host transfers, so on an accelerator a run under
`jax.config.update('jax_transfer_guard_device_to_host', 'disallow')` fails on any other (CPU backends do not
enforce transfer guards; tests/test_engine.py counts the reads per step instead).
"""

from __future__ import annotations

import json
import logging
import os
import signal

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from unisegdiff_jax import checkpointing
from unisegdiff_jax import config_checks
from unisegdiff_jax import evaluate as evaluate_lib
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import phases
from unisegdiff_jax import train_state
from unisegdiff_jax import writers

# Re-exported: the names users and tools import from the trainer.
ConfigError = config_checks.ConfigError
NonFiniteError = train_state.NonFiniteError
validate_config = config_checks.validate_config


class _StopRequest:
  """SIGTERM / SIGINT -> a flag; with several processes the flag is agreed on (any process stopping stops
  all) at sync steps, so every process stops at the same step and writes the same checkpoint."""

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

  def requested(self, sync_step: bool) -> str | None:
    if jax.process_count() == 1:
      return self.signal_name
    if not sync_step:
      return None
    with jax.transfer_guard_device_to_host('allow'):
      flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    return (self.signal_name or 'SIGTERM (another process)') if np.any(flags) else None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def _evaluate(phase: phases.Phase, params, config, split: str, out_dir: str | None, step: int,
              runtime: phases.Runtime, max_examples: int, extra: dict | None = None) -> dict:
  return evaluate_lib.evaluate(phase.engine(config, runtime), params, config, split, out_dir, step=step,
                               nfe=phase.nfe, rng=runtime.eval_rng, max_examples=max_examples, extra=extra)


def run_phase(phase: phases.Phase, config: ml_collections.ConfigDict, runtime: phases.Runtime):
  """Trains one phase, resuming from its latest checkpoint. Returns (best EMA params, best step) or None
  when stopped early (signal or max_steps_per_run) after checkpointing."""
  allow = lambda: jax.transfer_guard_device_to_host('allow')  # pylint: disable=unnecessary-lambda-assignment
  abstract_state = phase.abstract_state(runtime.replicated)
  ckpt_dir = os.path.join(phase.directory, 'checkpoints')
  checkpointing.log_half_written(ckpt_dir)
  manager = checkpointing.create_manager(ckpt_dir, keep=config.train.keep_checkpoints)
  train_iter = input_pipeline.create_train_iterator(config)
  latest = manager.latest_step()
  with allow():
    if latest is not None:
      state, iter_state = checkpointing.restore(manager, latest, abstract_state)
      if iter_state is not None:
        train_iter.set_state(iter_state)
      print(f'Resuming {phase.name} from checkpoint step {latest} in {ckpt_dir}', flush=True)
    else:
      state = phase.initial_state(runtime)
    step = start_step = int(state.step)
  logging.info('%s: %d parameters; devices: %d (%s)', phase.name,
               sum(x.size for x in jax.tree_util.tree_leaves(abstract_state.params)), jax.device_count(),
               jax.devices()[0].device_kind)

  writer, prefix = runtime.writer, '' if phase.name == 'diffusion' else f'{phase.name}/'
  progress = (writers.ProgressHook(phase.num_steps, writer, config.train.log_every_steps)
              if jax.process_index() == 0 and step < phase.num_steps else None)
  stopped, train_metrics, pending = None, [], []
  run_limit = config.train.max_steps_per_run
  first_traced = config.train.profile_first_step
  last_traced, tracing = first_traced + config.train.profile_num_steps - 1, None
  with _StopRequest() as stop:
    while step < phase.num_steps:
      batch = {k: jax.make_array_from_process_local_data(runtime.batch_sharding, np.asarray(v))
               for k, v in next(train_iter).items()}
      if first_traced > 0 and step + 1 == first_traced:
        tracing = jax.profiler.trace(os.path.join(runtime.workdir, 'profile', phase.name))
        tracing.__enter__()  # pylint: disable=unnecessary-dunder-call
      state, metrics = phase.step_fn(state, batch, runtime.step_rng)
      step += 1
      if tracing and (step == last_traced or step == phase.num_steps):
        with allow():
          jax.block_until_ready(state)  # a sync: the trace covers the device work of the traced steps
        tracing.__exit__(None, None, None)
        tracing = None
      pending.append(metrics)  # device arrays: the host does not wait for this step here
      if progress:
        progress(step)
      log_now = step % config.train.log_every_steps == 0 or step == phase.num_steps
      validate_now = step % phase.eval_every_steps == 0 or step == phase.num_steps
      limit_reached = run_limit > 0 and step - start_step >= run_limit and step < phase.num_steps
      sync = log_now or validate_now or step % phase.checkpoint_every_steps == 0 or limit_reached
      stopping = stop.requested(sync) or (f'max_steps_per_run={run_limit} reached' if limit_reached else None)
      if not (sync or stopping):
        continue
      with allow():  # the sync step: metrics, validation, checkpoint
        train_metrics += train_state.check_finite(jax.device_get(pending), step, phase.name, config, manager)
        pending = []
        if log_now:
          summary = {k: float(np.mean([m[k] for m in train_metrics])) for k in train_metrics[0]}
          writer.write_scalars(step, {f'{prefix}train/{k}': v for k, v in summary.items()})
          train_metrics = []
        if validate_now:
          val = _evaluate(phase, state.ema_params, config, config.data.val_split, None, step, runtime,
                          config.data.max_val_examples)
          writer.write_scalars(step, {f'{prefix}val/dice': val['mean']['dice'],
                                      f'{prefix}val/iou': val['mean']['iou']})
          logging.info('%s step %d: validation Dice %.4f', phase.name, step, val['mean']['dice'])
          checkpointing.save(manager, step, state, train_iter.get_state(),
                             {checkpointing.BEST_METRIC: val['mean']['dice']})
        elif step % phase.checkpoint_every_steps == 0 or stopping:
          checkpointing.save(manager, step, state, train_iter.get_state())
      if stopping:
        stopped = stopping
        break
  if tracing:  # stopped inside the traced steps
    tracing.__exit__(None, None, None)
  writer.flush()
  checkpointing.wait_until_finished(manager)  # a failed async save: CheckpointError, one line
  if stopped:
    message = f'{stopped}: saved {phase.name} checkpoint step {step} in {ckpt_dir}; rerun the same command to resume'
    logging.warning(message)
    print(message, flush=True)
    manager.close()
    return None
  manager.close()
  with allow():
    return phase.restore_ema(config, runtime)  # the best step by validation Dice


def _cached_summary(path: str, step: int) -> dict | None:
  path = epath.Path(path)
  if path.exists():
    summary = json.loads(path.read_text())
    if summary.get('checkpoint_step') == step:
      return summary
  return None


def _segmenter(config, workdir: str, runtime: phases.Runtime):
  """Phase 0 (trained, or loaded from `config.pretrain.checkpoint`) and its test summary; None if stopped."""
  split = config.data.test_split
  seg_phase = phases.segmenter_phase(config, workdir, runtime)
  if config.pretrain.checkpoint:
    result = phases.load_external_segmenter(config, runtime, seg_phase)
  else:
    result = run_phase(seg_phase, config, runtime)
    if result is None:
      return None
  params, step = result
  seg_dir = os.path.join(seg_phase.directory, 'eval', split)
  reused = (os.path.join(config.pretrain.checkpoint, 'pretrain', 'eval', split, 'summary.json')
            if config.pretrain.checkpoint else None)  # a phase-0 workdir's own evaluation
  summary = ((reused and _cached_summary(reused, step))
             or _cached_summary(os.path.join(seg_dir, 'summary.json'), step)
             or _evaluate(seg_phase, params, config, split, seg_dir, step, runtime, config.data.max_eval_examples))
  print(f"Pre-trained segmenter: test Dice {summary['mean']['dice']:.4f} (step {step})", flush=True)
  return params, summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, pretrain_only: bool = False) -> dict:
  """Phase 0 (segmenter pre-training, unless disabled), phase 1 (diffusion), then test evaluation.

  Rerunning skips finished phases and resumes an unfinished one from its latest checkpoint. With
  `pretrain_only` it stops after phase 0 and its test evaluation (the experiment runner trains phase 0 once
  and hands it to every phase-1 arm through `config.pretrain.checkpoint`).
  """
  process = validate_config(config)
  if pretrain_only and not config.pretrain.enabled:
    raise ConfigError('--mode=pretrain with config.pretrain.enabled=False: there is no phase 0 to train')
  workdir = str(config_checks.check_workdir(workdir))
  runtime = phases.make_runtime(config, writers.create_writer(workdir, just_logging=jax.process_index() > 0),
                                workdir)
  logging.info('stage table: %s', process.describe())
  split = config.data.test_split

  pretrained, segmenter_summary = None, None
  if config.pretrain.enabled or config.pretrain.checkpoint:
    result = _segmenter(config, workdir, runtime)
    if result is None:
      return {'stopped_in': 'pretrain'}
    pretrained, segmenter_summary = result
    if pretrain_only:
      return segmenter_summary

  phase = phases.diffusion_phase(config, workdir, runtime, process, pretrained)
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
  summary = _evaluate(phase, params, config, split, out_dir, best, runtime, config.data.max_eval_examples,
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
  runtime = phases.make_runtime(config)
  phase = phases.diffusion_phase(config, workdir, runtime, process)
  params, step = phase.restore_ema(config, runtime, checkpoint_step)
  split = split or config.data.test_split
  return _evaluate(phase, params, config, split, out_dir or os.path.join(workdir, 'eval', split), step,
                   runtime, config.data.max_eval_examples)
