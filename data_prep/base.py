"""Shared base of the real-data TFDS builders: pairing, split assignment, input checks, report.

Every builder writes the same example schema (`features()`), in ArrayRecord files. The rules
applied to the raw files are documented in data_prep/README.md ("Input checks").
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import io
import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils
from tqdm import tqdm

from data_prep import splitting
from unisegdiff_jax import image_io

FILE_FORMAT = 'array_record'
SPLITS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'splits')
MASK_SUFFIXES = ('_segmentation', '_mask', '')  # mask stem = image stem + one of these
JPEG_QUALITY = 95


class BuildInputError(ValueError):
  """A raw input problem that stops the build. `str(err)` is one line naming file and problem."""

  def __init__(self, message: str):
    super().__init__(' '.join(str(message).split()))


class CodePathMixin:
  """Plain file-based `code_path`.

  TFDS 4.9.10's default `code_path` touches `importlib_resources` (an undeclared, here missing,
  dependency) for builders defined in packages; this avoids that code path entirely.
  """

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    try:
      return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):
      return None


def features(image_encoding: str = 'png') -> tfds.features.FeaturesDict:
  """The shared example schema of every builder."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                   encoding_format=image_encoding),
      'mask': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format='png'),
      'case_id': tfds.features.Text(),
      'dataset': tfds.features.Text(),
      'organ': tfds.features.Text(),
      'modality': tfds.features.Text(),
  })


def encode_png(array: np.ndarray) -> bytes:
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format='PNG', compress_level=3)
  return buf.getvalue()


def encode_jpeg(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format='JPEG', quality=JPEG_QUALITY)
  return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Pair:
  case_id: str
  image: str | None           # path; None = missing image
  mask: str | None            # path; None = missing mask
  official_split: str | None = None


def _list_files(folder: str) -> tuple[dict[str, str], list[str]]:
  """{stem: path} of supported image files in `folder`, and the other (ignored) file names."""
  found: dict[str, str] = {}
  ignored = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith('.') or not os.path.isfile(path):
      continue
    stem, ext = os.path.splitext(name)
    if ext.lower() not in image_io.SUPPORTED_EXTENSIONS:
      ignored.append(name)
      continue
    if stem in found:
      raise BuildInputError(f'{path}: two files with the same stem {stem!r} '
                            f'({os.path.basename(found[stem])} and {name}); keep one')
    found[stem] = path
  return found, ignored


def pair_folders(image_dir: str, mask_dir: str, official_split: str | None = None,
                 mask_suffixes: Sequence[str] = MASK_SUFFIXES) -> tuple[list[Pair], list[str]]:
  """Match images and masks by stem (mask stem = image stem + '', '_mask' or '_segmentation').

  Returns (pairs sorted by case id, names of ignored non-image files). A pair with a missing
  side has `image` or `mask` None (the builder stops on it).
  """
  for d in (image_dir, mask_dir):
    if not os.path.isdir(d):
      raise BuildInputError(f'{d}: folder not found')
  images, ignored_i = _list_files(image_dir)
  masks, ignored_m = _list_files(mask_dir)
  mask_of: dict[str, str] = {}
  orphan_masks = []
  for mstem, mpath in masks.items():
    target = None
    for suf in mask_suffixes:
      if suf and mstem.endswith(suf) and mstem[:-len(suf)] in images:
        target = mstem[:-len(suf)]
        break
      if not suf and mstem in images:
        target = mstem
        break
    if target is None:
      orphan_masks.append(mpath)
      continue
    if target in mask_of:
      raise BuildInputError(f'{mpath}: second mask for image {target!r} '
                            f'(also {os.path.basename(mask_of[target])}); keep one')
    mask_of[target] = mpath
  pairs = [Pair(stem, images[stem], mask_of.get(stem), official_split) for stem in sorted(images)]
  for mpath in orphan_masks:
    stem = os.path.splitext(os.path.basename(mpath))[0]
    for suf in mask_suffixes:
      if suf and stem.endswith(suf):
        stem = stem[:-len(suf)]
        break
    pairs.append(Pair(stem, None, mpath, official_split))
  ignored = [os.path.join(os.path.basename(image_dir), n) for n in ignored_i]
  ignored += [os.path.join(os.path.basename(mask_dir), n) for n in ignored_m]
  return sorted(pairs, key=lambda p: p.case_id), ignored


