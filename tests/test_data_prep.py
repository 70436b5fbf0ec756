"""data_prep: split procedure, input checks, registry errors, lesion_folder / isic2018 builds."""
import importlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import data_prep
from data_prep import make_splits as make_splits_cli
from data_prep import splitting
from data_prep.base import BuildInputError, pair_folders

build_cli = importlib.import_module('data_prep.build')  # the CLI module (callable, see there)

# ---------------------------------------------------------------------------------------------
# helpers


def _rgb(h=24, w=32, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h=24, w=32, value=255):
  m = np.zeros((h, w), np.uint8)
  m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = value
  return m


def _write(path, array, fmt=None, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  img.save(path, format=fmt)


def make_folder(root, n=6, **kw):
  """root/images/case_i.png + root/masks/case_i.png (distinct images)."""
  for i in range(n):
    _write(os.path.join(root, 'images', f'case_{i}.png'), _rgb(seed=i))
    _write(os.path.join(root, 'masks', f'case_{i}.png'), _mask())
  return str(root)


def build_folder(tmp_path, manual_dir, name='lesion_folder'):
  return data_prep.build(name, str(tmp_path / 'tfds'), str(manual_dir), progress=False)


def expect_error(tmp_path, manual_dir, *needles):
  with pytest.raises(BuildInputError) as ei:
    build_folder(tmp_path, manual_dir)
  msg = str(ei.value)
  assert '\n' not in msg
  for n in needles:
    assert n in msg, msg
  # Nothing half-written is left behind.
  assert not data_prep.is_built('lesion_folder', str(tmp_path / 'tfds'))
  return msg


# ---------------------------------------------------------------------------------------------
# splits


def test_assign_splits_deterministic_and_ratios():
  groups = [[f'c{i:04d}'] for i in range(1000)]
  a = splitting.assign_splits(groups, seed=0)
  b = splitting.assign_splits(groups, seed=0)
  c = splitting.assign_splits(groups, seed=1)
  assert a == b and a != c
  assert {k: len(v) for k, v in a.items()} == {'train': 700, 'val': 100, 'test': 200}
  ids = sum(a.values(), [])
  assert sorted(ids) == sorted(g[0] for g in groups)
  r = splitting.assign_splits(groups, ratios=(0.5, 0.25, 0.25), seed=3)
  assert {k: len(v) for k, v in r.items()} == {'train': 500, 'val': 250, 'test': 250}


def test_near_duplicate_groups_never_split():
  ids = [f'c{i:03d}' for i in range(300)]
  pairs = [(ids[i], ids[i + 1]) for i in range(0, 60, 2)] + [('c100', 'c150'), ('c150', 'c200'),
                                                             ('c999', 'c001')]  # unknown id ignored
  groups = splitting.group_cases(ids, pairs)
  g = next(g for g in groups if 'c100' in g)
  assert g == ['c100', 'c150', 'c200']
  for seed in range(5):
    sp = splitting.assign_splits(groups, seed=seed)
    where = {c: s for s, v in sp.items() for c in v}
    for a, b in pairs[:-1]:
      assert where[a] == where[b]
    n = len(ids)
    assert abs(len(sp['train']) - 0.7 * n) <= 3 and abs(len(sp['test']) - 0.2 * n) <= 3
    folds = splitting.kfold_splits(groups, k=5, seed=seed)
    for f in folds:
      where = {c: s for s, v in f.items() for c in v}
      for a, b in pairs[:-1]:
        assert where[a] == where[b]


def test_hash_grouping(tmp_path):
  paths = {}
  for i in range(5):
    p = tmp_path / f'{i}.png'
    _write(str(p), _rgb(seed=0 if i in (1, 3) else 10 + i))
    paths[f'case{i}'] = str(p)
  groups = splitting.compute_groups(paths, str(tmp_path))  # no near_duplicates.csv there
  assert ['case1', 'case3'] in groups and len(groups) == 4
  (tmp_path / 'near_duplicates.csv').write_text('name_a,name_b,dist\ncase0,case4,3\n')
  groups = splitting.compute_groups(paths, str(tmp_path))
  assert ['case0', 'case4'] in groups and ['case1', 'case3'] in groups and len(groups) == 3


def test_kfold_disjoint_and_covering():
  ids = [f'c{i:03d}' for i in range(200)]
  groups = splitting.group_cases(ids, [('c000', 'c001'), ('c010', 'c011'), ('c011', 'c012')])
  folds = splitting.kfold_splits(groups, k=5, seed=0)
  assert folds == splitting.kfold_splits(groups, k=5, seed=0)
  tests = []
  for f in folds:
    parts = [set(f[s]) for s in ('train', 'val', 'test')]
    assert sum(len(p) for p in parts) == len(ids) and set().union(*parts) == set(ids)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert 38 <= len(f['test']) <= 42 and 19 <= len(f['val']) <= 22
    tests.append(set(f['test']))
  assert sum(len(t) for t in tests) == len(ids) and set().union(*tests) == set(ids)


def test_split_files_round_trip(tmp_path):
  sp = {'train': ['a b (1)', 'c'], 'val': [], 'test': ['d']}
  splitting.write_split_files(str(tmp_path), sp)
  assert splitting.read_split_files(str(tmp_path)) == sp
  assert splitting.read_split_files(str(tmp_path / 'none')) is None


def test_make_splits_cli(tmp_path, capsys):
  root = make_folder(tmp_path / 'raw', n=20)
  assert make_splits_cli.main(['lesion_folder', f'--manual_dir={root}', '--seed=1']) == 0
  first = splitting.read_split_files(os.path.join(root, 'splits'))
  assert sum(len(v) for v in first.values()) == 20
  assert make_splits_cli.main(['lesion_folder', f'--manual_dir={root}', '--seed=1']) == 0
  assert splitting.read_split_files(os.path.join(root, 'splits')) == first
  assert make_splits_cli.main(['lesion_folder', f'--manual_dir={root}', '--kfold=4']) == 0
  for k in range(4):
    f = splitting.read_split_files(os.path.join(root, 'splits', f'fold{k}'))
    assert sum(len(v) for v in f.values()) == 20
  info = json.load(open(os.path.join(root, 'splits', 'SPLIT_INFO.json')))
  assert info['n_cases'] == 20 and '--seed=1' in info['command']


def test_committed_split_files_are_disjoint():
  for name in ('kvasir_seg', 'ph2', 'busi', 'lgg_brain_mri', 'ddti_thyroid_us'):
    d = os.path.join(os.path.dirname(data_prep.__file__), 'splits', name)
    sp = splitting.read_split_files(d)
    assert sp is not None, d
    all_ids = sum(sp.values(), [])
    assert len(all_ids) == len(set(all_ids)) and all(sp.values())


# ---------------------------------------------------------------------------------------------
# pairing / input checks


def test_pairing_suffixes_extensions_and_spaces(tmp_path):
  root = tmp_path / 'raw'
  _write(str(root / 'images' / 'benign (1).jpg'), _rgb(), 'JPEG')
  _write(str(root / 'masks' / 'benign (1)_mask.png'), _mask())
  _write(str(root / 'images' / 'ISIC_001.bmp'), _rgb(seed=1), 'BMP')
  _write(str(root / 'masks' / 'ISIC_001_segmentation.tif'), _mask(), 'TIFF')
  _write(str(root / 'images' / 'x.PNG'), _rgb(seed=2), 'PNG')
  _write(str(root / 'masks' / 'x.png'), _mask())
  (root / 'images' / 'LICENSE.txt').write_text('x')
  pairs, ignored = pair_folders(str(root / 'images'), str(root / 'masks'))
  assert [p.case_id for p in pairs] == ['ISIC_001', 'benign (1)', 'x']
  assert all(p.image and p.mask for p in pairs)
  assert ignored == ['images/LICENSE.txt']


def test_truncated_image(tmp_path):
  root = make_folder(tmp_path / 'raw', n=3)
  _write(os.path.join(root, 'images', 'case_1.jpg'), _rgb(64, 64), 'JPEG')
  os.remove(os.path.join(root, 'images', 'case_1.png'))
  p = os.path.join(root, 'images', 'case_1.jpg')
  data = open(p, 'rb').read()
  open(p, 'wb').write(data[: len(data) // 2])
  expect_error(tmp_path, root, 'case_1.jpg', 'truncated')


def test_missing_mask(tmp_path):
  root = make_folder(tmp_path / 'raw', n=3)
  os.remove(os.path.join(root, 'masks', 'case_2.png'))
  expect_error(tmp_path, root, 'case_2.png', 'missing mask')


def test_missing_image(tmp_path):
  root = make_folder(tmp_path / 'raw', n=3)
  _write(os.path.join(root, 'masks', 'orphan_mask.png'), _mask())
  expect_error(tmp_path, root, 'orphan_mask.png', 'missing image', "'orphan'")


def test_size_mismatch(tmp_path):
  root = make_folder(tmp_path / 'raw', n=3)
  _write(os.path.join(root, 'masks', 'case_0.png'), _mask(20, 32))
  expect_error(tmp_path, root, 'case_0.png', 'differs', '32x20', '32x24')


def test_unreadable_image(tmp_path):
  root = make_folder(tmp_path / 'raw', n=3)
  open(os.path.join(root, 'images', 'case_0.png'), 'wb').write(b'not an image at all')
  expect_error(tmp_path, root, 'case_0.png')


def _read_built(tmp_path, name='lesion_folder'):
  builder = data_prep.get_builder(name, str(tmp_path / 'tfds'))
  out = {}
  for split in builder.info.splits:
    src = builder.as_data_source(split=split)
    for i in range(len(src)):
      ex = src[i]
      out[ex['case_id'].decode()] = dict(ex, split=split)
  return out


def test_rgba_grey_16bit_and_non_binary_rules(tmp_path):
  root = make_folder(tmp_path / 'raw', n=6)
  rgba = np.dstack([_rgb(seed=40), np.full((24, 32), 7, np.uint8)])
  _write(os.path.join(root, 'images', 'case_0.png'), rgba, mode='RGBA')
  grey = _rgb(seed=41)[..., 0]
  _write(os.path.join(root, 'images', 'case_1.png'), grey)
  g16 = (np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)
  Image.fromarray(g16).save(os.path.join(root, 'images', 'case_2.png'))
  assert Image.open(os.path.join(root, 'images', 'case_2.png')).mode.startswith('I')
  nb = _mask()
  nb[0, 0], nb[1, 1], nb[12, 12] = 3, 100, 250  # JPEG-like noise
  _write(os.path.join(root, 'masks', 'case_3.png'), nb)
  _write(os.path.join(root, 'masks', 'case_4.png'), _mask(value=1))  # {0,1} mask
  rep = build_folder(tmp_path, root)
  rules = rep['rules']
  assert rules['alpha_dropped'] == 1
  assert rules['grey_to_rgb'] == 2  # 8-bit grey + 16-bit grey
  assert rules['bit16_scaled_to_8bit'] == 1
  assert rules['non_binary_masks'] == 1
  assert rules['masks_0_1_values'] == 1
  assert rep['read'] == 6 and rep['written_total'] == 6 and rep['unassigned'] == 0
  text = data_prep.format_report(rep)
  assert 'non_binary_masks=1' in text and 'alpha_dropped=1' in text
  ex = _read_built(tmp_path)
  assert np.array_equal(ex['case_0']['image'], rgba[..., :3])
  assert np.array_equal(ex['case_1']['image'], np.repeat(grey[..., None], 3, -1))
  expect16 = ((g16.astype(np.int64) + 128) // 257).astype(np.uint8)
  assert np.array_equal(ex['case_2']['image'][..., 0], expect16)
  m3 = ex['case_3']['mask'][..., 0]
  assert set(np.unique(m3)) == {0, 1}
  assert m3[0, 0] == 0 and m3[1, 1] == 0 and m3[12, 12] == 1  # > 127 -> lesion
  assert np.array_equal(ex['case_4']['mask'][..., 0], _mask(value=1))


def test_cli_prints_one_line_and_exits_1(tmp_path, capsys):
  root = make_folder(tmp_path / 'raw', n=3)
  os.remove(os.path.join(root, 'masks', 'case_2.png'))
  rc = build_cli.main(['lesion_folder', f'--manual_dir={root}', f'--data_dir={tmp_path / "tfds"}'])
  err = capsys.readouterr().err.strip()
  assert rc == 1
  assert err.count('\n') == 0 and err.startswith('error:') and 'missing mask' in err
  assert 'Traceback' not in err


def test_cli_success_prints_report(tmp_path, capsys):
  root = make_folder(tmp_path / 'raw', n=4)
  rc = build_cli.main(['lesion_folder', f'--manual_dir={root}', f'--data_dir={tmp_path / "tfds"}'])
  out = capsys.readouterr().out
  assert rc == 0
  assert 'pairs found: 4' in out and 'written: train=' in out and 'total=4' in out


def test_cli_unknown_name(capsys):
  assert build_cli.main(['no_such_set', '--data_dir=/nonexistent']) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and 'kvasir_seg' in err


# ---------------------------------------------------------------------------------------------
# registry


def test_build_is_callable_after_cli_import(tmp_path):
  assert callable(data_prep.build)  # even though data_prep.build may now be the CLI module
  rep = data_prep.build('synthetic_lesions/tiny', str(tmp_path / 'tfds'), progress=False)
  assert rep['written'] == {'train': 32, 'val': 8, 'test': 8}


def test_registry_names():
  assert {'synthetic_lesions', 'kvasir_seg', 'ph2', 'busi', 'lgg_brain_mri', 'ddti_thyroid_us',
          'isic2018', 'lesion_folder'} <= set(data_prep.DATASETS)
  info = data_prep.DATASETS['kvasir_seg']
  assert info.organ == 'colon' and info.modality == 'colonoscopy' and info.needs_manual_dir
  assert not data_prep.DATASETS['synthetic_lesions'].needs_manual_dir
  for name, info in data_prep.DATASETS.items():
    assert getattr(info.builder_cls, 'name') == name
  assert data_prep.get_builder('ph2/fold3', '/tmp/x').builder_config.name == 'fold3'


def test_ensure_built_manual_dataset_not_built(tmp_path):
  d = str(tmp_path / 'tfds')
  with pytest.raises(data_prep.DatasetNotBuiltError) as ei:
    data_prep.ensure_built('kvasir_seg', d)
  msg = str(ei.value)
  assert '\n' not in msg
  assert (f'python -m data_prep.build kvasir_seg --manual_dir=../shared/data/kvasir_seg '
          f'--data_dir={d}') in msg
  assert 'images/' in msg and 'masks/' in msg
  assert not data_prep.is_built('kvasir_seg', d)


def test_unknown_name_and_config():
  with pytest.raises(ValueError) as ei:
    data_prep.ensure_built('nope', '/tmp/x')
  assert '\n' not in str(ei.value) and 'synthetic_lesions' in str(ei.value)
  with pytest.raises(ValueError):
    data_prep.get_builder('synthetic_lesions/huge', '/tmp/x')


# ---------------------------------------------------------------------------------------------
# end-to-end builds


def test_lesion_folder_end_to_end(tmp_path):
  import tensorflow_datasets as tfds
  root = tmp_path / 'raw'
  n = 20
  for i in range(n):
    stem = f'benign ({i})'
    ext, fmt = [('.png', 'PNG'), ('.jpg', 'JPEG'), ('.bmp', 'BMP'), ('.tif', 'TIFF')][i % 4]
    _write(str(root / 'images' / f'{stem}{ext}'), _rgb(30 + i % 3, 40, seed=i), fmt)
    suffix = ['', '_mask', '_segmentation'][i % 3]
    _write(str(root / 'masks' / f'{stem}{suffix}.png'), _mask(30 + i % 3, 40))
  (root / 'dataset.json').write_text(json.dumps({'organ': 'skin', 'modality': 'dermoscopy'}))
  rep = build_folder(tmp_path, root, 'lesion_folder/mine')
  assert rep['pairs_found'] == n and rep['written_total'] == n and rep['unassigned'] == 0
  assert 'computed on the fly' in rep['split_source']
  assert rep['written']['train'] == 14 and rep['written']['test'] == 4
  assert rep['rules'].get('images_reencoded_png', 0) == 15  # png/bmp/tif sources: lossless
  data_dir = str(tmp_path / 'tfds')
  assert data_prep.is_built('lesion_folder/mine', data_dir)
  ex = _read_built(tmp_path, 'lesion_folder/mine')
  assert len(ex) == n
  e = ex['benign (2)']
  assert e['image'].shape == (32, 40, 3) and e['mask'].shape == (32, 40, 1)
  assert np.array_equal(e['image'], _rgb(32, 40, seed=2))  # bmp -> png: lossless
  assert e['dataset'] == b'mine' and e['organ'] == b'skin' and e['modality'] == b'dermoscopy'
  assert set(np.unique(e['mask'])) == {0, 1}
  # Readable through the public TFDS entry point too.
  src = tfds.data_source('lesion_folder/mine', data_dir=data_dir, split='train')
  assert len(src) == 14
  # Rebuilding without --overwrite keeps the data and reports the stored counts.
  again = build_folder(tmp_path, root, 'lesion_folder/mine')
  assert again.get('already_built') and again['written_total'] == n


def test_lesion_folder_split_files_and_unassigned(tmp_path):
  root = make_folder(tmp_path / 'raw', n=6)
  splitting.write_split_files(os.path.join(root, 'splits'),
                              {'train': ['case_0', 'case_1', 'case_2'], 'val': ['case_3'],
                               'test': ['case_4']})
  rep = build_folder(tmp_path, root)
  assert rep['unassigned'] == 1 and rep['unassigned_ids'] == ['case_5']
  assert rep['written'] == {'train': 3, 'val': 1, 'test': 1} and rep['read'] == 5
  assert 'unassigned (in no split, not written): 1' in data_prep.format_report(rep)


def test_split_file_with_unknown_case_stops(tmp_path):
  root = make_folder(tmp_path / 'raw', n=3)
  splitting.write_split_files(os.path.join(root, 'splits'),
                              {'train': ['case_0', 'case_9'], 'val': [], 'test': ['case_1']})
  expect_error(tmp_path, root, "'case_9'")


def test_isic2018_official_split(tmp_path):
  root = tmp_path / 'isic'
  k = 0
  for split, (img_d, gt_d) in data_prep.real_datasets.ISIC_FOLDERS.items():
    for _ in range({'train': 4, 'val': 2, 'test': 3}[split]):
      cid = f'ISIC_{k:07d}'
      _write(str(root / img_d / f'{cid}.jpg'), _rgb(seed=k), 'JPEG')
      _write(str(root / gt_d / f'{cid}_segmentation.png'), _mask())
      k += 1
    (root / img_d / 'ATTRIBUTION.txt').write_text('x')
  rep = data_prep.build('isic2018', str(tmp_path / 'tfds'), str(root), progress=False)
  assert rep['split_source'] == 'official split (folders)'
  assert rep['written'] == {'train': 4, 'val': 2, 'test': 3}
  assert len(rep['ignored_non_image_files']) == 3
  assert rep['rules'].get('images_stored_unchanged') == 9
  ex = _read_built(tmp_path, 'isic2018')
  assert ex['ISIC_0000005']['split'] == 'val' and ex['ISIC_0000000']['organ'] == b'skin'
