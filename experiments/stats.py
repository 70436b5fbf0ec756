"""Paired statistics for comparing segmentation arms (model variants) on the same test images (numpy + scipy).

The unit is the test image. An arm is `{seed: {(dataset, case_id): dice}}` with Dice as a fraction in [0, 1];
each image's Dice is averaged over the arm's seeds first, and only images present in every seed of both arms
are used. Differences (A - B) are reported in Dice points (100 x fraction). Dataset means are unweighted means
of per-dataset means, as in summary.json's 'mean' block.

Verdicts: 'better' / 'worse' (arm A relative to B) only when the 95 % bootstrap interval excludes 0 and every
shared seed's difference has the sign of the interval; 'no difference' only by equivalence (the 90 % interval
inside +/- margin); otherwise 'undecided'.
"""

from __future__ import annotations

import csv
import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

Scores = dict[tuple[str, str], float]  # (dataset, case_id) -> Dice fraction
Arm = dict[int, Scores]  # seed -> scores

_CHUNK_ELEMENTS = 1 << 20  # index-matrix entries drawn at once


def _stratum_indices(n: int, strata: Sequence | np.ndarray | None) -> list[np.ndarray]:
  if strata is None:
    return [np.arange(n)]
  strata = np.asarray(strata)
  if strata.shape != (n,):
    raise ValueError(f'strata has shape {strata.shape}, expected ({n},)')
  return [np.flatnonzero(strata == label) for label in np.unique(strata)]


def _statistic(diffs: np.ndarray, groups: list[np.ndarray]) -> float:
  return float(np.mean([diffs[g].mean() for g in groups]))


def bootstrap_distribution(diffs: Sequence[float] | np.ndarray, strata: Sequence | np.ndarray | None = None,
                           *, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, np.ndarray]:
  """(point estimate, [n_resamples] resampled statistics) of the paired differences.

  Statistic: mean of `diffs`, or with `strata` the unweighted mean over strata of per-stratum means; each
  resample draws images with replacement (within each stratum separately when stratified). Index matrices
  are drawn in chunks so memory stays small; the result depends only on the inputs and `seed`.
  """
  diffs = np.asarray(diffs, np.float64)
  if diffs.ndim != 1 or diffs.size == 0:
    raise ValueError('diffs must be a non-empty 1-D array')
  groups = _stratum_indices(diffs.size, strata)
  rng = np.random.default_rng(seed)
  chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // diffs.size))
  out = np.empty(n_resamples, np.float64)
  for start in range(0, n_resamples, chunk):
    size = min(chunk, n_resamples - start)
    total = np.zeros(size, np.float64)
    for g in groups:
      values = diffs[g]
      total += values[rng.integers(0, values.size, size=(size, values.size))].mean(axis=1)
    out[start:start + size] = total / len(groups)
  return _statistic(diffs, groups), out