def check_pairs(pairs: Sequence[Pair]) -> None:
  """Stops (BuildInputError) on the first missing image / mask, or a duplicate case id."""
  seen = set()
  for p in pairs:
    if p.mask is None:
      raise BuildInputError(
          f'{p.image}: missing mask (no {p.case_id}, {p.case_id}_mask or '
          f'{p.case_id}_segmentation .png/.jpg/.bmp/.tif in the masks folder)')
    if p.image is None:
      raise BuildInputError(f'{p.mask}: missing image (no image file with stem {p.case_id!r} '
                            f'in the images folder)')
    if p.case_id in seen:
      raise BuildInputError(f'{p.image}: duplicate case id {p.case_id!r}')
    seen.add(p.case_id)


def _image_mode(path: str) -> tuple[str | None, str | None, int]:
  """(Pillow mode, format, EXIF orientation) from the header only; (None, None, 1) if unreadable."""
  try:
    with Image.open(path) as im:
      try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
      except Exception:
        orientation = 1
      has_transparency = 'transparency' in im.info
      mode = im.mode
      if mode == 'P' and has_transparency:
        mode = 'PA'
      return mode, im.format, orientation
  except Exception:
    return None, None, 1


def image_rules(mode: str | None) -> list[str]:
  """Report keys of the conversion rules read_image applies to an image of Pillow `mode`."""
  if mode is None or mode == 'RGB':
    return []
  rules = []
  if mode in ('1', 'L', 'LA', 'La', 'I', 'F') or mode.startswith('I;16'):
    rules.append('grey_to_rgb')
  if mode == 'I' or mode.startswith('I;16'):
    rules.append('bit16_scaled_to_8bit')
  if mode in ('RGBA', 'RGBX', 'LA', 'La', 'PA', 'RGBa'):
    rules.append('alpha_dropped')
  if mode in ('P', 'PA'):
    rules.append('palette_to_rgb')
  if not rules:
    rules.append(f'mode_{mode}_to_rgb')
  return rules


def mask_rules(mode: str | None) -> list[str]:
  """Report keys of the conversion rules read_mask applies to a mask of Pillow `mode`."""
  if mode is None or mode in ('1', 'L'):
    return []
  if mode == 'I' or mode.startswith('I;16'):
    return ['masks_16bit_scaled_to_8bit']
  if mode in ('LA', 'La'):
    return ['masks_alpha_dropped']
  return [f'masks_{mode}_collapsed_max_channel']


