"""`--mode=sweep`: accuracy against sampling budget for one checkpoint.

    python main.py --mode=sweep --config=... --workdir=... \
        --sweep=staged,ddim:5,ddim:10,ddim:25,ddim:100,ddpm:50 --ensemble_sizes=1,3,5 [--split=test]

Evaluates the checkpoint (best by validation Dice unless --checkpoint_step) on the split with every
sampler:budget x ensemble size, with the same cases and seeds, and writes to <workdir>/eval/sweep/:
  sweep.csv        one row per setting (sampler, steps, ensemble, fusion, NFE, Dice, IoU, HD95, ECE, s/image)
  sweep.md         the same as a markdown table
  sweep.json       the rows with their per-dataset summaries
  dice_vs_nfe.png  Dice against NFE per image (log x) and seconds per image against NFE
NFE per image counts every member: steps * ensemble size. Seconds per image (sampling + fusion) exclude
compilation and a first warm-up run.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import jax
import ml_collections

from unisegdiff_jax import config_checks
from unisegdiff_jax import ensemble
from unisegdiff_jax import evaluate as evaluate_lib
from unisegdiff_jax import inference
from unisegdiff_jax import input_pipeline
from unisegdiff_jax import phases
from unisegdiff_jax import predict
from unisegdiff_jax import sampling

DEFAULT_SPEC = 'staged,ddim:5,ddim:10,ddim:25,ddim:100,ddpm:50'
CSV_FIELDS = ('sampler', 'steps', 'ensemble_size', 'fusion', 'nfe_per_image', 'dice', 'iou', 'hd95', 'ece',
              'seconds_per_image', 'checkpoint_step', 'split')


def parse_spec(spec: str) -> list[tuple[str, int | None]]:
  """'staged,ddim:5,ddpm:50' -> [('staged', None), ('ddim', 5), ('ddpm', 50)]; ConfigError if malformed."""
  out = []
  for token in [t.strip() for t in (spec or '').split(',') if t.strip()]:
    name, colon, steps = token.partition(':')
    if name not in sampling.SAMPLERS:
      raise config_checks.ConfigError(f"--sweep: unknown sampler '{name}' in '{token}': use "
                              f"{', '.join(sampling.SAMPLERS)} (ddim:N, ddpm:N)")
    if name == 'staged':
      if colon:
        raise config_checks.ConfigError(f"--sweep: '{token}': the staged budget comes from the stage table; write 'staged'")
      out.append((name, None))
      continue
    try:
      count = int(steps)
    except ValueError:
      raise config_checks.ConfigError(f"--sweep: '{token}' needs a step count, e.g. {name}:10") from None
    if count < 1:
      raise config_checks.ConfigError(f"--sweep: '{token}': the step count must be >= 1")
    out.append((name, count))
  if not out:
    raise config_checks.ConfigError('--sweep is empty: e.g. --sweep=staged,ddim:10,ddpm:50')
  return out


def parse_sizes(text: str | Sequence[int] | None) -> list[int]:
  if text is None or text == '':
    return [1]
  values = text.split(',') if isinstance(text, str) else list(text)
  try:
    sizes = [int(v) for v in values if str(v).strip()]
  except ValueError:
    raise config_checks.ConfigError(f'--ensemble_sizes={text!r}: use comma-separated integers, e.g. 1,3,5') from None
  if not sizes or min(sizes) < 1:
    raise config_checks.ConfigError(f'--ensemble_sizes={text!r}: sizes must be >= 1')
  return sizes


def _fmt(value, digits=4):
  return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def write_markdown(path: str, rows: Sequence[dict]) -> None:
  lines = ['| sampler | NFE per image | ensemble | Dice | IoU | HD95 | ECE | seconds/image |',
           '|---|---:|---|---:|---:|---:|---:|---:|']
  for r in rows:
    ensemble_text = str(r['ensemble_size']) + (f" ({r['fusion']})" if r['ensemble_size'] > 1 else '')
    lines.append(f"| {r['sampler']} | {r['nfe_per_image']} | {ensemble_text} | {_fmt(r['dice'])} | "
                 f"{_fmt(r['iou'])} | {_fmt(r['hd95'], 2)} | {_fmt(r['ece'])} | {_fmt(r['seconds_per_image'])} |")
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def write_csv(path: str, rows: Sequence[dict]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f'{v:.6f}' if isinstance(v, float) else ('' if v is None else v))
                       for k, v in row.items()})


def plot(path: str, rows: Sequence[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_dice, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
  markers = {'staged': 'o', 'ddim': 's', 'ddpm': '^'}
  colours = {'staged': 'tab:red', 'ddim': 'tab:blue', 'ddpm': 'tab:green'}
  for r in rows:
    name = r['sampler'].split(':')[0]
    label = r['sampler'] + (f" x{r['ensemble_size']}" if r['ensemble_size'] > 1 else '')
    style = dict(marker=markers.get(name, 'o'), color=colours.get(name, 'k'), linestyle='none')
    ax_dice.plot(r['nfe_per_image'], r['dice'], **style)
    ax_dice.annotate(label, (r['nfe_per_image'], r['dice']), textcoords='offset points', xytext=(4, 4),
                     fontsize=7)
    ax_time.plot(r['nfe_per_image'], r['seconds_per_image'], **style)
    ax_time.annotate(label, (r['nfe_per_image'], r['seconds_per_image']), textcoords='offset points',
                     xytext=(4, 4), fontsize=7)
  for ax, ylabel in ((ax_dice, 'Dice'), (ax_time, 'seconds per image')):
    ax.set_xscale('log')
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('NFE per image (all ensemble members)')
    ax.set_ylabel(ylabel)
    ax.grid(True, which='both', alpha=0.3)
  ax_dice.set_title('Dice vs sampling budget')
  ax_time.set_title('Sampling time vs budget')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_sweep(config: ml_collections.ConfigDict, workdir: str, *, spec: str = DEFAULT_SPEC,
              ensemble_sizes: str | Sequence[int] | None = None, checkpoint_step: int | None = None,
              split: str | None = None, fusion: str | None = None, out_dir: str | None = None) -> list[dict]:
  """Evaluates every sampler:budget x ensemble size; writes the sweep files; returns the rows."""
  process, base = predict.validate(config)
  settings_list = []
  for sampler, steps in parse_spec(spec):
    for k in parse_sizes(ensemble_sizes):
      try:
        settings_list.append(config_checks.sampling_settings(config, sampler=sampler, num_steps=steps,
                                                             ensemble_size=k, fusion=fusion or base.fusion))
      except config_checks.ConfigError as err:
        raise config_checks.ConfigError(f'--sweep: {err}') from None
  model, params, step = predict.restore_params(config, workdir, checkpoint_step, process)
  split = split or config.data.test_split
  cases_by_dataset = input_pipeline.eval_cases(config, split, config.data.max_eval_examples)
  eval_rng = phases.make_runtime(config).eval_rng  # as train.evaluate_checkpoint
  out_dir = out_dir or os.path.join(workdir, 'eval', 'sweep')

  rows = []
  for settings in settings_list:
    members_fn, nfe = phases.diffusion_members(model, process, settings)
    engine = inference.Engine(members_fn, settings, image_size=config.data.image_size,
                              batch_size=config.sampling.batch_size)
    rows_by_dataset, seconds_total, count = {}, 0.0, 0
    for name, cases in cases_by_dataset.items():
      probs, seconds = engine.segment_cases(params, cases, eval_rng)
      rows_by_dataset[name] = evaluate_lib.score_cases(
          cases, probs, ensemble.mask_threshold(settings.fusion, settings.threshold))
      seconds_total += seconds * len(cases)
      count += len(cases)
    summary = evaluate_lib.summarise(rows_by_dataset)
    row = {'sampler': settings.label, 'steps': nfe // settings.ensemble_size,
           'ensemble_size': settings.ensemble_size, 'fusion': settings.fusion, 'nfe_per_image': nfe,
           **summary['mean'], 'seconds_per_image': seconds_total / max(count, 1),
           'checkpoint_step': step, 'split': split, 'datasets': summary['datasets']}
    rows.append(row)
    print(f"{settings.label:>10} x{settings.ensemble_size} ({settings.fusion}): {nfe:5d} NFE/image  "
          f"Dice {row['dice']:.4f}  IoU {row['iou']:.4f}  HD95 {row['hd95']:.2f}  ECE {row['ece']:.4f}  "
          f"{row['seconds_per_image']:.4f} s/image", flush=True)

  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, 'sweep.csv'), rows)
    write_markdown(os.path.join(out_dir, 'sweep.md'), rows)
    with open(os.path.join(out_dir, 'sweep.json'), 'w') as f:
      json.dump({'checkpoint_step': step, 'split': split, 'device': jax.devices()[0].device_kind,
                 'num_devices': jax.device_count(), 'rows': rows}, f, indent=2)
    plot(os.path.join(out_dir, 'dice_vs_nfe.png'), rows)
    print(f'Wrote {os.path.join(out_dir, "sweep.md")} and dice_vs_nfe.png (checkpoint step {step}, split {split})',
          flush=True)
  return rows
