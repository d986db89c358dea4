#!/usr/bin/env python
"""Server-side latency of a first click and a follow-up click through the MONAI Label app.

Starts the real server (``monailabel start_server`` on the SAM-Med3D app, 127.0.0.1, a free port) on a
studies folder holding the 512x512x32 spleen CT of ``../shared/data/msd_spleen_ct``, then repeats:

- **first click**: a new session (the scan's mtime is bumped, so the server loads it afresh): load the scan,
  prepare its canonical grid, crop, encode, decode, paste back, write the label file;
- **follow-up click**: one more click inside the same crop: the image embedding is reused (no encoder).

It prints the per-phase split the server reports in the result JSON (``timings``: load, set_image,
preprocess, encode, decode, paste, write, server total) and the client's round trip, as mean (and min)
over the repeats.

    python benchmarks/app_latency.py                         # default weights (turbo, else bundled)
    python benchmarks/app_latency.py --random-weights vit_b_ori   # the full architecture, untrained weights
    python benchmarks/app_latency.py --checkpoint /path/to/sam_med3d_turbo.pth --device cuda

Latency does not depend on the weights' values, so ``--random-weights`` measures the architecture where no
checkpoint is available offline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server helpers shared with the app's tests

from app_helpers import copy_app, start_server  # noqa: E402

SPLEEN = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared")) / "data" / "msd_spleen_ct"
PHASES = ("load", "set_image", "preprocess", "encode", "decode", "paste", "write", "total")


def _click(client, image_id: str, points: List[List[int]]) -> Dict[str, float]:
    start = time.perf_counter()
    _, result = client.infer("sam_med3d", image_id, {"spleen": points, "background": [], "label": "spleen"})
    timings = {name: float(result["timings"].get(name, 0.0)) for name in PHASES}
    timings["round trip"] = time.perf_counter() - start
    timings["encoder_ran"] = float(result["encoder_ran"])
    return timings


def _row(name: str, first: List[Dict[str, float]], follow: List[Dict[str, float]]) -> str:
    def cell(runs: List[Dict[str, float]]) -> str:
        values = [r[name] for r in runs]
        return f"{statistics.mean(values):8.3f} ({min(values):7.3f})"

    return f"| {name:<12} | {cell(first)} | {cell(follow)} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="default",
                        help="--conf checkpoint for the server (path, URL, turbo, bundled, default)")
    parser.add_argument("--random-weights", metavar="ARCH",
                        help="serve untrained weights of this architecture instead (vit_b_ori, vit_tiny, vit_mini)")
    parser.add_argument("--device", default="auto", help="--conf device (auto, cpu, cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="first/follow-up click pairs (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="extra --conf option for the server, e.g. --conf extension off (repeatable)")
    args = parser.parse_args()

    image = SPLEEN / "imagesTr" / "spleen_8.nii.gz"
    if not image.is_file():
        parser.error(f"{image} not found: the shared data folder is expected beside the repository "
                     "(or at $SAM_MED3D_SHARED)")
    root = Path(tempfile.mkdtemp(prefix="app_latency_"))
    studies = root / "studies"
    studies.mkdir()
    scan = studies / "spleen_8.nii.gz"
    shutil.copy(image, scan)

    checkpoint = args.checkpoint
    if args.random_weights:
        import torch
        from sam_med3d import build_sam_med3d
        from sam_med3d.checkpoint import save_checkpoint

        torch.manual_seed(0)
        checkpoint = str(save_checkpoint(build_sam_med3d(args.random_weights), root / f"{args.random_weights}.pt"))

    from monailabel.client import MONAILabelClient

    server = start_server(copy_app(root / "app"), studies,
                          {"checkpoint": checkpoint, "device": args.device, "labels": "spleen=1",
                           "model_dir": str(root / "model"), **dict(args.conf)},
                          log_path=root / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        client = MONAILabelClient(server.url, tmpdir=str(root))
        info = client.info()["models"]["sam_med3d"]
        first, follow = [], []
        # Inside the spleen of spleen_8 (voxel indices i, j, k of the file as stored).
        click, extra = [129, 219, 18], [123, 224, 19]
        _click(client, "spleen_8", [click])  # warm-up: model on device, first-call allocations
        for _ in range(args.repeats):
            stamp = time.time()
            os.utime(scan, (stamp, stamp))  # a new file version -> a new session -> a true first click
            first.append(_click(client, "spleen_8", [click]))
            follow.append(_click(client, "spleen_8", [click, extra]))
    finally:
        server.stop()

    print(f"\nSAM-Med3D app latency on {image.name} (512x512x32 CT), {args.repeats} repeat(s), server-side "
          f"split from the result JSON; model file {info.get('model_file')}, device {args.device}")
    print("seconds: mean (min)\n")
    print(f"| {'phase':<12} | {'first click':>18} | {'follow-up click':>18} |")
    print(f"|{'-' * 14}|{'-' * 20}|{'-' * 20}|")
    for name in PHASES + ("round trip",):
        print(_row(name, first, follow))
    ran = (sum(int(r["encoder_ran"]) for r in first), sum(int(r["encoder_ran"]) for r in follow))
    print(f"\nencoder ran on {ran[0]}/{len(first)} first clicks and {ran[1]}/{len(follow)} follow-up clicks")
    if args.keep:
        print(f"server log: {root / 'server.log'}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
