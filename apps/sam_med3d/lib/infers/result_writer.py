"""Writing the label map the viewer gets back, in the format it asked for, without detours.

3D Slicer and OHIF ask for ``.nrrd`` / ``uint8`` (``result_extension`` / ``result_dtype``); MONAI Label's own
default is NIfTI. MONAI Label's generic ``Writer`` converts on the way: its NIfTI path writes **float32**
unless a dtype is asked for, and its ITK path transposes and copies the whole map and builds an ITK image
first. On a 512x512x300 CT (78 M voxels) that cost about a second per click. Here:

- ``.nrrd``: the ``(I, J, K)`` array is written from memory as it is (the app keeps label maps in Fortran
  order, i fastest: NRRD's data order), after a text header with the scan's geometry in LPS (``space
  directions`` = the affine's columns, ``space origin``), as ITK writes it; raw unless ``result_compress`` is
  true (then gzip level 1: labels compress well, level 9 costs seconds). pynrrd and ITK read it back in the
  tests.
- ``.nii`` / ``.nii.gz``: nibabel writes the array in the label map's dtype (or the one asked for) with the exact
  affine as sform and qform (code 1, scanner); ``.nii.gz`` is gzip level 1 (nibabel's default).
- anything else (``.mha``, ``.seg.nrrd``, ...): MONAI Label's ``Writer`` as before.

The values are never changed: ``result_dtype`` only widens the integer type (OHIF may ask for ``uint16``).

The file goes to a RAM-backed folder (``/dev/shm``) when it has room for it, else to the system's temporary
folder: MONAI Label reads it back once to answer and deletes it, so it never needs a disk, and a 78 MB write
to a disk-backed ``/tmp`` took 0.02 to 0.21 s here (the kernel throttles writers while it flushes the previous
results), against a steady 0.02 s in RAM. Files left by a server that was killed before it could delete them
are removed at the next start (:func:`remove_stale_results`, called by the app in ``on_init_complete``).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from typing import Any, Mapping, Optional

import numpy as np

from lib.errors import InvalidRequest

#: Extensions written here directly (lower case); others go through MONAI Label's Writer.
FAST_EXTENSIONS = (".nrrd", ".nii", ".nii.gz")
#: NIfTI when the client does not say (MONAI Label's default for a NIfTI image).
DEFAULT_EXTENSION = ".nii.gz"
_LPS = np.diag([-1.0, -1.0, 1.0])
#: RAM-backed folder for result files (used when it exists, is writable and has room; see the module docstring).
RAM_FOLDER = "/dev/shm"
#: Name prefix of result files, so stale ones can be found.
RESULT_PREFIX = "sam_med3d_result_"
#: Room left free in :data:`RAM_FOLDER` besides the file (other programs use it too), bytes.
RAM_FOLDER_RESERVE = 256 << 20
#: numpy dtype names that are also NRRD type names.
_NRRD_TYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")


def result_dtype(name: Optional[Any], default: np.dtype) -> np.dtype:
    """The integer dtype asked for by ``result_dtype`` (``default`` when absent); InvalidRequest otherwise."""
    if name in (None, ""):
        return np.dtype(default)
    try:
        dtype = np.dtype(str(name))
    except TypeError as err:
        raise InvalidRequest(f"result_dtype {name!r} is not a numpy dtype name (e.g. uint8, uint16)") from err
    if dtype.kind not in "ui" or dtype.itemsize > 8:
        raise InvalidRequest(f"result_dtype {name!r} is not an integer type; use e.g. uint8 or uint16")
    return dtype


def write_nrrd(path: str, label_map: np.ndarray, affine: np.ndarray, compress: bool = False) -> None:
    """``label_map`` ``(I, J, K)`` as an attached-header NRRD with the RAS voxel->world ``affine`` (as LPS).

    A Fortran-ordered map (i fastest, the NRRD data order) is written straight from its memory, in one
    ``write`` (pynrrd would copy it twice: ``tobytes`` and per-chunk slices); any other order is reordered first.
    ``compress``: gzip level 1 encoding instead of raw.
    """
    if label_map.ndim != 3 or label_map.dtype.name not in _NRRD_TYPES:
        raise ValueError(f"write_nrrd needs a 3D integer array, got {label_map.ndim}D {label_map.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    # Row p of "space directions": the world (LPS) step of voxel axis p, i.e. column p of the affine.
    directions = (_LPS @ affine[:3, :3]).T
    origin = _LPS @ affine[:3, 3]

    def vector(v: np.ndarray) -> str:
        return "(" + ",".join(repr(float(x)) for x in v) + ")"

    header = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {label_map.dtype.name}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(int(n)) for n in label_map.shape),
        "space directions: " + " ".join(vector(d) for d in directions),
        "kinds: domain domain domain",
        f"endian: {'big' if label_map.dtype.byteorder == '>' else 'little'}",
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: " + vector(origin),
    ]
    data = np.asfortranarray(label_map)
    payload = memoryview(data.T).cast("B")  # the transposed view of a Fortran array is C-contiguous: no copy
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\n\n").encode("ascii"))
        if not compress:
            handle.write(payload)
            return
        packer = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS | 16)  # gzip container, as NRRD expects
        step = 1 << 24
        for start in range(0, len(payload), step):
            handle.write(packer.compress(payload[start:start + step]))
        handle.write(packer.flush())


def write_nifti(path: str, label_map: np.ndarray, affine: np.ndarray) -> None:
    """``label_map`` ``(I, J, K)`` as NIfTI-1 with ``affine`` as sform and qform (gzip if ``path`` ends .gz)."""
    import nibabel as nib

    # An explicit dtype: nibabel refuses int64 data without one (``result_dtype: int64`` is a valid request).
    image = nib.Nifti1Image(label_map, np.asarray(affine, dtype=np.float64), dtype=label_map.dtype)
    image.set_sform(image.affine, code=1)
    image.set_qform(image.affine, code=1)
    nib.save(image, path)


def write_result(request: Mapping[str, Any], image_path: str, label_map: np.ndarray, affine: np.ndarray) -> str:
    """Write ``label_map`` with ``affine`` to a new temporary file in the format the request asks for.

    ``result_extension`` (default NIfTI), ``result_dtype`` (default the label map's dtype) and
    ``result_compress`` (NRRD only; NIfTI compression follows the extension) as the viewers send them.
    Returns the file's path (MONAI Label sends it and deletes it).
    """
    extension = request.get("result_extension") or DEFAULT_EXTENSION
    compress = request.get("result_compress", False)
    if not isinstance(extension, str) or extension.lower() not in FAST_EXTENSIONS:
        return _write_monai(request, image_path, label_map, affine)
    dtype = result_dtype(request.get("result_dtype"), label_map.dtype)
    data = label_map if label_map.dtype == dtype else label_map.astype(dtype)
    handle, path = tempfile.mkstemp(suffix=extension.lower(), prefix=RESULT_PREFIX,
                                    dir=result_folder(data.nbytes))
    os.close(handle)
    try:
        if extension.lower() == ".nrrd":
            write_nrrd(path, data, affine, compress=compress is True)
        else:
            write_nifti(path, data, affine)
    except BaseException:
        os.unlink(path)
        raise
    return path


def result_folder(nbytes: int, ram_folder: Optional[str] = None) -> Optional[str]:
    """``ram_folder`` when a result of ``nbytes`` fits there with :data:`RAM_FOLDER_RESERVE` to spare, else None
    (the system's temporary folder). Checked on every write: the room in ``/dev/shm`` changes, and a
    container may give it only 64 MB."""
    ram_folder = RAM_FOLDER if ram_folder is None else ram_folder
    try:
        if not os.path.isdir(ram_folder) or not os.access(ram_folder, os.W_OK | os.X_OK):
            return None
        stat = os.statvfs(ram_folder)
    except OSError:
        return None
    return ram_folder if stat.f_bavail * stat.f_frsize >= int(nbytes) + RAM_FOLDER_RESERVE else None


def remove_stale_results(max_age_s: float = 3600.0, ram_folder: Optional[str] = None) -> int:
    """Delete result files older than ``max_age_s`` from ``ram_folder`` and the temporary folder (left by a
    server killed between writing and sending them). Returns how many were removed."""
    import time

    removed = 0
    now = time.time()
    for folder in {RAM_FOLDER if ram_folder is None else ram_folder, tempfile.gettempdir()}:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if (entry.name.startswith(RESULT_PREFIX) and entry.is_file(follow_symlinks=False)
                        and now - entry.stat(follow_symlinks=False).st_mtime > max_age_s):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
    return removed


def _write_monai(request: Mapping[str, Any], image_path: str, label_map: np.ndarray, affine: np.ndarray) -> str:
    """MONAI Label's generic ``Writer`` (ITK; nibabel for NIfTI), for the formats not written directly."""
    from monailabel.transform.writer import Writer

    data = {
        "image_path": image_path,
        "pred": label_map,
        "pred_meta_dict": {"affine": np.asarray(affine, dtype=np.float64)},
        "result_extension": request.get("result_extension") or DEFAULT_EXTENSION,
        "result_dtype": request.get("result_dtype"),
        "result_compress": request.get("result_compress", False),
        "result": {},
    }
    # nibabel=True writes NIfTI with the exact affine (ITK would rebuild it from spacing/direction).
    path, _ = Writer(label="pred", json="result", nibabel=True)(data)
    return path


__all__ = ("write_result", "result_folder", "remove_stale_results", "write_nrrd", "write_nifti", "result_dtype", "FAST_EXTENSIONS", "DEFAULT_EXTENSION")
