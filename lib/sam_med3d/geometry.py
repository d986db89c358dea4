"""Whole-scan geometry for SAM-Med3D: the official preprocessing, crops around clicks, and paste-back.

Written once and shared by the predictor, the evaluator (incl. its random-walker baseline), the trainer's
validation and the MONAI Label app. It reproduces the official SAM-Med3D inference (``utils/infer_utils.py``
with torchio 0.19.9, the version the released models were trained and evaluated with), step by step, and
``tests/test_pipeline_fidelity.py`` proves it on the official pipeline's outputs
(``../shared/fixtures/sam_med3d_pipeline``):

1. **Resample to 1.5 mm in the stored orientation** (torchio ``Resample(1.5)``: SimpleITK, the scan's own
   direction, linear): per stored axis with ``n`` voxels of spacing ``s``, ``m = ceil(n * s / 1.5)`` voxels
   whose first voxel's *corner* coincides with the corner of stored voxel 0 (voxel ``j`` has its centre at
   stored index ``(j + 0.5) * 1.5 / s - 0.5``). Values are interpolated from the scan's voxels, clamped to
   the edge voxel up to half a voxel outside the scan, and 0 further out (ITK's default value). **Integer
   scans stay integer**: the interpolant is truncated toward zero (ITK casts to the scan's pixel type). Where
   it is an integer in exact arithmetic (sample points on stored voxel centres), ITK's last-bit rounding
   decides the truncation, so integer scans are sampled at the positions ITK computes
   (:func:`itk_continuous_index`) with ITK's interpolation order and formula, in float64; float scans are
   interpolated in float32.
2. **Then reorient** to the closest RAS axes (torchio ``ToCanonical`` = ``nibabel.as_closest_canonical``):
   the resampled array's axes are permuted and reversed, with no further resampling; oblique scans stay
   oblique. Because this comes after step 1, the grid stays anchored at stored voxel 0, which is the far
   end of every reversed axis (reorienting first would shift the grid by ``n * s mod 1.5`` mm there).
3. **Crop or pad** to the model's ``img_size``^3 (torchio ``CropOrPad``): the crop starts at
   ``floor((bb_min + bb_max) / 2) - size // 2`` per canonical axis, where ``[bb_min, bb_max)`` is the
   bounding box of the object (the official code uses the label; without ground truth, the canonical voxels
   of the positive clicks). No clamping: where the crop leaves the scan it is **padded with 0**.
4. **z-score over voxels > 0 of the raw crop** (torchio ``ZNormalization(masking_method=lambda x: x > 0)``):
   the mean and unbiased std of the crop's positive voxels are applied to every voxel, padding included.
   For CT this excludes air, fat and water (HU <= 0) from the statistics. Fallbacks (torchio would fail):
   fewer than 2 positive voxels or zero std -> statistics of the whole crop; still zero std -> std = 1.
5. **Paste back by nearest neighbour** (the official ``data_postprocess``): the crop mask (thresholded in
   the crop) is mapped onto the scan's grid: scan voxel ``(i, j, k)`` takes crop voxel ``floor(c + 0.5)``
   with ``c`` its position in crop voxels, when every component of ``c`` is in ``[-0.5, size - 0.5)``, else
   0. At exact rounding ties (every voxel of a 3 mm scan, every third of a 1 mm scan) ITK's floating-point
   rounding decides, so ``c`` is computed as ITK computes it from the geometry torchio hands it.

Resampling is **not done for the whole scan** (except integer scans not exactly axis-aligned, see
:attr:`PreparedScan.uses_itk_resampling`): a crop is sampled straight from the original voxels on its 1.5 mm
grid (the grid is axis-aligned with the scan, so linear interpolation is separable and costs O(crop)), which
gives the same values as resampling everything first; the paste-back is an index lookup over the part of the
scan the crop covers (separable except on oblique scans).

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
#: Largest canonical grid (voxels) that :attr:`PreparedScan.uses_itk_resampling` resamples as a whole.
ITK_RESAMPLE_MAX_VOXELS = 64 * 1024 ** 2

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


class _ItkGrid:
    """One image's geometry as SimpleITK holds it when torchio 0.19.9 hands it an array and a RAS affine
    (``nib_to_sitk``): LPS origin, spacing = lengths of the affine's columns, direction = columns / spacing,
    computed with torchio's own numpy expressions so that every float is the official one."""

    def __init__(self, origin: Sequence[float], spacing: Sequence[float], direction: np.ndarray) -> None:
        self.origin = np.asarray(origin, dtype=np.float64)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        # ITK's index -> physical matrix, direction @ diag(spacing): one product per entry (the rest adds 0).
        self.index_to_physical = self.direction * self.spacing[None, :]

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> "_ItkGrid":
        rotation_zoom = affine[:3, :3]
        spacing = np.sqrt(np.sum(rotation_zoom * rotation_zoom, axis=0))
        return cls(np.dot(_FLIP_XY, affine[:3, 3]), spacing, np.dot(_FLIP_XY, rotation_zoom / spacing))

    def ras_affine(self) -> np.ndarray:
        """torchio's ``get_ras_affine_from_sitk`` of an image with this geometry."""
        affine = np.eye(4)
        affine[:3, :3] = np.dot(_FLIP_XY, self.direction) * self.spacing
        affine[:3, 3] = np.dot(_FLIP_XY, self.origin)
        return affine

    def _probe(self, origin: Sequence[float]):
        import SimpleITK as sitk

        image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        image.SetOrigin([float(v) for v in origin])
        image.SetSpacing([float(v) for v in self.spacing])
        image.SetDirection([float(v) for v in self.direction.ravel()])
        return image

    @cached_property
    def physical_to_index(self) -> np.ndarray:
        """ITK's physical -> index matrix (its own numerical inverse, read back exactly: with the origin at 0,
        the continuous index of the unit vector e_k is column k of the matrix)."""
        image = self._probe((0.0, 0.0, 0.0))
        return np.array([image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in np.eye(3)[k]))
                         for k in range(3)], dtype=np.float64).T

    def index_to_point(self, index: Sequence[float]) -> np.ndarray:
        """ITK's ``TransformContinuousIndexToPhysicalPoint`` (torchio places the 1.5 mm grid with it)."""
        return np.asarray(self._probe(self.origin).TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in index]), dtype=np.float64)

    def axis_map(self) -> Optional[np.ndarray]:
        """``(3,)`` the one index axis each physical axis comes from, when the direction is a signed permutation
        with exact zeros (then ITK's index arithmetic is separable per axis); None for oblique grids."""
        nonzero = self.index_to_physical != 0
        if not (nonzero.sum(axis=1) == 1).all() or not (nonzero.sum(axis=0) == 1).all():
            return None
        return np.argmax(nonzero, axis=1)


