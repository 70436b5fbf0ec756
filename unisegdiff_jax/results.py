"""Markdown results table from finished runs: `python -m unisegdiff_jax.results runs/unified_cpu runs/polyp_cpu`.

One row per (run, dataset) with the diffusion model's and the phase-0 segmenter's Dice / IoU / HD95, read
from `<workdir>/eval/<split>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _fmt(block: dict | None, key: str, percent: bool) -> str:
  if not block or key not in block:
    return '–'
  return f'{100 * block[key]:.1f}' if percent else f'{block[key]:.1f}'


def table(workdirs: list[str], split: str = 'test') -> str:
  lines = ['| run | dataset | n | Dice (diffusion) | IoU | HD95 px | Dice (segmenter) | IoU | HD95 px | NFE | s/image |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for workdir in workdirs:
    path = os.path.join(workdir, 'eval', split, 'summary.json')
    with open(path) as f:
      summary = json.load(f)
    segmenter = summary.get('pretrained_segmenter', {})
    rows = list(summary['datasets'].items()) + ([('**mean**', summary['mean'])] if len(summary['datasets']) > 1 else [])
    for name, block in rows:
      seg = segmenter.get('datasets', {}).get(name) if name != '**mean**' else segmenter.get('mean')
      lines.append('| ' + ' | '.join([
          os.path.basename(os.path.normpath(workdir)), name, str(block.get('n', '')),
          _fmt(block, 'dice', True), _fmt(block, 'iou', True), _fmt(block, 'hd95', False),
          _fmt(seg, 'dice', True), _fmt(seg, 'iou', True), _fmt(seg, 'hd95', False),
          str(summary.get('nfe_per_image', '')), f"{summary.get('seconds_per_image', 0):.3f}"]) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--split', default='test')
  args = parser.parse_args(argv)
  try:
    print(table(args.workdirs, args.split))
  except (OSError, KeyError, json.JSONDecodeError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
