"""The app's one place for checking what a client sends: names, uploads, request fields and scan files.

Names (image ids, label tags, run names, file names), upload names and extensions, the JSON form fields
MONAI Label passes to ``json.loads``, the fields of an ``/infer`` request (:func:`check_infer_request`, called
once per click by the infer route) and uploaded scans and labels. The clicks themselves are read, in the
shapes the viewers send, by :mod:`lib.infers.viewer_clicks`.

Everything a client sends may be hostile. A name is used to build a path inside the studies folder only after
:func:`check_name` accepted it: a single path component without separators, ``..``, a leading dot, control
characters or a drive prefix, and of bounded length. Uploaded files must carry one of the extensions the app
reads (:data:`IMAGE_EXTENSIONS`; never ``.py``, ``.sh``, ...).

An uploaded scan is read only through :mod:`sam_med3d.io` (one reader for every file the server is handed or
stores): a single-file format whose header, parsed before any library opens it, keeps the voxels inside it
(no NRRD ``data file``, no MetaImage ``ElementDataFile`` other than ``LOCAL``, no ``.hdr``/``.img`` pair); a
non-empty 3D scalar volume (trailing singleton dimensions allowed) of at most ``max_voxels`` voxels, checked
from the **header** before any voxel is decompressed (a few hundred kB of gzip can claim gigabytes), with
finite values. A label must also have its image's grid (size, spacing, origin, direction within a small
tolerance) and integer values 0..255.

Every refusal is an :class:`~lib.errors.InvalidRequest` whose message names the field and the problem.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from sam_med3d import io
from sam_med3d.io import SINGLE_FILE_SUFFIXES, ScanHeader, ScanTooLarge

from lib.errors import InvalidRequest

#: File name endings of the scans and labels the app reads, stores and accepts as uploads, lower case (longest
#: first, so ``.nii.gz`` wins over ``.gz``): the single-file formats of :mod:`sam_med3d.headers`. ``.mhd``,
#: ``.nhdr`` and ``.hdr``/``.img`` are not among them: their voxels live in a second file.
IMAGE_EXTENSIONS: Tuple[str, ...] = SINGLE_FILE_SUFFIXES

#: What a label upload (``PUT /datastore/label``) may be called: a label file, or ``label.bin``, the viewer's raw
#: label map as MONAI Label's OHIF client sends it (only the DICOMweb datastore reads it, see its ``save_label``).
LABEL_UPLOAD_EXTENSIONS: Tuple[str, ...] = IMAGE_EXTENSIONS + (".bin",)

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
    """``(stem, extension)`` of ``file_name`` for one of ``extensions``, the extension in lower case
    (``"a.NII.GZ"`` -> ``("a", ".nii.gz")``): the one place where extensions are matched, so files are stored
    and found under one spelling. Raise naming ``what`` otherwise."""
    lower = file_name.lower()
    for ext in sorted((e.lower() for e in extensions), key=len, reverse=True):
        if lower.endswith(ext) and len(file_name) > len(ext):
            return file_name[: -len(ext)], ext
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


#: A scan file's header (:class:`sam_med3d.io.ScanHeader`): size, spacing, origin, direction, pixel type.
Header = ScanHeader


def _refusal(err: ValueError, what: str, path: str) -> InvalidRequest:
    """The core's ``ValueError`` about ``path`` as a 4xx naming ``what`` (413 for the voxel cap); the server's
    temporary file name means nothing to the client."""
    message = str(err).replace(str(path), what)
    if isinstance(err, ScanTooLarge):
        return InvalidRequest(f"{message} by this server (--conf max_voxels)", status_code=STATUS_TOO_LARGE)
    return InvalidRequest(message)


def read_header(path: str, what: str, max_voxels: Optional[int] = None) -> Header:
    """The checked 3D header of ``path`` (:func:`sam_med3d.io.read_header`: single-file formats whose voxels are
    inside, DICOM folders without links; the voxel cap from the header); a 4xx naming ``what`` otherwise."""
    try:
        return io.read_header(path, max_voxels)
    except ValueError as err:
        raise _refusal(err, what, path) from None


def check_image_file(path: str, max_voxels: int = DEFAULT_MAX_VOXELS, what: str = "the uploaded image") -> Header:
    """Validate an uploaded scan (see the module docstring); return its header."""
    try:
        header, array = io.read_voxels(path, max_voxels)
    except ValueError as err:
        raise _refusal(err, what, path) from None
    if array.dtype.kind == "f" and not all(np.isfinite(array[..., k]).all() for k in range(array.shape[2])):
        raise InvalidRequest(f"{what} contains NaN or infinite values")
    return header


def check_same_grid(label: Header, image: Header, what: str = "the label") -> None:
    """Refuse a label that is not on its image's voxel grid (:func:`sam_med3d.io.check_same_grid`)."""
    try:
        io.check_same_grid(label, image, what)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None


