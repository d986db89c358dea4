#!/usr/bin/env python
"""Every GPU-only check of the project in one run, one table (called by ``benchmarks/gpu_check.sh``).

Checks (each in its own process group, with its own timeout; one failing does not stop the others):

- ``encoder``: ``vit_b_ori`` (random weights, seed 0) on a random 128^3 crop, fp32 and bf16 autocast, fast vs
  reference attention path (``set_attention_impl``). Tolerances: fp32 fast vs reference
  ``torch.allclose(atol=1e-4, rtol=1e-3)`` (TF32 off); bf16 fast vs bf16 reference and bf16 fast vs fp32
  reference: max abs diff < 0.1 and cosine > 0.999 (the embedding is LayerNorm-ed, values of order 1).
- ``click_latency``: ``benchmarks/app_latency.py --device cuda --random-weights vit_b_ori --conf extension off``
  (the real server; one crop per click, since untrained weights would send the extension into up to 8 crops).
- ``app_training``: the real server on CUDA (``vit_b_ori`` random weights, the spleen CT of ``../shared/data``),
  a saved final label, ``POST /train/sam_med3d`` with ``max_epochs=1``, waits until DONE and checks that the
  fine-tuned weights were published.
- ``pretrain``: ``torchrun --standalone --nproc_per_node=1 pretrain/train.py`` (``vit_b_ori`` config, batch 2,
  ``train.amp=bf16``, ``--device cuda``) for a few steps on synthetic phantoms; samples/s from ``metrics.jsonl``.

Without CUDA every check prints ``<name>: skipped: CUDA is not available`` and the exit status is 0. The exit
status is 1 only if a check that ran failed (or timed out).

    python benchmarks/gpu_checks.py                  # --device auto: run on CUDA if present, else skip all
    python benchmarks/gpu_checks.py --only encoder   # a subset (repeatable)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
SKIP_REASON = "CUDA is not available"
#: seconds a timed-out check gets after SIGTERM (to stop its server) before SIGKILL
GRACE_S = 10

#: (name, what it runs, timeout in seconds); with GRACE_S each, the timeouts add up to < 8 minutes.
CHECKS = [
    ("encoder", "vit_b_ori encoder fp32/bf16, fast vs reference", 75),
    ("click_latency", "first/follow-up click via the server (app_latency.py)", 120),
    ("app_training", "1 fine-tuning epoch via POST /train/sam_med3d", 140),
    ("pretrain", "pretrain/train.py under torchrun, 1 GPU, bf16", 90),
]


def shared_folder() -> Path:
    """``$SAM_MED3D_SHARED`` or ``../shared`` (the driver points the former at a stand-in when needed)."""
    return Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared"))


class DeviceError(ValueError):
    """A device was asked for that this machine cannot provide."""


def select_device(requested: str = "auto", cuda_available: Optional[bool] = None) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; ``cuda``/``cuda:N`` without CUDA is an error.

    Raises:
        DeviceError: ``cuda`` was asked for and CUDA is not available, or the name is not a device.
    """
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    name = (requested or "auto").strip().lower()
    if name == "auto":
        return "cuda" if cuda_available else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not cuda_available:
            raise DeviceError(f"--device {requested} was asked for, but {SKIP_REASON} "
                              "(torch.cuda.is_available() is False); use --device auto or cpu")
        return name
    raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")


SPLEEN_CT = Path("data") / "msd_spleen_ct"
#: spleen_8's grid (512 x 512 x 32, 0.785 x 0.785 x 7.5 mm, RAS affine), which app_latency.py's clicks refer to.
SPLEEN8_AFFINE = ((-0.785156, 0.0, 0.0, 200.6074), (0.0, 0.785156, 0.0, -200.6074), (0.0, 0.0, 7.5, -112.5),
                  (0.0, 0.0, 0.0, 1.0))


