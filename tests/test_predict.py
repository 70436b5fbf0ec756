"""--mode=predict on image files and --mode=sweep, against a tiny saved checkpoint (random weights)."""

import csv
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(data_dir):
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config('smoke')
  config.data.data_dir = data_dir
  config.data.image_size = 16
  config.data.max_eval_examples = 3
  config.model.encoder.widths = (8,)
  config.model.denoiser.channel_mult = (1,)
  config.model.denoiser.attention_levels = ()
  config.diffusion.stages = '500:1000 x0 steps=1; 0:500 eps steps=2'
  config.sampling.batch_size = 4
  return config


def _random_state(abstract, seed):
  """A TrainState with random float leaves (no init compile: that costs ~10 s on a small CPU)."""
  rs = np.random.RandomState(seed)
  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(rs.normal(0.0, 0.2, x.shape).astype(x.dtype))
    return jnp.zeros(x.shape, x.dtype)
  return jax.tree_util.tree_map(fill, abstract)


@pytest.fixture(scope='session')
def checkpoint(tiny_data_dir, tmp_path_factory):
  """A workdir with checkpoints at steps 5 (best by val_dice) and 8; returns (workdir, data_dir)."""
  from unisegdiff_jax import checkpointing, phases, train, train_state  # pylint: disable=g-import-not-at-top
  config = _tiny_config(tiny_data_dir)
  process = train.validate_config(config)
  model, optimizer, _ = phases.diffusion_parts(config, process)  # the phase-1 state, as training saves it
  abstract = jax.eval_shape(
      lambda: train_state.create_train_state(model, config, optimizer, jax.random.PRNGKey(0)))
  workdir = str(tmp_path_factory.mktemp('predict_workdir'))
  manager = checkpointing.create_manager(os.path.join(workdir, 'checkpoints'), keep=2, async_save=False)
  for step, dice, seed in ((5, 0.3, 0), (8, 0.1, 1)):
    state = _random_state(abstract, seed).replace(step=jnp.asarray(step, jnp.int32))
    checkpointing.save(manager, step, state, None, {checkpointing.BEST_METRIC: dice}, wait=True)
  manager.close()
  return workdir


@pytest.fixture
def config(tiny_data_dir):
  return _tiny_config(tiny_data_dir)


