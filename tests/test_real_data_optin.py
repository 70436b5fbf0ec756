"""Opt-in: build the real PH2 set from ../shared/data (UNISEGDIFF_REAL_DATA=1)."""
import csv
import os

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'data'))

pytestmark = pytest.mark.skipif(
    os.environ.get('UNISEGDIFF_REAL_DATA') != '1' or not os.path.isdir(SHARED),
    reason='set UNISEGDIFF_REAL_DATA=1 and provide ../shared/data to run')


@pytest.mark.parametrize('name', ['ph2', 'ph2/fold0'])
def test_build_ph2(tmp_path, name):
  import data_prep
  from data_prep import splitting

  manual = os.path.join(SHARED, 'ph2')
  data_dir = str(tmp_path / 'tfds')
  rep = data_prep.build(name, data_dir, manual, progress=False)
  split_dir = os.path.join(os.path.dirname(data_prep.__file__), 'splits', *name.split('/'))
  expected = splitting.read_split_files(split_dir)
  assert rep['pairs_found'] == 200 and rep['read'] == 200 and rep['unassigned'] == 0
  assert rep['written'] == {s: len(v) for s, v in expected.items()}
  assert rep['written_total'] == 200
  assert rep['rules'].get('non_binary_masks', 0) == 0
  with open(os.path.join(manual, 'manifest.csv'), newline='') as f:
    manifest = {r['name']: r for r in csv.DictReader(f)}
  builder = data_prep.get_builder(name, data_dir)
  for split, ids in expected.items():
    src = builder.as_data_source(split=split)
    assert len(src) == len(ids)
    got = set()
    for i in range(0, len(src), 7):
      ex = src[i]
      cid = ex['case_id'].decode()
      got.add(cid)
      row = manifest[cid]
      assert ex['image'].shape == (int(row['height']), int(row['width']), 3)
      assert ex['mask'].shape == (int(row['height']), int(row['width']), 1)
      assert abs(ex['mask'].mean() - float(row['lesion_fraction'])) < 1e-3
      assert set(np.unique(ex['mask'])) <= {0, 1}
      assert ex['organ'] == b'skin' and ex['modality'] == b'dermoscopy' and ex['dataset'] == b'ph2'
    assert got <= set(ids)
