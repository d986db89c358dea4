"""Interactive evaluation with simulated clicks: Dice and NSD after 1, 3, 5, 10 clicks (the paper's protocol).

Usage::

    python -m sam_med3d.evaluate --data DIR [DIR ...] --checkpoint turbo --clicks 1,3,5,10 --output OUT \\
        [--method sam_med3d random_walker] [--click-mode random|center] [--seed 0] [--nsd-tolerance-mm 2] \\
        [--labels spleen,1,...] [--max-labels-per-case N] [--max-cases N] [--device cpu]

Protocol, for every case and every foreground label present in its label map:

1. The first click is simulated on an empty prediction; every later click from the error of the current
   prediction (:mod:`sam_med3d.clicks`: ``random`` = official SAM-Med3D, a uniform voxel of the error region;
   ``center`` = CVPR 2025 challenge, the centre of the largest error component). Clicks are voxel indices of
   the original scan grid, computed against the ground truth on that grid.
2. The method is called with *all* clicks so far (``predict(points, labels, label_key=...)``); it decides its
   own crop from the clicks (never from the ground truth) and returns a mask on the original grid.
3. Dice and NSD (tolerance in mm, spacing from the affine) are recorded after each click in the original geometry.

Every (method, case, label) gets its own random generator seeded from ``--seed`` and the case/label names, so
results do not depend on the order, on ``--max-cases`` or on which other methods run, and both methods see the
same first click.

Data layouts found under each ``--data`` DIR (searched recursively for folders holding ``imagesTr`` and
``labelsTr``):

- the development-set layout: ``<dataset>/imagesTr/<case>.nii.gz``, ``<dataset>/labelsTr/<case>.nii.gz``,
  ``<dataset>/dataset.json`` with ``"labels": {"0": "background", "1": "spleen", ...}``;
- nnU-Net raw: ``imagesTr/<case>_0000.nii.gz`` (first channel is used), ``labelsTr/<case>.nii.gz``,
  ``dataset.json`` with ``"labels": {"background": 0, "spleen": 1}`` (v2) or value -> name (v1);
- the official SAM-Med3D layout ``<root>/<category>/<dataset>/imagesTr|labelsTr`` with binary masks and no
  dataset.json: label 1 is named after ``<category>``.

Outputs in ``OUT``: ``per_case.csv``, ``summary.json``, ``dice_vs_clicks.png`` (see ``docs/evaluation.md``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .clicks import CLICK_MODES, next_click
from .metrics import dice, normalized_surface_dice

logger = logging.getLogger(__name__)

#: ``sam_med3d`` uses the predictor's default extension (structures larger than a crop are followed across
#: crops, ``slide``); ``sam_med3d_one_crop`` turns it off (the official single crop); ``sam_med3d_zoom`` uses the
#: coarse-then-fine strategy (see ``sam_med3d.extension``).
SAM_VARIANTS = {"sam_med3d": "slide", "sam_med3d_one_crop": None, "sam_med3d_zoom": "zoom"}
METHODS = tuple(SAM_VARIANTS) + ("random_walker",)
CSV_FIELDS = ("method", "dataset", "case", "label", "label_name", "larger_than_crop", "clicks", "dice", "nsd",
              "crops", "seconds")
#: Field of view of one crop of the official models: 128 voxels of 1.5 mm.
CROP_FOV_MM = 128 * 1.5
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


# --------------------------------------------------------------------------------------------- data discovery


@dataclass
class Case:
    """One image + label map. ``labels``: value -> name for the dataset's declared foreground labels."""

    dataset: str
    case: str
    image: Path
    label: Path
    labels: Dict[int, str] = field(default_factory=dict)


