#!/usr/bin/env python
"""Training throughput of ``pretrain/train.py``: samples/s and peak memory per config and number of processes.

    python benchmarks/pretrain_throughput.py [--configs vit_mini vit_tiny] [--procs 1 2] [--steps 6]
                                             [--data DIR ...] [--device auto|cpu|cuda] [--set KEY=VALUE ...]

Each cell is a real ``torchrun --nproc_per_node=P pretrain/train.py`` run (one process without torchrun for
P = 1) of ``--steps`` optimizer steps. samples/s is the mean of the logged steps after the first (warm-up: data
workers starting, first-touch allocations); it counts samples of all processes together. Memory: peak GPU
memory allocated by torch (per process) when training on CUDA, else the peak RSS of the rank-0 process.

Without ``--data`` the runs use synthetic phantoms (spheres in noise, 1 mm voxels) written to a temporary
folder, so the figures depend only on the model and recipe. ``vit_b_ori`` on CPU is slow (minutes per
step); it is in the default list only when CUDA is available. GPU rows appear only when CUDA is present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_phantoms(root: Path, cases: int = 4, size: int = 96, seed: int = 0) -> Path:
    """``cases`` NIfTI volumes with one sphere each (label 1) in a dataset.json folder under ``root``."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    ds = root / "phantoms"
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    for i in range(cases):
        centre = rng.uniform(0.3 * size, 0.7 * size, 3)
        radius = rng.uniform(0.08 * size, 0.2 * size)
        label = (np.linalg.norm(grid - centre, axis=-1) < radius).astype(np.uint8)
        image = (rng.normal(100, 20, (size,) * 3) + 80 * label).astype(np.float32)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(ds / "imagesTr" / f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(ds / "labelsTr" / f"case{i}.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({"name": "phantoms", "labels": {"0": "background", "1": "sphere"}}))
    return root


def run_cell(config: str, procs: int, steps: int, data: List[str], out: Path, cache: Path, device: str,
             overrides: List[str], threads: Optional[int]) -> Dict[str, object]:
    train = [str(REPO / "pretrain" / "train.py"), "--config", str(REPO / "pretrain" / "configs" / f"{config}.yaml"),
             "--data", *data, "--output", str(out), "--cache-dir", str(cache), "--max-steps", str(steps),
             "--device", device, "--no-progress", "--prepare",
             "--set", "log.every_steps=1", "--set", "val.every_steps=0", "--set", "log.checkpoint_every_steps=0",
             "--set", "data.val_max_targets=1", "--set", "val.clicks=1", "--set", "data.min_target_voxels=50"]
    for item in overrides:
        train += ["--set", item]
    if threads:
        train += ["--threads", str(threads)]
    cmd = ([sys.executable, *train] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *train])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120], "wall_s": wall}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    rates = [r["samples_per_s"] for r in train_rows[1:]] or [r["samples_per_s"] for r in train_rows]
    gpu = max((r.get("gpu_mem_gb", 0.0) for r in train_rows), default=0.0)
    rss = max((r.get("peak_rss_gb", 0.0) for r in train_rows), default=0.0)
    return {"samples_per_s": float(np.mean(rates)), "gpu_mem_gb": gpu, "rss_gb": rss,
            "loss": train_rows[-1]["loss"], "wall_s": wall}


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=(["vit_mini", "vit_tiny", "vit_b_ori"] if cuda
                                                    else ["vit_mini", "vit_tiny"]))
    p.add_argument("--procs", nargs="+", type=int,
                   default=sorted({1, torch.cuda.device_count()}) if cuda else [1, 2])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--data", nargs="+", default=None, help="data folders (default: synthetic phantoms)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: train.py's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)

    on_gpu = cuda and args.device != "cpu"
    with tempfile.TemporaryDirectory(prefix="pretrain_bench_") as tmp:
        tmp = Path(tmp)
        data = args.data or [str(make_phantoms(tmp / "data"))]
        results = []
        for config in args.configs:
            for procs in args.procs:
                cell = run_cell(config, procs, args.steps, data, tmp / f"run_{config}_{procs}", tmp / "cache",
                                args.device, args.overrides, args.threads)
                results.append((config, procs, cell))
                print(f"  {config} x{procs}: {cell}", file=sys.stderr, flush=True)

    device = f"{torch.cuda.get_device_name(0)}" if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\npretrain throughput on {device}, {args.steps} steps per run "
          f"(samples/s over all processes, after the first step)\n")
    mem_head = "peak GPU mem/proc (GiB)" if on_gpu else "peak RSS/proc (GiB)"
    print(f"| config | processes | samples/s | {mem_head} | last loss | wall (s) |")
    print("|---|---|---|---|---|---|")
    for config, procs, cell in results:
        if "error" in cell:
            print(f"| {config} | {procs} | failed: {cell['error']} | | | {cell['wall_s']:.0f} |")
            continue
        mem = cell["gpu_mem_gb"] if on_gpu else cell["rss_gb"]
        print(f"| {config} | {procs} | {cell['samples_per_s']:.3f} | {mem:.2f} | {cell['loss']:.3f} | "
              f"{cell['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
