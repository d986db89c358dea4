"""``PUT /session/`` checks its uploads with the app's reader and never leaves them in the temporary folder.

What MONAI Label 0.8.5 does: the route copies the uploads into a folder of the temporary directory, creates
the session (which moves them into the sessions folder) and registers the folder's removal as a background
task, which FastAPI runs only after a successful answer: when anything fails (a broken ``expiry``, a full disk,
a failing move), the folder and the uploads stay for good. It accepts any file; what it holds is found out at
the first click. A single ``.dcm`` file becomes a session whose image is that file, which no reader of the app
accepts (a DICOM volume is read as a folder), so such a session could never be used.

Why we change it: every refused request must leave nothing behind, every file the server is handed is read
only through :mod:`sam_med3d.io` (no header naming another file, the voxel cap from the header), and a valid
upload must give a usable session.

How: a route in front of MONAI Label's, with its path, parameters, role and answer:

- the uploads go into a folder of their own, removed in a ``finally`` on every path;
- one file with a scan extension (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``) must pass
  :func:`sam_med3d.io.read_header` with ``--conf max_voxels``; files with ``.dcm`` or no extension are one DICOM
  series, put into a folder and held to the same reader (no links, the cap counted from the first file's header
  times the number of files) and must be 3D: a single ``.dcm`` works when it is a multi-frame (3D) DICOM; a
  single 2D slice is refused (422) with what to upload instead;
- scan files mixed with DICOM files, several scan files, ``uncompress=true`` and a negative ``expiry`` are
  refused with 422; ScanTooLarge is 413.

What would let us delete it: MONAI Label removing its temporary folder in a ``finally`` and reading a
single-file DICOM volume.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, Depends, File, UploadFile
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from sam_med3d.headers import single_file_suffix
from starlette.concurrency import run_in_threadpool

from sam_med3d.io import ScanHeader, ScanTooLarge, read_header

from lib.validation import upload_basename
from lib.errors import InvalidRequest
from lib.upstream_fixes._routes import put_first

logger = logging.getLogger(__name__)

#: Bytes copied from an upload at a time.
CHUNK_BYTES = 1 << 20


def _copy(upload: UploadFile, path: str) -> None:
    with open(path, "xb") as out:
        shutil.copyfileobj(upload.file, out, CHUNK_BYTES)


def _checked_header(path: str, what: str, max_voxels: Optional[int]) -> ScanHeader:
    """:func:`sam_med3d.io.read_header` of an upload, its refusal a 4xx naming ``what`` (413 over the cap)."""
    try:
        return read_header(path, max_voxels)
    except ValueError as err:
        message = str(err).replace(f"folder {path}", what).replace(path, what)
        raise InvalidRequest(f"{message} by this server (--conf max_voxels)" if isinstance(err, ScanTooLarge)
                             else message, status_code=413 if isinstance(err, ScanTooLarge) else 422) from None


def _is_dicom_name(name: str) -> bool:
    return name.lower().endswith(".dcm") or "." not in name


def create_session(expiry: int, files: List[UploadFile], max_voxels: Optional[int],
                   uncompress: bool = False) -> Dict[str, Any]:
    """MONAI Label's answer ``{"session_id", "session_info"}`` for uploads the app's reader accepts."""
    from monailabel.interfaces.utils.app import app_instance

    sessions = app_instance().sessions()
    if sessions is None:
        raise InvalidRequest("sessions are not enabled on this server", status_code=406)
    if uncompress:
        raise InvalidRequest("uncompress=true is not accepted: archives are not unpacked on this server; upload "
                             "the files themselves (several 'files' fields for a DICOM series)")
    if expiry < 0:
        raise InvalidRequest(f"expiry must be 0 (the server's default) or a number of seconds, got {expiry}")
    named = [f for f in files if getattr(f, "filename", None)]
    if not named:
        raise InvalidRequest("no file uploaded: send the scan (or every file of a DICOM series) as 'files'")
    received = tempfile.mkdtemp(prefix="sam_med3d_session_")
    try:
        names = [upload_basename(f.filename, "the file name of a session upload") for f in named]
        scans = [n for n in names if single_file_suffix(n)]
        dicom = [n for n in names if _is_dicom_name(n)]
        if len(scans) + len(dicom) != len(names):
            other = next(n for n in names if not single_file_suffix(n) and not _is_dicom_name(n))
            raise InvalidRequest(f"the session upload {other!r} has an extension this app does not read; use "
                                 ".nii.gz, .nii, .nrrd, .mha, or .dcm files of one DICOM series")
        if scans and len(names) > 1:
            raise InvalidRequest(f"a session holds one scan: {len(names)} files were sent with {scans[0]!r}; send "
                                 "one scan file, or only the files of one DICOM series")
        if len(set(names)) != len(names):
            raise InvalidRequest("two uploads of the session have the same file name")
        if scans:
            image = os.path.join(received, scans[0])
            _copy(named[0], image)
            _checked_header(image, f"the session upload {scans[0]!r}", max_voxels)
        else:
            image = os.path.join(received, "series")
            os.mkdir(image)
            for name, upload in zip(names, named):
                _copy(upload, os.path.join(image, name))
            what = f"the DICOM upload {names[0]!r}" if len(names) == 1 else f"the DICOM series of {len(names)} files"
            header = _checked_header(image, what, max_voxels)
            if min(header.size) < 2:
                raise InvalidRequest(f"{what} is a single 2D slice ({header.shape_str()}); send every slice of the "
                                     "series as 'files' fields, or one multi-frame (3D) DICOM file")
        session_id, info = sessions.add_session(image, expiry)
    finally:
        shutil.rmtree(received, ignore_errors=True)
    logger.info("Session %s: %s", session_id, info.image)
    return {"session_id": session_id, "session_info": info.to_json()}


def install_session_upload_route(max_voxels: Optional[int]) -> None:
    router = APIRouter()

    @router.put("/session/", include_in_schema=False)
    async def api_create_session(uncompress: bool = False, expiry: int = 0, files: List[UploadFile] = File(...),
                                 user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        return await run_in_threadpool(create_session, expiry, files, max_voxels, uncompress)

    put_first(router)