def _strip_suffix(name: str) -> Optional[str]:
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def label_names(dataset_dir: Path, root: Path) -> Dict[int, str]:
    """value -> name from dataset.json (both nnU-Net v1 value->name and v2 name->value), background dropped.

    Without dataset.json (official SAM-Med3D layout) label 1 is named after the category folder
    (``<root>/<category>/<dataset>``) and other values get ``label_<v>`` when they are met.
    """
    meta = dataset_dir / "dataset.json"
    names: Dict[int, str] = {}
    if meta.is_file():
        try:
            raw = json.loads(meta.read_text()).get("labels", {})
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta} is not valid JSON: {err}") from err
        for key, value in raw.items():
            if str(key).lstrip("-").isdigit():          # v1 / development set: {"1": "spleen"}
                names[int(key)] = str(value)
            elif isinstance(value, int) or (isinstance(value, str) and value.isdigit()):  # v2: {"spleen": 1}
                names[int(value)] = str(key)
            # nnU-Net v2 region labels ({"whole_tumor": [1, 2, 3]}) are not single values; they are left out.
        names.pop(0, None)
        return names
    if dataset_dir.parent != root and dataset_dir != root:
        names[1] = dataset_dir.parent.name
    return names


def _dataset_dirs(root: Path) -> List[Path]:
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        return [root]
    found = sorted({p.parent for p in root.rglob("imagesTr") if p.is_dir() and (p.parent / "labelsTr").is_dir()})
    return found


def discover_cases(roots: Sequence[os.PathLike]) -> List[Case]:
    """Every (image, label) pair under the given folders, sorted by dataset then case.

    Raises:
        ValueError: a folder that does not exist or holds no ``imagesTr``/``labelsTr`` pair, or a label map
            without a matching image.
    """
    cases: List[Case] = []
    for root_in in roots:
        root = Path(root_in)
        if not root.is_dir():
            raise ValueError(f"--data folder {root} does not exist")
        dirs = _dataset_dirs(root)
        if not dirs:
            raise ValueError(f"--data folder {root} holds no dataset (no folder with imagesTr/ and labelsTr/)")
        for ds in dirs:
            dataset = ds.name if ds == root else ds.relative_to(root).as_posix()
            names = label_names(ds, root)
            images = {}
            for img in (ds / "imagesTr").iterdir():
                stem = _strip_suffix(img.name)
                if stem is None or img.name.startswith("."):
                    continue
                if stem.endswith("_0000"):      # nnU-Net channel 0
                    images.setdefault(stem[:-5], img)
                elif len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                    continue                     # other nnU-Net channels
                else:
                    images[stem] = img
            for lab in sorted((ds / "labelsTr").iterdir()):
                stem = _strip_suffix(lab.name)
                if stem is None or lab.name.startswith("."):
                    continue
                if stem not in images:
                    raise ValueError(f"label map {lab} has no image in {ds / 'imagesTr'} (looked for {stem}.* "
                                     f"and {stem}_0000.*)")
                cases.append(Case(dataset=dataset, case=stem, image=images[stem], label=lab, labels=dict(names)))
    return cases


