"""The README results table is generated from summary.json files."""

import json
import os

from unisegdiff_jax import results


def _write(workdir, datasets, segmenter=None):
  os.makedirs(os.path.join(workdir, 'eval', 'test'))
  summary = {'datasets': datasets, 'nfe_per_image': 10, 'seconds_per_image': 0.02,
             'mean': {k: sum(d[k] for d in datasets.values()) / len(datasets) for k in ('dice', 'iou', 'hd95')}}
  if segmenter:
    summary['pretrained_segmenter'] = {'datasets': segmenter, 'mean': {'dice': 0.5, 'iou': 0.4, 'hd95': 9.0}}
  with open(os.path.join(workdir, 'eval', 'test', 'summary.json'), 'w') as f:
    json.dump(summary, f)


def test_table_lists_every_dataset_and_the_mean(tmp_path):
  run = str(tmp_path / 'unified')
  _write(run, {'a': {'n': 3, 'dice': 0.8, 'iou': 0.7, 'hd95': 4.0}, 'b': {'n': 2, 'dice': 0.6, 'iou': 0.5, 'hd95': 8.0}},
         {'a': {'dice': 0.75, 'iou': 0.6, 'hd95': 5.0}})
  text = results.table([run])
  lines = text.splitlines()
  assert len(lines) == 2 + 3
  assert '| unified | a | 3 | 80.0 | 70.0 | 4.0 | 75.0 | 60.0 | 5.0 | 10 |' in text
  assert '| unified | b | 2 | 60.0 | 50.0 | 8.0 | – | – | – |' in text
  assert '**mean**' in lines[-1] and '70.0' in lines[-1]


def test_missing_run_is_an_error(tmp_path, capsys):
  assert results.main([str(tmp_path / 'nothing')]) == 1
  assert 'error:' in capsys.readouterr().err