def percentile_interval(distribution: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
  """Central percentile interval of a bootstrap distribution."""
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')
  low, high = np.quantile(distribution, [(1 - confidence) / 2, (1 + confidence) / 2])
  return float(low), float(high)


def paired_bootstrap_ci(diffs: Sequence[float] | np.ndarray, strata: Sequence | np.ndarray | None = None, *,
                        n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
                        ) -> tuple[float, float, float]:
  """(estimate, low, high): percentile bootstrap interval of the (stratified) mean difference."""
  estimate, distribution = bootstrap_distribution(diffs, strata, n_resamples=n_resamples, seed=seed)
  return (estimate, *percentile_interval(distribution, confidence))


def wilcoxon_p(diffs: Sequence[float] | np.ndarray) -> float:
  """Two-sided Wilcoxon signed-rank p-value; zero differences dropped, 1.0 when none are left.

  scipy's default method: exact for n <= 50 without ties, exact sign-flip enumeration for tied n <= 13,
  the normal approximation (no continuity correction, tie-corrected variance) otherwise.
  """
  d = np.asarray(diffs, np.float64)
  d = d[d != 0]
  if d.size < 1:
    return 1.0
  return float(scipy_stats.wilcoxon(d, zero_method='wilcox', alternative='two-sided').pvalue)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
  """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order."""
  p = np.asarray(pvalues, np.float64)
  m = p.size
  order = np.argsort(p, kind='stable')
  adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
  out = np.empty(m, np.float64)
  out[order] = adjusted
  return out


def verdict(ci95: tuple[float, float], ci90: tuple[float, float], seed_diffs: Iterable[float] | Mapping,
            margin_points: float = 1.0) -> str:
  """'better' / 'worse' (arm A vs B), 'no difference' (equivalence) or 'undecided'.

  Called when the 95 % interval excludes 0 and every seed difference has the interval's sign (vacuously
  true with no shared seeds); a called difference takes precedence over equivalence. 'no difference' needs
  the 90 % interval strictly inside (-margin_points, +margin_points).
  """
  seeds = np.asarray(list(seed_diffs.values() if isinstance(seed_diffs, Mapping) else seed_diffs), np.float64)
  if ci95[0] > 0 and np.all(seeds > 0):
    return 'better'
  if ci95[1] < 0 and np.all(seeds < 0):
    return 'worse'
  if -margin_points < ci90[0] and ci90[1] < margin_points:
    return 'no difference'
  return 'undecided'


def failure_rate(dice: Sequence[float] | np.ndarray, threshold: float = 0.5) -> float:
  """Fraction of images with Dice < threshold (NaN for no images)."""
  dice = np.asarray(dice, np.float64)
  return float(np.mean(dice < threshold)) if dice.size else float('nan')


def _dataset_mean(values: np.ndarray, groups: list[np.ndarray]) -> float:
  """Unweighted mean over datasets of per-dataset means, in Dice points."""
  return 100.0 * _statistic(values, groups)


def compare(arm_a: Arm, arm_b: Arm, *, n_resamples: int = 10_000, seed: int = 0,
            margin_points: float = 1.0, min_seeds: int = 2) -> dict:
  """Paired comparison of arm A against arm B (differences A - B in Dice points).

  Uses the seeds both arms have; if they share none, each arm's per-image mean over its own seeds is used
  and `seed_diffs` is empty. With fewer than `min_seeds` shared seeds the verdict is 'undecided' whatever
  the interval says: one run decides nothing (the same config and seed rerun moved Dice by 0.6-1.4 points). The bootstrap is stratified by dataset
  when there is more than one; Wilcoxon and the failure rates (seed-averaged Dice < 0.5, as fractions)
  pool all images.
  """
  if not arm_a or not arm_b:
    raise ValueError('each arm needs at least one seed')
  shared = sorted(set(arm_a) & set(arm_b))
  seeds_a, seeds_b = (shared, shared) if shared else (sorted(arm_a), sorted(arm_b))
  tables = [arm_a[s] for s in seeds_a] + [arm_b[s] for s in seeds_b]
  keys = sorted(set.intersection(*(set(t) for t in tables)))
  if not keys:
    raise ValueError('the arms have no image in common across their seeds')
  a = np.array([[arm_a[s][k] for k in keys] for s in seeds_a], np.float64)  # [seeds, images]
  b = np.array([[arm_b[s][k] for k in keys] for s in seeds_b], np.float64)
  datasets = np.array([k[0] for k in keys])
  groups = _stratum_indices(len(keys), datasets)
  mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
  diffs = 100.0 * (mean_a - mean_b)
  strata = datasets if len(groups) > 1 else None
  estimate, distribution = bootstrap_distribution(diffs, strata, n_resamples=n_resamples, seed=seed)
  ci95, ci90 = percentile_interval(distribution, 0.95), percentile_interval(distribution, 0.90)
  seed_diffs = {s: _dataset_mean(a[i], groups) - _dataset_mean(b[i], groups) for i, s in enumerate(shared)}
  return {
      'n': len(keys), 'datasets': sorted(set(datasets.tolist())), 'seeds': shared,
      'mean_a': _dataset_mean(mean_a, groups), 'mean_b': _dataset_mean(mean_b, groups), 'diff': estimate,
      'ci95': ci95, 'ci90': ci90, 'p_wilcoxon': wilcoxon_p(diffs), 'seed_diffs': seed_diffs,
      'failure_a': failure_rate(mean_a), 'failure_b': failure_rate(mean_b),
      'verdict': (verdict(ci95, ci90, seed_diffs, margin_points) if len(shared) >= min_seeds
                  else 'undecided'),
  }


def compare_within_sweep(arms: Mapping[str, Arm], pairs: Sequence[tuple[str, str]] | None = None,
                         **kw) -> list[dict]:
  """`compare` rows (plus 'a', 'b', 'p_holm') for the given pairs or all pairs in the arms' order.

  'p_holm' is the Wilcoxon p-value Holm-corrected across the rows of this call; `kw` goes to `compare`.
  """
  pairs = list(itertools.combinations(arms, 2)) if pairs is None else list(pairs)
  rows = [{'a': a, 'b': b, **compare(arms[a], arms[b], **kw)} for a, b in pairs]
  for row, p in zip(rows, holm([row['p_wilcoxon'] for row in rows])):
    row['p_holm'] = float(p)
  return rows


def read_per_case_csv(path: str) -> Scores:
  """{(dataset, case_id): dice} from a per_case.csv written by unisegdiff_jax.evaluate (extra columns ignored)."""
  scores: Scores = {}
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      key = (row['dataset'], row['case_id'])
      if key in scores:
        raise ValueError(f'{path}: duplicate case {key}')
      scores[key] = float(row['dice'])
  return scores
