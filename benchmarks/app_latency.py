#!/usr/bin/env python
"""Server-side click latency through the MONAI Label app, in the scenarios an annotator goes through.

Starts the real server (``monailabel start_server`` on the SAM-Med3D app, 127.0.0.1, a free port) on a
studies folder holding one CT and repeats, on a fresh session each time (the scan's mtime is bumped, so the
server loads it afresh):

- **first click**: read the scan, prepare its canonical grid, sample the crop, encode, decode, paste back,
  merge into the label map, write the label file;
- **follow-up**: one more click inside the same crop (the image embedding is reused: no encoder);
- **moved crop**: a positive click of the same label outside the crop, so the crop moves (one encoder pass on
  the new crop: the target ``<= 1.0 s`` counts the whole server time of that click, encoder included);
- **second label**: a first click on another label somewhere else in the scan (its own crop: one encoder pass).

The first click on a DICOMweb study (series download, conversion, then this pipeline) is measured by
``benchmarks/dicomweb_first_click.py --scan ct300`` (the same CT as a 300-file DICOM series in Orthanc).

The scan (``--scan``): ``ct300`` (default) is a 512x512x300 CT made from the shared 512x512x32 spleen CT
(``../shared/data/msd_spleen_ct``) by resampling its 7.5 mm slices linearly to 300 slices of 0.8 mm (the same
body and extent, as a thin-slice CT; cached under ``outputs/benchmark_scans/``, never committed);
``spleen32`` is the shared file itself. Requests are shaped as 3D Slicer and OHIF send them (``.nrrd``,
``uint8``; ``--result-extension .nii.gz`` for MONAI Label's default).

It prints the per-phase split the server reports in the result JSON (``timings``: load, set_image = canonical
grid, preprocess = crop sampling + z-score, encode, decode, paste, merge into the label map, write, the rest
of the server's time, server total), HTTP (client round trip minus server total) and the round trip, as the
median (and min) over the repeats, then the issue-#14 targets with the measured values.

    python benchmarks/app_latency.py --random-weights vit_b_ori --conf extension off   # the full architecture
    python benchmarks/app_latency.py --scan spleen32 --repeats 5
    python benchmarks/app_latency.py --checkpoint /path/to/sam_med3d_turbo.pth --device cuda

Latency does not depend on the weights' values, so ``--random-weights`` measures the architecture where no
checkpoint is available offline (with the extension on, untrained weights fill the crop and the extension
follows them into up to 8 crops: use ``--conf extension off`` to time one crop per click).
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
from typing import Dict, List, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server helpers shared with the app's tests

from app_helpers import copy_app, start_server  # noqa: E402

SPLEEN = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared")) / "data" / "msd_spleen_ct"
SCAN_CACHE = REPO / "outputs" / "benchmark_scans"
#: Server-reported phases, in pipeline order ("other" and "HTTP" are derived).
PHASES = ("load", "set_image", "preprocess", "encode", "decode", "paste", "merge", "write")
SCENARIOS = ("first click", "follow-up", "moved crop", "second label")
#: Clicks as world RAS mm (so they land on the same anatomy whatever the slice spacing), from spleen_8's voxels
#: (i, j, k) at 0.785 x 0.785 x 7.5 mm: inside the spleen (129, 219, 18) and (123, 224, 19); the crop-moving
#: click 270 voxels (212 mm) away along i (400, 219, 18); the second label at the spleen's mirror (373, 230, 16).
SPLEEN8_CLICKS = {"click": (129, 219, 18), "extra": (123, 224, 19), "far": (400, 219, 18), "second": (373, 230, 16)}


def make_scan(kind: str, folder: Path) -> Path:
    """The benchmark's scan in ``folder`` (a copy or a link): ``spleen32`` or ``ct300`` (see the module docstring)."""
    import nibabel as nib

    source = SPLEEN / "imagesTr" / "spleen_8.nii.gz"
    if kind == "spleen32":
        target = folder / "spleen_8.nii.gz"
        shutil.copy(source, target)
        return target
    cached = SCAN_CACHE / "spleen_8_512x512x300.nii.gz"
    if not cached.is_file():
        img = nib.load(str(source))
        vol = np.asarray(img.dataobj)  # int16 (512, 512, 32)
        slices, spacing = 300, img.header.get_zooms()[2] * vol.shape[2] / 300
        # New slice t has its centre at old slice index (t + 0.5) * new / old - 0.5 (same first corner, same extent).
        pos = np.clip((np.arange(slices) + 0.5) * spacing / img.header.get_zooms()[2] - 0.5, 0, vol.shape[2] - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, vol.shape[2] - 1)
        w = (pos - lo).astype(np.float32)
        out = np.rint(vol[:, :, lo] * (1 - w) + vol[:, :, hi] * w).astype(np.int16)
        affine = img.affine.copy()
        affine[:3, 2] *= spacing / img.header.get_zooms()[2]
        affine[:3, 3] = img.affine[:3, :3] @ [0, 0, 0.5 * (spacing / img.header.get_zooms()[2] - 1)] + img.affine[:3, 3]
        SCAN_CACHE.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name("partial_" + cached.name)
        nib.save(nib.Nifti1Image(out, affine), str(partial))
        partial.replace(cached)
    target = folder / cached.name
    shutil.copy(cached, target)
    return target


