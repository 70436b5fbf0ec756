"""Loading conditioning-encoder weights from local .npz / .safetensors files through a name map."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unisegdiff_jax import weights
from unisegdiff_jax.weights import WeightLoadError


@pytest.fixture(scope='module')
def params():
  from unisegdiff_jax.models.encoder import ConditioningEncoder  # pylint: disable=g-import-not-at-top
  model = ConditioningEncoder(widths=(8, 16, 16, 16), num_groups=4)
  # The real encoder's param tree (names, shapes, dtypes of model.init); jax.eval_shape + numpy values because
  # compiling the random initializers alone takes ~10 s on a shared CPU.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def _assert_same(a, b):
  fa, fb = weights.flatten_params(a), weights.flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    assert fa[name].dtype == fb[name].dtype, name
    np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def _single_line(err):
  message = str(err.value)
  assert '\n' not in message
  return message


def test_flatten_unflatten(params):
  flat = weights.flatten_params(params)
  assert 'stem/kernel' in flat and 'level_0_block_0/Conv_0/kernel' in flat
  assert all(isinstance(v, np.ndarray) for v in flat.values())
  _assert_same(weights.unflatten_params(flat), params)


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_round_trip(params, tmp_path, suffix):
  path = tmp_path / f'enc{suffix}'
  weights.save_encoder_weights(path, params)
  assert sorted(weights.read_weight_file(path)) == sorted(weights.flatten_params(params))
  loaded = weights.load_encoder_weights(path, params)
  _assert_same(loaded, params)
  # Shapes only (jax.eval_shape) are enough to load against.
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  _assert_same(weights.load_encoder_weights(str(path), shapes), params)


def test_casts_to_expected_dtype(params, tmp_path):
  path = tmp_path / 'enc.npz'
  weights.save_encoder_weights(path, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params))
  loaded = weights.flatten_params(weights.load_encoder_weights(path, params))
  assert all(v.dtype == np.float32 for v in loaded.values())


def _renamed(params):
  flat = weights.flatten_params(params)
  renamed = {'backbone.' + name.replace('/', '.'): value for name, value in flat.items()}
  mapping = {'backbone.' + name.replace('/', '.'): name for name in flat}
  return renamed, mapping


def _save_flat(path, flat):
  # Flat names with '.' only: save_encoder_weights flattens a nested dict, and a flat dict is a one-level tree.
  weights.save_encoder_weights(path, flat)


def test_name_map_round_trip(params, tmp_path):
  renamed, mapping = _renamed(params)
  renamed['backbone.fc.weight'] = np.zeros((16, 1000), np.float32)
  mapping['backbone.fc.weight'] = None  # explicitly ignored
  path = tmp_path / 'torchish.safetensors'
  _save_flat(path, renamed)
  assert 'backbone.stem.kernel' in weights.read_weight_file(path)
  map_path = tmp_path / 'map.json'
  map_path.write_text(json.dumps(mapping))
  _assert_same(weights.load_encoder_weights(path, params, map_path), params)

  # The same map as text: 'file_name model/path' per line, a lone name is ignored.
  txt = tmp_path / 'map.tsv'
  txt.write_text('# converted backbone\n' + ''.join(
      f'{k}\t{v}\n' if v else f'{k}\n' for k, v in mapping.items()))
  assert weights.read_name_map(txt) == {k: v or '' for k, v in mapping.items()}
  _assert_same(weights.load_encoder_weights(path, params, str(txt)), params)


def test_read_name_map_none():
  assert weights.read_name_map(None) is None
  assert weights.read_name_map('') is None


def test_unmapped_name_is_unexpected(params, tmp_path):
  renamed, mapping = _renamed(params)
  renamed['backbone.fc.weight'] = np.zeros((16, 1000), np.float32)
  path = tmp_path / 'w.npz'
  _save_flat(path, renamed)
  map_path = tmp_path / 'map.json'
  map_path.write_text(json.dumps(mapping))
  with pytest.raises(WeightLoadError) as err:
    weights.load_encoder_weights(path, params, map_path)
  message = _single_line(err)
  assert '1 unexpected' in message and 'backbone.fc.weight' in message and 'missing' not in message


def test_missing(params, tmp_path):
  flat = weights.flatten_params(params)
  dropped = sorted(n for n in flat if n.startswith('level_3'))
  assert len(dropped) > 5
  path = tmp_path / 'w.npz'
  weights.save_encoder_weights(path, weights.unflatten_params({k: v for k, v in flat.items() if k not in dropped}))
  with pytest.raises(WeightLoadError) as err:
    weights.load_encoder_weights(path, params)
  message = _single_line(err)
  assert f'{len(dropped)} missing' in message and dropped[0] in message
  assert f'(+{len(dropped) - 5} more)' in message
  # allow_missing keeps the expected (initialized) values...
  _assert_same(weights.load_encoder_weights(path, params, allow_missing=True), params)
  # ...which shapes alone cannot provide.
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  with pytest.raises(WeightLoadError, match='missing'):
    weights.load_encoder_weights(path, shapes, allow_missing=True)


def test_unexpected(params, tmp_path):
  flat = weights.flatten_params(params)
  flat['fc/weight'] = np.zeros((4, 4), np.float32)
  path = tmp_path / 'w.safetensors'
  weights.save_encoder_weights(path, weights.unflatten_params(flat))
  with pytest.raises(WeightLoadError) as err:
    weights.load_encoder_weights(path, params)
  message = _single_line(err)
  assert '1 unexpected (fc/weight)' in message and 'missing' not in message


def test_misshaped(params, tmp_path):
  flat = weights.flatten_params(params)
  model_shape = flat['stem/kernel'].shape
  flat['stem/kernel'] = np.zeros(model_shape[:2] + (1,) + model_shape[3:], np.float32)
  path = tmp_path / 'w.npz'
  weights.save_encoder_weights(path, weights.unflatten_params(flat))
  with pytest.raises(WeightLoadError) as err:
    weights.load_encoder_weights(path, params)
  message = _single_line(err)
  assert str(path) in message
  assert '1 mis-shaped (stem/kernel: file (3, 3, 1, 8) vs model (3, 3, 3, 8))' in message


def test_non_finite(params, tmp_path):
  flat = weights.flatten_params(params)
  flat['stem/bias'] = np.full_like(flat['stem/bias'], np.nan)
  path = tmp_path / 'w.npz'
  weights.save_encoder_weights(path, weights.unflatten_params(flat))
  with pytest.raises(WeightLoadError, match='stem/bias: non-finite'):
    weights.load_encoder_weights(path, params)


def test_file_errors(params, tmp_path):
  with pytest.raises(WeightLoadError, match='unsupported suffix') as err:
    weights.load_encoder_weights(tmp_path / 'w.pt', params)
  _single_line(err)
  with pytest.raises(WeightLoadError, match='no such file') as err:
    weights.load_encoder_weights(tmp_path / 'absent.safetensors', params)
  _single_line(err)
  for name in ('corrupt.npz', 'corrupt.safetensors'):
    bad = tmp_path / name
    bad.write_bytes(b'this is not\na weight file\n' * 3)
    with pytest.raises(WeightLoadError, match='cannot read weight file') as err:
      weights.load_encoder_weights(bad, params)
    _single_line(err)
  with pytest.raises(WeightLoadError, match='unsupported suffix'):
    weights.save_encoder_weights(tmp_path / 'w.h5', params)


def test_name_map_errors(params, tmp_path):
  path = tmp_path / 'w.npz'
  weights.save_encoder_weights(path, params)
  with pytest.raises(WeightLoadError, match='name map'):
    weights.load_encoder_weights(path, params, tmp_path / 'absent.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"a": ')
  with pytest.raises(WeightLoadError, match='invalid JSON') as err:
    weights.read_name_map(bad)
  _single_line(err)
  bad.write_text('["a"]')
  with pytest.raises(WeightLoadError, match='JSON object'):
    weights.read_name_map(bad)
  txt = tmp_path / 'bad.txt'
  txt.write_text('a b c\n')
  with pytest.raises(WeightLoadError, match='line 1'):
    weights.read_name_map(txt)
  # Two file names onto one model parameter.
  flat = weights.flatten_params(params)
  twice = {'x.' + k.replace('/', '.'): k for k in flat}
  twice['y.stem.kernel'] = 'stem/kernel'
  arrays = {'x.' + k.replace('/', '.'): v for k, v in flat.items()}
  arrays['y.stem.kernel'] = flat['stem/kernel']
  path = tmp_path / 'twice.npz'
  weights.save_encoder_weights(path, arrays)
  map_path = tmp_path / 'twice.json'
  map_path.write_text(json.dumps(twice))
  with pytest.raises(WeightLoadError, match='mapped twice'):
    weights.load_encoder_weights(path, params, map_path)