_FLIP_XY = np.diag([-1.0, -1.0, 1.0])


def itk_continuous_index(out_grid: _ItkGrid, in_grid: _ItkGrid, scanline: int, i, j, k) -> list:
    """Continuous indices of the input image at output voxels ``(i, j, k)`` (broadcastable float64 arrays),
    with the floating-point operations of ITK 5.4's ``ResampleImageFilter`` (identity transform, the linear
    path SimpleITK takes): index -> point as ``((origin + m0 * i) + m1 * j) + m2 * k``, point -> index as
    ``((0 + p0 * d0) + p1 * d1) + p2 * d2`` with ``d = point - input origin``, and along each output scan line
    (axis 0, ``scanline`` voxels) the interpolation ``start + (i / scanline) * (end - start)`` between its
    first voxel and one past its last. At exact rounding ties (a 1 mm voxel halfway between two 1.5 mm
    voxels) and at integer positions (1.5 mm sampled from 1.5 mm) only these roundings say which way ITK
    goes. Returns the three components (input axes 0, 1, 2)."""
    m, p = out_grid.index_to_physical, in_grid.physical_to_index

    def transform(i_value):
        point = [((out_grid.origin[q] + m[q, 0] * i_value) + m[q, 1] * j) + m[q, 2] * k for q in range(3)]
        delta = [point[q] - in_grid.origin[q] for q in range(3)]
        return [((0.0 + p[r, 0] * delta[0]) + p[r, 1] * delta[1]) + p[r, 2] * delta[2] for r in range(3)]

    start, end = transform(0.0), transform(float(scanline))
    alpha = np.asarray(i, dtype=np.float64) / float(scanline)
    return [start[r] + alpha * (end[r] - start[r]) for r in range(3)]


def itk_nearest(index: np.ndarray) -> np.ndarray:
    """ITK's ``RoundHalfIntegerUp`` as compiled for x86-64: ``rint(2 x + 0.5) >> 1`` (int64)."""
    return np.rint(2.0 * index + 0.5).astype(np.int64) >> 1


