"""The recorded config of a run (experiments/config_record.py) and the results page's staleness test built on it."""

import subprocess

import pytest

from configs import default
from configs import polyp
from experiments import config_record
from experiments import report
from experiments import run as run_lib


def _head():
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=report.REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def test_resolve_equals_the_config_file_with_its_overrides_applied_by_hand():
  command = ['--mode=train', '--config=configs/polyp.py:cpu,plain', '--workdir=/w', '--config.seed=3',
             '--config.diffusion.stages=0:1000 eps steps=10', '--config.model.encoder.widths=(8, 16)']
  got = config_record.resolve(command)
  reference = polyp.get_config('cpu,plain')
  reference.seed = 3
  reference.diffusion.stages = '0:1000 eps steps=10'
  reference.model.encoder.widths = (8, 16)
  assert got['seed'] == 3 and got['diffusion.stages'] == '0:1000 eps steps=10'
  assert got['model.encoder.widths'] == [8, 16] and got['data.datasets'] == 'kvasir_seg'
  assert got['sampling.sampler'] == 'staged' and got['pretrain.encoder_mode'] == 'frozen'  # plain
  leaves = [(section, key) for section, value in reference.items() if hasattr(value, 'items') for key in value]
  assert len([k for k in got if k.count('.') >= 1]) >= len(leaves)
  for section, key in leaves:
    value = reference[section][key]
    if not hasattr(value, 'items'):
      assert got[f'{section}.{key}'] == (list(value) if isinstance(value, tuple) else value), (section, key)


def test_plain_token_changes_exactly_the_method_fields():
  changed = config_record.differences(config_record.flatten(default.get_config().to_dict()),
                                      config_record.flatten(default.get_config('plain').to_dict()))
  assert {d.split(':')[0] for d in changed} == {
      'pretrain.encoder_mode', 'pretrain.coarse_logits', 'model.self_condition', 'diffusion.stages',
      'loss.aux_weight', 'sampling.sampler', 'sampling.ddim_steps'}


def test_differences_leave_out_paths_and_for_phase0_the_phase1_fields():
  was = {'seed': 0, 'data.data_dir': '/a', 'pretrain.checkpoint': '/x', 'sampling.sampler': 'staged',
         'pretrain.num_steps': 1000}
  now = dict(was, **{'data.data_dir': '/b', 'pretrain.checkpoint': '/y', 'sampling.sampler': 'ddim'})
  assert config_record.differences(was, now) == ["sampling.sampler: 'staged' -> 'ddim'"]
  assert config_record.differences(was, now, phase0=True) == []
  now['pretrain.num_steps'] = 500
  assert config_record.differences(was, now, phase0=True) == ['pretrain.num_steps: 1000 -> 500']
  assert config_record.differences({'a': 1}, {}) == ["a: 1 -> '(absent)'"]


def test_a_bad_override_is_a_one_line_config_error():
  with pytest.raises(config_record.ConfigError, match='nope') as info:
    config_record.resolve(['--config=configs/synthetic.py', '--config.nope=1'])
  assert '\n' not in str(info.value)
  with pytest.raises(config_record.ConfigError, match='no --config='):
    config_record.resolve(['--workdir=/w'])


@pytest.mark.skipif(_head() is None, reason='needs a git checkout')
def test_staleness_compares_the_recorded_config_with_what_the_arm_resolves_to_now():
  stale = report.Staleness()

  def record(arm, **changes):
    config = config_record.resolve(run_lib.current_command('kvasir_seg', arm, 1))
    return {'arm': arm, 'dataset': 'kvasir_seg', 'seed': 1, 'commit': _head(), 'dirty': False,
            'config': dict(config, **changes)}

  assert stale.reason(record('anchored')) is None
  assert stale.reason(record('anchored', **{'data.pack_dir': '/elsewhere'})) is None  # a path
  why = stale.reason(record('anchored', **{'sampling.sampler': 'ddpm'}))
  assert "sampling.sampler: 'ddpm' -> 'staged'" in why  # the anchored arm pins the plain method's sampler
  assert "sampling.sampler: 'ddpm' -> 'ddim'" in stale.reason(record('default', **{'sampling.sampler': 'ddpm'}))
  assert stale.reason(record('segmenter', **{'sampling.sampler': 'ddpm'})) is None  # phase 0 never samples
  assert 'pretrain.num_steps' in stale.reason(record('segmenter', **{'pretrain.num_steps': 1}))
  assert 'no longer runs' in stale.reason(dict(record('anchored'), arm='unified_equal_steps'))
  no_config = {k: v for k, v in record('anchored').items() if k != 'config'}
  assert stale.reason(no_config) is None  # HEAD itself: neither unisegdiff_jax/ nor configs/ changed
