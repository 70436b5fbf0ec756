"""TFDS builders for the real lesion-segmentation datasets (manual download, see README.md).

kvasir_seg, ph2, busi, lgg_brain_mri, ddti_thyroid_us: `<manual_dir>/images/<NAME>.<ext>` +
`<manual_dir>/masks/<NAME>.<ext>` (the layout of ../shared/data/<name>), splits from the committed
files data_prep/splits/<name>/ (lgg_brain_mri by patient, ddti_thyroid_us by case).
isic2018: the official ISIC 2018 task 1 folders. lesion_folder: any images/ + masks/ folder.
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Callable, Iterable, Mapping, Sequence

import tensorflow_datasets as tfds

from data_prep import splitting
from data_prep.base import BuildInputError, LesionSegBuilder, Pair, pair_folders

_FOLDER_INSTRUCTIONS = """\
Put the dataset's images in `<manual_dir>/images/` and its masks in `<manual_dir>/masks/`
(mask file stem = image stem, optionally + `_mask` or `_segmentation`; jpg/png/bmp/tif; masks
{{0,255}} or {{0,1}}, same size as the image), plus an optional `near_duplicates.csv`
(columns name_a,name_b). In this project: `--manual_dir=../shared/data/{name}`.
"""


class _ImagesMasksBuilder(LesionSegBuilder, skip_registration=True):
  """`<manual_dir>/images/` + `<manual_dir>/masks/`."""

  @classmethod
  def list_pairs(cls, manual_dir: str):
    return pair_folders(os.path.join(manual_dir, 'images'), os.path.join(manual_dir, 'masks'))


class KvasirSeg(_ImagesMasksBuilder):
  """Kvasir-SEG colon polyps (Jha et al., MMM 2020), 1000 colonoscopy frames."""
  name = 'kvasir_seg'
  DATASET, ORGAN, MODALITY = 'kvasir_seg', 'colon', 'colonoscopy'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FOLDER_INSTRUCTIONS.format(name='kvasir_seg')


class Ph2(_ImagesMasksBuilder):
  """PH2 dermoscopy (Mendonca et al., EMBC 2013), 200 images. Configs: default, fold0..fold4."""
  name = 'ph2'
  DATASET, ORGAN, MODALITY = 'ph2', 'skin', 'dermoscopy'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FOLDER_INSTRUCTIONS.format(name='ph2')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='default', description='70/10/20 split')] + [
      tfds.core.BuilderConfig(name=f'fold{k}', description=f'5-fold cross-validation, fold {k}')
      for k in range(5)
  ]


class Busi(_ImagesMasksBuilder):
  """BUSI breast ultrasound (Al-Dhabyani et al., Data in Brief 2020), benign + malignant."""
  name = 'busi'
  DATASET, ORGAN, MODALITY = 'busi', 'breast', 'ultrasound'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FOLDER_INSTRUCTIONS.format(name='busi')


# ---- patient-grouped sets -------------------------------------------------------------------


def lgg_patient(case_id: str) -> str:
  """LGG patient: the first four `_`-fields (TCGA_CS_4941_19960909_11 -> TCGA_CS_4941_19960909)."""
  fields = case_id.split('_')
  if len(fields) < 5 or not all(fields[:5]):
    raise BuildInputError(f'{case_id!r}: LGG names need 5 `_`-fields '
                          f'(TCGA_<site>_<id>_<date>_<slice>) to give the patient')
  return '_'.join(fields[:4])


def ddti_case(case_id: str) -> str:
  """DDTI case: the first number of the name ('ddti_139_1_n2' -> '139'; leading zeros dropped)."""
  m = re.search(r'\d+', case_id)
  if m is None:
    raise BuildInputError(f'{case_id!r}: DDTI names need a case number (e.g. ddti_139_1_n2)')
  return str(int(m.group()))


def key_pairs(case_ids: Iterable[str], key: Callable[[str], str]) -> list[tuple[str, str]]:
  """(first case of its key, case) for every later case sharing a key: links for union-find."""
  first: dict[str, str] = {}
  pairs = []
  for cid in sorted(case_ids):
    k = key(cid)
    if k in first:
      pairs.append((first[k], cid))
    else:
      first[k] = cid
  return pairs


def group_by_key(case_ids: Sequence[str], key: Callable[[str], str],
                 pairs: Iterable[tuple[str, str]] = (),
                 hashes: Mapping[str, str] | None = None) -> list[list[str]]:
  """splitting.group_cases with every case of one key (patient) in one group as well."""
  return splitting.group_cases(case_ids, list(pairs) + key_pairs(case_ids, key), hashes)


class _PatientGroupedBuilder(_ImagesMasksBuilder, skip_registration=True):
  """Several images per patient: each patient (`PATIENT(case_id)`) stays on one side of a split.

  Groups = near_duplicates.csv + equal sha256 (as for every set) + same patient. Split files are
  checked at build time (a patient on two sides stops the build); without split files the split is
  computed on the fly from these groups (seed 0, ratios 0.7/0.1/0.2).
  """
  PATIENT: Callable[[str], str] | None = None  # case id -> patient id (a staticmethod)
  GROUP_UNIT = 'patient'
  GROUP_RULE = ''

  @classmethod
  def split_groups(cls, case_images: Mapping[str, str], manual_dir: str | None) -> list[list[str]]:
    """Groups for make_splits / on-the-fly splits over {case_id: image path}."""
    pairs: list[tuple[str, str]] = []
    nd = os.path.join(manual_dir, splitting.NEAR_DUPLICATES_FILE) if manual_dir else ''
    if nd and os.path.exists(nd):
      pairs = splitting.read_near_duplicates(nd)
    hashes = {cid: splitting.file_sha256(p) for cid, p in case_images.items()}
    return group_by_key(list(case_images), cls.PATIENT, pairs, hashes)

  def assign(self, pairs: Sequence[Pair], manual_dir: str) -> tuple[dict[str, list[Pair]], str]:
    if splitting.read_split_files(self.split_dir(manual_dir)) is not None:
      by_split, source = super().assign(pairs, manual_dir)
    else:
      groups = self.split_groups({p.case_id: p.image for p in pairs}, manual_dir)
      ids = splitting.assign_splits(groups, seed=self.SPLIT_SEED)
      by_id = {p.case_id: p for p in pairs}
      by_split = {s: [by_id[c] for c in v] for s, v in ids.items()}
      source = (f'computed on the fly by {self.GROUP_UNIT} (seed {self.SPLIT_SEED}, '
                f'ratios 0.7/0.1/0.2)')
      self._report.update(unassigned=0, unassigned_ids=[])
    where: dict[str, str] = {}
    for s, ps in by_split.items():
      for p in ps:
        k = self.PATIENT(p.case_id)
        if where.setdefault(k, s) != s:
          raise BuildInputError(f'{source}: {self.GROUP_UNIT} {k!r} is in both {where[k]} and {s} '
                                f'(case {p.case_id!r}); re-run `python -m data_prep.make_splits '
                                f'{self.name} --manual_dir=...`')
    return by_split, source


class LggBrainMri(_PatientGroupedBuilder):
  """LGG brain MRI (Buda et al. 2019; TCGA-LGG): FLAIR-abnormality masks, split by patient."""
  name = 'lgg_brain_mri'
  DATASET, ORGAN, MODALITY = 'lgg_brain_mri', 'brain', 'MRI'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FOLDER_INSTRUCTIONS.format(name='lgg_brain_mri')
  PATIENT = staticmethod(lgg_patient)
  GROUP_RULE = 'patient = the first four `_`-fields of the name (manifest.csv column `patient`)'

  @classmethod
  def split_groups(cls, case_images, manual_dir):
    """As the base, after checking manifest.csv's `patient` column (if any) against the names."""
    path = os.path.join(manual_dir, 'manifest.csv') if manual_dir else ''
    if path and os.path.exists(path):
      with open(path, newline='', encoding='utf-8') as f:
        for row in csv.DictReader(f):
          name, patient = row.get('name'), row.get('patient')
          if name in case_images and patient and patient != lgg_patient(name):
            raise BuildInputError(f'{path}: patient {patient!r} of {name!r} differs from its name '
                                  f'(first four `_`-fields: {lgg_patient(name)!r})')
    return super().split_groups(case_images, manual_dir)


