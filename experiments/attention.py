"""How a trained model's difficulty and reliance on the image vary with the timestep (the paper's motivation).

    python -m experiments.attention --config=configs/X.py[:args] --workdir=RUN --out=DIR \
        [--config.field=value ...] [--split=val] [--num_cases=64] [--bins=20] [--per_bin=3]

With the run's best EMA params, on `num_cases` cases (per dataset) of the split, for `bins` equal-width bins
of t in [0, T), each averaged over `per_bin` evenly spaced timesteps (fixed rng, so deterministic):

  loss           the training loss (`losses.staged_loss` at that fixed t)
  grad_norm      the global norm of its gradient w.r.t. the params (the loss over all cases)
  dice_x0        hard Dice (x0 >= 0) of the implied x0 estimate from x_t = q_sample(mask, eps, t)
  reliance_zero  mean |change| of that estimate (probability units) when the image conditioning is zeroed
  reliance_swap  the same when each case gets the previous case's conditioning

Writes DIR/attention.csv (FIELDS), attention.json (rows + metadata) and attention.png (4 panels, stage
boundaries dashed). `plot_side_by_side` overlays several runs' curves.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unisegdiff_jax import diffusion
from unisegdiff_jax import host
from unisegdiff_jax import losses

FIELDS = ('t_lo', 't_hi', 'loss', 'grad_norm', 'dice_x0', 'reliance_zero', 'reliance_swap')
PANELS = (('training loss', ('loss',)), ('gradient norm', ('grad_norm',)),
          ('Dice of implied x0', ('dice_x0',)), ('reliance on the image', ('reliance_zero', 'reliance_swap')))
_SUMS = ('loss', 'dice_x0', 'reliance_zero', 'reliance_swap')
_tree_add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))  # one program, not one op per leaf
_global_norm = jax.jit(optax.global_norm)


def timestep_bins(num_timesteps: int, bins: int, per_bin: int = 3) -> list[tuple[int, int, np.ndarray]]:
  """[(t_lo, t_hi, timesteps)]: `bins` equal-width bins tiling [0, T), `per_bin` evenly spaced t in each."""
  bins = max(1, min(int(bins), num_timesteps))
  edges = np.round(np.linspace(0, num_timesteps, bins + 1)).astype(int)
  return [(int(lo), int(hi), np.unique(np.floor(lo + (np.arange(per_bin) + 0.5) * (hi - lo) / per_bin)).astype(int))
          for lo, hi in zip(edges[:-1], edges[1:])]


def model_fns(model) -> tuple[Callable, Callable]:
  """(encode(params, images), denoise(params, cond, x_t, t, stage_id, self_cond)) of a UniSegDiffModel."""
  return (lambda p, images: model.apply(p, images, method=model.encode),
          lambda p, cond, x_t, t, stage_id, sc: model.apply(p, cond, x_t, t, stage_id, sc, method=model.denoise))


def make_batch_fn(encode: Callable, denoise: Callable, process: diffusion.StagedDiffusion, config):
  """jit(params, images, swap_images, masks, t, rng) -> (loss sum, grad sum, Dice sum, zero sum, swap sum)."""
  alpha_bar, scale = jnp.asarray(process.alpha_bar), process.mask_scale
  stage_of, target_of = jnp.asarray(process.lookup.stage_id), jnp.asarray(process.lookup.target_id)
  self_condition = bool(config.model.self_condition)

  def loss_sum(params, images, masks, t, rng):
    cond = encode(params, images)
    predict = lambda x_t, tt, stage_id, sc: denoise(params, cond, x_t, tt, stage_id, sc)
    loss, _ = losses.staged_loss(predict, masks, rng, process, aux_weight=config.loss.aux_weight,
                                 aux_max_t=config.loss.aux_max_t, self_condition=self_condition, t=t)
    return loss * masks.shape[0]

  def probability(params, cond, x_t, t):
    no_sc = jnp.zeros_like(x_t) if self_condition else None
    pred = denoise(params, cond, x_t, t, jnp.take(stage_of, t), no_sc)
    x0_hat, _ = diffusion.prediction_to_x0_eps(pred, x_t, t, jnp.take(target_of, t), alpha_bar)
    return process.x0_to_probability(jnp.clip(x0_hat, -scale, scale))

  def batch_fn(params, images, swap_images, masks, t, rng):
    loss, grads = jax.value_and_grad(loss_sum)(params, images, masks, t, rng)
    x0 = process.mask_to_x0(masks)
    x_t = diffusion.q_sample(x0, jax.random.normal(jax.random.fold_in(rng, 1), x0.shape), t, alpha_bar)
    cond = encode(params, images)
    prob = probability(params, cond, x_t, t)
    zero = probability(params, jax.tree_util.tree_map(jnp.zeros_like, cond), x_t, t)
    swap = probability(params, encode(params, swap_images), x_t, t)
    flat = lambda a: a.reshape(a.shape[0], -1)
    pred, truth = flat(prob >= 0.5), flat(masks > 0.5)
    total = pred.sum(1) + truth.sum(1)
    dice = jnp.where(total > 0, 2.0 * (pred & truth).sum(1) / jnp.maximum(total, 1), 1.0)
    change = lambda other: jnp.mean(jnp.abs(flat(other - prob)), axis=1).sum()
    return loss, grads, dice.sum(), change(zero), change(swap)

  return jax.jit(batch_fn)


def measure(model, params, process: diffusion.StagedDiffusion, config, images: np.ndarray, masks: np.ndarray, *,
            bins: int = 20, per_bin: int = 3, batch_size: int = 0, seed: int = 0,
            fns: tuple[Callable, Callable] | None = None) -> list[dict]:
  """One row (FIELDS) per bin. images [N, S, S, 3] in [-1, 1], masks [N, S, S, 1] in {0, 1}.

  `fns` = (encode, denoise) replaces the model's (e.g. an oracle denoiser in tests). grad_norm is the norm of
  the gradient of the mean loss over all N cases (batch gradients summed), averaged over the bin's timesteps.
  """
  batch_fn = make_batch_fn(*(fns or model_fns(model)), process, config)
  n, batch_size = len(images), int(batch_size or config.sampling.batch_size)
  swap_images = np.roll(images, 1, axis=0)
  key = jax.random.PRNGKey(seed)
  rows = []
  for lo, hi, timesteps in timestep_bins(process.num_timesteps, bins, per_bin):
    sums, grad_norm = np.zeros(len(_SUMS)), 0.0
    for t in timesteps:
      grads = None
      for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        size = len(images[part])
        rng = jax.random.fold_in(jax.random.fold_in(key, int(t)), start)
        loss, g, *rest = batch_fn(params, images[part], swap_images[part], masks[part],
                                  jnp.full((size,), t, jnp.int32), rng)
        grads = g if grads is None else _tree_add(grads, g)
        sums += np.array([float(v) for v in (loss, *rest)])
      grad_norm += float(_global_norm(grads)) / n
    row = {'t_lo': lo, 't_hi': hi, 'grad_norm': grad_norm / len(timesteps)}
    row.update({k: float(v) / (n * len(timesteps)) for k, v in zip(_SUMS, sums)})
    rows.append({k: row[k] for k in FIELDS})
  return rows


def load_cases(config, split: str, num_cases: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """(images, masks, cases per dataset): up to `num_cases` per dataset, resized to config.data.image_size."""
  from unisegdiff_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  size = config.data.image_size
  groups = input_pipeline.eval_cases(config, split, num_cases)
  cases = [c for group in groups.values() for c in group]
  images = np.stack([input_pipeline.resize_image(c.image, size) for c in cases])
  masks = np.stack([input_pipeline.resize_mask(c.mask[..., None].astype(np.uint8), size) for c in cases])
  return images, masks, {name: len(group) for name, group in groups.items()}


def stage_boundaries(process: diffusion.StagedDiffusion) -> list[int]:
  return sorted(s.start for s in process.stages if s.start > 0)


def _plot(series: Mapping[str, Sequence[dict]], boundaries: Sequence[int], out_png: str, title: str = '') -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
  for ax, (panel, keys) in zip(axes, PANELS):
    for index, (label, rows) in enumerate(series.items()):
      x = [(r['t_lo'] + r['t_hi']) / 2 for r in rows]
      for style, key in zip(('-', '--'), keys):
        name = ' '.join(p for p in (label, key.split('_')[1] if len(keys) > 1 else '') if p) or key
        ax.plot(x, [r[key] for r in rows], style, marker='.', color=f'C{index}', label=name)
    for b in boundaries:
      ax.axvline(b, color='grey', linestyle=':', linewidth=1)
    if keys == ('grad_norm',) and all(r['grad_norm'] > 0 for rows in series.values() for r in rows):
      ax.set_yscale('log')
    ax.set(title=panel, xlabel='timestep t')
    if len(series) > 1 or len(keys) > 1:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def write_outputs(out_dir: str, rows: Sequence[dict], metadata: dict, boundaries: Sequence[int]) -> None:
  """DIR/attention.csv, attention.json ({rows, stage_boundaries, **metadata}) and attention.png."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'attention.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
  with open(os.path.join(out_dir, 'attention.json'), 'w') as f:
    json.dump({**metadata, 'stage_boundaries': list(boundaries), 'rows': list(rows)}, f, indent=1)
  _plot({'': rows}, boundaries, os.path.join(out_dir, 'attention.png'), metadata.get('stage_table', ''))


