"""Reading a whole 3D scan into one convention: a float32 array indexed (i, j, k) plus a RAS affine.

Convention (the same for every input kind):

- ``Scan.array`` is float32 of shape ``(I, J, K)``, the voxels *as stored* (no reorientation): for NIfTI the
  nibabel array order, for ITK formats (NRRD, MHA/MHD, DICOM) the ITK index order (x fastest), i.e. the
  transpose of ``SimpleITK.GetArrayFromImage``.
- ``Scan.affine`` is the 4x4 float64 matrix mapping a voxel index ``[i, j, k, 1]`` to its centre in world
  millimetres, **RAS+** (+x towards the patient's right, +y anterior, +z superior: the NIfTI / nibabel
  convention). ITK's LPS geometry is converted by negating the first two world axes.

Hence ``affine @ [i, j, k, 1]`` is the RAS position of ``array[i, j, k]`` whatever the file format, and a
mask with the same shape saved as ``nib.Nifti1Image(mask, affine)`` overlays the scan in any viewer.

Every problem with the input is a ``ValueError`` that names the input (file name or "array") and says what
is wrong: unreadable/corrupt/missing file, 2D image, 4D or multi-channel image (a trailing singleton axis is
accepted and dropped), NaN/inf voxels, constant image, empty array, bad affine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

logger = logging.getLogger(__name__)

#: LPS (ITK) <-> RAS (NIfTI) world coordinates: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

ScanInput = Union[str, os.PathLike, np.ndarray, torch.Tensor, "nib.spatialimages.SpatialImage", sitk.Image, "Scan"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")


@dataclass(frozen=True)
class Scan:
    """A 3D scan in the package's convention (see the module docstring).

    Attributes:
        array: float32 ``(I, J, K)``, voxel values as stored (no reorientation, no resampling).
        affine: float64 ``(4, 4)``, voxel index ``(i, j, k)`` -> RAS world millimetres (voxel centres).
        source: where it came from (a file or folder path, or ``"array"``), for messages.
        integer: whether the voxels are stored with an integer type (int16 CT, uint8/uint16 MRI, ...). The
            official pipeline resamples such scans in their own type, which truncates interpolated values
            toward zero (:mod:`sam_med3d.geometry` reproduces it); float scans are interpolated in float.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    integer: bool = False

    @property
    def shape(self) -> tuple:
        """``(I, J, K)``."""
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along i, j, k in millimetres (lengths of the affine's columns), shape ``(3,)``."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def shape_str(self) -> str:
        """``"512x512x32"``, the form used in error messages."""
        return "x".join(str(n) for n in self.shape)


def load_scan(path_or_array: ScanInput, affine: Optional[Any] = None) -> Scan:
    """Load a whole 3D scan as a :class:`Scan` (float32 ``(I, J, K)`` array + RAS voxel->world affine).

    Args:
        path_or_array: one of
            - a NIfTI file (``.nii``, ``.nii.gz``; read with nibabel, affine = ``img.affine``),
            - an NRRD / MHA / MHD (or any other SimpleITK-readable 3D) file,
            - a folder holding one DICOM series (if it holds several, the one with most files is read
              and a warning is logged),
            - a numpy array or torch tensor ``(I, J, K)`` (a MONAI ``MetaTensor`` brings its own RAS affine
              and may be channel-first ``(1, I, J, K)``),
            - a nibabel image or a SimpleITK image,
            - a :class:`Scan` (returned after validation).
        affine: only for arrays/tensors: the 4x4 RAS voxel->world matrix; identity (1 mm voxels) if None.

    Raises:
        ValueError: naming the input, for a missing/unreadable/corrupt file, a 2D image, a 4D or multi-channel
            image, NaN/inf values, a constant image, an empty array or an invalid affine.
    """
    if isinstance(path_or_array, Scan):
        return _validated(path_or_array.array, path_or_array.affine, path_or_array.source, path_or_array.integer)
    if isinstance(path_or_array, (str, os.PathLike)):
        if affine is not None:
            raise ValueError(f"affine= is only for arrays; {os.fspath(path_or_array)!r} carries its own geometry")
        return _load_path(Path(path_or_array))
    if isinstance(path_or_array, sitk.Image):
        array, aff, integer = _from_sitk(path_or_array, "SimpleITK image")
        return _validated(array, aff, "SimpleITK image", integer)
    if isinstance(path_or_array, nib.spatialimages.SpatialImage):
        array, aff, integer = _from_nibabel(path_or_array, "nibabel image")
        return _validated(array, aff, "nibabel image", integer)
    if isinstance(path_or_array, torch.Tensor):
        array = path_or_array.detach().cpu().numpy()
        if getattr(path_or_array, "affine", None) is not None:  # MONAI MetaTensor
            if affine is None:
                affine = path_or_array.affine
            if array.ndim == 4 and array.shape[0] == 1:  # MONAI's channel-first (1, I, J, K)
                array = array[0]
    elif isinstance(path_or_array, np.ndarray):
        array = path_or_array
    else:
        raise ValueError(f"cannot load a scan from a {type(path_or_array).__name__}; expected a file or folder "
                         "path, a numpy array / torch tensor (I, J, K), a nibabel or a SimpleITK image")
    if affine is None:
        affine = np.eye(4)
    return _validated(array, _as_affine(affine, "array"), "array", np.asarray(array).dtype.kind in "iu")


# ----------------------------------------------------------------------------------------------- readers


def _load_path(path: Path) -> Scan:
    name = str(path)
    if not path.exists():
        raise ValueError(f"image file {name} does not exist")
    if path.is_dir():
        array, aff, integer, name = _read_dicom_series(path)
        return _validated(array, aff, name, integer)
    try:
        if name.lower().endswith(_NIFTI_SUFFIXES):
            array, aff, integer = _from_nibabel(nib.load(name), name)
            aff = _itk_header_affine(name, array.shape, aff)
        else:
            array, aff, integer = _from_sitk(sitk.ReadImage(name), name)
    except ValueError as err:
        if str(err).startswith(name):  # already one of ours (2D, 4D, ...)
            raise
        raise ValueError(f"{name} could not be read as an image: {err}") from err
    except Exception as err:  # nibabel/ITK raise many types for truncated or corrupt files
        raise ValueError(f"{name} could not be read as an image ({type(err).__name__}: {err})") from err
    return _validated(array, aff, name, integer)


def _from_nibabel(img: "nib.spatialimages.SpatialImage", name: str) -> tuple:
    # get_fdata applies the NIfTI scl_slope/inter; float32 halves memory versus the float64 default.
    array = np.asarray(img.get_fdata(dtype=np.float32))
    return array, np.asarray(img.affine, dtype=np.float64), _nifti_is_integer(img)


def _itk_header_affine(name: str, shape: tuple, nibabel_affine: np.ndarray) -> np.ndarray:
    """The geometry ITK reads from a NIfTI header (header only, no voxels), as the official pipeline sees it.

    nibabel and ITK turn the header's float32 quaternion / sform into float64 differently (up to ~3e-7 mm
    here); the official resampling rounds ``ceil(n * spacing / 1.5)``, where such noise decides between two
    grid sizes on scans whose extent is a multiple of 1.5 mm. Falls back to nibabel's affine when ITK cannot
    read the header or describes another grid (ITK and nibabel index NIfTI voxels identically).
    """
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        size = reader.GetSize()
        if reader.GetDimension() < 3 or tuple(size[:3]) != tuple(shape[:3]):
            return nibabel_affine
        lps = np.eye(4)
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(reader.GetDimension(), -1)[:3, :3]
        lps[:3, :3] = direction * np.asarray(reader.GetSpacing()[:3], dtype=np.float64)[None, :]
        lps[:3, 3] = reader.GetOrigin()[:3]
    except Exception:  # noqa: BLE001 - ITK's header reader is only a refinement of nibabel's geometry
        return nibabel_affine
    affine = LPS_TO_RAS @ lps
    if not np.all(np.isfinite(affine)) or not np.allclose(affine, nibabel_affine, atol=1e-3):
        return nibabel_affine
    return affine


def _nifti_is_integer(img: "nib.spatialimages.SpatialImage") -> bool:
    """Whether ITK (hence torchio, hence the official pipeline) reads this image with an integer pixel type:
    an integer on-disk type and no scaling (ITK turns scaled NIfTI data into float)."""
    if np.dtype(img.get_data_dtype()).kind not in "iu":
        return False
    header = img.header
    slope, inter = (header.get_slope_inter() if hasattr(header, "get_slope_inter") else (None, None))
    return slope in (None, 1.0) and inter in (None, 0.0)


def _from_sitk(img: sitk.Image, name: str) -> tuple:
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(f"{name} is a multi-channel image ({img.GetNumberOfComponentsPerPixel()} components per "
                         "voxel); SAM-Med3D needs a single-channel 3D scan")
    dim = img.GetDimension()
    size = img.GetSize()
    if dim < 3:
        raise ValueError(f"{name} is a {dim}D image (size {'x'.join(map(str, size))}); SAM-Med3D needs a 3D scan")
    if dim > 3:
        if any(n != 1 for n in size[3:]):
            raise ValueError(f"{name} is a {dim}D image (size {'x'.join(map(str, size))}); SAM-Med3D needs a "
                             "single 3D volume")
        img = img[(slice(None),) * 3 + (0,) * (dim - 3)]
    # GetArrayFromImage is (k, j, i); transposing gives the (i, j, k) index order that the affine describes, as
    # a Fortran-ordered view (i fastest, as stored): no copy (a C-ordered copy costs seconds on a big CT).
    array = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    return array.astype(np.float32, order="K", copy=False), sitk_ras_affine(img), array.dtype.kind in "iu"


def sitk_ras_affine(img: sitk.Image) -> np.ndarray:
    """The 4x4 RAS voxel->world affine of a 3D SimpleITK image (ITK's LPS geometry with x and y negated)."""
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)[None, :]
    lps[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ lps


def _read_dicom_series(folder: Path) -> tuple:
    name = str(folder)
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(name)
    except Exception as err:  # pragma: no cover - GDCM only fails on unreadable folders
        raise ValueError(f"folder {name} could not be scanned for DICOM files ({err})") from err
    if not series:
        raise ValueError(f"folder {name} holds no DICOM series (a folder must contain the slices of one series)")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(name, sid) for sid in series}
    chosen = max(series, key=lambda sid: len(files[sid]))
    if len(series) > 1:
        logger.warning("folder %s holds %d DICOM series; reading %s (%d files), the largest", name, len(series),
                       chosen, len(files[chosen]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    try:
        img = reader.Execute()
    except Exception as err:
        raise ValueError(f"DICOM series {chosen} in {name} could not be read ({err})") from err
    source = f"{name} (DICOM series {chosen})"
    array, aff, integer = _from_sitk(img, source)
    return array, aff, integer, source


# ---------------------------------------------------------------------------------------------- validation


def _as_affine(affine: Any, name: str) -> np.ndarray:
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine of {name} must be a 4x4 matrix, got shape {aff.shape}")
    if not np.all(np.isfinite(aff)):
        raise ValueError(f"affine of {name} has non-finite entries")
    if not np.allclose(aff[3], [0, 0, 0, 1]):
        raise ValueError(f"affine of {name} must have last row [0, 0, 0, 1], got {aff[3].tolist()}")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError(f"affine of {name} is singular (a zero voxel size or collinear axes)")
    return aff


def _validated(array: Any, affine: np.ndarray, name: str, integer: bool = False) -> Scan:
    """Check a candidate volume and return it as a :class:`Scan` (float32, C- or Fortran-contiguous: the memory
    order it was read in is kept, Fortran for files, since reordering 78 M voxels costs seconds); ``integer``:
    the voxels were stored with an integer type."""
    array = np.asarray(array)
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if np.iscomplexobj(array) or array.dtype.kind not in "biuf":
        raise ValueError(f"{name} has voxel type {array.dtype}; expected real numbers")
    # A trailing singleton axis (NIfTI time/channel of length 1) is harmless; drop it.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    shape = "x".join(str(n) for n in array.shape)
    if array.ndim < 3:
        raise ValueError(f"{name} is a {array.ndim}D image (shape {shape}); SAM-Med3D needs a 3D scan")
    if array.ndim > 3:
        raise ValueError(f"{name} is a {array.ndim}D or multi-channel image (shape {shape}); SAM-Med3D needs a "
                         "single-channel 3D volume (I, J, K)")
    if 1 in array.shape:
        raise ValueError(f"{name} is a 2D image (shape {shape}: a single slice); SAM-Med3D needs a 3D scan")
    stored_as_integer = integer or array.dtype.kind in "biu"  # always finite: no NaN/inf scan over the voxels
    array = array.astype(np.float32, order="K", copy=False)
    if not (array.flags.c_contiguous or array.flags.f_contiguous):  # e.g. a strided or reversed view
        array = np.ascontiguousarray(array)
    finite = None if stored_as_integer else np.isfinite(array)
    if finite is not None and not finite.all():
        bad = np.argwhere(~finite)[0]
        raise ValueError(f"{name} has {int((~finite).sum())} NaN/inf voxel(s), e.g. at {tuple(int(v) for v in bad)}")
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise ValueError(f"{name} is constant (every voxel is {lo}); there is nothing to segment")
    return Scan(array=array, affine=_as_affine(affine, name), source=name, integer=bool(integer))


def describe(scan: Scan) -> str:
    """One line about a scan: source, shape, spacing and orientation code (e.g. ``"LPS"``)."""
    codes = "".join(nib.aff2axcodes(scan.affine))
    spacing = "x".join(f"{s:.3g}" for s in scan.spacing_mm)
    return f"{scan.source}: {scan.shape_str()} voxels of {spacing} mm, {codes}"


__all__: Sequence[str] = ("Scan", "load_scan", "describe", "LPS_TO_RAS")
