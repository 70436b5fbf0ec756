"""Resized data packs: raw and JPEG round trips against the records they were made from."""

import numpy as np
import pytest

from unisegdiff_jax import packs


def _records(count=3, size=40):
  rs = np.random.RandomState(0)
  out = []
  for i in range(count):
    image = np.zeros((size + i, size, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]  # smooth: JPEG keeps it close
    image[..., 1] = 90 + 30 * i
    mask = np.zeros((size + i, size, 1), np.uint8)
    top, left = rs.randint(0, 20, size=2)
    mask[top:top + 10, left:left + 12] = 1
    out.append({'image': image, 'mask': mask, 'case_id': f'case{i}'.encode()})
  return out


@pytest.mark.parametrize('image_format,tolerance', [('raw', 0), ('jpeg', 6)])
def test_pack_round_trip(tmp_path, image_format, tolerance):
  records = _records()
  path = packs.pack_path(str(tmp_path), 'set/variant', 'train')
  assert packs.write_pack(path, iter(records), 16, image_format) == 3
  assert path.endswith('set__variant/train.npz')
  source = packs.PackSource(path, 16)
  assert len(source) == 3
  for record, got in zip(records, (source[i] for i in range(3))):
    expected = packs.resize_record_image(record['image'], 16)  # the resize the pipeline does
    assert got['image'].shape == (16, 16, 3) and got['image'].dtype == np.uint8
    assert np.abs(got['image'].astype(int) - expected.astype(int)).max() <= tolerance
    np.testing.assert_array_equal(got['mask'], record['mask'])  # native resolution, lossless
    assert got['case_id'] == record['case_id'].decode()


def test_a_pack_of_another_size_is_refused_with_its_command(tmp_path):
  path = packs.pack_path(str(tmp_path), 'a', 'test')
  packs.write_pack(path, iter(_records(1)), 16, 'jpeg')
  with pytest.raises(packs.PackError, match='holds 16 px images but config.data.image_size=32: rebuild'):
    packs.PackSource(path, 32)
  with pytest.raises(packs.PackError, match="image_format='png'"):
    packs.write_pack(path, iter(_records(1)), 16, 'png')
