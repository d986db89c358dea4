#!/usr/bin/env python
"""How ``pretrain/`` scales with the data: indexing, preparation, cache size, reads per sample, step time.

    python benchmarks/pretrain_scale.py [--sizes 8 24 72] [--shape 40] [--steps 2] [--procs 1]
                                        [--baseline-rev REV] [--real-size]

For each size N it writes a synthetic dataset in the official SA-Med3D layout
(``<category>/<modality_dataset>/imagesTr|labelsTr``) with N images, each copied byte for byte into the class
folders it has a mask in (about 6.5 masks per image, as SA-Med3D-140K's 143k masks of 22k volumes), then:

- index: discovering the cases and grouping masks by image (what every process does at start-up);
- prepare: ``pretrain.prepare.prepare`` in one process (seconds per image and per mask);
- cache bytes per image and per mask, and the cache's size against the source files (copies included);
- open: opening the prepared cache as training does at start-up (no decoding);
- reads per sample: compressed bytes a training sample reads (its mask plus the image blocks its crop touches);
- train: ``pretrain/train.py`` (vit_mini) for ``--steps`` steps on ``--procs`` processes: the run's wall time
  (start-up included), samples/s after the first step and peak memory of rank 0.

``--baseline-rev REV`` repeats index, cache fill, cache size and the training run with ``pretrain/`` as it
was at git revision REV (a per-mask cache filled inside the training start). ``--real-size`` adds one CT of
a typical size (512 x 512 x 160 voxels of 0.8 x 0.8 x 2 mm, int16) to measure preparation time and bytes per
image where they matter. The last table extrapolates linearly to 22,000 images and 143,000 masks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REAL_IMAGES, REAL_MASKS = 22_000, 143_000
CATEGORIES = ["liver", "kidney", "spleen", "pancreas", "aorta", "lung", "heart", "stomach", "bladder", "colon",
              "gallbladder", "esophagus"]
MINI = REPO / "pretrain" / "configs" / "vit_mini.yaml"


def make_official(root: Path, images: int, shape: int, seed: int = 0, spacing=(1.0, 1.0, 1.0),
                  masks_per_image: float = REAL_MASKS / REAL_IMAGES) -> Dict[str, int]:
    """Synthetic official layout; returns counts and source bytes (every copy counted)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    dims = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    axes = np.ogrid[tuple(slice(0, n) for n in dims)]
    affine = np.diag([*spacing, 1.0])

    def inside(centre, radii) -> np.ndarray:
        return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii)) < 1

    masks = 0
    for i in range(images):
        dataset = f"ct_synth{i % 7}"
        body = inside(np.asarray(dims) / 2, np.asarray(dims) * 0.45)
        image = np.where(body, 40 + rng.normal(0, 12, dims), -1000).astype(np.int16)
        k = int(np.clip(rng.poisson(masks_per_image - 1) + 1, 1, len(CATEGORIES)))
        first: Optional[Path] = None
        labels = []
        for category in rng.choice(CATEGORIES, size=k, replace=False):
            centre = rng.uniform(0.3, 0.7, 3) * np.asarray(dims)
            radius = rng.uniform(0.06, 0.15) * min(dims)
            labels.append((str(category), inside(centre, [radius] * 3).astype(np.uint8)))
        for _, label in labels:
            image[label > 0] += 60
        for category, label in labels:
            folder = root / category / dataset
            (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
            (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
            target = folder / "imagesTr" / f"case{i}.nii.gz"
            if first is None:
                nib.save(nib.Nifti1Image(image, affine), str(target))
                first = target
            else:  # the official layout repeats the image file in every class folder
                shutil.copy(first, target)
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / f"case{i}.nii.gz"))
            masks += 1
    source = sum(p.stat().st_size for p in root.rglob("*.nii.gz"))
    return {"images": images, "masks": masks, "source_bytes": source}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def train_run(train_py: Path, data: Path, cache: Path, out: Path, steps: int, procs: int,
              env: Dict[str, str]) -> Dict[str, object]:
    cmd = [str(train_py), "--config", str(MINI), "--data", str(data), "--output", str(out), "--cache-dir", str(cache),
           "--max-steps", str(steps), "--device", "cpu", "--no-progress", "--threads", "1",
           "--set", "log.every_steps=1", "--set", "val.every_steps=0", "--set", "data.val_fraction=0",
           "--set", "data.val_max_targets=1", "--set", "val.clicks=1", "--set", "clicks.num_click_iterations=2",
           "--set", "data.num_workers=0", "--set", "data.min_target_voxels=50"]
    cmd = ([sys.executable, *cmd] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:160], "wall_s": wall}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["kind"] == "train"]
    rates = [r["samples_per_s"] for r in rows[1:]] or [r["samples_per_s"] for r in rows]
    batch = 2 * procs
    return {"wall_s": wall, "step_s": batch / float(np.mean(rates)),
            "rss_gb": max(r.get("peak_rss_gb", 0.0) for r in rows)}


