"""Known-answer checks for experiments.stats (numpy / scipy only, no jax)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from experiments import stats


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_constant_differences_collapse():
  estimate, low, high = stats.paired_bootstrap_ci(np.full(37, 1.5), n_resamples=500)
  assert (estimate, low, high) == pytest.approx((1.5, 1.5, 1.5))
  strata = ['a'] * 30 + ['b'] * 7
  assert stats.paired_bootstrap_ci(np.full(37, -2.0), strata, n_resamples=500) == pytest.approx((-2, -2, -2))


def test_bootstrap_matches_normal_theory():
  rng = np.random.default_rng(1234)
  n, mu, sigma = 4000, 0.7, 3.0
  x = rng.normal(mu, sigma, n)
  estimate, distribution = stats.bootstrap_distribution(x, n_resamples=10_000, seed=0)
  assert estimate == pytest.approx(x.mean())
  half = 1.96 * x.std(ddof=1) / math.sqrt(n)
  low, high = stats.percentile_interval(distribution, 0.95)
  width = 2 * half
  assert abs(low - (x.mean() - half)) < 0.03 * width
  assert abs(high - (x.mean() + half)) < 0.03 * width
  low90, high90 = stats.percentile_interval(distribution, 0.90)
  assert low < low90 < estimate < high90 < high
  # 90 % half-width is 1.645 / 1.96 of the 95 % one under normal theory.
  assert (high90 - low90) / (high - low) == pytest.approx(1.645 / 1.96, rel=0.03)
  # paired_bootstrap_ci is the same resamples.
  assert stats.paired_bootstrap_ci(x, confidence=0.90, seed=0) == pytest.approx((estimate, low90, high90))


def test_bootstrap_deterministic_given_seed():
  x = np.random.default_rng(0).normal(size=50)
  _, d1 = stats.bootstrap_distribution(x, n_resamples=300, seed=7)
  _, d2 = stats.bootstrap_distribution(x, n_resamples=300, seed=7)
  _, d3 = stats.bootstrap_distribution(x, n_resamples=300, seed=8)
  np.testing.assert_array_equal(d1, d2)
  assert not np.array_equal(d1, d3)


def test_stratified_bootstrap_is_unweighted_over_strata():
  diffs = np.concatenate([np.full(10, 4.0), np.zeros(1000)])
  strata = np.array(['small'] * 10 + ['large'] * 1000)
  order = np.random.default_rng(0).permutation(diffs.size)  # strata need not be contiguous
  estimate, low, high = stats.paired_bootstrap_ci(diffs[order], strata[order], n_resamples=2000)
  assert estimate == 2.0 and low == 2.0 and high == 2.0  # pooled mean would be 40 / 1010
  assert stats.paired_bootstrap_ci(diffs, n_resamples=200)[0] == pytest.approx(40 / 1010)


def test_stratified_bootstrap_varies_only_within_strata():
  # Stratum 'a' is constant 1, stratum 'b' is {0, 2} -> every resample is (1 + mean_b) / 2 with mean_b in [0, 2].
  diffs = np.array([1.0] * 5 + [0.0, 2.0] * 5)
  strata = ['a'] * 5 + ['b'] * 10
  estimate, distribution = stats.bootstrap_distribution(diffs, strata, n_resamples=1000, seed=3)
  assert estimate == 1.0
  assert distribution.min() >= 0.5 and distribution.max() <= 1.5
  tens = (distribution * 2 - 1) * 10  # 10 * mean_b = 2 * (number of 2s drawn): an even integer
  assert np.allclose(tens, np.round(tens)) and np.all(np.round(tens) % 2 == 0)
  assert len(np.unique(np.round(tens))) > 3  # and it does vary


# ---------------------------------------------------------------- wilcoxon

def test_wilcoxon_exact_small_cases():
  # n=5, all positive, distinct: P(W+ = 15) = 1/32, two-sided 2/32.
  assert stats.wilcoxon_p([0.5, 1.0, 1.5, 2.0, 2.5]) == pytest.approx(2 / 32)
  assert stats.wilcoxon_p([-0.5, -1.0, -1.5, -2.0, -2.5]) == pytest.approx(2 / 32)
  # n=6, only the smallest negative: W- = 1; subsets of {1..6} with sum <= 1 are {} and {1} -> 2 * 2/64.
  assert stats.wilcoxon_p([-1, 2, 3, 4, 5, 6]) == pytest.approx(4 / 64)
  # zeros are dropped: same as the n=5 case.
  assert stats.wilcoxon_p([0, 0.5, 1.0, 0, 1.5, 2.0, 2.5]) == pytest.approx(2 / 32)


def test_wilcoxon_symmetric_cases_give_one():
  assert stats.wilcoxon_p([1, -1, 2, -2, 3, -3]) == pytest.approx(1.0)
  # distinct magnitudes, ranks {1,2,4,7} positive and {3,5,6} negative: W+ = W- = 14 = median -> p = 1.
  assert stats.wilcoxon_p([1, 2, -3, 4, -5, -6, 7]) == pytest.approx(1.0)


def test_wilcoxon_degenerate():
  assert stats.wilcoxon_p([0, 0, 0]) == 1.0
  assert stats.wilcoxon_p([]) == 1.0
  assert stats.wilcoxon_p([0.3]) == pytest.approx(1.0)  # one non-zero difference: W+ = 1, P = 2 * 1/2


def test_wilcoxon_large_matches_normal_approximation():
  d = np.random.default_rng(5).normal(0.25, 1.0, 80)
  n = d.size
  ranks = np.empty(n)
  ranks[np.argsort(np.abs(d))] = np.arange(1, n + 1)  # continuous draws: no ties
  w_plus = ranks[d > 0].sum()
  z = (w_plus - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
  p = math.erfc(abs(z) / math.sqrt(2))
  assert 0.001 < p < 0.99  # not a degenerate case
  assert stats.wilcoxon_p(d) == pytest.approx(p, abs=0.02)


# ---------------------------------------------------------------- holm

def test_holm_hand_worked():
  # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06.
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])
  np.testing.assert_allclose(stats.holm([0.2]), [0.2])
  assert stats.holm([]).shape == (0,)


def test_holm_monotone_and_bounded():
  p = np.random.default_rng(2).uniform(0, 0.3, 25)
  adjusted = stats.holm(p)
  order = np.argsort(p)
  assert np.all(np.diff(adjusted[order]) >= 0)
  assert np.all(adjusted >= p) and np.all(adjusted <= 1)
  # Definition: adj_(i) = min(1, max_{j<=i} (m - j + 1) p_(j)).
  m = p.size
  expected = [min(1.0, max((m - j) * p[order][j] for j in range(i + 1))) for i in range(m)]
  np.testing.assert_allclose(adjusted[order], expected)


# ---------------------------------------------------------------- verdict / failure

def test_verdict_outcomes():
  assert stats.verdict((0.5, 2.0), (0.7, 1.8), [1.0, 1.5, 0.8]) == 'better'
  assert stats.verdict((-3.0, -1.0), (-2.8, -1.2), {0: -2.0, 1: -1.0}) == 'worse'
  assert stats.verdict((-0.8, 0.6), (-0.6, 0.5), [0.1, -0.2]) == 'no difference'
  # 95 % interval excludes 0 but one seed disagrees (and the 90 % interval is outside the margin).
  assert stats.verdict((1.5, 3.0), (1.7, 2.8), [2.0, -0.1]) == 'undecided'
  assert stats.verdict((1.5, 3.0), (1.7, 2.8), [2.0, 0.0]) == 'undecided'
  # wide interval
  assert stats.verdict((-2.0, 3.0), (-1.5, 2.5), [1.0, -1.0]) == 'undecided'
  assert stats.verdict((-2.0, 3.0), (-1.5, 2.5), [1.0, -1.0], margin_points=3.0) == 'no difference'
  # 90 % interval touching the margin is not equivalence.
  assert stats.verdict((-1.2, 0.5), (-1.0, 0.4), []) == 'undecided'


def test_failure_rate():
  assert stats.failure_rate([0.1, 0.49, 0.5, 0.9]) == 0.5
  assert stats.failure_rate([0.1, 0.49, 0.5, 0.9], threshold=0.2) == 0.25
  assert math.isnan(stats.failure_rate([]))


# ---------------------------------------------------------------- compare

def _arms():
  """Datasets x (2 images) and y (4 images); two seeds per arm.

  Seed-averaged Dice: A x1 .7, x2 .6, y .4 -> dataset means .65, .4 -> 52.5 points.
                      B x1 .5, x2 .4, y .5 -> dataset means .45, .5 -> 47.5 points.
  Per-image diffs: x +20, +20; y -10 (x4) -> unweighted 5.0 (pooled 0.0).
  Seed 0: A (.75 + .3) / 2 = 52.5, B (.5 + .5) / 2 = 50 -> +2.5; seed 1: A (.55 + .5) / 2 = 52.5, B 45 -> +7.5.
  """
  ys = [('y', f'y{i}') for i in range(4)]
  a = {0: {('x', 'x1'): .8, ('x', 'x2'): .7, **{k: .3 for k in ys}, ('x', 'only_seed0'): .9},
       1: {('x', 'x1'): .6, ('x', 'x2'): .5, **{k: .5 for k in ys}}}
  b = {0: {('x', 'x1'): .5, ('x', 'x2'): .5, **{k: .5 for k in ys}},
       1: {('x', 'x1'): .5, ('x', 'x2'): .3, **{k: .5 for k in ys}, ('y', 'only_b'): .1}}
  return a, b


def test_compare_seed_averaging_and_dataset_means():
  a, b = _arms()
  row = stats.compare(a, b, n_resamples=500)
  assert row['n'] == 6 and row['datasets'] == ['x', 'y'] and row['seeds'] == [0, 1]
  assert row['mean_a'] == pytest.approx(52.5)
  assert row['mean_b'] == pytest.approx(47.5)
  assert row['diff'] == pytest.approx(5.0)
  # Diffs are constant within each dataset, so the stratified interval is degenerate at 5.
  assert row['ci95'] == pytest.approx((5.0, 5.0)) and row['ci90'] == pytest.approx((5.0, 5.0))
  assert row['seed_diffs'] == pytest.approx({0: 2.5, 1: 7.5})
  assert row['failure_a'] == pytest.approx(4 / 6) and row['failure_b'] == pytest.approx(1 / 6)
  # Wilcoxon on the pooled diffs [20, 20, -10 x4]: ties, zero-free, n = 6 -> exact sign-flip enumeration.
  # |d| ranks: the four 10s share rank 2.5, the two 20s rank 5.5; observed W+ = 11, mean n(n+1)/4 = 10.5.
  # Of the 64 sign patterns, W+ = 2.5a + 5.5b equals 10.5 only for a=2, b=1 (C(4,2) C(2,1) = 12), so by
  # symmetry P(W+ >= 11) = 26/64 and the two-sided p is 52/64.
  assert row['p_wilcoxon'] == pytest.approx(52 / 64)
  assert row['verdict'] == 'better'
  swapped = stats.compare(b, a, n_resamples=500)
  assert swapped['diff'] == pytest.approx(-5.0) and swapped['verdict'] == 'worse'
  assert swapped['seed_diffs'] == pytest.approx({0: -2.5, 1: -7.5})


def test_compare_without_shared_seeds():
  a, b = _arms()
  b = {7: {k: (v + b[1][k]) / 2 for k, v in b[0].items()}}  # B's seed average as a single other seed
  row = stats.compare(a, b, n_resamples=300)
  assert row['seeds'] == [] and row['seed_diffs'] == {}
  assert row['mean_a'] == pytest.approx(52.5) and row['mean_b'] == pytest.approx(47.5)
  assert row['diff'] == pytest.approx(5.0) and row['verdict'] == 'undecided'  # no shared seed decides


def test_one_shared_seed_never_calls_a_difference():
  a = {0: {('x', f'x{i}'): 0.8 for i in range(20)}}
  b = {0: {('x', f'x{i}'): 0.7 for i in range(20)}}  # +10 points on every image
  row = stats.compare(a, b, n_resamples=300)
  assert row['seeds'] == [0] and row['ci95'][0] == pytest.approx(10.0) and row['verdict'] == 'undecided'
  assert stats.compare(a, b, n_resamples=300, min_seeds=1)['verdict'] == 'better'


def test_compare_single_dataset_and_noise():
  rng = np.random.default_rng(0)
  base = {('d', str(i)): float(v) for i, v in enumerate(rng.uniform(0.6, 0.9, 200))}
  a = {s: {k: v + rng.normal(0, 0.01) for k, v in base.items()} for s in (0, 1, 2)}
  b = {s: {k: v + rng.normal(0, 0.01) for k, v in base.items()} for s in (0, 1, 2)}
  row = stats.compare(a, b, n_resamples=1000)
  assert row['datasets'] == ['d'] and row['n'] == 200
  expected = 100 * np.mean([np.mean([a[s][k] for s in a]) - np.mean([b[s][k] for s in b]) for k in base])
  assert row['diff'] == pytest.approx(expected)
  assert row['ci90'][0] >= row['ci95'][0] and row['ci90'][1] <= row['ci95'][1]
  assert row['verdict'] == 'no difference'  # tiny noise: 90 % interval well inside +/- 1 point


def test_compare_within_sweep_holm():
  a, b = _arms()
  rng = np.random.default_rng(1)
  c = {s: {k: float(np.clip(v + rng.normal(0, 0.05), 0, 1)) for k, v in a[s].items()} for s in a}
  rows = stats.compare_within_sweep({'A': a, 'B': b, 'C': c}, n_resamples=200)
  assert [(r['a'], r['b']) for r in rows] == [('A', 'B'), ('A', 'C'), ('B', 'C')]
  np.testing.assert_allclose([r['p_holm'] for r in rows], stats.holm([r['p_wilcoxon'] for r in rows]))
  assert rows[0]['diff'] == pytest.approx(5.0)
  only = stats.compare_within_sweep({'A': a, 'B': b, 'C': c}, pairs=[('B', 'A')], n_resamples=200)
  assert len(only) == 1 and only[0]['diff'] == pytest.approx(-5.0)
  assert only[0]['p_holm'] == pytest.approx(only[0]['p_wilcoxon'])


# ---------------------------------------------------------------- per_case.csv

def test_read_per_case_csv_round_trip(tmp_path):
  path = tmp_path / 'per_case.csv'
  rows = [{'dataset': 'kvasir', 'case_id': 'cju0', 'height': 332, 'width': 487, 'dice': '0.912345',
           'iou': '0.8', 'hd95': '3.0', 'ece': '0.01', 'extra': 'x'},
          {'dataset': 'isic', 'case_id': '0001', 'height': 10, 'width': 12, 'dice': '0.000000',
           'iou': '0', 'hd95': '15.6', 'ece': '0.2', 'extra': 'y'}]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  assert stats.read_per_case_csv(str(path)) == {('kvasir', 'cju0'): 0.912345, ('isic', '0001'): 0.0}
  with open(path, 'a', newline='') as f:
    csv.DictWriter(f, fieldnames=list(rows[0])).writerow(rows[1])
  with pytest.raises(ValueError):
    stats.read_per_case_csv(str(path))
