"""Load conditioning-encoder weights from a local `.npz` / `.safetensors` file through an explicit name map.

This lets a user who converted an ImageNet backbone elsewhere start from it offline. Parameters are addressed by
'/'-joined paths of the flax param tree ('stem/kernel', 'level_0_block_0/Conv_0/kernel', ...). A name map (JSON
{"file_name": "model/path"} or a text file with 'file_name model/path' per line) renames the file's arrays to model
paths; a file name mapped to '' / null (or, in a text map, listed alone on its line) is explicitly ignored.

Arrays are loaded as stored: no layout conversion happens here (a PyTorch OIHW conv kernel must be transposed to
flax's HWIO before saving the file), so a layout mismatch surfaces as a mis-shaped parameter.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

SUFFIXES = ('.npz', '.safetensors')
_SHOWN = 5  # names listed per category in an error message before '(+N more)'


class WeightLoadError(ValueError):
  """A weight file / name map that cannot be read or does not fit the model; the message is a single line."""


def _one_line(text: Any) -> str:
  return ' '.join(str(text).split())


def _listing(items: list[str]) -> str:
  shown = ', '.join(items[:_SHOWN])
  if len(items) > _SHOWN:
    shown += f', ... (+{len(items) - _SHOWN} more)'
  return shown


def _shape(shape) -> str:
  return str(tuple(int(d) for d in shape))


# ----------------------------------------------------------------------------------------------- flatten / unflatten


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """Nested mapping -> {'a/b/c': leaf}, leaves kept as they are (arrays or jax.ShapeDtypeStruct)."""
  flat = {}
  for key, value in tree.items():
    key = str(key)
    if not key or '/' in key:
      raise ValueError(f'parameter name {key!r} under {prefix or "<root>"!r} is empty or contains "/"')
    name = f'{prefix}/{key}' if prefix else key
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name))
    else:
      flat[name] = value
  return flat


def flatten_params(tree: Mapping) -> dict[str, np.ndarray]:
  """Nested params (dict / FrozenDict) -> {'stem/kernel': np.ndarray, 'level_0_block_0/Conv_0/kernel': ...}."""
  return {name: np.asarray(value) for name, value in _flatten(tree).items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten_params`: {'a/b': x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for name, value in flat.items():
    parts = str(name).split('/')
    if any(not part for part in parts):
      raise ValueError(f'parameter name {name!r} has an empty path component')
    node = tree
    for depth, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ValueError(f'{name!r} lies under {"/".join(parts[:depth + 1])!r}, which is itself a parameter')
      node = child
    if parts[-1] in node:
      raise ValueError(f'{name!r} is both a parameter and a prefix of other parameters')
    node[parts[-1]] = value
  return tree


# -------------------------------------------------------------------------------------------------------- file I/O


def _suffix(path) -> str:
  return os.path.splitext(os.fspath(path))[1].lower()


def read_weight_file(path) -> dict[str, np.ndarray]:
  """Reads a `.npz` (np.load, no pickles) or `.safetensors` file into {name: np.ndarray}."""
  path = os.fspath(path)
  suffix = _suffix(path)
  if suffix not in SUFFIXES:
    raise WeightLoadError(f'cannot read weight file {path}: unsupported suffix {suffix or "(none)"!r} '
                          f'(expected {" or ".join(SUFFIXES)})')
  if not os.path.exists(path):
    raise WeightLoadError(f'cannot read weight file {path}: no such file')
  if not os.path.isfile(path):
    raise WeightLoadError(f'cannot read weight file {path}: not a regular file')
  try:
    if suffix == '.npz':
      with np.load(path, allow_pickle=False) as loaded:
        if not isinstance(loaded, Mapping) and not hasattr(loaded, 'files'):
          raise ValueError('not an .npz archive')
        arrays = {name: np.asarray(loaded[name]) for name in loaded.files}
    else:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      arrays = {name: np.asarray(value) for name, value in load_file(path).items()}
  except WeightLoadError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise WeightLoadError(f'cannot read weight file {path}: {type(e).__name__}: {_one_line(e)}') from e
  if not arrays:
    raise WeightLoadError(f'cannot read weight file {path}: it holds no arrays')
  return arrays


def _storable(value) -> np.ndarray:
  array = np.ascontiguousarray(np.asarray(value))
  if array.dtype.kind not in 'biuf':  # e.g. bfloat16 (ml_dtypes) has no portable on-disk form in both formats
    array = array.astype(np.float32)
  return array


def save_encoder_weights(path, params: Mapping) -> None:
  """Writes flatten_params(params) to a `.npz` or `.safetensors` file (atomically: temp file + rename)."""
  path = os.fspath(path)
  suffix = _suffix(path)
  if suffix not in SUFFIXES:
    raise WeightLoadError(f'cannot write weight file {path}: unsupported suffix {suffix or "(none)"!r} '
                          f'(expected {" or ".join(SUFFIXES)})')
  flat = {name: _storable(value) for name, value in flatten_params(params).items()}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp_weights_', suffix=suffix, dir=directory)
  os.close(fd)
  try:
    if suffix == '.npz':
      # Written member by member (not np.savez(**flat)) so any parameter name is fine, including 'file'.
      with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in flat.items():
          with archive.open(name + '.npy', 'w', force_zip64=True) as member:
            np.lib.format.write_array(member, array, allow_pickle=False)
    else:
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      save_file(flat, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# -------------------------------------------------------------------------------------------------------- name map


def read_name_map(path_or_none) -> dict[str, str] | None:
  """Reads a name map {file_name: model/path}; '' / None -> None (identity mapping).

  JSON (`.json`, or any file whose content starts with '{'): an object of strings; a null or '' value ignores that
  file name. Otherwise text: one 'file_name model/path' per line (whitespace separated, '#' comments and blank lines
  skipped); a line holding only a file name ignores that name. Ignored names map to ''.
  """
  if path_or_none is None or os.fspath(path_or_none) == '':
    return None
  path = os.fspath(path_or_none)
  if not os.path.isfile(path):
    raise WeightLoadError(f'cannot read name map {path}: no such file')
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise WeightLoadError(f'cannot read name map {path}: {type(e).__name__}: {_one_line(e)}') from e

  mapping: dict[str, str] = {}
  if _suffix(path) == '.json' or text.lstrip().startswith('{'):
    try:
      raw = json.loads(text)
    except json.JSONDecodeError as e:
      raise WeightLoadError(f'cannot read name map {path}: invalid JSON: {_one_line(e)}') from e
    if not isinstance(raw, dict):
      raise WeightLoadError(f'cannot read name map {path}: expected a JSON object {{"file_name": "model/path"}}, '
                            f'got {type(raw).__name__}')
    for key, value in raw.items():
      if value is not None and not isinstance(value, str):
        raise WeightLoadError(f'cannot read name map {path}: the value for {key!r} must be a string or null, '
                              f'got {_one_line(json.dumps(value))}')
      mapping[key] = value or ''
    return mapping

  for number, line in enumerate(text.splitlines(), start=1):
    line = line.split('#', 1)[0].strip()
    if not line:
      continue
    fields = line.split()
    if len(fields) > 2:
      raise WeightLoadError(f'cannot read name map {path}: line {number} has {len(fields)} fields, '
                            f'expected "file_name model/path"')
    if fields[0] in mapping:
      raise WeightLoadError(f'cannot read name map {path}: line {number} maps {fields[0]!r} a second time')
    mapping[fields[0]] = fields[1] if len(fields) == 2 else ''
  return mapping


# ------------------------------------------------------------------------------------------------------------ load


def _is_array(value) -> bool:
  return hasattr(value, 'shape') and hasattr(value, 'dtype') and hasattr(value, '__array__')


def _rebuild(expected: Mapping, values: dict[str, Any], prefix: str = '') -> dict:
  out = {}
  for key, value in expected.items():
    name = f'{prefix}/{key}' if prefix else str(key)
    out[key] = _rebuild(value, values, name) if isinstance(value, Mapping) else values[name]
  return out


def load_encoder_weights(path, expected: Mapping, name_map_path=None, *, allow_missing: bool = False) -> dict:
  """Returns params shaped like `expected` (nested encoder params: arrays or jax.ShapeDtypeStruct) from a file.

  Each file array is renamed through the name map (if any), checked against the expected shape and cast to the
  expected dtype. Raises WeightLoadError (one line) listing missing / unexpected / mis-shaped parameters. With
  allow_missing=True, parameters absent from the file keep expected's own values (expected must hold arrays then).
  """
  where = os.fspath(path)
  flat_expected = _flatten(expected)
  arrays = read_weight_file(path)
  name_map = read_name_map(name_map_path)

  by_model: dict[str, tuple[str, np.ndarray]] = {}  # model name -> (file name, array)
  unexpected, conflicting = [], []
  for file_name, array in arrays.items():
    if name_map is None:
      model_name = file_name
    elif file_name not in name_map:
      unexpected.append(f'{file_name} (not in the name map)')
      continue
    else:
      model_name = name_map[file_name]
      if not model_name:
        continue  # explicitly ignored
    if model_name not in flat_expected:
      unexpected.append(file_name if model_name == file_name else f'{file_name}->{model_name}')
    elif model_name in by_model:
      conflicting.append(f'{model_name} <- {by_model[model_name][0]} and {file_name}')
    else:
      by_model[model_name] = (file_name, array)

  missing = [name for name in flat_expected if name not in by_model]
  misshaped, bad_values, loaded = [], [], {}
  for model_name, (file_name, array) in by_model.items():
    target = flat_expected[model_name]
    label = model_name if model_name == file_name else f'{model_name} ({file_name})'
    if tuple(array.shape) != tuple(target.shape):
      misshaped.append(f'{label}: file {_shape(array.shape)} vs model {_shape(target.shape)}')
      continue
    if array.dtype.kind not in 'biuf' and array.dtype.name not in ('bfloat16', 'float8_e4m3fn', 'float8_e5m2'):
      bad_values.append(f'{label}: dtype {array.dtype}')
      continue
    value = np.asarray(array).astype(np.dtype(target.dtype), copy=False)
    if not np.all(np.isfinite(value.astype(np.float32, copy=False))):
      bad_values.append(f'{label}: non-finite values')
      continue
    loaded[model_name] = value

  problems = []
  keep_missing = allow_missing and all(_is_array(flat_expected[name]) for name in missing)
  if missing and not keep_missing:
    hint = ' [allow_missing needs initialized arrays in expected, not shapes]' if allow_missing else ''
    problems.append(f'{len(missing)} missing ({_listing(missing)}){hint}')
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected ({_listing(unexpected)})')
  if conflicting:
    problems.append(f'{len(conflicting)} mapped twice ({_listing(conflicting)})')
  if misshaped:
    problems.append(f'{len(misshaped)} mis-shaped ({_listing(misshaped)})')
  if bad_values:
    problems.append(f'{len(bad_values)} unusable ({_listing(bad_values)})')
  if problems:
    raise WeightLoadError(_one_line(f'cannot load {where} into the encoder: ' + ', '.join(problems)))

  for name in missing:
    loaded[name] = flat_expected[name]
  result = _rebuild(expected, loaded)
  try:
    from flax.core import FrozenDict  # pylint: disable=g-import-not-at-top
    if isinstance(expected, FrozenDict):
      return FrozenDict(result)
  except ImportError:  # pragma: no cover
    pass
  return result