def clicks_for(scan: Path) -> Dict[str, List[int]]:
    """:data:`SPLEEN8_CLICKS` on ``scan``'s voxel grid (through world coordinates)."""
    import nibabel as nib

    source = nib.load(str(SPLEEN / "imagesTr" / "spleen_8.nii.gz")).affine
    target = nib.load(str(scan))
    to_voxel = np.linalg.inv(target.affine) @ source
    shape = np.asarray(target.shape)
    out = {}
    for name, ijk in SPLEEN8_CLICKS.items():
        voxel = np.rint((to_voxel @ [*ijk, 1])[:3]).astype(int)
        out[name] = [int(v) for v in np.clip(voxel, 0, shape - 1)]
    return out


def _click(client, image_id: str, request: Dict) -> Dict[str, float]:
    start = time.perf_counter()
    _, result = client.infer("sam_med3d", image_id, request)
    round_trip = time.perf_counter() - start
    server = {name: float(v) for name, v in result["timings"].items()}
    timings = {name: server.get(name, 0.0) for name in PHASES}
    timings["total"] = server["total"]
    timings["other"] = timings["total"] - sum(timings[name] for name in PHASES)
    timings["HTTP"] = round_trip - timings["total"]
    timings["round trip"] = round_trip
    timings["encoder runs"] = float(sum(bool(v.get("encoder_ran")) for v in result["sam_med3d"].values()))
    return timings


def run_scenarios(client, image_id: str, scan: Path, clicks: Dict[str, List[int]],
                  extension: str) -> Dict[str, Dict[str, float]]:
    """One pass over :data:`SCENARIOS` on a fresh session of ``scan``."""
    stamp = time.time()
    os.utime(scan, (stamp, stamp))  # a new file version -> a new session -> a true first click
    fmt = {"result_extension": extension, "result_dtype": "uint8"}
    spleen = [clicks["click"]]
    out = {"first click": _click(client, image_id, {"spleen": spleen, "background": [], "label": "spleen", **fmt})}
    spleen = spleen + [clicks["extra"]]
    out["follow-up"] = _click(client, image_id, {"spleen": spleen, "background": [], "label": "spleen", **fmt})
    spleen = spleen + [clicks["far"]]
    out["moved crop"] = _click(client, image_id, {"spleen": spleen, "background": [], "label": "spleen", **fmt})
    out["second label"] = _click(client, image_id, {"spleen": spleen, "liver": [clicks["second"]], "background": [],
                                                    "label": "liver", **fmt})
    return out


def _median(runs: Sequence[Dict[str, float]], name: str) -> float:
    return statistics.median(r[name] for r in runs)


def print_table(runs: List[Dict[str, Dict[str, float]]]) -> None:
    names = PHASES + ("other", "total", "HTTP", "round trip", "encoder runs")
    print(f"| {'phase':<12} | " + " | ".join(f"{s:>18}" for s in SCENARIOS) + " |")
    print(f"|{'-' * 14}|" + "|".join("-" * 20 for _ in SCENARIOS) + "|")
    for name in names:
        cells = []
        for scenario in SCENARIOS:
            values = [r[scenario][name] for r in runs]
            if name == "encoder runs":
                cells.append(f"{int(sum(values)):>12d}/{len(values):<5d}")
            else:
                cells.append(f"{statistics.median(values):8.3f} ({min(values):7.3f})")
        label = "server total" if name == "total" else name
        print(f"| {label:<12} | " + " | ".join(cells) + " |")


