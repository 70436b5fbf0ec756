"""`--mode=predict`: segment image files with a trained checkpoint.

    python main.py --mode=predict --config=configs/synthetic.py --workdir=runs/synthetic \
        --input=PATH --output=DIR [--checkpoint_step=N]

PATH is one image file or a folder (its files, not sub-folders; jpg, png, bmp, tif; grey or RGB; any
size). For each image, at its native resolution, DIR gets

    <name>_mask.png         the lesion mask, 0 / 255
    <name>_prob.png         the (fused) foreground probability * 255
    <name>_uncertainty.png  per-pixel uncertainty * 255 (ensemble: 2 * std across members; a single
                            sample: the binary entropy of the probability, in bits)
    <name>_overlay.png      the image with the mask tinted red

and DIR/predictions.csv has one row per image: name, height, width, lesion_area_fraction,
mean_uncertainty, seconds. A file that cannot be read gets one line on stderr, `skipped <path>: <problem>`,
the others are still processed, and the exit status is 1. The checkpoint is the best one by validation
Dice unless --checkpoint_step picks another; sampler and ensemble come from config.sampling.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from unisegdiff_jax import config_checks
from unisegdiff_jax import ensemble
from unisegdiff_jax import evaluate as evaluate_lib
from unisegdiff_jax import image_io
from unisegdiff_jax import inference
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import phases

OUTPUT_SUFFIXES = ('_mask.png', '_prob.png', '_uncertainty.png', '_overlay.png')
CSV_NAME = 'predictions.csv'
CSV_FIELDS = ('name', 'height', 'width', 'lesion_area_fraction', 'mean_uncertainty', 'seconds')


def validate(config: ml_collections.ConfigDict):
  """(process, settings): the config checks plus the sampler / ensemble settings."""
  return config_checks.validate_config(config), config_checks.sampling_settings(config)


def restore_params(config: ml_collections.ConfigDict, workdir: str, checkpoint_step: int | None, process
                   ) -> tuple[object, object, int]:
  """(model, EMA params, step) of the diffusion checkpoint in `workdir` (best by validation Dice by default);
  only the EMA parameters are read, onto a replicated sharding."""
  runtime = phases.make_runtime(config)
  phase = phases.diffusion_phase(config, workdir, runtime, process)
  params, step = phase.restore_ema(config, runtime, checkpoint_step)
  return phases.diffusion_parts(config, process)[0], params, int(step)


def list_inputs(input_path: str, output_dir: str | None = None) -> list[str]:
  """The files to segment: `input_path` itself, or the regular, non-hidden files of the folder (sorted).

  Files a previous run wrote into `output_dir` (when it is the input folder) are left out.
  """
  if not os.path.exists(input_path):
    raise image_io.ImageReadError(input_path, 'no such file or directory')
  if not os.path.isdir(input_path):
    return [input_path]
  same = output_dir is not None and os.path.abspath(output_dir) == os.path.abspath(input_path)
  files = []
  for entry in sorted(os.listdir(input_path)):
    path = os.path.join(input_path, entry)
    if entry.startswith('.') or not os.path.isfile(path):
      continue
    if same and (entry == CSV_NAME or entry.endswith(OUTPUT_SUFFIXES)):
      continue
    files.append(path)
  if not files:
    raise image_io.ImageReadError(input_path, 'folder has no files to segment')
  return files


def output_names(paths: Sequence[str]) -> list[str]:
  """The file stem of each input; stems shared by several inputs keep their extension ('a_png')."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  out = []
  for path, stem in zip(paths, stems):
    ext = os.path.splitext(path)[1].lstrip('.')
    out.append(f'{stem}_{ext}' if stems.count(stem) > 1 and ext else stem)
  return out


