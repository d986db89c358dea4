"""Files the real server reads: no header leads it to another file, every file is held to the voxel cap, no link
leads it out of the studies folder, and no request leaves a file in the temporary folder.

ONE ``monailabel start_server`` (vit_mini weights, ``--conf max_voxels 200000``, its own ``TMPDIR``) on a
studies folder holding breast1 (45x120x21, from ``../shared/data``) with its label, a link to a scan outside
the folder and a label-tag folder linked outside. A "secret" file outside the studies folder holds a byte
pattern that must never come back in an answer. Each attack is answered 4xx with a message naming the problem;
after each, ``/info/`` answers, the studies and outside folders are unchanged and the server's temporary
folder holds nothing new. The tests run in file order (about 40 s here).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
import SimpleITK as sitk

from app_helpers import copy_app, start_server

MODEL = "sam_med3d"
SHAPE = (45, 120, 21)  # breast1
MAX_VOXELS = 200_000
#: The secret's byte pattern: "SECRET" is never a run of label values a mask of breast1 would hold.
PATTERN = b"SECRET-PATTERN-"
CLICK = {"spleen": [[20, 60, 10]], "label": "spleen"}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("file_safety")
    app = copy_app(root / "app")
    studies, outside, tmp = root / "studies", root / "outside", root / "tmp"
    for folder in (studies, outside, tmp):
        folder.mkdir()
    images = data_dir / "pyradiomics_mri_tumor"
    shutil.copy(images / "imagesTr" / "breast1.nii.gz", studies / "breast1.nii.gz")
    (outside / "secret.bin").write_bytes(PATTERN * (2 * int(np.prod(SHAPE)) // len(PATTERN)))
    shutil.copy(images / "imagesTr" / "breast1.nii.gz", outside / "private.nii.gz")
    os.symlink(outside / "private.nii.gz", studies / "leak.nii.gz")
    (studies / "labels").mkdir()
    os.symlink(outside, studies / "labels" / "evil")
    srv = start_server(app, studies, {"model": "vit_mini", "checkpoint": str(mini_checkpoint),
                                      "labels": "spleen=1,liver=2", "device": "cpu", "preload": "true",
                                      "extension": "off", "max_voxels": str(MAX_VOXELS)},
                       log_path=root / "server.log",
                       env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "TMPDIR": str(tmp),
                            "MONAI_LABEL_DATASTORE_FILE_EXT": '["*.nii.gz", "*.nii", "*.nrrd", "*.mha"]',
                            "MONAI_LABEL_SESSION_PATH": str(root / "sessions")})
    srv.root, srv.studies, srv.outside, srv.tmp = root, studies, outside, tmp
    with open(images / "labelsTr" / "breast1.nii.gz", "rb") as f:
        response = requests.put(f"{srv.url}/datastore/label", params={"image": "breast1", "tag": "final"},
                                files={"label": ("breast1.nii.gz", f)}, timeout=60)
    assert response.status_code == 200, response.text
    yield srv
    srv.stop()


@pytest.fixture()
def unchanged(server):
    """Nothing in the studies folder, outside it or in the server's temporary folder changes during the test."""
    before = (_snapshot(server.studies), _snapshot(server.outside), sorted(os.listdir(server.tmp)))
    yield
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    after = (_snapshot(server.studies), _snapshot(server.outside), sorted(os.listdir(server.tmp)))
    assert after[0] == before[0], "the studies folder changed"
    assert after[1] == before[1], "the folder outside the studies changed"
    assert after[2] == before[2], f"left in the temporary folder: {set(after[2]) - set(before[2])}"


def _secret(server) -> Path:
    return server.outside / "secret.bin"


def _nrrd(data_line: str, sizes=SHAPE, encoding="raw") -> bytes:
    return (f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {' '.join(map(str, sizes))}\nencoding: {encoding}\n"
            f"space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
            f"{data_line}\n\n").encode()


def _mha(data_file: str, dims=SHAPE) -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, dims))}\nElementType = MET_UCHAR\n"
            f"ElementDataFile = {data_file}\n").encode()


