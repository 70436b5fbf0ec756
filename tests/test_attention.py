"""experiments.attention: per-timestep loss, gradient norm, Dice of the implied x0 and reliance on the image."""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import attention
from tests import conftest
from unisegdiff_jax import diffusion
from unisegdiff_jax import phases
from unisegdiff_jax import train
from unisegdiff_jax import train_state

BINS = 4


@pytest.fixture
def setup(smoke_config):
  """A smaller smoke model with random weights (eval_shape of `train.init_params`: no init compile, and the
  zero-initialised output layer is live)."""
  config = smoke_config
  config.data.image_size = 16
  config.model.encoder.widths = (8, 16)
  config.model.denoiser.channel_mult = (1, 2)
  config.model.denoiser.attention_levels = (1,)
  config.diffusion.stages = 'three_stage'  # a staged table: its boundaries are drawn (the default is x0 only)
  process = train.validate_config(config)
  model, _, _ = phases.diffusion_parts(config, process)
  shapes = jax.eval_shape(lambda: train_state.init_params(model, config, jax.random.PRNGKey(0)))
  params = conftest.random_params(shapes)
  images, masks, counts = attention.load_cases(config, config.data.val_split, 6)
  assert images.shape == (6, 16, 16, 3) and masks.shape == (6, 16, 16, 1) and sum(counts.values()) == 6
  assert masks.max() == 1.0 and set(np.unique(masks)) <= {0.0, 1.0}
  return config, process, model, params, images, masks


def test_timestep_bins_tile_the_range():
  for total, bins, per_bin in ((1000, 20, 3), (1000, 7, 1), (10, 3, 4), (5, 9, 3)):
    out = attention.timestep_bins(total, bins, per_bin)
    assert len(out) == min(bins, total)
    assert out[0][0] == 0 and out[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(out, out[1:]))
    assert all(lo <= ts.min() and ts.max() < hi and len(ts) >= 1 for lo, hi, ts in out)
  assert [int(ts[0]) for _, _, ts in attention.timestep_bins(1000, 4, 1)] == [125, 375, 625, 875]


def test_rows_are_finite_and_outputs_written(setup, tmp_path):
  config, process, model, params, images, masks = setup
  rows = attention.measure(model, params, process, config, images, masks, bins=BINS, per_bin=2, batch_size=3)
  assert len(rows) == BINS and all(list(r) == list(attention.FIELDS) for r in rows)
  assert rows[0]['t_lo'] == 0 and rows[-1]['t_hi'] == process.num_timesteps
  assert all(a['t_hi'] == b['t_lo'] for a, b in zip(rows, rows[1:]))
  values = np.array([[r[k] for k in attention.FIELDS[2:]] for r in rows])
  assert np.all(np.isfinite(values))
  assert all(r['grad_norm'] > 0 and 0 <= r['dice_x0'] <= 1 for r in rows)
  assert all(r['reliance_swap'] > 1e-4 and r['reliance_zero'] > 1e-4 for r in rows)  # the image matters

  out = str(tmp_path / 'a')
  boundaries = attention.stage_boundaries(process)
  assert boundaries == [200, 500]
  attention.write_outputs(out, rows, {'workdir': 'w', 'checkpoint_step': 0, 'stage_table': process.describe(),
                                      'num_cases': len(images), 'split': 'val'}, boundaries)
  with open(os.path.join(out, 'attention.csv')) as f:
    assert next(csv.reader(f)) == list(attention.FIELDS)
  back = attention.read_rows(out)
  assert [r['t_lo'] for r in back] == [r['t_lo'] for r in rows]
  np.testing.assert_allclose([r['loss'] for r in back], [r['loss'] for r in rows], rtol=1e-5)
  with open(os.path.join(out, 'attention.json')) as f:
    meta = json.load(f)
  assert meta['stage_boundaries'] == [200, 500] and len(meta['rows']) == BINS and meta['stage_table'].startswith('T=')
  assert os.path.getsize(os.path.join(out, 'attention.png')) > 0
  side = str(tmp_path / 'side.png')
  attention.plot_side_by_side({'staged': out, 'again': out}, side)
  assert os.path.getsize(side) > 0


def test_identical_conditionings_give_zero_swap_reliance(setup):
  """A zeroed encoder (and phase-0 decoder, whose coarse logits are part of the conditioning by default) gives
  every image the same, zero, conditioning: zeroing or swapping it cannot change anything."""
  config, process, model, params, images, masks = setup
  inner = dict(params['params'])
  assert config.pretrain.coarse_logits == ('decoder' in inner)
  for part in ('encoder', 'decoder'):
    if part in inner:
      inner[part] = jax.tree_util.tree_map(jnp.zeros_like, inner[part])
  rows = attention.measure(model, {**params, 'params': inner}, process, config, images, masks, bins=BINS,
                           per_bin=1, batch_size=3)  # the batch shape of the test above: a cached program
  assert all(abs(r['reliance_swap']) < 1e-6 and abs(r['reliance_zero']) < 1e-6 for r in rows)
  assert all(np.isfinite(r['loss']) and r['grad_norm'] > 0 for r in rows)


def test_oracle_denoiser_has_perfect_implied_x0(setup):
  """A denoiser that returns each stage's target for the true mask gives Dice 1 in every bin."""
  config, process, model, params, images, masks = setup
  x0 = process.mask_to_x0(jnp.asarray(masks))
  alpha_bar = jnp.asarray(process.alpha_bar)

  def oracle(p, cond, x_t, t, stage_id, self_cond):
    del p, cond, stage_id, self_cond
    ab = diffusion.broadcast_like(jnp.take(alpha_bar, t), x_t)
    a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    eps = (x_t - a * x0) / s
    kind = diffusion.broadcast_like(jnp.take(jnp.asarray(process.lookup.target_id), t), x_t)
    return jnp.where(kind == 0, x0, jnp.where(kind == 1, eps, a * eps - s * x0))

  encode, _ = attention.model_fns(model)
  rows = attention.measure(model, params, process, config, images, masks, bins=BINS, per_bin=2,
                           batch_size=len(images), fns=(encode, oracle))
  assert [r['dice_x0'] for r in rows] == [1.0] * BINS
  assert all(r['reliance_zero'] < 1e-6 and r['reliance_swap'] < 1e-6 for r in rows)
