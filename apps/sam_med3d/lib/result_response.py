"""The answer to a click: MONAI Label's response formats, with the label map streamed from its file.

MONAI Label 0.8.5's ``send_response`` answers a request without ``output`` (3D Slicer's) with a multipart body
built by ``requests_toolbelt``'s ``MultipartEncoder(...).to_string()``: the whole label map is read into memory
and copied into one bytes object before the first byte is sent (0.13 s for the 78 MB map of a 512x512x300 CT,
on every click). :func:`send_result` sends the same bytes (the same parts, headers and order: ``params`` JSON,
then ``image``) as a stream: a small head, the file in 4 MiB chunks, a tail, with its ``Content-Length``, so
clients see no difference (``MONAILabelClient`` parses it with ``cgi``). ``output=json`` and ``output=image``
(OHIF's) are MONAI Label's own answers (JSON; ``FileResponse``, already streamed).

The result file is deleted once the answer has been sent (as MONAI Label does).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Iterator, Mapping, Optional

from fastapi import BackgroundTasks
from monailabel.endpoints.infer import send_response
from monailabel.utils.others.generic import get_mime_type, remove_file
from starlette.responses import StreamingResponse

#: Bytes read from the result file per chunk of the answer.
CHUNK_BYTES = 4 << 20


def multipart_parts(params: Any, filename: str, mime: str, boundary: str) -> "tuple[bytes, bytes]":
    """``(head, tail)`` of the multipart body around the file's bytes, laid out as ``MultipartEncoder`` does."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\nContent-Type: application/json"
            f"\r\n\r\n{json.dumps(params)}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{filename}\"\r\nContent-Type: {mime}\r\n\r\n").encode("utf-8")
    return head, f"\r\n--{boundary}--\r\n".encode("ascii")


def _stream(head: bytes, path: str, tail: bytes) -> Iterator[bytes]:
    yield head
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK_BYTES)
            if not chunk:
                break
            yield chunk
    yield tail


def send_result(datastore: Any, result: Mapping[str, Any], output: Optional[str],
                background_tasks: BackgroundTasks) -> Any:
    """The HTTP answer for ``result`` (``{"file" or "label", "tag", "params"}`` from ``MONAILabelApp.infer``)."""
    path = result.get("file") or result.get("label")
    if output not in (None, "", "all") or not path or not os.path.isfile(path):
        return send_response(datastore, result, output, background_tasks)  # MONAI Label's own
    background_tasks.add_task(remove_file, path)  # after the answer has been sent
    boundary = uuid.uuid4().hex
    head, tail = multipart_parts(result.get("params"), os.path.basename(path), get_mime_type(path), boundary)
    length = len(head) + os.path.getsize(path) + len(tail)
    return StreamingResponse(_stream(head, path, tail), media_type=f"multipart/form-data; boundary={boundary}",
                             headers={"Content-Length": str(length)})


__all__ = ("send_result", "multipart_parts", "CHUNK_BYTES")
