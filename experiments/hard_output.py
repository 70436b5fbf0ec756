"""What a hard network-resolution output costs: the "hard output, soft baseline" hypothesis, measured.

    python -m experiments.hard_output --config=configs/X.py[:args] --workdir=PHASE0_RUN --out=DIR [--split=test]

Scores a phase-0 segmenter (the run's best EMA params) twice on the split: as evaluation does (its soft
probability resized bilinearly to each image's native size, then thresholded) and with the probability
binarised at the network resolution first (then resized and thresholded the same way), which is what a
near-binary diffusion output looks like. The difference between the two is the boundary precision a
near-binary 64-px output gives up; it is broken down by the soft score's Dice band (as the results page does).

Writes DIR/per_case_soft.csv, DIR/per_case_hard.csv and DIR/hard_output.json (means, differences by band).
"""

from __future__ import annotations

import json
import os

import numpy as np

from experiments import report
from unisegdiff_jax import host

# The results page's bands, of the soft score here.
BANDS = tuple((lo, hi, label.replace('phase 0', 'soft')) for lo, hi, label in report.BANDS)


def hard(prob: np.ndarray, threshold: float) -> np.ndarray:
  """The probability binarised at its own (network) resolution, as float in {0, 1}."""
  return (prob >= threshold).astype(np.float32)


def band_summary(soft: np.ndarray, other: np.ndarray) -> list[dict]:
  """Per band of the soft Dice: n, mean soft and other Dice and their difference (points)."""
  rows = []
  for lo, hi, label in BANDS:
    inside = (soft >= lo) & (soft < hi)
    if inside.any():
      rows.append({'band': label, 'n': int(inside.sum()), 'soft': float(100 * soft[inside].mean()),
                   'hard': float(100 * other[inside].mean()),
                   'diff': float(100 * (other[inside] - soft[inside]).mean())})
  return rows


def main(argv) -> None:
  del argv
  host.keep_tensorflow_off_accelerators()
  host.use_compilation_cache()
  from unisegdiff_jax import evaluate  # pylint: disable=g-import-not-at-top
  from unisegdiff_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from unisegdiff_jax import phases  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  runtime = phases.make_runtime(config)
  phase = phases.segmenter_phase(config, FLAGS.workdir, runtime)
  params, step = phase.restore_ema(config, runtime)
  engine = phase.engine(config, runtime)
  threshold = float(config.sampling.threshold)
  split = FLAGS.split or config.data.test_split
  rows = {'soft': [], 'hard': []}
  for cases in input_pipeline.eval_cases(config, split).values():
    for chunk in input_pipeline.batched(list(cases), engine.batch_size):
      images = np.stack([input_pipeline.resize_image(c.image, engine.image_size) for c in chunk])
      probs = engine.run(params, images, [f'{c.dataset}/{c.case_id}' for c in chunk], runtime.eval_rng).prob
      for kind, transform in (('soft', lambda p: p), ('hard', lambda p: hard(p, threshold))):
        native = [evaluate.resize_probability(transform(probs[i, ..., 0]), *c.mask.shape) for i, c in enumerate(chunk)]
        rows[kind] += evaluate.score_cases(chunk, native, threshold)
  os.makedirs(FLAGS.out, exist_ok=True)
  for kind, kind_rows in rows.items():
    evaluate.write_per_case_csv(os.path.join(FLAGS.out, f'per_case_{kind}.csv'), kind_rows)
  soft, other = (np.array([r['dice'] for r in rows[k]]) for k in ('soft', 'hard'))
  result = {'workdir': os.path.abspath(FLAGS.workdir), 'checkpoint_step': int(step), 'split': split,
            'n': int(len(soft)), 'soft_dice': float(100 * soft.mean()), 'hard_dice': float(100 * other.mean()),
            'bands': band_summary(soft, other)}
  with open(os.path.join(FLAGS.out, 'hard_output.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'the phase-0 run (its pretrain/checkpoints).')
  flags.DEFINE_string('out', None, 'output folder.')
  flags.DEFINE_string('split', None, 'default: config.data.test_split.')
  config_flags.DEFINE_config_file('config', None, 'the run\'s config (file.py or file.py:args).', lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir', 'out'])
  FLAGS = flags.FLAGS
  app.run(main)
