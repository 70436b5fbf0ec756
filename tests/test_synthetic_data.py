"""synthetic_lesions: generator properties and the tiny TFDS build / data_source round trip."""
import collections

import numpy as np
import pytest
from scipy import ndimage

from data_prep.synthetic_lesions.generate import (MAX_AREA, MAX_SIZE, MIN_AREA, MIN_SIZE, ORGANS,
                                                  best_global_threshold_dice, generate_example,
                                                  split_seed)

N = 60


@pytest.fixture(scope='module')
def examples():
  return [generate_example(s) for s in range(N)]


def test_deterministic():
  a, b = generate_example(7), generate_example(7)
  assert np.array_equal(a['image'], b['image']) and np.array_equal(a['mask'], b['mask'])
  assert a['modality'] == b['modality']
  c = generate_example(8)
  assert a['image'].shape != c['image'].shape or not np.array_equal(a['image'], c['image'])


def test_split_seeds_disjoint():
  seeds = {split_seed(s, i) for s in ('train', 'val', 'test') for i in range(1200)}
  assert len(seeds) == 3600


def test_shapes_dtypes_masks(examples):
  sizes = set()
  for ex in examples:
    img, m = ex['image'], ex['mask']
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert m.dtype == np.uint8 and m.shape == img.shape[:2]
    h, w = m.shape
    assert MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE
    sizes.add((h, w))
    assert set(np.unique(m)) <= {0, 1} and m.any()
    assert MIN_AREA - 0.01 <= m.mean() <= MAX_AREA + 0.01
    assert ex['organ'] == ORGANS[ex['modality']]
  assert len(sizes) > N // 2  # sizes vary
  assert any(h != w for h, w in sizes)


def test_three_modalities(examples):
  counts = collections.Counter(ex['modality'] for ex in examples)
  assert set(counts) == {'dermoscopy', 'ultrasound', 'endoscopy'}
  assert min(counts.values()) >= N // 6
  grey = [ex for ex in examples if ex['modality'] == 'ultrasound']
  assert all(np.array_equal(e['image'][..., 0], e['image'][..., 1]) for e in grey)


def test_not_separable_by_global_threshold(examples):
  dice = np.array([best_global_threshold_dice(ex['image'], ex['mask']) for ex in examples])
  assert dice.mean() < 0.8, dice.mean()


def test_best_global_threshold_dice_is_exact_on_trivial_image():
  m = np.zeros((10, 10), np.uint8)
  m[2:5, 2:5] = 1
  img = np.repeat((m * 200 + 20)[..., None], 3, axis=-1).astype(np.uint8)
  assert best_global_threshold_dice(img, m) == pytest.approx(1.0)
  assert best_global_threshold_dice(255 - img, m) == pytest.approx(1.0)


def test_lesion_locally_visible(examples):
  # Mean colour just inside vs just outside the boundary differs in every image.
  for ex in examples:
    m = ex['mask'].astype(bool)
    ring = ndimage.binary_dilation(m, iterations=5) & ~m
    inner = m & ~ndimage.binary_erosion(m, iterations=5)
    im = ex['image'].astype(np.float64)
    assert np.linalg.norm(im[inner].mean(0) - im[ring].mean(0)) > 6


def test_tiny_build_and_data_source_round_trip(tmp_path, capsys):
  import tensorflow_datasets as tfds
  import data_prep

  data_dir = str(tmp_path / 'tfds')
  assert not data_prep.is_built('synthetic_lesions/tiny', data_dir)
  builder = data_prep.ensure_built('synthetic_lesions/tiny', data_dir)
  out = capsys.readouterr().out
  assert out.count('\n') == 1 and 'synthetic_lesions/tiny' in out
  assert data_prep.is_built('synthetic_lesions/tiny', data_dir)
  assert builder.info.file_format.value == 'array_record'
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'val', 'test')} == \
      {'train': 32, 'val': 8, 'test': 8}
  data_prep.ensure_built('synthetic_lesions/tiny', data_dir)  # second call: no rebuild message
  assert capsys.readouterr().out == ''

  src = tfds.data_source('synthetic_lesions/tiny', data_dir=data_dir, split='train')
  assert len(src) == 32
  seen = set()
  for i in range(len(src)):
    ex = src[i]
    cid = ex['case_id'].decode()
    seen.add(cid)
    assert cid.startswith('train_')
    ref = generate_example(split_seed('train', int(cid.split('_')[1])))
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == ref['image'].shape
    assert ex['mask'].dtype == np.uint8 and ex['mask'].shape == ref['mask'].shape + (1,)
    assert np.array_equal(ex['image'], ref['image'])  # PNG: lossless
    assert np.array_equal(ex['mask'][..., 0], ref['mask'])
    assert set(np.unique(ex['mask'])) <= {0, 1}
    assert ex['dataset'] == b'synthetic_lesions'
    assert ex['modality'].decode() == ref['modality'] and ex['organ'].decode() == ref['organ']
  assert seen == {f'train_{i:05d}' for i in range(32)}
  val = builder.as_data_source(split='val')
  assert len(val) == 8 and val[0]['case_id'].decode().startswith('val_')
