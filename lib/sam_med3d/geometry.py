"""Whole-scan geometry for SAM-Med3D: canonical 1.5 mm grid, crops around clicks, and paste-back.

Written once and shared by the predictor, the evaluator (incl. its random-walker baseline), the trainer and
the MONAI Label app.

Preprocessing reproduces the official SAM-Med3D pipeline (torchio ``ToCanonical`` -> ``Resample(1.5)`` ->
``CropOrPad(128)`` -> ``ZNormalization(masking_method=lambda x: x > 0)``):

1. **Canonical orientation**: the scan's array axes are permuted/flipped to the closest RAS order
   (``nibabel.io_orientation``, as torchio ``ToCanonical`` and MONAI ``Orientation("RAS")`` do). Oblique
   scans stay oblique: no rotation is applied, the canonical axes are the scan's own axes.
2. **Isotropic 1.5 mm** along those axes, trilinear for images, torchio's grid convention: the resampled
   grid has ``ceil(n * spacing / 1.5)`` voxels per axis and its first voxel's *corner* coincides with the
   scan's first voxel's corner. Values are interpolated from the scan's voxels, clamped to the edge voxel up
   to half a voxel outside the scan, and 0 further out (ITK's resampler default, as in torchio).
3. **Cubic crop** of the model's ``img_size`` (128, or 64 for ``vit_mini``). Outside the scan the crop is
   **padded with 0**, as torchio ``CropOrPad`` does by default in the official pipeline (not with the
   scan's minimum: 0 is what the model saw in training).
4. **z-score over voxels > 0 of the crop** (mean and unbiased std of the crop's positive voxels, applied to
   every voxel, padding included), exactly torchio's ``ZNormalization(lambda x: x > 0)``. For CT this
   excludes air, fat and water (HU <= 0) from the statistics: that is what the official model was trained
   with. Fallbacks (torchio would fail): fewer than 2 positive voxels or zero std -> statistics of the
   whole crop; still zero std -> std = 1.

Resampling is **never done for the whole scan**: a crop is sampled straight from the original voxels on
its 1.5 mm grid (the canonical grid is axis-aligned with the scan, so trilinear sampling is separable and
costs O(crop)), which gives the same values as resampling everything first.

Coordinate systems (all voxel indices address voxel centres):

- original ``(i, j, k)``: indices into ``Scan.array`` as stored; ``Scan.affine`` maps them to RAS mm.
- canonical ``(r, a, s)``: indices into the (virtual) 1.5 mm RAS-ordered volume;
  ``PreparedScan.affine`` maps them to RAS mm. The model's tensor axes ``(d, h, w)`` are these axes.
- crop ``(d, h, w)``: canonical index minus ``Crop.start``; what the prompt encoder receives.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
import torch
from torch.nn import functional as F

from .io import Scan, ScanInput, load_scan

#: Voxel size (mm) of the grid the official SAM-Med3D models were trained on.
TARGET_SPACING_MM = 1.5

ArrayLike = Union[np.ndarray, Sequence[Sequence[float]], torch.Tensor]


def _points(points: ArrayLike, name: str = "points") -> np.ndarray:
    pts = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {pts.shape}")
    return pts


def normalize_intensity(raw: torch.Tensor) -> Tuple[torch.Tensor, float, float]:
    """z-score ``raw`` with the mean and unbiased std of its voxels > 0 (official SAM-Med3D normalisation).

    Returns ``(normalised float32 tensor of raw's shape, mean, std)``; see the module docstring for the
    fallbacks when the crop has no usable positive voxels.
    """
    raw = raw.float()
    positive = raw[raw > 0].double()  # statistics in float64: millions of voxels
    if positive.numel() >= 2 and float(positive.std()) > 0:
        mean, std = float(positive.mean()), float(positive.std())
    else:
        values = raw.double()
        mean, std = float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0
        if not std > 0:
            std = 1.0
    return (raw - mean) / std, mean, std


def _axis_taps(coords: np.ndarray, n: int, mode: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interpolation taps along one axis of length ``n`` for continuous indices ``coords`` (L,).

    Returns ``lo, hi`` (L,) int64, ``w`` (L,) float32 with value = ``(1 - w) * x[lo] + w * x[hi]``, and
    ``valid`` (L,) bool: False beyond half a voxel outside the axis (those samples are 0).
    """
    valid = (coords >= -0.5) & (coords <= n - 0.5)
    clamped = np.clip(coords, 0.0, n - 1.0)
    if mode == "nearest":
        # floor(x + 0.5): ties go up, like ITK's nearest-neighbour interpolator.
        lo = np.clip(np.floor(clamped + 0.5), 0, n - 1).astype(np.int64)
        return lo, lo, np.zeros(len(coords), np.float32), valid
    lo = np.floor(clamped).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (clamped - lo).astype(np.float32), valid


def sample_separable(volume: Union[np.ndarray, torch.Tensor], coords: Sequence[np.ndarray],
                     mode: str = "linear") -> torch.Tensor:
    """Sample ``volume`` (A, B, C) on the outer-product grid ``coords[0] x coords[1] x coords[2]``.

    ``coords[p]`` are continuous indices along axis ``p`` (voxel centres at integers). ``mode`` is
    ``"linear"`` (trilinear, float32 result) or ``"nearest"`` (keeps the dtype; for label maps). Samples more
    than half a voxel outside the volume are 0; within that half voxel the edge value is used.
    Returns a tensor of shape ``(len(coords[0]), len(coords[1]), len(coords[2]))``.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    vol = torch.as_tensor(volume)
    if mode == "linear" and not vol.is_floating_point():
        vol = vol.float()
    shape = tuple(len(c) for c in coords)
    taps = [_axis_taps(np.asarray(c, dtype=np.float64), vol.shape[p], mode) for p, c in enumerate(coords)]
    if any(not t[3].any() for t in taps):
        return torch.zeros(shape, dtype=vol.dtype)
    # Work on the sub-block the samples touch (a crop of a big CT touches a small part of it).
    block = []
    for p, (lo, hi, _, valid) in enumerate(taps):
        first, last = int(lo[valid].min()), int(hi[valid].max())
        block.append(slice(first, last + 1))
    sub = vol[tuple(block)]
    # Reduce the axes that shrink most first, so later passes touch fewer voxels.
    order = sorted(range(3), key=lambda p: shape[p] / max(sub.shape[p], 1))
    for p in order:
        lo, hi, w, valid = taps[p]
        start = block[p].start
        lo_t = torch.from_numpy(np.clip(lo - start, 0, sub.shape[p] - 1))
        picked = sub.index_select(p, lo_t)
        if mode == "linear":
            hi_t = torch.from_numpy(np.clip(hi - start, 0, sub.shape[p] - 1))
            view = [1, 1, 1]
            view[p] = -1
            weight = torch.from_numpy(w).view(view)
            picked = torch.lerp(picked, sub.index_select(p, hi_t), weight)
        sub = picked
    inside = (torch.from_numpy(taps[0][3])[:, None, None] & torch.from_numpy(taps[1][3])[None, :, None]
              & torch.from_numpy(taps[2][3])[None, None, :])
    if bool(inside.all()):
        return sub.contiguous()
    return torch.where(inside, sub, torch.zeros((), dtype=sub.dtype))


class PreparedScan:
    """A scan plus its canonical RAS-ordered 1.5 mm grid and the maps between the two.

    The canonical grid is virtual (never resampled as a whole unless :meth:`resampled` is called); crops are
    sampled from the original voxels on demand.

    Attributes:
        scan: the original :class:`~sam_med3d.io.Scan`.
        spacing_mm: the canonical voxel size (1.5 mm for the official models).
        shape: canonical grid shape ``(R, A, S)``.
        source_axis: ``(3,)`` int, the original axis each canonical axis comes from.
        step, offset: ``(3,)`` float, original continuous index along ``source_axis[a]`` =
            ``offset[a] + step[a] * canonical index along a`` (``step`` < 0 where the axis is flipped).
        index_map: 4x4, canonical index -> original index (homogeneous).
        affine: 4x4, canonical index -> RAS mm (``scan.affine @ index_map``).
    """

    def __init__(self, scan: Scan, spacing_mm: float = TARGET_SPACING_MM) -> None:
        if not spacing_mm > 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
        self.scan = scan
        self.spacing_mm = float(spacing_mm)
        # io_orientation row p: (canonical axis receiving original axis p, +1 or -1).
        ornt = nib.orientations.io_orientation(scan.affine)
        source = np.zeros(3, np.int64)
        step = np.zeros(3)
        offset = np.zeros(3)
        shape = [0, 0, 0]
        for p in range(3):
            a, sign = int(ornt[p, 0]), float(ornt[p, 1])
            n, spacing = scan.shape[p], float(scan.spacing_mm[p])
            ratio = self.spacing_mm / spacing  # original voxels per canonical voxel
            # torchio Resample: ceil(n * s / 1.5) voxels (tolerating float noise in headers), first voxel's
            # corner on the scan's first corner, i.e. its centre at original index (ratio - 1) / 2.
            size = 1 if n == 1 else max(1, math.ceil(n * spacing / self.spacing_mm - 1e-4))
            first = 0.5 * (ratio - 1.0)
            source[a] = p
            shape[a] = size
            step[a] = ratio * sign
            offset[a] = first if sign > 0 else (n - 1) - first
        self.source_axis = source
        self.target_axis = np.argsort(source)  # canonical axis of each original axis
        self.step = step
        self.offset = offset
        self.shape: Tuple[int, int, int] = tuple(int(s) for s in shape)
        index_map = np.zeros((4, 4))
        for a in range(3):
            index_map[source[a], a] = step[a]
            index_map[source[a], 3] = offset[a]
        index_map[3, 3] = 1.0
        self.index_map = index_map
        self.affine = scan.affine @ index_map

    @classmethod
    def load(cls, path_or_array: ScanInput, affine: Optional[np.ndarray] = None,
             spacing_mm: float = TARGET_SPACING_MM) -> "PreparedScan":
        """:func:`~sam_med3d.io.load_scan` then prepare."""
        return cls(load_scan(path_or_array, affine), spacing_mm)

    def __repr__(self) -> str:
        codes = "".join(nib.aff2axcodes(self.scan.affine))
        return (f"PreparedScan({self.scan.source!r}: {self.scan.shape_str()} {codes} -> canonical "
                f"{'x'.join(map(str, self.shape))} at {self.spacing_mm} mm)")

    # ------------------------------------------------------------------------------------------- maps

    def to_canonical(self, points_ijk: ArrayLike) -> np.ndarray:
        """Original voxel indices ``(N, 3)`` -> continuous canonical voxel indices ``(N, 3)``."""
        pts = _points(points_ijk)
        return (pts[:, self.source_axis] - self.offset) / self.step

    def to_original(self, points_canonical: ArrayLike) -> np.ndarray:
        """Canonical voxel indices ``(N, 3)`` -> continuous original voxel indices ``(N, 3)``."""
        pts = _points(points_canonical)
        return (self.offset + self.step * pts)[:, self.target_axis]

    def original_coords(self, axis: int, start: int, count: int) -> np.ndarray:
        """Continuous original indices (along ``source_axis[axis]``) of canonical voxels ``start .. start + count
        - 1`` of canonical axis ``axis``, ``(count,)`` float64."""
        return self.offset[axis] + self.step[axis] * np.arange(start, start + count, dtype=np.float64)

    def check_inside(self, points_ijk: ArrayLike, name: str = "click") -> np.ndarray:
        """Return ``points_ijk`` as ``(N, 3)`` float64 after checking each is finite and inside the scan.

        "Inside" means within half a voxel of a voxel centre of the scan (it rounds to a valid index).
        Raises ValueError naming the first offending point and the scan shape.
        """
        pts = _points(points_ijk, f"{name}s")
        for p in pts:
            if not np.all(np.isfinite(p)):
                raise ValueError(f"{name} {tuple(p.tolist())} has non-finite coordinates")
            if np.any(p < -0.5) or np.any(p >= np.asarray(self.scan.shape) - 0.5):
                shown = tuple(int(v) if float(v).is_integer() else float(v) for v in p)
                raise ValueError(f"{name} {shown} is outside the scan {self.scan.shape_str()}")
        return pts

    # ------------------------------------------------------------------------------------------ crops

    def crop_box_around(self, points_ijk: ArrayLike, size: int,
                        labels: Optional[ArrayLike] = None) -> Tuple[int, int, int]:
        """Canonical start index of the ``size``^3 crop centred on the clicks (no voxels are sampled).

        The centre is the centre of the bounding box of the positive clicks (``labels == 1``), or of all
        clicks when ``labels`` is None or has no positive. Per axis, the crop is then shifted to stay inside
        the canonical grid when the grid is at least ``size`` long; shorter axes are centred (padded on
        both sides), as torchio ``CropOrPad`` does.
        """
        pts = _points(points_ijk)
        if len(pts) == 0:
            raise ValueError("at least one point is needed to place a crop")
        if labels is not None:
            lab = np.asarray(labels).reshape(-1)
            if lab.shape[0] != len(pts):
                raise ValueError(f"labels has {lab.shape[0]} entries for {len(pts)} points")
            if np.any(lab == 1):
                pts = pts[lab == 1]
        canon = self.to_canonical(pts)
        centre = 0.5 * (canon.min(axis=0) + canon.max(axis=0))
        start = []
        for a in range(3):
            m = self.shape[a]
            if m >= size:
                s = int(np.floor(centre[a] + 0.5)) - size // 2
                s = min(max(s, 0), m - size)
            else:
                s = -((size - m) // 2)
            start.append(s)
        return tuple(start)

    def crop(self, start: Sequence[int], size: int) -> "Crop":
        """The ``size``^3 crop whose voxel (0, 0, 0) is canonical voxel ``start`` (pixels sampled lazily)."""
        return Crop(self, tuple(int(s) for s in start), int(size))

    def crop_around(self, points_ijk: ArrayLike, size: int, labels: Optional[ArrayLike] = None) -> "Crop":
        """The ``size``^3 crop centred on the clicks (see :meth:`crop_box_around`)."""
        return self.crop(self.crop_box_around(points_ijk, size, labels), size)

    def sample(self, volume: Union[np.ndarray, torch.Tensor], start: Sequence[int], shape: Sequence[int],
               mode: str = "linear") -> torch.Tensor:
        """Sample a volume on the ORIGINAL grid (the scan or e.g. a label map of the same shape) on the
        canonical box ``[start, start + shape)``. Returns ``shape`` in canonical axis order (0 outside)."""
        if tuple(volume.shape) != self.scan.shape:
            raise ValueError(f"volume of shape {tuple(volume.shape)} does not match the scan "
                             f"{self.scan.shape_str()}")
        coords = [None, None, None]
        for a in range(3):
            coords[self.source_axis[a]] = self.original_coords(a, start[a], shape[a])
        out = sample_separable(volume, coords, mode)  # original axis order
        return out.permute(*[int(p) for p in self.source_axis])

    @cached_property
    def _resampled(self) -> torch.Tensor:
        return self.sample(self.scan.array, (0, 0, 0), self.shape, "linear")

    def resampled(self) -> torch.Tensor:
        """The whole canonical 1.5 mm volume ``shape`` (float32, not normalised), computed once on demand.
        The predictor never needs it; it is here for visualisation and whole-volume tools."""
        return self._resampled

    def paste_back(self, crop: "Crop", crop_values: Union[np.ndarray, torch.Tensor],
                   out: Optional[np.ndarray] = None) -> np.ndarray:
        """Bring a per-voxel map on the crop grid back to the ORIGINAL scan grid.

        Args:
            crop: a crop of this scan.
            crop_values: ``(S, S, S)`` float values on the crop grid (crop axes = canonical axes), e.g.
                probabilities. Each original voxel gets the trilinear interpolation of ``crop_values`` at its
                position; voxels more than half a crop voxel outside the crop get 0.
            out: optional float32 array of the scan's shape to write into (only the crop's region of the
                original grid, ``crop.region_ijk``, is written; the rest is left as is). Default: zeros.

        Returns:
            float32 ``(I, J, K)`` array on the scan's grid (``out`` if given).
        """
        if crop.prepared is not self:
            raise ValueError("the crop belongs to another scan")
        values = torch.as_tensor(crop_values).detach().cpu().float()
        if tuple(values.shape) != (crop.size,) * 3:
            raise ValueError(f"crop_values must have shape {(crop.size,) * 3}, got {tuple(values.shape)}")
        if out is None:
            out = np.zeros(self.scan.shape, dtype=np.float32)
        elif out.shape != self.scan.shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {self.scan.shape}, got {out.dtype} {out.shape}")
        region = crop.region_ijk
        if region is None:
            return out
        coords = []
        for p in range(3):
            a = int(self.target_axis[p])
            idx = np.arange(region[p].start, region[p].stop, dtype=np.float64)
            coords.append((idx - self.offset[a]) / self.step[a] - crop.start[a])
        in_original_order = values.permute(*[int(a) for a in self.target_axis])
        out[region] = sample_separable(in_original_order, coords, "linear").numpy()
        return out


class Crop:
    """A cubic ``size``^3 box of the canonical grid and (lazily) its model input.

    Attributes:
        prepared: the :class:`PreparedScan` it belongs to.
        start: canonical index of crop voxel (0, 0, 0); may be negative where the crop pads the scan.
        size: edge length S in canonical voxels.
        key: ``(start, size)``, hashable: the predictor's embedding-cache key.
    """

    def __init__(self, prepared: PreparedScan, start: Tuple[int, int, int], size: int) -> None:
        if size < 1:
            raise ValueError(f"crop size must be >= 1, got {size}")
        self.prepared = prepared
        self.start = start
        self.size = size
        self.key = (start, size)

    def __repr__(self) -> str:
        return f"Crop(start={self.start}, size={self.size})"

    @property
    def stop(self) -> Tuple[int, int, int]:
        """Canonical index one past the crop's last voxel, per axis."""
        return tuple(s + self.size for s in self.start)

    @property
    def affine(self) -> np.ndarray:
        """4x4, crop voxel index -> RAS mm (e.g. to save ``image`` as NIfTI for inspection)."""
        shift = np.eye(4)
        shift[:3, 3] = self.start
        return self.prepared.affine @ shift

    def to_crop(self, points_ijk: ArrayLike) -> np.ndarray:
        """Original voxel indices ``(N, 3)`` -> continuous crop voxel indices ``(N, 3)`` (model d, h, w)."""
        return self.prepared.to_canonical(points_ijk) - np.asarray(self.start, dtype=np.float64)

    def contains(self, points_ijk: ArrayLike) -> np.ndarray:
        """``(N,)`` bool: whether each original-grid point lies in the crop (rounds to a crop voxel)."""
        c = self.to_crop(points_ijk)
        return np.all((c >= -0.5) & (c < self.size - 0.5), axis=1)

    @cached_property
    def raw(self) -> torch.Tensor:
        """``(S, S, S)`` float32 intensities resampled to the crop grid, 0 outside the scan (padding)."""
        return self.prepared.sample(self.prepared.scan.array, self.start, (self.size,) * 3, "linear")

    @cached_property
    def _normalized(self) -> Tuple[torch.Tensor, float, float]:
        return normalize_intensity(self.raw)

    @property
    def image(self) -> torch.Tensor:
        """``(S, S, S)`` float32 model input: :attr:`raw` z-scored over its voxels > 0."""
        return self._normalized[0]

    @property
    def mean_std(self) -> Tuple[float, float]:
        """The normalisation statistics used for :attr:`image`."""
        return self._normalized[1], self._normalized[2]

    @cached_property
    def inside(self) -> torch.Tensor:
        """``(S, S, S)`` bool, True where the crop voxel lies in the scan (False in the padding)."""
        marks = []
        for a in range(3):
            orig = self.prepared.original_coords(a, self.start[a], self.size)
            n = self.prepared.scan.shape[self.prepared.source_axis[a]]
            marks.append(torch.from_numpy((orig >= -0.5) & (orig <= n - 0.5)))
        return marks[0][:, None, None] & marks[1][None, :, None] & marks[2][None, None, :]

    def sample(self, volume: Union[np.ndarray, torch.Tensor], mode: str = "nearest") -> torch.Tensor:
        """Another volume on the original grid (e.g. a label map) on this crop's grid, ``(S, S, S)``."""
        return self.prepared.sample(volume, self.start, (self.size,) * 3, mode)

    @cached_property
    def region_ijk(self) -> Optional[Tuple[slice, slice, slice]]:
        """Slices of the ORIGINAL grid whose voxels fall in the crop (within half a crop voxel), or None."""
        prep = self.prepared
        region = []
        for p in range(3):
            a = int(prep.target_axis[p])
            ends = prep.offset[a] + prep.step[a] * (self.start[a] + np.array([-0.5, self.size - 0.5]))
            lo = max(int(np.ceil(ends.min() - 1e-9)), 0)
            hi = min(int(np.floor(ends.max() + 1e-9)), prep.scan.shape[p] - 1)
            if hi < lo:
                return None
            region.append(slice(lo, hi + 1))
        return tuple(region)


