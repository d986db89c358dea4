"""Checks of what a request names (image ids, label tags, run names, file names) and of uploaded scans/labels.

Everything a client sends may be hostile. A name is used to build a path inside the studies folder only after
:func:`check_name` accepted it: a single path component without separators, ``..``, a leading dot, control
characters or a drive prefix, and of bounded length. Uploaded files must carry one of the extensions the app
reads (:data:`IMAGE_EXTENSIONS`; never ``.py``, ``.sh``, ...).

An uploaded scan is accepted only when SimpleITK reads it as a non-empty 3D scalar volume (trailing
singleton dimensions allowed) of at most ``max_voxels`` voxels, checked from the **header** before any voxel is
decompressed (a few hundred kB of gzip can claim gigabytes), with finite values. A label must also have its
image's grid (size, spacing, origin, direction within a small tolerance) and integer values 0..255.

Every refusal is an :class:`~lib.errors.InvalidRequest` whose message names the field and the problem.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from lib.errors import InvalidRequest

#: File name endings of the scans and labels the app stores (longest first, so ``.nii.gz`` wins over ``.gz``).
#: ``.mhd`` is not among them: its voxels live in a second file that one upload cannot carry.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")

#: Longest accepted image id, label tag or run name (DICOM UIDs have up to 64 characters).
MAX_NAME_LENGTH = 128

#: Default voxel cap of one uploaded scan or label (``--conf max_voxels``): 512 x 512 x 1024.
DEFAULT_MAX_VOXELS = 512 * 512 * 1024

#: HTTP status for a scan larger than the voxel cap ("Content Too Large").
STATUS_TOO_LARGE = 413

_DRIVE = re.compile(r"^[A-Za-z]:")

#: Characters that look like a path separator or a dot run in a viewer's list (refused in names).
LOOK_ALIKES = frozenset("\u2215\u2044\u29f8\u29f5\u29f9\u2216\ufe68\uff0f\uff3c\u2571\u2572\u3033\u3035"
                        "\u2024\u2025\u2026\ufe52\uff0e")

#: Unicode categories refused in names: controls, format characters (right-to-left and other bidirectional
#: overrides, zero-width characters), surrogates, private use, unassigned, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def _refused_character(value: str) -> Optional[str]:
    """The first character of ``value`` a name may not hold, as ``U+XXXX (reason)``; None when there is none."""
    for char in value:
        category = unicodedata.category(char)
        if category in _REFUSED_CATEGORIES:
            kind = "control characters are not allowed in names" if category == "Cc" else (
                "an invisible or bidirectional formatting character" if category == "Cf" else
                "a character that is not printable text")
            return f"U+{ord(char):04X} ({kind})"
        if char in LOOK_ALIKES:
            return f"U+{ord(char):04X} ({unicodedata.name(char, 'look-alike')}, which looks like '/', '\\' or '.')"
        if category == "Zs" and char != " ":
            return f"U+{ord(char):04X} (a space other than the plain space)"
    return None


def name_key(value: str) -> str:
    """What two names must not share: equal up to Unicode compatibility normalisation and case
    (``Spleen_1`` / ``spleen_1``, NFC / NFD forms, full-width letters)."""
    return unicodedata.normalize("NFKC", value).casefold()


def check_name(value: object, what: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """Return ``value``, normalised to Unicode NFC, if it is safe as one path component; else raise naming
    ``what`` and the reason.

    Refused: non-strings, empty or blank names, ``/`` or ``\\`` (also their full-width and other look-alike
    forms, and look-alike dots), ``..`` anywhere, a leading ``.`` (hidden files such as the datastore's
    ``.lock`` and ``.history``), a drive prefix (``C:``), control characters (NUL included), bidirectional
    overrides and other invisible formatting characters, unassigned or private-use code points, spaces other
    than U+0020, leading/trailing spaces and names longer than ``max_length``.
    """
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, got {type(value).__name__}")
    shown = ascii(value[:80]) + ("..." if len(value) > 80 else "")
    if not value or not value.strip():
        raise InvalidRequest(f"{what} is empty")
    if len(value) > max_length:
        raise InvalidRequest(f"{what} {shown} is too long ({len(value)} characters, at most {max_length})")
    refused = _refused_character(value)
    if refused:
        raise InvalidRequest(f"{what} {shown} contains {refused}")
    value = unicodedata.normalize("NFC", value)
    compatible = unicodedata.normalize("NFKC", value)
    if any(sep in text for text in (value, compatible) for sep in ("/", "\\")):
        raise InvalidRequest(f"{what} {shown} must be a plain name, not a path (no '/' or '\\')")
    if ".." in value or ".." in compatible:
        raise InvalidRequest(f"{what} {shown} must not contain '..'")
    if value.startswith(".") or compatible.startswith("."):
        raise InvalidRequest(f"{what} {shown} must not start with '.'")
    if _DRIVE.match(value) or _DRIVE.match(compatible):
        raise InvalidRequest(f"{what} {shown} must not start with a drive prefix")
    if value != value.strip():
        raise InvalidRequest(f"{what} {shown} must not start or end with spaces")
    return value


def split_extension(file_name: str, what: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Tuple[str, str]:
    """``(stem, extension)`` of ``file_name`` for one of ``extensions``; raise naming ``what`` otherwise."""
    lower = file_name.lower()
    for ext in sorted(extensions, key=len, reverse=True):
        if lower.endswith(ext) and len(file_name) > len(ext):
            return file_name[: -len(ext)], file_name[-len(ext):]
    raise InvalidRequest(f"{what} {file_name[:80]!r} has an extension this app does not store; use one of "
                         f"{', '.join(extensions)}")


def upload_basename(file_name: object, what: str = "the uploaded file name") -> str:
    """The last component of a client's upload file name (clients such as ``MONAILabelClient`` send the full
    local path; MONAI Label keeps only the last component), checked with :func:`check_name`."""
    if not isinstance(file_name, str):
        raise InvalidRequest(f"{what} must be a string")
    return check_name(re.split(r"[/\\]", file_name)[-1], what, max_length=255)


def check_upload_name(file_name: object, what: str = "the uploaded file name",
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> str:
    """A client's upload file name: its last component (:func:`upload_basename`) with a known extension."""
    name = upload_basename(file_name, what)
    split_extension(name, what, extensions)
    return name