def _axis_taps(coords: np.ndarray, n: int, mode: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interpolation taps along one axis of length ``n`` for continuous indices ``coords`` (L,).

    Returns ``lo, hi`` (L,) int64, ``w`` (L,) float64 with value = ``(1 - w) * x[lo] + w * x[hi]``, and
    ``valid`` (L,) bool: False beyond half a voxel outside the axis (those samples are 0).
    """
    valid = (coords >= -0.5) & (coords < n - 0.5)  # ITK's IsInsideBuffer
    clamped = np.clip(coords, 0.0, n - 1.0)
    if mode == "nearest":
        # floor(x + 0.5): ties go up, like ITK's nearest-neighbour interpolator.
        lo = np.clip(np.floor(clamped + 0.5), 0, n - 1).astype(np.int64)
        return lo, lo, np.zeros(len(coords), np.float32), valid
    lo = np.floor(clamped).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, clamped - lo, valid


def sample_separable(volume: Union[np.ndarray, torch.Tensor], coords: Sequence[np.ndarray],
                     mode: str = "linear", truncate: bool = False) -> torch.Tensor:
    """Sample ``volume`` (A, B, C) on the outer-product grid ``coords[0] x coords[1] x coords[2]``.

    ``coords[p]`` are continuous indices along axis ``p`` (voxel centres at integers). ``mode`` is
    ``"linear"`` (trilinear, float32 result) or ``"nearest"`` (keeps the dtype; for label maps). Samples more
    than half a voxel outside the volume are 0; within that half voxel the edge value is used.
    ``truncate`` (linear only): interpolate in float64 and truncate toward zero, as ITK's resampler does for
    an integer pixel type (the official pipeline on integer scans); the result is float32 holding integers.
    Returns a tensor of shape ``(len(coords[0]), len(coords[1]), len(coords[2]))``.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    vol = torch.as_tensor(volume)
    work_dtype = torch.float64 if truncate else torch.float32
    shape = tuple(len(c) for c in coords)
    taps = [_axis_taps(np.asarray(c, dtype=np.float64), vol.shape[p], mode) for p, c in enumerate(coords)]
    out_dtype = torch.float32 if mode == "linear" else vol.dtype
    if any(not t[3].any() for t in taps):
        return torch.zeros(shape, dtype=out_dtype)
    # Work on the sub-block the samples touch (a crop of a big CT touches a small part of it).
    block = []
    for p, (lo, hi, _, valid) in enumerate(taps):
        first, last = int(lo[valid].min()), int(hi[valid].max())
        block.append(slice(first, last + 1))
    # Gather along the volume's memory order: a Fortran-ordered scan (i fastest, as files store it) is viewed
    # as its contiguous transpose, where index_select copies whole rows and planes instead of single voxels.
    # Only the memory layout differs: every sample is the same lerp of the same values.
    perm = sorted(range(3), key=lambda d: -vol.stride(d))
    if vol.is_contiguous() or not vol.permute(*perm).is_contiguous():
        perm = [0, 1, 2]
    dim_of = [perm.index(p) for p in range(3)]  # original axis -> dimension of the working tensor
    sub = vol.permute(*perm)[tuple(block[a] for a in perm)]
    # Shrinking axes first, last original axis first, growing axes last, least growth first. For a scan read
    # from a file (Fortran order, i fastest) the shrinking passes then go from the outermost axis in memory to
    # the innermost: index_select copies whole planes and rows, and the single-element gather of the innermost
    # axis runs on the smallest array (on a 512x512x300 CT's 128^3 crop: 0.11 s instead of 0.19 s). The order
    # depends on the axes only, never on the memory layout, so C- and Fortran-ordered copies of a scan give
    # bit-identical crops.
    def pass_order(p: int) -> Tuple[bool, float]:
        ratio = shape[p] / max(block[p].stop - block[p].start, 1)
        return (ratio > 1.0, ratio if ratio > 1.0 else float(-p))

    order = sorted(range(3), key=pass_order)
    for p in order:
        lo, hi, w, valid = taps[p]
        d = dim_of[p]
        start = block[p].start
        lo_t = torch.from_numpy(np.clip(lo - start, 0, sub.shape[d] - 1))
        picked = sub.index_select(d, lo_t)
        if mode == "linear":
            # Gather first, convert after: the first pass shrinks the block before it is widened to float.
            hi_t = torch.from_numpy(np.clip(hi - start, 0, sub.shape[d] - 1))
            view = [1, 1, 1]
            view[d] = -1
            weight = torch.from_numpy(w).to(work_dtype).view(view)
            picked = torch.lerp(picked.to(work_dtype), sub.index_select(d, hi_t).to(work_dtype), weight)
        sub = picked
    sub = sub.permute(*dim_of)  # back to the original axis order
    if mode == "linear" and truncate:
        _itk_where_integer(sub, vol, taps)
    if mode == "linear":
        sub = (torch.trunc(sub) if truncate else sub).to(torch.float32)
    inside = (torch.from_numpy(taps[0][3])[:, None, None] & torch.from_numpy(taps[1][3])[None, :, None]
              & torch.from_numpy(taps[2][3])[None, None, :])
    if bool(inside.all()):
        return sub.contiguous()
    return torch.where(inside, sub, torch.zeros((), dtype=sub.dtype)).contiguous()


def _itk_where_integer(values: torch.Tensor, volume: torch.Tensor, taps: Sequence[tuple]) -> None:
    """Recompute, in place, the float64 interpolants that are integers up to rounding, as ITK's linear
    interpolator computes them: nested ``a + (b - a) * w`` along axis i, then j, then k. Only there can the
    order of the operations move a value across the integer it truncates to; everywhere else the faster pass
    order of :func:`sample_separable` gives the same truncated value. Voxels whose eight neighbours are equal
    (flat regions, e.g. air) are exact in any order and are skipped after one gather each."""
    near = (values - torch.round(values)).abs() < 1e-6
    if not bool(near.any()):
        return
    at = near.nonzero().numpy()
    array = volume.numpy()
    if array.flags.f_contiguous:
        flat, strides = array.ravel(order="F"), (1, array.shape[0], array.shape[0] * array.shape[1])
    else:
        array = np.ascontiguousarray(array)
        flat, strides = array.ravel(), (array.shape[1] * array.shape[2], array.shape[2], 1)
    offset = [(taps[p][0][at[:, p]] * strides[p], taps[p][1][at[:, p]] * strides[p]) for p in range(3)]
    corners = {}
    for x in (0, 1):
        for y in (0, 1):
            for z in (0, 1):
                corners[x, y, z] = np.take(flat, offset[0][x] + offset[1][y] + offset[2][z])
    first = corners[0, 0, 0]
    varied = np.zeros(len(at), bool)
    for value in corners.values():
        varied |= value != first
    if not varied.any():
        return
    w = [np.asarray(taps[p][2], dtype=np.float64)[at[varied, p]] for p in range(3)]
    c = {key: value[varied].astype(np.float64) for key, value in corners.items()}
    along_i = {(y, z): c[0, y, z] + (c[1, y, z] - c[0, y, z]) * w[0] for y in (0, 1) for z in (0, 1)}
    along_j = {z: along_i[0, z] + (along_i[1, z] - along_i[0, z]) * w[1] for z in (0, 1)}
    exact = along_j[0] + (along_j[1] - along_j[0]) * w[2]
    values[tuple(torch.from_numpy(at[varied]).T)] = torch.from_numpy(exact)


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
            # torchio 0.19.9 Resample, in the stored orientation: ceil(n * s / 1.5) voxels with s the length
            # of the affine's column, exactly (a header's 3.00000007 mm slices give one voxel more, as there),
            # the first voxel's corner on stored voxel 0's corner, i.e. resampled voxel t has its centre at
            # stored index first + ratio * t.
            size = 1 if n == 1 else max(1, math.ceil(n * spacing / self.spacing_mm))
            first = 0.5 * (ratio - 1.0)
            source[a] = p
            shape[a] = size
            step[a] = ratio * sign
            # ToCanonical afterwards reverses flipped axes: canonical voxel c is resampled voxel size - 1 - c.
            offset[a] = first if sign > 0 else first + ratio * (size - 1)
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

    @cached_property
    def itk(self) -> "_OfficialGrids":
        """The official pipeline's geometry, float for float: the scan and its 1.5 mm grid as SimpleITK holds
        them, and the canonical affine torchio derives (see :class:`_OfficialGrids`)."""
        return _OfficialGrids(self)

    def itk_sample_coords(self, axis: int, start: int, count: int) -> Optional[np.ndarray]:
        """:meth:`original_coords` as ITK computes them when it resamples the scan to the 1.5 mm grid (exact
        integers come out with ~1e-16 of noise, which the truncation of integer scans turns into one raw unit),
        or None when that arithmetic is not separable per axis (oblique scans)."""
        grids = self.itk
        if not grids.resample_separable:
            return None
        p = int(self.source_axis[axis])
        canonical = np.arange(start, start + count, dtype=np.float64)
        resampled = canonical if self.step[axis] > 0 else (grids.size[p] - 1) - canonical
        index = [resampled if q == p else 0.0 for q in range(3)]
        return itk_continuous_index(grids.resampled, grids.scan, int(grids.size[0]), *index)[p]

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

        torchio ``CropOrPad(mask_name=...)``'s rule applied to the canonical voxels of the positive clicks
        (``labels == 1``; all clicks when ``labels`` is None or has no positive): with ``[lo, hi)`` their
        bounding box, the crop starts at ``floor((lo + hi) / 2) - size // 2`` per axis. There is no clamping:
        where the crop leaves the scan it is padded, so the object sits at the crop's centre, where the model
        saw objects in training.
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
        voxels = np.floor(self.to_canonical(pts) + 0.5).astype(np.int64)
        return bbox_crop_start(voxels.min(axis=0), voxels.max(axis=0) + 1, size)

    def crop_box_of_mask(self, mask: Union[np.ndarray, torch.Tensor], size: int) -> Tuple[int, int, int]:
        """Canonical start of the official crop around a label map on the ORIGINAL grid (``mask`` > 0).

        The official inference crops around the ground truth: the label is resampled (nearest) to the
        canonical grid and the crop centred on its bounding box there (:func:`bbox_crop_start`). An empty
        mask gives the centre of the canonical grid, as torchio does.
        """
        if tuple(mask.shape) != self.scan.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the scan {self.scan.shape_str()}")
        nonzero = np.asarray(torch.as_tensor(mask).numpy() if isinstance(mask, torch.Tensor) else mask) > 0
        if not nonzero.any():
            return bbox_crop_start(np.zeros(3, np.int64), np.asarray(self.shape), size)
        # The bounding box on the original grid, widened by one voxel, contains every canonical voxel whose
        # nearest original voxel is in the mask: sample only that box.
        lo_o, hi_o = [], []
        for p in range(3):
            hit = np.flatnonzero(nonzero.any(axis=tuple(q for q in range(3) if q != p)))
            lo_o.append(hit[0])
            hi_o.append(hit[-1])
        corners = np.array(np.meshgrid(*[[lo_o[p] - 1, hi_o[p] + 1] for p in range(3)], indexing="ij"))
        canon = self.to_canonical(corners.reshape(3, -1).T)
        start = np.maximum(np.floor(canon.min(axis=0)).astype(np.int64), 0)
        stop = np.minimum(np.ceil(canon.max(axis=0)).astype(np.int64) + 1, np.asarray(self.shape))
        box = self.sample(nonzero.astype(np.uint8), tuple(start), tuple(stop - start), "nearest").numpy() > 0
        if not box.any():  # a mask smaller than half a canonical voxel: nothing survives the resampling
            return bbox_crop_start(np.zeros(3, np.int64), np.asarray(self.shape), size)
        found = np.argwhere(box)
        return bbox_crop_start(found.min(axis=0) + start, found.max(axis=0) + 1 + start, size)

    def crop(self, start: Sequence[int], size: int) -> "Crop":
        """The ``size``^3 crop whose voxel (0, 0, 0) is canonical voxel ``start`` (pixels sampled lazily)."""
        return Crop(self, tuple(int(s) for s in start), int(size))

    def crop_around(self, points_ijk: ArrayLike, size: int, labels: Optional[ArrayLike] = None) -> "Crop":
        """The ``size``^3 crop centred on the clicks (see :meth:`crop_box_around`)."""
        return self.crop(self.crop_box_around(points_ijk, size, labels), size)

    def crop_from_affine(self, crop_affine: ArrayLike, size: int) -> "Crop":
        """The ``size``^3 crop whose voxel -> RAS mm matrix is ``crop_affine`` (4x4), e.g. the official
        pipeline's ``roi_subject_affine``. It must be this scan's canonical grid shifted by whole voxels;
        anything else (another spacing, rotation, or a sub-voxel shift) raises ValueError."""
        a = np.asarray(torch.as_tensor(crop_affine).numpy() if isinstance(crop_affine, torch.Tensor)
                       else crop_affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.all(np.isfinite(a)):
            raise ValueError(f"crop_affine must be a finite 4x4 matrix, got shape {a.shape}")
        index = np.linalg.solve(self.affine, a)  # crop index -> canonical index
        shift = index[:3, 3]
        start = np.floor(shift + 0.5)
        if not (np.allclose(index[:3, :3], np.eye(3), atol=1e-4) and np.allclose(shift, start, atol=1e-3)
                and np.allclose(index[3], [0, 0, 0, 1])):
            raise ValueError("crop_affine is not a whole-voxel shift of the scan's canonical "
                             f"{self.spacing_mm} mm grid (canonical index = {np.round(index, 4).tolist()} @ crop "
                             "index): it cannot be one of this scan's crops")
        return self.crop(tuple(int(v) for v in start), size)

    def sample(self, volume: Union[np.ndarray, torch.Tensor], start: Sequence[int], shape: Sequence[int],
               mode: str = "linear") -> torch.Tensor:
        """Sample a volume on the ORIGINAL grid (the scan or e.g. a label map of the same shape) on the
        canonical box ``[start, start + shape)``. Returns ``shape`` in canonical axis order (0 outside).
        The scan itself, when stored with an integer type, is truncated as the official resampling does."""
        if tuple(volume.shape) != self.scan.shape:
            raise ValueError(f"volume of shape {tuple(volume.shape)} does not match the scan "
                             f"{self.scan.shape_str()}")
        scan_itself = mode == "linear" and volume is self.scan.array
        if scan_itself and self.uses_itk_resampling:
            return _padded_box(self._itk_canonical, start, shape)
        truncate = scan_itself and self.scan.integer
        coords = [None, None, None]
        for a in range(3):
            exact = self.itk_sample_coords(a, start[a], shape[a]) if truncate else None
            coords[self.source_axis[a]] = exact if exact is not None else self.original_coords(a, start[a], shape[a])
        out = sample_separable(volume, coords, mode, truncate)  # original axis order
        return out.permute(*[int(p) for p in self.source_axis])

    @cached_property
    def uses_itk_resampling(self) -> bool:
        """Whether crops of the scan come from one SimpleITK resampling of the whole grid, cached.

        Only for **integer** scans whose direction is not exactly a signed permutation (oblique, or axis-aligned
        but for rounding noise in the header, as many real files are): there ITK's positions are not separable
        per axis, and the truncation to integers turns their floating-point noise into one-unit differences on
        many voxels. The grid is resampled once with SimpleITK exactly as torchio 0.19.9 does
        (:class:`_OfficialGrids`, same pixel type). Exactly axis-aligned scans use the separable sampler at
        ITK's own positions (:meth:`itk_sample_coords`), which equals SimpleITK voxel for voxel at a fraction of
        the cost. Grids above :data:`ITK_RESAMPLE_MAX_VOXELS` use the separable sampler.
        """
        return bool(self.scan.integer and not self.itk.resample_separable
                    and int(np.prod(self.shape)) <= ITK_RESAMPLE_MAX_VOXELS)

    @cached_property
    def _itk_canonical(self) -> np.ndarray:
        """The canonical 1.5 mm volume resampled by SimpleITK as torchio 0.19.9's ``Resample`` then
        ``ToCanonical`` (float32 holding the truncated integers)."""
        import SimpleITK as sitk

        grids = self.itk
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.scan.array.transpose(2, 1, 0)).astype(np.int32))
        image.SetSpacing([float(v) for v in grids.scan.spacing])
        image.SetDirection([float(v) for v in grids.scan.direction.ravel()])
        image.SetOrigin([float(v) for v in grids.scan.origin])
        reference = sitk.Image([int(v) for v in grids.size], sitk.sitkInt32)
        reference.SetSpacing([float(v) for v in grids.resampled.spacing])
        reference.SetDirection([float(v) for v in grids.resampled.direction.ravel()])
        reference.SetOrigin([float(v) for v in grids.resampled.origin])
        resampled = sitk.Resample(image, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0,
                                  sitk.sitkInt32)
        stored = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # resampled grid, stored axis order
        canonical = stored.transpose(*[int(p) for p in self.source_axis])
        flips = tuple(a for a in range(3) if self.step[a] < 0)
        return np.ascontiguousarray(np.flip(canonical, flips) if flips else canonical, dtype=np.float32)

    @cached_property
    def _resampled(self) -> torch.Tensor:
        return self.sample(self.scan.array, (0, 0, 0), self.shape, "linear")

    def resampled(self) -> torch.Tensor:
        """The whole canonical 1.5 mm volume ``shape`` (float32, not normalised), computed once on demand.
        The predictor never needs it; it is here for visualisation and whole-volume tools."""
        return self._resampled

    def paste_back(self, crop: "Crop", crop_values: Union[np.ndarray, torch.Tensor],
                   out: Optional[np.ndarray] = None) -> np.ndarray:
        """Bring a per-voxel map on the crop grid back to the ORIGINAL scan grid, by nearest neighbour.

        The official ``data_postprocess`` rule: each original voxel takes the value of the crop voxel nearest to
        its centre (``floor(c + 0.5)``, ties up); voxels outside the crop (``c`` outside ``[-0.5, S - 0.5)``)
        are not written. Apply it to the crop's thresholded mask to get the official result; applied to
        probabilities it gives the probability of the crop voxel each scan voxel took its mask value from.

        Args:
            crop: a crop of this scan.
            crop_values: ``(S, S, S)`` values on the crop grid (crop axes = canonical axes).
            out: optional array of the scan's shape to write into (only ``crop.region_ijk`` is written, the
                rest is left as is). Default: zeros of ``crop_values``' dtype.

        Returns:
            ``(I, J, K)`` array on the scan's grid (``out`` if given).
        """
        if out is not None and out.shape != self.scan.shape:
            raise ValueError(f"out must have the scan's shape {self.scan.shape}, got {out.shape}")
        region, picked = self.paste_back_region(crop, crop_values)
        if out is None:
            out = np.zeros(self.scan.shape, dtype=picked.dtype)
        if region is not None:
            out[region] = picked
        return out

    def paste_back_region(self, crop: "Crop", crop_values: Union[np.ndarray, torch.Tensor]
                          ) -> Tuple[Optional[Tuple[slice, slice, slice]], np.ndarray]:
        """:meth:`paste_back` restricted to the part of the scan the crop covers: ``(region, values)``.

        ``region`` is ``crop.region_ijk`` (slices of the ORIGINAL grid) and ``values`` the pasted values there,
        of the region's shape, so that ``paste_back(crop, v)[region] == values`` and ``paste_back`` is 0 (or
        ``out``) elsewhere. Costs O(crop), whatever the scan's size. ``values`` is contiguous in the scan array's
        memory order (C or Fortran). ``(None, empty array)`` when the crop misses the scan.
        """
        if crop.prepared is not self:
            raise ValueError("the crop belongs to another scan")
        values = crop_values.detach().cpu().numpy() if isinstance(crop_values, torch.Tensor) else np.asarray(crop_values)
        if tuple(values.shape) != (crop.size,) * 3:
            raise ValueError(f"crop_values must have shape {(crop.size,) * 3}, got {tuple(values.shape)}")
        exact = crop.paste_exact
        if exact is not None:  # oblique scan: ITK's rounding is not separable per axis
            region, flat = exact
            fortran = self.scan.array.flags.f_contiguous and not self.scan.array.flags.c_contiguous
            picked = np.where(flat >= 0, values.reshape(-1)[np.maximum(flat, 0)], np.zeros((), values.dtype))
            return region, np.asfortranarray(picked) if fortran else picked
        lookup = crop.paste_lookup
        if lookup is None:
            return None, np.zeros((0, 0, 0), dtype=values.dtype)
        region, index = lookup
        # values[index along canonical axes], arranged in original axis order: an outer-product gather, laid out
        # in the scan's memory order (Fortran for files), so that merging it into maps of the scan's layout
        # runs along memory. For Fortran order the gather fills the transpose (axes k, j, i) in C order.
        axes = [int(a) for a in self.target_axis]  # canonical axis of each original axis
        if self.scan.array.flags.f_contiguous and not self.scan.array.flags.c_contiguous:
            reversed_axes = axes[::-1]
            return region, outer_take(values.transpose(*reversed_axes), [index[a] for a in reversed_axes]).T
        return region, outer_take(values.transpose(*axes), [index[a] for a in axes])


