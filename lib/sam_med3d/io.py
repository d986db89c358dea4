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

Files are read only through :func:`read_header`: a single-file format (``.nii.gz``, ``.nii``, ``.nrrd``,
``.mha``) whose header, parsed by :mod:`sam_med3d.headers` before any library opens it, keeps its voxels in the
file itself, or a folder of DICOM files (no links); with ``max_voxels``, its voxel count is checked from the
header before anything is decoded (:class:`ScanTooLarge`). :func:`load_scan` reads scans and
:func:`load_label` label maps this way. Only ``load_scan(..., detached_ok=True)``, for the user's own datasets
on the command line, also reads ``.mhd``/``.nhdr``/``.hdr``/``.img`` files.

Every problem with the input is a ``ValueError`` that names the input (file name or "array") and says what
is wrong: unreadable/corrupt/missing file, 2D image, 4D or multi-channel image (a trailing singleton axis is
accepted and dropped), NaN/inf voxels, constant image, empty array, bad affine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from .headers import ITK_IMAGE_IO, SINGLE_FILE_SUFFIXES, ScanTooLarge, check_single_file, single_file_suffix

__all__ = ["Scan", "ScanHeader", "ScanTooLarge", "SINGLE_FILE_SUFFIXES", "check_same_grid", "load_label",
           "load_scan", "read_header", "single_file_suffix", "sitk_ras_affine"]

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


@dataclass(frozen=True)
class ScanHeader:
    """A scan file's header, read without decoding its voxels (:func:`read_header`).

    Attributes:
        source: the file or folder, for messages.
        size: ``(I, J, K)`` voxels (ITK index order; trailing singleton axes dropped).
        spacing, origin, direction: ITK's geometry (LPS millimetres; direction row-major 3x3).
        components: values per voxel.
        pixel_type: the stored voxel type as ITK names it (``"16-bit signed integer"``, ...).
    """

    source: str
    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]
    components: int
    pixel_type: str

    @property
    def voxels(self) -> int:
        count = 1
        for n in self.size:
            count *= int(n)
        return count

    def shape_str(self) -> str:
        return "x".join(str(n) for n in self.size)


def file_identity(path: Union[str, os.PathLike]) -> Tuple[str, int, int, int]:
    """``(real path, inode, size in bytes, mtime in ns)`` of a file or a DICOM folder: what every cache keyed by a
    file (the predictor's embeddings, the app's image sessions, the served weights, scoring's model version) uses
    to notice that the file was replaced. The inode tells an atomically replaced file (a new file renamed over
    the old one) from the old one even when size and modification time happen to agree. ``OSError`` when the
    path does not exist."""
    real = os.path.realpath(os.fspath(path))
    stat = os.stat(real)
    return real, int(stat.st_ino), int(stat.st_size), int(stat.st_mtime_ns)


