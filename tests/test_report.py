"""docs/RESULTS.md generation from a hand-made results tree (numpy / scipy / matplotlib only, no jax)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from experiments import report

DATASETS = ('kvasir_seg', 'busi')
CASES = 8
STEPS = (100, 200, 300, 400)


@dataclasses.dataclass(frozen=True)
class Sweep:  # stand-in for experiments.sweeps.Sweep
  name: str
  question: str
  arms: tuple[tuple[str, str], ...]
  reference: str
  datasets: tuple[str, ...]
  budget: bool = False
  also_vs: tuple[str, ...] = ()


SWEEPS = {
    'targets': Sweep('targets', 'Staged or single target?', (('eps only', 'eps_only'), ('two stages', 'two_stage'),
                                                              ('three stages', 'three_stage')), 'eps_only', DATASETS),
    'budget': Sweep('budget', 'Which sampler budget?', (('default config', 'eps_only'),), 'segmenter', ('kvasir_seg',),
                    budget=True),
}


def write_offset_runs(results, offsets: dict[str, float], seeds=range(2), dataset='kvasir_seg') -> dict:
  """One run per arm and seed at base_dice + the arm's offset; {(arm, seed): its directory}."""
  return {(arm, seed): write_run(results, dataset, arm, seed, base_dice(dataset, seed) + offset)
          for seed in seeds for arm, offset in offsets.items()}


def _head() -> str | None:
  done = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=report.REPO, capture_output=True, text=True)
  return done.stdout.strip() if done.returncode == 0 else None


HEAD = _head()


def base_dice(dataset: str, seed: int) -> np.ndarray:
  """eps_only's per-case Dice: distinct values, a per-seed offset, a per-dataset offset."""
  return 0.55 + 0.03 * np.arange(CASES) + 0.01 * seed + (0.02 if dataset == 'busi' else 0.0)


def eps_curve(seed):
  return 0.5 + 0.1 * np.arange(4) + 0.02 * seed  # final 0.80 / 0.82 / 0.84


def three_curve(seed):
  return np.array([0.7, 0.81, 0.83, 0.9]) + 0.005 * seed


def _write_eval(directory, dataset, dice, seconds=0.02, nfe=10):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'per_case.csv'), 'w') as f:
    f.write('dataset,case_id,height,width,dice,iou,hd95,ece,missed\n')
    for i, d in enumerate(dice):
      f.write(f'{dataset},case{i},64,64,{d:.6f},{d - 0.1:.6f},5.000000,0.010000,0\n')
  block = {'n': len(dice), 'dice': float(np.mean(dice)), 'iou': float(np.mean(dice) - 0.1), 'hd95': 5.0,
           'ece': 0.01, 'miss_rate': 0.0}
  summary = {'datasets': {dataset: block}, 'mean': block, 'nfe_per_image': nfe, 'seconds_per_image': seconds,
             'checkpoint_step': 400, 'sampler': 'staged', 'ensemble_size': 1, 'device': 'cpu'}
  with open(os.path.join(directory, 'summary.json'), 'w') as f:
    json.dump(summary, f)


def write_run(results, dataset, arm, seed, dice, curve=None, commit=None, seconds=0.02, nfe=10):
  directory = os.path.join(results, dataset, arm, f'seed{seed}')
  _write_eval(directory, dataset, dice, seconds, nfe)
  if curve is not None:
    with open(os.path.join(directory, 'curve.csv'), 'w') as f:
      f.write('step,val_dice\n' + ''.join(f'{s},{v:.6f}\n' for s, v in zip(STEPS, curve)))
  record = {'arm': arm, 'dataset': dataset, 'seed': seed, 'command': ['main.py'], 'commit': commit or HEAD or 'x',
            'dirty': False, 'device': 'cpu', 'hardware': '2-core test CPU', 'wall_seconds': 60.0 * (seed + 1),
            'started': '2025-01-01T00:00:00', 'finished': '2025-01-01T00:01:00'}
  with open(os.path.join(directory, 'run.json'), 'w') as f:
    json.dump(record, f)
  return directory


