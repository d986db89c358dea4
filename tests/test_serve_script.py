"""``scripts/serve.sh`` is safe by default: it listens on 127.0.0.1 only, and the app lets only the web origins
of ``--conf cors_origins`` read its answers (MONAI Label alone answers any origin, with credentials).

The README's main command is started as a user would, on a studies folder with one small synthetic scan
(so no phantoms are generated) and the bundled model, on a free port; everything is stopped at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from app_helpers import REPO, free_port

VIEWER = "http://viewer.example.org:3000"  # the one foreign origin the fixture's server allows


def _other_address() -> str:
    """A non-loopback IPv4 address of this machine, or '' when it has none."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return next((a for a in out if "." in a and not a.startswith("127.")), "")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_sh")
    studies = root / "studies"
    studies.mkdir()
    volume = np.random.default_rng(0).normal(100, 20, (40, 40, 30)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 1.5, 1.0])), str(studies / "scan.nii.gz"))
    port = free_port()
    env = dict(os.environ, STUDIES=str(studies), PORT=str(port), MONAI_LABEL_AUTO_UPDATE_SCORING="false")
    env.pop("HOST", None)
    env.pop("MONAI_LABEL_CORS_ORIGINS", None)
    log = open(root / "serve.log", "wb")
    process = subprocess.Popen(["bash", str(REPO / "scripts" / "serve.sh"), "--conf", "checkpoint", "bundled",
                                "--conf", "model_dir", str(root / "model"),
                                "--conf", "cors_origins", VIEWER],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (root / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "serve.sh did not answer within 300 s"
            time.sleep(1)
        yield url, port
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)
        log.close()


def test_serve_sh_listens_on_loopback_only(served):
    url, port = served
    assert requests.get(f"{url}/info/", timeout=10).json()["name"] == "SAM-Med3D"
    other = _other_address()
    if not other:
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(OSError):
        with socket.create_connection((other, port), timeout=5):
            pass


def test_only_the_configured_origins_may_read_answers(served):
    url, port = served
    preflight = {"Access-Control-Request-Method": "GET"}
    for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}"):
        refused = requests.options(f"{url}/info/", headers={"Origin": origin, **preflight}, timeout=10)
        assert refused.headers.get("access-control-allow-origin") in (None, ""), origin
        plain = requests.get(f"{url}/info/", headers={"Origin": origin}, timeout=10)
        assert plain.headers.get("access-control-allow-origin") in (None, ""), origin
    allowed = requests.options(f"{url}/info/", headers={"Origin": VIEWER, **preflight}, timeout=10)
    assert allowed.headers.get("access-control-allow-origin") == VIEWER
    # Same-origin pages (OHIF at /ohif/) need no CORS: their requests are answered as always.
    assert requests.get(f"{url}/info/", headers={"Origin": url}, timeout=10).status_code == 200
