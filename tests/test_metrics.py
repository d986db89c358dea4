"""Dice and NSD on analytic shapes with known answers (spheres, shifted cubes, anisotropic voxels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_med3d.metrics import dice, normalized_surface_dice


def sphere(shape, center, radius_mm, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``center`` (voxel index), distances in mm."""
    grid = np.indices(shape).astype(float)
    return sum(((grid[i] - center[i]) * spacing[i]) ** 2 for i in range(3)) <= radius_mm ** 2


def cube(shape, lo, size) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = True
    return m


def test_dice_shifted_cubes_exact():
    a = cube((40, 40, 40), (5, 5, 5), 10)
    b = cube((40, 40, 40), (8, 5, 5), 10)  # shifted by 3 along i: overlap 7x10x10
    assert dice(a, b) == pytest.approx(2 * 700 / 2000)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_dice_empty_and_torch_inputs():
    z = np.zeros((4, 4, 4), dtype=np.uint8)
    assert dice(z, z) == 1.0
    a = cube((10, 10, 10), (2, 2, 2), 4)
    assert dice(torch.from_numpy(a), torch.from_numpy(a.astype(np.uint8))) == 1.0


def test_dice_concentric_spheres_close_to_volume_ratio():
    big = sphere((60, 60, 60), (30, 30, 30), 15)
    small = sphere((60, 60, 60), (30, 30, 30), 12)
    # Continuous answer 2 r^3 / (r^3 + R^3); voxelisation changes it by well under 2 %.
    assert dice(big, small) == pytest.approx(2 * 12 ** 3 / (12 ** 3 + 15 ** 3), abs=0.015)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="shape"):
        normalized_surface_dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), (1, 1, 1), 2)


def test_nsd_concentric_spheres_step_at_radius_gap():
    big = sphere((60, 60, 60), (30, 30, 30), 15)
    small = sphere((60, 60, 60), (30, 30, 30), 12)
    # Every surface point is 3 mm from the other surface: NSD is ~0 below 3 mm and 1 above.
    assert normalized_surface_dice(big, small, (1, 1, 1), 1.5) < 0.1
    assert normalized_surface_dice(big, small, (1, 1, 1), 4.5) == pytest.approx(1.0)
    assert normalized_surface_dice(big, big, (1, 1, 1), 0.0) == pytest.approx(1.0)


def test_nsd_shifted_cubes():
    a = cube((40, 40, 40), (5, 5, 5), 10)
    b = cube((40, 40, 40), (9, 5, 5), 10)  # shift 4 voxels along i
    assert normalized_surface_dice(a, b, (1, 1, 1), 5.0) == pytest.approx(1.0)
    low = normalized_surface_dice(a, b, (1, 1, 1), 0.5)
    # Only the side faces' overlapping part (6/10 of 4 faces) lies on the other surface: 240 / 600 of the area,
    # plus part of the first surfel row past the overlap (surface elements sit on the voxel-corner grid).
    assert 0.4 <= low <= 0.5
    assert normalized_surface_dice(a, b, (1, 1, 1), 2.0) > low


def test_nsd_anisotropic_spacing_follows_array_axes():
    spacing = (1.0, 1.0, 3.0)
    a = sphere((60, 60, 30), (30, 30, 15), 12, spacing)
    shifted_fine = np.roll(a, 1, axis=0)    # moved 1 mm
    shifted_coarse = np.roll(a, 1, axis=2)  # moved 3 mm
    assert normalized_surface_dice(a, shifted_fine, spacing, 1.0) == pytest.approx(1.0)
    assert normalized_surface_dice(a, shifted_coarse, spacing, 1.0) < 0.8
    assert normalized_surface_dice(a, shifted_coarse, spacing, 3.0) == pytest.approx(1.0)
    # Isotropic 1 mm would have wrongly accepted the coarse shift at 1 mm.
    assert normalized_surface_dice(a, shifted_coarse, (1, 1, 1), 1.0) == pytest.approx(1.0)


def test_nsd_empty_conventions_and_bad_arguments():
    a = cube((10, 10, 10), (2, 2, 2), 4)
    z = np.zeros_like(a)
    assert normalized_surface_dice(z, z, (1, 1, 1), 2) == 1.0
    assert normalized_surface_dice(a, z, (1, 1, 1), 2) == 0.0
    assert normalized_surface_dice(z, a, (1, 1, 1), 2) == 0.0
    with pytest.raises(ValueError, match="spacing_mm"):
        normalized_surface_dice(a, a, (1, 1), 2)
    with pytest.raises(ValueError, match="spacing_mm"):
        normalized_surface_dice(a, a, (1, 0, 1), 2)
    with pytest.raises(ValueError, match="tolerance_mm"):
        normalized_surface_dice(a, a, (1, 1, 1), -1)


def test_nsd_object_touching_the_border():
    a = np.zeros((20, 20, 20), dtype=bool)
    a[:8, 5:15, 5:15] = True
    assert normalized_surface_dice(a, a, (1, 1, 1), 0.0) == pytest.approx(1.0)
    b = np.zeros_like(a)
    b[:10, 5:15, 5:15] = True
    assert 0.0 < normalized_surface_dice(a, b, (1, 1, 1), 0.5) < 1.0


def test_nsd_matches_monai_compute_surface_dice_on_random_shapes():
    """Our numpy NSD must equal MONAI's ``compute_surface_dice(use_subvoxels=True)`` (the reference)."""
    import warnings

    from monai.metrics import compute_surface_dice
    from scipy import ndimage

    def one_hot(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        return torch.stack([~t, t])[None].float()

    rng = np.random.default_rng(0)
    for _ in range(12):
        shape = tuple(int(n) for n in rng.integers(8, 28, 3))
        a = ndimage.binary_dilation(rng.random(shape) < 0.02, iterations=int(rng.integers(1, 3)))
        b = ndimage.binary_dilation(rng.random(shape) < 0.02, iterations=int(rng.integers(1, 3))) | (
            a & (rng.random(shape) < 0.5))
        if not a.any() or not b.any():
            continue
        spacing = tuple(float(s) for s in rng.uniform(0.5, 3.0, 3))
        tol = float(rng.uniform(0.0, 4.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = float(compute_surface_dice(one_hot(b), one_hot(a), [tol], spacing=spacing, use_subvoxels=True)[0, 0])
        assert normalized_surface_dice(b, a, spacing, tol) == pytest.approx(ref, abs=1e-5)
