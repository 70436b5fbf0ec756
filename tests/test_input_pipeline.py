"""Dataset mixing proportions, per-process sharding, and the training transform."""

import collections

import ml_collections
import numpy as np
import pytest

from unisegdiff_jax import input_pipeline


def _source(tag, size):
  return [{'tag': tag, 'index': i} for i in range(size)]


def _tags(ds, count):
  return collections.Counter(ds[i]['tag'] for i in range(count))


def test_balanced_mixture_does_not_drown_the_small_dataset():
  ds = input_pipeline.mixed_dataset([_source('big', 1000), _source('small', 20)], [0.5, 0.5], seed=0)
  counts = _tags(ds, 2000)
  assert counts['big'] == counts['small'] == 1000
  # The small set repeats (it is seen 50 times) and every one of its cases is used.
  assert len({ds[i]['index'] for i in range(2000) if ds[i]['tag'] == 'small'}) == 20


def test_weighted_mixture_follows_the_weights():
  ds = input_pipeline.mixed_dataset([_source('a', 50), _source('b', 50), _source('c', 50)], [0.6, 0.3, 0.1],
                                    seed=1)
  counts = _tags(ds, 3000)
  for tag, share in (('a', 0.6), ('b', 0.3), ('c', 0.1)):
    assert abs(counts[tag] / 3000 - share) < 0.02


def test_processes_read_their_rows_of_the_same_global_batches(smoke_config):
  """Two processes' local batches, stacked, are exactly one process's global batches (images and masks,
  augmentation included): 1 and 2 processes train on the same data."""
  smoke_config.train.global_batch_size = 4
  one = input_pipeline.create_train_iterator(smoke_config, process_index=0, process_count=1)
  halves = [input_pipeline.create_train_iterator(smoke_config, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(3):
    whole = next(one)
    parts = [next(h) for h in halves]
    assert parts[0]['image'].shape[0] == 2
    for key in ('image', 'mask'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert not np.array_equal(parts[0]['image'], parts[1]['image'])  # the processes read different rows


def test_epochs_are_reshuffled_and_deterministic():
  ds = input_pipeline.mixed_dataset([_source('a', 30)], [1.0], seed=3)
  first, second = [ds[i]['index'] for i in range(30)], [ds[i]['index'] for i in range(30, 60)]
  assert sorted(first) == sorted(second) == list(range(30)) and first != second
  again = input_pipeline.mixed_dataset([_source('a', 30)], [1.0], seed=3)
  assert [again[i]['index'] for i in range(60)] == first + second


def test_mixture_weights_parse_and_validate():
  data = ml_collections.ConfigDict({'datasets': 'a, b', 'mixture_weights': ''})
  assert input_pipeline.mixture_weights(data) == [0.5, 0.5]
  data.mixture_weights = '3,1'
  assert input_pipeline.mixture_weights(data) == [0.75, 0.25]
  for bad in ('1', '1,-1', 'x,y'):
    data.mixture_weights = bad
    with pytest.raises(ValueError, match='mixture_weights'):
      input_pipeline.mixture_weights(data)


def test_train_transform_keeps_image_and_mask_aligned():
  image = np.zeros((40, 60, 3), np.uint8)
  image[10:20, 30:50] = 255
  mask = np.zeros((40, 60, 1), np.uint8)
  mask[10:20, 30:50] = 1
  transform = input_pipeline.TrainTransform(32, True, 10.0)
  for seed in range(5):
    out = transform.random_map({'image': image, 'mask': mask}, np.random.default_rng(seed))
    assert out['image'].shape == (32, 32, 3) and out['mask'].shape == (32, 32, 1)
    bright = out['image'][..., 0] > 0.5
    assert set(np.unique(out['mask'])) <= {0.0, 1.0}
    overlap = (bright & (out['mask'][..., 0] > 0)).sum() / max(bright.sum(), 1)
    assert overlap > 0.8
