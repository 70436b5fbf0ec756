"""Hand-computed / brute-force checks for unisegdiff_jax.metrics."""
import math

import numpy as np
import pytest

from unisegdiff_jax.metrics import (dice, expected_calibration_error, hd95,
                                    iou, mean_metrics, segmentation_metrics)


def _square(shape, r0, c0, size):
    m = np.zeros(shape, bool)
    m[r0:r0 + size, c0:c0 + size] = True
    return m


def _brute_surface(m):
    """Independent: mask pixels with a 4-neighbour outside the mask or image."""
    H, W = m.shape
    pts = []
    for r in range(H):
        for c in range(W):
            if not m[r, c]:
                continue
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                rr, cc = r + dr, c + dc
                if not (0 <= rr < H and 0 <= cc < W) or not m[rr, cc]:
                    pts.append((r, c))
                    break
    return np.array(pts, dtype=np.float64)


def _brute_hd95(a, b):
    sa, sb = _brute_surface(a), _brute_surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))  # O(n^2)
    return float(np.percentile(np.hstack((d.min(1), d.min(0))), 95))


# ---------------------------------------------------------------- dice / iou

def test_dice_iou_offset_squares():
    a = _square((12, 12), 2, 2, 4)   # 16 px
    b = _square((12, 12), 2, 4, 4)   # 16 px, overlap 4 rows x 2 cols = 8
    assert dice(a, b) == pytest.approx(2 * 8 / 32)       # 0.5
    assert iou(a, b) == pytest.approx(8 / 24)            # 1/3
    c = _square((12, 12), 3, 3, 4)   # overlap 3x3 = 9
    assert dice(a, c) == pytest.approx(18 / 32)
    assert iou(a, c) == pytest.approx(9 / 23)


def test_dice_iou_conventions():
    z = np.zeros((5, 5), bool)
    a = _square((5, 5), 1, 1, 2)
    assert dice(z, z) == 1.0 and iou(z, z) == 1.0
    assert dice(a, z) == 0.0 and dice(z, a) == 0.0
    assert iou(a, z) == 0.0
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert dice(a.astype(np.uint8), a) == 1.0
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


# ---------------------------------------------------------------- hd95

def test_hd95_single_pixels():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[1, 1] = True
    b[4, 5] = True                       # (3, 4) away -> 5
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(b, a) == pytest.approx(5.0)


def test_hd95_shifted_square_hand_computed():
    # rim of each 4x4 square has 12 px; distances to the other rim are
    # {0 x4, 1 x4, 2 x4} each way -> 24 values, 95th percentile = 2
    a = _square((12, 12), 2, 2, 4)
    b = _square((12, 12), 2, 4, 4)
    assert hd95(a, b) == pytest.approx(2.0)
    assert _brute_hd95(a, b) == pytest.approx(2.0)


@pytest.mark.parametrize('k', [1, 3, 5])
def test_hd95_shifted_square_vs_bruteforce(k):
    a = _square((30, 30), 5, 5, 10)
    b = _square((30, 30), 5 + k, 5 + k, 10)
    assert hd95(a, b) == pytest.approx(_brute_hd95(a, b))
    assert hd95(a, b) == pytest.approx(hd95(b, a))


def test_hd95_random_blobs_vs_bruteforce():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.random((20, 24)) > 0.6
        b = rng.random((20, 24)) > 0.7
        assert hd95(a, b) == pytest.approx(_brute_hd95(a, b))
        assert hd95(a, b) == pytest.approx(hd95(b, a))


def test_hd95_touching_border_and_identity():
    a = _square((8, 8), 0, 0, 8)          # whole image: rim is the border
    b = _square((8, 8), 0, 0, 4)
    assert hd95(a, b) == pytest.approx(_brute_hd95(a, b))
    assert hd95(b, b) == 0.0


def test_hd95_conventions_and_spacing():
    z = np.zeros((30, 40), bool)
    a = _square((30, 40), 3, 3, 5)
    assert hd95(z, z) == 0.0
    assert hd95(a, z) == pytest.approx(50.0)        # sqrt(30^2 + 40^2)
    assert hd95(z, a) == pytest.approx(50.0)
    p = np.zeros((10, 10), bool)
    q = np.zeros((10, 10), bool)
    p[1, 1] = True
    q[4, 5] = True
    assert hd95(p, q, spacing=2.0) == pytest.approx(10.0)
    assert hd95(p, q, spacing=(1.0, 0.5)) == pytest.approx(math.hypot(3, 2))


def test_segmentation_metrics_keys():
    a = _square((12, 12), 2, 2, 4)
    b = _square((12, 12), 2, 4, 4)
    m = segmentation_metrics(a, b)
    assert set(m) == {'dice', 'iou', 'hd95'}
    assert m == pytest.approx({'dice': 0.5, 'iou': 1 / 3, 'hd95': 2.0})
    assert all(isinstance(v, float) for v in m.values())


# ---------------------------------------------------------------- ECE

def test_ece_perfectly_calibrated_is_zero():
    n_bins = 10
    probs, truth = [], []
    for k in range(n_bins):
        p = (k + 0.5) / n_bins                  # bin centre
        n = 1000
        npos = int(round(p * n))                # exactly p positives
        probs.append(np.full(n, p))
        truth.append(np.arange(n) < npos)
    ece = expected_calibration_error(np.concatenate(probs), np.concatenate(truth), n_bins)
    assert ece == pytest.approx(0.0, abs=1e-9)


def test_ece_confident_wrong_is_one():
    prob = np.ones((8, 8))
    truth = np.zeros((8, 8), bool)
    assert expected_calibration_error(prob, truth) == pytest.approx(1.0)
    assert expected_calibration_error(1 - prob, ~truth) == pytest.approx(1.0)
    assert expected_calibration_error(prob, ~truth) == pytest.approx(0.0)


def test_ece_hand_computed():
    # bin [0.2,0.3): conf 0.2, acc 0 -> gap 0.2, weight 1/2
    # bin [0.8,0.9): conf 0.8, acc 0.5 -> gap 0.3, weight 1/2   => 0.25
    prob = np.array([0.2, 0.2, 0.8, 0.8])
    truth = np.array([0, 0, 1, 0])
    assert expected_calibration_error(prob, truth, n_bins=10) == pytest.approx(0.25)


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([0.5, 1.5]), np.array([0, 1]))
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([np.nan]), np.array([0]))
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([]), np.array([]))


# ---------------------------------------------------------------- mean

def test_mean_metrics():
    rows = [{'dice': 0.5, 'iou': 0.25, 'hd95': 2.0},
            {'dice': 1.0, 'iou': 1.0, 'hd95': 0.0},
            {'dice': 0.0, 'iou': 0.0, 'hd95': float('nan')}]
    m = mean_metrics(rows)
    assert m == pytest.approx({'dice': 0.5, 'iou': 1.25 / 3, 'hd95': 1.0})
    assert math.isnan(mean_metrics([])['dice'])
    assert mean_metrics(rows, keys=('dice',)) == pytest.approx({'dice': 0.5})
