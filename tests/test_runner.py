"""The experiment runner's plan, skip/resume and budget choice, with a fake main.py (no training)."""

import json
import os
import shutil
import sys
import textwrap

import pytest

from experiments import config_record
from experiments import run as run_lib
from experiments import sweeps

FAKE_MAIN = textwrap.dedent('''
    import json, os, sys
    args = dict(a.split('=', 1) for a in sys.argv[1:] if '=' in a)
    mode = args.get('--mode', 'train')
    workdir = args['--workdir']
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), 'calls.txt'), 'a') as f:
      f.write(' '.join([mode, workdir] + ([args['--output']] if '--output' in args else [])) + '\\n')
    flaky = os.path.join(workdir, 'fail_once')
    if os.path.exists(flaky):  # an interrupted run: exits without results the first time
      os.remove(flaky)
      sys.exit(0)
    seed = int(args['--config.seed'])
    dice = {'pretrain': 0.70, 'train': 0.75}.get(mode, 0.0) + 0.01 * seed
    def write(out, prefix):
      os.makedirs(out, exist_ok=True)
      json.dump({'datasets': {'d': {'n': 2, 'dice': dice}}, 'mean': {'dice': dice}, 'device': 'fake'},
                open(os.path.join(out, 'summary.json'), 'w'))
      open(os.path.join(out, 'per_case.csv'), 'w').write(
          f'dataset,case_id,dice\\nd,a,{dice}\\nd,b,{dice}\\n')
      with open(os.path.join(workdir, 'scalars.jsonl'), 'a') as f:
        f.write(json.dumps({'step': 10, prefix + 'val/dice': dice}) + '\\n')
    if mode == 'pretrain':
      write(os.path.join(workdir, 'pretrain', 'eval', 'test'), 'pretrain/')
      os.makedirs(os.path.join(workdir, 'pretrain', 'checkpoints', '10'), exist_ok=True)
    elif mode == 'train':
      if '--config.pretrain.checkpoint' not in args and 'scratch' not in args['--config']:
        dice -= 0.05  # the phase 0 main.py trains first in its workdir (no shared one, not scratch)
        write(os.path.join(workdir, 'pretrain', 'eval', 'test'), 'pretrain/')
        dice += 0.05
      write(os.path.join(workdir, 'eval', 'test'), '')
      os.makedirs(os.path.join(workdir, 'checkpoints', '10'), exist_ok=True)
    elif mode == 'sweep':
      out = os.path.join(workdir, 'eval', 'sweep')
      os.makedirs(out, exist_ok=True)
      rows = [{'sampler': s, 'ensemble_size': k, 'fusion': 'mean', 'dice': d + 0.01 * seed}
              for s, k, d in (('staged', 1, 0.5), ('ddim:5', 3, 0.6), ('ddim:10', 1, 0.55))]
      json.dump({'rows': rows, 'split': 'val'}, open(os.path.join(out, 'sweep.json'), 'w'))
    elif mode == 'eval':
      write(args['--output'], 'eval/')
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
  script = tmp_path / 'fake_main.py'
  script.write_text(FAKE_MAIN)
  monkeypatch.setattr(run_lib, 'commit', lambda: ('abc123', False))

  def make(sweep_names, seeds=(0, 1), datasets=('synthetic',)):
    tasks = run_lib.plan(sweep_names, list(datasets), list(seeds), str(tmp_path / 'runs'),
                         str(tmp_path / 'results'), [])
    for task in tasks:
      task.command = [sys.executable, str(script), *task.command[2:]]
    return tasks

  return make, tmp_path


def _calls(tmp_path):
  path = tmp_path / 'calls.txt'
  return path.read_text().splitlines() if path.exists() else []


def test_plan_shares_phase0_and_gives_scratch_the_phase0_steps():
  tasks = run_lib.plan(['encoder'], ['kvasir_seg'], [0], '/r', '/res', [])
  keys = [t.key for t in tasks]
  assert keys.count('kvasir_seg/segmenter/seed0') == 1
  by_key = {t.key: t for t in tasks}
  assert by_key['kvasir_seg/default_frozen/seed0'].deps == ('kvasir_seg/segmenter/seed0',)
  assert '--config.pretrain.checkpoint=/r/kvasir_seg/phase0/seed0' in by_key['kvasir_seg/default/seed0'].command
  scratch = by_key['kvasir_seg/default_scratch/seed0']
  assert scratch.deps == () and not any('pretrain.checkpoint' in c for c in scratch.command)
  pre, steps = run_lib._steps(sweeps.DATASETS['kvasir_seg'])  # pylint: disable=protected-access
  assert f'--config.train.num_steps={pre + steps}' in scratch.command


def test_scratch_on_the_synthetic_set_adds_phase0_steps_to_the_pinned_phase1_steps():
  tasks = {t.key: t for t in run_lib.plan(['encoder'], ['synthetic'], [0], '/r', '/res', [])}
  command = tasks['synthetic/default_scratch/seed0'].command
  assert command[-1] == '--config.train.num_steps=1300'  # 300 + 1000 (the last flag wins)


def test_the_control_segmenter_trains_alone_for_phase0_plus_phase1_steps(fake):
  tasks = {t.key: t for t in run_lib.plan(['control'], ['kvasir_seg'], [0], '/r', '/res', [])}
  long = tasks['kvasir_seg/segmenter_long/seed0']
  pre, steps = run_lib._steps(sweeps.DATASETS['kvasir_seg'])  # pylint: disable=protected-access
  assert long.kind == 'pretrain' and long.deps == () and long.workdir == '/r/kvasir_seg/segmenter_long/seed0'
  assert long.command[2:5] == ['--mode=pretrain', '--config=configs/polyp.py:cpu', f'--workdir={long.workdir}']
  assert long.command[-1] == f'--config.pretrain.num_steps={pre + steps}' and pre + steps == 3500
  assert not any(c.startswith('--config.pretrain.checkpoint=') for c in long.command)
  # the diffusion arms beside it still share the dataset's phase 0 (and train as `anchored_x0` / `anchored`)
  assert set(tasks) == {'kvasir_seg/segmenter_long/seed0', 'kvasir_seg/segmenter/seed0',
                        'kvasir_seg/anchored_x0/seed0', 'kvasir_seg/default/seed0', 'kvasir_seg/x0_only/seed0',
                        'kvasir_seg/anchored/seed0', 'kvasir_seg/three_stage_anchored/seed0',
                        'kvasir_seg/default_long_phase0_phase0/seed0', 'kvasir_seg/default_long_phase0/seed0',
                        'kvasir_seg/x0_high_t/seed0', 'kvasir_seg/long_phase0_high_t/seed0',
                        'kvasir_seg/default_encoder_lr1/seed0', 'kvasir_seg/default_scratch/seed0',
                        'kvasir_seg/lr1_high_t/seed0', 'kvasir_seg/scratch_high_t/seed0'}
  high_t = tasks['kvasir_seg/x0_high_t/seed0']  # the default trained half at t >= 900, on the shared phase 0
  assert high_t.deps == ('kvasir_seg/segmenter/seed0',) and high_t.kind == 'train'
  assert '--config.diffusion.timestep_sampling=balanced' in high_t.command
  # the same training on the full-rate encoder (shared phase 0) and from scratch (none; its steps in phase 1)
  lr1, scratch = tasks['kvasir_seg/lr1_high_t/seed0'], tasks['kvasir_seg/scratch_high_t/seed0']
  assert lr1.deps == high_t.deps and scratch.deps == ()
  assert set(high_t.command[4:]) < set(lr1.command) and '--config.pretrain.finetune_lr_multiplier=1.0' in lr1.command
  assert scratch.command[2] == '--config=configs/polyp.py:cpu,scratch'
  assert scratch.command[-1] == f'--config.train.num_steps={pre + steps}'
  assert '--config.diffusion.timestep_sampling=balanced' in scratch.command
  synthetic = run_lib.plan(['control'], ['synthetic'], [0], '/r', '/res', [], arms_filter=('segmenter_long',))
  assert [t.command[-1] for t in synthetic] == ['--config.pretrain.num_steps=1300']  # 300 + the pinned 1000
  # run with the fake main.py: collected like a phase 0, under its own arm, with its validation curve
  make, tmp_path = fake
  assert run_lib.Runner([t for t in make(['control'], seeds=(0,)) if t.kind == 'pretrain'
                         and 'long_phase0' not in t.key], 1, None, 'test').run() == 0
  results = tmp_path / 'results' / 'synthetic'
  assert sorted(os.listdir(results)) == ['segmenter', 'segmenter_long']
  record = json.loads((results / 'segmenter_long' / 'seed0' / 'run.json').read_text())
  assert record['config']['pretrain.num_steps'] == 1300 and '--mode=pretrain' in record['command']
  assert (results / 'segmenter_long' / 'seed0' / 'curve.csv').read_text() == 'step,val_dice\n10,0.700000\n'
  assert not (results / 'segmenter_long' / 'seed0' / run_lib.PHASE0_CASES).exists()


def test_unified_arms_run_only_on_the_unified_data():
  tasks = run_lib.plan(['unified'], [], [0], '/r', '/res', [])
  keys = {t.key for t in tasks}
  assert {'kvasir_seg/default/seed0', 'unified/unified_equal_steps/seed0',
          'unified/unified_equal_compute/seed0'} <= keys
  assert 'unified/default/seed0' not in keys and 'kvasir_seg/unified_equal_steps/seed0' not in keys
  assert 'unified/default_fifth_steps/seed0' not in keys
  by_key = {t.key: t.command for t in tasks}
  plain = next(c for c in by_key['unified/unified_equal_steps_plain/seed0'] if c.startswith('--config='))
  assert plain == '--config=configs/unified.py:cpu,plain,three_stage', plain  # the unified run of the plain method

  def steps(key):  # the last num_steps flag of each phase wins (absl)
    return tuple(int([c for c in by_key[key] if c.startswith(f'--config.{p}.num_steps=')][-1].split('=')[1])
                 for p in ('pretrain', 'train'))

  # the cpu profile is 1 000 + 2 500 steps; equal total compute: x5 for the unified model, /5 per dataset
  assert steps('unified/unified_equal_compute/seed0') == (5000, 12500)
  for dataset in sweeps.UNIFIED_MEMBERS:
    assert steps(f'{dataset}/default_fifth_steps/seed0') == (200, 500)
    assert not [c for c in by_key[f'{dataset}/default_fifth_steps/seed0']
                if c.startswith('--config.pretrain.checkpoint=')]  # a phase 0 of its own, a fifth as long
  assert not [c for c in by_key['unified/unified_equal_steps/seed0'] if c.startswith('--config.train.num_steps=')]


def test_the_current_command_of_a_phase0_planned_only_as_a_dependency():
  # the unified data's segmenter is in no sweep's arm list, only phase 0 of the unified arms: the results page
  # must still find what it runs now, not call its records stale
  command = run_lib.current_command('unified', 'segmenter', 1)
  assert command is not None
  assert '--mode=pretrain' in command and '--config=configs/unified.py:cpu' in command
  assert '--config.seed=1' in command
  phase1 = run_lib.current_command('unified', 'unified_equal_steps', 1)
  workdir = next(c for c in command if c.startswith('--workdir=')).split('=', 1)[1]
  assert f'--config.pretrain.checkpoint={workdir}' in phase1
  assert run_lib.current_command('unified', 'default', 1) is None  # per-dataset arms never run on it


def test_an_arm_with_a_phase0_of_its_own_keeps_that_phase0s_test_rows(fake):
  """default_fifth_steps trains its own (shorter) phase 0 in its workdir: its results keep that segmenter's test
  rows as its own phase 0, not the shared one's; a scratch arm (no phase 0) keeps none."""
  make, tmp_path = fake
  keep = ('kvasir_seg/default_fifth_steps/seed0', 'kvasir_seg/default_scratch/seed0')
  tasks = [t for t in make(['unified', 'encoder'], seeds=(0,), datasets=('kvasir_seg',)) if t.key in keep]
  assert sorted(t.key for t in tasks) == sorted(keep)
  assert run_lib.Runner(tasks, 1, None, 'test').run() == 0
  results = tmp_path / 'results' / 'kvasir_seg'
  own = (results / 'default_fifth_steps' / 'seed0' / run_lib.PHASE0_CASES).read_text()
  assert own == (tmp_path / 'runs' / 'kvasir_seg' / 'default_fifth_steps' / 'seed0' / 'pretrain' / 'eval' / 'test'
                 / 'per_case.csv').read_text()
  assert own.splitlines()[1] == 'd,a,0.7'  # the fake phase 0's Dice (its phase 1 scores 0.75)
  assert (results / 'default_scratch' / 'seed0' / 'per_case.csv').exists()
  assert not (results / 'default_scratch' / 'seed0' / run_lib.PHASE0_CASES).exists()


def test_an_arm_on_a_longer_phase0_trains_its_own_at_equal_total_steps(fake):
  make, tmp_path = fake
  tasks = {t.key: t for t in run_lib.plan(['control'], ['kvasir_seg'], [0], '/r', '/res', [])}
  own, arm = tasks['kvasir_seg/default_long_phase0_phase0/seed0'], tasks['kvasir_seg/default_long_phase0/seed0']
  long = tasks['kvasir_seg/segmenter_long/seed0']
  pre, steps = run_lib._steps(sweeps.DATASETS['kvasir_seg'])  # pylint: disable=protected-access
  assert (pre, steps) == (1000, 2500)  # the cpu profile; 70 % of 2 500 = 1 750 steps move to phase 0
  assert own.kind == 'pretrain' and own.command[-1] == '--config.pretrain.num_steps=2750'
  assert arm.deps == (own.key,) and f'--config.pretrain.checkpoint={own.workdir}' in arm.command
  # the last num_steps flag wins (absl): phase 1 keeps 750 steps; together as many as the long segmenter's
  assert [c for c in arm.command if c.startswith('--config.train.num_steps=')][-1] == '--config.train.num_steps=750'
  assert 2750 + 750 == int(long.command[-1].split('=')[1])
  # the run is paired with its own, longer phase 0 (not the shared 1 000-step one)
  run = [t for t in make(['control'], seeds=(0,)) if t.key.startswith('synthetic/default_long_phase0')]
  assert run_lib.Runner(run, 1, None, 'test').run() == 0
  assert [c.split()[0] for c in _calls(tmp_path)] == ['pretrain', 'train']
  results = tmp_path / 'results' / 'synthetic'
  assert ((results / 'default_long_phase0' / 'seed0' / run_lib.PHASE0_CASES).read_text()
          == (results / 'default_long_phase0_phase0' / 'seed0' / 'per_case.csv').read_text())


def test_an_arm_can_train_on_another_arms_longer_phase0(fake, monkeypatch):
  make, tmp_path = fake
  tasks = run_lib.plan(['control'], ['kvasir_seg'], [0], '/r', '/res', [],
                       arms_filter=('long_phase0_high_t', 'default_long_phase0'))
  by_key = {t.key: t for t in tasks}
  # one longer phase 0, planned from the arm that owns it, and both phase-1 runs start from it
  assert [t.key for t in tasks if t.kind == 'pretrain'] == ['kvasir_seg/default_long_phase0_phase0/seed0']
  own = by_key['kvasir_seg/default_long_phase0_phase0/seed0']
  alone = run_lib.plan(['control'], ['kvasir_seg'], [0], '/r', '/res', [], arms_filter=('long_phase0_high_t',))
  assert [t.command for t in alone if t.kind == 'pretrain'] == [own.command]  # whichever arm plans it first
  both = by_key['kvasir_seg/long_phase0_high_t/seed0']
  assert both.deps == (own.key,) and f'--config.pretrain.checkpoint={own.workdir}' in both.command
  assert '--config.diffusion.timestep_sampling=balanced' in both.command
  assert ([c for c in both.command if c.startswith('--config.train.num_steps=')][-1]
          == '--config.train.num_steps=750')
  # a phase0_like that cannot share (another share, or an arm that borrows its own) is refused by name
  monkeypatch.setitem(sweeps.ARMS, 'bad', sweeps.Arm(shared_phase0=False, phase0_share_of_phase1=0.5,
                                                     phase0_like='default_long_phase0'))
  with pytest.raises(ValueError, match="arm 'bad': phase0_like='default_long_phase0'"):
    run_lib.own_phase0('kvasir_seg', 'bad', 0, '/r')
  # run with the fake main.py: the borrowing arm is paired with the shared longer phase 0
  run = [t for t in make(['control'], seeds=(0,)) if 'long_phase0' in t.key]
  assert run_lib.Runner(run, 1, None, 'test').run() == 0
  assert [c.split()[0] for c in _calls(tmp_path)] == ['pretrain', 'train', 'train']
  results = tmp_path / 'results' / 'synthetic'
  assert ((results / 'long_phase0_high_t' / 'seed0' / run_lib.PHASE0_CASES).read_text()
          == (results / 'default_long_phase0_phase0' / 'seed0' / 'per_case.csv').read_text())


def test_runner_collects_skips_finished_runs_and_resumes_interrupted_ones(fake):
  make, tmp_path = fake
  tasks = make(['targets'], seeds=(0,))
  interrupted = next(t for t in tasks if t.key == 'synthetic/v_only/seed0')
  os.makedirs(interrupted.workdir)
  open(os.path.join(interrupted.workdir, 'fail_once'), 'w').close()
  assert run_lib.Runner(tasks, 2, None, 'test').run() == 1  # one run stopped without results
  results = tmp_path / 'results' / 'synthetic'
  # the default, x0-only and three-stage arms train as `anchored_x0` / `anchored` (same configs but the sampler):
  # those runs are collected too
  assert sorted(os.listdir(results)) == ['anchored', 'anchored_x0', 'default', 'eps_only', 'segmenter',
                                         'three_stage_anchored', 'two_stage', 'x0_only']
  record = json.loads((results / 'eps_only' / 'seed0' / 'run.json').read_text())
  assert record['commit'] == 'abc123' and record['seed'] == 0 and record['hardware'] == 'test'
  # the config its command resolved to: the arm's stage table on the synthetic profile, this seed
  assert record['config']['diffusion.stages'] == '0:1000 eps steps=10' and record['config']['seed'] == 0
  assert record['config'] == config_record.resolve(record['command'][1:])
  assert (results / 'eps_only' / 'seed0' / 'curve.csv').read_text() == 'step,val_dice\n10,0.750000\n'
  assert (results / 'segmenter' / 'seed0' / 'curve.csv').read_text() == 'step,val_dice\n10,0.700000\n'
  # each phase-1 run keeps the test results of the phase 0 it started from; phase 0 itself has none
  assert ((results / 'eps_only' / 'seed0' / run_lib.PHASE0_CASES).read_text()
          == (results / 'segmenter' / 'seed0' / 'per_case.csv').read_text())
  assert not (results / 'segmenter' / 'seed0' / run_lib.PHASE0_CASES).exists()
  first = len(_calls(tmp_path))
  modes = [c.split()[0] for c in _calls(tmp_path)]
  # phase 0, five trainings (v_only interrupted; two as other arms), the three shared arms' own test evaluations
  assert modes.count('pretrain') == 1 and modes.count('train') == 5
  # the targets sweep gives each finished arm its validation budget grid and one test at its choice
  assert modes.count('sweep') == 5 and modes.count('eval') == 5 + 3
  # Rerun: finished runs are skipped, the interrupted one runs again and finishes, then gets its budget.
  assert run_lib.Runner(make(['targets'], seeds=(0,)), 2, None, 'test').run() == 0
  assert [c.split()[0] for c in _calls(tmp_path)[first:]] == ['train', 'sweep', 'eval']
  assert _calls(tmp_path)[first] == f"train {interrupted.workdir}"
  assert (results / 'v_only' / 'seed0' / 'summary.json').exists()


def test_phase0_results_without_a_checkpoint_are_retrained_for_the_arms_but_kept(fake):
  """Results copied from another machine: phase 0 retrains here (its arms need the checkpoint); its results stay."""
  make, tmp_path = fake
  kept = tmp_path / 'results' / 'synthetic' / 'segmenter' / 'seed0'
  os.makedirs(kept)
  (kept / 'summary.json').write_text('{"from": "elsewhere"}')
  tasks = [t for t in make(['targets'], seeds=(0,)) if t.key.endswith(('segmenter/seed0', 'eps_only/seed0'))]
  assert run_lib.Runner(tasks, 1, None, 'test').run() == 0
  assert [c.split()[0] for c in _calls(tmp_path)] == ['pretrain', 'train']
  assert json.loads((kept / 'summary.json').read_text()) == {'from': 'elsewhere'}
  own = tmp_path / 'results' / 'synthetic' / 'eps_only' / 'seed0' / run_lib.PHASE0_CASES
  assert own.read_text() == 'dataset,case_id,dice\nd,a,0.7\nd,b,0.7\n'  # the retrained phase 0 it loaded


def test_an_evaluation_retrains_a_training_from_elsewhere_and_its_phase0_for_their_checkpoints(fake, capsys):
  """Seed 0 trained and swept on validation on another machine (results, no workdirs here); seed 1 is new.
  The test at the budget chosen over both seeds needs seed 0's checkpoint: its training retrains, and so does
  the phase 0 that training loads, both keeping their results; seed 0's validation grid does not rerun."""
  make, tmp_path = fake
  pick = lambda seeds: [t for t in make(['targets'], seeds=seeds) if t.key.split('/')[1] in ('segmenter', 'eps_only')]
  assert run_lib.Runner(pick((0,)), 1, None, 'test').run() == 0
  results = tmp_path / 'results' / 'synthetic'
  shutil.rmtree(tmp_path / 'runs')  # another machine's workdirs
  shutil.rmtree(results / 'eps_only' / 'seed0' / 'budget_test')  # its choice waited for seed 1
  for name in ('summary.json', 'per_case.csv'):
    (results / 'eps_only' / 'seed0' / name).write_text('elsewhere')
  first = len(_calls(tmp_path))
  tasks = pick((0, 1))
  assert run_lib.Runner(tasks, 2, None, 'test').run() == 0
  calls = _calls(tmp_path)[first:]
  seed0 = [c.split()[0] for c in calls if '/seed0' in c]
  assert seed0 == ['pretrain', 'train', 'eval']  # no second validation grid for seed 0
  assert sorted(c.split()[0] for c in calls if '/seed1' in c) == ['eval', 'pretrain', 'sweep', 'train']
  assert (results / 'eps_only' / 'seed0' / 'summary.json').read_text() == 'elsewhere'
  assert os.listdir(results / 'eps_only' / 'seed0' / 'budget_test') == ['ddim5_x3']
  train0 = next(i for i, c in enumerate(calls) if c.startswith('train ') and '/seed0' in c)
  test0 = next(i for i, c in enumerate(calls) if c.startswith('eval ') and '/seed0' in c)
  assert train0 < test0  # with two workers too, the test waited for the retrained checkpoint
  out = capsys.readouterr().out  # the log says why a finished run trains again, and how far the sweep is
  assert 'synthetic/eps_only/seed0: started (train, retrained for its checkpoint (results kept))' in out
  assert 'synthetic/eps_only/seed1: started (train); log ' in out
  assert f'[{len(tasks)} / {len(tasks)} tasks finished]' in out


def test_the_dry_run_says_what_run_would_do(tmp_path, monkeypatch, capsys):
  """Finished, to run, resuming from its last checkpoint, or retrained for its checkpoint (results from another
  machine that a task still to run needs), as Runner.run would decide."""
  monkeypatch.setattr(run_lib, 'commit', lambda: ('abc123', False))
  root, results = tmp_path / 'runs', tmp_path / 'results' / 'synthetic'
  for arm in ('segmenter', 'eps_only'):  # seed 0 ran elsewhere: results, no workdirs
    os.makedirs(results / arm / 'seed0')
    (results / arm / 'seed0' / 'summary.json').write_text('{}')
  (results / 'eps_only' / 'seed0' / 'budget_val.json').write_text('{}')
  os.makedirs(root / 'synthetic' / 'phase0' / 'seed1' / 'pretrain' / 'checkpoints' / '1000')
  os.makedirs(root / 'synthetic' / 'eps_only' / 'seed1' / 'checkpoints' / '500')  # an interrupted training
  assert run_lib.main(['targets', '--arms=segmenter,eps_only', '--datasets=synthetic', '--seeds=0,1',
                       f'--root={root}', f'--results={tmp_path / "results"}', '--dry_run']) == 0
  states = {}
  for line in capsys.readouterr().out.splitlines():  # '[state] key: command'
    state, rest = line[1:].split('] ', 1)
    states[rest.split(': ', 1)[0]] = state
  assert states == {
      'synthetic/segmenter/seed0': 'to run: retrained for its checkpoint, results kept',  # eps seed 0 loads it
      'synthetic/eps_only/seed0': 'to run: retrained for its checkpoint, results kept',  # its test needs it
      'synthetic/eps_only/seed0/budget_val': 'finished',
      'synthetic/segmenter/seed1': 'to run: resumes from step 1000',  # stopped before its test evaluation
      'synthetic/eps_only/seed1': 'to run: resumes from step 500',
      'synthetic/eps_only/seed1/budget_val': 'to run',
      'synthetic/eps_only/seed0/budget_test': 'to run',
      'synthetic/eps_only/seed1/budget_test': 'to run'}


def test_budget_is_chosen_on_validation_over_seeds_and_tested_once(fake):
  make, tmp_path = fake
  assert run_lib.Runner(make(['budget']), 1, None, 'test').run() == 0
  arms = [arm for _, arm in sweeps.SWEEPS['budget'].arms]
  assert len(arms) >= 2
  for arm in arms:  # each arm's own choice, on its own validation runs
    for seed in (0, 1):
      kept = tmp_path / 'results' / 'synthetic' / arm / f'seed{seed}' / 'budget_test'
      assert os.listdir(kept) == ['ddim5_x3']  # best mean validation Dice (0.6 + 0.01 * seed)
  tests = [c.split()[2] for c in _calls(tmp_path) if c.startswith('eval ') and '/budget_test/' in c]
  assert len(tests) == len(set(tests)) == len(arms) * 2  # the test split once per arm and seed, each its own output


def test_choose_budget_needs_every_seed(tmp_path):
  for seed, rows in enumerate(([('staged', 0.9), ('ddim:5', 0.5)], [('ddim:5', 0.6)])):
    os.makedirs(tmp_path / str(seed))
    json.dump({'rows': [{'sampler': s, 'ensemble_size': 1, 'fusion': 'mean', 'dice': d} for s, d in rows]},
              open(tmp_path / str(seed) / 'budget_val.json', 'w'))
  choice = run_lib.choose_budget([str(tmp_path / '0'), str(tmp_path / '1')])
  assert choice['sampler'] == 'ddim:5'  # staged was not evaluated in seed 1


def test_budget_grid_flags_reach_the_validation_sweep_only(tmp_path):
  tasks = run_lib.plan(['budget'], ['synthetic'], [0], str(tmp_path / 'runs'), str(tmp_path / 'results'), [],
                       budget_settings='staged,ddim:2', budget_ensembles='1,3')
  vals = [t for t in tasks if t.kind == 'budget_val']
  assert vals and all('--sweep=staged,ddim:2' in t.command and '--ensemble_sizes=1,3' in t.command for t in vals)
  assert not any(a.startswith('--sweep=') for t in tasks if t.kind != 'budget_val' for a in t.command)


def test_smoke_plan_drops_the_datasets_pinned_data_and_steps(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lib, 'SMOKE', True)
  tasks = run_lib.plan(['method'], ['synthetic'], [0], str(tmp_path / 'runs'), str(tmp_path / 'results'), [])
  assert tasks and all(not a.startswith(('--config.train.num_steps=1000', '--config.data.datasets='))
                       for t in tasks for a in t.command)
  assert all(any(a.startswith('--config=') and ':smoke' in a for a in t.command) for t in tasks)


def test_seed_limits_shape_the_budget_choice_and_every_test_evaluation_runs(fake, tmp_path):
  """--seed_datasets: a dataset with fewer seeds chooses its budget on the seeds it ran (a device run once lost
  every real dataset's test evaluation to a dependency on a seed that was never planned)."""
  tasks = run_lib.plan(['budget'], ['synthetic', 'kvasir_seg'], [0, 1, 2], str(tmp_path / 'runs'),
                       str(tmp_path / 'results'), [], seed_limits={'kvasir_seg': 2})
  keys = {t.key for t in tasks}
  assert 'kvasir_seg/default/seed2' not in keys and 'synthetic/default/seed2' in keys
  for task in tasks:
    assert all(d in keys for d in task.deps), task.key
  test = next(t for t in tasks if t.key == 'kvasir_seg/default/seed0/budget_test')
  assert test.deps == ('kvasir_seg/default/seed0/budget_val', 'kvasir_seg/default/seed1/budget_val',
                       'kvasir_seg/default/seed0')


def test_a_runner_error_fails_the_task_instead_of_hanging_the_sweep(fake):
  make, _ = fake
  tasks = [t for t in make(['budget'], seeds=(0,)) if t.key.startswith('synthetic/default/seed0')]
  test = next(t for t in tasks if t.kind == 'budget_test')
  test.deps = (*test.deps, 'synthetic/default/seed9/budget_val')  # unknown to the runner
  assert run_lib.Runner(tasks, 1, None, 'test').run() == 1
  assert test.failed and all(t.done for t in tasks if t is not test)


def test_an_arm_that_trains_as_another_evaluates_its_checkpoint_with_its_own_sampler(tmp_path):
  tasks = {t.key: t for t in run_lib.plan(['budget'], ['synthetic'], [0], str(tmp_path / 'runs'),
                                          str(tmp_path / 'results'), [], arms_filter=('default',))}
  default, anchored = tasks['synthetic/default/seed0'], tasks['synthetic/anchored_x0/seed0']  # planned for it
  assert default.kind == 'shared_eval' and anchored.kind == 'train' and default.deps == (anchored.key,)
  assert default.workdir == anchored.workdir and f'--workdir={anchored.workdir}' in default.command
  assert default.shared == {'trained_as': 'anchored_x0', 'checkpoint_chosen_with': 'staged'}
  assert default.results.endswith('synthetic/default/seed0')
  # what the default arm resolves to differs from anchored in the sampler only
  diffs = config_record.differences(config_record.resolve(default.command[2:]),
                                    config_record.resolve(anchored.command[2:]))
  assert diffs == ["sampling.ddim_steps: 1 -> 100", "sampling.sampler: 'ddim' -> 'staged'"]
  assert run_lib.eval_dir(default) == os.path.join(anchored.workdir, 'eval', 'arm_default', 'test')
  test = tasks['synthetic/default/seed0/budget_test']
  command, label, out = run_lib.budget_test_command(test, {'sampler': 'ddim:2', 'ensemble_size': 1, 'fusion': 'mean'})
  assert out == os.path.join(anchored.workdir, 'eval', 'arm_default', 'budget_test', 'ddim2_x1') and label == 'ddim2_x1'
  # two arms' validation sweeps that write into one workdir run one after the other
  both = {t.key: t for t in run_lib.plan(['budget'], ['synthetic'], [0], '/r', '/res', [])}
  assert 'synthetic/anchored/seed0/budget_val' in both['synthetic/three_stage_anchored/seed0/budget_val'].deps


def test_trains_as_is_refused_once_the_two_arms_train_differently(monkeypatch):
  arms = dict(sweeps.ARMS)
  arms['sampled_otherwise'] = sweeps.Arm(('frozen',), ('--config.sampling.ddim_steps=7',), trains_as='default_frozen')
  arms['trained_otherwise'] = sweeps.Arm(('frozen',), ('--config.loss.aux_weight=0.25',), trains_as='default_frozen')
  monkeypatch.setattr(sweeps, 'ARMS', arms)
  common = ['--config.seed=0', *sweeps.DATASETS['kvasir_seg'].overrides]
  own, _, _ = run_lib._arm_command('kvasir_seg', 'sampled_otherwise', 0, '/r', common)  # pylint: disable=protected-access
  source, _, _ = run_lib._arm_command('kvasir_seg', 'default_frozen', 0, '/r', common)  # pylint: disable=protected-access
  assert run_lib._shared_training('sampled_otherwise', own, 'default_frozen', source) == {  # pylint: disable=protected-access
      'checkpoint_chosen_with': 'ddim:1'}
  own, _, _ = run_lib._arm_command('kvasir_seg', 'trained_otherwise', 0, '/r', common)  # pylint: disable=protected-access
  with pytest.raises(run_lib.SharedTrainingError, match=r"no longer trains as 'default_frozen' \(loss.aux_weight: 0.25 -> 1.0\)"):
    run_lib._shared_training('trained_otherwise', own, 'default_frozen', source)  # pylint: disable=protected-access
  with pytest.raises(run_lib.SharedTrainingError, match='set up differently'):
    run_lib._shared_training('default_scratch', own, 'default_frozen', source)  # pylint: disable=protected-access


def test_a_shared_arm_trains_once_and_records_what_it_evaluated(fake):
  make, tmp_path = fake
  tasks = [t for t in make(['budget'], seeds=(0,)) if t.key.split('/')[1] in ('default', 'anchored_x0', 'segmenter')]
  assert run_lib.Runner(tasks, 1, None, 'test').run() == 0
  calls = _calls(tmp_path)
  anchored_dir = next(t.workdir for t in tasks if t.key == 'synthetic/anchored_x0/seed0')
  assert [c for c in calls if c.startswith('train ')] == [f'train {anchored_dir}']  # one training, none for default
  results = tmp_path / 'results' / 'synthetic'
  record = json.loads((results / 'default' / 'seed0' / 'run.json').read_text())
  source = json.loads((results / 'anchored_x0' / 'seed0' / 'run.json').read_text())
  assert record['trained_as'] == 'anchored_x0' and record['checkpoint_chosen_with'] == 'staged'
  assert record['training_wall_seconds'] == source['wall_seconds']
  assert record['training_run'] == {k: source[k] for k in ('arm', 'dataset', 'seed', 'commit', 'dirty', 'config')}
  assert record['config']['sampling.sampler'] == 'ddim' and source['config']['sampling.sampler'] == 'staged'
  # its own test evaluation (the fake's eval Dice), the source's training curve, the shared phase 0
  assert json.loads((results / 'default' / 'seed0' / 'summary.json').read_text())['mean']['dice'] == 0.0
  assert (results / 'default' / 'seed0' / 'curve.csv').read_text() == (results / 'anchored_x0' / 'seed0' / 'curve.csv').read_text()
  assert (results / 'default' / 'seed0' / run_lib.PHASE0_CASES).exists()
  assert os.listdir(results / 'default' / 'seed0' / 'budget_test') == ['ddim5_x3']
  assert os.path.isdir(os.path.join(anchored_dir, 'eval', 'arm_default', 'budget_test', 'ddim5_x3'))


def test_a_shared_arm_cites_the_training_it_evaluated_even_when_that_run_was_retrained_for_its_checkpoint(fake):
  """The source arm's results came from another machine (no checkpoint here): it retrains for the shared arm,
  keeps its results, and the shared arm's record names the retrained run, not the one in the results."""
  make, tmp_path = fake
  kept = tmp_path / 'results' / 'synthetic' / 'anchored_x0' / 'seed0'
  os.makedirs(kept)
  (kept / 'summary.json').write_text('{"from": "elsewhere"}')
  (kept / 'run.json').write_text(json.dumps({'arm': 'anchored_x0', 'commit': 'elsewhere', 'wall_seconds': 12345.0}))
  tasks = [t for t in make(['method'], seeds=(0,)) if t.key.split('/')[1] in ('default', 'anchored_x0', 'segmenter')]
  assert run_lib.Runner(tasks, 1, None, 'test').run() == 0
  assert [c.split()[0] for c in _calls(tmp_path)] == ['pretrain', 'train', 'eval']
  assert json.loads((kept / 'summary.json').read_text()) == {'from': 'elsewhere'}
  assert json.loads((kept / 'run.json').read_text())['commit'] == 'elsewhere'
  record = json.loads((tmp_path / 'results' / 'synthetic' / 'default' / 'seed0' / 'run.json').read_text())
  assert record['training_run']['commit'] == 'abc123' and record['training_run']['arm'] == 'anchored_x0'
  assert record['training_wall_seconds'] != 12345.0


def test_past_the_deadline_only_test_evaluations_of_finished_trainings_start(fake):
  """A device call's deadline: no new training starts, but the default's evaluation of its finished training does
  (within the grace period); past the grace period nothing starts."""
  make, tmp_path = fake
  def encoder_tasks():
    return make(['encoder'], seeds=(0,))
  trained = [t for t in encoder_tasks() if t.key.split('/')[1] in ('segmenter', 'anchored_x0')]
  assert run_lib.Runner(trained, 1, None, 'test').run() == 0
  before = len(_calls(tmp_path))
  past = run_lib.time.time() - 1
  assert run_lib.Runner(encoder_tasks(), 2, past, 'test', grace_seconds=0).run() == 0
  assert _calls(tmp_path)[before:] == []  # past the grace period too: nothing starts
  assert run_lib.Runner(encoder_tasks(), 2, past, 'test', grace_seconds=600).run() == 0
  started = [c.split()[0] for c in _calls(tmp_path)[before:]]
  assert started == ['eval']  # the default's test evaluation; no scratch, frozen or full-rate training
  assert (tmp_path / 'results' / 'synthetic' / 'default' / 'seed0' / 'summary.json').exists()
  assert not (tmp_path / 'results' / 'synthetic' / 'default_frozen').exists()
