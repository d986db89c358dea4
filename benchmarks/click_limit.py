"""What one request with N clicks costs on a new session: the basis of the app's clicks-per-label limit.

A viewer sends the full click list so far; on a new session (first request, new weights, an evicted session)
the predictor replays every click, one decoder run and paste-back each, plus the structure-extension crops.
This times ``Sam3DPredictor.predict`` with N positive clicks around the spleen of the 512x512x32 spleen CT of
``../shared/data`` on a fresh predictor per N and prints a table::

    python benchmarks/click_limit.py [--checkpoint bundled] [--clicks 8,64,150] [--device cpu]

The app refuses more than ``lib.infers.viewer_clicks.MAX_CLICKS`` clicks per label (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared"))
SPLEEN = SHARED / "data" / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz"
SPLEEN_CLICK = (129, 219, 18)  # a voxel inside the spleen of spleen_8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bundled", help="weights: bundled, turbo or a path")
    parser.add_argument("--clicks", default="8,64,150", help="comma-separated click counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not SPLEEN.is_file():
        raise SystemExit(f"{SPLEEN} not found (the shared data folder is expected beside the repository)")

    import sam_med3d
    from sam_med3d.predictor import Sam3DPredictor

    torch.set_num_threads(args.threads)
    model = sam_med3d.load_model(args.checkpoint, device=args.device)
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(c) for c in args.clicks.split(",")):
        predictor = Sam3DPredictor(model, device=args.device)
        predictor.set_image(str(SPLEEN))
        points = np.asarray(SPLEEN_CLICK) + rng.integers(-6, 7, size=(n, 3)) * np.array([1, 1, 0])
        start = time.perf_counter()
        out = predictor.predict(points, np.ones(n, dtype=np.int64), label_key="spleen")
        rows.append((n, time.perf_counter() - start, len(getattr(out, "crop_boxes", ())) or 1))
    print(f"checkpoint {args.checkpoint}, {SPLEEN.name}, device {args.device}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| clicks (new session) | seconds | crops |")
    print("|---|---|---|")
    for n, seconds, crops in rows:
        print(f"| {n} | {seconds:.2f} | {crops} |")


if __name__ == "__main__":
    main()
