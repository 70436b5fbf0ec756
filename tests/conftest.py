"""Shared fixtures. The tiny synthetic dataset is built once per session into a temporary data dir."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


# XLA:CPU compile options for the tests (and their main.py subprocesses, through XLA_FLAGS): the classic
# emitters instead of the fusion emitters and one LLVM module per program. On the 2-core machine they halve the
# smoke train step's compile (9.7-10.1 s -> 4.6-5.1 s) and run it faster (0.24 -> 0.17 s), same loss.
FAST_COMPILE_XLA_FLAGS = ('--xla_cpu_use_fusion_emitters=false', '--xla_cpu_parallel_codegen_split_count=1')


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a test's subprocess: this session's flags plus `extra` (e.g. a forced device count)."""
  return ' '.join([os.environ.get('XLA_FLAGS', ''), *extra]).strip()


def _use_fast_compile_flags() -> None:
  """Adds FAST_COMPILE_XLA_FLAGS to XLA_FLAGS once (xdist workers inherit it) if this jaxlib accepts them (an
  unknown XLA flag aborts the process, so a one-line subprocess checks first). Not with
  JAX_DISABLE_MOST_OPTIMIZATIONS=0 (the tests then compile as production does)."""
  if (FAST_COMPILE_XLA_FLAGS[0] in os.environ.get('XLA_FLAGS', '')
      or os.environ.get('JAX_DISABLE_MOST_OPTIMIZATIONS') == '0'):
    return
  import subprocess  # pylint: disable=g-import-not-at-top
  flags = xla_flags(*FAST_COMPILE_XLA_FLAGS)
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True,
                         env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu'), timeout=120)
  if probe.returncode == 0:
    os.environ['XLA_FLAGS'] = flags


def pytest_configure(config):
  """The persistent compilation cache main.py uses, so tests and their main.py subprocesses share programs.

  Tests compile with most XLA optimisations off (`jax_disable_most_optimizations`, also in the environment so
  main.py subprocesses do the same): it cuts XLA's CPU compile time of the smoke programs by about a third
  (train step 20 -> 14 s, init 17 -> 7 s). Every comparison in the suite is between programs compiled the
  same way. JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment turns them back on.
  """
  del config
  _use_fast_compile_flags()  # before anything initialises XLA in this process
  os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_disable_most_optimizations', os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] == '1')
  from unisegdiff_jax import host  # pylint: disable=g-import-not-at-top
  host.use_compilation_cache(min_compile_time_secs=1.0)


# Files by measured duration (seconds in a quiet run), longest first; the rest keep their order after them.
# Each of the two workers takes the next file when it is nearly done with its own (pyproject.toml turns off
# xdist's reordering by number of tests), so the long ones start early and the short ones fill in at the end.
_LONGEST_FIRST = ('test_reliability.py',  # 93
                  'test_main.py',  # 85
                  'test_train.py',  # 71
                  'test_multihost.py',  # 66
                  'test_benchmarks.py',  # 49
                  'test_losses_and_models.py',  # 25
                  'test_pretrain.py',  # 23
                  'test_ensemble.py',  # 18
                  'test_attention.py',  # 17
                  'test_predict.py',  # 15
                  'test_runner.py',  # 15
                  'test_engine.py',  # 10
                  'test_input_pipeline.py')  # 8


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable: order kept


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
