"""The fields of an ``/infer`` request other than the clicks: result format, client id, uploads, scan size.

Every field is checked before any work is done, and a bad one is an :class:`~lib.errors.InvalidRequest` (a
4xx with a message naming the field), never an error deep inside a writer:

- ``result_extension``: one of :data:`RESULT_EXTENSIONS` (single-file formats the viewers read); anything
  else (``.sh``, ``/../../x.nii.gz``, ``.mhd`` with its separate data file) is refused;
- ``result_dtype``: one of :data:`RESULT_DTYPES` (integer types that hold every label value 0..255);
- ``result_compress``: a JSON boolean;
- ``client_id``: a short printable string (3D Slicer sends ``user-xyz`` unless set otherwise); it only keys
  the annotator's session (:mod:`lib.infers.sessions`), never a file.

Files (the scan, a label uploaded with the request, a session's DICOM series) are read only through
:mod:`sam_med3d.io`, which checks their headers and the voxel cap first (see :mod:`lib.infers.sam_med3d`).

The server's infer route (:mod:`lib.upstream_fixes.task_routes`) tells the task which files came with the request under the
keys :data:`UPLOADED_IMAGE` and :data:`UPLOADED_LABEL`, which it sets after merging the client's JSON
``params``, so a client cannot point them at a server path.
"""

from __future__ import annotations

from typing import Any, Mapping

from lib.errors import InvalidRequest

#: Set by the infer route: True when the image was uploaded with the request (a temporary file).
UPLOADED_IMAGE = "sam_med3d_uploaded_image"
#: Set by the infer route: the temporary path of the label file uploaded with the request, else None.
UPLOADED_LABEL = "sam_med3d_uploaded_label"
#: Set by the infer route when the client sent no ``client_id``: who the request is from (see lib.upstream_fixes.task_routes).
CLIENT_FALLBACK = "sam_med3d_client"

#: Result formats the app writes (one file each; ITK/nibabel read them; OHIF and Slicer ask for .nrrd).
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Result voxel types: integer types that hold every label value (0..255).
RESULT_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "int64")
#: Longest accepted ``client_id``.
MAX_CLIENT_ID = 128
#: Client id of requests that name no client and come through no route that knows the caller.
DEFAULT_CLIENT = "default"


def check_result_format(request: Mapping[str, Any]) -> None:
    """Refuse an unknown ``result_extension`` / ``result_dtype`` or a non-boolean ``result_compress``."""
    extension = request.get("result_extension")
    if extension not in (None, "") and (not isinstance(extension, str) or extension.lower() not in RESULT_EXTENSIONS):
        raise InvalidRequest(f"result_extension {_short(extension)} is not supported; use one of "
                             f"{', '.join(RESULT_EXTENSIONS)}")
    dtype = request.get("result_dtype")
    if dtype not in (None, "") and (not isinstance(dtype, str) or dtype.lower() not in RESULT_DTYPES):
        raise InvalidRequest(f"result_dtype {_short(dtype)} is not supported; use one of {', '.join(RESULT_DTYPES)}")
    if isinstance(dtype, str) and dtype.lower() == "int64" and isinstance(extension, str) and extension.lower() == ".mha":
        raise InvalidRequest("result_dtype int64 cannot be written as .mha (ITK's MetaImage writer has no 64-bit "
                             "integer type); use int32, or .nrrd / .nii.gz for int64")
    compress = request.get("result_compress")
    if compress is not None and not isinstance(compress, bool):
        raise InvalidRequest(f"result_compress must be true or false, got {_short(compress)}")


def result_format(request: Mapping[str, Any]) -> dict:
    """The checked result fields, normalised (lower case; ``None`` where the client sent none)."""
    check_result_format(request)
    extension = request.get("result_extension") or None
    dtype = request.get("result_dtype") or None
    return {"result_extension": extension.lower() if extension else None,
            "result_dtype": dtype.lower() if dtype else None,
            "result_compress": bool(request.get("result_compress") or False)}


def client_id(request: Mapping[str, Any]) -> str:
    """Who the request is from: its ``client_id``, else what the route knows of the caller, else "default"."""
    raw = request.get("client_id")
    if raw in (None, ""):
        fallback = request.get(CLIENT_FALLBACK)
        return str(fallback) if isinstance(fallback, str) and fallback else DEFAULT_CLIENT
    if not isinstance(raw, str) or len(raw) > MAX_CLIENT_ID or not raw.isprintable():
        raise InvalidRequest(f"client_id must be a printable string of at most {MAX_CLIENT_ID} characters, got "
                             f"{_short(raw)}")
    return "client:" + raw


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
