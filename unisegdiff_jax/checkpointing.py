"""The one place that talks to orbax: train state + data-iterator state, latest-N and best-by-Dice.

A checkpoint step holds two items: `state` (the TrainState pytree: step, params, optimiser state, EMA
params) and `data_iter` (the Grain iterator state as JSON), plus the validation metrics orbax stores with
the step. Preservation: the latest `keep` steps and the best step by `val_dice` (orbax
`preservation_policy`). orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save leaves no half-written step that a restart would pick up.
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = 'val_dice'


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (incompatible config, unwritable directory); one-line message."""


def _best_metric(metrics: dict) -> float:
  return float(metrics.get(BEST_METRIC, float('-inf')))


def create_manager(directory: str, *, keep: int = 2, async_save: bool = True,
                   state_handler: ocp.CheckpointHandler | None = None) -> ocp.CheckpointManager:
  """A manager of `directory` (a local path or gs:// URL); `state_handler` replaces the standard handler of
  the `state` item (inference reads part of it with a PyTreeCheckpointHandler)."""
  directory = str(epath.Path(directory).absolute()) if '://' not in directory else directory
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  # best_fn only makes orbax write the metrics with each step; what is kept is the preservation policy's.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=_best_metric, best_mode='max', create=True,
      enable_async_checkpointing=async_save)
  # Handlers named up front: a fresh manager (a restart) can then read the stored shapes (item_metadata)
  # that `restore` checks before it restores.
  handlers = {'state': state_handler or ocp.StandardCheckpointHandler(), 'data_iter': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter_state: Optional[dict] = None,
         metrics: Optional[dict] = None, *, wait: bool = False) -> None:
  """Starts (async) or writes a checkpoint step; a failed write raises CheckpointError (one line)."""
  wait_until_finished(manager)  # a failed earlier async save is reported under its own step
  items = {'state': ocp.args.StandardSave(state)}
  if data_iter_state is not None:
    items['data_iter'] = ocp.args.JsonSave(data_iter_state)
  try:
    manager.save(step, args=ocp.args.Composite(**items),
                 metrics={k: float(v) for k, v in (metrics or {}).items()} or None, force=True)
  except _WRITE_ERRORS as err:
    raise _write_error(manager, step, err) from err
  if wait:
    wait_until_finished(manager)


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Waits for a pending async save; its failure (a full disk, an I/O error) raises CheckpointError."""
  pending = set(manager.all_steps())
  try:
    manager.wait_until_finished()
  except _WRITE_ERRORS as err:
    lost = sorted(pending - set(manager.all_steps()))  # orbax forgets the step whose save failed
    raise _write_error(manager, lost[-1] if lost else None, err) from err


# OSError from plain files; tensorstore reports a full disk as ValueError ("RESOURCE_EXHAUSTED: ... No space
# left on device [os_error_code='28']").
_WRITE_ERRORS = (OSError, ValueError)


def _is_disk_full(err: BaseException) -> bool:
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
      return True
    if 'No space left on device' in str(err) or "os_error_code='28'" in str(err):
      return True
    err = err.__cause__ or err.__context__
  return False


def _complete_steps(directory: str) -> list[int]:
  """Steps on disk that orbax finished (renamed from their temporary directory)."""
  try:
    return sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())
  except OSError:
    return []


def _write_error(manager: ocp.CheckpointManager, step: Optional[int], err: BaseException) -> CheckpointError:
  directory = str(manager.directory)
  earlier = [s for s in _complete_steps(directory) if step is None or s < step]
  intact, rerun = ((f'the previous checkpoint step {earlier[-1]} is intact', 'rerun the same command to resume')
                   if earlier else ('no earlier checkpoint exists', 'rerun the same command'))
  what = f'checkpoint step {step}' if step is not None else 'a checkpoint'
  if _is_disk_full(err):
    problem, fix = 'no space left on device', 'free disk space'
  else:
    detail = ' '.join(str(err).split())[:300]
    problem, fix = f'{type(err).__name__}: {detail}', 'fix that'
  return CheckpointError(f'{problem} while writing {what} to {directory}; {intact}: {fix}, then {rerun}')


def _path_name(path) -> str:
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def flatten_with_names(tree: Any) -> dict[str, Any]:
  """{'params/encoder/stem/kernel': leaf, ...}: one naming for dataclasses, dicts and stored metadata."""
  return {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape_mismatches(expected: Any, stored: Any, partial: bool = False) -> list[str]:
  """Parameter paths whose stored shape differs from the expected one (or are missing / unexpected);
  `partial`: only the stored subtrees that `expected` names at its top level are compared."""
  problems = []
  flat_expected = flatten_with_names(expected)
  flat_stored = flatten_with_names(stored)
  if partial:
    tops = {key.split('/', 1)[0] for key in flat_expected}
    flat_stored = {k: v for k, v in flat_stored.items() if k.split('/', 1)[0] in tops}
  for key, value in flat_expected.items():
    if key not in flat_stored:
      problems.append(f'{key} missing')
    elif tuple(getattr(flat_stored[key], 'shape', ())) != tuple(getattr(value, 'shape', ())):
      problems.append(f'{key} has shape {tuple(flat_stored[key].shape)}, the config needs {tuple(value.shape)}')
  problems.extend(f'{key} unexpected' for key in flat_stored if key not in flat_expected)
  return problems


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, *, with_data_iter: bool = True):
  """Restores (state, data_iter_state or None) at `step` onto the shardings of `abstract_state`.

  A checkpoint written by an incompatible config raises CheckpointError naming the first mismatched
  parameter paths.
  """
  check_shapes(manager, step, abstract_state)
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  has_iter = with_data_iter and (epath.Path(manager.directory) / str(step) / 'data_iter').is_dir()
  if has_iter:
    items['data_iter'] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['state'], (restored['data_iter'] if has_iter else None)


def check_shapes(manager: ocp.CheckpointManager, step: int, abstract_state: Any, *, partial: bool = False) -> None:
  """CheckpointError naming the first parameter paths whose stored shape does not fit `abstract_state`."""
  stored = manager.item_metadata(step)
  stored_state = stored['state'] if stored is not None and 'state' in stored else None
  if stored_state is None:
    return
  problems = _shape_mismatches(abstract_state, getattr(stored_state, 'tree', stored_state), partial)
  if problems:
    shown = '; '.join(problems[:3]) + (f' (+{len(problems) - 3} more)' if len(problems) > 3 else '')
    raise CheckpointError(f'checkpoint {manager.directory}/{step} does not fit this config: {shown}')


def best_step(manager: ocp.CheckpointManager) -> Optional[int]:
  """The kept step with the highest validation Dice (the latest step if none has metrics)."""
  scored = []
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if metrics and BEST_METRIC in metrics:
      scored.append((float(metrics[BEST_METRIC]), step))
  if scored:
    return max(scored)[1]
  return manager.latest_step()


def log_half_written(directory: str) -> None:
  """Warns about orbax temporary directories (a save interrupted by a crash); they are ignored."""
  path = epath.Path(directory)
  if not path.is_dir():
    return
  for entry in sorted(path.iterdir()):
    if '.orbax-checkpoint-tmp' in entry.name:
      logging.warning('ignoring the half-written checkpoint %s (a save was interrupted)', entry)
