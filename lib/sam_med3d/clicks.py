"""Simulated user clicks for interactive 3D segmentation (evaluation and click-iteration training).

Two click protocols, both computed from the error of the current prediction against the ground truth:

- :func:`random_error_click` -- the official SAM-Med3D protocol (the ``"random"`` click method used by its
  training and validation scripts): the error region is the union of false negatives (``gt & ~pred``) and
  false positives (``pred & ~gt``); one voxel is drawn uniformly from that union, and the click is positive
  (label 1) when the voxel is a false negative, negative (label 0) otherwise. On an empty prediction this is a
  uniform positive click inside the object.
- :func:`center_error_click` -- the CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image
  Segmentation" challenge protocol: the error mask ``pred != gt`` is split into 26-connected components, the
  largest one (by voxel count) is taken, and the click goes to the voxel of that component farthest from its
  boundary (maximum Euclidean distance transform; voxels outside the component and outside the scan count as
  boundary). The label is the ground truth at that voxel (1 = under-segmentation, 0 = over-segmentation).

Coordinate convention: volumes are numpy arrays indexed ``[i, j, k]`` exactly as stored (NIfTI array axes / ITK
index order), and a click is the ``(3,)`` int64 voxel index into that array. Labels: 1 = positive (add to the
object), 0 = negative (remove). Both functions return ``None`` when the prediction already equals the ground truth.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .metrics import binary_mask

__all__ = ["random_error_click", "center_error_click", "first_click", "next_click", "simulate_clicks_batch",
           "CLICK_MODES"]

#: Names accepted by ``mode`` arguments.
CLICK_MODES = ("random", "center")

Click = Tuple[np.ndarray, int]

# 26-connectivity, as in the challenge's cc3d.connected_components(..., connectivity=26).
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def _as_bool(volume, name: str) -> np.ndarray:
    """A 3D numpy bool array (:func:`sam_med3d.metrics.binary_mask`: anything > 0 is foreground)."""
    arr = binary_mask(volume)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume, got an array of shape {arr.shape}")
    return arr


def _check_pair(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
    gt_b = _as_bool(gt, "gt")
    pred_b = _as_bool(pred, "pred")
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"pred has shape {pred_b.shape} but gt has shape {gt_b.shape}; they must match")
    if not gt_b.any():
        raise ValueError(f"gt is empty (no foreground voxel in a volume of shape {gt_b.shape}); "
                         "a click needs an object to segment")
    return pred_b, gt_b


def _check_rng(rng) -> np.random.Generator:
    if rng is None:
        raise ValueError("rng is required: pass np.random.default_rng(seed) for reproducible clicks")
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    return rng


def random_error_click(pred, gt, rng: np.random.Generator) -> Optional[Click]:
    """The official SAM-Med3D click: a uniformly random voxel of the error region.

    Args:
        pred: current prediction, (I, J, K) bool (numpy or torch; > 0 is foreground); all False before the
            first click.
        gt: ground-truth mask of the same shape.
        rng: ``np.random.default_rng(seed)``; the only source of randomness.

    Returns:
        ``(point, label)`` with ``point`` a (3,) int64 voxel index ``(i, j, k)`` and ``label`` 1 when the voxel is a
        false negative (positive click), 0 when it is a false positive (negative click); ``None`` when
        ``pred == gt`` everywhere (no error left).

    Raises:
        ValueError: empty ``gt``, shape mismatch, not 3D, or a missing ``rng``.
    """
    pred_b, gt_b = _check_pair(pred, gt)
    rng = _check_rng(rng)
    error = pred_b != gt_b  # = false negatives | false positives
    # flatnonzero keeps C order, so the draw depends only on the seed and the masks.
    flat = np.flatnonzero(error)
    if flat.size == 0:
        return None
    index = flat[rng.integers(flat.size)]
    point = np.asarray(np.unravel_index(index, error.shape), dtype=np.int64)
    label = int(gt_b[tuple(point)])  # in the error and in gt -> false negative -> positive click
    return point, label


def _component_center(component: np.ndarray, spacing: Optional[Sequence[float]],
                      rng: Optional[np.random.Generator]) -> np.ndarray:
    """Voxel of maximum EDT inside ``component`` (bool, full volume shape); ties -> rng or first in C order."""
    coords = np.argwhere(component)
    lo = coords.min(axis=0)
    hi = coords.max(axis=0) + 1
    # The EDT only needs the component's bounding box plus one layer of background: every voxel outside the box
    # is background anyway, and the padded layer makes the scan border count as a boundary (as in the challenge,
    # which pads the box with zeros before the EDT).
    box = np.pad(component[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)
    dist = ndimage.distance_transform_edt(box, sampling=spacing)[1:-1, 1:-1, 1:-1]
    best = np.argwhere(dist == dist.max())
    choice = best[0] if rng is None or len(best) == 1 else best[rng.integers(len(best))]
    return (choice + lo).astype(np.int64)


def center_error_click(pred, gt, rng: Optional[np.random.Generator] = None,
                       spacing: Optional[Sequence[float]] = None) -> Optional[Click]:
    """The CVPR 2025 challenge click: the centre of the largest connected error region.

    Args:
        pred: current prediction, (I, J, K) bool; all False before the first click.
        gt: ground-truth mask of the same shape.
        rng: optional generator used only to break ties between equally central voxels; without it the first
            such voxel in C order is taken, so the click is fully deterministic.
        spacing: optional voxel size (3 floats, mm, in array-axis order) for an anisotropic EDT; the challenge
            uses voxel units (``None``).

    Returns:
        ``(point (3,) int64, label)``: label 1 when the centre is a false negative (under-segmentation), 0 when it
        is a false positive; ``None`` when ``pred == gt``.

    Raises:
        ValueError: empty ``gt``, shape mismatch, not 3D, or a bad ``spacing``.
    """
    pred_b, gt_b = _check_pair(pred, gt)
    if rng is not None:
        rng = _check_rng(rng)
    if spacing is not None:
        spacing = [float(s) for s in np.asarray(spacing, dtype=float).ravel()]
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (mm per voxel along i, j, k), got {spacing}")
    error = pred_b != gt_b
    if not error.any():
        return None
    components, count = ndimage.label(error, structure=_STRUCTURE_26)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    largest = components == int(np.argmax(sizes))  # argmax -> lowest label among equal sizes (C-order first)
    point = _component_center(largest, spacing, rng)
    return point, int(gt_b[tuple(point)])


def next_click(pred, gt, rng: Optional[np.random.Generator], mode: str = "random",
               spacing: Optional[Sequence[float]] = None) -> Optional[Click]:
    """Dispatch to :func:`random_error_click` (``mode="random"``) or :func:`center_error_click` (``"center"``)."""
    if mode == "random":
        return random_error_click(pred, gt, rng)
    if mode == "center":
        return center_error_click(pred, gt, rng=rng, spacing=spacing)
    raise ValueError(f"click mode must be one of {CLICK_MODES}, got {mode!r}")


def first_click(gt, rng: Optional[np.random.Generator], mode: str = "random",
                spacing: Optional[Sequence[float]] = None) -> Click:
    """The first click, made on an empty prediction: always positive and inside ``gt``.

    ``mode="random"``: a uniform voxel of ``gt``; ``mode="center"``: the most interior voxel of the largest
    connected component of ``gt``. Returns ``(point (3,) int64, 1)``.
    """
    gt_b = _as_bool(gt, "gt")
    click = next_click(np.zeros_like(gt_b), gt_b, rng, mode=mode, spacing=spacing)
    assert click is not None  # gt is non-empty (checked), so the empty prediction has errors
    return click


def simulate_clicks_batch(pred, gt, rng: Optional[np.random.Generator], mode: str = "random"):
    """One new click per batch item, as torch tensors (for click-iteration training).

    Args:
        pred: (B, I, J, K) or (B, 1, I, J, K) bool/0-1 tensor (or array): the current predictions.
        gt: same shape, the ground truths.
        rng: ``np.random.default_rng(seed)``; consumed item by item, in batch order.
        mode: ``"random"`` (official SAM-Med3D) or ``"center"`` (challenge).

    Returns:
        ``(points, labels)``: ``points`` (B, 1, 3) int64 voxel indices along the last three axes, ``labels``
        (B, 1) int64, on ``pred``'s device when it is a tensor. When an item has no error left (or an empty gt),
        the click is the padding point ``(0, 0, 0)`` with label ``-1``, which SAM's prompt encoder treats as
        "not a point", so batches keep a fixed shape.
    """
    import torch

    if mode == "random" and isinstance(pred, torch.Tensor) and isinstance(gt, torch.Tensor):
        return _random_error_clicks_on_device(pred, gt, rng)
    device = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
    p = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    g = gt.detach().cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred has shape {p.shape} but gt has shape {g.shape}; they must match")
    if p.ndim == 5:
        if p.shape[1] != 1:
            raise ValueError(f"pred/gt with 5 dims must be (B, 1, I, J, K), got {p.shape}")
        p, g = p[:, 0], g[:, 0]
    elif p.ndim != 4:
        raise ValueError(f"pred/gt must be (B, I, J, K) or (B, 1, I, J, K), got shape {p.shape}")
    points = np.zeros((p.shape[0], 1, 3), dtype=np.int64)
    labels = np.full((p.shape[0], 1), -1, dtype=np.int64)
    for b in range(p.shape[0]):
        if not (g[b] > 0).any():
            continue
        click = next_click(p[b] > 0, g[b] > 0, rng, mode=mode)
        if click is not None:
            points[b, 0], labels[b, 0] = click
    return torch.from_numpy(points).to(device), torch.from_numpy(labels).to(device)


def _random_error_clicks_on_device(pred, gt, rng):
    """:func:`random_error_click` per batch item where the masks are (a GPU's, in training): only the error
    count and the chosen voxel leave the device, never the masks; the same rng draws, so the same clicks."""
    import torch

    if pred.shape != gt.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but gt has shape {tuple(gt.shape)}; they must match")
    if pred.ndim == 5:
        if pred.shape[1] != 1:
            raise ValueError(f"pred/gt with 5 dims must be (B, 1, I, J, K), got {tuple(pred.shape)}")
        pred, gt = pred[:, 0], gt[:, 0]
    elif pred.ndim != 4:
        raise ValueError(f"pred/gt must be (B, I, J, K) or (B, 1, I, J, K), got shape {tuple(pred.shape)}")
    pred, gt = pred.detach() > 0, gt.detach() > 0
    error = (pred != gt).flatten(1)
    counts = error.sum(1).tolist()
    has_target = gt.flatten(1).any(1).tolist()
    shape = tuple(gt.shape[1:])
    points = np.zeros((gt.shape[0], 1, 3), dtype=np.int64)
    labels = np.full((gt.shape[0], 1), -1, dtype=np.int64)
    for b, (count, target) in enumerate(zip(counts, has_target)):
        if not target or count == 0:
            continue
        nth = int(_check_rng(rng).integers(count))
        # The nth error voxel in C order, as np.flatnonzero(error)[nth]: the cumulative count reaches nth + 1 there.
        index = int(torch.searchsorted(error[b].cumsum(0, dtype=torch.int64),
                                       torch.tensor([nth + 1], device=error.device)).item())
        points[b, 0] = np.unravel_index(index, shape)
        labels[b, 0] = int(gt[b].flatten()[index].item())
    return torch.from_numpy(points).to(gt.device), torch.from_numpy(labels).to(gt.device)