def set_device(directory: str, device: str, name: str = 'run.json') -> None:
  """Rewrites the device that `name` (run.json, or summary.json of an evaluation) in `directory` records."""
  path = os.path.join(directory, name)
  with open(path) as f:
    record = json.load(f)
  with open(path, 'w') as f:
    json.dump({**record, 'device': device}, f)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  results = str(tmp_path_factory.mktemp('results'))
  for dataset in DATASETS:
    for seed in range(3):
      base = base_dice(dataset, seed)
      write_run(results, dataset, 'eps_only', seed, base, eps_curve(seed))
      write_run(results, dataset, 'three_stage', seed, base + 0.05, three_curve(seed), commit='unknown')
      write_run(results, dataset, 'segmenter', seed, base - 0.02 * (seed + 1), seconds=0.001, nfe=1)
  for seed in range(2):  # two of three seeds, one dataset
    write_run(results, 'kvasir_seg', 'two_stage', seed, base_dice('kvasir_seg', seed) - 0.1, [0.3, 0.4, 0.5, 0.6])
  for seed in range(3):
    directory = os.path.join(results, 'kvasir_seg', 'eps_only', f'seed{seed}')
    rows = [{'sampler': 'staged', 'steps': 10, 'ensemble_size': 1, 'fusion': 'mean', 'nfe_per_image': 10,
             'dice': 0.70 + 0.01 * seed, 'seconds_per_image': 0.02},
            {'sampler': 'ddim:10', 'steps': 10, 'ensemble_size': 5, 'fusion': 'mean', 'nfe_per_image': 50,
             'dice': 0.74, 'seconds_per_image': 0.1}]
    with open(os.path.join(directory, 'budget_val.json'), 'w') as f:
      json.dump({'rows': rows, 'split': 'val'}, f)
    _write_eval(os.path.join(directory, 'budget_test', 'ddim10_x5'), 'kvasir_seg',
                base_dice('kvasir_seg', seed) - 0.02 * (seed + 1) + 0.03, seconds=0.1, nfe=50)
  attention = os.path.join(results, 'attention', 'kvasir_seg', 'three_stage')
  os.makedirs(attention)
  with open(os.path.join(attention, 'attention.csv'), 'w') as f:
    f.write('t_lo,t_hi,loss,grad_norm,dice_x0,reliance_zero,reliance_swap\n0,200,0.1234567,1.5,0.8,0.2,0.3\n')
  out = os.path.join(str(tmp_path_factory.mktemp('docs')), 'RESULTS.md')
  text = report.build(results, out, SWEEPS, n_resamples=200, command='python -m experiments.report --test')
  return results, out, text


def section(text: str, title: str) -> list[str]:
  lines = text.splitlines()
  start = lines.index(title)
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('#')), len(lines))
  return lines[start:end]


def row(lines: list[str], *prefix: str) -> list[str]:
  """The cells of the first table row whose leading cells start with `prefix`."""
  for line in lines:
    cells = [c.strip() for c in line.strip('|').split('|')]
    if line.startswith('|') and all(c.startswith(p) for c, p in zip(cells, prefix)):
      return cells
  raise AssertionError(f'no row {prefix} in\n' + '\n'.join(lines))


def test_arm_mean_over_seeds_matches_hand_computation(tree):
  _, _, text = tree
  lines = section(text, '### targets — kvasir_seg')
  per_seed = [100 * base_dice('kvasir_seg', s).mean() for s in range(3)]
  cells = row(lines, 'eps only')
  assert cells[1] == '3' and cells[2] == str(CASES)
  assert cells[3] == f'{np.mean(per_seed):.1f} ({min(per_seed):.1f}–{max(per_seed):.1f})'
  assert cells[9] == '0.02' and cells[11] == f'{np.mean([1, 2, 3]):.1f}'  # s/image, wall minutes


def test_constant_difference_collapses_and_is_better(tree):
  _, _, text = tree
  titles = ('### targets — kvasir_seg', '### targets — busi', '### targets — all real sets (stratified by dataset)')
  for title in titles:
    cells = row(section(text, title), 'three stages', 'eps only')
    assert cells[5] == '+5.0' and cells[6] == '[+5.0, +5.0]', cells
    assert cells[9] == 's0 +5.0, s1 +5.0, s2 +5.0' and cells[10] == '**better**'
  plain = section(text, '## Plain reading')
  assert any('targets / kvasir_seg' in line and 'better: three stages (+5.0)' in line for line in plain)


def test_missing_seeds_and_missing_arms(tree):
  _, _, text = tree
  assert row(section(text, '### targets — kvasir_seg'), 'two stages')[1] == '2 of 3'
  assert row(section(text, '### targets — busi'), 'two stages')[1] == 'not run'
  plain = [line for line in section(text, '## Plain reading') if 'targets / busi' in line][0]
  assert 'not run: two stages' in plain


def test_convergence_first_crossing(tree):
  _, out, text = tree
  target = np.mean([eps_curve(s)[-1] for s in range(3)])
  three = np.mean([three_curve(s) for s in range(3)], axis=0)
  expected = STEPS[int(np.argmax(three >= target))]
  assert expected == 300
  lines = section(text, '### Convergence (targets)')
  assert row(lines, 'three stages')[4] == str(expected)
  assert row(lines, 'two stages')[4] == 'never'
  assert row(lines, 'eps only')[4] == str(STEPS[-1])
  assert row(lines, 'eps only')[2] == '?'  # these runs recorded no config
  png = os.path.join(os.path.dirname(out), 'results_png', 'convergence_targets_kvasir_seg.png')
  assert os.path.getsize(png) > 1000
  assert '(results_png/convergence_targets_kvasir_seg.png)' in text


def test_budget_tables_and_plot(tree):
  _, out, text = tree
  lines = section(text, '### Budget (budget): chosen on validation, tested once')
  assert row(lines, 'staged')[4] == f'{100 * np.mean([0.70, 0.71, 0.72]):.1f}'
  assert row(lines, 'ddim:10', '5')[-1] == '✓'
  assert 'Chosen: ddim10_x5' in lines
  cells = row(lines, 'default config, ddim10_x5 (test)', 'segmenter')
  assert cells[5] == '+3.0' and cells[6] == '[+3.0, +3.0]' and cells[10] == '**better**'  # segmenter + 3 points
  assert os.path.getsize(os.path.join(os.path.dirname(out), 'results_png', 'budget_kvasir_seg_eps_only.png')) > 1000