class DdtiThyroidUs(_PatientGroupedBuilder):
  """DDTI thyroid ultrasound (Pedraza et al. 2015), preprocessed 300x300 crops, split by case."""
  name = 'ddti_thyroid_us'
  DATASET, ORGAN, MODALITY = 'ddti_thyroid_us', 'thyroid', 'ultrasound'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FOLDER_INSTRUCTIONS.format(name='ddti_thyroid_us')
  PATIENT = staticmethod(ddti_case)
  GROUP_UNIT = 'case number'
  GROUP_RULE = 'case number = the first number of the name'


ISIC_FOLDERS = {
    'train': ('ISIC2018_Task1-2_Training_Input', 'ISIC2018_Task1_Training_GroundTruth'),
    'val': ('ISIC2018_Task1-2_Validation_Input', 'ISIC2018_Task1_Validation_GroundTruth'),
    'test': ('ISIC2018_Task1-2_Test_Input', 'ISIC2018_Task1_Test_GroundTruth'),
}


class Isic2018(LesionSegBuilder):
  """ISIC 2018 task 1 lesion boundary segmentation, official folder layout."""
  name = 'isic2018'
  DATASET, ORGAN, MODALITY = 'isic2018', 'skin', 'dermoscopy'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download ISIC 2018 task 1 from https://challenge.isic-archive.com/data/#2018 and unzip into
