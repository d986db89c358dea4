"""Simulated clicks: the official SAM-Med3D random error click and the CVPR 2025 challenge centre click."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_med3d.clicks import (center_error_click, first_click, next_click, random_error_click,
                              simulate_clicks_batch)


def box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_random_click_on_empty_prediction_is_positive_inside_gt():
    gt = box((20, 20, 20), (5, 6, 7), (9, 10, 11))
    pred = np.zeros_like(gt)
    rng = np.random.default_rng(0)
    for _ in range(50):
        point, label = random_error_click(pred, gt, rng)
        assert point.shape == (3,) and point.dtype == np.int64
        assert label == 1 and gt[tuple(point)]


def test_random_click_label_follows_error_type_and_is_uniform_over_the_union():
    gt = box((20, 20, 20), (0, 0, 0), (4, 4, 4))      # 64 voxels, half missed by pred
    pred = box((20, 20, 20), (0, 0, 0), (2, 4, 4))    # 32 true positives
    pred |= box((20, 20, 20), (10, 10, 10), (14, 14, 16))  # 96 false positives
    fn = gt & ~pred
    fp = pred & ~gt
    rng = np.random.default_rng(1)
    n_pos = 0
    trials = 4000
    for _ in range(trials):
        point, label = random_error_click(pred, gt, rng)
        p = tuple(point)
        assert (label == 1 and fn[p]) or (label == 0 and fp[p])
        n_pos += label
    # Uniform over the union of 32 FN + 96 FP voxels -> P(positive) = 1/4 (the official code draws from the union,
    # not 50/50 between FN and FP).
    assert n_pos / trials == pytest.approx(0.25, abs=0.03)


def test_random_click_is_reproducible_with_the_seed():
    gt = box((30, 30, 30), (3, 3, 3), (20, 25, 12))
    pred = box((30, 30, 30), (5, 5, 5), (25, 25, 25))
    a = [random_error_click(pred, gt, np.random.default_rng(7)) for _ in range(3)]
    assert all(np.array_equal(a[0][0], x[0]) and a[0][1] == x[1] for x in a)
    b = random_error_click(pred, gt, np.random.default_rng(8))
    c = random_error_click(pred, gt, np.random.default_rng(7))
    assert np.array_equal(a[0][0], c[0])
    assert pred[tuple(b[0])] != gt[tuple(b[0])]  # an error voxel, and the seed decides which
    assert not np.array_equal(a[0][0], b[0])


def test_no_error_left_returns_none():
    gt = box((10, 10, 10), (2, 2, 2), (5, 5, 5))
    assert random_error_click(gt.copy(), gt, np.random.default_rng(0)) is None
    assert center_error_click(gt.copy(), gt) is None


@pytest.mark.parametrize("fn", [
    lambda p, g: random_error_click(p, g, np.random.default_rng(0)),
    lambda p, g: center_error_click(p, g),
])
def test_bad_inputs_raise_clear_errors(fn):
    gt = box((10, 10, 10), (2, 2, 2), (5, 5, 5))
    with pytest.raises(ValueError, match="gt is empty"):
        fn(np.zeros_like(gt), np.zeros_like(gt))
    with pytest.raises(ValueError, match="shape"):
        fn(np.zeros((10, 10, 9), dtype=bool), gt)
    with pytest.raises(ValueError, match="3D"):
        fn(np.zeros((10, 10), dtype=bool), np.ones((10, 10), dtype=bool))


def test_random_click_requires_a_generator():
    gt = box((10, 10, 10), (2, 2, 2), (5, 5, 5))
    with pytest.raises(ValueError, match="rng"):
        random_error_click(np.zeros_like(gt), gt, None)


def test_center_click_is_the_middle_of_the_largest_error_component():
    shape = (40, 40, 40)
    gt = box(shape, (10, 10, 10), (21, 21, 21))          # 11^3 cube, centre (15, 15, 15)
    pred = np.zeros(shape, dtype=bool)
    pred |= box(shape, (30, 30, 30), (33, 33, 33))        # small false positive blob
    point, label = center_error_click(pred, gt)
    assert tuple(point) == (15, 15, 15) and label == 1
    # Now the prediction covers the cube, misses a 3^3 corner of it and adds a 9^3 false positive cube: the
    # click is negative, at the centre of the false positive.
    pred = gt | box(shape, (27, 5, 5), (36, 14, 14))      # centre (31, 9, 9)
    pred &= ~box(shape, (10, 10, 10), (13, 13, 13))
    point, label = center_error_click(pred, gt)
    assert label == 0 and tuple(point) == (31, 9, 9)


def test_center_click_scan_border_counts_as_boundary():
    # An error touching the scan border: its centre must not be on the border.
    gt = box((30, 30, 30), (0, 10, 10), (9, 19, 19))      # 9^3 cube on the border -> centre (4, 14, 14)
    point, label = center_error_click(np.zeros_like(gt), gt)
    assert tuple(point) == (4, 14, 14) and label == 1


def test_center_click_spacing_changes_the_centre():
    # An L-shaped object: thick in mm along i only when i voxels are large.
    gt = np.zeros((20, 40, 40), dtype=bool)
    gt[2:8, 5:35, 5:11] = True     # arm A: 6 x 30 x 6 voxels
    gt[2:18, 5:11, 11:35] = True   # arm B: 16 x 6 x 24 voxels
    iso, _ = center_error_click(np.zeros_like(gt), gt)
    aniso, _ = center_error_click(np.zeros_like(gt), gt, spacing=(0.2, 1.0, 1.0))
    assert gt[tuple(iso)] and gt[tuple(aniso)]
    assert not np.array_equal(iso, aniso)
    with pytest.raises(ValueError, match="spacing"):
        center_error_click(np.zeros_like(gt), gt, spacing=(1.0, 1.0))


def test_center_click_ties_use_the_rng_reproducibly():
    gt = box((20, 20, 20), (5, 5, 5), (15, 7, 7))   # a 10x2x2 bar: many voxels tie for the maximum EDT
    p0, _ = center_error_click(np.zeros_like(gt), gt)
    assert tuple(p0) == tuple(np.argwhere(gt)[0])  # without rng: first voxel of maximum distance (C order)
    a, _ = center_error_click(np.zeros_like(gt), gt, rng=np.random.default_rng(3))
    b, _ = center_error_click(np.zeros_like(gt), gt, rng=np.random.default_rng(3))
    assert np.array_equal(a, b) and gt[tuple(a)]


def test_first_click_modes_and_next_click_dispatch():
    gt = box((20, 20, 20), (4, 4, 4), (13, 13, 13))
    p, lab = first_click(gt, np.random.default_rng(0), mode="center")
    assert tuple(p) == (8, 8, 8) and lab == 1
    p, lab = first_click(gt, np.random.default_rng(0), mode="random")
    assert gt[tuple(p)] and lab == 1
    with pytest.raises(ValueError, match="click mode"):
        next_click(np.zeros_like(gt), gt, np.random.default_rng(0), mode="edge")


def test_batched_clicks_for_training():
    gt = torch.zeros((3, 1, 16, 16, 16), dtype=torch.bool)
    gt[0, 0, 2:6, 2:6, 2:6] = True
    gt[1, 0, 8:12, 8:12, 8:12] = True
    pred = torch.zeros_like(gt)
    pred[1] = gt[1]                      # item 1: perfect -> padding click
    pred[2, 0, 0:3, 0:3, 0:3] = True     # item 2: empty gt -> padding click
    points, labels = simulate_clicks_batch(pred, gt, np.random.default_rng(0), mode="random")
    assert points.shape == (3, 1, 3) and labels.shape == (3, 1)
    assert points.dtype == torch.int64 and labels.dtype == torch.int64
    assert labels[0, 0] == 1 and bool(gt[0, 0][tuple(points[0, 0].tolist())])
    assert labels[1, 0] == -1 and labels[2, 0] == -1
    again, _ = simulate_clicks_batch(pred, gt, np.random.default_rng(0), mode="random")
    assert torch.equal(points, again)
    p4, l4 = simulate_clicks_batch(pred[:, 0], gt[:, 0], np.random.default_rng(0), mode="center")
    assert p4.shape == (3, 1, 3) and l4[0, 0] == 1
    with pytest.raises(ValueError, match="shape"):
        simulate_clicks_batch(pred[:2], gt, np.random.default_rng(0))
