"""The errors a user can cause; main.py prints them as one line (`error: ...`) instead of a traceback."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
  from unisegdiff_jax import checkpointing, config_checks, diffusion, image_io, packs, train_state, weights  # pylint: disable=g-import-not-at-top
  found = [packs.PackError, diffusion.StageTableError, config_checks.ConfigError, train_state.NonFiniteError,
           checkpointing.CheckpointError, image_io.ImageReadError, weights.WeightLoadError]
  try:
    import data_prep  # pylint: disable=g-import-not-at-top  (needs TFDS; packs work without it)
    found += [data_prep.DatasetNotBuiltError, data_prep.BuildInputError]
  except ImportError:
    pass
  return tuple(found)


def __getattr__(name):
  if name == 'USER_ERRORS':
    return _user_errors()
  raise AttributeError(name)