def test_stale_marker_and_header(tree):
  _, _, text = tree
  cells = row(section(text, '### targets — kvasir_seg'), 'three stages')
  assert '⚠[^' in cells[0]
  notes = section(text, '## Staleness notes')
  assert any('kvasir_seg/three_stage' in line and 'commit unknown' in line for line in notes)
  if HEAD is not None:
    assert '⚠' not in row(section(text, '### targets — kvasir_seg'), 'eps only')[0]
    assert f'`{HEAD}`' in text.splitlines()[2]
  assert 'python -m experiments.report --test' in text
  assert '2-core test CPU' in text and '200 resamples' in text
  assert '0.1235' in text  # the attention table


def test_a_segmenter_only_arm_is_judged_on_the_fields_phase0_reads():
  from experiments import config_record  # pylint: disable=g-import-not-at-top
  from experiments import run as run_lib  # pylint: disable=g-import-not-at-top
  command = run_lib.current_command('synthetic', 'segmenter_long', 0)
  config = config_record.resolve(command)
  record = {'dataset': 'synthetic', 'arm': 'segmenter_long', 'seed': 0, 'command': command}
  stale = report.Staleness()
  assert stale._config_reason({**record, 'config': config}) is None  # pylint: disable=protected-access
  # a field only phase 1 reads changed: the control segmenter still stands
  assert stale._config_reason({**record, 'config': {**config, 'diffusion.stages': 'x0_only'}}) is None  # pylint: disable=protected-access
  # its own step count changed: it does not
  why = stale._config_reason({**record, 'config': {**config, 'pretrain.num_steps': 300}})  # pylint: disable=protected-access
  assert why is not None and 'pretrain.num_steps: 300 -> 1300' in why, why


def test_unified_pairs_by_dataset_and_case(tmp_path, monkeypatch):
  results = str(tmp_path / 'results')
  for dataset in DATASETS:
    for seed in range(2):
      write_run(results, dataset, 'default', seed, base_dice(dataset, seed))
      # per-dataset models at a fifth of the steps (equal total compute with the unified run): 3 points below
      write_run(results, dataset, 'default_fifth_steps', seed, [d - 0.03 for d in base_dice(dataset, seed)])
  for seed in range(2):  # one unified run over both sets, 2 points below on kvasir_seg, 1 above on busi
    directory = write_run(results, 'unified', 'unified_equal_steps', seed, [0.5])
    with open(os.path.join(directory, 'per_case.csv'), 'w') as f:
      f.write('dataset,case_id,height,width,dice,iou,hd95,ece\n')
      for dataset, shift in (('kvasir_seg', -0.02), ('busi', 0.01)):
        f.write(''.join(f'{dataset},case{i},64,64,{d + shift:.6f},0.5,5,0.01\n'
                        for i, d in enumerate(base_dice(dataset, seed))))
    with open(os.path.join(directory, 'summary.json')) as f:  # a unified summary has a block per dataset
      summary = json.load(f)
    summary['datasets'] = {d: {**summary['mean'], 'dice': float(np.mean(base_dice(d, seed))) + shift}
                           for d, shift in (('kvasir_seg', -0.02), ('busi', 0.01))}
    with open(os.path.join(directory, 'summary.json'), 'w') as f:
      json.dump(summary, f)
  sweeps = {'unified': Sweep('unified', 'One model?', (('per-dataset model', 'default'),
                                                     ('per-dataset, 1/5 steps', 'default_fifth_steps'),
                                                     ('unified, equal steps', 'unified_equal_steps')),
                             'default', DATASETS + ('unified',), also_vs=('default_fifth_steps',))}
  monkeypatch.setitem(sys.modules, 'experiments.sweeps', types.SimpleNamespace(SWEEPS=sweeps))
  out = str(tmp_path / 'docs' / 'RESULTS.md')
  old_plot = tmp_path / 'docs' / 'results_png' / 'budget_kvasir_seg_renamed_arm.png'  # from an earlier page
  os.makedirs(old_plot.parent)
  old_plot.write_bytes(b'png')
  assert report.main([f'--results={results}', f'--out={out}', '--n_resamples=200', '--seeds=2']) == 0
  with open(out) as f:
    text = f.read()
  assert not old_plot.exists()  # a plot the page no longer shows is removed with the regeneration
  lines = section(text, '### Unified vs per-dataset models (paired by dataset and case)')
  assert row(lines, 'kvasir_seg', 'unified, equal steps', 'per-dataset model')[5:] == ['-2.0', '[-2.0, -2.0]',
                                                                                       '**worse**']
  assert row(lines, 'busi', 'unified, equal steps', 'per-dataset model')[5:] == ['+1.0', '[+1.0, +1.0]', '**better**']
  assert row(lines, 'all real sets', 'unified, equal steps', 'per-dataset model')[5] == '-0.5'  # unweighted mean
  # at equal total compute: against the per-dataset models trained a fifth as long
  assert row(lines, 'kvasir_seg', 'unified, equal steps', 'per-dataset, 1/5')[5:] == ['+1.0', '[+1.0, +1.0]',
                                                                                      '**better**']
  assert row(lines, 'busi', 'unified, equal steps', 'per-dataset, 1/5')[5] == '+4.0'
  assert not [line for line in lines if line.startswith('| kvasir_seg | per-dataset, 1/5')]  # unified arms only
  organs = section(text, '### Per organ and unified, side by side')
  kvasir = np.mean([base_dice('kvasir_seg', s) for s in range(2)])
  assert row(organs, 'kvasir_seg', 'per-organ diffusion')[4] == f'{100 * kvasir:.1f}'
  assert row(organs, 'kvasir_seg', 'unified diffusion (unified_equal_steps)')[4] == f'{100 * (kvasir - 0.02):.1f}'
  assert not any('unified diffusion (default)' in line for line in organs)  # the per-dataset arm is not unified
  plain = section(text, '## Plain reading')
  assert any('unified / kvasir_seg' in line and 'unification does NOT help here' in line for line in plain)
  organs = section(text, '### Per organ and unified, side by side')
  kvasir_mean = np.mean([base_dice('kvasir_seg', s).mean() for s in range(2)])
  assert row(organs, 'kvasir_seg', 'per-organ diffusion')[2:5] == ['0, 1', str(CASES), f'{100 * kvasir_mean:.1f}']
  assert row(organs, 'busi', 'unified diffusion (unified_equal_steps)')[4] == f"{100 * (np.mean([base_dice('busi', s).mean() for s in range(2)]) + 0.01):.1f}"
  assert row(organs, 'busi', 'per-organ segmenter')[2] == 'not run'