def measure_after(data: Path, cache: Path, samples: int) -> Dict[str, float]:
    from pretrain import cache as pcache, data as pdata, prepare as pprep
    from pretrain.config import load_config

    spacing, margin = pprep.cache_settings(load_config(MINI))
    import monai.transforms  # noqa: F401  (imports are not preparation time: the baseline's happen before timing)
    import sam_med3d.training  # noqa: F401
    t0 = time.perf_counter()
    cases = pdata.discover_cases([data])
    entries = pcache.plan_entries(cases)
    index_s = time.perf_counter() - t0
    layout = pcache.CacheLayout(cache, spacing, margin)
    t0 = time.perf_counter()
    pprep.prepare(cases, entries, layout)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = pdata.PreparedData(cases, cache, spacing, margin)
    open_s = time.perf_counter() - t0
    targets = pdata.make_targets(cases, prepared.keys, prepared.counts, 50)
    ds = pdata.TargetDataset(prepared, targets, 64, jitter=4, memory_cases=0)
    n = min(samples, len(ds))
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    sample_s = (time.perf_counter() - t0) / n
    return {"index_s": index_s, "prep_s": prep_s, "open_s": open_s, "cache_bytes": du(layout.dir),
            "read_bytes_per_sample": ds.reader.bytes_read / n, "sample_ms": 1e3 * sample_s,
            "images_stored": prepared.images}


