"""benchmarks/gpu_check.sh on a machine without CUDA, and its device selection (CPU only).

The script runs with ``CUDA_VISIBLE_DEVICES=""``, so these tests see "no CUDA" on a GPU machine too."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("encoder", "click_latency", "app_training", "pretrain")
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a machine without CUDA, even where there is a GPU


def _gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", REPO / "benchmarks" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_skips_every_check_without_cuda_and_exits_0():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120, env=NO_CUDA)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [c for c in CHECKS if f"{c}: skipped: CUDA is not available" in lines] == list(CHECKS)
    assert sum("skipped: CUDA is not available" in line for line in lines) == len(CHECKS)
    assert "| check | status | result | s |" in lines
    rows = [line for line in lines if line.startswith("| ") and "| skipped |" in line]
    assert [row.split("|")[1].strip() for row in rows] == list(CHECKS)


def test_gpu_check_refuses_an_explicit_cuda_device_without_cuda():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cuda"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120, env=NO_CUDA)
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


def test_a_timed_out_check_takes_its_servers_in_other_sessions_with_it(tmp_path):
    """On timeout the driver stops the check and every descendant's process group (servers run in sessions of
    their own): here a shell that starts a ``setsid`` sleep and waits."""
    import time

    pid_file = tmp_path / "server.pid"
    script = f"setsid sleep 60 & echo $! > {pid_file}; sleep 60"
    started = time.monotonic()
    assert _gpu_checks().run_with_timeout(["bash", "-c", script], 3, tmp_path / "check.log") is None
    assert time.monotonic() - started < 30
    other = int(pid_file.read_text())

    def alive(pid: int) -> bool:      # an orphan may stay a zombie until init reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 10
    while alive(other) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(other):
        os.kill(other, 9)
        pytest.fail("the check's server in its own session outlived the timeout")


def test_a_check_that_ends_in_time_gives_its_exit_status(tmp_path):
    assert _gpu_checks().run_with_timeout(["bash", "-c", "echo done; exit 3"], 30, tmp_path / "check.log") == 3
    assert (tmp_path / "check.log").read_text() == "done\n"


# ------------------------------------------------------------------------------------------------ latency table
#: A real ``benchmarks/app_latency.py --random-weights vit_mini --scan spleen32 --repeats 1 --device cpu
#: --conf extension off`` run (its stdout).
CAPTURED_LATENCY = REPO / "tests" / "data" / "app_latency_vit_mini_cpu.txt"
SCENARIOS = ["first click", "follow-up", "moved crop", "second label"]


def test_latency_table_of_a_real_run_is_parsed():
    rows = _gpu_checks().parse_latency_table(CAPTURED_LATENCY.read_text())
    assert list(rows) == ["load", "set_image", "preprocess", "encode", "decode", "paste", "merge", "write", "other",
                          "server total", "HTTP", "round trip", "encoder runs"]
    assert all(list(values) == SCENARIOS for values in rows.values())
    assert rows["server total"] == {"first click": 1.027, "follow-up": 0.084, "moved crop": 0.213,
                                    "second label": 0.215}
    assert rows["encoder runs"] == {"first click": 1.0, "follow-up": 0.0, "moved crop": 1.0, "second label": 1.0}


def test_latency_table_as_app_latency_prints_it_now(capsys):
    """The parser follows the table app_latency.py prints today (its own print_table, not a copy)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import app_latency

    def run(scale: float):
        values = {name: scale * (i + 1) / 100 for i, name in enumerate(app_latency.PHASES)}
        values.update({"other": 0.01, "total": scale, "HTTP": 0.2, "round trip": scale + 0.2})
        return {s: dict(values, **{"encoder runs": float(s != "follow-up")}) for s in app_latency.SCENARIOS}

    app_latency.print_table([run(1.0), run(2.0), run(3.0)])
    rows = _gpu_checks().parse_latency_table(capsys.readouterr().out)
    assert rows["server total"] == dict.fromkeys(app_latency.SCENARIOS, 2.0)
    assert rows["round trip"]["follow-up"] == 2.2
    assert rows["encoder runs"] == {"first click": 1.0, "follow-up": 0.0, "moved crop": 1.0, "second label": 1.0}


def test_click_latency_check_passes_on_a_real_table(monkeypatch):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import app_latency

    gpu_checks = _gpu_checks()
    monkeypatch.setattr(app_latency, "main", lambda: print(CAPTURED_LATENCY.read_text()) or 0)
    result = gpu_checks.worker_click_latency("cpu", "vit_mini")
    assert result["ok"], result["summary"]
    assert "server total first 1.027 s, follow-up 0.084 s" in result["summary"]
    assert "encoder ran on 100% of first clicks, 0% of follow-ups" in result["summary"]


def test_encoder_check_uses_nonzero_position_weights(monkeypatch):
    """Zero relative-position tables and position embedding (a fresh model's) would hide errors in the bias and
    padded-token path; the check fills them."""
    from sam_med3d import build_sam_med3d

    gpu_checks = _gpu_checks()
    encoder = gpu_checks.nonzero_position_weights(build_sam_med3d("vit_mini").image_encoder, seed=2)
    position = {n: p for n, p in encoder.named_parameters() if "rel_pos" in n or n.endswith("pos_embed")}
    assert len(position) > 3 and all(bool((p != 0).all()) for p in position.values())
    seen = []
    real = gpu_checks.nonzero_position_weights

    def record(encoder, seed):
        seen.append(encoder)
        raise KeyboardInterrupt  # stop before the timing runs

    monkeypatch.setattr(gpu_checks, "nonzero_position_weights", record)
    with pytest.raises(KeyboardInterrupt):
        gpu_checks.worker_encoder("cpu", "vit_mini")
    assert len(seen) == 1 and real is not record


def test_stand_in_ct_has_the_grid_and_anatomy_the_server_checks_click_on(tmp_path):
    """Without ../shared (a lent GPU machine) the server checks use a generated CT: spleen_8's grid, with
    app_latency.py's spleen clicks inside the labelled spleen and its far and second-label clicks outside it."""
    import sys

    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    import app_latency

    gpu_checks = _gpu_checks()
    shared = gpu_checks.write_stand_in_spleen_ct(tmp_path / "shared")
    folder = shared / "data" / "msd_spleen_ct"
    image = nib.load(str(folder / "imagesTr" / "spleen_8.nii.gz"))
    label = np.asarray(nib.load(str(folder / "labelsTr" / "spleen_8.nii.gz")).dataobj)
    assert image.shape == label.shape == (512, 512, 32) and image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.affine, np.asarray(gpu_checks.SPLEEN8_AFFINE), atol=1e-4)
    clicks = app_latency.SPLEEN8_CLICKS
    assert label[clicks["click"]] == 1 and label[clicks["extra"]] == 1
    assert label[clicks["far"]] == 0 and label[clicks["second"]] == 0
    hu = np.asarray(image.dataobj)
    assert hu[clicks["second"]] > 0 and hu[0, 0, 0] < -900  # the liver click is in tissue, the corner is air