def read_rows(out_dir: str) -> list[dict]:
  with open(os.path.join(out_dir, 'attention.csv')) as f:
    return [{k: (int(v) if k in ('t_lo', 't_hi') else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def plot_side_by_side(dirs: Mapping[str, str], out_png: str) -> None:
  """Overlays several runs' attention.csv (label -> DIR) in one 4-panel figure, with every run's boundaries."""
  boundaries = set()
  for d in dirs.values():
    meta = os.path.join(d, 'attention.json')
    if os.path.exists(meta):
      with open(meta) as f:
        boundaries.update(json.load(f).get('stage_boundaries', []))
  _plot({label: read_rows(d) for label, d in dirs.items()}, sorted(boundaries), out_png)


def _setup_runtime() -> None:
  """As main.py: TensorFlow off the accelerators, the persistent compilation cache."""
  host.keep_tensorflow_off_accelerators()
  host.use_compilation_cache()


def main(argv) -> None:
  del argv
  _setup_runtime()
  from unisegdiff_jax import predict  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  process, _ = predict.validate(config)
  model, params, step = predict.restore_params(config, FLAGS.workdir, None, process)
  split = FLAGS.split or config.data.val_split
  images, masks, counts = load_cases(config, split, FLAGS.num_cases)
  rows = measure(model, params, process, config, images, masks, bins=FLAGS.bins, per_bin=FLAGS.per_bin,
                 seed=FLAGS.seed)
  metadata = {'workdir': os.path.abspath(FLAGS.workdir), 'checkpoint_step': step,
              'stage_table': process.describe(), 'split': split, 'num_cases': len(images),
              'cases_per_dataset': counts, 'per_bin': FLAGS.per_bin, 'seed': FLAGS.seed}
  write_outputs(FLAGS.out, rows, metadata, stage_boundaries(process))
  print(f'wrote {os.path.join(FLAGS.out, "attention.csv")} ({len(rows)} bins, {len(images)} cases, step {step})')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  flags.DEFINE_string('workdir', None, 'The run to analyse (its checkpoints/, best by validation Dice).')
  flags.DEFINE_string('out', None, 'Output folder for attention.csv / .json / .png.')
  flags.DEFINE_string('split', None, 'The split to read (default: config.data.val_split).')
  flags.DEFINE_integer('num_cases', 64, 'Cases per dataset.')
  flags.DEFINE_integer('bins', 20, 'Equal-width timestep bins over [0, T).')
  flags.DEFINE_integer('per_bin', 3, 'Evenly spaced timesteps averaged in each bin.')
  flags.DEFINE_integer('seed', 0, 'The fixed rng seed (noise, loss randomness).')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file (file.py or file.py:args).',
                                  lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir', 'out'])
  app.run(main)
