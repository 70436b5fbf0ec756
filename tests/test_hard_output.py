"""experiments.hard_output's helpers against hand-computed values (no model)."""

import numpy as np
import pytest

from experiments import hard_output


def test_hard_binarises_at_the_threshold_inclusive():
  prob = np.array([[0.2, 0.5], [0.49, 0.9]], np.float32)
  np.testing.assert_array_equal(hard_output.hard(prob, 0.5), [[0.0, 1.0], [0.0, 1.0]])


def test_band_summary_by_the_soft_dice():
  soft = np.array([0.2, 0.4, 0.6, 0.9, 1.0])
  other = np.array([0.2, 0.3, 0.7, 0.8, 0.9])
  rows = {r['band']: r for r in hard_output.band_summary(soft, other)}
  assert [rows[b]['n'] for b in ('soft < 0.5', '0.5–0.8', '≥ 0.8')] == [2, 1, 2]
  assert rows['soft < 0.5']['diff'] == pytest.approx(-5.0)  # (0 - 10) / 2 points
  assert rows['0.5–0.8']['diff'] == pytest.approx(10.0)
  assert rows['≥ 0.8']['hard'] == pytest.approx(85.0) and rows['≥ 0.8']['diff'] == pytest.approx(-10.0)


def test_band_summary_leaves_out_empty_bands():
  assert [r['band'] for r in hard_output.band_summary(np.array([0.9]), np.array([0.9]))] == ['≥ 0.8']
