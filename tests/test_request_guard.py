"""No file access through the API: every traversal / read / write / delete attempt of docs/reliability.md against
ONE real server (``monailabel start_server`` on 127.0.0.1, vit_mini weights, a tmp copy of three studies).

Each hostile request must be answered 4xx with a message naming the problem, and must change nothing: a
sentinel folder beside the studies folder (with a scan and a folder that ``rmtree`` would remove), the studies
folder itself and the served app's code are compared file by file (size and mtime) before and after. Good
requests (a valid upload, a label save that keeps the previous version, a click by image id) still work, and
the server keeps answering after every refusal.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests

from app_helpers import copy_app, copy_studies, mini_conf, start_server

CASES = {"t2": ("sct_spinalcord_mri", "t2"), "t1w": ("sct_spinalcord_mri", "t1w")}
MODEL = "sam_med3d"
CLICK = {"spleen": [[30, 27, 26]], "liver": [], "background": [], "label": "spleen"}
TIMEOUT = 120


def _snapshot(*folders: Path) -> dict:
    files = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.name != ".lock":
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
            elif path.is_dir():
                files[str(path)] = "dir"
    return files


@pytest.fixture(scope="module")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("request_guard")
    app = copy_app(root / "app")
    studies = copy_studies(root / "studies", data_dir, CASES)
    outside = root / "outside"
    (outside / "victim_dir").mkdir(parents=True)
    (outside / "victim_dir" / "precious.txt").write_text("must survive rmtree")
    shutil.copy(data_dir / "sct_spinalcord_mri" / "imagesTr" / "t2.nii.gz", outside / "secret.nii.gz")
    shutil.copy(data_dir / "sct_spinalcord_mri" / "labelsTr" / "t2.nii.gz", outside / "secret_label.nii.gz")
    # A folder that, on a subprocess' Python path, would run its sitecustomize.py (writing a marker file).
    pydir = root / "pydir"
    pydir.mkdir()
    (pydir / "sitecustomize.py").write_text(f"open({str(root / 'PWNED')!r}, 'w').write('ran')\n")
    srv = start_server(app, studies, mini_conf(mini_checkpoint), log_path=root / "server.log",
                       env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
                            "MONAI_LABEL_SESSION_PATH": str(root / "sessions")})
    srv.root, srv.app, srv.studies, srv.outside, srv.pydir = root, app, studies, outside, pydir
    srv.weights = mini_checkpoint.parent
    srv.label_source = data_dir / "sct_spinalcord_mri" / "labelsTr" / "t2.nii.gz"
    yield srv
    srv.stop()


def _nifti_bytes(array: np.ndarray, affine=None) -> bytes:
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    return gzip.compress(img.to_bytes())


def _tar_with_escaping_members(outside: Path) -> bytes:
    """A tar whose members escape the folder it is unpacked into (MONAI Label unpacks into a folder directly
    under the temp folder), aimed at the test's own ``outside`` folder so that a failure is seen and stays there."""
    relative = os.path.relpath(outside / "escaped_relative.txt", os.path.join(tempfile.gettempdir(), "unpack"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in (relative, str(outside / "escaped_absolute.txt")):
            data = b"escaped"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _attempts(srv):
    """(name, method, path, kwargs, expected message part) for every hostile request listed in docs/reliability.md."""
    secret = str(srv.outside / "secret.nii.gz")
    secret_label = str(srv.outside / "secret_label.nii.gz")
    victim = str(srv.outside / "victim_dir")
    scan = (srv.studies / "t1w.nii.gz").read_bytes()
    label = srv.label_source.read_bytes()
    params = json.dumps(CLICK)
    return [
        ("infer an absolute path", "POST", f"/infer/{MODEL}", dict(params={"image": secret, "output": "json"},
                                                                   data={"params": params}), "not a path"),
        ("infer a relative path", "POST", f"/infer/{MODEL}", dict(params={"image": "../outside/secret"},
                                                                  data={"params": params}), "not a path"),
        ("infer an unknown id", "POST", f"/infer/{MODEL}", dict(params={"image": "nope"}, data={"params": params}),
         "not found in the datastore"),
        ("params.image overrides the image", "POST", f"/infer/{MODEL}",
         dict(params={"image": "t2"}, data={"params": json.dumps({**CLICK, "image": secret})}), "params.image"),
        ("params.label as a server path", "POST", f"/infer/{MODEL}",
         dict(params={"image": "t2", "output": "json"},
              data={"params": json.dumps({**CLICK, "label": secret_label})}), "params.label"),
        ("infer upload named .sh", "POST", f"/infer/{MODEL}",
         dict(files={"file": ("x.sh", scan)}, data={"params": params}), "extension"),
        ("infer session id traversal", "POST", f"/infer/{MODEL}",
         dict(params={"session_id": "../../outside"}, data={"params": params}), "session_id"),
        ("upload image to ../outside/evil as x.sh", "PUT", "/datastore/image",
         dict(params={"image": "../outside/evil"}, files={"file": ("x.sh", b"#!/bin/sh\necho pwned\n")}),
         "not a path"),
        ("upload an .sh file", "PUT", "/datastore/image", dict(params={"image": "evil"},
                                                               files={"file": ("x.sh", b"echo pwned\n")}), "extension"),
        ("upload a .py over the app's code", "PUT", "/datastore/image",
         dict(params={"image": "../app/lib/activelearning/__init__"},
              files={"file": ("__init__.py", b"open('/tmp/pwned','w')\n")}), "not a path"),
        # Clients send local paths as upload names; only the last component counts (and is checked).
        ("upload with a path as file name", "PUT", "/datastore/image",
         dict(files={"file": ("../../outside/evil.sh", scan)}), "extension"),
        ("upload named ..", "PUT", "/datastore/image", dict(files={"file": ("/abs/..", scan)}), "'..'"),
        ("label tag ..", "PUT", "/datastore/label", dict(params={"image": "t2", "tag": ".."},
                                                         files={"label": ("l.nii.gz", label)}), "'..'"),
        ("label tag ../../somewhere", "PUT", "/datastore/label",
         dict(params={"image": "t2", "tag": "../../somewhere"}, files={"label": ("l.nii.gz", label)}), "not a path"),
        ("label for an image outside", "PUT", "/datastore/label",
         dict(params={"image": "../outside/secret"}, files={"label": ("l.nii.gz", label)}), "not a path"),
        ("label for an unknown image", "PUT", "/datastore/label",
         dict(params={"image": "nope"}, files={"label": ("l.nii.gz", label)}), "not in the datastore"),
        ("label upload named .py", "PUT", "/datastore/label",
         dict(params={"image": "t2"}, files={"label": ("evil.py", label)}), "extension"),
        ("delete an absolute directory", "DELETE", "/datastore/image", dict(params={"id": victim}), "not a path"),
        ("delete ..", "DELETE", "/datastore/image", dict(params={"id": ".."}), "'..'"),
        ("delete an unknown image", "DELETE", "/datastore/image", dict(params={"id": "nope"}), "not in the datastore"),
        ("delete a label with a traversing tag", "DELETE", "/datastore/label",
         dict(params={"id": "t2", "tag": "../../outside"}), "not a path"),
        ("download a server file", "GET", "/datastore/image", dict(params={"image": "/etc/passwd"}), "not a path"),
        ("download a label by path", "GET", "/datastore/label", dict(params={"label": "../x", "tag": "final"}),
         "not a path"),
        ("training run name ../../x", "POST", f"/train/{MODEL}", dict(json={"name": "../../x"}), "run name"),
        ("training run name nested", "POST", "/train/", dict(json={MODEL: {"name": "../../x"}}), "run name"),
        ("training bundle_path", "POST", f"/train/{MODEL}", dict(json={"bundle_path": str(srv.pydir)}), "Python path"),
        ("training MLflow file URI", "POST", f"/train/{MODEL}",
         dict(json={"tracking": "mlflow", "tracking_uri": f"file://{srv.outside}"}), "tracking_uri"),
        ("scoring bundle_path", "POST", "/scoring/sam_med3d_uncertainty",
         dict(json={"bundle_path": str(srv.pydir)}), "Python path"),
        ("all scoring bundle_path", "POST", "/scoring/", dict(json={"bundle_path": str(srv.pydir)}), "Python path"),
        ("active learning bundle_path", "POST", "/activelearning/random",
         dict(json={"bundle_path": str(srv.pydir)}), "Python path"),
        ("batch infer label_tag", "POST", f"/batch/infer/{MODEL}", dict(json={"label_tag": "../../x"}), "not a path"),
        ("session tar escaping", "PUT", "/session/",
         dict(params={"uncompress": "true"}, files={"files": ("x.tar", _tar_with_escaping_members(srv.outside))}), "uncompress"),
        ("session upload named ..", "PUT", "/session/", dict(files={"files": ("..", scan)}), "'..'"),
        ("session id ..", "DELETE", "/session/%2E%2E", {}, "'..'"),
        ("replace the served model", "PUT", f"/model/{MODEL}", dict(files={"file": ("m.pt", b"x")}), "model files"),
        ("delete the served model", "DELETE", f"/model/{MODEL}", {}, "model files"),
        ("ohif traversal", "GET", "/ohif/%2E%2E/%2E%2E/config.py", {}, "'..'"),
        ("wsi infer of a path", "POST", f"/infer/wsi/{MODEL}", dict(params={"image": secret}), "not a path"),
        ("NUL in an id", "GET", "/datastore/image/info", dict(params={"image": "t2\x00.sh"}), "control characters"),
    ]


def _request(srv, method, path, kwargs) -> requests.Response:
    # Build the URL by hand so that requests/urllib3 do not normalise the dot segments away.
    return requests.request(method, srv.url + path, timeout=TIMEOUT, **kwargs)


def test_every_traversal_read_write_delete_attempt_fails_and_touches_nothing(server):
    watched = (server.outside, server.studies, server.app / "lib", server.pydir, server.weights)
    failures = []
    for name, method, path, kwargs, message in _attempts(server):
        before = _snapshot(*watched)
        response = _request(server, method, path, kwargs)
        after = _snapshot(*watched)
        detail = ""
        try:
            detail = str(response.json().get("detail", ""))
        except ValueError:
            pass
        if not 400 <= response.status_code < 500:
            failures.append(f"{name}: status {response.status_code} {response.text[:200]}")
        elif message not in detail:
            failures.append(f"{name}: message {detail!r} lacks {message!r}")
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            failures.append(f"{name}: files changed: {changed[:4]}")
    # Nothing was written next to the studies folder, nothing ran from the uploaded folder.
    assert not (server.root / "PWNED").exists()
    assert {p.name for p in server.root.iterdir()} <= {"app", "outside", "pydir", "server.log", "studies", "sessions"}
    assert (server.outside / "victim_dir" / "precious.txt").read_text() == "must survive rmtree"
    assert not failures, "\n".join(failures)
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


# The kinds of bad scan (2D, 4D, NaN, ...) are refused by the datastore, each checked in test_datastore_safety.py;
# here the route's answer, and a bomb's memory.
@pytest.mark.parametrize("kind, status, message", [
    ("text", 422, "could not be read"),
    ("bomb", 413, "max_voxels"),
])
def test_bad_image_uploads_are_refused_by_the_server(server, kind, status, message):
    if kind == "text":
        body = b"not an image at all\n"
    else:
        body = _bomb()
        assert len(body) < 2 << 20  # about 1 MB on the wire
    before = _snapshot(server.studies)
    memory_before = _server_rss(server)
    response = requests.put(f"{server.url}/datastore/image", params={"image": f"bad_{kind}"},
                            files={"file": (f"bad_{kind}.nii.gz", body)}, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert _snapshot(server.studies) == before
    if kind == "bomb":  # refused from the header: the 1 GiB of voxels was never decompressed
        assert _server_rss(server) - memory_before < 256 << 20


def _bomb() -> bytes:
    """A complete, valid .nii.gz of 1024^3 uint8 zeros (1 GiB decompressed), compressed chunk by chunk."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((1024, 1024, 1024))
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    parts = [compressor.compress(header.binaryblock + b"\0" * 4)]
    chunk = b"\0" * (16 << 20)
    for _ in range(64):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts)


def _server_rss(server) -> int:
    """Resident memory of the server's process tree (the launcher and the Python server it starts)."""
    root = psutil.Process(server.process.pid)
    total = 0
    for process in [root] + root.children(recursive=True):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_a_label_on_another_grid_is_refused_by_the_server(server):
    """The route's answer; every kind of bad label (fractional, negative, NaN, ...) is in test_datastore_safety.py."""
    image = nib.load(str(server.studies / "t1w.nii.gz"))
    before = _snapshot(server.studies)
    wrong = _nifti_bytes(np.zeros((5, 5, 5), np.uint8), image.affine)
    response = requests.put(f"{server.url}/datastore/label", params={"image": "t1w"},
                            files={"label": ("l.nii.gz", wrong)}, timeout=TIMEOUT)
    assert response.status_code == 422 and "has shape" in response.json()["detail"], response.text
    assert _snapshot(server.studies) == before


def test_good_requests_still_work_and_label_history_is_kept(server):
    # A valid upload lands in the studies folder under its id.
    scan = (server.studies / "t1w.nii.gz").read_bytes()
    response = requests.put(f"{server.url}/datastore/image", params={"image": "uploaded"},
                            files={"file": ("any name.nii.gz", scan)}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert (server.studies / "uploaded.nii.gz").read_bytes() == scan
    # Saving a label twice keeps the first version in the history folder.
    first = server.label_source.read_bytes()
    image = nib.load(str(server.studies / "t2.nii.gz"))
    second_array = np.zeros(image.shape, np.uint8)
    second_array[20:30, 20:30, 20:30] = 2
    second = _nifti_bytes(second_array, image.affine)
    for body in (first, second):
        response = requests.put(f"{server.url}/datastore/label", params={"image": "t2"},
                                files={"label": ("t2.nii.gz", body)}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
    assert (server.studies / "labels" / "final" / "t2.nii.gz").read_bytes() == second
    kept = list((server.studies / ".history" / "labels" / "final" / "t2").iterdir())
    assert [p.read_bytes() for p in kept] == [first]
    # Deleting it archives it; the label is gone and nothing superseded comes back.
    response = requests.delete(f"{server.url}/datastore/label", params={"id": "t2", "tag": "final"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert not list((server.studies / "labels" / "final").glob("t2.*"))
    assert requests.head(f"{server.url}/datastore/label", params={"image": "t2", "tag": "final"},
                         timeout=TIMEOUT).status_code == 404
    assert len(list((server.studies / ".history" / "labels" / "final" / "t2").iterdir())) == 2
    # A click by datastore id is still answered.
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "t2", "output": "json"},
                             data={"params": json.dumps(CLICK)}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    # Deleting the uploaded image removes only it (kept in the history).
    response = requests.delete(f"{server.url}/datastore/image", params={"id": "uploaded"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert not (server.studies / "uploaded.nii.gz").exists() and (server.studies / "t1w.nii.gz").exists()
    assert len(list((server.studies / ".history" / "images" / "uploaded").iterdir())) == 1
