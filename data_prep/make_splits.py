"""Create the committed split files of a dataset (seeded, group-aware; see README.md "Splits").

  python -m data_prep.make_splits kvasir_seg --manual_dir=../shared/data/kvasir_seg
  python -m data_prep.make_splits ph2 --manual_dir=../shared/data/ph2 --kfold=5
  python -m data_prep.make_splits lgg_brain_mri --manual_dir=../shared/data/lgg_brain_mri
  python -m data_prep.make_splits ddti_thyroid_us --manual_dir=../shared/data/ddti_thyroid_us

Writes data_prep/splits/<dataset>/{train,val,test}.txt (or .../fold{k}/{train,val,test}.txt with
--kfold=K) plus SPLIT_INFO.json recording the parameters and counts. lesion_folder writes to
<manual_dir>/splits/ (where its builder looks). isic2018 with all official folders writes the
official split (seed/ratios unused). lgg_brain_mri / ddti_thyroid_us also keep every patient / case
on one side (the builder's `split_groups`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from data_prep import splitting
from data_prep.base import SPLITS_ROOT, BuildInputError, check_pairs


def make_splits(dataset: str, manual_dir: str, *, seed: int = 0,
                ratios=splitting.DEFAULT_RATIOS, kfold: int = 0,
                out_dir: str | None = None) -> dict:
  """Computes and writes split files; returns a summary dict."""
  import data_prep  # pylint: disable=g-import-not-at-top
  base, _ = data_prep.parse_name(dataset)
  cls = data_prep.DATASETS[base].builder_cls
  if not data_prep.DATASETS[base].needs_manual_dir:
    raise ValueError(f"{base} is procedural; its splits are fixed by seed, nothing to write")
  manual_dir_arg = manual_dir
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  if not os.path.isdir(manual_dir):
    raise BuildInputError(f'{manual_dir}: manual dir not found')
  if out_dir is None:
    out_dir = (os.path.join(manual_dir, 'splits') if base == 'lesion_folder'
               else os.path.join(SPLITS_ROOT, base))
  pairs, _ = cls.list_pairs(manual_dir)
  check_pairs(pairs)
  if not pairs:
    raise BuildInputError(f'{manual_dir}: no image/mask pairs found')
  case_images = {p.case_id: p.image for p in pairs}
  grouper = getattr(cls, 'split_groups', None)
  groups = (grouper(case_images, manual_dir) if grouper
            else splitting.compute_groups(case_images, manual_dir))
  info = {'dataset': base,
          'n_cases': len(pairs), 'n_groups': len(groups),
          'n_cases_in_multi_case_groups': sum(len(g) for g in groups if len(g) > 1),
          'command': ' '.join(['python -m data_prep.make_splits', base,
                               f'--manual_dir={manual_dir_arg}', f'--seed={seed}',
                               f'--ratios={",".join(str(r) for r in ratios)}']
                              + ([f'--kfold={kfold}'] if kfold else []))}
  if grouper:
    info['grouped_by'] = cls.GROUP_RULE
    info[f"n_{cls.GROUP_UNIT.replace(' ', '_')}s"] = len({cls.PATIENT(c) for c in case_images})
  written = []
  if all(p.official_split for p in pairs) and not kfold:
    splits = {s: sorted(p.case_id for p in pairs if p.official_split == s)
              for s in splitting.SPLITS}
    info['procedure'] = 'official split (folders)'
    info['counts'] = {s: len(v) for s, v in splits.items()}
    splitting.write_split_files(out_dir, splits)
    written.append(out_dir)
  elif kfold:
    folds = splitting.kfold_splits(groups, k=kfold, seed=seed, val_ratio=ratios[1] / sum(ratios))
    info['procedure'] = f'group-aware {kfold}-fold, seed {seed}'
    info['counts'] = {}
    for k, f in enumerate(folds):
      d = os.path.join(out_dir, f'fold{k}')
      splitting.write_split_files(d, f)
      written.append(d)
      info['counts'][f'fold{k}'] = {s: len(v) for s, v in f.items()}
  else:
    splits = splitting.assign_splits(groups, ratios=ratios, seed=seed)
    info['procedure'] = f'group-aware ratio split, seed {seed}'
    info['counts'] = {s: len(v) for s, v in splits.items()}
    splitting.write_split_files(out_dir, splits)
    written.append(out_dir)
  info_dir = out_dir
  name = 'SPLIT_INFO_kfold.json' if kfold else 'SPLIT_INFO.json'
  with open(os.path.join(info_dir, name), 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=1, sort_keys=True)
    f.write('\n')
  info['written'] = written
  return info


def _ratios(text: str):
  try:
    r = tuple(float(x) for x in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'--ratios expects 3 comma-separated numbers, got {text!r}')
  if len(r) != 3 or min(r) < 0 or sum(r) <= 0:
    raise argparse.ArgumentTypeError(f'--ratios expects 3 non-negative numbers, got {text!r}')
  return r


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m data_prep.make_splits', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('dataset')
  ap.add_argument('--manual_dir', required=True)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--ratios', type=_ratios, default=splitting.DEFAULT_RATIOS)
  ap.add_argument('--kfold', type=int, default=0, help='write fold{k}/ splits (k-fold CV)')
  ap.add_argument('--out_dir', default=None)
  args = ap.parse_args(argv)
  try:
    info = make_splits(args.dataset, args.manual_dir, seed=args.seed, ratios=args.ratios,
                       kfold=args.kfold, out_dir=args.out_dir)
  except (BuildInputError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f"{info['dataset']}: {info['n_cases']} cases in {info['n_groups']} groups "
        f"({info['n_cases_in_multi_case_groups']} cases share a group); {info['procedure']}")
  print(f"  counts: {json.dumps(info['counts'])}")
  for d in info['written']:
    print(f'  wrote {d}/{{train,val,test}}.txt')
  return 0


if __name__ == '__main__':
  sys.exit(main())
