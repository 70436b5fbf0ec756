"""docs/RESULTS.md from the committed per-run outputs: `python -m experiments.report [--results=] [--out=]`.

Reads only the results tree that experiments/run.py writes (`<results>/<dataset>/<arm>/seed<k>/`) and the
sweep definitions (experiments.sweeps.SWEEPS, or any mapping of objects with name / question / arms /
reference / datasets); writes the markdown page and its PNG plots (in results_png/ next to it). The
statistics are experiments.stats; nothing in the page is typed by hand. Missing runs read "not run".
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

from experiments import config_record
from experiments import run as run_lib
from experiments import stats
from experiments.run import PHASE0_CASES  # the test rows of the phase 0 a run started from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEGMENTER = 'segmenter'
NOT_REAL = ('synthetic', 'unified')  # directories left out of "all real sets"
ALL_REAL = 'all real sets'
MARGIN = 1.0  # Dice points: the equivalence margin of 'no difference'
# The plain reading names where a sweep's change does NOT help; the predicate picks the arms it concerns.
CLAIMS: dict[str, tuple[str, Callable[[str], bool]]] = {
    'targets': ('staging', lambda arm: 'stage' in arm),  # the staged tables (the default is x0 only since 2026-11-27)
    'encoder': ('pre-training', lambda arm: True), 'encoder_plain': ('pre-training (plain method)', lambda arm: True),
    'unified': ('unification', lambda arm: _unified_arm(arm)),  # not the per-dataset arms beside the reference
    'control': ('the diffusion phase (against a segmenter trained as many steps)', lambda arm: True)}
HYGIENE = (
    'Checkpoints are chosen by validation Dice, the sampler budget on the validation split; the test split is '
    'evaluated once per arm. The unit is the test image, its Dice averaged over seeds. Intervals are 95 % paired '
    'bootstrap intervals ({n} resamples, stratified by dataset for cross-dataset means); p-values are Wilcoxon '
    'signed-rank, Holm-corrected within a sweep and dataset. "vs segmenter (phase 0)" pairs each run with the '
    'phase-0 segmenter it was trained from (its phase0_per_case.csv; the "vs Dice %" column is theirs), or, for '
    'runs that did not record it, with the segmenter arm\'s run of the same seed. A difference is called only '
    'if the 95 % interval excludes 0 and every one of at least two shared seeds agrees; "no difference" only '
    'when the 90 % interval lies inside ±{m:g} Dice point; otherwise "undecided". Failure = Dice < 0.5 on the seed-averaged image; miss = a lesion with Dice 0.')


def _scores(cases: list[dict]) -> stats.Scores:
  return {(c['dataset'], c['case_id']): float(c['dice']) for c in cases}


@dataclasses.dataclass
class Run:
  """One seed's outputs; `dataset` selects the summary block (and the per-case rows of a unified run)."""
  seed: int
  summary: dict
  cases: list[dict]
  curve: list[tuple[int, float]]
  record: dict  # run.json, {} when absent
  dataset: str
  phase0: list[dict] = dataclasses.field(default_factory=list)  # per-case test rows of the phase 0 it started from

  def scores(self) -> stats.Scores:
    return _scores(self.cases)

  def phase0_scores(self) -> stats.Scores:
    return _scores(self.phase0)

  def dice(self) -> float:
    """The dataset Dice of summary.json (the mean of the per-case rows where it has none)."""
    block = self.block()
    return float(block['dice'] if 'dice' in block else np.mean(list(self.scores().values())))

  def block(self) -> dict:
    per_dataset = self.summary.get('datasets', {})
    if self.dataset in per_dataset:
      return per_dataset[self.dataset]
    return next(iter(per_dataset.values())) if len(per_dataset) == 1 else self.summary.get('mean', {})