def read_label_map(path: str, image: Optional[Union[Header, Sequence[int]]], max_voxels: int = DEFAULT_MAX_VOXELS,
                   what: str = "the uploaded label") -> np.ndarray:
    """The app's one reader of a client's label map: :func:`sam_med3d.io.load_label` (header checked, voxel cap,
    integer values 0..255, on ``image``'s grid, or its size when ``image`` is a shape; ``None``: no check), as
    uint8 ``(I, J, K)`` in the file's voxel order; a 4xx naming ``what`` otherwise."""
    try:
        return io.load_label(path, image, max_voxels, what=what)
    except ValueError as err:
        raise _refusal(err, what, path) from None


def check_label_file(path: str, image_header: Optional[Header], max_voxels: int = DEFAULT_MAX_VOXELS,
                     what: str = "the uploaded label") -> Header:
    """Validate an uploaded label map against its image's header (``None``: skip the grid check) with
    :func:`read_label_map`; return the label's header."""
    header = read_header(path, what, max_voxels)
    read_label_map(path, image_header, max_voxels, what)
    return header


# ------------------------------------------------------------------------------------------- request fields
#: Body fields that would put a folder on a subprocess' Python path.
PYTHON_PATH_FIELDS = ("bundle_path", "pythonpath", "python_path", "sys_path")


def check_task_name(tasks: Mapping[str, Any], name: str, what: str) -> None:
    """``name`` must be one of ``tasks`` (the app's models, trainers, strategies or scoring methods): 404 naming
    the known ones otherwise (MONAI Label answers 500)."""
    if name not in tasks:
        raise InvalidRequest(f"{what} {name[:80]!r} does not exist; this server has "
                             f"{', '.join(sorted(tasks)) or 'none'}", status_code=404)


def check_datastore_image(image: Any, what: str, datastore: Any) -> str:
    """``image`` must name an image of ``datastore``, and no path MONAI Label would read instead."""
    from monailabel.datastore.dicom import DICOMWebDatastore
    from monailabel.datastore.local import LocalDatastore

    image = check_name(image, what)
    if os.path.exists(image):
        # MONAI Label's infer reads an existing path (relative to the server's working folder) in preference
        # to the datastore image of that id.
        raise InvalidRequest(f"{what} {image!r} is also a file or folder name in the server's working folder; "
                             "the server only reads datastore images, rename the image")
    # A local studies folder lists its images; a DICOMweb id is a series UID that the datastore downloads into
    # its cache under that (checked) name, and a series stored a moment ago may not be listed yet.
    local = isinstance(datastore, LocalDatastore) and not isinstance(datastore, DICOMWebDatastore)
    if local and image not in datastore.list_images():
        raise InvalidRequest(f"{what} {image!r} was not found in the datastore; pass the id of an image listed by "
                             "GET /datastore/ or upload the image with the request")
    return image


def _refuse_constant(name: str) -> None:
    """``json.loads`` reads ``NaN`` and ``Infinity``, which are not JSON: stored in the datastore index they made
    every later answer that includes it a 500."""
    raise ValueError(f"{name} is not a JSON value: non-finite numbers are refused")


def parse_json_object(text: Any, what: str) -> Dict[str, Any]:
    """A form field that MONAI Label passes to ``json.loads`` (``params``, ``info``), as a JSON object (``{}`` when
    empty); 422 naming ``what`` for anything else."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if not isinstance(text, str):
        raise InvalidRequest(f"{what} must be a JSON object, not a file")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:
        raise InvalidRequest(f"{what} is not valid JSON ({err})") from None
    except RecursionError:
        raise InvalidRequest(f"{what} is not usable JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def check_infer_request(image: str, session_id: str, params_text: Any, upload_names: Mapping[str, Optional[str]],
                        labels: Sequence[str], datastore: Any) -> Dict[str, Any]:
    """Check the fields of ``POST /infer/<model>`` once and return its ``params`` as a JSON object.

    ``image`` (query) must be a datastore image; without it a file or a session must come with the request;
    ``upload_names`` (form field -> the client's file name, None when the field is absent) need a known scan
    extension; ``params`` must be a JSON object whose ``image`` is a datastore image, whose ``label`` is a label
    name rather than a path, whose tags are plain names, and which carries no Python path field.
    """
    if session_id:
        check_name(session_id, "query parameter 'session_id'")
    params = parse_json_object(params_text, "form field 'params'")
    if image:
        check_datastore_image(image, "query parameter 'image'", datastore)
    elif upload_names.get("file") is None and not session_id:
        raise InvalidRequest("give a datastore image id (?image=<id>), upload the image as form field 'file' or "
                             "name a session (?session_id=<id>)")
    for field, file_name in upload_names.items():
        if file_name:
            check_upload_name(file_name, f"the file name of form field {field!r}")
    if "image" in params and params["image"] not in ("", None, image):
        check_datastore_image(params["image"], "params.image", datastore)
    label = params.get("label")
    if isinstance(label, str) and label not in labels and (
            "/" in label or "\\" in label or label.lower().endswith(IMAGE_EXTENSIONS) or os.path.isabs(label)):
        raise InvalidRequest(f"params.label must be a label name ({', '.join(labels)}), not a path; send a label "
                             "file as the form field 'label'")
    for key in ("label_tag", "tag"):
        if params.get(key) not in (None, ""):
            check_name(params[key], f"params.{key}", max_length=64)
    for key in PYTHON_PATH_FIELDS:
        if key in params:
            raise InvalidRequest(f"params.{key} is not accepted")
    return params
