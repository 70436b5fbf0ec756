"""Build datasets into TFDS ArrayRecord files.

  python -m data_prep.build kvasir_seg --manual_dir=../shared/data/kvasir_seg [--data_dir=DIR]
  python -m data_prep.build kvasir_seg ph2 busi        # manual dirs default to ../shared/data/<name>
  python -m data_prep.build synthetic_lesions          # procedural; also 'synthetic_lesions/tiny'

--data_dir defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets. An already built dataset is kept
(use --overwrite to rebuild). Ends with a report per dataset: pairs found/read, written per split,
unassigned cases, and how often each input rule was applied. An input problem that stops the build
is printed as one line (file + problem) and the exit status is 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types


class _CallableModule(types.ModuleType):
  """Importing this submodule rebinds `data_prep.build` (the API function) to the module;
  calling the module calls the function, so `data_prep.build(name, data_dir, ...)` keeps working."""

  def __call__(self, *args, **kwargs):
    from data_prep import _build  # pylint: disable=g-import-not-at-top
    return _build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m data_prep.build', description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('names', nargs='+', metavar='NAME', help='dataset[/config]')
  ap.add_argument('--manual_dir', default=None,
                  help='raw data folder (only with a single NAME; default ../shared/data/<name>)')
  ap.add_argument('--data_dir', default=None, help='TFDS data dir (default $TFDS_DATA_DIR or '
                  '~/tensorflow_datasets)')
  ap.add_argument('--overwrite', action='store_true', help='rebuild even if already built')
  args = ap.parse_args(argv)
  if args.manual_dir is not None and len(args.names) > 1:
    print('error: --manual_dir applies to one dataset; build them one by one', file=sys.stderr)
    return 2
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir or default_data_dir()))

  import data_prep  # pylint: disable=g-import-not-at-top  (slow: tensorflow_datasets)
  try:
    for n in args.names:
      data_prep.parse_name(n)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  reports = []
  t0 = time.perf_counter()
  for n in args.names:
    try:
      reports.append(data_prep.build(n, data_dir, args.manual_dir, overwrite=args.overwrite))
    except (data_prep.BuildInputError, ValueError) as e:
      print(f'error: {n}: {e}', file=sys.stderr)
      return 1
  print()
  for rep in reports:
    print(data_prep.format_report(rep))
  if len(reports) > 1:
    print(f'total time: {time.perf_counter() - t0:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