def _json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _csv(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def seed_dirs(path: str) -> dict[int, str]:
  """{seed: directory} of `path`'s seed<k> subdirectories, by seed."""
  names = os.listdir(path) if os.path.isdir(path) else []
  found = {int(n[4:]): os.path.join(path, n) for n in names if n.startswith('seed') and n[4:].isdigit()}
  return dict(sorted(found.items()))


def read_run(directory: str, seed: int, dataset: str, only: str | None = None,
             phase0_dir: str | None = None) -> Run | None:
  """One run's outputs; its own phase 0's test rows come from PHASE0_CASES in `phase0_dir` (default: the run's)."""
  summary, cases = _json(os.path.join(directory, 'summary.json')), _csv(os.path.join(directory, 'per_case.csv'))
  cases = [c for c in cases if only is None or c['dataset'] == only]
  if summary is None or not cases:
    return None
  curve = [(int(float(r['step'])), float(r['val_dice'])) for r in _csv(os.path.join(directory, 'curve.csv'))]
  phase0 = [c for c in _csv(os.path.join(phase0_dir or directory, PHASE0_CASES)) if only is None or c['dataset'] == only]
  return Run(seed, summary, cases, curve, _json(os.path.join(directory, 'run.json')) or {}, only or dataset, phase0)


def load_arm(results: str, dataset: str, arm: str, from_unified: bool = False) -> dict[int, Run]:
  """{seed: Run}; with `from_unified`, a real dataset without its own `arm` takes its rows of `unified/<arm>`."""
  path, only = os.path.join(results, dataset, arm), None
  if from_unified and not os.path.isdir(path) and dataset not in NOT_REAL:
    path, only = os.path.join(results, 'unified', arm), dataset
  runs = {s: read_run(d, s, dataset, only) for s, d in seed_dirs(path).items()}
  return {s: r for s, r in runs.items() if r is not None}


def scores(runs: Mapping[int, Run]) -> stats.Arm:
  return {s: r.scores() for s, r in runs.items()}


def own_phase0(runs: Mapping[int, Run]) -> stats.Arm | None:
  """{seed: scores of the phase 0 each run started from}, or None unless every run recorded it."""
  return {s: r.phase0_scores() for s, r in runs.items()} if runs and all(r.phase0 for r in runs.values()) else None


def combine(per_dataset: Mapping[str, Mapping[int, Run]], phase0: bool = False) -> stats.Arm | None:
  """An arm's scores over its datasets on the seeds it has in all of them; {} with fewer than 2 datasets.
  With `phase0`, the scores of the runs' own phase 0 (None unless every run recorded it)."""
  present = [runs for runs in per_dataset.values() if runs]
  if len(present) < 2:
    return {}
  seeds = sorted(set.intersection(*(set(runs) for runs in present)))
  if phase0 and not all(runs[s].phase0 for runs in present for s in seeds):
    return None
  get = (lambda run: run.phase0_scores()) if phase0 else (lambda run: run.scores())
  return {s: {k: v for runs in present for k, v in get(runs[s]).items()} for s in seeds}


def compare_rows(arms: Mapping[str, stats.Arm], pairs, n_resamples: int,
                 phase0: Mapping[str, stats.Arm | None] | None = None,
                 devices: Mapping[str, Mapping[str, frozenset[str]]] | None = None) -> list[dict]:
  """stats.compare rows (+ 'a', 'b', 'p_holm' within these rows, and 'cross_device' given `devices`, see
  mark_cross_device) for the pairs whose arms both have data. An arm compared with SEGMENTER meets its own
  phase 0 where `phase0` has it (the segmenter it started from), else the segmenter arm's runs."""
  rows = []
  for a, b in dict.fromkeys(pairs):
    reference = (phase0 or {}).get(a) if b == SEGMENTER else None
    reference = reference or arms.get(b)
    if arms.get(a) and reference:
      try:
        rows.append({'a': a, 'b': b, **stats.compare(arms[a], reference, n_resamples=n_resamples,
                                                      margin_points=MARGIN)})
      except ValueError:  # no image in common
        pass
  for row, p in zip(rows, stats.holm([r['p_wilcoxon'] for r in rows])):
    row['p_holm'] = float(p)
  mark_cross_device(rows, devices or {}, phase0 or {})
  return rows


# Bands of the phase-0 segmenter's own (seed-mean) Dice on an image: where a diffusion arm gains or loses.
BANDS = ((0.0, 0.5, 'phase 0 < 0.5'), (0.5, 0.8, '0.5–0.8'), (0.8, float('inf'), '≥ 0.8'))
BAND_SWEEPS = ('method', 'budget')  # sweeps whose pages break "vs own phase 0" down by band


def band_rows(arm: stats.Arm, reference: stats.Arm, n_resamples: int) -> list[dict]:
  """stats.compare of `arm` against `reference` on the images whose reference Dice (mean over the reference's
  seeds) lies in each of BANDS; a band without images is left out."""
  keys = set.intersection(*(set(t) for t in [*arm.values(), *reference.values()]))
  level = {k: float(np.mean([t[k] for t in reference.values()])) for k in keys}
  rows = []
  for lo, hi, label in BANDS:
    inside = {k for k in keys if lo <= level[k] < hi}
    if inside:
      restrict = lambda a: {s: {k: v for k, v in t.items() if k in inside} for s, t in a.items()}  # pylint: disable=cell-var-from-loop
      rows.append({'band': label, **stats.compare(restrict(arm), restrict(reference), n_resamples=n_resamples,
                                                    margin_points=MARGIN)})
  return rows


BAND_HEADER = ['| arm | images where | n | Dice % | own phase 0 Dice % | diff (points) | 95 % CI |',
               '|---|---|---:|---:|---:|---:|---|']


def band_table(arms: Mapping[str, stats.Arm], phase0: Mapping[str, stats.Arm | None], labels: Mapping[str, str],
               n_resamples: int) -> list[str]:
  """The markdown rows of band_rows for every arm that recorded its own phase 0."""
  lines = []
  for name, scores_ in arms.items():
    if scores_ and phase0.get(name):
      lines += [f"| {labels.get(name, name)} | {r['band']} | {r['n']} | {r['mean_a']:.1f} | {r['mean_b']:.1f} | "
                f"{r['diff']:+.1f} | [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] |"
                for r in band_rows(scores_, phase0[name], n_resamples)]
  if not lines:
    return []
  return ['Where the difference to its own phase 0 comes from, by the phase-0 segmenter\'s Dice on the image:', '',
          *BAND_HEADER, *lines, '']


def run_devices(runs: Mapping[int, Run]) -> frozenset[str]:
  """The devices an arm's runs ran on (run.json, else summary.json)."""
  return frozenset(str(r.record.get('device') or r.summary.get('device', '?')) for r in runs.values())


def devices_on(dataset: str, runs: Mapping[str, Mapping[int, Run]]) -> dict[str, dict[str, frozenset[str]]]:
  """{arm: {dataset: its devices}} for the arms' runs on one dataset (compare_rows' `devices`)."""
  return {arm: {dataset: run_devices(r)} for arm, r in runs.items()}


def device_mark(row: dict) -> str:
  """' ‡' after the "vs" arm of a row whose two arms ran on different devices."""
  return ' ‡' if row.get('cross_device') else ''


def mark_cross_device(rows: list[dict], devices: Mapping[str, Mapping[str, frozenset[str]]],
                      phase0: Mapping[str, stats.Arm | None]) -> None:
  """Sets row['cross_device'] where, on a dataset both arms ran, they ran on different devices ({arm: {dataset:
  devices}}); an arm met with its own phase 0 shares its machine."""
  for row in rows:
    a, b = devices.get(row['a'], {}), devices.get(row['b'], {})
    own = row['b'] == SEGMENTER and phase0.get(row['a'])
    row['cross_device'] = not own and any(a[d] != b[d] for d in set(a) & set(b) if a[d] and b[d])


def sweep_pairs(sweep) -> list[tuple[str, str]]:
  """Every arm against the sweep's reference, then against its `also_vs` arms, then against the segmenter; each
  unordered pair once, in the first of these roles."""
  pairs = []
  for reference in dict.fromkeys((sweep.reference, *sweep.also_vs, SEGMENTER)):
    pairs += [(arm, reference) for _, arm in sweep.arms
              if arm != reference and (arm, reference) not in pairs and (reference, arm) not in pairs]
  return pairs


def mean_curve(runs: Mapping[int, Run]) -> tuple[list[int], list[float]] | None:
  """The seed-mean validation curve on the steps every seed's curve has."""
  curves = [dict(r.curve) for r in runs.values() if r.curve]
  if not curves:
    return None
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  return (steps, [float(np.mean([c[s] for c in curves])) for s in steps]) if steps else None


def first_crossing(curve: tuple[list[int], list[float]], target: float) -> int | None:
  return next((s for s, v in zip(*curve) if v >= target), None)


def budget_label(sampler: str, ensemble_size: int) -> str:
  """'ddim:10', 5 -> 'ddim10_x5' (the runner's budget_test directory name)."""
  name, _, steps = sampler.partition(':')
  return f'{name}{steps}_x{ensemble_size}'


def budget_settings(vals: Mapping[int, dict]) -> list[dict]:
  """The budget_val.json rows of all seeds grouped by setting: NFE, mean Dice and s/image over seeds."""
  groups: dict[tuple, list[dict]] = {}
  for data in vals.values():
    for row in data.get('rows', []):
      groups.setdefault((row['sampler'], int(row['ensemble_size']), row.get('fusion', '')), []).append(row)
  out = [{'sampler': sampler, 'ensemble_size': k, 'fusion': fusion, 'label': budget_label(sampler, k),
          'nfe': rows[0].get('nfe_per_image'), 'seeds': len(rows), 'dice': np.mean([r['dice'] for r in rows]),
          'seconds': np.mean([r.get('seconds_per_image', np.nan) for r in rows])}
         for (sampler, k, fusion), rows in groups.items()]
  return sorted(out, key=lambda r: (r['nfe'] or 0, r['sampler'], r['ensemble_size']))


def read_budget(directory: str, dataset: str) -> tuple[dict[int, dict], dict[str, dict[int, Run]]]:
  """({seed: budget_val.json}, {setting label: {seed: Run}}) from an arm's seed directories."""
  vals: dict[int, dict] = {}
  tests: dict[str, dict[int, Run]] = {}
  for seed, path in seed_dirs(directory).items():
    if (val := _json(os.path.join(path, 'budget_val.json'))) is not None:
      vals[seed] = val
    root = os.path.join(path, 'budget_test')
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
      if (run := read_run(os.path.join(root, name), seed, dataset, phase0_dir=path)) is not None:
        tests.setdefault(name, {})[seed] = run
  return vals, tests


def _unified_arm(arm: str) -> bool:
  """An arm that trains one model on the unified data (sweeps.Arm.only_dataset), read from `unified/`."""
  spec = run_lib.sweeps.ARMS.get(arm)
  return spec is not None and spec.only_dataset == 'unified'


def code_fingerprint(source: str) -> str | None:
  """What a Python file does, without its comments and docstrings (the AST dump), or None if it does not parse:
  two versions with the same fingerprint behave the same."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return None
  for node in ast.walk(tree):
    body = getattr(node, 'body', None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)):
      node.body = body[1:] or [ast.Pass()]
  return ast.dump(tree, include_attributes=False)


class Staleness:
  """Whether a run still stands for its arm at HEAD: its commit's unisegdiff_jax/ must do what HEAD's does (a
  change to comments or docstrings alone does not count), and the config it recorded must equal what the arm's
  command (sweeps.py) resolves to now; a run that recorded no config falls back to "configs/ unchanged since
  its commit" (subprocess git)."""

  def __init__(self, repo: str = REPO):
    self.repo, self._changed, self.notes, self.shared = repo, {}, {}, {}

  def _git(self, *args: str) -> subprocess.CompletedProcess | None:
    try:
      return subprocess.run(['git', *args], cwd=self.repo, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
      return None

  def head(self) -> str:
    done = self._git('rev-parse', 'HEAD')
    return done.stdout.strip() if done is not None and done.returncode == 0 else 'unknown'

  def changed_files(self, commit: str, path: str) -> list[str] | None:
    """The files under `path` whose code differs between `commit` and HEAD (a .py file whose only changes are
    comments and docstrings is left out), or None if git cannot tell."""
    if (commit, path) not in self._changed:
      done = self._git('diff', '--name-only', '--no-renames', '-z', commit, 'HEAD', '--', path)
      self._changed[commit, path] = None if done is None or done.returncode != 0 else [
          name for name in done.stdout.split('\0') if name and not self._same_code(commit, name)]
    return self._changed[commit, path]

  def _same_code(self, commit: str, name: str) -> bool:
    if not name.endswith('.py'):
      return False
    old, new = self._git('show', f'{commit}:{name}'), self._git('show', f'HEAD:{name}')
    if old is None or new is None or old.returncode or new.returncode:
      return False  # added, deleted or unreadable
    fingerprint = code_fingerprint(old.stdout)
    return fingerprint is not None and fingerprint == code_fingerprint(new.stdout)

  def _change_reason(self, commit: str, path: str, suffix: str = '') -> str | None:
    files = self.changed_files(commit, path)
    if files is None:
      return f'staleness unknown (git could not compare {commit[:8]} with HEAD)'
    if not files:
      return None
    names = ', '.join(os.path.relpath(f, path) for f in files[:4]) + (', …' if len(files) > 4 else '')
    return f'{path}/ changed since {commit[:8]} ({names}){suffix}'

  def _config_reason(self, record: Mapping) -> str | None:
    try:
      command = run_lib.current_command(record['dataset'], record['arm'], int(record['seed']))
    except (KeyError, ValueError) as e:
      return f'arm no longer defined ({e})'
    if command is None:
      return f"arm '{record['arm']}' no longer runs on {record['dataset']}"
    try:
      now = config_record.resolve(command, self.repo)
    except config_record.ConfigError as e:
      return f'its config no longer resolves ({e})'
    diffs = config_record.differences(record['config'], now,
                                      phase0=record['arm'] == SEGMENTER or '--mode=pretrain' in record.get('command', ()))
    return (f'its arm now resolves to another config ({"; ".join(diffs[:3])}{"; …" if len(diffs) > 3 else ""})'
            if diffs else None)

  def reason(self, record: Mapping) -> str | None:
    own = self._own_reason(record)
    if own is None and 'training_run' in record:  # trained as another arm: that run must stand too
      source = record['training_run']
      why = self._own_reason(source) if source else 'its training run left no record'
      return None if why is None else f"its training run (arm {source.get('arm', '?')}): {why}"
    return own

  def _own_reason(self, record: Mapping) -> str | None:
    commit = str(record.get('commit') or 'unknown')
    if commit == 'unknown':
      return 'commit unknown'
    if record.get('dirty'):
      return f'run from a modified tree at {commit[:8]}'
    code = self._change_reason(commit, 'unisegdiff_jax')
    if code is not None:
      return code
    if 'config' in record:
      return self._config_reason(record)
    return self._change_reason(commit, 'configs', ' and the run recorded no config')

  def mark(self, where: str, runs: Mapping[int, Run], sources: Mapping[str, Mapping[int, Run]] | None = None) -> str:
    """' ⚠[^n]' with a footnote listing the reasons (and ' †[^sn]' for runs trained as another arm), or ''.
    `sources`: the results of the arms those runs were trained as, to tell whether each still holds the very
    training a shared run evaluated."""
    return self._stale_mark(where, runs) + self._shared_mark(where, runs, sources or {})

  def _stale_mark(self, where: str, runs: Mapping[int, Run]) -> str:
    reasons = sorted({f'seed {s}: {why}' for s, r in runs.items() if (why := self.reason(r.record))})
    if not reasons:
      return ''
    self.notes.setdefault(where, '; '.join(reasons))
    return f' ⚠[^{list(self.notes).index(where) + 1}]'

  def _shared_mark(self, where: str, runs: Mapping[int, Run], sources: Mapping[str, Mapping[int, Run]]) -> str:
    shared = {(r.record['trained_as'], r.record.get('checkpoint_chosen_with', '?')) for r in runs.values()
              if r.record.get('trained_as')}
    if not shared:
      return ''
    notes = [f"trained once as arm `{arm}` (the two configs differ only in `sampling.*`; the runner checks it); the "
             f"checkpoint is the one that arm's validation Dice chose with its `{chosen}` sampler, evaluated on test "
             f"with this arm's sampling; wall time = that training + this evaluation" for arm, chosen in sorted(shared)]
    for seed, run in sorted(runs.items()):
      trained, arm = run.record.get('training_run') or {}, run.record.get('trained_as')
      source = sources.get(arm, {}).get(seed) if arm else None
      if arm and source is not None and any(  # as far as the records tell: same commit, same config = same run
          k in trained and trained[k] != source.record.get(k) for k in ('commit', 'dirty', 'config')):
        notes.append(f"seed {seed}: an earlier training of `{arm}` (commit {str(trained.get('commit'))[:8]}), not the "
                     f"`{arm}` run in the table (commit {str(source.record.get('commit'))[:8]}, a later training)")
    self.shared.setdefault(where, '; '.join(notes))
    return f' †[^s{list(self.shared).index(where) + 1}]'


def _val_sampler(runs: Mapping[int, Run]) -> str:
  """The sampler of the validation runs behind a curve (an arm trained as another: that arm's), from run.json."""
  found = {r.record.get('checkpoint_chosen_with') or config_record.sampler_label(r.record.get('config') or {})
           for r in runs.values()}
  return ', '.join(sorted(found)) or '?'


def _pct(x) -> str:
  return '–' if x is None or not np.isfinite(x) else f'{100 * x:.1f}'


def _num(x, fmt: str = '.1f') -> str:
  return '–' if x is None or not np.isfinite(x) else format(x, fmt)


def _seconds(x) -> str:
  """Seconds per image to two significant digits: an accelerator's 0.0004 must not read as 0.000."""
  return _num(x, '.2g')


def _p(p: float) -> str:
  return '<0.001' if p < 0.001 else f'{p:.3f}'


def _seed_mean(runs: Mapping[int, Run]) -> np.ndarray:
  tables = [r.scores() for r in runs.values()]
  keys = set.intersection(*(set(t) for t in tables))
  return np.array([np.mean([t[k] for t in tables]) for k in sorted(keys)])


def _miss(run: Run) -> float | None:
  if 'miss_rate' in run.block():
    return run.block()['miss_rate']
  missed = [float(c['missed']) for c in run.cases if c.get('missed') not in (None, '')]
  return float(np.mean(missed)) if missed else None


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


ARM_HEADER = ['| arm | seeds | n | Dice % (min–max over seeds) | IoU % | HD95 px | failure % | miss % | NFE | '
              's/image | device | wall min |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|']
CMP_HEADER = ['| arm | vs | n | Dice % | vs Dice % | diff (points) | 95 % CI | p (Wilcoxon) | p (Holm) | '
              'per-seed diffs | verdict |', '|---|---|---:|---:|---:|---:|---|---:|---:|---|---|']


def arm_row(label: str, runs: Mapping[int, Run], expected: int, mark: str) -> str:
  if not runs:
    return f'| {label} | not run |' + ' – |' * 10
  blocks, dice = [r.block() for r in runs.values()], [r.dice() for r in runs.values()]
  seeds = str(len(runs)) if len(runs) >= expected else f'{len(runs)} of {expected}'
  nfe = sorted({str(r.summary['nfe_per_image']) for r in runs.values() if 'nfe_per_image' in r.summary})
  devices = sorted(run_devices(runs))
  wall = _mean([(r.record['wall_seconds'] + r.record.get('training_wall_seconds', 0)) / 60 for r in runs.values()
                if r.record.get('wall_seconds') is not None])
  cells = [label + mark, seeds, str(len(_seed_mean(runs))),
           f'{_pct(np.mean(dice))} ({_pct(min(dice))}–{_pct(max(dice))})',
           _pct(_mean([b.get('iou') for b in blocks])), _num(_mean([b.get('hd95') for b in blocks])),
           _pct(stats.failure_rate(_seed_mean(runs))), _pct(_mean([_miss(r) for r in runs.values()])),
           '/'.join(nfe) or '–', _seconds(_mean([r.summary.get('seconds_per_image') for r in runs.values()])),
           ', '.join(devices), _num(wall)]
  return '| ' + ' | '.join(cells) + ' |'


def cmp_row(row: dict, labels: Mapping[str, str]) -> str:
  seeds = ', '.join(f's{s} {d:+.1f}' for s, d in row['seed_diffs'].items()) or '(no shared seed)'
  vs = labels.get(row['b'], row['b']) + device_mark(row)
  cells = [labels.get(row['a'], row['a']), vs, str(row['n']), f"{row['mean_a']:.1f}",
           f"{row['mean_b']:.1f}", f"{row['diff']:+.1f}", f"[{row['ci95'][0]:+.1f}, {row['ci95'][1]:+.1f}]",
           _p(row['p_wilcoxon']), _p(row['p_holm']), seeds, f"**{row['verdict']}**"]
  return '| ' + ' | '.join(cells) + ' |'


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(path: str, title: str, curves: Mapping[str, tuple[Mapping[int, Run], tuple]], target) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for i, (label, (runs, mean)) in enumerate(curves.items()):
    colour = f'C{i % 10}'
    for run in runs.values():
      if run.curve:
        ax.plot(*zip(*run.curve), color=colour, lw=0.6, alpha=0.4)
    ax.plot(mean[0], mean[1], color=colour, lw=2, label=label)
  if target is not None:
    ax.axhline(target, color='k', ls=':', lw=1, label='reference final')
  ax.set(xlabel='training step', ylabel='validation Dice', title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_budget(path: str, title: str, settings: list[dict], segmenter: tuple | None, tested: list[tuple]) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  ax.scatter([s['seconds'] for s in settings], [100 * s['dice'] for s in settings], c='C0', label='setting (val)')
  for s in settings:
    ax.annotate(s['label'], (s['seconds'], 100 * s['dice']), fontsize=6, xytext=(3, 3), textcoords='offset points')
  for label, seconds, dice in tested:
    ax.scatter([seconds], [100 * dice], c='C2', marker='D', label=f'{label} (test)')
  if segmenter is not None:
    ax.scatter([segmenter[0]], [100 * segmenter[1]], c='C3', marker='*', s=150, label='own phase-0 segmenter (test)')
  if all(s['seconds'] > 0 for s in settings):
    ax.set_xscale('log')
  ax.set(xlabel='seconds per image', ylabel='Dice %', title=title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


class Report:
  """Builds the page section by section; `findings` feeds the plain reading."""

  def __init__(self, results: str, out: str, sweeps: Mapping, n_resamples: int, expected_seeds: int,
               staleness: Staleness | None = None, fallbacks: Sequence[str] = ()):
    self.results, self.sweeps, self.n, self.expected = results, sweeps, n_resamples, expected_seeds
    # Other results trees (e.g. the CPU replicates): a sweep's section for a dataset where `results` has none of
    # its arms is read whole from the first of these that has one; no table mixes two trees.
    self.fallbacks = [f for f in fallbacks if os.path.abspath(f) != os.path.abspath(results)]
    self._roots: dict[tuple[str, str], str] = {}  # (sweep, dataset) -> the tree its section is read from
    self.out_dir = os.path.dirname(os.path.abspath(out))
    self.png_dir = os.path.join(self.out_dir, 'results_png')
    self.stale = staleness or Staleness()
    self.findings: list[dict] = []  # title, claim, reference, labels, rows, not_run
    self._arms: dict[tuple[str, str, str, bool], dict[int, Run]] = {}  # root, dataset, arm, from unified/
    self._budgets: dict[str, tuple[dict[int, dict], dict[str, dict[int, Run]]]] = {}
    self.computed: dict[tuple[str, str], list[dict]] = {}

  def root(self, sweep, dataset: str) -> str:
    """The results tree a sweep's section for `dataset` is read from: `results` if it has a run of one of the
    sweep's arms there, else the first fallback that does (else `results`); looked up once per section."""
    if sweep is None:
      return self.results
    if (sweep.name, dataset) not in self._roots:
      arms = [arm for _, arm in sweep.arms if arm != SEGMENTER]
      self._roots[sweep.name, dataset] = next(
          (root for root in [self.results, *self.fallbacks]
           if any(seed_dirs(os.path.join(root, dataset, arm)) for arm in arms)), self.results)
    return self._roots[sweep.name, dataset]

  @property
  def used_fallbacks(self) -> list[str]:
    """The fallback trees some section was read from, in the order first used."""
    return [root for root in dict.fromkeys(self._roots.values()) if root != self.results]

  def arm(self, dataset: str, arm: str, sweep=None) -> dict[int, Run]:
    """A unified sweep's arms other than its reference come from `unified/` where a dataset lacks them."""
    key = (self.root(sweep, dataset), dataset, arm,
           sweep is not None and 'unified' in sweep.datasets and _unified_arm(arm))
    if key not in self._arms:
      self._arms[key] = load_arm(*key)
    return self._arms[key]

  def budget_runs(self, dataset: str, arm: str, sweep) -> tuple[dict[int, dict], dict[str, dict[int, Run]]]:
    """read_budget of an arm's results, read once for the budget tables and the chosen-budget comparison."""
    path = os.path.join(self.root(sweep, dataset), dataset, arm)
    if path not in self._budgets:
      self._budgets[path] = read_budget(path, dataset)
    return self._budgets[path]

  def where(self, sweep, dataset: str) -> str:
    """'' for the main tree, else ' [from ROOT]': marks the headings and findings of a fallback's section."""
    root = self.root(sweep, dataset)
    return '' if root == self.results else f' [from {root}]'

  def finding(self, title: str, sweep, rows: list[dict], labels: Mapping[str, str], not_run=(), reference=None):
    self.findings.append({'title': title, 'claim': CLAIMS.get(sweep.name), 'reference': reference or sweep.reference,
                          'also_vs': () if reference else sweep.also_vs, 'labels': labels, 'rows': rows,
                          'not_run': list(not_run)})

  def png(self, name: str) -> str:
    os.makedirs(self.png_dir, exist_ok=True)
    return os.path.join(self.png_dir, name)

  def link(self, path: str, alt: str) -> str:
    return f'![{alt}]({os.path.relpath(path, self.out_dir).replace(os.sep, "/")})'

  @staticmethod
  def labels(sweep) -> dict[str, str]:
    return {SEGMENTER: 'segmenter (phase 0)', **{arm: label for label, arm in sweep.arms}}

  def sweep_section(self, sweep) -> list[str]:
    lines, labels = [f'## Sweep `{sweep.name}`', '', sweep.question, ''], self.labels(sweep)
    names = list(dict.fromkeys([arm for _, arm in sweep.arms] + [SEGMENTER]))
    for dataset in sweep.datasets:
      lines += [f'### {sweep.name} — {dataset}{self.where(sweep, dataset)}', '']
      runs = {arm: self.arm(dataset, arm, sweep) for arm in names}
      if not any(runs[arm] for _, arm in sweep.arms):
        lines += ['_not run_', '']
        continue
      shown = [arm for _, arm in sweep.arms]
      shown += [SEGMENTER] if runs[SEGMENTER] and SEGMENTER not in shown else []
      sources = {r.record['trained_as']: self.arm(dataset, r.record['trained_as'], sweep)
                 for a in shown for r in runs[a].values() if r.record.get('trained_as')}
      lines += ARM_HEADER + [arm_row(labels[a], runs[a], self.expected,
                                     self.stale.mark(f'{dataset}/{a}', runs[a], sources)) for a in shown] + ['']
      phase0 = {a: own_phase0(r) for a, r in runs.items()}
      rows = compare_rows({a: scores(r) for a, r in runs.items()}, sweep_pairs(sweep), self.n, phase0,
                          devices_on(dataset, runs))
      self.computed[sweep.name, dataset] = rows
      self.finding(f'{sweep.name} / {dataset}{self.where(sweep, dataset)}', sweep, rows, labels,
                   [labels[a] for a in shown if not runs[a]])
      lines += (CMP_HEADER + [cmp_row(r, labels) for r in rows] if rows else ['_no comparison possible_']) + ['']
      if sweep.name in BAND_SWEEPS:
        lines += band_table({a: scores(runs[a]) for a in shown}, phase0, labels, self.n)
    real = [d for d in sweep.datasets if d not in NOT_REAL]
    per_dataset = {a: {d: self.arm(d, a, sweep) for d in real} for a in names}
    combined = {a: combine(runs) for a, runs in per_dataset.items()}
    phase0 = {a: combine(runs, phase0=True) for a, runs in per_dataset.items()}
    rows = compare_rows(combined, sweep_pairs(sweep), self.n, phase0,
                        {a: {d: run_devices(r) for d, r in runs.items()} for a, runs in per_dataset.items()})
    if rows:
      self.computed[sweep.name, ALL_REAL] = rows
      self.finding(f'{sweep.name} / {ALL_REAL}', sweep, rows, labels)
      lines += [f'### {sweep.name} — {ALL_REAL} (stratified by dataset)', '', *CMP_HEADER,
                *[cmp_row(r, labels) for r in rows], '']
    extras = {'targets': [self.convergence], 'unified': [self.unified]}.get(sweep.name, [])
    if sweep.budget:
      extras += [self.budget] + ([self.chosen_budget] if sweep.reference != SEGMENTER else [])
    return lines + [line for extra in extras for line in extra(sweep)]

  def convergence(self, sweep) -> list[str]:
    lines, labels = [f'### Convergence ({sweep.name})', ''], self.labels(sweep)
    for dataset in sweep.datasets:
      curves = {arm: (runs := self.arm(dataset, arm, sweep), mean_curve(runs)) for _, arm in sweep.arms}
      curves = {arm: c for arm, c in curves.items() if c[1] is not None}
      if not curves:
        lines += [f'{dataset}: _no curve.csv_', '']
        continue
      target = curves[sweep.reference][1][1][-1] if sweep.reference in curves else None
      path = self.png(f'convergence_{sweep.name}_{dataset}.png')
      plot_curves(path, f'{dataset}: validation Dice', {labels[a]: c for a, c in curves.items()}, target)
      reference = labels.get(sweep.reference, sweep.reference)
      lines += [f'**{dataset}**{self.where(sweep, dataset)} — first step at which the seed-mean validation Dice '
                f'reaches the final validation Dice of {reference} '
                + (f'({_pct(target)} %)' if target is not None else '(no curve of it yet)'),
                '',
                '| arm | seeds with a curve | validated with | final val Dice % | first step reaching it |',
                '|---|---:|---|---:|---:|']
      for arm, (runs, mean) in curves.items():
        step = first_crossing(mean, target) if target is not None else None
        reach = '–' if target is None else ('never' if step is None else str(step))
        lines.append(f'| {labels[arm]} | {sum(bool(r.curve) for r in runs.values())} | {_val_sampler(runs)} | '
                     f'{_pct(mean[1][-1])} | {reach} |')
      lines += ['', self.link(path, f'convergence {dataset}'), '']
    return lines

  def budget(self, sweep) -> list[str]:
    lines = [f'### Budget ({sweep.name}): chosen on validation, tested once', '']
    for dataset in sweep.datasets:
      for label, arm in sweep.arms:
        vals, tests = self.budget_runs(dataset, arm, sweep)
        if not vals:
          lines += [f'{dataset} / {label}: _not run_', '']
          continue
        settings = budget_settings(vals)
        lines += [f'**{dataset} / {label}**{self.where(sweep, dataset)} — validation ({len(vals)} seeds)', '',
                  '| sampler | ensemble | fusion | NFE | val Dice % (mean over seeds) | seeds | s/image | chosen |',
                  '|---|---:|---|---:|---:|---:|---:|---|']
        lines += [f"| {s['sampler']} | {s['ensemble_size']} | {s['fusion']} | {s['nfe']} | {_pct(s['dice'])} | "
                  f"{s['seeds']} | {_seconds(s['seconds'])} | {'✓' if s['label'] in tests else ''} |"
                  for s in settings]
        seg = self.arm(dataset, SEGMENTER, sweep)
        names = {f'{arm}@{name}': f'{label}, {name} (test)' for name in tests}
        arms = {**{f'{arm}@{n}': scores(r) for n, r in tests.items()}, SEGMENTER: scores(seg)}
        phase0 = {f'{arm}@{n}': own_phase0(r) for n, r in tests.items()}
        rows = compare_rows(arms, [(a, SEGMENTER) for a in names], self.n, phase0,
                            devices_on(dataset, {**{f'{arm}@{n}': r for n, r in tests.items()}, SEGMENTER: seg}))
        labels = {**names, SEGMENTER: 'segmenter (phase 0)'}
        lines += ['', f"Chosen: {', '.join(tests) or '_none tested yet_'}", '']
        if rows:
          lines += CMP_HEADER + [cmp_row(r, labels) for r in rows] + ['']
          lines += band_table({a: arms[a] for a in names}, phase0, labels, self.n)
          self.finding(f'{sweep.name} / {dataset}{self.where(sweep, dataset)} (chosen setting, test)', sweep, rows,
                       labels, reference=SEGMENTER)
        path = self.png(f'budget_{dataset}_{arm}.png')
        plot_budget(path, f'{dataset}: Dice vs time per image', settings, _segmenter_point(seg, phase0),
                    [(n, *_point(t)) for n, t in tests.items()])
        lines += [self.link(path, f'budget {dataset}'), '']
    return lines

  def chosen_budget(self, sweep) -> list[str]:
    """The sweep's arms compared with each other, each at the setting its own validation runs chose."""
    lines, labels = [f"### {sweep.name}: each arm at its validation-chosen budget (test)", ''], self.labels(sweep)
    for dataset in sweep.datasets:
      runs = {arm: {seed: run for _, per_seed in sorted(self.budget_runs(dataset, arm, sweep)[1].items())
                    for seed, run in per_seed.items()} for _, arm in sweep.arms}
      if not any(runs.values()):
        lines += [f'{dataset}: _not run_', '']
        continue
      runs[SEGMENTER] = self.arm(dataset, SEGMENTER, sweep)
      rows = compare_rows({a: scores(r) for a, r in runs.items()}, sweep_pairs(sweep), self.n,
                          {a: own_phase0(r) for a, r in runs.items()}, devices_on(dataset, runs))
      lines += [f'**{dataset}**{self.where(sweep, dataset)}', '',
                *(CMP_HEADER + [cmp_row(r, labels) for r in rows] if rows else ['_no comparison possible_']), '']
      if rows:
        self.finding(f'{sweep.name} / {dataset}{self.where(sweep, dataset)} (each at its chosen budget, test)',
                     sweep, rows, labels)
    return lines

  def organs(self, sweep) -> list[str]:
    """Per dataset: its own segmenter and diffusion model beside the unified run's (segmenter = the unified
    run's phase 0), with IoU, HD95 and the miss rate the paired table leaves out."""
    unified_arms = [arm for _, arm in sweep.arms if _unified_arm(arm)]
    per_organ = [arm for _, arm in sweep.arms if not _unified_arm(arm)]
    models = [('per-organ segmenter', SEGMENTER, False)] + [
        ('per-organ diffusion' + ('' if a == sweep.reference else f' ({a})'), a, False) for a in per_organ] + [
        ('unified segmenter', SEGMENTER, True)] + [(f'unified diffusion ({a})', a, True) for a in unified_arms]
    lines = ['### Per organ and unified, side by side', '',
             '| dataset | model | seeds | n | Dice % | IoU % | HD95 px | miss % |', '|---|---|---:|---:|---:|---:|---:|---:|']
    for dataset in [d for d in sweep.datasets if d not in NOT_REAL]:
      for label, arm, from_unified in models:
        path = os.path.join(self.root(sweep, dataset), 'unified' if from_unified else dataset, arm)
        runs = {s: read_run(d, s, dataset, dataset if from_unified else None) for s, d in seed_dirs(path).items()}
        runs = {s: r for s, r in runs.items() if r is not None}
        if not runs:
          lines.append(f'| {dataset} | {label} | not run | – | – | – | – | – |')
          continue
        blocks = [r.block() for r in runs.values()]
        lines.append(f"| {dataset} | {label} | {', '.join(map(str, runs))} | {len(_seed_mean(runs))} | "
                     f"{_pct(np.mean([r.dice() for r in runs.values()]))} | {_pct(_mean([b.get('iou') for b in blocks]))} | "
                     f"{_num(_mean([b.get('hd95') for b in blocks]))} | {_pct(_mean([_miss(r) for r in runs.values()]))} |")
    return lines + ['', '(means over the seeds listed; the paired comparisons above use only shared seeds)', '']

  def unified(self, sweep) -> list[str]:
    labels = self.labels(sweep)
    lines = self.organs(sweep) + ['### Unified vs per-dataset models (paired by dataset and case)', '',
             '| dataset | arm | vs | Dice % | vs Dice % | diff (points) | 95 % CI | verdict |',
             '|---|---|---|---:|---:|---:|---|---|']
    references = (sweep.reference, *sweep.also_vs)  # the per-dataset models, at equal steps or equal compute
    for dataset in [d for d in sweep.datasets if d not in NOT_REAL] + [ALL_REAL]:
      rows = [r for r in self.computed.get((sweep.name, dataset), [])
              if r['b'] in references and _unified_arm(r['a'])]
      lines += [f"| {dataset} | {labels[r['a']]} | {labels[r['b']]}{device_mark(r)} | "
                f"{r['mean_a']:.1f} | {r['mean_b']:.1f} | "
                f"{r['diff']:+.1f} | [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] | **{r['verdict']}** |" for r in rows]
      if not rows:
        lines.append(f'| {dataset} | not run | – | – | – | – | – | – |')
    return lines + ['']

  def attention(self) -> list[str]:
    root, lines = os.path.join(self.results, 'attention'), []
    for dataset in sorted(os.listdir(root)) if os.path.isdir(root) else []:
      tables = {a: _csv(os.path.join(root, dataset, a, 'attention.csv'))
                for a in (sorted(os.listdir(os.path.join(root, dataset))) if os.path.isdir(os.path.join(root, dataset)) else [])}
      arms = [a for a, rows in tables.items() if rows]
      if len(arms) > 1:  # the models side by side: one figure, every run's curves
        from experiments import attention as attention_lib  # pylint: disable=g-import-not-at-top
        path = self.png(f'attention_{dataset}_side_by_side.png')
        attention_lib.plot_side_by_side({a: os.path.join(root, dataset, a) for a in arms}, path)
        lines += [f'### {dataset}: {", ".join(arms)} side by side', '', self.link(path, f'attention {dataset}'), '']
      for arm in arms:
        rows = tables[arm]
        lines += [f'### {dataset} / {arm}', '', '| ' + ' | '.join(rows[0]) + ' |', '|' + '---:|' * len(rows[0])]
        lines += ['| ' + ' | '.join(_cell(v) for v in row.values()) + ' |' for row in rows] + ['']
        png = os.path.join(root, dataset, arm, 'attention.png')
        lines += [self.link(png, f'attention {dataset} {arm}'), ''] if os.path.exists(png) else []
    return ['## Attention analysis', '', *lines] if lines else []

  def plain_reading(self) -> list[str]:
    lines = ['## Plain reading', '']
    for f in self.findings:
      labels, rows, reference, parts = f['labels'], f['rows'], f['reference'], []
      for target in dict.fromkeys([reference, *f['also_vs'], SEGMENTER]):
        vs = [r for r in rows if r['b'] == target]
        if not vs:
          continue
        groups = {v: [f"{labels.get(r['a'], r['a'])} ({r['diff']:+.1f}{device_mark(r)})"
                      for r in vs if r['verdict'] == v]
                  for v in ('better', 'worse', 'no difference', 'undecided')}
        said = '; '.join(f"{v}: {', '.join(g)}" for v, g in groups.items() if g)
        parts.append(f"vs {labels.get(target, target)} — {said}")
      claim = f['claim']
      no_help = [f"{labels[r['a']]} ({r['verdict']})" for r in rows if claim and r['b'] == reference
                 and r['a'] != SEGMENTER and claim[1](r['a']) and r['verdict'] != 'better']
      if no_help:
        parts.append(f"**{claim[0]} does NOT help here** (not called better than "
                     f"{labels.get(reference, reference)}): {', '.join(no_help)}")
      if f['not_run']:
        parts.append(f"not run: {', '.join(f['not_run'])}")
      lines.append(f"- **{f['title']}**: " + ('. '.join(parts) if parts else 'no comparison possible') + '.')
    return lines + ([] if self.findings else ['_nothing to compare yet_']) + ['']


def _segmenter_point(seg: Mapping[int, Run], phase0: Mapping[str, stats.Arm | None]) -> tuple | None:
  """(s/image, Dice) of the phase 0 the tested runs started from (their own rows, mean over seeds), else of the
  segmenter arm; its time per image is the segmenter arm's."""
  own = next((arm for arm in phase0.values() if arm), None)
  if not seg:
    return None
  if own is None:
    return _point(seg)
  return _point(seg)[0], float(np.mean([np.mean(list(cases.values())) for cases in own.values()]))


def _point(runs: Mapping[int, Run]) -> tuple[float, float]:
  """(mean s/image, mean Dice) over seeds."""
  return (_mean([r.summary.get('seconds_per_image') for r in runs.values()]) or 0.0,
          float(np.mean([r.dice() for r in runs.values()])))


def _cell(value: str) -> str:
  try:
    return f'{float(value):.4g}'
  except ValueError:
    return value


def hardware(results: str) -> list[str]:
  """One line per (device, hardware) found in run.json files, with the runs that used it."""
  groups: dict[tuple[str, str], dict[str, list[str]]] = {}
  for directory, _, files in sorted(os.walk(results)):
    record = _json(os.path.join(directory, 'run.json')) if 'run.json' in files else None
    if record is not None:
      where, seed = os.path.split(os.path.relpath(directory, results))
      key = (str(record.get('device', 'unknown')), str(record.get('hardware', '')))
      groups.setdefault(key, {}).setdefault(where.replace(os.sep, '/'), []).append(seed.removeprefix('seed'))
  def label(device: str, hw: str) -> str:  # a --hardware text that already names the device stands alone
    return hw if hw.startswith(device) else f'{device} ({hw})' if hw else device

  return [f"- {label(device, hw)}: {sum(map(len, runs.values()))} runs — "
          + ', '.join(f"{w} (seeds {', '.join(s)})" for w, s in runs.items())
          for (device, hw), runs in sorted(groups.items())] or ['- no run.json found']


CPU_REPLICATES = os.path.join('experiments', 'replicates', 'cpu')


def build(results: str, out: str, sweeps: Mapping, *, n_resamples: int = 10_000, expected_seeds: int = 3,
          command: str = 'python -m experiments.report', staleness: Staleness | None = None,
          fallbacks: Sequence[str] = ()) -> str:
  """The page's markdown (writing its PNGs next to `out`)."""
  report = Report(results, out, sweeps, n_resamples, expected_seeds, staleness, fallbacks)
  body = [line for sweep in sweeps.values() for line in report.sweep_section(sweep)] + report.attention()
  other = [line for root in report.used_fallbacks for line in (
      f'Sections marked **[from `{root}`]** are read whole from that tree (where `{results}` has no run of '
      'the sweep on that set; no table mixes the two); its hardware:', '', *hardware(root), '')]
  head = ['# Results', '', f'Generated by `{command}` on {datetime.date.today().isoformat()} at HEAD '
          f'`{report.stale.head()}` from `{results}`; '
          'do not edit by hand.', '', '**Hardware** (from run.json):', '', *hardware(results), '', *other,
          HYGIENE.format(n=f'{n_resamples:,}'.replace(',', ' '), m=MARGIN), '',
          '⚠ marks an arm whose runs may not reflect HEAD (see the notes at the end); † an arm trained once as '
          'another arm that differs from it only in how it samples (its checkpoint, that arm\'s validation '
          'choice, evaluated with its own sampler; notes at the end); ‡ after the "vs" arm a comparison of '
          'arms that ran on different devices (the difference between machines adds to the spread between '
          'seeds: the same config and seed rerun on another day moved per-dataset Dice by 0.6-1.4 points).', '']
  notes = ['## Staleness notes', '', *[f'[^{i}]: {where} — {why}' for i, (where, why) in
                                       enumerate(report.stale.notes.items(), 1)], ''] if report.stale.notes else []
  shared = ['## Shared training notes', '', *[f'[^s{i}]: {where} — {why}' for i, (where, why) in
                                              enumerate(report.stale.shared.items(), 1)], ''] \
      if report.stale.shared else []
  return '\n'.join(head + report.plain_reading() + body + notes + shared)


def prune_images(out: str, text: str) -> list[str]:
  """Deletes the PNGs in results_png/ next to `out` that the page `text` no longer shows (an arm renamed or a
  run replaced leaves its old plot behind otherwise); returns their paths."""
  png_dir = os.path.join(os.path.dirname(os.path.abspath(out)), 'results_png')
  if not os.path.isdir(png_dir):
    return []
  stale = sorted(os.path.join(png_dir, name) for name in os.listdir(png_dir)
                 if name.endswith('.png') and f'results_png/{name}' not in text)
  for path in stale:
    os.remove(path)
  return stale


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--results', default=os.path.join('experiments', 'results'))
  parser.add_argument('--out', default=os.path.join('docs', 'RESULTS.md'))
  parser.add_argument('--fallback', default=None,
                      help='comma-separated results trees read for a sweep and set that --results has not run '
                           '(default: experiments/replicates/cpu with the default --results, else none)')
  parser.add_argument('--n_resamples', type=int, default=10_000)
  parser.add_argument('--seeds', type=int, default=3, help='seeds asked per arm (fewer found shows the count)')
  args = parser.parse_args(argv)
  from experiments.sweeps import SWEEPS  # pylint: disable=g-import-not-at-top
  fallback = args.fallback if args.fallback is not None else (
      CPU_REPLICATES if args.results == parser.get_default('results') else '')
  text = build(args.results, args.out, SWEEPS, n_resamples=args.n_resamples, expected_seeds=args.seeds,
               command=' '.join(['python -m experiments.report', *argv]),
               fallbacks=[f for f in fallback.split(',') if f])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)
  for path in prune_images(args.out, text):
    print(f'removed {path} (no longer on the page)')
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
