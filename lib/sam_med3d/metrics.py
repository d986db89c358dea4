"""Overlap and boundary metrics for binary 3D masks: Dice and Normalized Surface Dice (NSD).

Both take numpy arrays or torch tensors of shape (I, J, K) (anything > 0 is foreground), indexed as stored on
disk. NSD distances are in millimetres: ``spacing_mm`` gives the voxel size along the array axes (i, j, k), e.g.
``nibabel``'s ``img.header.get_zooms()[:3]`` or the column norms of the affine.

NSD is MONAI's :func:`monai.metrics.compute_surface_dice` with ``use_subvoxels=True``, i.e. surface elements
weighted by their area as in DeepMind's ``surface-distance`` package, which is what the SAM-Med3D papers and
the CVPR 2024/2025 segmentation challenges report. Conventions for empty masks (MONAI would give NaN): both
empty -> 1.0 (nothing to find, nothing found), exactly one empty -> 0.0.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

__all__ = ["dice", "normalized_surface_dice"]


def _as_bool(volume, name: str) -> np.ndarray:
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu().numpy()
    arr = np.asarray(volume)
    return arr if arr.dtype == bool else arr > 0


def _pair(pred, gt):
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
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
                         f"got {list(spacing_mm)}")
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
    coords = np.argwhere(p | g)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p_box, g_box = np.pad(p[box], 1), np.pad(g[box], 1)

    import torch
    from monai.metrics import compute_surface_dice

    def one_hot(mask: np.ndarray) -> torch.Tensor:
        m = torch.from_numpy(mask)
        return torch.stack([~m, m])[None].to(torch.float32)  # (1, 2, I, J, K): background, foreground

    with warnings.catch_warnings():
        # MONAI 1.5 warns about its own deprecated internal argument (always_return_as_numpy) on every call.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        nsd = compute_surface_dice(one_hot(p_box), one_hot(g_box), class_thresholds=[float(tolerance_mm)],
                                   include_background=False, distance_metric="euclidean", spacing=spacing,
                                   use_subvoxels=True)
    return float(nsd.reshape(-1)[0])
