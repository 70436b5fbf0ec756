"""Config files: every one accepts `smoke`, presets select stage tables, overrides apply and typos fail."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from tests.conftest import ROOT
from unisegdiff_jax import diffusion
from unisegdiff_jax import train

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                      if not os.path.basename(p).startswith('_'))


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg_' + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_accepts_smoke_and_validates(path):
  config = _load(path, 'smoke')
  train.validate_config(config, num_devices=1)
  assert config.train.num_steps <= 50 and config.data.image_size <= 64


@pytest.mark.parametrize('preset', sorted(diffusion.STAGE_PRESETS))
def test_stage_presets_by_argument(preset):
  config = _load(os.path.join(ROOT, 'configs', 'synthetic.py'), f'smoke,{preset}')
  stages = diffusion.from_config(config.diffusion).stages
  assert stages == diffusion.parse_stage_table(diffusion.STAGE_PRESETS[preset], 1000)


def test_unknown_argument_is_refused():
  with pytest.raises(ValueError, match="unknown config argument 'smok'"):
    _load(os.path.join(ROOT, 'configs', 'synthetic.py'), 'smok')


_PARSE_SCRIPT = r"""
import json, sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file('config', None, 'config', lock_config=True)
flags.FLAGS(sys.argv)
print(flags.FLAGS.config.to_json())
"""


def _parse(*argv):
  """Parses argv exactly as main.py does (absl's global flags, so in a fresh interpreter)."""
  out = subprocess.run([sys.executable, '-c', _PARSE_SCRIPT, *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  if out.returncode != 0:
    raise ValueError(out.stderr.strip().splitlines()[-1])
  return ml_collections.ConfigDict(json.loads(out.stdout))


def test_command_line_overrides_apply():
  config = _parse('--config=configs/synthetic.py:smoke', '--config.diffusion.stages=eps_only',
                  '--config.train.num_steps=7', '--config.model.denoiser.channel_mult=(1,2,2,4)')
  assert config.train.num_steps == 7
  assert tuple(config.model.denoiser.channel_mult) == (1, 2, 2, 4)
  assert [s.target for s in diffusion.from_config(config.diffusion).stages] == ['eps']


def test_unknown_override_key_fails():
  with pytest.raises(ValueError, match='num_stepz'):
    _parse('--config=configs/synthetic.py:smoke', '--config.train.num_stepz=7')