def load_label_map(path: Path, shape: Tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Integer label map on the image's grid, indexed (i, j, k) like :func:`sam_med3d.io.load_scan`.

    Raises:
        ValueError: when the label grid (shape or affine) differs from the image's.
    """
    import nibabel as nib
    import SimpleITK as sitk

    from .io import sitk_ras_affine

    name = str(path)
    if name.lower().endswith((".nii", ".nii.gz")):
        img = nib.load(name)
        arr = np.asarray(img.dataobj)
        lab_affine = np.asarray(img.affine, dtype=float)
    else:
        img = sitk.ReadImage(name)
        arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        lab_affine = sitk_ras_affine(img)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"label map {name} has shape {'x'.join(map(str, arr.shape))} but its image has "
                         f"{'x'.join(map(str, shape))}; labels must be on the image grid")
    if not np.allclose(lab_affine, affine, atol=1e-3 * max(1.0, float(np.abs(affine[:3, :3]).max()))):
        raise ValueError(f"label map {name} has a different affine from its image; labels must be on the image grid")
    return np.rint(arr).astype(np.int32)


# ------------------------------------------------------------------------------------------------- methods


def larger_than_crop(mask: np.ndarray, spacing: Sequence[float], fov_mm: float = CROP_FOV_MM) -> bool:
    """Whether a structure's bounding box is longer than one crop's field of view along some axis."""
    found = np.argwhere(mask)
    if not len(found):
        return False
    extent = (found.max(0) - found.min(0) + 1) * np.asarray(spacing, dtype=np.float64)
    return bool(np.any(extent > fov_mm))


def make_method(name: str, args: argparse.Namespace):
    """A predictor with ``set_image(array, affine)`` / ``predict(points, labels, label_key)`` / ``reset()``."""
    if name in SAM_VARIANTS:
        if not args.checkpoint:
            raise ValueError(f"--checkpoint is required for --method {name} (a path, a URL, 'turbo' or 'bundled')")
        from .checkpoint import load_model
        from .extension import ExtensionConfig
        from .predictor import Sam3DPredictor

        model = getattr(args, "_loaded_model", None)
        if model is None:  # one model shared by the SAM-Med3D variants
            model = args._loaded_model = load_model(args.checkpoint, device=args.device)
        strategy = SAM_VARIANTS[name]
        extension = ExtensionConfig(enabled=False) if strategy is None else ExtensionConfig(
            strategy=strategy, max_crops=args.max_crops, time_budget_s=args.extension_time_s)
        return Sam3DPredictor(model, device=args.device, extension=extension)
    if name == "random_walker":
        from .random_walker import RandomWalkerPredictor

        return RandomWalkerPredictor(crop_size=args.rw_crop_size or 128, work_size=args.rw_work_size,
                                     beta=args.rw_beta)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


# -------------------------------------------------------------------------------------------- the main loop


def _seed_for(seed: int, *names: Any) -> np.random.Generator:
    # crc32 is stable across processes (unlike hash()), so a case gets the same clicks in every run.
    key = zlib.crc32("\x1f".join(str(n) for n in names).encode("utf-8"))
    return np.random.default_rng([int(seed), int(key)])


def _select_labels(case: Case, present: Iterable[int], wanted: Optional[List[str]],
                   max_per_case: Optional[int]) -> Tuple[List[Tuple[int, str]], List[Dict[str, Any]]]:
    """(labels to evaluate, skipped records) for one case."""
    present = sorted(int(v) for v in present if v != 0)
    names = dict(case.labels)
    for v in present:
        names.setdefault(v, f"label_{v}")

    def chosen(v: int) -> bool:
        return wanted is None or str(v) in wanted or names[v] in wanted

    todo = [(v, names[v]) for v in present if chosen(v)]
    skipped = [{"dataset": case.dataset, "case": case.case, "label": v, "label_name": n,
                "reason": "absent from this case (0 voxels)"}
               for v, n in sorted(case.labels.items()) if v not in present and chosen(v)]
    if max_per_case is not None:
        todo = todo[:max_per_case]
    return todo, skipped


def evaluate_label(predictor, gt: np.ndarray, spacing: Sequence[float], clicks: Sequence[int],
                   rng: np.random.Generator, click_mode: str, tolerance_mm: float,
                   label_key: str) -> List[Dict[str, Any]]:
    """Simulate ``max(clicks)`` clicks on one binary target; one record per requested click count.

    Args:
        predictor: an object whose image is already set (``set_image``).
        gt: (I, J, K) bool ground truth on the scan's grid.
        spacing: voxel size in mm along i, j, k (for NSD).
        clicks: click counts to report, e.g. (1, 3, 5, 10).

    Returns:
        ``[{"clicks", "dice", "nsd", "seconds"}]``; when no error is left before the last click, later counts
        repeat the (perfect) last result with ``seconds`` 0.
    """
    report = set(int(c) for c in clicks)
    points: List[np.ndarray] = []
    labels: List[int] = []
    pred = np.zeros(gt.shape, dtype=bool)
    records: List[Dict[str, Any]] = []
    last: Optional[Dict[str, Any]] = None
    if hasattr(predictor, "reset"):
        predictor.reset(label_key)
    for k in range(1, max(report) + 1):
        # The centre click's distance transform is in voxel units, as in the challenge's evaluation script.
        click = next_click(pred, gt, rng, mode=click_mode)
        if click is None:  # perfect already: nothing left to click
            if k in report and last is not None:
                records.append(dict(last, clicks=k, seconds=0.0))
            continue
        points.append(click[0])
        labels.append(click[1])
        start = time.perf_counter()
        result = predictor.predict(np.stack(points), np.asarray(labels, dtype=np.int64), label_key=label_key)
        seconds = time.perf_counter() - start
        mask = np.asarray(result.mask)
        if mask.shape != gt.shape:
            raise ValueError(f"the predictor returned a mask of shape {mask.shape}, the scan is {gt.shape}")
        pred = mask > 0
        last = {"clicks": k, "dice": dice(pred, gt), "nsd": normalized_surface_dice(pred, gt, spacing, tolerance_mm),
                "crops": len(getattr(result, "crop_boxes", ())) or 1, "seconds": seconds}
        if k in report:
            records.append(dict(last))
    return records


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate every method on every case; write the CSV, the JSON summary and the plot. Returns the summary."""
    from tqdm import tqdm

    from .io import load_scan

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cases = discover_cases(args.data)
    if args.max_cases is not None:
        per_dataset: Dict[str, int] = {}
        kept = []
        for c in cases:
            per_dataset[c.dataset] = per_dataset.get(c.dataset, 0) + 1
            if per_dataset[c.dataset] <= args.max_cases:
                kept.append(c)
        cases = kept
    if not cases:
        raise ValueError(f"no cases found under {', '.join(map(str, args.data))}")
    methods = {name: make_method(name, args) for name in args.method if name in SAM_VARIANTS}
    if args.rw_crop_size is None and methods:
        args.rw_crop_size = next(iter(methods.values())).img_size  # the same crop as the model's
    if args.rw_crop_size is None and "random_walker" in args.method:
        args.rw_crop_size = 128  # the official models' crop; recorded in summary.json
    methods.update({name: make_method(name, args) for name in args.method if name not in SAM_VARIANTS})
    methods = {name: methods[name] for name in args.method}

    rows: List[Dict[str, Any]] = []
    skipped: List[Dict[str, Any]] = []
    bar = tqdm(total=len(cases), desc="cases", unit="case", disable=args.quiet)
    for case in cases:
        bar.set_postfix_str(f"{case.dataset}/{case.case}")
        scan = load_scan(case.image, detached_ok=True)  # the user's own dataset: .mhd/.nhdr are fine here
        spacing = [float(s) for s in scan.spacing_mm]
        label_map = load_label_map(case.label, scan.shape, scan.affine)
        todo, skip = _select_labels(case, np.unique(label_map), args.labels, args.max_labels_per_case)
        skipped.extend(skip)
        fov_mm = (args.rw_crop_size or 128) * 1.5
        large = {value: larger_than_crop(label_map == value, spacing, fov_mm) for value, _ in todo}
        if args.larger_than_crop_only:
            todo = [(value, name) for value, name in todo if large[value]]
        for method_name, predictor in methods.items():
            predictor.set_image(scan.array, affine=scan.affine)
            for n_done, (value, label_name) in enumerate(todo):
                bar.set_postfix_str(f"{case.dataset}/{case.case} {method_name} label {n_done + 1}/{len(todo)}")
                gt = label_map == value
                rng = _seed_for(args.seed, case.dataset, case.case, value)
                try:
                    records = evaluate_label(predictor, gt, spacing, args.clicks, rng, args.click_mode,
                                             args.nsd_tolerance_mm, label_key=f"label_{value}")
                except ValueError as err:
                    # A label the method cannot be prompted on (e.g. it vanishes when resampled): skipped, not 0.
                    skipped.append({"dataset": case.dataset, "case": case.case, "label": value,
                                    "label_name": label_name, "method": method_name, "reason": str(err)})
                    logger.warning("%s %s/%s label %s skipped: %s", method_name, case.dataset, case.case,
                                   value, err)
                    continue
                for rec in records:
                    rows.append({"method": method_name, "dataset": case.dataset, "case": case.case, "label": value,
                                 "label_name": label_name, "larger_than_crop": int(large[value]), **rec})
        bar.update(1)
    bar.close()

    _write_csv(out / "per_case.csv", rows)
    summary = summarize(rows, skipped, list(args.method), args.clicks)
    summary["config"] = {"data": [str(d) for d in args.data], "checkpoint": args.checkpoint,
                         "clicks": list(args.clicks), "click_mode": args.click_mode, "seed": args.seed,
                         "nsd_tolerance_mm": args.nsd_tolerance_mm, "labels": args.labels,
                         "max_labels_per_case": args.max_labels_per_case, "max_cases": args.max_cases,
                         "device": args.device, "rw_crop_size": args.rw_crop_size,
                         "rw_work_size": args.rw_work_size, "rw_beta": args.rw_beta,
                         "max_crops": args.max_crops, "extension_time_s": args.extension_time_s,
                         "larger_than_crop_only": args.larger_than_crop_only, "n_cases": len(cases)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_dice_vs_clicks(rows, out / "dice_vs_clicks.png", list(args.method), args.clicks)
    return summary


# ----------------------------------------------------------------------------------------------- outputs


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})


