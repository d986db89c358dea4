#!/usr/bin/env python
"""Cost of covering structures larger than one crop: crops run and seconds per click, for a liver and a lung
on 512x512xN CTs, with the extension off (one crop), ``slide`` and ``zoom``.

Two models per structure:

- **perfect**: a stand-in whose decoder returns the ground truth of every crop it is given, with the real
  ``vit_b_ori`` image encoder (untrained weights) running on every new crop, so the seconds are what the full
  architecture costs and the crop count is what a model that segments perfectly would need;
- **bundled**: the small offline model (``vit_tiny``), whose masks decide where the extension goes.

Scans (``../shared/data`` or ``$SAM_MED3D_SHARED``, and the sample generator):

- ``totalseg_512``: the TotalSegmentator CT (122x101x112 at 3 mm) resampled to 512x512x224 (linear image,
  nearest labels): liver 222 mm (larger than a 192 mm crop), right lower lung lobe;
- ``phantom_512``: ``sample-datasets/make_samples.py`` case 0 at 512x512 in-plane: liver 211 mm, right lung.

    python benchmarks/extension.py [--threads 2] [--models perfect bundled]

Prints one table row per (scan, structure, model, strategy): extent, crops, encoder runs, seconds, Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "sample-datasets"))
SHARED = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared"))

from extension_helpers import CropAwarePredictor, GroundTruthSam3D  # noqa: E402


def totalseg_512():
    import nibabel as nib
    from scipy.ndimage import zoom

    folder = SHARED / "data" / "totalseg_ct_multiorgan"
    image = nib.load(str(folder / "imagesTr" / "example_ct.nii.gz"))
    label = np.asarray(nib.load(str(folder / "labelsTr" / "example_ct.nii.gz")).dataobj)
    names = json.loads((folder / "dataset.json").read_text())["labels"]
    values = {v: int(k) for k, v in names.items()} if str(next(iter(names))).isdigit() else \
        {k: int(v) for k, v in names.items()}
    array = np.asarray(image.dataobj, dtype=np.float32)
    target = (512, 512, 224)
    factors = [t / n for t, n in zip(target, array.shape)]
    affine = image.affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.asarray(factors)[None, :]
    # keep the outer corner of voxel 0 in place (the volume covers the same field of view)
    affine[:3, 3] = image.affine[:3, 3] + image.affine[:3, :3] @ (0.5 / np.asarray(factors) - 0.5)
    big = zoom(array, factors, order=1, grid_mode=True, mode="nearest")
    big_label = zoom(label, factors, order=0, grid_mode=True, mode="nearest")
    return "totalseg_512", big, affine, {"liver": big_label == values["liver"],
                                          "lung (right lower lobe)": big_label == values["lung_lower_lobe_right"]}


def phantom_512():
    import make_samples

    case = make_samples.generate_case(0, 0, in_plane=512)
    value = {name: v for v, name in make_samples.LABELS.items()}
    return "phantom_512", case.image.astype(np.float32), case.affine, {
        "liver": case.label == value["liver"], "lung (right)": case.label == value["lung_right"]}


def deepest(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(mask)
    return np.array(np.unravel_index(int(np.argmax(depth)), mask.shape), dtype=np.float64)[None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["perfect", "bundled"], choices=["perfect", "bundled"])
    parser.add_argument("--max-crops", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import sam_med3d
    from sam_med3d.extension import ExtensionConfig
    from sam_med3d.metrics import dice
    from sam_med3d.predictor import Sam3DPredictor

    torch.manual_seed(0)
    encoder = sam_med3d.build_sam_med3d("vit_b_ori").image_encoder.eval() if "perfect" in args.models else None
    bundled = sam_med3d.load_model("bundled") if "bundled" in args.models else None
    strategies = {"off": ExtensionConfig(enabled=False),
                  "slide": ExtensionConfig(max_crops=args.max_crops, time_budget_s=600),
                  "zoom": ExtensionConfig(strategy="zoom", max_crops=args.max_crops, time_budget_s=600)}
    rows = []
    for make in (totalseg_512, phantom_512):
        scan_name, array, affine, structures = make()
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        for structure, gt in structures.items():
            found = np.argwhere(gt)
            extent = (found.max(0) - found.min(0) + 1) * spacing
            click = deepest(gt)
            for model_name in args.models:
                for strategy, config in strategies.items():
                    if model_name == "perfect":
                        predictor = CropAwarePredictor(GroundTruthSam3D(gt, 128, encoder), extension=config)
                    else:
                        predictor = Sam3DPredictor(bundled, extension=config)
                    predictor.set_image(array, affine)
                    start = time.perf_counter()
                    with torch.inference_mode():
                        result = predictor.predict(click, [1])
                    seconds = time.perf_counter() - start
                    rows.append((scan_name, structure, f"{extent.max():.0f}", model_name, strategy,
                                 len(result.crop_boxes), predictor.encoder_runs, f"{seconds:.2f}",
                                 f"{dice(result.mask > 0, gt):.3f}"))
                    print("  ".join(map(str, rows[-1])), flush=True)
    header = ("scan", "structure", "max extent mm", "model", "strategy", "crops", "encoder runs", "seconds",
              "Dice")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
