"""lgg_brain_mri / ddti_thyroid_us: patient-disjoint splits, builder input checks; miss_rate; unified."""
import csv
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

import data_prep
from data_prep import real_datasets
from data_prep import splitting
from data_prep.base import BuildInputError
from unisegdiff_jax import evaluate
from unisegdiff_jax import input_pipeline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'data'))
SPLITS = os.path.join(REPO_ROOT, 'data_prep', 'splits')
KEYS = {'lgg_brain_mri': real_datasets.lgg_patient, 'ddti_thyroid_us': real_datasets.ddti_case}

# ---------------------------------------------------------------------------------------------
# grouping (no data)


def test_key_functions():
  assert real_datasets.lgg_patient('TCGA_CS_4941_19960909_11') == 'TCGA_CS_4941_19960909'
  assert real_datasets.ddti_case('ddti_139_1_n2') == '139'
  assert real_datasets.ddti_case('ddti_007_2') == '7'
  for bad, fn in (('TCGA_CS_4941_11', real_datasets.lgg_patient),
                  ('TCGA__4941_19960909_11', real_datasets.lgg_patient),
                  ('ddti_x_n', real_datasets.ddti_case)):
    with pytest.raises(BuildInputError) as ei:
      fn(bad)
    assert '\n' not in str(ei.value) and repr(bad) in str(ei.value)


def test_group_by_key_keeps_patients_together():
  rng = np.random.default_rng(0)
  names = [f'TCGA_{s}_{p:04d}_1999{p:04d}_{k}' for p, s in enumerate(['CS', 'DU', 'HT'] * 10)
           for k in range(1, int(rng.integers(1, 12)) + 1)]
  names += [f'ddti_{c}_{i}' + (f'_n{n}' if n else '') for c in range(1, 40)
            for i in range(1, c % 3 + 2) for n in range(c % 2 + 1)]
  key = lambda c: (real_datasets.lgg_patient(c) if c.startswith('TCGA')
                   else 'ddti' + real_datasets.ddti_case(c))
  pairs = [('ddti_1_1', 'ddti_2_1')]  # a near-duplicate pair across two cases merges them
  groups = real_datasets.group_by_key(names, key, pairs)
  assert sorted(c for g in groups for c in g) == sorted(names)
  keys_of = [{key(c) for c in g} for g in groups]
  assert {'ddti1', 'ddti2'} in keys_of
  assert sum(len(k) for k in keys_of) == len({key(c) for c in names})  # one key -> one group
  for seed in range(3):
    sp = splitting.assign_splits(groups, seed=seed)
    side = {}
    for s, ids in sp.items():
      for c in ids:
        assert side.setdefault(key(c), s) == s, (c, s)


# ---------------------------------------------------------------------------------------------
# committed split files


@pytest.mark.parametrize('name', sorted(KEYS))
def test_committed_splits_are_patient_disjoint(name):
  sp = splitting.read_split_files(os.path.join(SPLITS, name))
  assert sp is not None and all(sp.values())
  ids = sum(sp.values(), [])
  assert len(ids) == len(set(ids))
  keys = {s: {KEYS[name](c) for c in v} for s, v in sp.items()}
  assert not (keys['train'] & keys['val'] or keys['train'] & keys['test']
              or keys['val'] & keys['test'])
  for s, ratio in zip(splitting.SPLITS, splitting.DEFAULT_RATIOS):
    assert abs(len(sp[s]) / len(ids) - ratio) < 0.03, (s, len(sp[s]))