def crop_keeps_clicks(crop: "Crop", new_points: np.ndarray, new_labels: np.ndarray) -> bool:
    """Whether ``crop`` can stay for these new clicks: it moves only when a new positive click falls outside it
    (a negative click outside the crop changes nothing: the mask is already empty there)."""
    positive = np.asarray(new_points)[np.asarray(new_labels) == 1]
    return len(positive) == 0 or bool(crop.contains(positive).all())


def place_crop(prepared: "PreparedScan", points: np.ndarray, labels: np.ndarray, size: int,
               new: Optional[Sequence[int]] = None) -> "Crop":
    """The crop for a label's clicks (original voxel indices), shared by every click-driven segmenter.

    Centre on all positive clicks. If that crop misses what must be in it (the ``new`` clicks when the crop
    moves, else the latest positive click), centre on those instead: clicks spread wider than the crop cannot
    all be seen, and the user's latest intent wins.
    """
    points, labels = np.asarray(points), np.asarray(labels)
    crop = prepared.crop_around(points, size, labels)
    if new:
        chosen = list(new)
    elif np.any(labels == 1):
        chosen = [int(np.flatnonzero(labels == 1)[-1])]
    else:
        chosen = [len(points) - 1]
    wanted_pts, wanted_labs = points[chosen], labels[chosen]
    wanted = wanted_pts[wanted_labs == 1] if np.any(wanted_labs == 1) else wanted_pts
    if not bool(crop.contains(wanted).all()):
        crop = prepared.crop_around(wanted_pts, size, wanted_labs)
    return crop


def upsample_logits(low_res_logits: torch.Tensor, size: int) -> torch.Tensor:
    """Low-res mask logits ``(B, M, L, L, L)`` -> ``(B, M, size, size, size)``, trilinear as the official code
    (``F.interpolate(..., mode="trilinear", align_corners=False)``)."""
    return F.interpolate(low_res_logits, size=(size,) * 3, mode="trilinear", align_corners=False)


__all__ = ("TARGET_SPACING_MM", "PreparedScan", "Crop", "normalize_intensity", "sample_separable",
           "upsample_logits")
