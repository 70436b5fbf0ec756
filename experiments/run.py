"""The experiment runner: `python -m experiments.run SWEEP[,SWEEP] [--seeds=0,1,2] [--datasets=...] [--dry_run]`.

Every arm x seed x dataset is one `main.py` run in its own workdir (`--root`, default runs/experiments);
phase 0 is trained once per (dataset, seed) (`--mode=pretrain`) and handed to every phase-1 arm through
`--config.pretrain.checkpoint` (an arm with `phase0_share_of_phase1` trains a longer one of its own). A finished
run is skipped; an interrupted one resumes from its checkpoint (rerun the same command), so a sweep can span
several sittings. `--jobs=N` runs N at once (an accelerator host); `--deadline_minutes` stops starting
trainings after that long (a test evaluation of a finished training still starts in the grace period) and
SIGTERMs (checkpoint + exit) what still runs `--grace_minutes` later. Each finished run's small outputs
(summary.json, per_case.csv, curve.csv, run.json with the command, commit, device and wall time) are copied to
`--results` (default experiments/results, committed); `python -m experiments.report` turns them into
docs/RESULTS.md.

An arm marked `trains_as` another (sweeps.Arm; the default arm trains as `anchored_x0`) is not trained again:
the plan checks that the two resolve to the same config but for `sampling.*`, runs the other arm's training
once, and evaluates its checkpoint (the one that arm's validation Dice chose) on the test split with this
arm's own sampling, into `eval/arm_<arm>/` of that workdir; run.json says which arm trained it.

A sweep with `budget=True` (budget, targets) evaluates every setting of sweeps.BUDGET_SETTINGS x
BUDGET_ENSEMBLES on the VALIDATION split of each arm's checkpoint, chooses the arm's best mean validation Dice
over the seeds, and evaluates only that setting on the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from experiments import config_record
from experiments import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Task:
  key: str  # '<dataset>/<arm>/seed<k>' (+ '/budget_val', '/budget_test')
  command: list[str]
  workdir: str
  results: str  # where the small outputs go
  deps: tuple[str, ...] = ()
  kind: str = 'train'  # pretrain | train | shared_eval | budget_val | budget_test
  done: bool = False
  failed: bool = False
  keep_results: bool = False  # retrained only for its checkpoint: the collected results stay as they are
  # an arm trained as another (sweeps.Arm.trains_as): {'trained_as': arm, 'checkpoint_chosen_with': sampler};
  # its workdir is that arm's, and it only evaluates (kind shared_eval)
  shared: dict | None = None


def eval_dir(task: Task) -> str:
  """Where a run's test evaluation lands: phase 0's and phase 1's own, or a shared arm's beside them."""
  if task.kind == 'pretrain':
    return os.path.join(task.workdir, 'pretrain', 'eval', 'test')
  if task.shared:
    return os.path.join(task.workdir, 'eval', f"arm_{task.key.split('/')[1]}", 'test')
  return os.path.join(task.workdir, 'eval', 'test')


def commit() -> tuple[str, bool]:
  """(commit, dirty): $UNISEGDIFF_COMMIT when set (a device copy has no git; collect_only of a device's runs),
  else git's HEAD and whether the code differs from it."""
  if os.environ.get('UNISEGDIFF_COMMIT'):
    return os.environ['UNISEGDIFF_COMMIT'], os.environ.get('UNISEGDIFF_DIRTY', '0') == '1'
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = bool(subprocess.run(['git', 'status', '--porcelain', '--', 'unisegdiff_jax', 'configs', 'main.py'],
                                cwd=REPO, capture_output=True, text=True).stdout.strip())
    return head, dirty
  except (OSError, subprocess.CalledProcessError):
    return 'unknown', False


def _steps(dataset: sweeps.Dataset) -> tuple[int, int]:
  """(phase-0 steps, phase-1 steps) of a dataset's profile."""
  return _profile_steps(dataset, SMOKE)


@functools.lru_cache(maxsize=None)
def _profile_steps(dataset: sweeps.Dataset, smoke: bool) -> tuple[int, int]:
  """_steps, loaded once per profile (the plan asks for every arm and seed; the page for every run)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('_cfg', os.path.join(REPO, dataset.config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('smoke' if smoke else dataset.arg)
  steps = {'pretrain': int(config.pretrain.num_steps), 'train': int(config.train.num_steps)}
  for override in ([] if smoke else dataset.overrides):  # a dataset's pinned step counts
    for section in steps:
      if override.startswith(f'--config.{section}.num_steps='):
        steps[section] = int(override.split('=', 1)[1])
  return steps['pretrain'], steps['train']


SMOKE = False  # --smoke: every dataset at the `smoke` profile (seconds per run; checks the plumbing)


def _config_flag(dataset: sweeps.Dataset, tokens=()) -> str:
  args = ','.join([a for a in ['smoke' if SMOKE else dataset.arg, *tokens] if a])
  return f'--config={dataset.config}' + (f':{args}' if args else '')


def _arm_command(ds_name: str, arm_name: str, seed: int, root: str, common: list[str]
                 ) -> tuple[list[str], str, tuple[str, ...]]:
  """(main.py command, workdir, dependencies) of one phase-1 arm's training run."""
  dataset, arm = sweeps.DATASETS[ds_name], sweeps.ARMS[arm_name]
  workdir = os.path.join(root, ds_name, arm_name, f'seed{seed}')
  command = [sys.executable, os.path.join(REPO, 'main.py'), _config_flag(dataset, arm.tokens),
             f'--workdir={workdir}', *common, *arm.overrides]
  deps = ()
  pre_steps, steps = _steps(dataset)
  if arm.shared_phase0:
    command.append(f"--config.pretrain.checkpoint={os.path.join(root, ds_name, 'phase0', f'seed{seed}')}")
    deps = (f'{ds_name}/segmenter/seed{seed}',)
  if arm.phase0_share_of_phase1:  # its own, longer phase 0 (equal total steps)
    key, phase0_dir, _ = own_phase0(ds_name, arm_name, seed, root)
    command += [f'--config.pretrain.checkpoint={phase0_dir}',
                f'--config.train.num_steps={steps - _moved_steps(arm, steps)}']
    deps = (key,)
  elif 'scratch' in arm.tokens:  # equal gradient steps: phase 0's are added to phase 1
    command.append(f'--config.train.num_steps={steps + pre_steps}')
  elif arm.steps_scale != 1:
    command += [f'--config.train.num_steps={max(1, round(steps * arm.steps_scale))}',
                f'--config.pretrain.num_steps={max(1, round(pre_steps * arm.steps_scale))}']
  return command, workdir, deps


def _moved_steps(arm: sweeps.Arm, steps: int) -> int:
  return int(round(steps * arm.phase0_share_of_phase1))


def phase0_arm(arm_name: str) -> str:
  """The arm whose longer phase 0 an arm with `phase0_share_of_phase1` trains on: its own or `phase0_like`'s."""
  arm = sweeps.ARMS[arm_name]
  if not arm.phase0_like:
    return arm_name
  like = sweeps.ARMS.get(arm.phase0_like)
  if like is None or like.phase0_like or like.phase0_share_of_phase1 != arm.phase0_share_of_phase1:
    raise ValueError(f'arm {arm_name!r}: phase0_like={arm.phase0_like!r} must name an arm with the same '
                     f'phase0_share_of_phase1 ({arm.phase0_share_of_phase1}) and a phase 0 of its own')
  return arm.phase0_like


def own_phase0(ds_name: str, arm_name: str, seed: int, root: str) -> tuple[str, str, int]:
  """(task key, workdir, phase-0 steps) of the longer phase 0 of an arm with `phase0_share_of_phase1` (that of
  its `phase0_like` arm where it names one)."""
  dataset, arm = sweeps.DATASETS[ds_name], sweeps.ARMS[arm_name]
  arm_name = phase0_arm(arm_name)
  pre_steps, steps = _steps(dataset)
  return (f'{ds_name}/{arm_name}_phase0/seed{seed}', os.path.join(root, ds_name, f'{arm_name}_phase0', f'seed{seed}'),
          pre_steps + _moved_steps(arm, steps))


class SharedTrainingError(ValueError):
  """An arm marked `trains_as` another no longer trains like it; the message is one line."""


def _shared_training(arm_name: str, command: list[str], source_name: str, source_command: list[str]) -> dict:
  """{'checkpoint_chosen_with': the source's sampler} once checked that the two commands train the same
  model (same config but for sampling.*, same phase-0 sharing, phase-0 share and owner, and step scale)."""
  arm, source = sweeps.ARMS[arm_name], sweeps.ARMS[source_name]
  setup = lambda a: (a.shared_phase0, a.steps_scale, a.phase0_share_of_phase1, a.phase0_like)
  if source.trains_as or setup(arm) != setup(source):
    raise SharedTrainingError(f'arm {arm_name!r} cannot train as {source_name!r}: their runs are set up differently')
  own, theirs = config_record.resolve(command[2:]), config_record.resolve(source_command[2:])
  diffs = config_record.training_differences(own, theirs)
  if diffs:
    raise SharedTrainingError(f'arm {arm_name!r} no longer trains as {source_name!r} ({"; ".join(diffs[:3])}): '
                              f'drop its trains_as in experiments/sweeps.py')
  return {'checkpoint_chosen_with': config_record.sampler_label(theirs)}


def plan(sweep_names, datasets_filter, seeds, root: str, results: str, extra: list[str],
         arms_filter=(), budget_settings: str = sweeps.BUDGET_SETTINGS,
         budget_ensembles: str = sweeps.BUDGET_ENSEMBLES, seed_limits: dict[str, int] | None = None) -> list[Task]:
  """The tasks of the sweeps in priority order (sweep order, then arm order, then dataset, then seed);
  `seed_limits` keeps only seeds below a dataset's limit ({'kvasir_seg': 2})."""
  tasks: dict[str, Task] = {}

  def seeds_of(ds_name: str) -> list[int]:
    return [s for s in seeds if s < (seed_limits or {}).get(ds_name, s + 1)]

  main_py = [sys.executable, os.path.join(REPO, 'main.py')]

  def add(task: Task):
    tasks.setdefault(task.key, task)

  def add_pretrain(key: str, dataset: sweeps.Dataset, workdir: str, common: list[str], tokens=(), more=()):
    add(Task(key, [*main_py, '--mode=pretrain', _config_flag(dataset, tokens), f'--workdir={workdir}', *common,
                   *more], workdir, os.path.join(results, key), kind='pretrain'))

  for name in sweep_names:
    sweep = sweeps.SWEEPS[name]
    for _, arm_name in sweep.arms:
      if arms_filter and arm_name not in arms_filter:
        continue
      for ds_name in sweep.datasets:
        if datasets_filter and ds_name not in datasets_filter:
          continue
        dataset = sweeps.DATASETS[ds_name]
        for seed in seeds_of(ds_name):
          overrides = [] if SMOKE else list(dataset.overrides)  # smoke: the profile's own data and steps
          common = [f'--config.seed={seed}', *overrides, *extra]
          phase0_key = f'{ds_name}/segmenter/seed{seed}'
          phase0_dir = os.path.join(root, ds_name, 'phase0', f'seed{seed}')
          arm = sweeps.ARMS.get(arm_name)
          if arm is not None and (ds_name != arm.only_dataset if arm.only_dataset else ds_name == 'unified'):
            continue  # unified arms run on the unified data only, the others never on it
          if arm is None or arm.shared_phase0:
            add_pretrain(phase0_key, dataset, phase0_dir, common)
          if arm is None:  # 'segmenter': phase 0 itself
            continue
          key = f'{ds_name}/{arm_name}/seed{seed}'
          if arm.phase0_share_of_phase1:  # planned as its `phase0_like` arm plans it, so the task is one
            own_key, own_dir, own_steps = own_phase0(ds_name, arm_name, seed, root)
            owner = sweeps.ARMS[phase0_arm(arm_name)]
            add_pretrain(own_key, dataset, own_dir, common, owner.tokens,
                         (*owner.overrides, f'--config.pretrain.num_steps={own_steps}'))
          if arm.segmenter_only:  # phase 0 alone, for phase 0's plus phase 1's steps
            add_pretrain(key, dataset, os.path.join(root, ds_name, arm_name, f'seed{seed}'), common, arm.tokens,
                         (*arm.overrides, f'--config.pretrain.num_steps={sum(_steps(dataset))}'))
            continue
          if key in tasks:  # planned by an earlier sweep: only this sweep's budget tasks are new
            command, workdir, shared = tasks[key].command, tasks[key].workdir, tasks[key].shared
          else:
            command, workdir, deps = _arm_command(ds_name, arm_name, seed, root, common)
            shared = None
            if arm.trains_as:  # trained once, as the other arm; this one evaluates its checkpoint
              source_key = f'{ds_name}/{arm.trains_as}/seed{seed}'
              source_command, source_dir, source_deps = _arm_command(ds_name, arm.trains_as, seed, root, common)
              shared = {'trained_as': arm.trains_as, **_shared_training(arm_name, command, arm.trains_as,
                                                                        source_command)}
              add(Task(source_key, source_command, source_dir, os.path.join(results, source_key), source_deps))
              command = [c if not c.startswith('--workdir=') else f'--workdir={source_dir}' for c in command]
              workdir, deps = source_dir, (source_key,)
            add(Task(key, command, workdir, os.path.join(results, key), deps,
                     kind='shared_eval' if shared else 'train', shared=shared))
          if sweep.budget:
            add(Task(key + '/budget_val', [*command[:2], '--mode=sweep', '--split=val', *command[2:],
                                           f'--sweep={budget_settings}',
                                           f'--ensemble_sizes={budget_ensembles}'],
                     workdir, os.path.join(results, key), (key,), kind='budget_val', shared=shared))
    if sweep.budget:
      for (_, arm_name), ds_name, seed in itertools.product(sweep.arms, sweep.datasets, seeds):
        key = f'{ds_name}/{arm_name}/seed{seed}'
        if key in tasks and tasks[key].kind != 'pretrain':  # chosen on the validation runs of every seed it runs
          vals = tuple(f'{ds_name}/{arm_name}/seed{s}/budget_val' for s in seeds_of(ds_name))
          # and after its own run: a training retrained here for its checkpoint finishes before its test
          add(Task(key + '/budget_test', tasks[key].command, tasks[key].workdir, tasks[key].results, (*vals, key),
                   kind='budget_test', shared=tasks[key].shared))
  for task in tasks.values():  # a shared arm's validation sweep writes where its source's does: one at a time
    if task.shared and task.kind == 'budget_val':
      ds_name, _, seed_dir = task.key.split('/')[:3]
      source_val = f"{ds_name}/{task.shared['trained_as']}/{seed_dir}/budget_val"
      if source_val in tasks:
        task.deps += (source_val,)
  return list(tasks.values())


def current_command(dataset: str, arm: str, seed: int) -> list[str] | None:
  """main.py's arguments for (dataset, arm, seed) as the sweeps define them now (None: no such run)."""
  key = f'{dataset}/{arm}/seed{seed}'
  # A phase 0 may be planned only as the dependency of another arm (the unified data's segmenter is in no sweep's
  # arm list): look among every arm's tasks when the arm's own plan lacks it.
  for arms_filter in ((arm,), ()):
    for task in plan(list(sweeps.SWEEPS), [dataset], [seed], '/r', '/res', [], arms_filter=arms_filter):
      if task.key == key:
        return task.command[2:]
  return None


def _finished(task: Task) -> bool:
  if task.kind == 'budget_val':
    return os.path.exists(os.path.join(task.results, 'budget_val.json'))
  if task.kind == 'budget_test':
    return os.path.isdir(os.path.join(task.results, 'budget_test'))
  return os.path.exists(os.path.join(task.results, 'summary.json'))


def _write_curve(workdir: str, name: str, out: str) -> None:
  path = os.path.join(workdir, 'scalars.jsonl')
  if not os.path.exists(path):
    return
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if name in row:
        rows.append((row['step'], row[name]))
  with open(out, 'w') as f:
    f.write('step,val_dice\n' + ''.join(f'{s},{v:.6f}\n' for s, v in sorted(dict(rows).items())))


def _device_of(summary_path: str) -> str:
  with open(summary_path) as f:
    return json.load(f).get('device', 'unknown')


PHASE0_CASES = 'phase0_per_case.csv'


def phase0_cases(task: Task) -> str | None:
  """The per_case.csv of the phase-0 run a phase-1 task loaded (--config.pretrain.checkpoint), or, without
  one, of the phase 0 it trained itself in its workdir (an arm with a phase 0 of its own, e.g. a fifth of the
  steps); None if absent (no phase 0: scratch)."""
  if task.kind not in ('train', 'shared_eval'):
    return None
  flag = '--config.pretrain.checkpoint='
  dirs = [c[len(flag):] for c in task.command if c.startswith(flag)] or [task.workdir]
  path = os.path.join(dirs[-1], 'pretrain', 'eval', 'test', 'per_case.csv')
  return path if os.path.exists(path) else None


def collect(task: Task, started: float | None, run_commit: tuple[str, bool], hardware: str,
            wall_seconds: float | None = None) -> None:
  """Copies a finished run's small outputs to its results directory, with run.json. A training run also
  leaves its run.json in its workdir: the record of the checkpoint there, which an arm trained as it cites.
  A run retrained only for its checkpoint (keep_results) writes that one and leaves its results as they are."""
  if task.kind == 'budget_val':
    os.makedirs(task.results, exist_ok=True)
    shutil.copy(os.path.join(task.workdir, 'eval', 'sweep', 'sweep.json'),
                os.path.join(task.results, 'budget_val.json'))
    return
  if task.kind == 'budget_test':
    return  # written by run_budget_test
  test_dir, curve_name = eval_dir(task), 'pretrain/val/dice' if task.kind == 'pretrain' else 'val/dice'
  dataset, arm, seed = task.key.split('/')[:3]
  record = {'arm': arm, 'dataset': dataset, 'seed': int(seed[4:]),
            'command': [os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in task.command[1:]],
            'commit': run_commit[0], 'dirty': run_commit[1], 'device': _device_of(os.path.join(test_dir, 'summary.json')),
            'hardware': hardware, **(task.shared or {})}
  try:  # what the command resolved to, so the page can tell a changed default from an unchanged arm
    record['config'] = config_record.resolve(task.command[2:])
  except config_record.ConfigError as e:
    record['config_error'] = str(e)
  if task.shared:  # the training it evaluates: the run that left its record in the workdir (else the results')
    source = (_json_or_empty(os.path.join(task.workdir, 'run.json')) or
              _json_or_empty(os.path.join(os.path.dirname(os.path.dirname(task.results)), task.shared['trained_as'],
                                          seed, 'run.json')))
    record['training_run'] = {k: source[k] for k in ('arm', 'dataset', 'seed', 'commit', 'dirty', 'config')
                              if k in source}
    if source.get('wall_seconds') is not None:
      record['training_wall_seconds'] = source['wall_seconds']
  if started is not None:
    record.update(wall_seconds=round(time.time() - started, 1),
                  started=datetime.datetime.fromtimestamp(started).isoformat(timespec='seconds'),
                  finished=datetime.datetime.now().isoformat(timespec='seconds'))
  else:  # collect_only: the span of the run's log
    record.update(wall_seconds=None if wall_seconds is None else round(wall_seconds, 1), collected=datetime.datetime.now().isoformat(timespec='seconds'))
  if task.kind == 'train':
    _write_json(os.path.join(task.workdir, 'run.json'), record)
  if task.keep_results:
    return
  os.makedirs(task.results, exist_ok=True)
  for name in ('summary.json', 'per_case.csv'):
    shutil.copy(os.path.join(test_dir, name), os.path.join(task.results, name))
  _write_curve(task.workdir, curve_name, os.path.join(task.results, 'curve.csv'))
  phase0 = phase0_cases(task)
  if phase0 is not None:  # the test results of the very segmenter this run started from ("its own phase 0")
    shutil.copy(phase0, os.path.join(task.results, PHASE0_CASES))
  _write_json(os.path.join(task.results, 'run.json'), record)


def _write_json(path: str, record: dict) -> None:
  with open(path, 'w') as f:
    json.dump(record, f, indent=2)


def _json_or_empty(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _log_span_seconds(workdir: str, kind: str) -> float | None:
  """Wall seconds of the run that produced the results, from its log's absl timestamps (for collect_only):
  from the first stamp of the first sitting (main.py start, 'JAX process') that printed a test Dice to the
  last stamp before that print. Reruns append to the same log and are ignored."""
  import re  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, f'log_{kind}.txt')
  if not os.path.exists(path):
    return None
  stamps: list[float] = []
  with open(path, errors='replace') as f:
    for line in f:
      if 'JAX process' in line and stamps:
        stamps = []  # a new sitting: the previous one printed no test Dice
      match = re.match(r'^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)', line)
      if match:
        h, m, sec = match.groups()
        stamps.append(3600 * int(h) + 60 * int(m) + float(sec))
      if line.startswith('Pre-trained segmenter: test Dice' if kind == 'pretrain' else 'Test Dice'):
        return (stamps[-1] - stamps[0]) % 86400 if len(stamps) > 1 else None
  return None


def collect_only(tasks: list[Task], hardware: str) -> int:
  """Collects every finished run found under the root (e.g. a device's workdirs copied back) into the
  results, with the wall time read from its log; starts nothing."""
  run_commit, count = commit(), 0
  for task in tasks:
    if task.kind not in ('pretrain', 'train', 'shared_eval') or _finished(task):
      continue
    if os.path.exists(os.path.join(eval_dir(task), 'summary.json')):
      collect(task, None, run_commit, hardware, _log_span_seconds(task.workdir, task.kind))
      count += 1
  print(f'collected {count} finished runs', flush=True)
  return 0


def choose_budget(results_dirs: list[str]) -> dict:
  """The setting with the best validation Dice averaged over the seeds' budget_val.json files."""
  scores: dict[tuple, list[float]] = {}
  for directory in results_dirs:
    with open(os.path.join(directory, 'budget_val.json')) as f:
      for row in json.load(f)['rows']:
        scores.setdefault((row['sampler'], row['ensemble_size'], row['fusion']), []).append(row['dice'])
  complete = {k: v for k, v in scores.items() if len(v) == len(results_dirs)}
  (sampler, k, fusion), _ = max(complete.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
  return {'sampler': sampler, 'ensemble_size': k, 'fusion': fusion}


def budget_test_command(task: Task, choice: dict) -> tuple[list[str], str, str]:
  """(command, label, output directory) of the test evaluation of the setting chosen on validation."""
  sampler, _, steps = choice['sampler'].partition(':')
  label = f"{sampler}{steps}_x{choice['ensemble_size']}"
  out = os.path.join(os.path.dirname(eval_dir(task)), 'budget_test', label)
  flags = [f'--config.sampling.sampler={sampler}', f"--config.sampling.ensemble_size={choice['ensemble_size']}",
           f"--config.sampling.fusion={choice['fusion']}"]
  if steps:
    flags.append(f'--config.sampling.{sampler}_steps={steps}')
  return [*task.command[:2], '--mode=eval', f'--output={out}', *task.command[2:], *flags], label, out


def _checkpoint_steps(task: Task) -> list[int]:
  """The steps of the checkpoints a training task has left in its workdir (orbax: one folder per step)."""
  directory = os.path.join(task.workdir, 'pretrain' if task.kind == 'pretrain' else '', 'checkpoints')
  try:
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  except OSError:
    return []


def task_state(task: Task) -> str:
  """How a prepared task stands, in words: finished, to run, resuming from a checkpoint, or retrained."""
  if task.done:
    return 'finished'
  if task.keep_results:
    return 'to run: retrained for its checkpoint, results kept'
  steps = _checkpoint_steps(task) if task.kind in ('pretrain', 'train') else []
  return f'to run: resumes from step {steps[-1]}' if steps else 'to run'


# Test-split evaluations of a finished training (another arm's sampler; a chosen budget): short, so they may
# still start after the deadline, inside the grace period.
EVALUATION_KINDS = ('shared_eval', 'budget_test')


class Runner:
  """Runs tasks with `jobs` workers, respecting dependencies, until done or past the deadline."""

  def __init__(self, tasks: list[Task], jobs: int, deadline: float | None, hardware: str,
               grace_seconds: float = 240.0):
    self.tasks, self.jobs, self.deadline, self.hardware = tasks, jobs, deadline, hardware
    self.grace_seconds = grace_seconds
    self.lock = threading.Lock()
    self.running: dict[str, subprocess.Popen] = {}
    self.commit = commit()
    self.by_key = {t.key: t for t in tasks}

  def _next(self, evaluations_only: bool = False) -> Task | None:
    for task in self.tasks:
      if task.done or task.failed or task.key in self.running:
        continue
      if evaluations_only and task.kind not in EVALUATION_KINDS:
        continue
      deps = [self.by_key.get(d) for d in task.deps]
      if any(d is not None and d.failed for d in deps):
        task.failed = True
        print(f'skip {task.key}: a dependency failed', flush=True)
        continue
      if all(d is None or d.done for d in deps):
        return task
    return None

  def _run(self, task: Task) -> None:
    """_attempt, with any error in the runner's own code marking the task failed (not a silent dead thread)."""
    try:
      self._attempt(task)
    except Exception as error:  # pylint: disable=broad-except
      with self.lock:
        self.running.pop(task.key, None)
        task.done, task.failed = False, True
      print(f'{task.key}: runner error {type(error).__name__}: {error}', flush=True)

  def _attempt(self, task: Task) -> None:
    started = time.time()
    command, label, out = task.command, None, None
    if task.kind == 'budget_test':
      deps = [self.by_key[d] for d in task.deps]  # KeyError: a seed the plan left out
      dirs = [d.results for d in deps if d.kind == 'budget_val']  # not its own training's
      command, label, out = budget_test_command(task, choose_budget(dirs))
    elif task.kind == 'shared_eval':  # the source arm's checkpoint, this arm's sampling, the test split
      command = [*task.command[:2], '--mode=eval', f'--output={eval_dir(task)}', *task.command[2:]]
    os.makedirs(task.workdir, exist_ok=True)
    why = ', retrained for its checkpoint (results kept)' if task.keep_results else ''
    print(f'{task.key}: started ({task.kind}{why}); log {task.workdir}/log_{task.kind}.txt', flush=True)
    with open(os.path.join(task.workdir, f'log_{task.kind}.txt'), 'a') as log:
      process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
      with self.lock:
        self.running[task.key] = process
      code = process.wait()
    with self.lock:
      del self.running[task.key]
    finished = code == 0 and (task.kind in ('budget_val', 'budget_test') or os.path.exists(
        os.path.join(eval_dir(task), 'summary.json')))
    if finished and task.kind == 'budget_test':
      kept = os.path.join(task.results, 'budget_test', label)
      os.makedirs(kept, exist_ok=True)
      for name in ('summary.json', 'per_case.csv'):
        shutil.copy(os.path.join(out, name), os.path.join(kept, name))
    elif finished:
      collect(task, started, self.commit, self.hardware)
    with self.lock:
      task.done, task.failed = finished, not finished
      count = sum(t.done for t in self.tasks)
    minutes = (time.time() - started) / 60
    state = 'done' if finished else f'stopped or failed (exit {code}; see {task.workdir}/log_{task.kind}.txt)'
    print(f'{task.key}: {state} in {minutes:.1f} min [{count} / {len(self.tasks)} tasks finished]', flush=True)

  def _retrain_missing_checkpoints(self) -> None:
    """A finished training whose results came from elsewhere (another machine) and whose checkpoint is not
    here is trained again, its results kept (keep_results), when a task still to run needs that checkpoint:
    a task depending on it, or an evaluation of its workdir (a validation budget grid, a test at the chosen
    budget, a shared arm's test). Repeated until nothing more is needed, so a retrained arm's phase 0 is
    retrained too when its checkpoint is missing as well."""
    trainings = {t.workdir: t.key for t in self.tasks if t.kind == 'train'}
    while True:
      needed = set()
      for task in self.tasks:
        if not task.done:
          needed.update(task.deps)
          if task.kind in ('budget_val', 'budget_test', 'shared_eval') and task.workdir in trainings:
            needed.add(trainings[task.workdir])
      missing = [t for t in self.tasks if t.kind in ('pretrain', 'train') and t.done and t.key in needed and
                 not _checkpoint_steps(t)]
      if not missing:
        return
      for task in missing:
        task.done, task.keep_results = False, True

  def prepare(self) -> None:
    """Marks the finished tasks, then the finished trainings that must run again for their checkpoints."""
    for task in self.tasks:
      task.done = _finished(task)
    self._retrain_missing_checkpoints()

  def run(self) -> int:
    self.prepare()
    todo = sum(not t.done for t in self.tasks)
    print(f'{len(self.tasks)} tasks, {len(self.tasks) - todo} already finished, {todo} to run', flush=True)
    threads: list[threading.Thread] = []
    while True:
      threads = [t for t in threads if t.is_alive()]
      past_deadline = self.deadline is not None and time.time() > self.deadline
      past_grace = past_deadline and time.time() > self.deadline + self.grace_seconds
      with self.lock:  # past the deadline, only the short test evaluations of finished trainings still start
        task = None if past_grace or len(threads) >= self.jobs else self._next(evaluations_only=past_deadline)
        if task is not None:
          self.running[task.key] = None  # reserved
      if task is not None:
        thread = threading.Thread(target=self._run, args=(task,), daemon=True)
        thread.start()
        threads.append(thread)
        continue
      if not threads and (past_grace or self._next(evaluations_only=past_deadline) is None):
        break
      if past_grace:
        for process in list(self.running.values()):
          if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # checkpoint and exit; resumes next time
      time.sleep(1.0)
    left = [t.key for t in self.tasks if not t.done]
    print(f'finished: {sum(t.done for t in self.tasks)} / {len(self.tasks)}; not finished: {len(left)}', flush=True)
    return 0 if not any(t.failed for t in self.tasks) else 1


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   usage='python -m experiments.run SWEEPS [options] [-- --config.x=y ...]')
  parser.add_argument('sweeps', help=f"comma-separated: {', '.join(sweeps.SWEEPS)}")
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--datasets', default='', help='comma-separated subset of each sweep\'s datasets')
  parser.add_argument('--arms', default='', help='comma-separated subset of the sweeps\' arms')
  parser.add_argument('--root', default=os.path.join(REPO, 'runs', 'experiments'))
  parser.add_argument('--results', default=os.path.join(REPO, 'experiments', 'results'))
  parser.add_argument('--jobs', type=int, default=1)
  parser.add_argument('--deadline_minutes', type=float, default=0, help='start no training after this long')
  parser.add_argument('--grace_minutes', type=float, default=4,
                      help='after the deadline, runs still going get this long before SIGTERM (checkpoint, exit)')
  parser.add_argument('--hardware', default='', help='free text recorded with every run (default: the device kind)')
  parser.add_argument('--seed_datasets', default='',
                      help="per-dataset seed counts, e.g. 'kvasir_seg:2,busi:2' (default: --seeds everywhere)")
  parser.add_argument('--budget_settings', default=sweeps.BUDGET_SETTINGS,
                      help='the budget sweep\'s samplers (main.py --sweep), evaluated on the validation split')
  parser.add_argument('--budget_ensembles', default=sweeps.BUDGET_ENSEMBLES,
                      help='the budget sweep\'s ensemble sizes (main.py --ensemble_sizes)')
  parser.add_argument('--dry_run', action='store_true', help='print the commands and exit')
  parser.add_argument('--smoke', action='store_true', help='every dataset at its smoke profile (plumbing check)')
  parser.add_argument('--collect_only', action='store_true',
                      help='copy the finished runs under --root into --results (no run is started)')
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index('--') + 1:] if '--' in argv else []  # more --config overrides for every run
  args = parser.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
  names = [n for n in args.sweeps.split(',') if n]
  unknown = [n for n in names if n not in sweeps.SWEEPS]
  if unknown:
    print(f"error: unknown sweep {unknown[0]!r}; sweeps: {', '.join(sweeps.SWEEPS)}", file=sys.stderr)
    return 2
  global SMOKE
  SMOKE = args.smoke
  seeds = [int(s) for s in args.seeds.split(',') if s]
  datasets = [d for d in args.datasets.split(',') if d]
  limits = {k: int(v) for k, v in (item.split(':') for item in args.seed_datasets.split(','))} \
      if args.seed_datasets else None
  tasks = plan(names, datasets, seeds, os.path.abspath(args.root), os.path.abspath(args.results), extra,
               [a for a in args.arms.split(',') if a], args.budget_settings, args.budget_ensembles, limits)
  if args.dry_run:
    runner = Runner(tasks, args.jobs, None, args.hardware)
    runner.prepare()  # what run() would do: finished, to run, resumed, or retrained for a checkpoint
    for task in tasks:
      print(f'[{task_state(task)}] {task.key}: '
            f'{" ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in task.command[1:])}')
    return 0
  if args.collect_only:
    return collect_only(tasks, args.hardware)
  deadline = time.time() + 60 * args.deadline_minutes if args.deadline_minutes > 0 else None
  return Runner(tasks, args.jobs, deadline, args.hardware, 60 * args.grace_minutes).run()


if __name__ == '__main__':
  sys.exit(main())