def _to_uint8(values: np.ndarray) -> np.ndarray:
  return np.clip(np.round(np.asarray(values, np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_outputs(output_dir: str, name: str, image: np.ndarray, fused: ensemble.Fused,
                  fusion: str, threshold: float) -> dict:
  """Writes the four PNGs of one image at its native resolution; returns its CSV fields (less seconds)."""
  height, width = image.shape[:2]
  prob = np.clip(evaluate_lib.resize_probability(fused.prob[..., 0], height, width), 0.0, 1.0)
  if fused.ensemble_size > 1:  # 2 * std across members, resized
    uncertainty = np.clip(
        evaluate_lib.resize_probability(fused.uncertainty_map()[..., 0], height, width), 0.0, 1.0)
  else:  # the entropy of the native-resolution probability (not a resized entropy map)
    uncertainty = ensemble.binary_entropy(prob)
  mask = prob >= ensemble.mask_threshold(fusion, threshold)
  image_io.save_png(os.path.join(output_dir, f'{name}_mask.png'), mask)
  image_io.save_png(os.path.join(output_dir, f'{name}_prob.png'), _to_uint8(prob))
  image_io.save_png(os.path.join(output_dir, f'{name}_uncertainty.png'), _to_uint8(uncertainty))
  image_io.save_png(os.path.join(output_dir, f'{name}_overlay.png'), evaluate_lib.overlay(image, mask))
  return {'name': name, 'height': height, 'width': width,
          'lesion_area_fraction': float(mask.mean()), 'mean_uncertainty': float(uncertainty.mean())}


def write_csv(path: str, rows: Sequence[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f'{v:.6f}' if isinstance(v, float) else v) for k, v in row.items()})


def run_predict(config: ml_collections.ConfigDict, workdir: str, input_path: str, output_dir: str, *,
                checkpoint_step: int | None = None, progress: bool = True, stderr=None) -> int:
  """Segments `input_path` (a file or folder) into `output_dir`; returns the exit status (1 if a file failed).

  Raises (one-line user errors) when nothing can run: a bad config, no checkpoint, a missing input.
  """
  stderr = stderr if stderr is not None else sys.stderr
  process, settings = validate(config)
  paths = list_inputs(input_path, output_dir)
  names = output_names(paths)
  model, params, step = restore_params(config, workdir, checkpoint_step, process)
  members_fn, nfe = phases.diffusion_members(model, process, settings)
  engine = inference.Engine(members_fn, settings, image_size=config.data.image_size,
                            batch_size=config.sampling.batch_size)
  writes = jax.process_index() == 0  # every process samples its rows; process 0 writes the files
  try:
    if writes:
      os.makedirs(output_dir, exist_ok=True)
  except OSError as err:
    raise config_checks.ConfigError(f'--output={output_dir} cannot be created: {err.strerror or err}') from None
  size = config.data.image_size
  rng = jax.random.PRNGKey(config.seed)
  engine.compile(params, rng)  # untimed

  rows, failed = [], 0
  bar = tqdm.tqdm(total=len(paths), unit='image', file=stderr, disable=not progress or len(paths) < 2 or not writes,
                  dynamic_ncols=True)
  for chunk in input_pipeline.batched(list(zip(paths, names)), config.sampling.batch_size):
    start = time.perf_counter()
    loaded = []
    for path, name in chunk:
      try:
        loaded.append((path, name, image_io.read_image(path)))
      except image_io.ImageReadError as err:
        failed += 1
        tqdm.tqdm.write(f'skipped {err.path}: {err.problem}', file=stderr)
        bar.update(1)
    if not loaded:
      continue
    images = np.stack([input_pipeline.resize_image(image, size) for _, _, image in loaded])
    output = engine.run(params, images, [name for _, name, _ in loaded], rng)  # noise per image, from its name
    shared = (time.perf_counter() - start) / len(loaded)
    for i, (path, name, image) in enumerate(loaded if writes else ()):
      begin = time.perf_counter()
      try:
        fused = output.fused(i, settings)
        row = write_outputs(output_dir, name, image, fused, settings.fusion, settings.threshold)
      except OSError as err:
        failed += 1
        tqdm.tqdm.write(f'skipped {path}: cannot write outputs ({err.strerror or err})', file=stderr)
      else:
        row['seconds'] = shared + time.perf_counter() - begin
        rows.append(row)
      bar.update(1)
  bar.close()
  if not writes:
    return 1 if failed else 0
  write_csv(os.path.join(output_dir, CSV_NAME), rows)
  print(f'Wrote {len(rows)} prediction(s) to {output_dir} (checkpoint step {step}, {settings.label}, '
        f'ensemble {settings.ensemble_size}/{settings.fusion}, {nfe} NFE/image)'
        + (f'; {failed} file(s) skipped' if failed else ''), flush=True)
  return 1 if failed else 0