class _OfficialGrids:
    """A scan's geometry through the official pipeline's torchio 0.19.9 / SimpleITK calls, float for float.

    ``scan``: the scan as ``Resample`` hands it to SimpleITK (from ``PreparedScan.scan.affine``, which for a
    NIfTI file is ITK's reading of the header, as torchio's). ``resampled``: the 1.5 mm reference grid of
    ``Resample`` (``size``, the origin placed by ITK at continuous index ``0.5 * (1.5 / s - 1)``, the scan's
    direction). ``canonical_affine``: ``ToCanonical``'s affine (nibabel's ``as_closest_canonical``).
    Crops derive their affine from it as ``CropOrPad`` does (:attr:`Crop.itk_affine`). The geometry is
    computed exactly; which way ITK rounds at an exact tie then follows (:func:`itk_continuous_index`).
    """

    def __init__(self, prepared: "PreparedScan") -> None:
        scan = _ItkGrid.from_affine(prepared.scan.affine)
        new_spacing = np.array((prepared.spacing_mm,) * 3)
        old_size = np.array(prepared.scan.shape)
        size = np.ceil(old_size * scan.spacing / new_spacing).astype(np.uint16)
        size[old_size == 1] = 1
        self.scan = scan
        self.size = size.astype(np.int64)
        self.resampled = _ItkGrid(scan.index_to_point(0.5 * (new_spacing / scan.spacing - 1)), new_spacing.tolist(),
                                  scan.direction)
        affine = self.resampled.ras_affine()
        if nib.aff2axcodes(affine) != tuple("RAS"):
            affine = affine.dot(nib.orientations.inv_ornt_aff(nib.io_orientation(affine), tuple(self.size)))
        self.canonical_affine = affine
        self.resample_separable = (scan.axis_map() is not None
                                   and bool(np.all(np.abs(np.sign(scan.physical_to_index)) == np.abs(np.sign(
                                       scan.index_to_physical.T)))))


