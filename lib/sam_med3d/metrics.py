"""Overlap and boundary metrics for binary 3D masks: Dice and Normalized Surface Dice (NSD).

Both take numpy arrays or torch tensors of shape (I, J, K) (anything > 0 is foreground), indexed as stored on
disk. NSD distances are in millimetres: ``spacing_mm`` gives the voxel size along the array axes (i, j, k), e.g.
``nibabel``'s ``img.header.get_zooms()[:3]`` or the column norms of the affine.

NSD follows MONAI's :func:`monai.metrics.compute_surface_dice` with ``use_subvoxels=True`` (same surface-area
table, same distances; the tests check the two agree), i.e. surface elements weighted by their area as in
DeepMind's ``surface-distance`` package, which the CVPR 2025 interactive-segmentation challenge's evaluation
script uses. It is computed with numpy/scipy on the masks' bounding box rather than through MONAI's one-hot
torch path, which took ~0.7 s per call for a 50k-voxel tumour on CPU (0.1 s here).

Conventions for empty masks (MONAI would give NaN): both empty -> 1.0 (nothing to find, nothing found), exactly
one empty -> 0.0.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["dice", "normalized_surface_dice"]


def binary_mask(volume) -> np.ndarray:
    """A numpy bool array from a numpy array or torch tensor (anything > 0 is foreground)."""
    if hasattr(volume, "detach"):  # torch tensor, without importing torch here
        volume = volume.detach().cpu().numpy()
    arr = np.asarray(volume)
    return arr if arr.dtype == bool else arr > 0


def _pair(pred, gt):
    p, g = binary_mask(pred), binary_mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred has shape {p.shape} but gt has shape {g.shape}; they must match")
    return p, g


def dice(pred, gt) -> float:
    """Dice coefficient ``2|P & G| / (|P| + |G|)`` of two binary masks of the same shape; 1.0 when both are empty."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(p, g).sum()) / total


def normalized_surface_dice(pred, gt, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
                            tolerance_mm: float = 2.0) -> float:
    """Normalized Surface Dice: the fraction of both surfaces lying within ``tolerance_mm`` of the other surface.

    Args:
        pred, gt: binary masks of the same shape (3D, array axes i, j, k).
        spacing_mm: voxel size in mm along the array axes (anisotropic spacing is honoured).
        tolerance_mm: accepted boundary deviation in mm (>= 0).

    Returns:
        NSD in [0, 1]: 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    p, g = _pair(pred, gt)
    spacing = [float(s) for s in np.asarray(spacing_mm, dtype=float).ravel()]
    if len(spacing) != p.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing_mm must be {p.ndim} positive numbers (mm per voxel along the array axes), "
                         f"got {spacing}")
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 1.0
    if not has_p or not has_g:
        return 0.0
    # Crop to the union's bounding box plus one background layer: surface distances do not depend on anything
    # else, and whole CT volumes (512x512xN) would otherwise be one-hot encoded in full. The zero layer also
    # makes an object touching the scan border get a surface there, as in DeepMind's implementation.
    box = _bounding_box(p | g)
    p_box, g_box = np.pad(p[box], 1), np.pad(g[box], 1)

    on_p, areas_p = _surface_elements(p_box, spacing)
    on_g, areas_g = _surface_elements(g_box, spacing)
    # Distance from each surface element of one mask to the nearest surface element of the other (in mm).
    dist_to_g = ndimage.distance_transform_edt(~on_g, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~on_p, sampling=spacing)
    total = float(areas_p[on_p].sum() + areas_g[on_g].sum())
    if total == 0.0:  # pragma: no cover - non-empty masks always have a surface inside the padded box
        return 0.0
    good = float(areas_p[on_p & (dist_to_g <= tolerance_mm)].sum() + areas_g[on_g & (dist_to_p <= tolerance_mm)].sum())
    return good / total


def _bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of a non-empty mask (axis projections: much faster
    than ``argwhere`` on a whole scan)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _surface_elements(mask: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Surface elements of ``mask``: ``(on_surface bool, area mm^2)`` per 2x2x2 voxel neighbourhood, both of
    shape ``mask.shape - 1``.

    Each neighbourhood's 8 voxels form a code (0-255) looked up in MONAI's table of DeepMind's surface areas
    (:func:`monai.metrics.utils.get_code_to_measure_table`): the same numbers MONAI's
    ``compute_surface_dice(use_subvoxels=True)`` uses, computed here with numpy shifts instead of a torch
    convolution and one-hot tensors (several times faster on CPU for large masks).
    """
    table, kernel = _area_table(tuple(spacing))
    m = mask.astype(np.uint8)
    code = np.zeros(tuple(n - 1 for n in m.shape), dtype=np.int32)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                # Correlation with MONAI's 2x2x2 kernel of powers of two: same code numbering as its table.
                code += int(kernel[a, b, c]) * m[a:a + code.shape[0], b:b + code.shape[1], c:c + code.shape[2]]
    on_surface = (code != 0) & (code != 255)  # neighbourhoods neither fully outside nor fully inside
    return on_surface, table[code]


@lru_cache(maxsize=32)
def _area_table(spacing: Tuple[float, ...]) -> Tuple[np.ndarray, np.ndarray]:
    from monai.metrics.utils import get_code_to_measure_table

    table, kernel = get_code_to_measure_table(spacing, device="cpu")
    return (np.asarray(table.cpu().numpy(), dtype=np.float64),
            np.asarray(kernel.cpu().numpy()).reshape(2, 2, 2).astype(np.int64))