def test_vs_segmenter_pairs_each_run_with_its_own_phase0(tmp_path):
  """Runs that recorded the phase 0 they started from are compared with it, not with the segmenter arm's run
  (a replicate of the same seed), in the per-dataset, the all-real-sets and the budget tables."""
  results = str(tmp_path / 'results')
  for dataset in DATASETS:
    for seed in range(2):
      base = base_dice(dataset, seed)
      directory = write_run(results, dataset, 'eps_only', seed, base)
      write_run(results, dataset, 'segmenter', seed, base - 0.10)  # another phase-0 replicate: 10 points lower
      own = os.path.join(str(tmp_path), 'own', dataset, str(seed))
      _write_eval(own, dataset, base - 0.03)  # the phase 0 this run started from: 3 points lower
      os.replace(os.path.join(own, 'per_case.csv'), os.path.join(directory, report.PHASE0_CASES))
      if dataset == 'kvasir_seg':
        with open(os.path.join(directory, 'budget_val.json'), 'w') as f:
          json.dump({'rows': [{'sampler': 'ddim:1', 'ensemble_size': 1, 'fusion': 'mean', 'nfe_per_image': 1,
                               'dice': 0.7, 'seconds_per_image': 0.01}]}, f)
        _write_eval(os.path.join(directory, 'budget_test', 'ddim1_x1'), dataset, base + 0.01)
  text = report.build(results, str(tmp_path / 'RESULTS.md'), SWEEPS, n_resamples=200)
  for title in ('### targets — kvasir_seg', '### targets — all real sets (stratified by dataset)'):
    cells = row(section(text, title), 'eps only', 'segmenter')
    assert cells[5] == '+3.0' and cells[6] == '[+3.0, +3.0]', cells
  kvasir = np.mean([base_dice('kvasir_seg', s) for s in range(2)])
  assert row(section(text, '### targets — kvasir_seg'), 'eps only', 'segmenter')[4] == f'{100 * (kvasir - 0.03):.1f}'
  budget = row(section(text, '### Budget (budget): chosen on validation, tested once'), 'default config, ddim1_x1')
  assert budget[5] == '+4.0', budget


def test_comparisons_of_arms_run_on_different_devices_are_marked(tmp_path):
  """x0_only ran on another device than eps_only and the segmenter: its rows against them carry the mark, in the
  table and the plain reading; eps_only against the segmenter (same device) and, once x0_only recorded its own
  phase 0, x0_only against it do not."""
  results = str(tmp_path / 'results')
  dirs = write_offset_runs(results, {'segmenter': -0.1, 'eps_only': 0.0, 'x0_only': 0.03})
  for seed in range(2):
    set_device(dirs['x0_only', seed], 'NVIDIA H200')
  for (arm, seed), directory in dirs.items():  # each arm's budget: one setting, tested on its own device
    if arm != 'segmenter':
      with open(os.path.join(directory, 'budget_val.json'), 'w') as f:
        json.dump({'rows': [{'sampler': 'ddim:1', 'ensemble_size': 1, 'fusion': 'mean', 'nfe_per_image': 1,
                             'dice': 0.7, 'seconds_per_image': 0.01}]}, f)
      test = os.path.join(directory, 'budget_test', 'ddim1_x1')
      _write_eval(test, 'kvasir_seg', base_dice('kvasir_seg', seed) + (0.04 if arm == 'x0_only' else 0.0))
      if arm == 'x0_only':
        set_device(test, 'NVIDIA H200', 'summary.json')
  sweeps = {'targets': Sweep('targets', 'Staged?', (('eps only', 'eps_only'), ('x0 only', 'x0_only')), 'eps_only',
                             ('kvasir_seg',), budget=True)}
  text = report.build(results, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200)
  chosen = section(text, '### targets: each arm at its validation-chosen budget (test)')
  assert row(chosen, 'x0 only', 'eps only ‡')[5] == '+4.0'
  lines = section(text, '### targets — kvasir_seg')
  assert row(lines, 'x0 only', 'eps only ‡')[5] == '+3.0'
  assert row(lines, 'x0 only', 'segmenter (phase 0) ‡')[5] == '+13.0'
  assert row(lines, 'eps only', 'segmenter (phase 0)')[1] == 'segmenter (phase 0)'
  reading = next(line for line in text.splitlines() if line.startswith('- **targets / kvasir_seg**'))
  assert 'x0 only (+3.0 ‡)' in reading and 'eps only (+10.0)' in reading, reading
  assert row(section(text, '### Budget (targets): chosen on validation, tested once'),
             'x0 only, ddim1_x1 (test)', 'segmenter (phase 0) ‡')[5] == '+14.0'
  assert '‡ after the "vs" arm' in text
  for seed in range(2):  # its own phase 0, on its own device: 2 points below it
    own = os.path.join(str(tmp_path), 'own', str(seed))
    _write_eval(own, 'kvasir_seg', base_dice('kvasir_seg', seed) + 0.01)
    os.replace(os.path.join(own, 'per_case.csv'), os.path.join(dirs['x0_only', seed], report.PHASE0_CASES))
  text = report.build(results, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200)
  cells = row(section(text, '### targets — kvasir_seg'), 'x0 only', 'segmenter')
  assert cells[1] == 'segmenter (phase 0)' and cells[5] == '+2.0', cells