def measure_before(old_repo: Path, data: Path, cache: Path) -> Dict[str, float]:
    """The per-mask cache of ``pretrain/data.py`` at the baseline revision, imported from ``old_repo``."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(old_repo)!r})
from pathlib import Path
from pretrain import data as pdata
t0 = time.perf_counter()
cases = pdata.discover_cases([{str(data)!r}])
index_s = time.perf_counter() - t0
cache = pdata.CaseCache(cases, {str(cache)!r}, spacing_mm=1.5, margin=pdata.max_window_margin(64, 4))
t0 = time.perf_counter()
cache.compute_counts(range(len(cases)))
fill_s = time.perf_counter() - t0
sizes = [p.stat().st_size for p in Path(cache.dir).iterdir() if p.suffix == ".pt"]
print(json.dumps({{"index_s": index_s, "prep_s": fill_s, "cache_files": len(sizes),
                  "read_bytes_per_sample": sum(sizes) / max(len(sizes), 1)}}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["cache_bytes"] = du(cache)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[8, 24, 72], help="numbers of images")
    p.add_argument("--shape", type=int, default=40, help="edge of the synthetic volumes (voxels of 1 mm)")
    p.add_argument("--steps", type=int, default=2, help="training steps per run (0: no training runs)")
    p.add_argument("--procs", type=int, default=1, help="training processes (torchrun when > 1)")
    p.add_argument("--samples", type=int, default=20, help="samples read to measure bytes and time per sample")
    p.add_argument("--baseline-rev", default=None, help="git revision of the 'before' pretrain/ (e.g. a commit)")
    p.add_argument("--real-size", action="store_true", help="also prepare one CT of a typical size")
    args = p.parse_args(argv)

    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)  # as the baseline and training subprocesses (OMP_NUM_THREADS=1): equal conditions
    rows = []
    with tempfile.TemporaryDirectory(prefix="pretrain_scale_") as tmp:
        tmp = Path(tmp)
        old_repo = None
        if args.baseline_rev:
            old_repo = tmp / "baseline"
            old_repo.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline_rev, "pretrain"], cwd=str(REPO),
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old_repo)], input=archive, check=True)
        for n in args.sizes:
            data = tmp / f"data_{n}"
            src = make_official(data, n, args.shape, seed=n)
            after = measure_after(data, tmp / f"cache_{n}", args.samples)
            row = {"n": n, **src, "after": after}
            if args.steps:
                row["after_train"] = train_run(REPO / "pretrain" / "train.py", data, tmp / f"cache_{n}",
                                               tmp / f"run_{n}", args.steps, args.procs, env)
            if old_repo is not None:
                row["before"] = measure_before(old_repo, data, tmp / f"old_cache_{n}")
                if args.steps:  # cold: the old trainer fills its cache inside the start-up
                    row["before_train"] = train_run(old_repo / "pretrain" / "train.py", data,
                                                    tmp / f"old_cache_cold_{n}", tmp / f"old_run_{n}", args.steps,
                                                    args.procs, env)
            rows.append(row)
            print(f"  N={n}: {json.dumps(row)}", file=sys.stderr, flush=True)
            shutil.rmtree(data)
        real = None
        if args.real_size:
            data = tmp / "real"
            src = make_official(data, 1, (512, 512, 160), seed=1, spacing=(0.8, 0.8, 2.0), masks_per_image=6.5)
            real = {**src, "after": measure_after(data, tmp / "cache_real", 5)}
            if old_repo is not None:
                real["before"] = measure_before(old_repo, data, tmp / "old_cache_real")
            print(f"  real size: {json.dumps(real)}", file=sys.stderr, flush=True)

    mb = 2 ** 20
    print(f"\npretrain at scale, synthetic official layout ({args.shape}^3 voxels of 1 mm per image; "
          f"CPU: {os.cpu_count()} cores, torch {torch.__version__})\n")
    print("| code | images | masks | index (s) | prepare (s/image) | prepare (s/mask) | cache / source | "
          "cache KiB/image | cache KiB/mask | read KiB/sample | open (s) | train wall (s) | step (s) | "
          "peak RSS rank 0 (GiB) |")
    print("|---" * 14 + "|")
    for row in rows:
        for code in ("before", "after"):
            m = row.get(code)
            if m is None:
                continue
            t = row.get(f"{code}_train", {})
            train = ("failed" if "error" in t else f"{t['wall_s']:.0f} | {t['step_s']:.2f} | {t['rss_gb']:.2f}"
                     ) if t else "- | - | -"
            print(f"| {code} | {row['images']} | {row['masks']} | {m['index_s']:.2f} | "
                  f"{m['prep_s'] / row['images']:.2f} | {m['prep_s'] / row['masks']:.2f} | "
                  f"{m['cache_bytes'] / row['source_bytes']:.2f} | {m['cache_bytes'] / row['images'] / 1024:.0f} | "
                  f"{m['cache_bytes'] / row['masks'] / 1024:.0f} | {m['read_bytes_per_sample'] / 1024:.0f} | "
                  f"{m.get('open_s', float('nan')):.2f} | {train} |")
    if real:
        print(f"\none CT of 512 x 512 x 160 voxels (0.8 x 0.8 x 2 mm, int16) with {real['masks']} masks "
              f"(source {real['source_bytes'] / mb:.1f} MiB with its copies):\n")
        print("| code | prepare (s/image) | cache (MiB/image) | cache / source | read MiB/sample |")
        print("|---|---|---|---|---|")
        for code in ("before", "after"):
            m = real.get(code)
            if m is not None:
                print(f"| {code} | {m['prep_s']:.1f} | {m['cache_bytes'] / mb:.1f} | "
                      f"{m['cache_bytes'] / real['source_bytes']:.2f} | {m['read_bytes_per_sample'] / mb:.2f} |")
    big = rows[-1]
    print(f"\nlinear extrapolation to {REAL_IMAGES:,} images / {REAL_MASKS:,} masks: index time from "
          f"N={big['images']}; "
          "preparation and cache from the real-size CT when measured, else from the synthetic volumes\n")
    print("| code | index (s) | prepare (core-hours) | cache (GiB) | cache files |")
    print("|---|---|---|---|---|")
    for code in ("before", "after"):
        m = big.get(code)
        if m is None:
            continue
        index_s = m["index_s"] / big["masks"] * REAL_MASKS
        basis = real[code] if real and code in real else m
        per_image_s = basis["prep_s"] / (real["images"] if basis is not m else big["images"])
        per_image_bytes = basis["cache_bytes"] / (real["images"] if basis is not m else big["images"])
        files = f"{REAL_IMAGES:,} in 256 folders" if code == "after" else f"{REAL_MASKS:,} in one folder"
        print(f"| {code} | {index_s:.0f} | {per_image_s * REAL_IMAGES / 3600:.0f} | "
              f"{per_image_bytes * REAL_IMAGES / 2 ** 30:.0f} | {files} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