def write_stand_in_spleen_ct(shared: Path) -> Path:
    """A synthetic CT on spleen_8's grid, with a spleen label, as ``shared/data/msd_spleen_ct`` lays it out.

    For a machine without ``../shared`` (it does not travel to a lent GPU): the server checks measure time and
    the training path, which depend on the grid, not on the anatomy. Body (40 HU) in air (-1000 HU), a "spleen"
    (60 HU, label 1) around app_latency.py's first clicks and a "liver" (70 HU) around its second-label click.
    """
    import nibabel as nib
    import numpy as np

    folder = shared / SPLEEN_CT
    image_path, label_path = folder / "imagesTr" / "spleen_8.nii.gz", folder / "labelsTr" / "spleen_8.nii.gz"
    if image_path.is_file() and label_path.is_file():
        return shared
    shape = (512, 512, 32)
    i, j, k = np.ogrid[:shape[0], :shape[1], :shape[2]]

    def ellipsoid(centre, radii):
        return sum(((axis - c) / r) ** 2 for axis, c, r in zip((i, j, k), centre, radii)) <= 1.0

    body = ((i - 256) / 220.0) ** 2 + ((j - 256) / 170.0) ** 2 <= 1.0
    spleen = ellipsoid((130, 220, 18), (45, 55, 9))
    liver = ellipsoid((370, 230, 16), (70, 60, 10))
    noise = np.random.default_rng(0).normal(0.0, 12.0, shape)
    image = np.where(body, 40.0, -1000.0) + noise
    image[spleen] = 60.0 + noise[spleen]
    image[liver] = 70.0 + noise[liver]
    affine = np.asarray(SPLEEN8_AFFINE)
    for path, array in ((image_path, image.astype(np.int16)), (label_path, spleen.astype(np.uint8))):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name("partial_" + path.name)
        nib.save(nib.Nifti1Image(array, affine), str(partial))
        partial.replace(path)
    return shared


# ------------------------------------------------------------------------------------------------ workers
def _install_sigterm_exit() -> None:
    """SIGTERM (the parent's timeout) raises SystemExit, so ``finally`` blocks stop the servers we started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))


def worker_encoder(device: str, arch: str) -> Dict:
    import statistics

    import functools

    import torch
    from sam_med3d import build_sam_med3d
    from sam_med3d.device import disable_tf32, synchronize

    disable_tf32()
    torch.manual_seed(0)
    model = build_sam_med3d(arch)
    encoder = nonzero_position_weights(model.image_encoder, seed=2).to(device).eval()
    size = model.img_size
    runs = 5
    image = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    on_cuda = device.startswith("cuda")
    sync = functools.partial(synchronize, device)  # the model's GPU, which need not be the current one
    out, ms = {}, {}
    for dtype in ("fp32", "bf16"):
        for impl in ("fast", "reference"):
            encoder.set_attention_impl(impl)
            autocast = torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16,
                                      enabled=dtype == "bf16")

            def encode() -> torch.Tensor:
                with torch.no_grad(), autocast:
                    return encoder(image)

            encode()
            sync()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                emb = encode()
                sync()
                times.append(time.perf_counter() - start)
            out[dtype, impl] = emb.float()
            ms[f"{dtype} {impl}"] = 1000 * statistics.median(times)

    def stats(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        return {"max_abs": float((a - b).abs().max()), "cosine": float(cos)}

    fp32 = stats(out["fp32", "fast"], out["fp32", "reference"])
    fp32_ok = bool(torch.allclose(out["fp32", "fast"], out["fp32", "reference"], atol=1e-4, rtol=1e-3))
    bf16 = stats(out["bf16", "fast"], out["bf16", "reference"])
    bf16_vs_fp32 = stats(out["bf16", "fast"], out["fp32", "reference"])
    bf16_ok = all(s["max_abs"] < 0.1 and s["cosine"] > 0.999 for s in (bf16, bf16_vs_fp32))
    timing = ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
    summary = (f"ms/forward: {timing}; fp32 fast-ref max {fp32['max_abs']:.1e} (allclose 1e-4/1e-3: "
               f"{'yes' if fp32_ok else 'NO'}); bf16 fast-ref max {bf16['max_abs']:.3f} cos {bf16['cosine']:.5f}, "
               f"bf16 fast vs fp32 ref max {bf16_vs_fp32['max_abs']:.3f} cos {bf16_vs_fp32['cosine']:.5f}")
    return {"ok": fp32_ok and bf16_ok, "summary": summary,
            "details": {"ms": ms, "fp32": fp32, "bf16": bf16, "bf16_vs_fp32": bf16_vs_fp32}}


def nonzero_position_weights(encoder, seed: int):
    """``encoder`` with O(0.5) random relative-position tables and absolute position embedding (in place).

    Both start at zero in a freshly built model, which would leave the relative-position bias and the padded
    tokens' logit out of the comparison: a GPU error there could not show.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=gen, dtype=parameter.dtype))
    return encoder


