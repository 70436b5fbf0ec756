"""Process-level setup shared by main.py, the benchmark, the attention analysis and the tests: the persistent
compilation cache and TensorFlow kept off the accelerators."""

import importlib.util
import os

import jax


def compilation_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR, else ~/.cache/unisegdiff_jax/jax."""
  return os.environ.get('JAX_COMPILATION_CACHE_DIR',
                        os.path.join(os.path.expanduser('~'), '.cache', 'unisegdiff_jax', 'jax'))


def use_compilation_cache(min_compile_time_secs: float = 2.0) -> None:
  """Programs that took at least `min_compile_time_secs` to compile are kept on disk for the next process."""
  jax.config.update('jax_compilation_cache_dir', compilation_cache_dir())
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_time_secs)


def keep_tensorflow_off_accelerators() -> None:
  """Training imports no TensorFlow (TFDS data sources and writers.TensorBoardWriter need none). On an
  accelerator machine with TensorFlow installed, something still may (clu's writer for a gs:// workdir, a
  TFDS build): hide the GPUs / TPUs from it first so that it never takes device memory. Free on CPU hosts."""
  if jax.default_backend() == 'cpu' or not importlib.util.find_spec('tensorflow'):
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    if tf.config.list_physical_devices(kind):
      tf.config.set_visible_devices([], kind)
