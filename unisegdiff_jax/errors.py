"""The errors a user can cause; main.py prints them as one line (`error: ...`) instead of a traceback."""

from __future__ import annotations


def _user_errors() -> tuple[type[BaseException], ...]:
  import data_prep  # pylint: disable=g-import-not-at-top
  from unisegdiff_jax import checkpointing, diffusion, image_io, train, weights  # pylint: disable=g-import-not-at-top
  found = [diffusion.StageTableError, train.ConfigError, train.NonFiniteError, checkpointing.CheckpointError,
           image_io.ImageReadError, weights.WeightLoadError]
  for name in ('DatasetNotBuiltError', 'BuildInputError'):
    if hasattr(data_prep, name):
      found.append(getattr(data_prep, name))
  return tuple(found)


def __getattr__(name):
  if name == 'USER_ERRORS':
    return _user_errors()
  raise AttributeError(name)
