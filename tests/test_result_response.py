"""The streamed multipart answer of a click (``apps/sam_med3d/lib/result_response.py``): the same bytes as MONAI
Label's ``MultipartEncoder`` body, parsed by MONAI Label's client as before, and the file deleted afterwards."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import numpy as np
from fastapi import BackgroundTasks
from monailabel.client.client import MONAILabelUtils
from requests_toolbelt import MultipartEncoder

from app_helpers import APP_DIR

sys.path.insert(0, str(APP_DIR))
try:
    from lib import result_response  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))


def _body(response) -> bytes:
    async def collect():
        return b"".join([chunk async for chunk in response.body_iterator])
    return asyncio.run(collect())


def test_the_streamed_body_is_the_multipart_encoders_and_the_client_reads_it(tmp_path, monkeypatch):
    monkeypatch.setattr(result_response, "CHUNK_BYTES", 1000)  # several chunks
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()  # with \r\n inside
    path = tmp_path / "sam_med3d_result_x.nrrd"
    path.write_bytes(data)
    params = {"label_names": {"background": 0, "spleen": 1}, "timings": {"total": 0.1}}
    tasks = BackgroundTasks()
    response = result_response.send_result(None, {"file": str(path), "params": params}, None, tasks)
    boundary = response.media_type.split("boundary=")[1]
    body = _body(response)
    expected = MultipartEncoder(fields={"params": (None, json.dumps(params), "application/json"),
                                        "image": (path.name, io.BytesIO(data), "application/octet-stream")},
                                boundary=boundary).to_string()
    assert body == expected
    assert response.headers["content-length"] == str(len(body))
    form, files = MONAILabelUtils.parse_multipart(io.BytesIO(body), {"content-type": response.media_type,
                                                                     "content-length": str(len(body))})
    assert json.loads(form["params"]) == params and files == {path.name: data}
    asyncio.run(tasks())  # what starlette runs once the answer is sent
    assert not path.exists()


def test_json_and_image_answers_are_monai_labels_own(tmp_path):
    path = tmp_path / "r.nrrd"
    path.write_bytes(b"x")
    result = {"file": str(path), "params": {"a": 1}}
    assert result_response.send_result(None, result, "json", BackgroundTasks()) == {"a": 1}
    assert type(result_response.send_result(None, result, "image", BackgroundTasks())).__name__ == "FileResponse"