<manual_dir> so that it holds ISIC2018_Task1-2_Training_Input/*.jpg and
ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png, and, when available, the
..._Validation_Input/_GroundTruth and ..._Test_Input/_GroundTruth folders (then the official
split is used; otherwise the training folder is split 70/10/20 like the other datasets).
"""

  @classmethod
  def list_pairs(cls, manual_dir: str):
    present = {s: all(os.path.isdir(os.path.join(manual_dir, d)) for d in dirs)
               for s, dirs in ISIC_FOLDERS.items()}
    if not present['train']:
      raise BuildInputError(f'{manual_dir}: missing {ISIC_FOLDERS["train"][0]}/ or '
                            f'{ISIC_FOLDERS["train"][1]}/ (ISIC 2018 task 1 layout expected)')
    official = all(present.values())
    pairs, ignored = [], []
    for s, (img_d, gt_d) in ISIC_FOLDERS.items():
      if not present[s] or (s != 'train' and not official):
        continue
      p, ig = pair_folders(os.path.join(manual_dir, img_d), os.path.join(manual_dir, gt_d),
                           official_split=s if official else None)
      pairs += p
      ignored += ig
    if not official:
      ignored += [f'{d}/ (official split incomplete: val+test needed)'
                  for s in ('val', 'test') if present[s] for d in ISIC_FOLDERS[s]]
    return sorted(pairs, key=lambda q: q.case_id), ignored


class LesionFolder(_ImagesMasksBuilder):
  """Any `images/` + `masks/` folder.

  Optional files in the manual dir: `splits/{train,val,test}.txt` (else splits are computed on
  the fly with the documented procedure), `near_duplicates.csv`, and `dataset.json` =
  {"dataset": ..., "organ": ..., "modality": ...} (defaults: config name / 'unknown').
  Use a config name per folder ('lesion_folder/<anything>') to keep several side by side.
  """
  name = 'lesion_folder'
  DATASET, ORGAN, MODALITY = 'lesion_folder', 'unknown', 'unknown'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FOLDER_INSTRUCTIONS.format(name='<your_dataset>')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='default')]

  def split_dir(self, manual_dir: str) -> str:
    return os.path.join(manual_dir, 'splits')

  def example_metadata(self, manual_dir: str) -> dict[str, str]:
    cfg = self.builder_config.name if self.builder_config else 'default'
    meta = {'dataset': 'lesion_folder' if cfg == 'default' else cfg,
            'organ': self.ORGAN, 'modality': self.MODALITY}
    path = os.path.join(manual_dir, 'dataset.json')
    if os.path.exists(path):
      try:
        with open(path, encoding='utf-8') as f:
          extra = json.load(f)
      except (OSError, ValueError) as e:
        raise BuildInputError(f'{path}: cannot parse ({e})') from None
      for k in meta:
        if k in extra:
          meta[k] = str(extra[k])
    return meta