def test_a_cross_dataset_comparison_is_marked_only_where_a_shared_dataset_ran_on_two_devices(tmp_path):
  """Pooled over two sets: x0_only differs from eps_only's device on kvasir_seg only (marked); v_only ran on
  another device only on a set eps_only did not run (not marked)."""
  results = str(tmp_path / 'results')
  for dataset in DATASETS:
    dirs = write_offset_runs(results, {'eps_only': 0.0, 'x0_only': 0.03, 'v_only': 0.01}, dataset=dataset)
    for seed in range(2):
      if dataset == 'kvasir_seg':
        set_device(dirs['x0_only', seed], 'NVIDIA H200')
  for seed in range(2):
    set_device(write_run(results, 'ph2', 'v_only', seed, base_dice('kvasir_seg', seed)), 'NVIDIA H200')
  sweeps = {'targets': Sweep('targets', 'Staged?', (('eps only', 'eps_only'), ('x0 only', 'x0_only'),
                                                    ('v only', 'v_only')), 'eps_only', (*DATASETS, 'ph2'))}
  text = report.build(results, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200)
  pooled = section(text, '### targets — all real sets (stratified by dataset)')
  assert row(pooled, 'x0 only', 'eps only ‡')[5] == '+3.0'
  assert row(pooled, 'v only', 'eps only')[1] == 'eps only'
  assert row(section(text, '### targets — busi'), 'x0 only', 'eps only')[1] == 'eps only'


def test_difference_to_own_phase0_is_broken_down_by_the_phase0_dice_band(tmp_path):
  results = str(tmp_path / 'results')
  phase0 = np.array([0.3, 0.4, 0.45, 0.6, 0.7, 0.75, 0.85, 0.9, 0.95])
  gain = np.array([0.05] * 3 + [0.0] * 3 + [-0.02] * 3)  # helps the hard images, costs the easy ones
  for seed in range(2):
    directory = write_run(results, 'kvasir_seg', 'anchored', seed, phase0 + gain)
    write_run(results, 'kvasir_seg', 'segmenter', seed, phase0 - 0.2)  # another replicate: not the reference
    own = os.path.join(str(tmp_path), 'own', str(seed))
    _write_eval(own, 'kvasir_seg', phase0)
    os.replace(os.path.join(own, 'per_case.csv'), os.path.join(directory, report.PHASE0_CASES))
  sweeps = {'method': Sweep('method', 'Which change?', (('anchored', 'anchored'),), 'segmenter', ('kvasir_seg',))}
  text = report.build(results, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200)
  lines = section(text, '### method — kvasir_seg')
  expected = {'phase 0 < 0.5': ('+5.0', 38.3), '0.5–0.8': ('+0.0', 68.3), '≥ 0.8': ('-2.0', 90.0)}
  for band, (diff, own_mean) in expected.items():
    cells = row(lines, 'anchored', band)
    assert cells[2] == '3' and cells[4] == f'{own_mean:.1f}' and cells[5] == diff, cells
    assert cells[6] == f'[{diff}, {diff}]'


