"""Our own reading of scan file headers, before any imaging library opens the file.

ITK (hence SimpleITK and MONAI's ``LoadImage``) and nibabel follow what a header says about *other* files: an
NRRD ``data file:`` field (or ``datafile:``, ``LIST``, a ``%d`` pattern), a MetaImage ``ElementDataFile``
other than ``LOCAL``, an Analyze/NIfTI ``.hdr`` whose voxels are in a ``.img`` beside it. Reading such a header
from a hostile upload reads any file the process can, and returns its bytes as voxels. ITK also chooses its
reader by probing the file's content, so a ``.nii.gz`` name does not decide which parser runs.

Hence an allow-list: a path is read only if its name ends in one of :data:`SINGLE_FILE_SUFFIXES`, its content
is that format (magic bytes), and its header, parsed here, keeps the voxels in the same file. The voxel count
is taken from the same parse, so a 1 MB file claiming 1024^3 voxels is refused before anything is allocated.
The caller then reads the file with the library and the reader fixed for its format (:data:`ITK_IMAGE_IO`).

Every refusal is a ``ValueError`` naming the file and the problem; :class:`ScanTooLarge` for the voxel cap.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

#: Single-file scan formats, lower case, longest first (``.nii.gz`` before ``.nii``).
SINGLE_FILE_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")

#: The ITK reader for each suffix: ITK's own probing is not used.
ITK_IMAGE_IO: Dict[str, str] = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO",
                                ".mha": "MetaImageIO"}

#: Largest header read by our parsers (NRRD and MetaImage headers are text of a few hundred bytes).
MAX_HEADER_BYTES = 1 << 20

#: Most axes a header may declare: 3 spatial ones plus trailing singleton or component axes. ITK's NRRD reader
#: crashes the whole process (a segmentation fault, no exception) on an NRRD of 11 dimensions or more.
MAX_DIMENSIONS = 5

#: NRRD fields (lower case, spaces removed) that ITK's NRRD reader knows and that keep the data in the file.
#: ``datafile`` (``data file``) is the one that names another file; it and anything unknown are refused.
_NRRD_FIELDS = frozenset((
    "dimension", "type", "sizes", "spacings", "thicknesses", "axismins", "axismaxs", "centers", "centerings",
    "labels", "units", "kinds", "space", "spacedimension", "spaceunits", "spaceorigin", "spacedirections",
    "measurementframe", "endian", "encoding", "lineskip", "byteskip", "content", "sampleunits", "oldmin", "oldmax",
    "min", "max", "blocksize", "number"))
_NRRD_ENCODINGS = frozenset(("raw", "gzip", "gz", "bzip2", "bz2", "ascii", "text", "txt", "hex"))

_NIFTI1_MAGIC = b"n+1\x00"
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"


class ScanTooLarge(ValueError):
    """A scan whose header claims more voxels than the caller accepts."""


@dataclass(frozen=True)
class FileHeader:
    """What our parse of a single-file header found.

    Attributes:
        suffix: the lower-case suffix (one of :data:`SINGLE_FILE_SUFFIXES`).
        dims: the size along each axis as the header states it (all axes, components included).
    """

    suffix: str
    dims: Tuple[int, ...]

    @property
    def elements(self) -> int:
        count = 1
        for n in self.dims:
            count *= int(n)
        return count


def single_file_suffix(name: str) -> Optional[str]:
    """The lower-case suffix of ``name`` among :data:`SINGLE_FILE_SUFFIXES` (``"X.NII.GZ"`` -> ``".nii.gz"``),
    or None."""
    lower = os.path.basename(str(name)).lower()
    for suffix in SINGLE_FILE_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def check_single_file(path: str, max_voxels: Optional[int] = None) -> FileHeader:
    """Refuse ``path`` unless it is a single-file scan whose voxels are in itself (see the module docstring).

    Args:
        path: a file (not followed if it is a link to a folder; a link to a file is read as that file).
        max_voxels: refuse (:class:`ScanTooLarge`) a header claiming more elements than this; None: no cap.

    Raises:
        ValueError: unknown suffix, content of another format, a header naming another file, a broken header.
    """
    name = str(path)
    suffix = single_file_suffix(name)
    if suffix is None:
        raise ValueError(f"{name} is not a single-file scan: the name must end in "
                         f"{', '.join(SINGLE_FILE_SUFFIXES)} (formats such as .mhd, .nhdr, .hdr/.img keep their "
                         "voxels in another file and are not read)")
    if not os.path.isfile(name):
        raise ValueError(f"image file {name} does not exist" if not os.path.lexists(name)
                         else f"{name} is not a regular file")
    if suffix in (".nii", ".nii.gz"):
        header = _nifti(name, suffix)
    elif suffix == ".nrrd":
        header = _nrrd(name)
    else:
        header = _metaimage(name)
    if any(n < 0 for n in header.dims):
        raise ValueError(f"{name} has a negative size in its header ({header.dims})")
    if max_voxels is not None and header.elements > max_voxels:
        shown = "x".join(str(n) for n in header.dims)
        raise ScanTooLarge(f"{name} has {header.elements} voxels ({shown}) by its header, more than the "
                           f"{int(max_voxels)} accepted")
    return header


def _nifti(name: str, suffix: str) -> FileHeader:
    try:
        if suffix == ".nii.gz":
            with gzip.open(name, "rb") as handle:
                head = handle.read(540)
        else:
            with open(name, "rb") as handle:
                head = handle.read(540)
    except (OSError, EOFError) as err:
        raise ValueError(f"{name} could not be read as a NIfTI file ({err})") from None
    if len(head) < 348:
        raise ValueError(f"{name} is not a NIfTI file: {len(head)} bytes, shorter than a NIfTI header")
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348:
            if head[344:348] != _NIFTI1_MAGIC:
                raise ValueError(f"{name} is not a single-file NIfTI-1 image (magic {head[344:348]!r}, expected "
                                 f"{_NIFTI1_MAGIC!r}; an Analyze or .hdr/.img pair keeps its voxels in another file)")
            ndim, *dims = struct.unpack(endian + "8h", head[40:56])
            break
        if size == 540:
            if len(head) < 540 or head[4:12] != _NIFTI2_MAGIC:
                raise ValueError(f"{name} is not a single-file NIfTI-2 image (magic {head[4:12]!r}; a .hdr/.img "
                                 "pair keeps its voxels in another file)")
            ndim, *dims = struct.unpack(endian + "8q", head[16:80])
            break
    else:
        raise ValueError(f"{name} is not a NIfTI file (header size field is neither 348 nor 540)")
    if not 1 <= ndim <= 7:
        raise ValueError(f"{name} has a broken NIfTI header: {ndim} dimensions")
    return FileHeader(suffix, tuple(int(n) for n in dims[:ndim]))


def _text_header(name: str, what: str) -> list:
    """The header lines of a text-header format: up to the first blank line (NRRD) or all read lines."""
    try:
        with open(name, "rb") as handle:
            head = handle.read(MAX_HEADER_BYTES)
    except OSError as err:
        raise ValueError(f"{name} could not be read as a {what} file ({err})") from None
    return head.split(b"\n")


def _ascii(raw: bytes, name: str, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{name} has a broken {what} header (non-ASCII text: {raw[:60]!r})") from None
    return text.rstrip("\r")


def _nrrd(name: str) -> FileHeader:
    lines = _text_header(name, "NRRD")
    if not lines or not lines[0].startswith(b"NRRD000"):
        raise ValueError(f"{name} is not an NRRD file (it does not start with 'NRRD000')")
    fields: Dict[str, str] = {}
    for raw in lines[1:-1]:  # the last piece may be cut at MAX_HEADER_BYTES or be the voxels
        line = _ascii(raw, name, "NRRD")
        if line == "":
            break
        if line.startswith("#"):
            continue
        if ":=" in line:  # key/value pair: free text kept as metadata, never a file
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"{name} has a broken NRRD header line {line[:80]!r}")
        field = key.strip().lower().replace(" ", "")
        if field == "datafile":
            raise ValueError(f"{name} is an NRRD header that names another file for its voxels ('{key.strip()}: "
                             f"{value.strip()[:80]}'); only NRRD files with their voxels inside are read")
        if field not in _NRRD_FIELDS:
            raise ValueError(f"{name} has an NRRD field this server does not read: {key.strip()[:60]!r}")
        fields[field] = value.strip()
    else:
        raise ValueError(f"{name} has no end of its NRRD header (no blank line in its first "
                         f"{MAX_HEADER_BYTES} bytes); detached headers (.nhdr) are not read")
    encoding = fields.get("encoding", "").lower()
    if encoding not in _NRRD_ENCODINGS:
        raise ValueError(f"{name} has NRRD encoding {encoding[:40]!r}; expected one of "
                         f"{', '.join(sorted(_NRRD_ENCODINGS))}")
    try:
        dims = tuple(int(n) for n in fields["sizes"].split())
        ndim = int(fields["dimension"])
    except (KeyError, ValueError):
        raise ValueError(f"{name} has a broken NRRD header: 'dimension' and 'sizes' must be integers") from None
    if len(dims) != ndim or not 1 <= ndim <= 16:
        raise ValueError(f"{name} has a broken NRRD header: dimension {ndim} but sizes {fields['sizes'][:80]!r}")
    if ndim > MAX_DIMENSIONS:
        raise ValueError(f"{name} declares {ndim} dimensions; a scan has 3 (at most {MAX_DIMENSIONS} with channel "
                         "and singleton axes)")
    return FileHeader(".nrrd", dims)


def _metaimage(name: str) -> FileHeader:
    lines = _text_header(name, "MetaImage")
    fields: Dict[str, str] = {}
    for raw in lines[:-1]:
        line = _ascii(raw, name, "MetaImage").strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{name} has a broken MetaImage header line {line[:80]!r}")
        key, value = key.strip(), value.strip()
        lowered = key.lower()
        if lowered == "elementdatafile":
            # MetaIO ends the header at this exact key and reads the voxels in place only for these spellings;
            # any other spelling of either could let MetaIO read on, or open a file of that name.
            if key != "ElementDataFile" or value not in ("LOCAL", "Local", "local"):
                raise ValueError(f"{name} is a MetaImage header that names another file for its voxels "
                                 f"('ElementDataFile = {value[:80]}'); only .mha files with ElementDataFile = LOCAL "
                                 "are read")
            break
        if "file" in lowered:
            raise ValueError(f"{name} has a MetaImage field naming a file: {key[:60]!r}")
        fields[lowered] = value
    else:
        raise ValueError(f"{name} is not a MetaImage file with its voxels inside (no 'ElementDataFile = LOCAL' "
                         f"in its first {MAX_HEADER_BYTES} bytes)")
    try:
        dims = tuple(int(n) for n in fields["dimsize"].split())
        ndim = int(fields["ndims"])
        channels = int(fields.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError):
        raise ValueError(f"{name} has a broken MetaImage header: 'NDims' and 'DimSize' must be integers") from None
    if len(dims) != ndim or not 1 <= ndim <= 16 or channels < 1:
        raise ValueError(f"{name} has a broken MetaImage header: NDims {ndim}, DimSize {fields['dimsize'][:80]!r}, "
                         f"{channels} channel(s)")
    if ndim > MAX_DIMENSIONS:
        raise ValueError(f"{name} declares {ndim} dimensions; a scan has 3 (at most {MAX_DIMENSIONS} with channel "
                         "and singleton axes)")
    return FileHeader(".mha", dims + ((channels,) if channels > 1 else ()))