def read_header(path: Union[str, os.PathLike], max_voxels: Optional[int] = None) -> ScanHeader:
    """The header of a scan file or DICOM folder, checked before any library reads it (module docstring).

    Raises:
        ScanTooLarge: more than ``max_voxels`` voxels by the header (nothing decoded).
        ValueError: naming the input: not a single-file format, a header naming another file, a link in a
            DICOM folder, not 3D or not scalar, or unreadable.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        return _dicom_header(Path(name), max_voxels)[0]
    header = check_single_file(name, max_voxels)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(ITK_IMAGE_IO[header.suffix])
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
        result = _header_from_reader(reader, name)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - ITK raises RuntimeError subclasses for broken headers
        if header.suffix not in (".nii", ".nii.gz"):
            raise ValueError(f"{name} could not be read as an image ({_itk_error(err)})") from None
        result = _nibabel_header(name)  # e.g. NIfTI-2, which this ITK does not read
    parsed = tuple(int(n) for n in header.dims)
    while len(parsed) > 3 and parsed[-1] == 1:
        parsed = parsed[:-1]
    if parsed[:3] != result.size or header.elements != result.voxels * result.components:
        raise ValueError(f"{name} is inconsistent: its header says {'x'.join(map(str, header.dims))} voxels, ITK "
                         f"reads {result.shape_str()}")
    return result


def _nibabel_header(name: str) -> ScanHeader:
    """A NIfTI header as nibabel reads it (only the header; the voxels stay on disk), in ITK's terms."""
    try:
        img = nib.load(name)
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # noqa: BLE001 - nibabel raises several types for broken headers
        raise ValueError(f"{name} could not be read as an image ({type(err).__name__}: {err})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ValueError(f"{name} is a {len(shape)}D {'or multi-channel ' if len(shape) > 3 else ''}image (shape "
                         f"{'x'.join(map(str, shape))}); SAM-Med3D needs a single-channel 3D scan")
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / np.where(spacing > 0, spacing, 1.0)[None, :]
    return ScanHeader(source=name, size=shape, spacing=tuple(spacing.tolist()), origin=tuple(lps[:3, 3].tolist()),
                      direction=tuple(direction.ravel().tolist()), components=1,
                      pixel_type=str(img.get_data_dtype()))


def _itk_error(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1][:200] if text else type(err).__name__


def _header_from_reader(reader: sitk.ImageFileReader, name: str) -> ScanHeader:
    dims = int(reader.GetDimension())
    size = tuple(int(n) for n in reader.GetSize())
    kept = size
    while len(kept) > 3 and kept[-1] == 1:
        kept = kept[:-1]
    if len(kept) < 3:
        raise ValueError(f"{name} is a {len(kept)}D image (size {'x'.join(map(str, size))}); SAM-Med3D needs a "
                         "3D scan")
    if len(kept) > 3:
        raise ValueError(f"{name} is a {len(kept)}D or multi-channel image (size {'x'.join(map(str, size))}); "
                         "SAM-Med3D needs a single-channel 3D volume")
    if min(kept) < 1:
        raise ValueError(f"{name} is empty (size {'x'.join(map(str, size))})")
    components = int(reader.GetNumberOfComponents())
    if components != 1:
        raise ValueError(f"{name} is a multi-channel image ({components} components per voxel); SAM-Med3D needs a "
                         "single-channel 3D scan")
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dims, dims)[:3, :3]
    return ScanHeader(source=name, size=kept, spacing=tuple(float(v) for v in reader.GetSpacing()[:3]),
                      origin=tuple(float(v) for v in reader.GetOrigin()[:3]),
                      direction=tuple(direction.ravel().tolist()), components=components,
                      pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def _close(a: Sequence[float], b: Sequence[float], atol: float, rtol: float = 0.0) -> bool:
    return all(abs(x - y) <= max(atol, rtol * max(abs(x), abs(y))) for x, y in zip(a, b))


def check_same_grid(label: ScanHeader, image: ScanHeader, what: str = "the label") -> None:
    """Raise ``ValueError`` unless ``label`` is on ``image``'s voxel grid: the same size, spacing (relative
    1e-3), origin (1 % of the smallest voxel size) and direction (1e-3)."""
    if label.size != image.size:
        raise ValueError(f"{what} has shape {label.shape_str()} but its image has {image.shape_str()}; save the "
                         "label on the image's own grid")
    if not _close(label.spacing, image.spacing, atol=1e-6, rtol=1e-3):
        raise ValueError(f"{what} has voxel spacing {label.spacing} but its image has {image.spacing}")
    origin_tol = max(1e-4, 0.01 * min(image.spacing))
    if not _close(label.origin, image.origin, atol=origin_tol):
        raise ValueError(f"{what} has origin {label.origin} but its image has {image.origin} (tolerance "
                         f"{origin_tol:g} mm)")
    if not _close(label.direction, image.direction, atol=1e-3):
        raise ValueError(f"{what} has a different orientation (direction {label.direction}) than its image "
                         f"({image.direction})")


def load_label(path: Union[str, os.PathLike], image: Optional[Union[ScanHeader, Sequence[int]]] = None,
               max_voxels: Optional[int] = None, what: Optional[str] = None) -> np.ndarray:
    """A label map file as uint8 ``(I, J, K)`` (the voxel order of :class:`Scan`), read through :func:`read_header`.

    Args:
        image: the image's header (the label must be on its grid, :func:`check_same_grid`) or its shape
            ``(I, J, K)`` (only the size is compared); None: no comparison.
        max_voxels: voxel cap, checked from the header.
        what: how messages name the file (default: its path).

    Raises:
        ScanTooLarge, ValueError: as :func:`read_header`; off the image's grid; NaN/inf, fractional, negative
            or > 255 values.
    """
    name = what or os.fspath(path)
    try:
        header = read_header(path, max_voxels)
    except ValueError as err:
        raise type(err)(_renamed(err, os.fspath(path), name)) from None
    if isinstance(image, ScanHeader):
        check_same_grid(header, image, name)
    elif image is not None and tuple(header.size) != tuple(int(n) for n in image):
        raise ValueError(f"{name} has shape {header.shape_str()} but the image is "
                         f"{'x'.join(str(int(n)) for n in image)}")
    owner, array = _read_voxels(os.fspath(path), name)
    if array.dtype.kind == "f":
        for k in range(array.shape[2]):  # one slice at a time: no full-size temporary
            plane = array[:, :, k]
            if not np.isfinite(plane).all():
                raise ValueError(f"{name} contains NaN or infinite values")
            if (plane != np.round(plane)).any():
                raise ValueError(f"{name} must hold integer label values 0..255; it has fractional values (e.g. "
                                 f"{float(plane[plane != np.round(plane)][0])!r})")
    elif array.dtype.kind not in "biu":
        raise ValueError(f"{name} has voxel type {header.pixel_type}; expected integer label values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"{name} must hold integer label values 0..255, got values from {low:g} to {high:g}")
    # A copy, always: for ITK formats ``array`` is a view of ``owner``'s buffer, freed below (np.asarray of a
    # uint8 view would return the view itself, and the caller would read freed memory).
    result = np.array(array, dtype=np.uint8, order="K", copy=True)
    del owner
    return result


def _renamed(err: Exception, path: str, name: str) -> str:
    return str(err).replace(path, name) if name != path else str(err)


def read_voxels(path: Union[str, os.PathLike], max_voxels: Optional[int] = None) -> Tuple[ScanHeader, np.ndarray]:
    """``(header, voxels)`` of a scan file as stored (type kept; ``(I, J, K)``), read through :func:`read_header`.
    NIfTI is read with nibabel (ITK's reader turns NaN into 0); the array is a copy the caller owns."""
    header = read_header(path, max_voxels)
    owner, array = _read_voxels(os.fspath(path), os.fspath(path))
    array = np.array(array, copy=True, order="K")
    del owner
    return header, array


def _read_voxels(name: str, what: str) -> tuple:
    """``(owner, array (I, J, K))`` of a file that :func:`read_header` accepted; keep ``owner`` alive while the
    array is used (a SimpleITK array view does not)."""
    suffix = single_file_suffix(name)
    try:
        if suffix in (".nii", ".nii.gz"):
            img = nib.load(name)
            array = np.asanyarray(img.dataobj)
            while array.ndim > 3 and array.shape[-1] == 1:
                array = array[..., 0]
            return img, array
        reader = sitk.ImageFileReader()
        reader.SetImageIO(ITK_IMAGE_IO[suffix])
        reader.SetFileName(name)
        img = reader.Execute()
        array = sitk.GetArrayViewFromImage(img)
        while array.ndim > 3 and array.shape[0] == 1:
            array = array[0]
        return img, array.transpose(2, 1, 0)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel/ITK raise many types for truncated or corrupt files
        raise ValueError(f"{what} could not be read as an image ({type(err).__name__}: {_itk_error(err)})") from None


def load_scan(path_or_array: ScanInput, affine: Optional[Any] = None, max_voxels: Optional[int] = None,
              detached_ok: bool = False, constant_ok: bool = False) -> Scan:
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
        max_voxels: for files and folders: refuse (:class:`ScanTooLarge`) a scan whose header claims more voxels,
            before anything is decoded.
        detached_ok: also read files whose header names another file (``.mhd``, ``.nhdr``, ``.hdr``/``.img``,
            any format SimpleITK reads): only for the user's own files, never for a file a client sent.
        constant_ok: accept a file whose voxels all have one value (training reads what the datastore accepted;
            a click on such a scan is refused, there is nothing to segment).

    Raises:
        ValueError: naming the input, for a missing/unreadable/corrupt file, a 2D image, a 4D or multi-channel
            image, NaN/inf values, a constant image, an empty array or an invalid affine.
    """
    if isinstance(path_or_array, Scan):
        return _validated(path_or_array.array, path_or_array.affine, path_or_array.source, path_or_array.integer)
    if isinstance(path_or_array, (str, os.PathLike)):
        if affine is not None:
            raise ValueError(f"affine= is only for arrays; {os.fspath(path_or_array)!r} carries its own geometry")
        return _load_path(Path(path_or_array), max_voxels, detached_ok, constant_ok)
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


def _load_path(path: Path, max_voxels: Optional[int] = None, detached_ok: bool = False,
               constant_ok: bool = False) -> Scan:
    name = str(path)
    if not os.path.lexists(name):
        raise ValueError(f"image file {name} does not exist")
    if path.is_dir():
        array, aff, integer, name = _read_dicom_series(path, max_voxels)
        return _validated(array, aff, name, integer, constant_ok)
    if single_file_suffix(name) is None:
        if detached_ok:
            return _load_trusted(path)
        raise ValueError(f"{name} is not a single-file scan (.nii.gz, .nii, .nrrd, .mha); formats such as .mhd, "
                         ".nhdr and .hdr/.img keep their voxels in another file that the header names; for your "
                         "own files, load_scan(path, detached_ok=True) reads them")
    read_header(name, max_voxels)  # refuses headers that name other files, and oversized scans, undecoded
    try:
        if single_file_suffix(name) in (".nii", ".nii.gz"):
            array, aff, integer = _from_nibabel(nib.load(name), name)
            aff = _itk_header_affine(name, array.shape, aff)
        else:
            reader = sitk.ImageFileReader()
            reader.SetImageIO(ITK_IMAGE_IO[single_file_suffix(name)])
            reader.SetFileName(name)
            array, aff, integer = _from_sitk(reader.Execute(), name)
    except ValueError as err:
        if str(err).startswith(name):  # already one of ours (2D, 4D, ...)
            raise
        raise ValueError(f"{name} could not be read as an image: {err}") from err
    except Exception as err:  # nibabel/ITK raise many types for truncated or corrupt files
        raise ValueError(f"{name} could not be read as an image ({type(err).__name__}: {err})") from err
    return _validated(array, aff, name, integer, constant_ok)


def _load_trusted(path: Path) -> Scan:
    """Any format nibabel or SimpleITK reads, following what the header says: the user's own files only."""
    name = str(path)
    try:
        if name.lower().endswith(_NIFTI_SUFFIXES):
            array, aff, integer = _from_nibabel(nib.load(name), name)
        else:
            array, aff, integer = _from_sitk(sitk.ReadImage(name), name)
    except ValueError as err:
        if str(err).startswith(name):
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
        reader.SetImageIO("NiftiImageIO")
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


def _dicom_files(folder: Path) -> tuple:
    """``(series id, file names, series count)`` of the largest DICOM series in ``folder``; a link anywhere in
    the folder is refused (it could name any file the server can read)."""
    name = str(folder)
    if folder.is_symlink():
        raise ValueError(f"folder {name} is a link; DICOM folders are read only as real folders")
    for entry in os.scandir(name):
        if entry.is_symlink():
            raise ValueError(f"folder {name} holds a link ({entry.name}); DICOM folders may hold only files")
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(name)
    except Exception as err:  # pragma: no cover - GDCM only fails on unreadable folders
        raise ValueError(f"folder {name} could not be scanned for DICOM files ({err})") from err
    if not series:
        raise ValueError(f"folder {name} holds no DICOM series (a folder must contain the slices of one series)")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(name, sid) for sid in series}
    chosen = max(series, key=lambda sid: len(files[sid]))
    return chosen, files[chosen], len(series)


def _dicom_header(folder: Path, max_voxels: Optional[int]) -> tuple:
    """``(ScanHeader, series id, files)`` of the folder's largest series, from the first file's header times
    the number of files (nothing decoded); :class:`ScanTooLarge` beyond ``max_voxels``."""
    name = str(folder)
    chosen, files, count = _dicom_files(folder)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    # Every file's header, not only the first one's: ITK's series reader decodes each file whole before it
    # compares sizes, so one small first slice would let the others claim any size past the cap.
    first: Optional[tuple] = None
    voxels = 0
    for path in files:
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"DICOM series {chosen} in {name} could not be read ({os.path.basename(path)}: "
                             f"{_itk_error(err)})") from None
        shape = tuple(int(n) for n in reader.GetSize()) + (1, 1)
        shape = shape[:3] + (int(reader.GetNumberOfComponents()),)
        if first is None:
            first = shape
        elif shape != first:
            raise ValueError(f"DICOM series {chosen} in {name} has files of different sizes "
                             f"({os.path.basename(files[0])}: {'x'.join(map(str, first[:3]))}, "
                             f"{os.path.basename(path)}: {'x'.join(map(str, shape[:3]))}); a series is read only "
                             "when all its slices have one size")
        voxels += shape[0] * shape[1] * max(1, shape[2]) * shape[3]
        if max_voxels is not None and voxels > max_voxels:
            raise ScanTooLarge(f"{name} (DICOM series {chosen}) has more than {int(max_voxels)} voxels, the most "
                               f"accepted ({shape[0]}x{shape[1]} in each of its {len(files)} file(s): "
                               f"{shape[0] * shape[1] * max(1, shape[2]) * len(files) * shape[3]} voxels)")
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
    size = [int(n) for n in reader.GetSize()] + [1, 1]
    header = ScanHeader(source=f"{name} (DICOM series {chosen})", size=(size[0], size[1], len(files) * max(1, size[2])),
                        spacing=tuple(float(v) for v in reader.GetSpacing()[:3]),
                        origin=tuple(float(v) for v in reader.GetOrigin()[:3]),
                        direction=tuple(np.asarray(reader.GetDirection(), dtype=np.float64)
                                        .reshape(reader.GetDimension(), -1)[:3, :3].ravel().tolist()),
                        components=int(reader.GetNumberOfComponents()),
                        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    if count > 1:
        logger.warning("folder %s holds %d DICOM series; reading %s (%d files), the largest", name, count, chosen,
                       len(files))
    return header, chosen, files


def _read_dicom_series(folder: Path, max_voxels: Optional[int] = None) -> tuple:
    name = str(folder)
    _, chosen, files = _dicom_header(folder, max_voxels)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except Exception as err:
        raise ValueError(f"DICOM series {chosen} in {name} could not be read ({err})") from err
    source = f"{name} (DICOM series {chosen})"
    array, aff, integer = _from_sitk(img, source)
    return array, aff, integer, source


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


def _validated(array: Any, affine: np.ndarray, name: str, integer: bool = False, constant_ok: bool = False) -> Scan:
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
    if lo == hi and not constant_ok:
        raise ValueError(f"{name} is constant (every voxel is {lo}); there is nothing to segment")
    return Scan(array=array, affine=_as_affine(affine, name), source=name, integer=bool(integer))


def describe(scan: Scan) -> str:
    """One line about a scan: source, shape, spacing and orientation code (e.g. ``"LPS"``)."""
    codes = "".join(nib.aff2axcodes(scan.affine))
    spacing = "x".join(f"{s:.3g}" for s in scan.spacing_mm)
    return f"{scan.source}: {scan.shape_str()} voxels of {spacing} mm, {codes}"


__all__: Sequence[str] = ("Scan", "load_scan", "describe", "LPS_TO_RAS")