def test_a_budget_sweep_compares_its_arms_each_at_its_own_validation_choice(tmp_path):
  """Equal at the training-time sampler, 5 points apart at the settings their validation runs chose."""
  results = str(tmp_path / 'results')
  for seed in range(2):
    base = base_dice('kvasir_seg', seed)
    write_run(results, 'kvasir_seg', 'segmenter', seed, base - 0.1)
    for arm, chosen, gain in (('eps_only', 'ddim10_x1', 0.0), ('default', 'ddim2_x1', 0.05)):
      directory = write_run(results, 'kvasir_seg', arm, seed, base)
      with open(os.path.join(directory, 'budget_val.json'), 'w') as f:
        json.dump({'rows': [{'sampler': chosen.split('_')[0].replace('ddim', 'ddim:'), 'ensemble_size': 1,
                             'fusion': 'mean', 'nfe_per_image': 2, 'dice': 0.7, 'seconds_per_image': 0.01}]}, f)
      _write_eval(os.path.join(directory, 'budget_test', chosen), 'kvasir_seg', base + gain)
  sweeps = {'targets': Sweep('targets', 'Staged?', (('eps only', 'eps_only'), ('three stages', 'default')),
                             'eps_only', ('kvasir_seg',), budget=True)}
  text = report.build(results, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200)
  assert row(section(text, '### targets — kvasir_seg'), 'three stages', 'eps only')[5] == '+0.0'
  lines = section(text, "### targets: each arm at its validation-chosen budget (test)")
  cells = row(lines, 'three stages', 'eps only')
  assert cells[5] == '+5.0' and cells[6] == '[+5.0, +5.0]' and cells[-1] == '**better**', cells
  assert row(lines, 'eps only', 'segmenter')[5] == '+10.0'


def test_sweep_pairs_put_each_unordered_pair_in_its_first_role():
  sweep = Sweep('t', '?', (('eps', 'eps_only'), ('x0', 'x0_only'), ('default', 'default')), 'eps_only', ('d',),
                also_vs=('default',))
  assert report.sweep_pairs(sweep) == [('x0_only', 'eps_only'), ('default', 'eps_only'), ('x0_only', 'default'),
                                       ('eps_only', 'segmenter'), ('x0_only', 'segmenter'),
                                       ('default', 'segmenter')]
  assert report.sweep_pairs(dataclasses.replace(sweep, also_vs=())) == [
      ('x0_only', 'eps_only'), ('default', 'eps_only'), ('eps_only', 'segmenter'), ('x0_only', 'segmenter'),
      ('default', 'segmenter')]


def test_also_vs_compares_every_arm_with_the_default_too(tmp_path):
  results = str(tmp_path / 'results')
  write_offset_runs(results, {'segmenter': -0.1, 'eps_only': 0.0, 'x0_only': 0.03, 'default': 0.02})
  for seed in range(2):  # validation curves for two of the three arms
    for arm in ('x0_only', 'default'):
      with open(os.path.join(results, 'kvasir_seg', arm, f'seed{seed}', 'curve.csv'), 'w') as f:
        f.write('step,val_dice\n' + ''.join(f'{s},{v:.6f}\n' for s, v in zip(STEPS, three_curve(seed))))
  sweeps = {'targets': Sweep('targets', 'Staged?', (('eps only', 'eps_only'), ('x0 only', 'x0_only'),
                                                    ('three stages', 'default')), 'eps_only', ('kvasir_seg',),
                             also_vs=('default',))}
  text = report.build(results, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200)
  lines = section(text, '### targets — kvasir_seg')
  cells = row(lines, 'x0 only', 'three stages')
  assert cells[5] == '+1.0' and cells[6] == '[+1.0, +1.0]' and cells[-1] == '**better**', cells
  assert row(lines, 'three stages', 'eps only')[5] == '+2.0'
  with pytest.raises(AssertionError):
    row(lines, 'eps only', 'three stages')  # the pair already stands the other way round
  reading = next(line for line in text.splitlines() if line.startswith('- **targets / kvasir_seg**'))
  assert 'vs three stages — better: x0 only (+1.0)' in reading, reading
  # convergence: the reference (eps only) left no curve, so there is no target to reach
  lines = section(text, '### Convergence (targets)')
  assert lines[2].endswith('final validation Dice of eps only (no curve of it yet)'), lines[2]
  assert row(lines, 'x0 only')[-1] == '–'


def test_attention_runs_of_one_dataset_are_also_drawn_side_by_side(tmp_path):
  results = str(tmp_path / 'results')
  for arm, loss in (('eps_only', 0.5), ('default', 0.25)):
    directory = os.path.join(results, 'attention', 'synthetic', arm)
    os.makedirs(directory)
    with open(os.path.join(directory, 'attention.csv'), 'w') as f:
      f.write('t_lo,t_hi,loss,grad_norm,dice_x0,reliance_zero,reliance_swap\n'
              f'0,500,{loss},1.5,0.8,0.2,0.3\n500,1000,{2 * loss},1.0,0.6,0.4,0.5\n')
  text = report.build(results, str(tmp_path / 'docs' / 'RESULTS.md'), {}, n_resamples=200)
  lines = section(text, '### synthetic: default, eps_only side by side')
  assert any('attention_synthetic_side_by_side.png' in line for line in lines)
  assert os.path.getsize(tmp_path / 'docs' / 'results_png' / 'attention_synthetic_side_by_side.png') > 1000
  assert row(section(text, '### synthetic / eps_only'), '500')[2] == '1'  # its own table stays