@dataclass(frozen=True)
class Header:
    """What a file's header says, read without decompressing the voxels."""

    size: Tuple[int, ...]        # ITK order (x, y, z, ...), trailing singleton dimensions dropped
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]  # row-major 3x3
    components: int
    pixel_type: str

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=np.float64)) if self.size else 0


def read_header(path: str, what: str) -> Header:
    """The 3D header of ``path``; raise when it is unreadable, not 3D, empty, or not scalar."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else "unknown error"
        raise InvalidRequest(f"{what} is not a readable scan (SimpleITK: {first})") from None
    size = tuple(int(s) for s in reader.GetSize())
    dims = len(size)
    while len(size) > 3 and size[-1] == 1:
        size = size[:-1]
    if len(size) != 3:
        shape = "x".join(map(str, reader.GetSize()))
        raise InvalidRequest(f"{what} must be a 3D volume, got {dims} dimensions ({shape})")
    if min(size) < 1:
        raise InvalidRequest(f"{what} is empty ({'x'.join(map(str, size))} voxels)")
    components = int(reader.GetNumberOfComponents())
    if components != 1:
        raise InvalidRequest(f"{what} must have one value per voxel, got {components} components")
    spacing = tuple(float(s) for s in reader.GetSpacing())[:3]
    origin = tuple(float(s) for s in reader.GetOrigin())[:3]
    direction_full = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dims, dims)
    direction = tuple(direction_full[:3, :3].ravel().tolist())
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    return Header(size=size, spacing=spacing, origin=origin, direction=direction, components=components,
                  pixel_type=pixel_type)


def check_voxel_count(header: Header, what: str, max_voxels: int) -> None:
    """Refuse (413) a scan whose header claims more than ``max_voxels`` voxels."""
    if header.voxels > max_voxels:
        raise InvalidRequest(f"{what} has {header.voxels} voxels ({'x'.join(map(str, header.size))}), more than "
                             f"this server accepts ({max_voxels}, --conf max_voxels)", status_code=STATUS_TOO_LARGE)


def _read_array(path: str, what: str) -> Tuple[object, np.ndarray]:
    """``(owner, voxels)``: the voxels as the app reads them (nibabel for NIfTI, which keeps NaN where ITK's
    reader writes 0; SimpleITK otherwise). Keep ``owner`` alive while ``voxels`` is used."""
    if str(path).lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            return img, np.asanyarray(img.dataobj)
        except Exception as err:  # nibabel raises several types for broken files
            raise InvalidRequest(f"{what} could not be read (nibabel: {str(err)[:200]})") from None
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else "unknown error"
        raise InvalidRequest(f"{what} could not be read (SimpleITK: {first})") from None
    return image, sitk.GetArrayViewFromImage(image)


def _check_nibabel(path: str, what: str, header: Header) -> None:
    """NIfTI files are read with nibabel by the app; its header must agree with ITK's size."""
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as err:  # nibabel raises several types for broken headers
        raise InvalidRequest(f"{what} is not a readable NIfTI file (nibabel: {str(err)[:200]})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if shape != header.size:
        raise InvalidRequest(f"{what}: nibabel reads shape {shape}, SimpleITK {header.size}; the file is "
                             "inconsistent")


def _finite(array: np.ndarray) -> bool:
    """Whether every value is finite, one slab at a time (no full-size temporary)."""
    if not np.issubdtype(array.dtype, np.floating):
        return True
    return all(np.isfinite(array[i]).all() for i in range(array.shape[0]))


def check_image_file(path: str, max_voxels: int = DEFAULT_MAX_VOXELS, what: str = "the uploaded image") -> Header:
    """Validate an uploaded scan (see the module docstring); return its header."""
    header = read_header(path, what)
    check_voxel_count(header, what, max_voxels)
    _check_nibabel(path, what, header)
    image, array = _read_array(path, what)
    if not _finite(array):
        raise InvalidRequest(f"{what} contains NaN or infinite values")
    del image
    return header


def _close(a: Sequence[float], b: Sequence[float], atol: float, rtol: float = 0.0) -> bool:
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=atol) for x, y in zip(a, b))