def _mean(values: List[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def _method_block(rows: List[Dict[str, Any]], clicks: Sequence[int]) -> Dict[str, Any]:
    block: Dict[str, Any] = {"dice": {}, "nsd": {}, "dice_std": {}, "seconds_mean": {}, "per_label": {},
                             "per_dataset": {}}
    for k in clicks:
        at_k = [r for r in rows if r["clicks"] == k]
        block["dice"][str(k)] = _mean([r["dice"] for r in at_k])
        block["nsd"][str(k)] = _mean([r["nsd"] for r in at_k])
        block["dice_std"][str(k)] = float(np.std([r["dice"] for r in at_k])) if at_k else None
        block["seconds_mean"][str(k)] = _mean([r["seconds"] for r in at_k])
    for key_name, key in (("per_label", lambda r: f"{r['dataset']}/{r['label_name']}"),
                          ("per_dataset", lambda r: r["dataset"])):
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(key(r), []).append(r)
        for name, items in sorted(groups.items()):
            block[key_name][name] = {
                "n": len({(r["case"], r["label"]) for r in items}),
                "dice": {str(k): _mean([r["dice"] for r in items if r["clicks"] == k]) for k in clicks},
                "nsd": {str(k): _mean([r["nsd"] for r in items if r["clicks"] == k]) for k in clicks},
            }
    block["groups"] = {}
    for group, flag in (("larger_than_crop", 1), ("fits_one_crop", 0)):
        items = [r for r in rows if int(r.get("larger_than_crop", 0)) == flag]
        block["groups"][group] = {
            "n": len({(r["dataset"], r["case"], r["label"]) for r in items}),
            "dice": {str(k): _mean([r["dice"] for r in items if r["clicks"] == k]) for k in clicks},
            "nsd": {str(k): _mean([r["nsd"] for r in items if r["clicks"] == k]) for k in clicks},
            "crops_mean": {str(k): _mean([float(r.get("crops", 1)) for r in items if r["clicks"] == k])
                           for k in clicks},
            "seconds_mean": {str(k): _mean([r["seconds"] for r in items if r["clicks"] == k]) for k in clicks},
        }
    block["n_evaluated"] = len({(r["dataset"], r["case"], r["label"]) for r in rows})
    return block


def summarize(rows: List[Dict[str, Any]], skipped: List[Dict[str, Any]], methods: List[str],
              clicks: Sequence[int]) -> Dict[str, Any]:
    """``{"dice": {"1": ..}, "nsd": {..}, "per_label": {..}, "skipped": [..], "methods": {name: block}}``.

    Means are over (case, label) instances. The top-level ``dice``/``nsd``/``per_label`` are those of the first
    method; ``methods`` holds one block per method.
    """
    blocks = {m: _method_block([r for r in rows if r["method"] == m], clicks) for m in methods}
    first = blocks[methods[0]]
    return {"dice": first["dice"], "nsd": first["nsd"], "per_label": first["per_label"], "skipped": skipped,
            "methods": blocks}


def plot_dice_vs_clicks(rows: List[Dict[str, Any]], path: Path, methods: List[str], clicks: Sequence[int]) -> None:
    """Mean Dice vs clicks, one bold line (± std error bars) per method, faint lines per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ks = sorted(int(k) for k in clicks)
    for i, m in enumerate(methods):
        color = colors[i % len(colors)]
        mine = [r for r in rows if r["method"] == m]
        for ds in sorted({r["dataset"] for r in mine}):
            ys = [_mean([r["dice"] for r in mine if r["dataset"] == ds and r["clicks"] == k]) for k in ks]
            ax.plot(ks, [np.nan if y is None else y for y in ys], color=color, alpha=0.18, linewidth=1)
        means = [_mean([r["dice"] for r in mine if r["clicks"] == k]) for k in ks]
        stds = [float(np.std([r["dice"] for r in mine if r["clicks"] == k])) if means[j] is not None else np.nan
                for j, k in enumerate(ks)]
        n = len({(r["dataset"], r["case"], r["label"]) for r in mine})
        ax.errorbar(ks, [np.nan if y is None else y for y in means], yerr=stds, color=color, linewidth=2.2,
                    marker="o", capsize=4, label=f"{m} (n={n})")
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("Dice")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title("Dice vs clicks (mean ± std over labels; faint: per dataset)")
    ax.legend(loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- CLI


def _click_list(text: str) -> List[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clicks must be comma-separated integers like 1,3,5,10, got {text!r}")
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--clicks must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam-med3d-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="dataset folder(s) or parent folder(s) of datasets")
    p.add_argument("--checkpoint", default=None,
                   help="SAM-Med3D weights: a path, a URL, 'turbo' or 'bundled' (needed for --method sam_med3d)")
    p.add_argument("--clicks", type=_click_list, default=[1, 3, 5, 10], help="click counts to report (1,3,5,10)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--click-mode", choices=CLICK_MODES, default="random",
                   help="random: official SAM-Med3D error click; center: CVPR 2025 challenge centre click")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["sam_med3d"], help="method(s) to evaluate")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the simulated clicks (each case/label gets its own stream; default 0)")
    p.add_argument("--nsd-tolerance-mm", type=float, default=2.0,
                   help="Normalized Surface Dice tolerance in mm (default 2)")
    p.add_argument("--labels", default=None,
                   help="comma-separated label values or names to evaluate (default: every label present)")
    p.add_argument("--max-labels-per-case", type=int, default=None,
                   help="evaluate at most the first N labels (by value) of each case (default: all)")
    p.add_argument("--max-cases", type=int, default=None, help="at most N cases per dataset (default: all)")
    p.add_argument("--device", default="cpu", help="torch device for SAM-Med3D, e.g. cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rw-crop-size", type=int, default=None,
                   help="random_walker: crop edge in 1.5 mm voxels (default: the SAM-Med3D model's crop when both "
                        "are evaluated, else 128 as the official model)")
    p.add_argument("--rw-work-size", type=int, default=64,
                   help="random_walker: the crop is resampled to this edge for the solver (default 64)")
    p.add_argument("--rw-beta", type=float, default=3000.0, help="random_walker: edge weight beta (default 3000)")
    p.add_argument("--max-crops", type=int, default=12,
                   help="sam_med3d / sam_med3d_zoom: most crops per structure larger than a crop (default 12)")
    p.add_argument("--extension-time-s", type=float, default=60.0,
                   help="sam_med3d / sam_med3d_zoom: time budget of the extension per click (default 60 s)")
    p.add_argument("--larger-than-crop-only", action="store_true",
                   help="evaluate only structures whose bounding box exceeds one crop (192 mm for 128^3 crops)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``sam-med3d-evaluate``); returns 0 on success, 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None:
        args.labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    for name in ("max_cases", "max_labels_per_case"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.nsd_tolerance_mm < 0 or not math.isfinite(args.nsd_tolerance_mm):
        parser.error(f"--nsd-tolerance-mm must be a finite number >= 0, got {args.nsd_tolerance_mm}")
    args.method = list(dict.fromkeys(args.method))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from .checkpoint import CheckpointError

    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        # Bad input (data, labels, options) or weights that cannot be found/read: one line, no traceback.
        print(f"sam-med3d-evaluate: error: {err}", file=sys.stderr)
        return 2
    for m, block in summary["methods"].items():
        dice_txt = "  ".join(f"{k}:{v:.3f}" for k, v in block["dice"].items() if v is not None)
        nsd_txt = "  ".join(f"{k}:{v:.3f}" for k, v in block["nsd"].items() if v is not None)
        print(f"{m}: n={block['n_evaluated']}  Dice {dice_txt}  |  NSD {nsd_txt}")
    print(f"skipped: {len(summary['skipped'])}; results in {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
