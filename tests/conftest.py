"""Shared fixtures. The tiny synthetic dataset is built once per session into a temporary data dir."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  import data_prep  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data_prep.ensure_built('synthetic_lesions/tiny', data_dir)
  return data_dir


@pytest.fixture
def smoke_config(tiny_data_dir):
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config('smoke')
  config.data.data_dir = tiny_data_dir
  return config