@pytest.mark.skipif(not os.path.isdir(SHARED), reason='../shared/data is absent')
@pytest.mark.parametrize('name', sorted(KEYS))
def test_committed_splits_match_the_shared_manifests(name):
  path = os.path.join(SHARED, name, 'manifest.csv')
  if not os.path.exists(path):
    pytest.skip(f'{path} is absent')
  with open(path, newline='', encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  sp = splitting.read_split_files(os.path.join(SPLITS, name))
  assert sorted(sum(sp.values(), [])) == sorted(r['name'] for r in rows)
  side = {c: s for s, v in sp.items() for c in v}
  patient = {r['name']: r['patient'] if name == 'lgg_brain_mri' else KEYS[name](r['name'])
             for r in rows}
  where = {}
  for c, p in patient.items():
    assert where.setdefault(p, side[c]) == side[c], (p, c)
  assert len(where) == (88 if name == 'lgg_brain_mri' else 377)


# ---------------------------------------------------------------------------------------------
# builders on generated files


def _write(path, array, fmt='PNG'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def _pair(root, name, seed, grey=False, mask_hw=(16, 16)):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (16, 16) if grey else (16, 16, 3), dtype=np.uint8)
  _write(os.path.join(root, 'images', f'{name}.jpg'), img, 'JPEG')
  mask = np.zeros(mask_hw, np.uint8)
  mask[4:10, 5:11] = 255
  _write(os.path.join(root, 'masks', f'{name}.png'), mask)


def _lgg(root):
  for p in range(4):
    for k in range(1, 4):
      _pair(root, f'TCGA_CS_{4900 + p}_1996090{p}_{k}', 10 * p + k)
  return str(root)


def _ddti(root):
  for c in range(1, 9):
    for n in (1, 2):
      _pair(root, f'ddti_{c}_1_n{n}', 10 * c + n, grey=True)
  return str(root)


@pytest.fixture
def no_committed_splits(monkeypatch, tmp_path):
  """Builders look for split files in an empty folder (generated names are not in the real ones)."""
  d = str(tmp_path / 'splits')
  for cls in (real_datasets.LggBrainMri, real_datasets.DdtiThyroidUs):
    monkeypatch.setattr(cls, 'split_dir', lambda self, manual_dir, d=d: os.path.join(d, self.name))
  return d


def _build(tmp_path, name, root):
  return data_prep.build(name, str(tmp_path / 'tfds'), root, progress=False)


def _expect_error(tmp_path, name, root, *needles):
  with pytest.raises(BuildInputError) as ei:
    _build(tmp_path, name, root)
  msg = str(ei.value)
  assert '\n' not in msg and all(n in msg for n in needles), msg
  assert not data_prep.is_built(name, str(tmp_path / 'tfds'))


def test_registry_entries():
  for name, organ, modality in (('lgg_brain_mri', 'brain', 'MRI'),
                                ('ddti_thyroid_us', 'thyroid', 'ultrasound')):
    info = data_prep.DATASETS[name]
    assert (info.organ, info.modality, info.needs_manual_dir) == (organ, modality, True)
    assert info.manual_dir_hint == f'../shared/data/{name}'
    assert (info.builder_cls.ORGAN, info.builder_cls.MODALITY) == (organ, modality)


def test_lgg_builds_by_patient_on_the_fly(tmp_path, no_committed_splits):
  root = _lgg(tmp_path / 'lgg')
  rep = _build(tmp_path, 'lgg_brain_mri', root)
  assert rep['read'] == 12 and rep['written_total'] == 12 and rep['unassigned'] == 0
  assert 'by patient' in rep['split_source']
  assert rep['rules'] == {'images_stored_unchanged': 12}
  builder = data_prep.get_builder('lgg_brain_mri', str(tmp_path / 'tfds'))
  side = {}
  for split in builder.info.splits:
    src = builder.as_data_source(split=split)
    for i in range(len(src)):
      ex = src[i]
      assert ex['organ'] == b'brain' and ex['modality'] == b'MRI'
      assert ex['image'].shape == (16, 16, 3) and set(np.unique(ex['mask'])) == {0, 1}
      p = real_datasets.lgg_patient(ex['case_id'].decode())
      assert side.setdefault(p, split) == split


def test_lgg_input_checks(tmp_path, no_committed_splits):
  root = _lgg(tmp_path / 'lgg')
  os.remove(os.path.join(root, 'masks', 'TCGA_CS_4901_19960901_2.png'))
  _expect_error(tmp_path, 'lgg_brain_mri', root, 'TCGA_CS_4901_19960901_2.jpg', 'missing mask')
  _pair(root, 'TCGA_CS_4901_19960901_2', 0, mask_hw=(16, 12))
  _expect_error(tmp_path, 'lgg_brain_mri', root, 'TCGA_CS_4901_19960901_2.png', 'differs')
  _pair(root, 'TCGA_CS_4901_19960901_2', 0)
  _pair(root, 'brain_7', 0)  # no patient in the name
  _expect_error(tmp_path, 'lgg_brain_mri', root, "'brain_7'", '5 `_`-fields')
  os.remove(os.path.join(root, 'images', 'brain_7.jpg'))
  _expect_error(tmp_path, 'lgg_brain_mri', root, 'brain_7.png', 'missing image')


def test_lgg_manifest_patient_must_match_the_name(tmp_path):
  root = _lgg(tmp_path / 'lgg')
  with open(os.path.join(root, 'manifest.csv'), 'w', encoding='utf-8') as f:
    f.write('name,patient\nTCGA_CS_4900_19960900_1,TCGA_CS_4900_19960900\n'
            'TCGA_CS_4901_19960901_1,TCGA_CS_4900_19960900\n')
  cases = {n[:-4]: os.path.join(root, 'images', n) for n in os.listdir(os.path.join(root, 'images'))}
  with pytest.raises(BuildInputError, match="'TCGA_CS_4901_19960901_1' differs"):
    real_datasets.LggBrainMri.split_groups(cases, root)


def test_ddti_builds_and_refuses_a_case_on_two_sides(tmp_path, no_committed_splits):
  root = _ddti(tmp_path / 'ddti')
  rep = _build(tmp_path, 'ddti_thyroid_us', root)
  assert rep['written_total'] == 16 and 'by case number' in rep['split_source']
  assert rep['rules']['grey_to_rgb'] == 16 and rep['rules']['images_reencoded_jpeg'] == 16
  ex = data_prep.get_builder('ddti_thyroid_us', str(tmp_path / 'tfds')).as_data_source(split='train')[0]
  assert ex['organ'] == b'thyroid' and ex['modality'] == b'ultrasound'
  # Split files that put case 3's two crops on different sides stop the build.
  names = sorted(n[:-4] for n in os.listdir(os.path.join(root, 'images')))
  rest = [n for n in names if not n.startswith('ddti_3_')]
  splitting.write_split_files(os.path.join(no_committed_splits, 'ddti_thyroid_us'),
                              {'train': rest[:10] + ['ddti_3_1_n1'], 'val': rest[10:12],
                               'test': rest[12:] + ['ddti_3_1_n2']})
  data_dir = str(tmp_path / 'tfds2')
  with pytest.raises(BuildInputError) as ei:
    data_prep.build('ddti_thyroid_us', data_dir, root, progress=False)
  msg = str(ei.value)
  assert '\n' not in msg and "case number '3' is in both train and test" in msg, msg
  assert not data_prep.is_built('ddti_thyroid_us', data_dir)


# ---------------------------------------------------------------------------------------------
# miss_rate


def test_miss_rate_on_hand_built_cases(tmp_path):
  def case(dataset, cid, truth):
    truth = np.asarray(truth, bool)
    return input_pipeline.EvalCase(dataset, cid, np.zeros(truth.shape + (3,), np.uint8), truth)

  lesion = np.zeros((8, 8), bool)
  lesion[2:4, 2:4] = True
  elsewhere = np.zeros((8, 8))
  elsewhere[6:, 6:] = 1.0
  empty = np.zeros((8, 8), bool)
  cases = [case('a', 'empty_pred', lesion), case('a', 'wrong_place', lesion),
           case('a', 'perfect', lesion), case('a', 'no_lesion_no_pred', empty),
           case('a', 'no_lesion_false_pos', empty)]
  probs = [np.zeros((8, 8)), elsewhere, lesion * 0.9, np.zeros((8, 8)), elsewhere]
  rows_a = evaluate.score_cases(cases, probs, 0.5)
  assert [r['missed'] for r in rows_a] == [1, 1, 0, 0, 0]
  assert rows_a[4]['dice'] == 0.0  # Dice 0, but nothing to miss
  partial = lesion.astype(float)
  partial[2, 2] = 0.0
  rows_b = evaluate.score_cases([case('b', 'partial', lesion)], [partial], 0.5)
  assert rows_b[0]['missed'] == 0 and 0 < rows_b[0]['dice'] < 1
  summary = evaluate.summarise({'a': rows_a, 'b': rows_b})
  assert summary['datasets']['a']['miss_rate'] == pytest.approx(0.4)
  assert summary['datasets']['b']['miss_rate'] == 0.0
  assert summary['mean']['miss_rate'] == pytest.approx(0.2)
  path = str(tmp_path / 'per_case.csv')
  evaluate.write_per_case_csv(path, rows_a + rows_b)
  with open(path, newline='') as f:
    got = list(csv.DictReader(f))
  assert [r['missed'] for r in got] == ['1', '1', '0', '0', '0', '0']


# ---------------------------------------------------------------------------------------------
# configs


def _load_config(name, arg=None):
  path = os.path.join(REPO_ROOT, 'configs', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'cfg_new_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_unified_is_a_fixed_list_and_organ_configs(monkeypatch, tmp_path):
  import data_prep  # pylint: disable=g-import-not-at-top

  def no_probing(*_):
    raise AssertionError('a config file must not probe the disk')

  monkeypatch.setattr(data_prep, 'is_built', no_probing)
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'empty'))
  assert _load_config('skin').data.datasets == 'ph2'
  config = _load_config('unified')
  assert config.data.datasets == 'kvasir_seg,ph2,busi,lgg_brain_mri,ddti_thyroid_us'
  assert config.data.image_size == 256
  assert _load_config('unified', 'cpu').data.image_size == 64
  for name, dataset in (('brain', 'lgg_brain_mri'), ('thyroid', 'ddti_thyroid_us')):
    full, cpu, smoke = (_load_config(name, a) for a in (None, 'cpu', 'smoke'))
    assert full.data.datasets == cpu.data.datasets == smoke.data.datasets == dataset
    assert (full.data.image_size, cpu.data.image_size, smoke.data.image_size) == (256, 64, 32)
