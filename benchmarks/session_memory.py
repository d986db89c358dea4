"""Memory of the app's click sessions: one image session, and each further annotator of the same image.

Sizes ``--conf cache_size``: the server keeps up to ``cache_size`` image sessions (scan, predictor with its
crop embeddings, each client's label map and click states, see ``apps/sam_med3d/lib/infers/sessions.py``).
This loads a scan of ``../shared/data`` (default: the 512x512x32 spleen CT) into fresh sessions the way the
infer task does, clicks once per client, and prints the process's resident memory growth (RSS, psutil)::

    python benchmarks/session_memory.py [--model vit_b_ori] [--image PATH] [--images 3] [--clients 4]

Model weights are random (same sizes as trained ones); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "apps" / "sam_med3d"))

from lib.infers.sessions import ImageSession  # noqa: E402


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b_ori", help="architecture (random weights)")
    parser.add_argument("--image", default=str(SHARED / "data" / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz"))
    parser.add_argument("--images", type=int, default=3, help="image sessions to open")
    parser.add_argument("--clients", type=int, default=4, help="annotators clicking the first image")
    args = parser.parse_args()
    if not Path(args.image).is_file():
        sys.exit(f"{args.image} not found (the shared data folder is expected beside the repository)")

    from sam_med3d import build_sam_med3d
    from sam_med3d.io import load_scan
    from sam_med3d.predictor import Sam3DPredictor

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_sam_med3d(args.model).eval()
    base = rss_mb()
    sessions, rows = [], []
    for index in range(args.images):
        before = rss_mb()
        scan = load_scan(args.image)
        predictor = Sam3DPredictor(model, device="cpu")
        predictor.set_image(scan)
        session = ImageSession(scan=scan, predictor=predictor, label_map=np.zeros(scan.shape, dtype=np.uint8))
        centre = [[int(n) // 2 for n in scan.shape]]
        view = session.for_client("client:0")
        out = view.predictor.predict(centre, [1], label_key="spleen")
        view.label_map[np.asarray(out.mask) > 0] = 1
        sessions.append(session)
        rows.append((f"image session {index + 1} (1 client, 1 click)", rss_mb() - before))
    first = sessions[0]
    for client in range(1, args.clients):
        before = rss_mb()
        view = first.for_client(f"client:{client}")
        centre = [[int(n) // 2 + client for n in first.scan.shape]]
        out = view.predictor.predict(centre, [1], label_key="spleen")
        view.label_map[np.asarray(out.mask) > 0] = 1
        rows.append((f"client {client + 1} on image 1 (1 click)", rss_mb() - before))

    shape = "x".join(str(n) for n in sessions[0].scan.shape)
    print(f"model {args.model}, image {Path(args.image).name} ({shape}); RSS after loading the model: {base:.0f} MB")
    print(f"| {'what':<40} | RSS growth (MB) |")
    print(f"|{'-' * 42}|{'-' * 17}|")
    for what, mb in rows:
        print(f"| {what:<40} | {mb:15.1f} |")
    print(f"| {'total for all sessions':<40} | {rss_mb() - base:15.1f} |")


if __name__ == "__main__":
    main()