def parse_latency_table(text: str) -> Dict[str, Dict[str, float]]:
    """``app_latency.py``'s phase table as ``{row: {scenario: median}}``.

    The table has a label column and one ``median (min)`` column per scenario (``first click``, ``follow-up``,
    ``moved crop``, ``second label``), named in its header row; the total row is ``server total``; the
    ``encoder runs`` row holds ``runs/repeats``, returned as the fraction of the repeats that ran the encoder.
    Rows of other tables (the targets) are left out. Empty when no such table is found.
    """
    def cells(line: str) -> List[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    rows: Dict[str, Dict[str, float]] = {}
    scenarios: List[str] = []
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            scenarios = [] if not line.strip() else scenarios  # a blank line ends the table
            continue
        row = cells(line)
        if row[0] == "phase":
            scenarios = row[1:]
            continue
        if not scenarios or len(row) != len(scenarios) + 1 or set(row[1]) <= set("-"):
            continue
        values = {}
        for scenario, cell in zip(scenarios, row[1:]):
            if row[0] == "encoder runs":
                ran, repeats = cell.split("/")
                values[scenario] = int(ran) / int(repeats)
            else:
                values[scenario] = float(cell.split()[0])
        rows[row[0]] = values
    return rows


def worker_click_latency(device: str, arch: str) -> Dict:
    import contextlib
    import io

    sys.path.insert(0, str(REPO / "benchmarks"))
    import app_latency

    buffer = io.StringIO()
    argv = sys.argv
    repeats = 3
    sys.argv = ["app_latency.py", "--device", device, "--random-weights", arch, "--repeats", str(repeats),
                # untrained weights fill the crop, and the extension would follow them into up to 8 crops
                "--conf", "extension", "off"]
    try:
        with contextlib.redirect_stdout(buffer):
            rc = app_latency.main()
    finally:
        sys.argv = argv
    text = buffer.getvalue()
    print(text, file=sys.stderr)  # the full table goes to the check's log
    rows = parse_latency_table(text)
    needed = ("server total", "round trip", "encode", "encoder runs")
    missing = [name for name in needed if name not in rows]
    if rc != 0 or missing:
        return {"ok": False, "summary": f"app_latency.py returned {rc}; table rows missing: {missing}"}
    total, trip, runs = rows["server total"], rows["round trip"], rows["encoder runs"]
    # The first click encodes its crop, the follow-up reuses the embedding: otherwise the cache is broken.
    ok = runs.get("first click") == 1.0 and runs.get("follow-up") == 0.0
    summary = (f"device {device}, extension off; server total first {total['first click']:.3f} s, follow-up "
               f"{total['follow-up']:.3f} s, moved crop {total['moved crop']:.3f} s (median of {repeats}; round "
               f"trip {trip['first click']:.3f} / {trip['follow-up']:.3f} s; encode {rows['encode']['first click']:.3f} "
               f"s); encoder ran on {runs['first click']:.0%} of first clicks, {runs['follow-up']:.0%} of follow-ups")
    return {"ok": ok, "summary": summary, "details": {"rows": rows}}


def worker_app_training(device: str, arch: str) -> Dict:
    import shutil

    import torch
    from monailabel.client import MONAILabelClient
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    sys.path.insert(0, str(REPO / "tests"))
    from app_helpers import copy_app, start_server, wait_for_training

    spleen = shared_folder() / SPLEEN_CT
    image, label = spleen / "imagesTr" / "spleen_8.nii.gz", spleen / "labelsTr" / "spleen_8.nii.gz"
    if not (image.is_file() and label.is_file()):
        return {"ok": False, "summary": f"{image} / {label} not found (shared data expected at {spleen})"}
    root = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(image, studies / "spleen_8.nii.gz")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_sam_med3d(arch), root / f"{arch}.pt")
    model_dir = root / "model"
    server = start_server(copy_app(root / "app"), studies,
                          {"checkpoint": str(checkpoint), "device": device, "labels": "spleen=1",
                           "model_dir": str(model_dir), "extension": "off"},
                          log_path=root / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        client = MONAILabelClient(server.url, tmpdir=str(root))
        client.save_label("spleen_8", str(label), tag="final")
        start = time.perf_counter()
        client.train_start("sam_med3d", {"max_epochs": 1, "val_split": 0.0})
        status = wait_for_training(server.url, timeout_s=110)
        seconds = time.perf_counter() - start
        stats = client.info().get("train_stats", {}).get("sam_med3d", {})
        log = (root / "server.log").read_text(errors="replace")  # the server's and the training subprocess's
    finally:
        server.stop()
    published = sorted(p.name for p in model_dir.glob("finetuned_*.pt")) if model_dir.is_dir() else []
    print(log, file=sys.stderr)
    import re

    used = re.findall(r"Using Device: (\S+?);", log)       # MONAI Label's trainer names its device
    losses = re.findall(r"train_loss: ([0-9.eE+-]+)", log)
    trainer_device = used[-1] if used else "not logged"
    ok = status.get("status") == "DONE" and bool(published) and trainer_device.startswith(device.split(":")[0])
    summary = (f"status {status.get('status')}, {seconds:.1f} s for request to DONE (1 image, 1 epoch); trainer "
               f"device {trainer_device}; train_loss {losses[-1] if losses else '?'}; published "
               f"{published or 'nothing'}; train_stats epoch {stats.get('epoch')}, "
               f"total_time {stats.get('total_time')}")
    if not ok:
        summary += f"; details: {' | '.join(status.get('details', [])[-3:])[:300]}; kept {root}"
    else:
        shutil.rmtree(root, ignore_errors=True)
    return {"ok": ok, "summary": summary, "details": {"status": status, "train_stats": stats}}


def worker_pretrain(device: str, arch: str) -> Dict:
    import shutil
    import statistics

    sys.path.insert(0, str(REPO / "benchmarks"))
    from pretrain_throughput import make_phantoms

    root = Path(tempfile.mkdtemp(prefix="gpu_check_pretrain_"))
    data = make_phantoms(root / "data", cases=8, size=96)
    out = root / "run"
    steps = 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "pretrain" / "train.py"), "--config", str(REPO / "pretrain" / "configs" / f"{arch}.yaml"),
           "--data", str(data), "--output", str(out), "--max-steps", str(steps), "--device", device,
           "--no-progress", "--prepare", "--set", "train.amp=bf16", "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
           "--set", "log.every_steps=1", "--set", "val.every_steps=0", "--set", "log.checkpoint_every_steps=0",
           "--set", "data.val_max_targets=1", "--set", "val.clicks=1", "--set", "data.min_target_voxels=50",
           "--set", "data.num_workers=2"]
    start = time.perf_counter()
    # Streamed into the check's log as it comes, so a run stopped by the timeout still shows how far it got.
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", file=sys.stderr, flush=True)
        lines.append(line)
    returncode = proc.wait()
    output = "".join(lines)
    wall = time.perf_counter() - start
    if returncode != 0:
        last = (output.strip().splitlines() or ["no output"])[-1][:200]
        return {"ok": False, "summary": f"torchrun exited {returncode}: {last} (run folder {out})"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    rates = [r["samples_per_s"] for r in train[1:]] or [r["samples_per_s"] for r in train]
    if not rates:
        return {"ok": False, "summary": "no train rows in metrics.jsonl"}
    gpu = max((r.get("gpu_mem_gb", 0.0) for r in train), default=0.0)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if f"{backend} process group" not in output:
        return {"ok": False, "summary": f"the run did not use a {backend} process group (run folder {out})"}
    shutil.rmtree(root, ignore_errors=True)   # kept when the run failed (above)
    summary = (f"{statistics.median(rates):.2f} samples/s on {device} (median of steps 2..{len(train)}, batch 2, "
               f"{arch} config), "
               f"peak GPU {gpu:.1f} GB, loss {train[-1]['loss']:.3f}, wall {wall:.0f} s incl. start; "
               f"DDP over a {backend} process group of world size 1")
    return {"ok": True, "summary": summary, "details": {"rates": rates, "gpu_mem_gb": gpu}}


WORKERS: Dict[str, Callable[[str, str], Dict]] = {
    "encoder": worker_encoder, "click_latency": worker_click_latency,
    "app_training": worker_app_training, "pretrain": worker_pretrain,
}


# ------------------------------------------------------------------------------------------------ driver
def _descendant_groups(pid: int) -> set:
    """Process groups of ``pid`` and all its descendants (Linux ``/proc``), ``pid``'s own group included."""
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    groups, todo = {pid}, [pid]
    while todo:
        current = todo.pop()
        try:
            groups.add(os.getpgid(current))
        except ProcessLookupError:
            pass
        todo.extend(children.get(current, []))
    return groups


def _signal_groups(groups: set, sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def run_with_timeout(cmd: List[str], timeout_s: float, log_path: Path) -> Optional[int]:
    """Run ``cmd`` in a session of its own, output into ``log_path``; its exit status, or None when it ran past
    ``timeout_s``: then it and every descendant (servers run in sessions of their own) get SIGTERM, GRACE_S to
    stop, then SIGKILL."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # Note every descendant's process group now, let the worker stop its servers (SIGTERM -> SystemExit
            # -> finally), then kill what is left.
            groups = _descendant_groups(proc.pid)
            _signal_groups(groups, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            _signal_groups(groups | _descendant_groups(proc.pid), signal.SIGKILL)
            proc.wait()
            return None


def run_check(name: str, timeout_s: float, device: str, log_dir: Path, arch: str = "vit_b_ori") -> Dict:
    """Run one worker in its own process group; returns ``{"status", "summary", "seconds"}``."""
    result_path = log_dir / f"{name}.json"
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", device,
           "--result", str(result_path), "--arch", arch]
    start = time.perf_counter()
    rc = run_with_timeout(cmd, timeout_s, log_path)
    if rc is None:
        return {"status": "FAILED", "summary": f"timed out after {timeout_s:.0f} s (log: {log_path})",
                "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    if rc != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {"status": "FAILED", "summary": f"exit {rc}: {tail[0][:200]} (log: {log_path})", "seconds": seconds}
    result = json.loads(result_path.read_text())
    return {"status": "ok" if result["ok"] else "FAILED", "summary": result["summary"], "seconds": seconds}


def print_table(rows: List[Dict]) -> None:
    print("\n| check | status | result | s |")
    print("|---|---|---|---|")
    for row in rows:
        seconds = f"{row['seconds']:.0f}" if row.get("seconds") is not None else "-"
        print(f"| {row['name']} | {row['status']} | {row['summary']} | {seconds} |")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N; cpu skips every check")
    parser.add_argument("--only", action="append", choices=[c[0] for c in CHECKS], help="run only these checks")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every check's timeout")
    parser.add_argument("--log-dir", default=None, help="folder for the per-check logs (default: a temp folder)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every check on the CPU with the small vit_mini model (proves the set-up, the "
                             "data and every code path of the checks on a machine without a GPU; no GPU numbers)")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    # internal: a smaller architecture, to smoke-test a worker on CPU (--worker NAME --device cpu --arch vit_mini)
    parser.add_argument("--arch", default="vit_b_ori", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _install_sigterm_exit()
        result = WORKERS[args.worker](args.device, args.arch)
        Path(args.result).write_text(json.dumps(result))
        return 0

    try:
        device = "cpu" if args.cpu_dry_run else select_device(args.device)
    except DeviceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    checks = [c for c in CHECKS if not args.only or c[0] in args.only]
    rows = []
    if not device.startswith("cuda") and not args.cpu_dry_run:
        why = SKIP_REASON if args.device == "auto" else f"--device {args.device}"
        for name, what, _ in checks:
            print(f"{name}: skipped: {why}", flush=True)
            rows.append({"name": name, "status": "skipped", "summary": f"{what}; {why}", "seconds": None})
        print_table(rows)
        return 0

    import torch
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    arch = "vit_mini" if args.cpu_dry_run else args.arch
    where = "the CPU (dry run, vit_mini)" if args.cpu_dry_run else torch.cuda.get_device_name(device)
    print(f"GPU checks on {where} (torch {torch.__version__}, CUDA {torch.version.cuda}); logs in {log_dir}",
          flush=True)
    if any(name in ("click_latency", "app_training") for name, _, _ in checks) and \
            not (shared_folder() / SPLEEN_CT / "labelsTr" / "spleen_8.nii.gz").is_file():
        home = Path(os.environ.get("GPU_CHECK_HOME") or tempfile.mkdtemp(prefix="gpu_check_data_"))
        os.environ["SAM_MED3D_SHARED"] = str(write_stand_in_spleen_ct(home / "shared"))
        print(f"no shared data here: the server checks use a synthetic CT on spleen_8's grid "
              f"({os.environ['SAM_MED3D_SHARED']})", flush=True)
    for name, what, timeout_s in checks:
        print(f"{name}: running ({what}, timeout {timeout_s * args.timeout_scale:.0f} s)", flush=True)
        row = {"name": name, **run_check(name, timeout_s * args.timeout_scale, device, log_dir, arch)}
        print(f"{name}: {row['status']} in {row['seconds']:.0f} s", flush=True)
        rows.append(row)
    print_table(rows)
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
