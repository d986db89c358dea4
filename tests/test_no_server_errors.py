"""No input makes the real server answer 5xx: MONAI Label 0.8.5's routes that did, and a hostile probe.

One server (``monailabel start_server`` on 127.0.0.1, vit_mini weights, two studies from ``../shared/data``).
First the inputs that were 500s, each with its expected 4xx (or a working answer): blank and unknown ``info``
updates, malformed ``check_sum``, ``/logs/gpu`` without ``nvidia-smi``, ``/proxy/dicom/...`` on a studies
folder, ``?image=true`` of a session made of several files, ``result_dtype: int64`` with NIfTI output. Then a
bounded probe of names (bidirectional overrides, look-alike slashes, NFD twins, control characters, 10k
characters) and malformed parameters against every datastore, session, log and model route: every answer
must be below 500 and the server must keep answering.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata

import nibabel as nib
import numpy as np
import pytest
import requests

from app_helpers import copy_app, start_server

MODEL = "sam_med3d"
CLICK = {"spleen": [[30, 27, 26]], "liver": [], "background": [], "label": "spleen"}
TIMEOUT = 120


@pytest.fixture(scope="module")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("no_server_errors")
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(data_dir / "sct_spinalcord_mri" / "imagesTr" / "t2.nii.gz", studies / "t2.nii.gz")
    shutil.copy(data_dir / "sct_spinalcord_mri" / "imagesTr" / "t1w.nii.gz", studies / "caf\u00e9.nii.gz")
    srv = start_server(copy_app(root / "app"), studies,
                       {"model": "vit_mini", "checkpoint": str(mini_checkpoint), "labels": "spleen=1,liver=2",
                        "device": "cpu", "preload": "false", "extension": "off"},
                       log_path=root / "server.log",
                       env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
                            "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
                            "PATH": "/usr/bin:/bin:" + str(shutil.which("monailabel")).rsplit("/", 1)[0]})
    srv.studies = studies
    srv.label_bytes = (data_dir / "sct_spinalcord_mri" / "labelsTr" / "t2.nii.gz").read_bytes()
    yield srv
    srv.stop()


def _call(server, method, path, **kwargs):
    return requests.request(method, f"{server.url}{path}", timeout=TIMEOUT, **kwargs)


def test_blank_and_unknown_info_updates_are_4xx(server):
    blank = _call(server, "PUT", "/datastore/image/info", params={"image": "t2"}, data={"info": ""})
    assert blank.status_code == 422 and "'info' is empty" in blank.json()["detail"]
    blank = _call(server, "PUT", "/datastore/updatelabelinfo", params={"label": "t2", "tag": "final"},
                  data={"params": " "})
    assert blank.status_code == 422
    unknown = _call(server, "PUT", "/datastore/label/info", params={"label": "t2", "tag": "final"},
                    data={"info": "{}"})
    assert unknown.status_code == 404 and "has no label" in unknown.json()["detail"]
    unknown = _call(server, "PUT", "/datastore/image/info", params={"image": "nope"}, data={"info": "{}"})
    assert unknown.status_code == 404
    listed = _call(server, "PUT", "/datastore/image/info", params={"image": "t2"}, data={"info": "[1, 2]"})
    assert listed.status_code == 422
    for constant in ("NaN", "Infinity", "-Infinity"):
        response = _call(server, "PUT", "/datastore/image/info", params={"image": "t2"},
                         data={"info": f'{{"score": {constant}}}'})
        assert response.status_code == 422 and "not a JSON value" in response.json()["detail"], constant
    assert _call(server, "GET", "/datastore/", params={"output": "all"}).status_code == 200
    good = _call(server, "PUT", "/datastore/image/info", params={"image": "t2"}, data={"info": '{"note": "ok"}'})
    assert good.status_code == 200
    assert _call(server, "GET", "/datastore/image/info", params={"image": "t2"}).json()["note"] == "ok"


def test_info_over_the_limit_is_413_and_the_index_stays_small(server):
    """Above the datastore's bound per image or label ("at most"), and above the request size ("maximum size")."""
    saved = _call(server, "PUT", "/datastore/label", params={"image": "t2", "tag": "big_info"},
                  files={"label": ("t2.nii.gz", server.label_bytes)})
    assert saved.status_code == 200, saved.text
    index = server.studies / "datastore_v2.json"
    size = index.stat().st_size
    for blob, message in ((200_000, "at most"), (1 << 20, "maximum size")):
        big = json.dumps({"blob": "x" * blob})
        for path, params in (("/datastore/image/info", {"image": "t2"}),
                             ("/datastore/label/info", {"label": "t2", "tag": "big_info"})):
            response = _call(server, "PUT", path, params=params, data={"info": big})
            assert response.status_code == 413, (path, response.status_code, response.text[:300])
            assert message in response.json()["detail"]
    assert index.stat().st_size < size + 4096