def _attacks(server) -> dict:
    """name -> (upload file name, bytes): headers that make ITK or nibabel read another file."""
    secret = _secret(server)
    pair = nib.Nifti1Pair(np.zeros(SHAPE, np.uint8), np.eye(4))
    return {
        "nrrd_data_file": ("evil.nrrd", _nrrd(f"data file: {secret}")),
        "nrrd_datafile_upper_case": ("evil.NRRD", _nrrd(f"DATAFILE: {secret}")),
        "nrrd_data_file_list": ("evil.nrrd", _nrrd(f"data file: LIST\n{secret}")),
        "nrrd_byte_skip_paging": ("evil.nrrd", _nrrd(f"byte skip: 30\ndata file: {secret}")),
        "mha_element_data_file": ("evil.mha", _mha(str(secret))),
        "mha_server_environment": ("env.mha", _mha("/proc/self/environ", dims=(8, 8, 1))),
        "nifti_pair_header_as_nii": ("pair.nii", pair.header.binaryblock),
        "nrrd_inside_a_nii_gz": ("evil.nii.gz", gzip.compress(_nrrd(f"data file: {secret}"))),
        "hdr_img_pair_name": ("pair.hdr", pair.header.binaryblock),
        "mhd_name": ("evil.mhd", _mha(str(secret))),
        "nhdr_name": ("evil.nhdr", _nrrd(f"data file: {secret}")),
    }


ATTACKS = ["nrrd_data_file", "nrrd_datafile_upper_case", "nrrd_data_file_list", "nrrd_byte_skip_paging",
           "mha_element_data_file", "mha_server_environment", "nifti_pair_header_as_nii", "nrrd_inside_a_nii_gz",
           "hdr_img_pair_name", "mhd_name", "nhdr_name"]


def _no_leak(response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert PATTERN[:6] not in response.content
    assert b"PATH=" not in response.content and b"HOME=" not in response.content


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_label_uploaded_with_a_click_never_reads_another_file(server, unchanged, attack):
    name, data = _attacks(server)[attack]
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "breast1", "output": "all"},
                             data={"params": json.dumps(CLICK)}, files={"label": (name, data)}, timeout=120)
    _no_leak(response)
    assert any(s in response.json()["detail"] for s in ("another file", "not a NIfTI", "extension", "must be a")), \
        response.text


@pytest.mark.parametrize("attack", ATTACKS)
def test_an_image_uploaded_with_a_click_never_reads_another_file(server, unchanged, attack):
    name, data = _attacks(server)[attack]
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"output": "all"},
                             data={"params": json.dumps(CLICK)}, files={"file": (name, data)}, timeout=120)
    _no_leak(response)


def test_a_2d_image_uploaded_with_a_click_is_refused_and_not_kept(server, unchanged):
    flat = gzip.compress(nib.Nifti1Image(np.ones((40, 40, 1), np.float32), np.eye(4)).to_bytes())
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"output": "json"},
                             data={"params": json.dumps({"spleen": [[2, 2, 0]], "label": "spleen"})},
                             files={"file": ("flat.nii.gz", flat)}, timeout=120)
    assert response.status_code == 422 and "2D image" in response.json()["detail"], response.text


@pytest.mark.parametrize("attack", ATTACKS)
def test_datastore_uploads_never_store_a_header_naming_another_file(server, unchanged, attack):
    name, data = _attacks(server)[attack]
    response = requests.put(f"{server.url}/datastore/image", params={"image": "evil"},
                            files={"file": (name, data)}, timeout=60)
    _no_leak(response)
    response = requests.put(f"{server.url}/datastore/label", params={"image": "breast1", "tag": "final"},
                            files={"label": (name, data)}, timeout=60)
    _no_leak(response)
    assert "evil" not in requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).text


def _server_memory_mb(server) -> float:
    process = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [process] + process.children(recursive=True)) / 2 ** 20


