"""Shared fixtures. The tiny synthetic dataset is built once per session into a temporary data dir."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_configure(config):
  """The persistent compilation cache main.py uses, so tests and their main.py subprocesses share programs.

  Tests compile with most XLA optimisations off (`jax_disable_most_optimizations`, also in the environment so
  main.py subprocesses do the same): it cuts XLA's CPU compile time of the smoke programs by about a third
  (train step 20 -> 14 s, init 17 -> 7 s). Every comparison in the suite is between programs compiled the
  same way. JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment turns them back on.
  """
  del config
  os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_disable_most_optimizations', os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] == '1')
  from unisegdiff_jax import host  # pylint: disable=g-import-not-at-top
  host.use_compilation_cache(min_compile_time_secs=1.0)


def random_params(shapes, scale: float = 0.2):
  """Normal(0, scale) arrays of an abstract parameter tree (from jax.eval_shape: no init compile, and the
  zero-initialised output layers are live); the same values for the same tree every time."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(rs.normal(0.0, scale, x.shape).astype(x.dtype)), shapes)


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


@pytest.fixture
def inject_nonfinite(monkeypatch):
  """inject_nonfinite(k): the loss of optimiser step k (1-based) becomes NaN, in every phase's step built
  afterwards (fault injection for the non-finite policy; production steps have no such knob)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unisegdiff_jax import train_state  # pylint: disable=g-import-not-at-top
  real = train_state.apply_gradients

  def inject(bad_step: int):
    def faulty(state, loss_and_grads, optimizer, config, schedule):
      (loss, metrics), grads = loss_and_grads
      loss = loss * jnp.where(state.step + 1 == bad_step, jnp.nan, 1.0)
      return real(state, ((loss, metrics), grads), optimizer, config, schedule)
    monkeypatch.setattr(train_state, 'apply_gradients', faulty)
  return inject