def test_check_sum_is_validated_and_actually_compared(server):
    digest = hashlib.sha256((server.studies / "t2.nii.gz").read_bytes()).hexdigest()
    for bad in ("foo:1", "a:b:c", "SHA256:xyz", "sha256:" + "0" * 10, "MD5:" + digest):
        response = _call(server, "HEAD", "/datastore/image", params={"image": "t2", "check_sum": bad})
        assert response.status_code == 422, (bad, response.status_code)
    for good in (digest, f"SHA256:{digest}", f"sha256:{digest.upper()}"):
        assert _call(server, "HEAD", "/datastore/image", params={"image": "t2", "check_sum": good}).status_code == 200
    other = "SHA256:" + "0" * 64
    assert _call(server, "HEAD", "/datastore/image", params={"image": "t2", "check_sum": other}).status_code == 404
    assert _call(server, "HEAD", "/datastore/image", params={"image": "nope"}).status_code == 404


def test_gpu_log_without_nvidia_smi_and_proxy_on_a_folder_are_404(server):
    response = _call(server, "GET", "/logs/gpu")
    if shutil.which("nvidia-smi") is None:
        assert response.status_code == 404 and "nvidia-smi is not installed" in response.json()["detail"]
    else:
        assert response.status_code == 200
    for method, path in (("GET", "/proxy/dicom/qido/studies"), ("GET", "/proxy/dicom/wado/studies/1"),
                         ("POST", "/proxy/dicom/stow/studies"), ("GET", "/proxy/dicom/anything")):
        response = _call(server, method, path)
        assert response.status_code == 404 and "local folder" in response.json()["detail"], (method, path)