def test_an_arm_trained_as_another_is_marked_and_counts_that_training_in_its_wall_time(tmp_path):
  results = str(tmp_path / 'results')
  written = write_offset_runs(results, {'segmenter': -0.1, 'anchored': 0.0, 'default': 0.01})
  for seed in range(2):
    path = os.path.join(written['default', seed], 'run.json')
    with open(path) as f:
      record = json.load(f)
    record.update(trained_as='anchored', checkpoint_chosen_with='staged', training_wall_seconds=540.0,
                  training_run={'arm': 'anchored', 'dataset': 'kvasir_seg', 'seed': seed,
                                'commit': 'unknown' if seed else record['commit'], 'dirty': False})
    with open(path, 'w') as f:
      json.dump(record, f)
  sweeps = {'budget': Sweep('budget', 'Budget?', (('default config', 'default'), ('anchored', 'anchored')),
                            'segmenter', ('kvasir_seg',))}
  text = report.build(results, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200)
  lines = section(text, '### budget — kvasir_seg')
  default, anchored = row(lines, 'default config'), row(lines, 'anchored')
  assert '†[^s1]' in default[0] and '†' not in anchored[0]
  # a shared run stands only if the training it evaluated does (seed 1's training run: commit unknown)
  assert '⚠' in default[0] and any('kvasir_seg/default' in line and 'seed 1: its training run (arm anchored): '
                                   'commit unknown' in line for line in section(text, '## Staleness notes'))
  assert default[-1] == f'{(60 + 540 + 120 + 540) / 2 / 60:.1f}' and anchored[-1] == f'{(60 + 120) / 2 / 60:.1f}'
  notes = section(text, '## Shared training notes')
  assert any(line.startswith('[^s1]: kvasir_seg/default') and 'arm `anchored`' in line and '`staged`' in line
             for line in notes)
  # seed 1 evaluated another training of `anchored` than the one whose results the table shows; seed 0 the same one
  note = next(line for line in notes if line.startswith('[^s1]'))
  assert 'seed 1: an earlier training of `anchored` (commit unknown)' in note and 'seed 0:' not in note


def test_a_curve_names_the_sampler_its_validation_ran_with():
  def run(record):
    return report.Run(0, {}, [], [], record, 'kvasir_seg')
  ddim2 = {'config': {'sampling.sampler': 'ddim', 'sampling.ddim_steps': 2}}
  staged = {'config': {'sampling.sampler': 'staged', 'sampling.ddim_steps': 100}}
  shared = {**ddim2, 'trained_as': 'anchored', 'checkpoint_chosen_with': 'staged'}
  assert report._val_sampler({0: run(ddim2)}) == 'ddim:2'  # pylint: disable=protected-access
  assert report._val_sampler({0: run(staged), 1: run(shared)}) == 'staged'  # pylint: disable=protected-access
  assert report._val_sampler({0: run(ddim2), 1: run(shared)}) == 'ddim:2, staged'  # pylint: disable=protected-access


def test_prune_images_keeps_exactly_the_plots_the_page_shows(tmp_path):
  png_dir = tmp_path / 'results_png'
  os.makedirs(png_dir)
  for name in ('budget_a.png', 'budget_a_old.png', 'notes.txt'):
    (png_dir / name).write_bytes(b'x')
  text = '![budget a](results_png/budget_a.png)'
  assert report.prune_images(str(tmp_path / 'RESULTS.md'), text) == [str(png_dir / 'budget_a_old.png')]
  assert sorted(os.listdir(png_dir)) == ['budget_a.png', 'notes.txt']
  assert report.prune_images(str(tmp_path / 'elsewhere' / 'RESULTS.md'), text) == []  # no plot folder there


def test_code_fingerprint_ignores_comments_and_docstrings_only():
  base = '"""Module."""\nimport os\n\n\ndef f(x):\n  """Doc."""\n  return x + 1  # one\n'
  reworded = '"""Module, reworded."""\nimport os\n\n\n# a new comment\ndef f(x):\n  """Other doc."""\n  return x + 1\n'
  assert report.code_fingerprint(base) == report.code_fingerprint(reworded)
  assert report.code_fingerprint(base) != report.code_fingerprint(base.replace('x + 1', 'x + 2'))
  # a string that is not the first statement is code, not a docstring
  assert report.code_fingerprint(base) != report.code_fingerprint(base.replace('  return', '  "s"\n  return'))
  # a function whose body was only its docstring keeps a body
  assert report.code_fingerprint('def g():\n  """Only."""\n') == report.code_fingerprint('def g():\n  pass\n')
  assert report.code_fingerprint('def (:\n') is None


