"""Evaluation: sample, threshold, resize back to native resolution, Dice/IoU/HD95, summary.json + files.

Writes `<out_dir>/summary.json` (the contract other tools read), `per_case.csv` (one row per image) and
`overlays.png` (image / truth / prediction for the first cases).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from unisegdiff_jax import ensemble
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import metrics as metrics_lib


def resize_probability(prob: np.ndarray, height: int, width: int) -> np.ndarray:
  """float [S, S] in [0, 1] -> float [height, width] (bilinear), the native resolution of the image."""
  return np.asarray(Image.fromarray(prob.astype(np.float32), mode='F').resize((width, height), Image.BILINEAR))


def score_cases(cases: Sequence[input_pipeline.EvalCase], probabilities: Sequence[np.ndarray],
                threshold: float) -> list[dict]:
  """One row per case; `missed` = 1 when the truth has a lesion and Dice is exactly 0 (lesion missed)."""
  rows = []
  for case, prob in zip(cases, probabilities):
    pred = prob >= threshold
    row = {'dataset': case.dataset, 'case_id': case.case_id,
           'height': case.mask.shape[0], 'width': case.mask.shape[1]}
    row.update(metrics_lib.segmentation_metrics(pred, case.mask))
    row['ece'] = metrics_lib.expected_calibration_error(prob, case.mask)
    row['missed'] = int(bool(np.any(case.mask)) and row['dice'] == 0.0)
    rows.append(row)
  return rows


def summarise(rows_by_dataset: dict[str, list[dict]]) -> dict:
  """Per-dataset means (`miss_rate` = mean of `missed` over all images) and their unweighted mean."""
  datasets = {}
  for name, rows in rows_by_dataset.items():
    means = metrics_lib.mean_metrics(rows, keys=('dice', 'iou', 'hd95', 'ece'))
    means['miss_rate'] = metrics_lib.mean_metrics(rows, keys=('missed',))['missed']
    datasets[name] = {'n': len(rows), **means}
  keys = ('dice', 'iou', 'hd95', 'ece', 'miss_rate')
  mean = {key: float(np.mean([d[key] for d in datasets.values()])) for key in keys}
  return {'datasets': datasets, 'mean': mean}


def write_per_case_csv(path: str, rows: Sequence[dict]) -> None:
  fields = ['dataset', 'case_id', 'height', 'width', 'dice', 'iou', 'hd95', 'ece', 'missed']
  with epath.Path(path).open('w') as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f'{v:.6f}' if isinstance(v, float) else v) for k, v in row.items()})


def _tile(array: np.ndarray, size: int) -> Image.Image:
  return Image.fromarray(array).convert('RGB').resize((size, size), Image.BILINEAR)


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
  """The image with `mask` tinted in `colour` and its boundary drawn opaque."""
  out = image.astype(np.float32).copy()
  tint = np.asarray(colour, np.float32)
  out[mask] = (1 - alpha) * out[mask] + alpha * tint
  inner = mask.copy()
  inner[1:, :] &= mask[:-1, :]
  inner[:-1, :] &= mask[1:, :]
  inner[:, 1:] &= mask[:, :-1]
  inner[:, :-1] &= mask[:, 1:]
  out[mask & ~inner] = tint
  return out.clip(0, 255).astype(np.uint8)


def write_overlay_grid(path: str, cases: Sequence[input_pipeline.EvalCase],
                       probabilities: Sequence[np.ndarray], threshold: float, tile: int = 128) -> None:
  """One row per case: image | ground truth (green) | prediction (red) with its Dice."""
  if not cases:
    return
  grid = Image.new('RGB', (3 * tile, len(cases) * tile), 'white')
  for row, (case, prob) in enumerate(zip(cases, probabilities)):
    pred = prob >= threshold
    image = case.image
    if image.shape[:2] != case.mask.shape:  # a resized pack: show the image at the mask's native size
      image = np.asarray(Image.fromarray(image).resize(case.mask.shape[::-1], Image.BILINEAR))
    panels = [image, overlay(image, case.mask, (40, 220, 40)), overlay(image, pred)]
    for col, panel in enumerate(panels):
      grid.paste(_tile(panel, tile), (col * tile, row * tile))
  with epath.Path(path).open('wb') as f:
    grid.save(f, format='PNG')


def evaluate(engine, params, config: ml_collections.ConfigDict, split: str, out_dir: str | None, *, step: int,
             nfe: int, rng: jax.Array, max_examples: int = 0, extra: dict | None = None) -> dict:
  """Evaluates `engine` (an `inference.Engine`: sampler, ensemble, fusion, threshold) with `params` on `split`
  of every configured dataset; process 0 writes the files when out_dir is given.

  `extra` fields are added to the summary (e.g. the pre-trained segmenter's block).
  """
  settings = engine.settings
  threshold = ensemble.mask_threshold(settings.fusion, settings.threshold)
  cases_by_dataset = input_pipeline.eval_cases(config, split, max_examples)
  rows_by_dataset, all_rows, overlay_cases, overlay_probs = {}, [], [], []
  seconds_total, count = 0.0, 0
  per_dataset_overlays = max(1, config.train.num_overlay_cases // max(len(cases_by_dataset), 1))
  for name, cases in cases_by_dataset.items():
    probs, seconds = engine.segment_cases(params, cases, rng)
    rows = score_cases(cases, probs, threshold)
    rows_by_dataset[name] = rows
    all_rows.extend(rows)
    seconds_total += seconds * len(cases)
    count += len(cases)
    overlay_cases.extend(cases[:per_dataset_overlays])
    overlay_probs.extend(probs[:per_dataset_overlays])
  summary = summarise(rows_by_dataset)
  summary.update({
      'split': split, 'sampler': settings.sampler, 'nfe_per_image': int(nfe),
      'ensemble_size': int(settings.ensemble_size), 'seconds_per_image': seconds_total / max(count, 1),
      'checkpoint_step': int(step), 'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
  })
  summary.update(extra or {})
  if out_dir is not None and jax.process_index() == 0:
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)  # a local path or gs://
    epath.Path(out_dir, 'summary.json').write_text(json.dumps(summary, indent=2))
    write_per_case_csv(os.path.join(out_dir, 'per_case.csv'), all_rows)
    write_overlay_grid(os.path.join(out_dir, 'overlays.png'), overlay_cases, overlay_probs, threshold)
  return summary
