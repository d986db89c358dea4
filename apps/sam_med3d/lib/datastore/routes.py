"""The app's handlers for MONAI Label's datastore uploads and dataset download: nothing stays in the temporary folder.

MONAI Label 0.8.5's ``PUT /datastore/image`` and ``PUT /datastore/label`` copy the upload to a temporary file
and register its removal as a background task, which FastAPI runs only after a *successful* response: every
refused upload (a bad scan, a header naming another file, an id that exists, a scan over the voxel cap) stayed
in the temporary folder for good, up to the request's size each time, without authentication by default.
``GET /datastore/dataset`` wrote a zip of every labelled study into the temporary folder and never removed it.

The handlers here keep MONAI Label's paths, parameters, roles and answers, and

- write the upload into a new temporary folder (under the client's checked file name, its extension in lower
  case), hand it to the datastore (which reads it only through
  :mod:`sam_med3d.io`) and remove it in a ``finally``, whatever the outcome; the work runs in a worker thread,
  so validating a large scan does not hold the event loop;
- stream the dataset zip as it is written (no file at all): the datalist of the datastore, whose files are
  never links leading outside the studies folder (:class:`~lib.datastore.local.SafeLocalDatastore`), plus
  ``metadata.json``; 404 when no image has a final label (MONAI Label: a 500).

To delete: when MONAI Label removes its upload files on every path and streams or removes the dataset zip.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Sequence

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import StreamingResponse
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from starlette.concurrency import run_in_threadpool

from lib.validation import IMAGE_EXTENSIONS, LABEL_UPLOAD_EXTENSIONS, split_extension, upload_basename
from lib.errors import InvalidRequest

logger = logging.getLogger(__name__)

#: ``(method, path)`` of the MONAI Label routes replaced here (paths without the API prefix).
REPLACED = (("PUT", "/datastore/"), ("PUT", "/datastore/image"), ("PUT", "/datastore/label"),
            ("GET", "/datastore/dataset"))

#: Bytes read from a file or an upload at a time.
CHUNK_BYTES = 1 << 20


def _app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _params(text: Optional[str], what: str = "params") -> Dict[str, Any]:
    if text in (None, ""):
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest(f"{what} is not valid JSON; send a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _spool(upload: UploadFile, what: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> str:
    """Copy ``upload`` into a new temporary folder, under the client's checked file name with its extension in
    lower case (so the datastore's messages name the client's file); the caller removes it (:func:`_remove`)."""
    what = f"the file name of the uploaded {what}"
    stem, extension = split_extension(upload_basename(upload.filename, what), what, extensions)
    folder = tempfile.mkdtemp(prefix="sam_med3d_datastore_")
    path = os.path.join(folder, stem + extension)
    try:
        with open(path, "xb") as out:
            shutil.copyfileobj(upload.file, out, CHUNK_BYTES)
    except BaseException:
        _remove(path)
        raise
    return path


def _remove(path: str) -> None:
    """Remove an upload written by :func:`_spool` and its folder."""
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def add_image(image: Optional[str], params: str, file: UploadFile, user: Optional[str]) -> Dict[str, Any]:
    """``PUT /datastore/image``: MONAI Label's answer ``{"image": <id>}``; the upload never outlives the call."""
    info = _params(params)
    if user:
        info["user"] = user
    image_id = image or split_extension(upload_basename(file.filename, "the file name of the uploaded image"),
                                        "the file name of the uploaded image")[0]
    path = _spool(file, "image")
    try:
        return {"image": _app().datastore().add_image(image_id, path, info)}
    finally:
        _remove(path)


def save_label(image: str, params: str, tag: str, label: UploadFile) -> Dict[str, Any]:
    """``PUT /datastore/label``: MONAI Label's answer (``on_save_label``'s, plus image and label ids)."""
    info = _params(params)
    tag = tag or DefaultLabelTag.FINAL.value
    path = _spool(label, "label", LABEL_UPLOAD_EXTENSIONS)
    try:
        instance = _app()
        label_id = instance.datastore().save_label(image, path, tag, info)
    finally:
        _remove(path)
    answer = instance.on_save_label(image, label_id) or {}
    answer.update({"image": image, "label": label_id})
    return answer


class _Pipe(io.RawIOBase):
    """A write-only stream that keeps what was written until :meth:`take`: ``zipfile`` writes into it, the
    response sends what it took (``zipfile`` writes data descriptors to a stream it cannot seek)."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: List[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def dataset_records(limit_cases: Optional[int]) -> List[Dict[str, str]]:
    """The datastore's (image, final label) records, the first ``limit_cases`` when that is 1..N-1 (MONAI
    Label's rule); 404 when there is none."""
    records = _app().datastore().datalist()
    if not records:
        raise InvalidRequest("nothing to download: no image has a final label yet", status_code=404)
    if limit_cases and limit_cases in range(1, len(records)):
        records = records[:limit_cases]
    return records


def zip_stream(records: List[Dict[str, str]], metadata: str) -> Iterator[bytes]:
    """The zip of ``records`` (``<key>/<file name>`` for each file) and ``metadata.json``, in pieces."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, mode="w") as archive:
        for record in records:
            for key, path in record.items():
                entry = zipfile.ZipInfo.from_file(path, arcname=f"{key}/{os.path.basename(path)}")
                with open(path, "rb") as source, archive.open(entry, "w", force_zip64=True) as target:
                    while True:
                        chunk = source.read(CHUNK_BYTES)
                        if not chunk:
                            break
                        target.write(chunk)
                        yield pipe.take()
        archive.writestr("metadata.json", metadata)
    yield pipe.take()


def download_dataset(limit_cases: Optional[int]) -> StreamingResponse:
    records = dataset_records(limit_cases)
    metadata = json.dumps(_app().datastore().json(), default=str)
    return StreamingResponse(zip_stream(records, metadata), media_type="application/zip",
                             headers={"Content-Disposition": 'attachment; filename="dataset.zip"'})


def build_router() -> APIRouter:
    """The replacement routes (see the module docstring); mounted under the API prefix."""
    router = APIRouter(prefix="/datastore", tags=["Datastore"])
    annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))

    @router.put("/", summary="Upload new Image", include_in_schema=False, deprecated=True)
    @router.put("/image", summary="Upload new Image")
    async def api_add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                            user: User = annotator):
        return await run_in_threadpool(add_image, image, params, file, user.username)

    @router.put("/label", summary="Save Finished Label")
    async def api_save_label(image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value,
                             label: UploadFile = File(...), user: User = annotator):
        return await run_in_threadpool(save_label, image, params, tag, label)

    @router.get("/dataset", summary="Download full dataset as ZIP archive")
    async def api_download_dataset(limit_cases: Optional[int] = None, user: User = annotator):
        return await run_in_threadpool(download_dataset, limit_cases)

    return router