def check_same_grid(label: Header, image: Header, what: str = "the label") -> None:
    """Refuse a label that is not on its image's voxel grid (size, then spacing/origin/direction)."""
    if label.size != image.size:
        raise InvalidRequest(f"{what} has shape {'x'.join(map(str, label.size))} but its image has "
                             f"{'x'.join(map(str, image.size))}; save the label on the image's own grid")
    if not _close(label.spacing, image.spacing, atol=1e-6, rtol=1e-3):
        raise InvalidRequest(f"{what} has voxel spacing {label.spacing} but its image has {image.spacing}")
    origin_tol = max(1e-4, 0.01 * min(image.spacing))
    if not _close(label.origin, image.origin, atol=origin_tol):
        raise InvalidRequest(f"{what} has origin {label.origin} but its image has {image.origin} (tolerance "
                             f"{origin_tol:g} mm)")
    if not _close(label.direction, image.direction, atol=1e-3):
        raise InvalidRequest(f"{what} has a different orientation (direction {label.direction}) than its image "
                             f"({image.direction})")


def check_label_file(path: str, image_header: Optional[Header], max_voxels: int = DEFAULT_MAX_VOXELS,
                     what: str = "the uploaded label") -> Header:
    """Validate an uploaded label map against its image's header (``None``: skip the grid check)."""
    header = read_header(path, what)
    check_voxel_count(header, what, max_voxels)
    if image_header is not None:
        check_same_grid(header, image_header, what)
    _check_nibabel(path, what, header)
    image, array = _read_array(path, what)
    if np.issubdtype(array.dtype, np.floating):
        for i in range(array.shape[0]):
            plane = array[i]
            if not np.isfinite(plane).all():
                raise InvalidRequest(f"{what} contains NaN or infinite values")
            if (plane != np.round(plane)).any():
                raise InvalidRequest(f"{what} must hold integer label values 0..255; it has fractional values "
                                     f"(e.g. {float(plane[plane != np.round(plane)][0])!r})")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        raise InvalidRequest(f"{what} has voxel type {header.pixel_type}; expected integer label values")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise InvalidRequest(f"{what} must hold integer label values 0..255, got values from {low:g} to {high:g}")
    del image
    return header