def _dicom_slices(count: int) -> list:
    """``count`` 32x32 CT slices of one series, as DICOM bytes."""
    import tempfile

    import SimpleITK as sitk

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    slices = []
    for k in range(count):
        image = sitk.GetImageFromArray(np.arange(32 * 32, dtype=np.int16).reshape(32, 32) + k)
        for tag, value in {"0008|0060": "CT", "0020|000e": "1.2.3.9", "0020|000d": "1.2.3.9.1",
                           "0008|0018": f"1.2.3.9.{k + 1}", "0020|0013": str(k + 1),
                           "0020|0032": f"0\\0\\{k * 2.0}", "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
            image.SetMetaData(tag, value)
        with tempfile.TemporaryDirectory() as folder:
            writer.SetFileName(f"{folder}/s.dcm")
            writer.Execute(image)
            with open(f"{folder}/s.dcm", "rb") as handle:
                slices.append(handle.read())
    return slices


def test_image_of_a_session_of_several_files_is_409(server):
    files = [("files", (f"{k}.dcm", data)) for k, data in enumerate(_dicom_slices(2))]
    created = _call(server, "PUT", "/session/", files=files)
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    response = _call(server, "GET", f"/session/{session_id}", params={"image": "true"})
    assert response.status_code == 409 and "2 files" in response.json()["detail"]
    assert _call(server, "GET", f"/session/{session_id}").status_code == 200
    assert _call(server, "GET", "/session/nope", params={"image": "true"}).status_code == 404


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd"])
def test_result_dtype_int64_works_for_every_single_file_format(server, extension):
    params = {**CLICK, "result_extension": extension, "result_dtype": "int64"}
    response = _call(server, "POST", f"/infer/{MODEL}", params={"image": "t2", "output": "image"},
                     data={"params": json.dumps(params)})
    assert response.status_code == 200, response.text[:300]
    if extension.startswith(".nii"):
        import gzip

        data = gzip.decompress(response.content) if extension == ".nii.gz" else response.content
        image = nib.Nifti1Image.from_bytes(data)
        assert image.get_data_dtype() == np.int64
        assert int(np.asarray(image.dataobj).max()) == 1


def test_result_dtype_int64_as_mha_is_refused_with_a_reason(server):
    params = {**CLICK, "result_extension": ".mha", "result_dtype": "int64"}
    response = _call(server, "POST", f"/infer/{MODEL}", params={"image": "t2", "output": "image"},
                     data={"params": json.dumps(params)})
    assert response.status_code == 422 and "int64 cannot be written as .mha" in response.text


HOSTILE_NAMES = ["a\u202egpj.exe", "t\u200b2", "a\u2215b", "a\uff0fb", "..\u2215x", "\u2025", "a\u0000b", "a\x1bb",
                 "x" * 10_000, "t2\u00a0", "\ufeff t2", "cafe\u0301x", "a\u2028b", "\U000f0000", "%2e%2e%2f"]


def _probe(server):
    label = ("l.nii.gz", server.label_bytes)
    upload = ("x.nii.gz", (server.studies / "t2.nii.gz").read_bytes())
    for name in HOSTILE_NAMES:
        yield "GET", "/datastore/image", {"params": {"image": name}}
        yield "HEAD", "/datastore/image", {"params": {"image": name, "check_sum": name}}
        yield "GET", "/datastore/image/info", {"params": {"image": name}}
        yield "GET", "/datastore/label", {"params": {"label": name, "tag": "final"}}
        yield "GET", "/datastore/label/info", {"params": {"label": "t2", "tag": name}}
        yield "PUT", "/datastore/label", {"params": {"image": "t2", "tag": name}, "files": {"label": label}}
        yield "PUT", "/datastore/image", {"params": {"image": name}, "files": {"file": upload}}
        yield "DELETE", "/datastore/label", {"params": {"id": name, "tag": "final"}}
        yield "POST", f"/infer/{MODEL}", {"params": {"image": name}, "data": {"params": json.dumps(CLICK)}}
        yield "GET", f"/session/{name}", {}
    for query in ({"output": "bogus"}, {"output": ""}):
        yield "GET", "/datastore/", {"params": query}
    for query in ({"lines": "-5"}, {"lines": "abc"}, {"lines": "0"}, {"refresh": "-1"}, {"lines": str(10 ** 12)},
                  {"html": "maybe"}):
        yield "GET", "/logs/", {"params": query}
    yield "GET", "/model/unknown", {}
    yield "GET", "/model/info/unknown", {}
    yield "GET", "/model/info/..", {}
    yield "PUT", "/session/", {}
    yield "PUT", "/session/", {"params": {"expiry": "-1"}, "files": {"files": upload}}
    yield "PUT", "/session/", {"params": {"expiry": str(10 ** 30)}, "files": {"files": upload}}
    yield "DELETE", "/session/nope", {}
    yield "HEAD", "/datastore/label", {"params": {"image": "nope", "tag": "final"}}
    yield "PUT", "/datastore/image/info", {"params": {"image": "t2"}, "data": {"info": "{" * 5000}}
    yield "PUT", "/datastore/image/info", {"params": {"image": "t2"}, "data": {"info": '{"a": NaN}'}}
    yield "PUT", "/datastore/image/info", {"params": {"image": "t2"}, "files": {"info": ("i.json", b"{}")}}
    yield "PUT", "/datastore/label", {"params": {"image": "t2"}, "data": {"params": "[]"}, "files": {"label": label}}
    yield "POST", "/train/", {"json": [1, 2]}
    yield "POST", f"/train/{MODEL}", {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}
    yield "POST", "/activelearning/random", {"json": "x"}
    yield "POST", "/scoring/", {"json": {"sam_med3d_uncertainty": 5}}
    yield "DELETE", "/train/", {"params": {"id": "nope"}}
    yield "GET", "/train/", {"params": {"all": "maybe", "check_if_running": "x"}}
    yield "GET", "/ohif/%2e%2e/%2e%2e/etc/passwd", {}
    yield "GET", "/static/../../config.py", {}
    yield "POST", "/batch/infer/sam_med3d", {"json": {"images": "all", "label_tag": "a\u202eb"}}
    for body in ({"label_tag": 5}, {"labels": "x"}, {"label_tag": ["final"]}, {"x": "\u202e" * 1000}):
        yield "POST", "/activelearning/random", {"json": body}
        yield "POST", "/activelearning/first", {"json": body}
    for body in ({"images": 5},):
        yield "POST", "/batch/infer/sam_med3d", {"json": body, "params": {"run_sync": "false"}}
    yield "POST", f"/infer/{MODEL}", {"params": {"image": "t2", "output": "dicom_seg"}}
    yield "GET", "/datastore/image", {"params": [("image", "t2"), ("image", "../x")]}
    # Bodies that break parsers rather than checks: nesting deeper than Python's recursion limit, a huge click
    # list, multipart without a boundary or with the fields twice.
    deep = "[" * 100_000 + "]" * 100_000
    yield "POST", f"/infer/{MODEL}", {"params": {"image": "t2"}, "data": {"params": deep}}
    yield "POST", f"/infer/{MODEL}", {"params": {"image": "t2"},
                                      "data": {"params": json.dumps(dict(CLICK, spleen=[[1, 2, 3]] * 200_000))}}
    yield "PUT", "/datastore/image/info", {"params": {"image": "t2"}, "data": {"info": deep}}
    yield "PUT", "/datastore/label", {"params": {"image": "t2"}, "data": {"params": deep}, "files": {"label": label}}
    for path in (f"/train/{MODEL}", "/activelearning/random", "/scoring/sam_med3d_uncertainty",
                 "/batch/infer/sam_med3d"):
        yield "POST", path, {"data": deep, "headers": {"Content-Type": "application/json"}}
    yield "POST", f"/infer/{MODEL}", {"params": {"image": "t2"}, "data": b"--x\r\n",
                                      "headers": {"Content-Type": "multipart/form-data"}}
    yield "PUT", "/datastore/image", {"params": {"image": "twice"}, "data": b"garbage",
                                      "headers": {"Content-Type": "multipart/form-data; boundary=zz"}}
    yield "POST", f"/infer/{MODEL}", {"params": {"image": "t2"},
                                      "data": [("params", json.dumps(CLICK)), ("params", "[]")]}


def test_hostile_probe_never_gets_a_5xx(server):
    failures, count = [], 0
    for method, path, kwargs in _probe(server):
        count += 1
        try:
            response = _call(server, method, path, **kwargs)
        except requests.RequestException as err:
            failures.append((method, path, str(kwargs.get("params"))[:80], type(err).__name__))
            continue
        if response.status_code >= 500:
            failures.append((method, path, str(kwargs.get("params"))[:80], response.status_code,
                             response.text[:120]))
    assert _call(server, "GET", "/info/").status_code == 200
    assert not failures, f"{len(failures)} of {count} requests answered 5xx: {failures}"
    images = _call(server, "GET", "/datastore/", params={"output": "all"}).json()["objects"]
    # Of the hostile names, only two are plain names, and their uploads valid scans: stored, the NFD one as NFC.
    assert sorted(images) == sorted(["t2", "caf\u00e9", "%2e%2e%2f", unicodedata.normalize("NFC", "cafe\u0301x")])
    assert "caf\u00e9x.nii.gz" in {p.name for p in server.studies.iterdir()}
