"""A classical click-driven baseline: scikit-image's random walker on the SAM-Med3D crop.

:class:`RandomWalkerPredictor` has the predictor interface used by :mod:`sam_med3d.evaluate`
(``set_image`` / ``predict`` / ``reset``), so the evaluation loop is the same for it and for SAM-Med3D.

For each call, given all clicks so far (original voxel indices ``(i, j, k)``, labels 1 = positive, 0 = negative):

1. **Crop**: the same crop policy as :class:`sam_med3d.predictor.Sam3DPredictor`: a ``crop_size``^3 box of the
   canonical RAS 1.5 mm grid (:meth:`sam_med3d.geometry.PreparedScan.crop_around`) centred on the positive
   clicks' bounding box; per ``label_key`` the crop stays put while new positive clicks fall inside it, and is
   re-centred on all positive clicks (or on the new ones, if that crop would miss them) when one falls
   outside. Nothing depends on the ground truth.
2. **Solver grid**: the crop's intensities are resampled to ``work_size``^3 (trilinear; 64^3 by default, i.e. 3 mm
   voxels for the 128^3 / 1.5 mm crop) because the conjugate-gradient solve on 128^3 voxels takes ~30 s on a CPU
   core and ~1 s on 64^3. Intensities are clipped to the 0.5-99.5 percentiles of the in-scan voxels and scaled
   to [0, 1].
3. **Seeds**: positive clicks -> label 1; negative clicks -> label 2. Each click seeds the voxels of a
   ``(2 seed_radius + 1)``^3 cube around it (on the solver grid) whose normalised intensity is within
   ``seed_tolerance`` of the clicked voxel's: a single-voxel seed carries almost no weight against the border
   prior in 3D. **Background prior**: the outer one-voxel shell of the crop is also label 2 (the crop is
   centred on the object, so its border is assumed to be background: a user would place a box around the
   object; objects bigger than the crop are clipped by the crop anyway). Padding voxels outside the scan are
   inactive (removed from the graph). A click that falls outside the crop (positive clicks spread wider than
   the crop) is ignored.
4. **Solve** ``skimage.segmentation.random_walker(mode="cg_j", beta=beta, return_full_prob=True)``; the
   probability of label 1 is upsampled to the crop grid and pasted back onto the original grid
   (:meth:`~sam_med3d.geometry.PreparedScan.paste_back`); ``mask = probability > 0.5``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from .geometry import Crop, PreparedScan, crop_keeps_clicks, place_crop

__all__ = ["RandomWalkerPredictor", "RandomWalkerResult"]


@dataclass
class RandomWalkerResult:
    """Same fields as the SAM-Med3D predictor's result.

    Attributes:
        mask: uint8 ``(I, J, K)`` on the original scan grid.
        probabilities: float32 ``(I, J, K)``, random-walker probability of the object (0 outside the crop).
        affine: the scan's 4x4 voxel -> RAS affine.
        iou: always NaN (the random walker has no quality estimate).
        timings: seconds per stage (``crop``, ``solve``, ``paste``).
        encoder_ran: always False (no encoder).
        crop: the crop used.
    """

    mask: np.ndarray
    probabilities: np.ndarray
    affine: np.ndarray
    iou: float = float("nan")
    timings: Dict[str, float] = field(default_factory=dict)
    encoder_ran: bool = False
    crop: Optional[Crop] = None


def _resize(volume: torch.Tensor, size: int) -> torch.Tensor:
    """A cubic ``(S, S, S)`` float tensor resampled trilinearly to ``size``^3 (returned as is when ``S == size``)."""
    if volume.shape[0] == size:
        return volume
    return F.interpolate(volume[None, None], size=(size,) * 3, mode="trilinear", align_corners=False)[0, 0]


class RandomWalkerPredictor:
    """Random-walker segmentation from clicks on a whole scan (see the module docstring for the method).

    Args:
        crop_size: crop edge in canonical 1.5 mm voxels (128 = SAM-Med3D's crop).
        work_size: edge of the grid the solver runs on (the crop is resampled to it).
        beta: random-walker edge-weight sharpness (scikit-image's ``beta``; weights ``exp(-beta g^2 / (10 std))``).
        tol: conjugate-gradient tolerance.
    """

    def __init__(self, crop_size: int = 128, work_size: int = 64, beta: float = 3000.0, tol: float = 1e-3,
                 seed_radius: int = 2, seed_tolerance: float = 0.1) -> None:
        if crop_size < 4 or work_size < 4:
            raise ValueError(f"crop_size and work_size must be >= 4, got {crop_size} and {work_size}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.crop_size = int(crop_size)
        self.work_size = int(work_size)
        self.beta = float(beta)
        self.tol = float(tol)
        self.seed_radius = int(seed_radius)
        self.seed_tolerance = float(seed_tolerance)
        self.prepared: Optional[PreparedScan] = None
        self._crops: Dict[object, Tuple[int, Crop]] = {}  # label_key -> (clicks seen, crop)

    def set_image(self, path_or_array, affine=None) -> None:
        """Load a scan (path, array (I, J, K) + optional 4x4 RAS affine, or anything ``load_scan`` takes)."""
        self.prepared = PreparedScan.load(path_or_array, affine)
        self._crops.clear()

    def reset(self, label_key: Optional[object] = None) -> None:
        """Forget the crop of ``label_key`` (of every label if None)."""
        if label_key is None:
            self._crops.clear()
        else:
            self._crops.pop(label_key, None)

    def _place_crop(self, pts: np.ndarray, lab: np.ndarray, label_key: object) -> Crop:
        """The crop for these clicks: the SAM-Med3D predictor's policy (:func:`sam_med3d.geometry.place_crop`).

        Clicks are taken as the previous list plus new ones appended (as the evaluation loop sends them).
        """
        assert self.prepared is not None
        seen, crop = self._crops.get(label_key, (0, None))
        if crop is not None and seen <= len(pts):
            new = np.arange(seen, len(pts))
            if not crop_keeps_clicks(crop, pts[new], lab[new]):
                crop = place_crop(self.prepared, pts, lab, self.crop_size, list(new))
        else:  # first placement, or clicks were removed: start over
            crop = place_crop(self.prepared, pts, lab, self.crop_size)
        self._crops[label_key] = (len(pts), crop)
        return crop

    def _work_image(self, crop: Crop) -> np.ndarray:
        raw = crop.raw
        inside = crop.inside
        values = raw[inside]
        lo, hi = (np.percentile(values.numpy(), [0.5, 99.5]) if values.numel() else (0.0, 1.0))
        if not hi > lo:
            hi = lo + 1.0
        img = ((raw.clamp(float(lo), float(hi)) - float(lo)) / float(hi - lo)).float()
        img = torch.where(inside, img, torch.zeros(()))
        return _resize(img, self.work_size).numpy().astype(np.float64)

    def _to_work(self, crop_coords: np.ndarray) -> np.ndarray:
        scale = self.work_size / self.crop_size
        return np.floor((crop_coords + 0.5) * scale).astype(np.int64)  # the work voxel containing the point

    def predict(self, points, labels, label_key: str = "default",
                multimask_output: bool = False) -> RandomWalkerResult:
        """Segment from all clicks so far.

        Args:
            points: ``(N, 3)`` voxel indices ``(i, j, k)`` of the original scan.
            labels: ``(N,)`` 1 = positive, 0 = negative.
            label_key: which label these clicks belong to (each keeps its own crop).
            multimask_output: accepted for interface parity; unused.

        Raises:
            ValueError: no image set, no positive click, mismatched lengths or a click outside the scan.
        """
        from skimage.segmentation import random_walker

        if self.prepared is None:
            raise ValueError("no image: call set_image() before predict()")
        t0 = time.perf_counter()
        pts = self.prepared.check_inside(points)
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != len(pts):
            raise ValueError(f"labels has {lab.shape[0]} entries for {len(pts)} points")
        if not np.any(lab == 1):
            raise ValueError("the random walker needs at least one positive click (label 1)")
        crop = self._place_crop(pts, lab, label_key)
        image = self._work_image(crop)
        n = self.work_size
        seeds = np.zeros((n, n, n), dtype=np.int32)
        seeds[[0, -1], :, :] = 2
        seeds[:, [0, -1], :] = 2
        seeds[:, :, [0, -1]] = 2
        inside = _resize(crop.inside.float(), n)
        seeds[(inside < 0.5).numpy()] = -1  # padding outside the scan: not part of the graph
        work = self._to_work(crop.to_crop(pts))
        keep = np.all((work >= 0) & (work < n), axis=1)
        # Negative seeds first, positive last: a positive click wins if both map to the same work voxel.
        r = self.seed_radius
        for value in (0, 1):
            for w in work[keep & (lab == value)]:
                # A click grows into the voxels of a small cube around it whose intensity is close to the
                # clicked one: single-voxel seeds have almost no weight against the border prior in 3D.
                box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c in w)
                close = np.abs(image[box] - image[tuple(w)]) <= self.seed_tolerance
                region = seeds[box]
                region[close & (region != -1)] = 1 if value == 1 else 2
                seeds[tuple(w)] = 1 if value == 1 else 2
        t1 = time.perf_counter()
        if not np.any(seeds == 1):
            prob_work = np.zeros((n, n, n), dtype=np.float32)
        else:
            with warnings.catch_warnings():
                # "probability range outside [0, 1]" at the solver tolerance is harmless here; it is clipped.
                warnings.simplefilter("ignore", UserWarning)
                full = random_walker(image, seeds, beta=self.beta, mode="cg_j", tol=self.tol,
                                     return_full_prob=True)
            prob_work = np.clip(full[0], 0.0, 1.0).astype(np.float32)  # channel 0 = label 1
            prob_work[seeds == -1] = 0.0
        t2 = time.perf_counter()
        prob = self.prepared.paste_back(crop, _resize(torch.from_numpy(prob_work), self.crop_size))
        mask = (prob > 0.5).astype(np.uint8)
        t3 = time.perf_counter()
        return RandomWalkerResult(mask=mask, probabilities=prob, affine=self.prepared.scan.affine.copy(),
                                  timings={"crop": t1 - t0, "solve": t2 - t1, "paste": t3 - t2}, crop=crop)
