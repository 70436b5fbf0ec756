"""Dataset preparation: TFDS ArrayRecord builders, committed splits, build CLI.

Public API (used by unisegdiff_jax.input_pipeline):

  DATASETS                              name -> DatasetInfo(builder_cls, organ, modality,
                                        needs_manual_dir, manual_dir_hint, layout_hint)
  DatasetNotBuiltError, BuildInputError one-line errors
  get_builder(name, data_dir)           name may carry a config: 'synthetic_lesions/tiny', 'ph2/fold0'
  is_built(name, data_dir) -> bool
  ensure_built(name, data_dir)          builds synthetic_lesions on first use; manual datasets raise
                                        DatasetNotBuiltError when not built
  build(name, data_dir, manual_dir=None, *, overwrite=False, progress=True) -> report dict

Read a built split with `get_builder(name, data_dir).as_data_source(split='train')` or
`tfds.data_source(name, data_dir=data_dir, split='train')` (after `import data_prep`).
See data_prep/README.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time

import tensorflow_datasets as tfds

from data_prep.base import BuildInputError, FILE_FORMAT, LesionSegBuilder, format_report
from data_prep.real_datasets import (Busi, DdtiThyroidUs, Isic2018, KvasirSeg, LesionFolder,
                                     LggBrainMri, Ph2)
from data_prep.synthetic_lesions import SyntheticLesions

__all__ = ['DATASETS', 'DatasetInfo', 'DatasetNotBuiltError', 'BuildInputError', 'get_builder',
           'is_built', 'ensure_built', 'build', 'format_report', 'parse_name', 'REPO_ROOT']

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  builder_cls: type
  organ: str
  modality: str
  needs_manual_dir: bool
  manual_dir_hint: str   # default --manual_dir, relative to the repository root
  layout_hint: str       # what must be in the manual dir


_FOLDER = 'raw images/ + masks/ folder expected there'
DATASETS: dict[str, DatasetInfo] = {
    'synthetic_lesions': DatasetInfo(SyntheticLesions, 'skin,breast,colon',
                                     'dermoscopy,ultrasound,endoscopy', False, '',
                                     'procedural, no raw data needed'),
    'kvasir_seg': DatasetInfo(KvasirSeg, 'colon', 'colonoscopy', True,
                              '../shared/data/kvasir_seg', _FOLDER),
    'ph2': DatasetInfo(Ph2, 'skin', 'dermoscopy', True, '../shared/data/ph2', _FOLDER),
    'busi': DatasetInfo(Busi, 'breast', 'ultrasound', True, '../shared/data/busi', _FOLDER),
    'lgg_brain_mri': DatasetInfo(LggBrainMri, 'brain', 'MRI', True, '../shared/data/lgg_brain_mri',
                                 _FOLDER),
    'ddti_thyroid_us': DatasetInfo(DdtiThyroidUs, 'thyroid', 'ultrasound', True,
                                   '../shared/data/ddti_thyroid_us', _FOLDER),
    'isic2018': DatasetInfo(Isic2018, 'skin', 'dermoscopy', True, '<ISIC2018 folder>',
                            'official ISIC2018_Task1-2_Training_Input/ + '
                            'ISIC2018_Task1_Training_GroundTruth/ folders expected there'),
    'lesion_folder': DatasetInfo(LesionFolder, 'unknown', 'unknown', True, '<folder>', _FOLDER),
}


class DatasetNotBuiltError(RuntimeError):
  """A manual-download dataset that is not built yet; `str(err)` is one line with the command."""


def parse_name(name: str) -> tuple[str, str | None]:
  """'synthetic_lesions/tiny' -> ('synthetic_lesions', 'tiny'); unknown base -> ValueError."""
  base, _, config = name.strip().partition('/')
  if base not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))} "
                     f"(a config may follow a slash, e.g. 'synthetic_lesions/tiny', 'ph2/fold0')")
  return base, (config or None)


def get_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The builder of `name` ('<dataset>[/<config>]') rooted at `data_dir` (no registry lookup)."""
  base, config = parse_name(name)
  cls = DATASETS[base].builder_cls
  known = [c.name for c in (cls.BUILDER_CONFIGS or [])]
  if config is not None and config not in known:
    if cls is LesionFolder:  # any name: one folder per config
      return cls(data_dir=data_dir, config=tfds.core.BuilderConfig(name=config))
    raise ValueError(f"dataset {base!r} has no config {config!r}; configs: "
                     f"{', '.join(known) if known else '(none)'}")
  return cls(data_dir=data_dir, config=config) if config else cls(data_dir=data_dir)