@pytest.mark.parametrize("kind", ["nrrd", "mha"])
def test_huge_headers_are_refused_before_anything_is_allocated(server, unchanged, kind):
    """About 1 MB claiming 1024^3 voxels, as a label with a click, an image with a click and both datastore
    uploads: 413 each, and the server grows by less than 256 MiB (decoding one would take 1 GiB)."""
    payload = gzip.compress(b"\0" * (1 << 20))
    if kind == "nrrd":
        data = _nrrd("", sizes=(1024, 1024, 1024), encoding="gzip") + payload
    else:
        data = _mha("LOCAL", dims=(1024, 1024, 1024)).replace(b"ElementDataFile", b"CompressedData = True\n"
                                                              b"ElementDataFile") + payload
    name = f"huge.{kind}"
    before = _server_memory_mb(server)
    answers = [
        requests.post(f"{server.url}/infer/{MODEL}", params={"image": "breast1"},
                      data={"params": json.dumps(CLICK)}, files={"label": (name, data)}, timeout=120),
        requests.post(f"{server.url}/infer/{MODEL}", data={"params": json.dumps(CLICK)},
                      files={"file": (name, data)}, timeout=120),
        requests.put(f"{server.url}/datastore/image", params={"image": "huge"}, files={"file": (name, data)},
                     timeout=60),
        requests.put(f"{server.url}/datastore/label", params={"image": "breast1"}, files={"label": (name, data)},
                     timeout=60),
    ]
    for response in answers:
        assert response.status_code == 413, response.text
        assert "1073741824 voxels" in response.json()["detail"], response.text
    assert _server_memory_mb(server) - before < 256