class LesionSegBuilder(CodePathMixin, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: a folder of images + masks -> ArrayRecord examples with the shared schema.

  Subclasses set DATASET, ORGAN, MODALITY, MANUAL_DOWNLOAD_INSTRUCTIONS and implement
  `list_pairs(manual_dir)`. Splits come, in order of preference, from the official folders
  (pairs carry `official_split`), from split files (`split_dir()`), or are computed on the fly
  with data_prep.splitting (seed 0, ratios 0.7/0.1/0.2, or k-fold for `foldK` configs).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DATASET = ''
  ORGAN = ''
  MODALITY = ''
  IMAGE_ENCODING = 'jpeg'
  KFOLD = 5
  SPLIT_SEED = 0
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Place images/ and masks/ folders in the manual dir.'

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', FILE_FORMAT)
    super().__init__(**kwargs)
    self.show_progress = False
    self._stats: collections.Counter = collections.Counter()
    self._report: dict = {}

  # ---- hooks -------------------------------------------------------------------------------
  @classmethod
  def list_pairs(cls, manual_dir: str) -> tuple[list[Pair], list[str]]:
    """(pairs sorted by case id, ignored non-image file names) found in `manual_dir`."""
    raise NotImplementedError

  def example_metadata(self, manual_dir: str) -> dict[str, str]:
    return {'dataset': self.DATASET or self.name, 'organ': self.ORGAN, 'modality': self.MODALITY}

  def fold(self) -> int | None:
    cfg = self.builder_config
    if cfg is not None and cfg.name.startswith('fold') and cfg.name[4:].isdigit():
      return int(cfg.name[4:])
    return None

  def split_dir(self, manual_dir: str) -> str:
    """Committed split files: data_prep/splits/<name>[/foldK]."""
    d = os.path.join(SPLITS_ROOT, self.name)
    f = self.fold()
    return os.path.join(d, f'fold{f}') if f is not None else d

  # ---- TFDS --------------------------------------------------------------------------------
  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=features(self.IMAGE_ENCODING),
                                          supervised_keys=('image', 'mask'))

  def assign(self, pairs: Sequence[Pair], manual_dir: str) -> tuple[dict[str, list[Pair]], str]:
    """({split: [pairs]}, description of where the split came from); fills unassigned stats."""
    by_id = {p.case_id: p for p in pairs}
    f = self.fold()
    if f is None and pairs and all(p.official_split for p in pairs):
      splits = {s: [p.case_id for p in pairs if p.official_split == s] for s in splitting.SPLITS}
      source = 'official split (folders)'
    else:
      sdir = self.split_dir(manual_dir)
      splits = splitting.read_split_files(sdir)
      source = f'split files {sdir}'
      if splits is None:
        groups = splitting.compute_groups({p.case_id: p.image for p in pairs}, manual_dir)
        if f is not None:
          folds = splitting.kfold_splits(groups, k=self.KFOLD, seed=self.SPLIT_SEED)
          if f >= len(folds):
            raise BuildInputError(f'{sdir}: fold {f} does not exist (k={self.KFOLD})')
          splits = folds[f]
          source = f'computed on the fly (kfold k={self.KFOLD} fold {f}, seed {self.SPLIT_SEED})'
        else:
          splits = splitting.assign_splits(groups, seed=self.SPLIT_SEED)
          source = f'computed on the fly (seed {self.SPLIT_SEED}, ratios 0.7/0.1/0.2)'
    where: dict[str, str] = {}
    for s, ids in splits.items():
      for cid in ids:
        if cid in where:
          raise BuildInputError(f'{source}: case {cid!r} is listed in both {where[cid]} and {s}')
        where[cid] = s
    unknown = sorted(set(where) - set(by_id))
    if unknown:
      raise BuildInputError(f'{source}: {len(unknown)} listed case ids have no image/mask pair in '
                            f'{manual_dir} (first: {unknown[0]!r}); fix the data or re-run '
                            f'`python -m data_prep.make_splits {self.name} --manual_dir=...`')
    unassigned = sorted(set(by_id) - set(where))
    self._report['unassigned'] = len(unassigned)
    self._report['unassigned_ids'] = unassigned[:20]
    out = {s: [by_id[c] for c in sorted(ids)] for s, ids in splits.items()}
    return out, source

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(manual_dir):
      raise BuildInputError(f'{manual_dir}: manual dir not found ({self.name}: '
                            f'{" ".join(self.MANUAL_DOWNLOAD_INSTRUCTIONS.split())})')
    pairs, ignored = self.list_pairs(manual_dir)
    check_pairs(pairs)
    if not pairs:
      raise BuildInputError(f'{manual_dir}: no image/mask pairs found')
    self._stats = collections.Counter()
    self._report.update({
        'dataset': self.name,
        'config': self.builder_config.name if self.builder_config else None,
        'manual_dir': manual_dir,
        'pairs_found': len(pairs),
        'ignored_non_image_files': ignored,
    })
    by_split, source = self.assign(pairs, manual_dir)
    self._report['split_source'] = source
    self._report['empty_splits'] = [s for s in splitting.SPLITS if not by_split.get(s)]
    meta = self.example_metadata(manual_dir)
    return {s: self._generate_examples(by_split[s], s, meta)
            for s in splitting.SPLITS if by_split.get(s)}

  def _generate_examples(self, pairs: Sequence[Pair], split: str, meta: dict) -> Iterator:
    for p in tqdm(pairs, desc=f'{self.name} {split}', unit='ex', disable=not self.show_progress,
                  leave=True, dynamic_ncols=True):
      image_bytes, mask_png = self.read_pair(p)
      self._stats['read'] += 1
      self._stats[f'written_{split}'] += 1
      yield p.case_id, {'image': image_bytes, 'mask': mask_png, 'case_id': p.case_id, **meta}

  def read_pair(self, p: Pair) -> tuple[bytes, bytes]:
    """Reads + checks one pair; returns (encoded image, PNG mask). Counts applied rules."""
    mode, fmt, orientation = _image_mode(p.image)
    try:
      image = image_io.read_image(p.image)
      mask, info = image_io.read_mask(p.mask)
    except image_io.ImageReadError as e:
      raise BuildInputError(str(e)) from None
    if mask.shape != image.shape[:2]:
      raise BuildInputError(f'{p.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from '
                            f'image {os.path.basename(p.image)} size {image.shape[1]}x{image.shape[0]}')
    for rule in image_rules(mode):
      self._stats[rule] += 1
    if orientation not in (1,):
      self._stats['exif_orientation_applied'] += 1
    if info['non_binary']:
      self._stats['non_binary_masks'] += 1
    if info['rule'] == 'exact_0_1':
      self._stats['masks_0_1_values'] += 1
    for rule in mask_rules(info.get('original_mode')):
      self._stats[rule] += 1
    if not mask.any():
      self._stats['empty_masks'] += 1
    if mode == 'RGB' and fmt == 'JPEG' and orientation == 1:
      with open(p.image, 'rb') as f:
        image_bytes = f.read()  # stored unchanged (lossless w.r.t. the source)
      self._stats['images_stored_unchanged'] += 1
    elif fmt == 'JPEG':
      image_bytes = encode_jpeg(image)
      self._stats['images_reencoded_jpeg'] += 1
    else:
      image_bytes = encode_png(image)
      self._stats['images_reencoded_png'] += 1
    return image_bytes, encode_png(mask[..., None])

  # ---- report ------------------------------------------------------------------------------
  def build_report(self) -> dict:
    """Counts of the last download_and_prepare (or of the stored splits when already built)."""
    rep = {'dataset': self.name,
           'config': self.builder_config.name if self.builder_config else None,
           **self._report}
    rep['data_dir'] = os.fspath(self.data_dir)
    stats = dict(self._stats)
    written = {s: stats.pop(f'written_{s}', 0) for s in splitting.SPLITS}
    if not stats.get('read') and self.is_prepared():
      written = {s: int(self.info.splits[s].num_examples) if s in self.info.splits else 0
                 for s in splitting.SPLITS}
      rep.setdefault('already_built', True)
    rep['read'] = stats.pop('read', 0)
    rep['written'] = written
    rep['written_total'] = sum(written.values())
    rep['rules'] = dict(sorted(stats.items()))
    return rep