def print_targets(runs: List[Dict[str, Dict[str, float]]]) -> None:
    """The issue-#14 targets, each with the measured medians (a check, not an assertion)."""
    first = [r["first click"] for r in runs]
    follow = [r["follow-up"] for r in runs]
    moved = [r["moved crop"] for r in runs]
    reference = _median(first, "load") + _median(first, "encode")
    rows = [
        ("first click <= 1.5 x (load + encode)", _median(first, "total"), 1.5 * reference),
        ("follow-up <= 0.1 x first click", _median(follow, "total"), 0.1 * _median(first, "total")),
        ("follow-up <= 0.15 s", _median(follow, "total"), 0.15),
        ("write <= 0.1 s (largest median)", max(_median([r[s] for r in runs], "write") for s in SCENARIOS), 0.1),
        ("moved crop <= 1.0 s (server total, encoder included)", _median(moved, "total"), 1.0),
    ]
    print("\n| target | measured s | limit s | met |")
    print("|---|---|---|---|")
    for name, value, limit in rows:
        print(f"| {name} | {value:.3f} | {limit:.3f} | {'yes' if value <= limit else 'no'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="default",
                        help="--conf checkpoint for the server (path, URL, turbo, bundled, default)")
    parser.add_argument("--random-weights", metavar="ARCH",
                        help="serve untrained weights of this architecture instead (vit_b_ori, vit_tiny, vit_mini)")
    parser.add_argument("--device", default="auto", help="--conf device (auto, cpu, cuda)")
    parser.add_argument("--scan", choices=("ct300", "spleen32"), default="ct300",
                        help="ct300: the spleen CT resampled to 512x512x300 (default); spleen32: the shared file")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the scenarios (default 3)")
    parser.add_argument("--result-extension", default=".nrrd",
                        help="result_extension of the requests (default .nrrd as Slicer and OHIF ask)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="extra --conf option for the server, e.g. --conf extension off (repeatable)")
    args = parser.parse_args()

    if not (SPLEEN / "imagesTr" / "spleen_8.nii.gz").is_file():
        parser.error(f"{SPLEEN} not found: the shared data folder is expected beside the repository "
                     "(or at $SAM_MED3D_SHARED)")
    root = Path(tempfile.mkdtemp(prefix="app_latency_"))
    studies = root / "studies"
    studies.mkdir()
    scan = make_scan(args.scan, studies)
    image_id = scan.name[:-len(".nii.gz")]
    clicks = clicks_for(scan)
    shape = "x".join(str(n) for n in __import__("nibabel").load(str(scan)).shape)

    checkpoint = args.checkpoint
    if args.random_weights:
        import torch
        from sam_med3d import build_sam_med3d
        from sam_med3d.checkpoint import save_checkpoint

        torch.manual_seed(0)
        checkpoint = str(save_checkpoint(build_sam_med3d(args.random_weights), root / f"{args.random_weights}.pt"))

    from monailabel.client import MONAILabelClient

    load_before = os.getloadavg()
    server = start_server(copy_app(root / "app"), studies,
                          {"checkpoint": checkpoint, "device": args.device, "labels": "spleen=1,liver=2",
                           "model_dir": str(root / "model"), **dict(args.conf)},
                          log_path=root / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        client = MONAILabelClient(server.url, tmpdir=str(root))
        info = client.info()["models"]["sam_med3d"]
        run_scenarios(client, image_id, scan, clicks, args.result_extension)  # warm-up: first-call allocations
        runs = [run_scenarios(client, image_id, scan, clicks, args.result_extension) for _ in range(args.repeats)]
    finally:
        server.stop()
    load_after = os.getloadavg()

    print(f"\nSAM-Med3D app latency on {scan.name} ({shape} CT), {args.repeats} repeat(s) after one warm-up pass, "
          f"requests {args.result_extension}/uint8; server-side split from the result JSON; model file "
          f"{info.get('model_file')}, device {args.device}, conf {dict(args.conf) or '{}'}")
    print(f"clicks (i, j, k): {clicks}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("seconds: median (min)\n")
    print_table(runs)
    print_targets(runs)
    if args.keep:
        print(f"server log: {root / 'server.log'}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