def _dicom_files(slices: int, size: int = 128) -> list:
    """A CT series of ``slices`` files of ``size``^2 voxels, as (name, bytes) uploads."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.99"
    rng = np.random.default_rng(0)
    files = []
    for k in range(slices):
        slc = sitk.GetImageFromArray(rng.integers(0, 1000, (size, size)).astype(np.int16))
        for tag, value in {"0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".1",
                           "0008|0018": f"{series}.{k + 1}", "0020|0013": str(k + 1),
                           "0020|0032": f"0\\0\\{k * 2.0}", "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
            slc.SetMetaData(tag, value)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "slice.dcm"
            writer.SetFileName(str(path))
            writer.Execute(slc)
            files.append((f"slice{k:03d}.dcm", path.read_bytes()))
    return files


def test_a_dicom_series_uploaded_as_a_session_is_held_to_max_voxels(server):
    """16 slices of 128^2 = 262144 voxels > 200000: 413 when the session is created (MONAI Label created it, the
    series was read at the first click whatever its size); 8 slices work."""
    files = [("files", (name, data)) for name, data in _dicom_files(16)]
    created = requests.put(f"{server.url}/session/", files=files, timeout=60)
    assert created.status_code == 413, created.text
    assert "262144 voxels" in created.json()["detail"]
    files = [("files", (name, data)) for name, data in _dicom_files(8)]
    created = requests.put(f"{server.url}/session/", files=files, timeout=60)
    assert created.status_code == 200, created.text
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"session_id": created.json()["session_id"],
                                                                    "output": "json"},
                             data={"params": json.dumps({"spleen": [[64, 64, 4]], "label": "spleen"})}, timeout=180)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("attack", ["nrrd_data_file", "mha_server_environment", "nrrd_inside_a_nii_gz"])
def test_a_session_upload_never_reads_another_file(server, attack, unchanged):
    name, data = _attacks(server)[attack]
    created = requests.put(f"{server.url}/session/", files=[("files", (name, data))], timeout=60)
    _no_leak(created)
    assert created.status_code == 422, created.text
    assert ("another file" if attack != "nrrd_inside_a_nii_gz" else "not a NIfTI file") in created.json()["detail"]


def _multiframe_dicom(frames: int, size: int = 40) -> bytes:
    """One DICOM file holding a whole volume (multi-frame), as ITK writes a 3D image."""
    img = sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 1000, (frames, size, size)).astype(np.uint16))
    img.SetSpacing((1.0, 1.0, 2.0))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "volume.dcm"
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(str(path))
        writer.Execute(img)
        return path.read_bytes()


def test_a_single_file_dicom_volume_makes_a_session_and_a_single_slice_is_refused(server):
    """MONAI Label kept one uploaded .dcm as the session's image file, which nothing could read (the first click
    was a 4xx): a multi-frame DICOM is now a session that clicks work on; one 2D slice is a 422 saying what to
    send instead."""
    created = requests.put(f"{server.url}/session/", files=[("files", ("volume.dcm", _multiframe_dicom(12)))],
                           timeout=60)
    assert created.status_code == 200, created.text
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"session_id": created.json()["session_id"],
                                                                    "output": "json"},
                             data={"params": json.dumps({"spleen": [[20, 20, 6]], "label": "spleen"})}, timeout=180)
    assert response.status_code == 200, response.text
    one_slice = _dicom_files(1)[0]
    refused = requests.put(f"{server.url}/session/", files=[("files", one_slice)], timeout=60)
    assert refused.status_code == 422 and "single 2D slice" in refused.json()["detail"], refused.text


def test_refused_session_uploads_leave_nothing_behind(server, unchanged):
    """Every refusal of PUT /session/ removes its uploads (MONAI Label left the folder whenever creation failed)
    and creates no session."""
    sessions = server.root / "sessions"
    before = sorted(os.listdir(sessions)) if sessions.exists() else []
    scan = (server.studies / "breast1.nii.gz").read_bytes()
    big = np.zeros((100, 100, 30), np.int16)
    big[0, 0, 0] = 1
    cases = [
        ({"files": [("files", ("big.nii.gz", gzip.compress(nib.Nifti1Image(big, np.eye(4)).to_bytes())))]}, 413),
        ({"files": [("files", ("a.nii.gz", scan)), ("files", ("b.nii.gz", scan))]}, 422),
        ({"files": [("files", ("a.nii.gz", scan)), ("files", ("s.dcm", _dicom_files(1)[0][1]))]}, 422),
        ({"files": [("files", ("a.nii.gz", scan))], "params": {"expiry": "-5"}}, 422),
        ({"files": [("files", ("a.nii.gz", b"not a scan"))]}, 422),
        ({"files": [("files", ("s.dcm", b"not dicom"))]}, 422),
        ({"files": [("files", ("s.dcm", b"x")), ("files", ("s.dcm", b"y"))]}, 422),
    ]
    for kwargs, expected in cases:
        response = requests.put(f"{server.url}/session/", timeout=60, **kwargs)
        assert response.status_code == expected, (kwargs.get("params"), response.status_code, response.text[:300])
        assert response.json()["detail"]
    assert (sorted(os.listdir(sessions)) if sessions.exists() else []) == before


def test_a_link_leading_outside_the_studies_folder_is_never_read_or_written(server, unchanged):
    listed = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "leak" not in json.dumps(listed) and "breast1" in json.dumps(listed)
    for method, path, kwargs in [
        ("GET", "/datastore/image", {"params": {"image": "leak"}}),
        ("POST", f"/infer/{MODEL}", {"params": {"image": "leak"}, "data": {"params": json.dumps(CLICK)}}),
    ]:
        response = requests.request(method, f"{server.url}{path}", timeout=60, **kwargs)
        assert 400 <= response.status_code < 500, response.text
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 50:70, 5:15] = 1
    body = gzip.compress(nib.Nifti1Image(label, nib.load(str(server.studies / "breast1.nii.gz")).affine).to_bytes())
    response = requests.put(f"{server.url}/datastore/label", params={"image": "breast1", "tag": "evil"},
                            files={"label": ("l.nii.gz", body)}, timeout=60)
    assert response.status_code == 403 and "outside the studies folder" in response.json()["detail"], response.text
    assert sorted(os.listdir(server.outside)) == ["private.nii.gz", "secret.bin"]


def test_refused_datastore_uploads_leave_nothing_in_the_temporary_folder(server, unchanged):
    """Ten refused uploads of 2 MB each (wrong grid, 2D, over the cap, not a scan): nothing stays behind (MONAI
    Label kept each one for good)."""
    noise = np.random.default_rng(1).integers(0, 255, (128, 128, 128), dtype=np.uint8)
    bad = {
        "grid": ("label.nii.gz", gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes(), compresslevel=1)),
        "flat": ("flat.nii.gz", gzip.compress(nib.Nifti1Image(noise[:, :, :1].copy(), np.eye(4)).to_bytes())),
        "text": ("text.nii.gz", os.urandom(2 << 20)),
    }
    for name, data in list(bad.values()) * 3 + [bad["grid"]]:
        label = requests.put(f"{server.url}/datastore/label", params={"image": "breast1"},
                             files={"label": (name, data)}, timeout=60)
        image = requests.put(f"{server.url}/datastore/image", params={"image": "breast1"},  # exists: 409
                             files={"file": (name, data)}, timeout=60)
        assert 400 <= label.status_code < 500 and 400 <= image.status_code < 500, (label.text, image.text)


def test_dataset_download_is_a_zip_streamed_without_a_file(server, unchanged):
    response = requests.get(f"{server.url}/datastore/dataset", timeout=60)
    assert response.status_code == 200, response.text
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = sorted(archive.namelist())
    assert names == ["image/breast1.nii.gz", "label/breast1.nii.gz", "metadata.json"]
    assert archive.read("image/breast1.nii.gz") == (server.studies / "breast1.nii.gz").read_bytes()
    assert "breast1" in json.loads(archive.read("metadata.json"))["objects"]


def test_upper_case_extension_keeps_one_current_label_and_delete_works(server):
    label = np.zeros(SHAPE, np.uint8)
    label[10:20, 50:70, 5:15] = 2
    body = gzip.compress(nib.Nifti1Image(label, nib.load(str(server.studies / "breast1.nii.gz")).affine).to_bytes())
    for name in ("SHOUT.NII.GZ", "again.nii.gz"):
        response = requests.put(f"{server.url}/datastore/label", params={"image": "breast1", "tag": "upper"},
                                files={"label": (name, body)}, timeout=60)
        assert response.status_code == 200, response.text
        assert os.listdir(server.studies / "labels" / "upper") == ["breast1.nii.gz"]
    response = requests.delete(f"{server.url}/datastore/label", params={"id": "breast1", "tag": "upper"}, timeout=60)
    assert response.status_code == 200, response.text
    assert os.listdir(server.studies / "labels" / "upper") == []


@pytest.mark.parametrize("body", [
    {"train_ds": "/etc/passwd"},
    {"val_ds": [{"image": "/etc/hostname", "label": "/etc/hostname"}]},
    {"train_ds": [{"image": "x", "label": "y"}], "max_epochs": 1},
])
def test_train_requests_never_name_their_own_datalist(server, unchanged, body):
    for path, sent in ((f"/train/{MODEL}", body), ("/train/", {MODEL: body})):
        response = requests.post(f"{server.url}{path}", json=sent, timeout=60)
        assert response.status_code == 422, response.text
        assert "_ds" in response.json()["detail"], response.text  # names train_ds / val_ds


def test_a_header_that_crashed_itk_is_refused_and_the_server_keeps_serving(server, unchanged):
    """An NRRD of 16 dimensions made ITK end the server's process (a segmentation fault) wherever it was read:
    a datastore upload, a click's image or label, a session."""
    data = (b"NRRD0004\ntype: uint8\ndimension: 16\nsizes: " + b" ".join([b"2"] * 16) + b"\nencoding: raw\n\n"
            + bytes(1 << 16))
    calls = [("PUT", "/datastore/image", {"params": {"image": "crash"}, "files": {"file": ("c.nrrd", data)}}),
             ("PUT", "/datastore/label", {"params": {"image": "breast1", "tag": "final"},
                                          "files": {"label": ("c.nrrd", data)}}),
             ("POST", f"/infer/{MODEL}", {"params": {"image": "breast1"}, "data": {"params": json.dumps(CLICK)},
                                          "files": {"label": ("c.nrrd", data)}}),
             ("PUT", "/session/", {"files": [("files", ("c.nrrd", data))]})]
    for method, path, kwargs in calls:
        response = requests.request(method, f"{server.url}{path}", timeout=60, **kwargs)
        assert response.status_code == 422 and "16 dimensions" in response.json()["detail"], (path, response.text)
        assert server.process.poll() is None, f"the server ended after {method} {path}"
