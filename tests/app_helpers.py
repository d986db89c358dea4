"""Starting and stopping a real MONAI Label server on the SAM-Med3D app, for tests and benchmarks.

The server is started exactly as a user would (the ``monailabel`` launcher of this venv, ``start_server``
with ``--conf`` pairs), on 127.0.0.1 and a free port, in its own process group so that it and the training
/ scoring subprocesses it spawns are stopped together.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import requests

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "sam_med3d"


def app_module(name: str) -> Any:
    """The app's module ``name`` (e.g. ``"lib.options"``), imported as MONAI Label imports the app: with the app
    folder first on ``sys.path`` while importing."""
    import importlib

    sys.path.insert(0, str(APP_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(APP_DIR))


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def copy_app(destination: Path) -> Path:
    """Copy the app's code (``main.py``, ``lib/``) to ``destination``.

    MONAI Label writes ``logs/``, ``bin/`` and downloaded/fine-tuned weights into the app folder; running a
    copy keeps test runs out of the repository and away from a real ``model/`` folder.
    """
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy2(APP_DIR / "main.py", destination / "main.py")
    shutil.copytree(APP_DIR / "lib", destination / "lib", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    return destination


class LoggedProcess:
    """A service process started in its own process group, with its log file."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process = process
        self.log_path = log_path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the process and its children (the process group created for it): SIGTERM, then SIGKILL."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)


class Server(LoggedProcess):
    """A running ``monailabel start_server`` process (see :func:`start_server`)."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        super().__init__(process, log_path)
        self.url = url


def copy_studies(folder: Path, data_dir: Path, cases: Mapping[str, Tuple[str, str]]) -> Path:
    """``folder`` created with ``<image id>.nii.gz`` copies of ``data_dir/<dataset>/imagesTr/<case>.nii.gz`` for
    each ``image id: (dataset, case)`` of ``cases``."""
    folder.mkdir(parents=True)
    for image_id, (dataset, case) in cases.items():
        shutil.copy(data_dir / dataset / "imagesTr" / f"{case}.nii.gz", folder / f"{image_id}.nii.gz")
    return folder


def mini_conf(checkpoint: Path, **extra: str) -> Dict[str, str]:
    """The ``--conf`` of the small test servers: ``vit_mini`` weights from ``checkpoint``, labels spleen and liver,
    CPU, the model loaded at start, one crop per click; ``extra`` added or overriding."""
    return {"model": "vit_mini", "checkpoint": str(checkpoint), "labels": "spleen=1,liver=2", "device": "cpu",
            "preload": "true", "extension": "off", **extra}


def start_server(app_dir: Path, studies: Path, conf: Mapping[str, str], log_path: Path,
                 port: Optional[int] = None, env: Optional[Dict[str, str]] = None, timeout_s: float = 240.0,
                 host: str = "127.0.0.1", ready_path: str = "/info/") -> Server:
    """Start the app with ``--conf`` pairs and wait until ``GET <ready_path>`` answers 200 (``/auth/`` when
    MONAI Label's authentication is on: ``/info/`` then needs a token).

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout_s`` (the log tail is included).
    """
    port = port or free_port()
    launcher = Path(sys.executable).parent / "monailabel"
    cmd = [str(launcher), "start_server", "--app", str(app_dir), "--studies", str(studies), "--host", host,
           "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, str(value)]
    full_env = dict(os.environ)
    # The launcher runs "$MONAILABEL_PYEXE -m monailabel.main"; use this venv's interpreter.
    full_env["MONAILABEL_PYEXE"] = sys.executable
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    log = open(log_path, "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = Server(process, f"http://{host}:{port}", log_path)
    try:
        wait_until_answering(server, f"{server.url}{ready_path}", "the MONAI Label server", timeout_s,
                             interval_s=1.0)
    except BaseException:  # not answering, Ctrl-C, SIGTERM: stop what was started
        server.stop()
        raise
    return server


def wait_until_answering(service, url: str, what: str, timeout_s: float, interval_s: float = 0.5) -> None:
    """Poll ``url`` until it answers 200; stop ``service`` (``.process``, ``.stop()``, ``.log_tail()``) and raise
    with its log tail if its process exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {service.process.returncode}:\n{service.log_tail()}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(interval_s)
    service.stop()
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s} s:\n{service.log_tail()}")


def wait_for_training(url: str, timeout_s: float = 600.0, poll_s: float = 2.0) -> dict:
    """Poll ``GET /train/`` until the latest training task is no longer running; return its status."""
    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        response = requests.get(f"{url}/train/", timeout=30)
        if response.status_code == 200:
            status = response.json()
            if status.get("status") not in ("SUBMITTED", "RUNNING", "QUEUED"):
                return status
        time.sleep(poll_s)
    raise RuntimeError(f"training still running after {timeout_s} s: {status}")