def is_built(name: str, data_dir: str) -> bool:
  return bool(get_builder(name, data_dir).is_prepared())


def _build_command(name: str, data_dir: str) -> str:
  info = DATASETS[parse_name(name)[0]]
  manual = f' --manual_dir={info.manual_dir_hint}' if info.needs_manual_dir else ''
  return f'python -m data_prep.build {name}{manual} --data_dir={data_dir}'


def ensure_built(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Builder of a prepared dataset; builds synthetic_lesions on first use."""
  base, _ = parse_name(name)
  builder = get_builder(name, data_dir)
  if builder.is_prepared():
    return builder
  info = DATASETS[base]
  if info.needs_manual_dir:
    raise DatasetNotBuiltError(
        f"dataset '{name}' is not built in {data_dir}: run `{_build_command(name, data_dir)}` "
        f"({info.layout_hint})")
  print(f"data_prep: building '{name}' into {data_dir} (first use; procedural, takes seconds)",
        flush=True)
  _prepare(builder, None, overwrite=False, progress=False)
  return builder


def _resolve_manual_dir(base: str, manual_dir: str | None) -> str | None:
  info = DATASETS[base]
  if not info.needs_manual_dir:
    return None
  if manual_dir is None:
    hint = info.manual_dir_hint
    candidate = os.path.normpath(os.path.join(REPO_ROOT, hint))
    if hint.startswith('<') or not os.path.isdir(candidate):
      raise ValueError(f"dataset '{base}' needs --manual_dir ({info.layout_hint})")
    return candidate
  return os.path.abspath(os.path.expanduser(manual_dir))


def _find_build_error(e: BaseException) -> BuildInputError | None:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, BuildInputError):
      return e
    e = e.__cause__ or e.__context__
  return None


def _prepare(builder, manual_dir: str | None, *, overwrite: bool, progress: bool) -> None:
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
  if hasattr(builder, 'show_progress'):
    builder.show_progress = progress
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  was_active = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.disable_progress_bar()  # our own tqdm bar replaces TFDS's per-split bars
  try:
    # TFDS prints 'Downloading and preparing ...' / 'Dataset ... prepared' lines: silenced, our
    # callers print one line (ensure_built) or the report (build).
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=config, file_format=FILE_FORMAT)
  except Exception as e:  # surface our one-line input errors unwrapped
    err = _find_build_error(e)
    if err is not None and err is not e:
      raise BuildInputError(str(err)) from None
    raise
  finally:
    if was_active:
      tqdm_utils.enable_progress_bar()


def _build(name: str, data_dir: str, manual_dir: str | None = None, *,
           overwrite: bool = False, progress: bool = True) -> dict:
  """Builds `name` into `data_dir` (reads `manual_dir` for real datasets); returns the report.

  manual_dir=None uses DATASETS[name].manual_dir_hint (relative to the repo root) if present.
  An already built dataset is not rebuilt unless overwrite=True (the report then says so).
  """
  base, _ = parse_name(name)
  manual_dir = _resolve_manual_dir(base, manual_dir)
  builder = get_builder(name, data_dir)
  t0 = time.perf_counter()
  _prepare(builder, manual_dir, overwrite=overwrite, progress=progress)
  seconds = time.perf_counter() - t0
  if isinstance(builder, LesionSegBuilder):
    report = builder.build_report()
  else:
    report = {'dataset': base, 'config': builder.builder_config.name
              if builder.builder_config else None, 'data_dir': os.fspath(builder.data_dir)}
    written = {s: int(v.num_examples) for s, v in builder.info.splits.items()}
    report.update(read=sum(written.values()), written=written,
                  written_total=sum(written.values()), rules={})
  report['name'] = name
  report['seconds'] = seconds
  return report


# `data_prep.build` is both this function and the CLI submodule (`python -m data_prep.build`).
# Importing the submodule rebinds the package attribute to the module; that module is callable
# (see data_prep/build.py), so `data_prep.build(...)` works either way.
build = _build
