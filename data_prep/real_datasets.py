"""TFDS builders for the real lesion-segmentation datasets (manual download, see README.md).

kvasir_seg, ph2, busi: `<manual_dir>/images/<NAME>.<ext>` + `<manual_dir>/masks/<NAME>.<ext>`
(the layout of ../shared/data/<name>), splits from the committed files data_prep/splits/<name>/.
isic2018: the official ISIC 2018 task 1 folders. lesion_folder: any images/ + masks/ folder.
"""
from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from data_prep.base import BuildInputError, LesionSegBuilder, pair_folders

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

