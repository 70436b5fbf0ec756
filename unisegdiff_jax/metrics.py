"""Segmentation and calibration metrics (numpy / scipy only, no jax state).

Public API
----------
``dice(pred, truth) -> float``
``iou(pred, truth) -> float``
``hd95(pred, truth, spacing=1.0, *, connectivity=1) -> float``
``segmentation_metrics(pred, truth, spacing=1.0) -> {'dice', 'iou', 'hd95'}``
``expected_calibration_error(prob, truth, n_bins=15) -> float``
``mean_metrics(rows, keys=('dice', 'iou', 'hd95')) -> dict``

Conventions
-----------
* ``pred`` / ``truth`` are converted with ``np.asarray(x, dtype=bool)`` (so
  {0,1} uint8 masks work; threshold probabilities yourself first).  Shapes
  must match, otherwise ``ValueError``.
* dice = 2|P&T| / (|P|+|T|), iou = |P&T| / |P|T|.  Both empty -> 1.0 (perfect
  agreement on "no lesion"); exactly one empty -> 0.0.
* hd95 follows MedPy's ``medpy.metric.binary.hd95`` exactly (with its default
  ``connectivity=1``):

  - surface of a mask = ``mask XOR binary_erosion(mask, structure)`` with
    ``structure = generate_binary_structure(ndim, connectivity)`` (connectivity
    1 = 4-neighbour cross in 2-D, so the surface is the 8-connected one-pixel
    rim; pixels on the image border count as surface because erosion uses
    ``border_value=0``);
  - d(P->T) = ``distance_transform_edt(~surface(T), sampling=spacing)`` read
    at the surface pixels of P, and symmetrically d(T->P);
  - hd95 = ``np.percentile(concat(d(P->T), d(T->P)), 95)`` (linear
    interpolation, numpy default).

  Units are pixels times ``spacing`` (scalar or one value per axis; default 1
  -> pixels).  Both empty -> 0.0.  Exactly one empty -> the image diagonal
  ``sqrt(sum((shape_i * spacing_i)^2))`` (a finite worst case, so dataset
  means stay finite; MedPy raises instead).
* ECE: pixel-wise, binary.  ``prob`` is the predicted foreground probability
  in [0, 1] (``ValueError`` otherwise, NaN included).  Equal-width bins on
  [0, 1]: bin k = [k/n, (k+1)/n), the last bin closed at 1.  Per non-empty bin
  conf = mean(prob), acc = fraction of truth-positive pixels;
  ECE = sum_k (n_k / N) |acc_k - conf_k|.  Empty input -> ``ValueError``.
* mean_metrics: per key, the mean over rows that contain the key with a finite
  value; NaN if no such row.  Returns ``{key: float}``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = ['dice', 'iou', 'hd95', 'segmentation_metrics',
           'expected_calibration_error', 'mean_metrics']


def _pair(pred, truth):
    p = np.asarray(pred).astype(bool)
    t = np.asarray(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f'shape mismatch: pred {p.shape} vs truth {t.shape}')
    return p, t


def dice(pred, truth) -> float:
    p, t = _pair(pred, truth)
    sp, st = int(p.sum()), int(t.sum())
    if sp + st == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / (sp + st)


def iou(pred, truth) -> float:
    p, t = _pair(pred, truth)
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, t).sum()) / union


def _spacing(spacing, ndim):
    s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)).copy()
    if np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError(f'spacing must be positive and finite, got {spacing}')
    return s


def _surface(mask, structure):
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def hd95(pred, truth, spacing=1.0, *, connectivity: int = 1) -> float:
    p, t = _pair(pred, truth)
    if p.ndim == 0:
        p, t = p.reshape(1), t.reshape(1)
    sp = _spacing(spacing, p.ndim)
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return float(math.sqrt(float(np.sum((np.asarray(p.shape) * sp) ** 2))))
    structure = ndimage.generate_binary_structure(p.ndim, connectivity)
    sp_surf = _surface(p, structure)
    st_surf = _surface(t, structure)
    d_pt = ndimage.distance_transform_edt(~st_surf, sampling=sp)[sp_surf]
    d_tp = ndimage.distance_transform_edt(~sp_surf, sampling=sp)[st_surf]
    return float(np.percentile(np.hstack((d_pt, d_tp)), 95))


def segmentation_metrics(pred, truth, spacing=1.0) -> dict:
    return {'dice': dice(pred, truth), 'iou': iou(pred, truth),
            'hd95': hd95(pred, truth, spacing)}


def expected_calibration_error(prob, truth, n_bins: int = 15) -> float:
    pr = np.asarray(prob, dtype=np.float64).ravel()
    t = np.asarray(truth).astype(bool).ravel()
    if pr.shape != t.shape:
        raise ValueError(f'shape mismatch: prob {np.shape(prob)} vs truth {np.shape(truth)}')
    if pr.size == 0:
        raise ValueError('expected_calibration_error of an empty array')
    if int(n_bins) < 1:
        raise ValueError(f'n_bins must be >= 1, got {n_bins}')
    n_bins = int(n_bins)
    if not np.all((pr >= 0.0) & (pr <= 1.0)):  # also rejects NaN
        raise ValueError('prob must lie in [0, 1] (no NaN)')
    idx = np.minimum((pr * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=pr, minlength=n_bins)
    pos_sum = np.bincount(idx, weights=t.astype(np.float64), minlength=n_bins)
    nz = counts > 0
    gap = np.abs(pos_sum[nz] / counts[nz] - conf_sum[nz] / counts[nz])
    return float(np.sum(counts[nz] / pr.size * gap))


def mean_metrics(rows: Sequence[dict], keys: Iterable[str] = ('dice', 'iou', 'hd95')) -> dict:
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None
                and np.isfinite(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else float('nan')
    return out