def format_report(rep: dict) -> str:
  """Human-readable multi-line build report."""
  lines = [f"== {rep.get('dataset')}" + (f"/{rep['config']}" if rep.get('config') else '')
           + f"  ->  {rep.get('data_dir')}"]
  if rep.get('already_built'):
    lines.append('  already built (nothing read; --overwrite rebuilds); counts from the stored dataset')
  if 'pairs_found' in rep:
    lines.append(f"  pairs found: {rep['pairs_found']}   read: {rep['read']}   "
                 f"unassigned (in no split, not written): {rep.get('unassigned', 0)}")
    if rep.get('unassigned_ids'):
      lines.append(f"  unassigned ids (first {len(rep['unassigned_ids'])}): "
                   + ', '.join(rep['unassigned_ids']))
  w = rep.get('written', {})
  lines.append('  written: ' + ', '.join(f'{s}={n}' for s, n in w.items())
               + f"   total={rep.get('written_total', 0)}")
  if rep.get('split_source'):
    lines.append(f"  splits: {rep['split_source']}")
  if rep.get('empty_splits'):
    lines.append(f"  empty splits (not written): {', '.join(rep['empty_splits'])}")
  if rep.get('ignored_non_image_files'):
    ig = rep['ignored_non_image_files']
    lines.append(f"  ignored non-image files ({len(ig)}): " + ', '.join(ig[:10])
                 + (' ...' if len(ig) > 10 else ''))
  rules = rep.get('rules') or {}
  if rules:
    lines.append('  input rules applied: ' + ', '.join(f'{k}={v}' for k, v in rules.items()))
  if 'seconds' in rep:
    lines.append(f"  time: {rep['seconds']:.1f} s")
  return '\n'.join(lines)
