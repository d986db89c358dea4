"""A click after a brush/eraser edit: what should become of the edit? Dice of three policies on real CT.

An annotator clicks once, corrects the mask by hand on a few slices, then clicks again. The viewer can

- ``discard``: show the new answer (OHIF's MONAI Label panel as shipped: every voxel of the label is replaced,
  the edit is lost);
- ``keep``: keep the edit wherever the new answer did not change the voxel (the app's OHIF,
  ``sam-med3d-edit.js``): ``where(new != previous answer, new, edited)``;
- ``prompt``: send the edited mask as the mask prompt of the next click (the model's previous low-res logits,
  overwritten where the edit differs from them), and show the new answer;
- ``prompt+keep``: both.

The simulated annotator (ground truth of the shared data): first click at the centre of the structure; the
edit makes the mask equal to the ground truth on ``--slices`` axial slices around that click, removing false
positives (``erase``), adding what was missed (``paint``) or both (``both``); the second click is the
challenge's click at the centre of the largest remaining error of the *edited* mask (positive or negative).
Prints a table of Dice per structure, edit and policy, and the mean::

    python benchmarks/edit_then_click.py [--checkpoint bundled] [--slices 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared"))
CASES = [  # (image, label, {structure: value})
    ("msd_spleen_ct/imagesTr/spleen_8.nii.gz", "msd_spleen_ct/labelsTr/spleen_8.nii.gz", {"spleen": 1}),
    ("totalseg_ct_multiorgan/imagesTr/example_ct.nii.gz", "totalseg_ct_multiorgan/labelsTr/example_ct.nii.gz",
     {"spleen": 1, "kidney_right": 2, "liver": 5}),
]
POLICIES = ("edit only", "discard", "keep", "prompt", "prompt+keep")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def edited_mask(first: np.ndarray, truth: np.ndarray, k: int, slices: int, kind: str) -> np.ndarray:
    """``first`` corrected to the ground truth on ``slices`` axial slices (third axis) around ``k``."""
    edited = first.copy()
    lo, hi = max(0, k - slices // 2), min(first.shape[2], k + slices // 2 + 1)
    part, want = edited[:, :, lo:hi], truth[:, :, lo:hi]
    if kind in ("erase", "both"):
        part &= want
    if kind in ("paint", "both"):
        part |= want
    return edited


def prompt_from_edit(predictor, key, edited: np.ndarray, magnitude: float) -> None:
    """Overwrite the label's previous low-res logits where ``edited`` (on the scan's grid) disagrees with them."""
    state = predictor._states[key]
    size = state.low_res.shape[-1]
    on_crop = state.crop.sample(edited.astype(np.float32), mode="linear").float()
    low = torch.nn.functional.interpolate(on_crop[None, None], size=(size,) * 3, mode="area") > 0.5
    logits = state.low_res.clone()
    was = logits > 0
    logits[low & ~was] = magnitude
    logits[~low & was] = -magnitude
    predictor._states[key] = replace(state, low_res=logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bundled", help="weights: bundled, turbo or a path")
    parser.add_argument("--slices", type=int, default=5, help="axial slices the simulated edit corrects")
    parser.add_argument("--magnitude", type=float, default=10.0, help="logit written where the edit disagrees")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import sam_med3d
    from sam_med3d.clicks import center_error_click, first_click
    from sam_med3d.io import load_label, load_scan
    from sam_med3d.predictor import Sam3DPredictor

    torch.set_num_threads(args.threads)
    model = sam_med3d.load_model(args.checkpoint, device=args.device)
    rows = []
    start = time.perf_counter()
    for image, label, structures in CASES:
        if not (SHARED / "data" / image).is_file():
            raise SystemExit(f"{SHARED / 'data' / image} not found (the shared data folder beside the repository)")
        scan = load_scan(str(SHARED / "data" / image))
        labels = load_label(str(SHARED / "data" / label), tuple(scan.shape), 2 ** 31, what=label)
        predictor = Sam3DPredictor(model, device=args.device)
        predictor.set_image(scan)
        for name, value in structures.items():
            truth = labels == value
            point, _ = first_click(truth, None, mode="center")
            first = predictor.predict(point[None], [1], label_key=name).mask.astype(bool)
            for kind in ("erase", "paint", "both"):
                edited = edited_mask(first, truth, int(point[2]), args.slices, kind)
                click = center_error_click(edited, truth)
                points, point_labels = np.stack([point, click[0]]), np.array([1, click[1]])
                result = {"edit only": edited}
                key = (name, kind, "discard")
                predictor.predict(point[None], [1], label_key=key)
                second = predictor.predict(points, point_labels, label_key=key).mask.astype(bool)
                result["discard"] = second
                result["keep"] = np.where(second != first, second, edited)
                key = (name, kind, "prompt")
                predictor.predict(point[None], [1], label_key=key)
                prompt_from_edit(predictor, key, edited, args.magnitude)
                prompted = predictor.predict(points, point_labels, label_key=key).mask.astype(bool)
                result["prompt"] = prompted
                result["prompt+keep"] = np.where(prompted != first, prompted, edited)
                rows.append((f"{Path(image).name.split('.')[0]} {name}", kind, dice(first, truth),
                             "+" if click[1] else "-", [dice(result[p], truth) for p in POLICIES]))
    print(f"checkpoint {args.checkpoint}, edit on {args.slices} axial slices, device {args.device}, "
          f"{args.threads} threads, {time.perf_counter() - start:.0f} s")
    print("| structure | edit | Dice after 1 click | 2nd click | " + " | ".join(POLICIES) + " |")
    print("|---|---|---|---|" + "---|" * len(POLICIES))
    for structure, kind, first_dice, sign, dices in rows:
        print(f"| {structure} | {kind} | {first_dice:.3f} | {sign} | " + " | ".join(f"{d:.3f}" for d in dices) + " |")
    means = np.mean([r[4] for r in rows], axis=0)
    print(f"| mean | | {np.mean([r[2] for r in rows]):.3f} | | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