@pytest.mark.skipif(HEAD is None, reason='needs git')
def test_staleness_names_the_changed_files_and_skips_comment_only_edits(tmp_path):
  def git(*args):
    return subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path, check=True,
                          capture_output=True, text=True).stdout.strip()

  def commit(files):
    for name, text in files.items():
      os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
      (tmp_path / name).write_text(text)
    git('add', '-A')
    git('commit', '-q', '-m', 'c')
    return git('rev-parse', 'HEAD')

  git('init', '-q')
  first = commit({'unisegdiff_jax/a.py': 'def f():\n  return 1\n', 'unisegdiff_jax/b.py': 'X = 1\n',
                  'configs/c.py': 'Y = 1\n'})
  record = {'commit': first, 'dirty': False}  # no recorded config: configs/ is compared too
  docs_only = commit({'unisegdiff_jax/a.py': '"""Now documented."""\n\n\ndef f():  # why\n  return 1\n'})
  assert report.Staleness(str(tmp_path)).changed_files(first, 'unisegdiff_jax') == []
  assert report.Staleness(str(tmp_path))._own_reason(record) is None  # pylint: disable=protected-access
  commit({'unisegdiff_jax/b.py': 'X = 2\n', 'unisegdiff_jax/notes.txt': 'new\n'})
  stale = report.Staleness(str(tmp_path))
  assert stale.changed_files(first, 'unisegdiff_jax') == ['unisegdiff_jax/b.py', 'unisegdiff_jax/notes.txt']
  assert stale.changed_files(docs_only, 'unisegdiff_jax') == ['unisegdiff_jax/b.py', 'unisegdiff_jax/notes.txt']
  assert stale._own_reason(record) == (  # pylint: disable=protected-access
      f'unisegdiff_jax/ changed since {first[:8]} (b.py, notes.txt)')
  git('rm', '-q', 'unisegdiff_jax/notes.txt')
  commit({'unisegdiff_jax/b.py': 'X = 1  # back as it was\n', 'configs/c.py': 'Y = 2\n'})
  assert report.Staleness(str(tmp_path))._own_reason(record) == (  # pylint: disable=protected-access
      f'configs/ changed since {first[:8]} (c.py) and the run recorded no config')
  assert 'staleness unknown' in report.Staleness(str(tmp_path))._own_reason(  # pylint: disable=protected-access
      {'commit': '0' * 40, 'dirty': False})


def test_hardware_lines_group_runs_and_name_the_device_once(tmp_path):
  for where, seed, device, hw in [('synthetic/default', 0, 'cpu', 'cpu (2-core, two at once)'),
                                  ('synthetic/default', 1, 'cpu', 'cpu (2-core, two at once)'),
                                  ('busi/segmenter', 0, 'NVIDIA H200', '12 runs at once'),
                                  ('busi/default', 0, 'cpu', '')]:
    os.makedirs(tmp_path / where / f'seed{seed}')
    (tmp_path / where / f'seed{seed}' / 'run.json').write_text(json.dumps({'device': device, 'hardware': hw}))
  assert report.hardware(str(tmp_path)) == [
      '- NVIDIA H200 (12 runs at once): 1 runs — busi/segmenter (seeds 0)',
      '- cpu: 1 runs — busi/default (seeds 0)',
      '- cpu (2-core, two at once): 2 runs — synthetic/default (seeds 0, 1)']


def test_the_budget_plots_segmenter_is_the_tested_runs_own_phase0():
  seg = {s: report.Run(s, {'seconds_per_image': t, 'datasets': {'d': {'dice': 0.5}}}, [], [], {}, 'd')
         for s, t in ((0, 0.01), (1, 0.03))}
  own = {0: {('d', 'a'): 0.6, ('d', 'b'): 0.8}, 1: {('d', 'a'): 0.7, ('d', 'b'): 0.9}}
  assert report._segmenter_point(seg, {'x@ddim1_x1': own}) == pytest.approx((0.02, 0.75))  # pylint: disable=protected-access
  assert report._segmenter_point(seg, {'x@ddim1_x1': None}) == pytest.approx((0.02, 0.5))  # pylint: disable=protected-access
  assert report._segmenter_point({}, {'x@ddim1_x1': own}) is None  # pylint: disable=protected-access


def test_a_sweep_and_set_the_main_tree_has_not_run_is_read_whole_from_a_fallback_tree(tmp_path):
  main, cpu = str(tmp_path / 'main'), str(tmp_path / 'cpu')
  write_offset_runs(main, {'segmenter': 0.0, 'three_stage': 0.05})  # kvasir_seg on the main tree
  write_offset_runs(main, {'segmenter': 0.0}, dataset='busi')  # only a segmenter: no run of the sweep
  write_offset_runs(cpu, {'segmenter': 0.0, 'three_stage': 0.01})  # kvasir_seg on the fallback: not used
  write_offset_runs(cpu, {'segmenter': 0.0, 'eps_only': 0.02, 'three_stage': 0.04}, dataset='busi')
  sweeps = {'targets': Sweep('targets', 'Targets?', (('eps only', 'eps_only'), ('three stages', 'three_stage')),
                             'eps_only', ('kvasir_seg', 'busi'))}
  text = report.build(main, str(tmp_path / 'RESULTS.md'), sweeps, n_resamples=200, expected_seeds=2,
                      fallbacks=[cpu])
  kvasir = section(text, '### targets — kvasir_seg')
  assert row(kvasir, 'three stages')[1] == '2' and row(kvasir, 'eps only')[1] == 'not run'
  assert row(kvasir, 'three stages', 'segmenter')[5] == '+5.0'  # the main tree's offset, not the fallback's
  busi = section(text, f'### targets — busi [from {cpu}]')
  assert row(busi, 'three stages', 'eps only')[5] == '+2.0' and row(busi, 'eps only', 'segmenter')[5] == '+2.0'
  assert f'Sections marked **[from `{cpu}`]**' in text
  # the cross-set table pairs each set within its own tree: (+5 on kvasir_seg, +4 on busi) / 2
  both = section(text, '### targets — all real sets (stratified by dataset)')
  assert row(both, 'three stages', 'segmenter')[5] == '+4.5'
  # without a fallback busi is not run
  alone = report.build(main, str(tmp_path / 'ALONE.md'), sweeps, n_resamples=200)
  assert section(alone, '### targets — busi')[2] == '_not run_' and '[from' not in alone