def outer_take(values: np.ndarray, index: Sequence[np.ndarray]) -> np.ndarray:
    """``values[np.ix_(*index)]`` as a C-contiguous array, computed one axis at a time.

    The last axis (single elements) is gathered first, while the array is smallest; the outer axes then copy
    whole rows and planes. On a 128^3 crop spread over a 245x245x240 region of a thin-slice CT this is about
    ten times faster than the single fancy index, with the same values.
    """
    out = np.ascontiguousarray(values)
    for axis in (2, 1, 0):
        out = np.take(out, np.asarray(index[axis], dtype=np.intp), axis=axis)
    return out


def _padded_box(volume: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``volume[start : start + shape]`` with 0 where the box leaves the volume (CropOrPad's padding)."""
    out = torch.zeros(tuple(int(n) for n in shape), dtype=torch.float32)
    src, dst = [], []
    for a in range(3):
        lo, hi = max(int(start[a]), 0), min(int(start[a]) + int(shape[a]), volume.shape[a])
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(start[a]), hi - int(start[a])))
    out[tuple(dst)] = torch.from_numpy(np.ascontiguousarray(volume[tuple(src)]))
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
    def itk_affine(self) -> np.ndarray:
        """4x4 crop voxel -> RAS mm as the official ``CropOrPad`` computes it from ``ToCanonical``'s affine
        (``nibabel.affines.apply_affine`` for the padding, then for the cropping): equal to :attr:`affine` up
        to rounding, and float for float what the official paste-back hands to SimpleITK."""
        canonical = self.prepared.itk.canonical_affine
        start = np.asarray(self.start, dtype=np.int64)
        shape = np.asarray(self.prepared.shape, dtype=np.int64)
        low, high = np.maximum(0, -start), np.maximum(0, start + self.size - shape)
        first, last = np.maximum(0, start), np.maximum(0, shape - start - self.size)
        affine = canonical
        if (low > 0).any() or (high > 0).any():
            affine = canonical.copy()
            affine[:3, 3] = nib.affines.apply_affine(canonical, -np.array(low.tolist()))
        if (first > 0).any() or (last > 0).any():
            padded = affine
            affine = padded.copy()
            affine[:3, 3] = nib.affines.apply_affine(padded, np.array(first.tolist()))
        return affine

    def _itk_paste_positions(self, i, j, k) -> list:
        """Continuous crop indices of scan voxels ``(i, j, k)`` as the official SimpleITK paste-back computes
        them (crop image from :attr:`itk_affine`, reference = the scan): crop axes 0, 1, 2."""
        grids = self.prepared.itk
        return itk_continuous_index(grids.scan, _ItkGrid.from_affine(self.itk_affine), self.prepared.scan.shape[0],
                                    i, j, k)

    @cached_property
    def _paste_axes(self) -> Optional[np.ndarray]:
        """``(3,)`` crop axis fed by each scan axis when the paste-back arithmetic is separable, else None."""
        crop_grid = _ItkGrid.from_affine(self.itk_affine)
        scan_axis = self.prepared.itk.scan.axis_map()  # physical axis -> scan axis
        crop_phys = crop_grid.physical_to_index != 0  # crop axis x physical axis
        if scan_axis is None or not (crop_phys.sum(axis=1) == 1).all() or not (crop_phys.sum(axis=0) == 1).all():
            return None
        physical_of_crop = np.argmax(crop_phys, axis=1)
        axes = np.zeros(3, np.int64)
        for r in range(3):
            axes[scan_axis[physical_of_crop[r]]] = r
        return axes if sorted(axes.tolist()) == [0, 1, 2] else None

    @cached_property
    def paste_lookup(self) -> Optional[Tuple[Tuple[slice, slice, slice], Tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """The nearest-neighbour paste-back map: ``(region, index)`` with ``region`` the slices of the ORIGINAL
        grid whose voxels fall in the crop and ``index[a]`` the crop voxel (along canonical axis ``a``) that
        each of them takes, or None when the crop misses the scan. See :meth:`PreparedScan.paste_back`.

        On axis-aligned scans this is ITK's rounding exactly (:func:`itk_continuous_index`, separable there);
        on oblique scans ITK's rounding at ties depends on all three indices, so this separable map is the
        rule ``floor(c + 0.5)`` (used to blend several crops) and :attr:`paste_exact` holds ITK's own."""
        prep = self.prepared
        axes = self._paste_axes
        region: list = [None, None, None]
        index: list = [None, None, None]
        for p in range(3):
            a = int(prep.target_axis[p])
            if axes is not None:
                a = int(axes[p])
                line = [np.arange(prep.scan.shape[p], dtype=np.float64) if q == p else 0.0 for q in range(3)]
                position = self._itk_paste_positions(*line)[a]
                nearest = itk_nearest(position)
                hit = np.flatnonzero((position >= -0.5) & (position < self.size - 0.5))
            else:
                idx = np.arange(prep.scan.shape[p], dtype=np.float64)
                position = (idx - prep.offset[a]) / prep.step[a] - self.start[a]  # continuous crop index
                nearest = np.floor(position + 0.5).astype(np.int64)
                hit = np.flatnonzero((nearest >= 0) & (nearest < self.size))
            if len(hit) == 0:
                return None
            region[p] = slice(int(hit[0]), int(hit[-1]) + 1)
            index[a] = np.clip(nearest[hit[0]:hit[-1] + 1], 0, self.size - 1)
        return tuple(region), tuple(index)

    @cached_property
    def paste_exact(self) -> Optional[Tuple[Tuple[slice, slice, slice], np.ndarray]]:
        """Oblique scans only (else None): ``(region, flat)`` with ``flat`` int64 of the region's shape, the
        C-order index into the crop of the crop voxel each scan voxel takes in the official (ITK) paste-back,
        -1 outside the crop. Computed per voxel over the region (widened by a voxel), once per crop."""
        if self._paste_axes is not None or self.paste_lookup is None:
            return None
        shape = self.prepared.scan.shape
        box = tuple(slice(max(r.start - 1, 0), min(r.stop + 1, n)) for r, n in zip(self.paste_lookup[0], shape))
        i, j, k = (np.arange(b.start, b.stop, dtype=np.float64) for b in box)
        position = self._itk_paste_positions(i[:, None, None], j[None, :, None], k[None, None, :])
        inside = np.ones(tuple(b.stop - b.start for b in box), bool)
        flat = np.zeros(inside.shape, np.int64)
        for a in range(3):
            inside &= (position[a] >= -0.5) & (position[a] < self.size - 0.5)
            flat = flat * self.size + np.clip(itk_nearest(position[a]), 0, self.size - 1)
        if not inside.any():
            return None
        tight = []
        for p in range(3):
            hit = np.flatnonzero(inside.any(axis=tuple(q for q in range(3) if q != p)))
            tight.append(slice(int(hit[0]), int(hit[-1]) + 1))
        region = tuple(slice(b.start + t.start, b.start + t.stop) for b, t in zip(box, tight))
        return region, np.where(inside, flat, -1)[tuple(tight)]

    @property
    def region_ijk(self) -> Optional[Tuple[slice, slice, slice]]:
        """Slices of the ORIGINAL grid whose voxels fall in the crop (nearest crop voxel inside it), or None."""
        exact = self.paste_exact
        if exact is not None:
            return exact[0]
        lookup = self.paste_lookup
        return None if lookup is None else lookup[0]


def bbox_crop_start(lo: ArrayLike, hi: ArrayLike, size: int) -> Tuple[int, int, int]:
    """Start of the ``size``^3 crop centred on the box ``[lo, hi)`` of canonical voxels, torchio ``CropOrPad``'s
    rule: ``floor((lo + hi) / 2) - size // 2`` per axis (no clamping; outside the grid is padding)."""
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    return tuple(int(v) for v in (lo + hi) // 2 - int(size) // 2)


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


__all__ = ("TARGET_SPACING_MM", "PreparedScan", "Crop", "normalize_intensity", "sample_separable", "outer_take",
           "upsample_logits", "bbox_crop_start", "place_crop", "crop_keeps_clicks")
