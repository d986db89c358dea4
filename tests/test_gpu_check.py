"""benchmarks/gpu_check.sh on a machine without CUDA, and its device selection (CPU only)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("encoder", "click_latency", "app_training", "pretrain")


def _gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", REPO / "benchmarks" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test is about a machine without CUDA")
def test_gpu_check_skips_every_check_without_cuda_and_exits_0():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [c for c in CHECKS if f"{c}: skipped: CUDA is not available" in lines] == list(CHECKS)
    assert sum("skipped: CUDA is not available" in line for line in lines) == len(CHECKS)
    assert "| check | status | result | s |" in lines
    rows = [line for line in lines if line.startswith("| ") and "| skipped |" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(CHECKS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this test is about a machine without CUDA")
def test_gpu_check_refuses_an_explicit_cuda_device_without_cuda():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cuda"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--device cuda was asked for, but CUDA is not available" in proc.stderr


def test_the_timeouts_fit_in_eight_minutes():
    gpu_checks = _gpu_checks()
    assert [c[0] for c in gpu_checks.CHECKS] == list(CHECKS)
    # each check's timeout plus the grace after SIGTERM
    assert sum(timeout + gpu_checks.GRACE_S for _, _, timeout in gpu_checks.CHECKS) <= 8 * 60


@pytest.mark.parametrize("requested, cuda, expected", [
    ("auto", False, "cpu"), ("auto", True, "cuda"), (None, False, "cpu"), ("cpu", True, "cpu"),
    ("cpu", False, "cpu"), ("cuda", True, "cuda"), ("CUDA:1", True, "cuda:1"),
])
def test_select_device(requested, cuda, expected):
    assert _gpu_checks().select_device(requested, cuda_available=cuda) == expected


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_select_device_refuses_cuda_without_cuda(requested):
    gpu_checks = _gpu_checks()
    with pytest.raises(gpu_checks.DeviceError, match=f"--device {requested} was asked for, but CUDA is not available"):
        gpu_checks.select_device(requested, cuda_available=False)


@pytest.mark.parametrize("requested", ["gpu", "cuda:x", "mps"])
def test_select_device_refuses_unknown_names(requested):
    gpu_checks = _gpu_checks()
    with pytest.raises(gpu_checks.DeviceError, match="must be auto, cpu, cuda or cuda:N"):
        gpu_checks.select_device(requested, cuda_available=True)


def test_select_device_default_follows_this_machine():
    assert _gpu_checks().select_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_timed_out_check_takes_its_servers_in_other_sessions_with_it():
    """On timeout the driver signals every descendant's process group (servers run in their own session)."""
    import signal
    import time

    gpu_checks = _gpu_checks()
    proc = subprocess.Popen(["bash", "-c", "setsid sleep 60 & sleep 60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(gpu_checks._descendant_groups(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        groups = gpu_checks._descendant_groups(proc.pid)
        assert proc.pid in groups and len(groups) == 2
        gpu_checks._signal_groups(groups, signal.SIGKILL)
        proc.wait(timeout=10)
        other = (groups - {proc.pid}).pop()   # setsid made the background sleep a group leader

        def alive(pid: int) -> bool:      # an orphan may stay a zombie until init reaps it
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 10
        while alive(other) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(other)
    finally:
        if proc.poll() is None:
            proc.kill()