def _write_inputs(folder):
  os.makedirs(folder, exist_ok=True)
  rs = np.random.RandomState(0)
  Image.fromarray((rs.rand(37, 53) * 255).astype(np.uint8), 'L').save(os.path.join(folder, 'grey_case.png'))
  Image.fromarray((rs.rand(48, 64, 3) * 255).astype(np.uint8), 'RGB').save(os.path.join(folder, 'rgb_case.jpg'))
  with open(os.path.join(folder, 'rgb_case.jpg'), 'rb') as f:
    data = f.read()
  with open(os.path.join(folder, 'broken.jpg'), 'wb') as f:
    f.write(data[:len(data) // 2])  # truncated JPEG
  with open(os.path.join(folder, 'notes.png'), 'w') as f:
    f.write('this is not an image\n')
  return {'grey_case': (37, 53), 'rgb_case': (48, 64)}


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_predict_folder_writes_native_size_outputs_and_reports_bad_files(config, checkpoint, tmp_path, capsys):
  from unisegdiff_jax import predict  # pylint: disable=g-import-not-at-top
  inputs = str(tmp_path / 'in')
  sizes = _write_inputs(inputs)
  out = str(tmp_path / 'out')
  err = io.StringIO()
  status = predict.run_predict(config, checkpoint, inputs, out, progress=False, stderr=err)
  assert status == 1
  lines = err.getvalue().strip().splitlines()
  assert len(lines) == 2, lines
  assert lines[0].startswith(f"skipped {os.path.join(inputs, 'broken.jpg')}: ")
  assert lines[1].startswith(f"skipped {os.path.join(inputs, 'notes.png')}: ")
  assert 'checkpoint step 5' in capsys.readouterr().out  # best by validation Dice

  rows = _read_csv(os.path.join(out, 'predictions.csv'))
  assert [r['name'] for r in rows] == ['grey_case', 'rgb_case']
  assert list(rows[0]) == list(predict.CSV_FIELDS)
  for row in rows:
    height, width = sizes[row['name']]
    assert (int(row['height']), int(row['width'])) == (height, width)
    arrays = {}
    for suffix in predict.OUTPUT_SUFFIXES:
      image = Image.open(os.path.join(out, row['name'] + suffix))
      assert image.size == (width, height), suffix
      arrays[suffix] = np.asarray(image)
    assert set(np.unique(arrays['_mask.png'])) <= {0, 255}
    assert arrays['_overlay.png'].shape == (height, width, 3)
    mask = arrays['_mask.png'] > 0
    assert float(row['lesion_area_fraction']) == pytest.approx(mask.mean(), abs=1e-6)
    np.testing.assert_array_equal(mask, arrays['_prob.png'] >= 128)  # threshold 0.5, round(p * 255)
    # A single sample: uncertainty is the binary entropy of the probability.
    from unisegdiff_jax import ensemble  # pylint: disable=g-import-not-at-top
    entropy = ensemble.binary_entropy(arrays['_prob.png'] / 255.0)
    assert np.abs(arrays['_uncertainty.png'] / 255.0 - entropy).max() < 0.05
    assert float(row['mean_uncertainty']) == pytest.approx(arrays['_uncertainty.png'].mean() / 255, abs=0.01)
    assert float(row['seconds']) > 0
  assert not any(name.startswith(('broken', 'notes')) for name in os.listdir(out))


def test_predict_with_a_ddpm_ensemble(config, checkpoint, tmp_path):
  from unisegdiff_jax import predict  # pylint: disable=g-import-not-at-top
  image_path = str(tmp_path / 'one.bmp')
  Image.fromarray((np.random.RandomState(3).rand(21, 30, 3) * 255).astype(np.uint8)).save(image_path)
  with config.unlocked():  # the fields exist once configs/default.py gains them; .get() defaults until then
    config.sampling.sampler = 'ddpm'
    config.sampling.ddpm_steps = 3
    config.sampling.ensemble_size = 3
    config.sampling.fusion = 'vote'
  out = str(tmp_path / 'out')
  assert predict.run_predict(config, checkpoint, image_path, out, progress=False) == 0
  rows = _read_csv(os.path.join(out, 'predictions.csv'))
  assert len(rows) == 1 and rows[0]['name'] == 'one'
  prob = np.asarray(Image.open(os.path.join(out, 'one_prob.png')))
  assert prob.shape == (21, 30)
  uncertainty = np.asarray(Image.open(os.path.join(out, 'one_uncertainty.png')))
  assert uncertainty.shape == (21, 30) and uncertainty.max() <= 255
  # The same members by hand (the image's own key, from the seed and its name), fused by hand.
  from unisegdiff_jax import ensemble, evaluate, image_io, input_pipeline, phases  # pylint: disable=g-import-not-at-top
  process, settings = predict.validate(config)
  model, params, _ = predict.restore_params(config, checkpoint, None, process)
  members_fn = jax.jit(phases.diffusion_members(model, process, settings)[0])
  images = np.zeros((config.sampling.batch_size, 16, 16, 3), np.float32)
  images[0] = input_pipeline.resize_image(image_io.read_image(image_path), 16)
  keys = ensemble.case_keys(jax.random.PRNGKey(config.seed), ['one'], config.sampling.batch_size)
  members = np.asarray(members_fn(params, images, keys))[:, 0, ..., 0]  # [K, 16, 16]
  assert np.abs(members[0] - members[1]).max() > 1e-3  # the members differ
  vote = (members >= 0.5).mean(axis=0)
  expected_prob = np.clip(evaluate.resize_probability(vote, 21, 30), 0, 1)
  assert np.abs(prob / 255.0 - expected_prob).max() <= 1 / 255 + 1e-6
  expected_unc = np.clip(evaluate.resize_probability(np.clip(2 * members.std(axis=0), 0, 1), 21, 30), 0, 1)
  assert np.abs(uncertainty / 255.0 - expected_unc).max() <= 1 / 255 + 1e-6
  mask = np.asarray(Image.open(os.path.join(out, 'one_mask.png'))) > 0
  np.testing.assert_array_equal(mask, expected_prob >= 0.5)


def test_predict_errors_that_stop_everything(config, checkpoint, tmp_path):
  from unisegdiff_jax import checkpointing, image_io, predict, train  # pylint: disable=g-import-not-at-top
  with pytest.raises(image_io.ImageReadError, match='no such file'):
    predict.run_predict(config, checkpoint, str(tmp_path / 'missing'), str(tmp_path / 'o'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(image_io.ImageReadError, match='no files'):
    predict.run_predict(config, checkpoint, str(tmp_path / 'empty'), str(tmp_path / 'o'))
  _write_inputs(str(tmp_path / 'in'))
  with pytest.raises(checkpointing.CheckpointError, match='no checkpoint step 99'):
    predict.run_predict(config, checkpoint, str(tmp_path / 'in'), str(tmp_path / 'o'), checkpoint_step=99)
  with pytest.raises(checkpointing.CheckpointError, match='no checkpoint'):
    predict.run_predict(config, str(tmp_path), str(tmp_path / 'in'), str(tmp_path / 'o'))
  with config.unlocked():
    config.sampling.fusion = 'median'
  with pytest.raises(train.ConfigError, match='fusion'):
    predict.run_predict(config, checkpoint, str(tmp_path / 'in'), str(tmp_path / 'o'))


def test_output_names_keep_duplicates_apart(tmp_path):
  from unisegdiff_jax import predict  # pylint: disable=g-import-not-at-top
  assert predict.output_names(['/a/x.png', '/a/x.jpg', '/a/y.tif']) == ['x_png', 'x_jpg', 'y']
  folder = tmp_path / 'f'
  folder.mkdir()
  for name in ('b.png', 'a.jpg', '.hidden.png', 'a_mask.png', 'predictions.csv'):
    (folder / name).write_bytes(b'x')
  (folder / 'sub').mkdir()
  listed = [os.path.basename(p) for p in predict.list_inputs(str(folder), str(folder))]
  assert listed == ['a.jpg', 'b.png']  # outputs of a run into the same folder are left out
  assert len(predict.list_inputs(str(folder), str(tmp_path / 'elsewhere'))) == 4


def test_sweep_spec_parsing():
  from unisegdiff_jax import sweep, train  # pylint: disable=g-import-not-at-top
  assert sweep.parse_spec('staged, ddim:5,ddpm:50') == [('staged', None), ('ddim', 5), ('ddpm', 50)]
  for bad in ('', 'euler:3', 'ddim', 'ddim:x', 'staged:4', 'ddpm:0'):
    with pytest.raises(train.ConfigError):
      sweep.parse_spec(bad)
  assert sweep.parse_sizes('1,3,5') == [1, 3, 5] and sweep.parse_sizes(None) == [1]
  with pytest.raises(train.ConfigError):
    sweep.parse_sizes('1,0')


def test_sweep_writes_table_csv_and_plot(config, checkpoint, tmp_path):
  from unisegdiff_jax import sweep  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'sweep')
  rows = sweep.run_sweep(config, checkpoint, spec='ddpm:2', ensemble_sizes='1,2', out_dir=out)
  assert [(r['sampler'], r['ensemble_size'], r['nfe_per_image']) for r in rows] == [('ddpm:2', 1, 2),
                                                                                       ('ddpm:2', 2, 4)]
  for r in rows:
    assert 0.0 <= r['dice'] <= 1.0 and 0.0 <= r['ece'] <= 1.0 and r['seconds_per_image'] > 0
    assert r['checkpoint_step'] == 5 and r['split'] == 'test'
  assert len(_read_csv(os.path.join(out, 'sweep.csv'))) == 2
  table = open(os.path.join(out, 'sweep.md')).read().splitlines()
  assert table[0].startswith('| sampler | NFE per image | ensemble | Dice | IoU | HD95 | ECE | seconds/image |')
  assert len(table) == 2 + 2 and '| ddpm:2 | 4 | 2 (mean) |' in table[3]
  assert Image.open(os.path.join(out, 'dice_vs_nfe.png')).size[0] > 100


def test_main_predict_subprocess(checkpoint, tiny_data_dir, tmp_path):
  image_path = str(tmp_path / 'scan.png')
  Image.fromarray((np.random.RandomState(4).rand(25, 19) * 255).astype(np.uint8)).save(image_path)
  out = str(tmp_path / 'out')
  overrides = ['--config.data.image_size=16', '--config.model.encoder.widths=(8,)',
               '--config.model.denoiser.channel_mult=(1,)', '--config.model.denoiser.attention_levels=()',
               "--config.diffusion.stages=500:1000 x0 steps=1; 0:500 eps steps=2",
               '--config.sampling.batch_size=4', f'--config.data.data_dir={tiny_data_dir}']
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'), JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, 'main.py', '--mode=predict', '--config=configs/synthetic.py:smoke',
       f'--workdir={checkpoint}', f'--input={image_path}', f'--output={out}', '--checkpoint_step=8',
       *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'checkpoint step 8' in result.stdout
  assert sorted(os.listdir(out)) == sorted(['predictions.csv'] + ['scan' + s for s in
                                                                  ('_mask.png', '_prob.png', '_uncertainty.png',
                                                                   '_overlay.png')])
