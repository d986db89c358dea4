#!/usr/bin/env python
"""Convert nnU-Net raw datasets (v1 ``TaskXXX_Name`` or v2 ``DatasetXXX_Name``) to SAM-Med3D's training layout.

    python pretrain/convert_nnunet.py nnUNet_raw/Dataset003_Liver [more datasets ...] --output DIR [--link]

Output, one binary target per class (the official layout, read by ``pretrain/train.py --data DIR``)::

    DIR/<class_name>/<modality>_<dataset_name>/imagesTr/<case>.nii.gz   (channel 0 image, unchanged)
    DIR/<class_name>/<modality>_<dataset_name>/labelsTr/<case>.nii.gz   (uint8 {0, 1}, the label's header)

``modality`` is the lower-cased first ``channel_names`` (v2) / ``modality`` (v1) entry, e.g. ``ct``, ``mri``,
``t2``. Images are not resampled (``train.py`` resamples to 1.5 mm and caches); they are copied, or symlinked
with ``--link`` (every class of a case points at the same image). Classes whose mask is smaller than
``--min-volume-mm3`` in a case are skipped for that case (the official converter uses 10 mm^3).
nnU-Net v2 region labels (a list of values) become the union of those values.

``train.py`` also reads an nnU-Net raw folder directly (``dataset.json`` + ``imagesTr/<case>_0000.nii.gz``); this
converter is for building one pool out of many datasets, or when a per-class layout is wanted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np

LabelSpec = Union[int, List[int]]


def read_labels(meta: Dict, where: str) -> Dict[str, List[int]]:
    """``{class_name: [values]}`` (background excluded) from a v1 or v2 ``dataset.json``."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{where}: dataset.json has no 'labels' mapping")
    out: Dict[str, List[int]] = {}
    for key, value in labels.items():
        if str(key).isdigit():  # v1: {"1": "liver"}
            values, name = [int(key)], str(value)
        elif isinstance(value, (int, list)):  # v2: {"liver": 1} or region {"tumour": [1, 2]}
            values, name = ([int(value)] if isinstance(value, int) else [int(v) for v in value]), str(key)
        elif isinstance(value, str) and value.isdigit():
            values, name = [int(value)], str(key)
        else:
            raise ValueError(f"{where}: label entry {key!r}: {value!r} is not understood")
        if values == [0] or name.lower() == "background":
            continue
        out[re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip())] = values
    if not out:
        raise ValueError(f"{where}: dataset.json lists only background")
    return out


def modality_of(meta: Dict) -> str:
    """First channel's modality, lower-cased and file-name safe (``ct``, ``mri``, ...); ``img`` if unknown."""
    channels = meta.get("channel_names") or meta.get("modality") or {}
    first = channels.get("0") if isinstance(channels, dict) else None
    text = re.sub(r"[^a-z0-9]+", "", str(first or "img").lower())
    return text or "img"


def dataset_name(folder: Path) -> str:
    """``Dataset003_Liver`` / ``Task03_Liver`` -> ``Liver``."""
    m = re.match(r"^(?:Dataset|Task)\d+_(.+)$", folder.name)
    return m.group(1) if m else folder.name


def find_cases(folder: Path, file_ending: str) -> List[Tuple[str, Path, Path]]:
    """``(case, image channel 0, label)`` for every label in ``labelsTr``."""
    cases = []
    for label in sorted((folder / "labelsTr").glob(f"*{file_ending}")):
        if label.name.startswith("."):
            continue
        case = label.name[: -len(file_ending)]
        image = folder / "imagesTr" / f"{case}_0000{file_ending}"
        if not image.is_file():
            raise ValueError(f"{label}: its image {image} is missing (nnU-Net names channel 0 <case>_0000)")
        cases.append((case, image, label))
    if not cases:
        raise ValueError(f"{folder}: no labels ending in {file_ending} in labelsTr/")
    return cases


def _place_image(src: Path, dst: Path, link: bool) -> None:
    if dst.exists() or dst.is_symlink():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(os.path.relpath(src.resolve(), dst.parent.resolve()), dst)
    else:
        shutil.copy2(src, dst)


def convert(folder: Path, output: Path, link: bool = False, min_volume_mm3: float = 10.0,
            verbose: bool = True) -> Dict[str, int]:
    """Convert one nnU-Net raw dataset; returns ``{class_name: cases written}``."""
    folder = Path(folder)
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not an nnU-Net raw dataset: {meta_path} is missing")
    meta = json.loads(meta_path.read_text())
    labels = read_labels(meta, str(meta_path))
    file_ending = meta.get("file_ending", ".nii.gz")
    if file_ending not in (".nii.gz", ".nii"):
        raise ValueError(f"{folder}: file_ending {file_ending!r} is not NIfTI; convert the images to .nii.gz first")
    sub = f"{modality_of(meta)}_{dataset_name(folder)}"
    written = {name: 0 for name in labels}
    for case, image, label_path in find_cases(folder, file_ending):
        lab_img = nib.load(str(label_path))
        lab = np.asarray(lab_img.dataobj)
        voxel_mm3 = float(np.prod(lab_img.header.get_zooms()[:3]))
        for name, values in labels.items():
            mask = np.isin(lab, values)
            if mask.sum() * voxel_mm3 < min_volume_mm3:
                continue
            target = output / name / sub
            (target / "labelsTr").mkdir(parents=True, exist_ok=True)
            header = lab_img.header.copy()
            header.set_data_dtype(np.uint8)
            out = nib.Nifti1Image(mask.astype(np.uint8), lab_img.affine, header)
            nib.save(out, str(target / "labelsTr" / f"{case}.nii.gz"))
            _place_image(image, target / "imagesTr" / f"{case}{file_ending}", link)
            written[name] += 1
    if verbose:
        print(f"{folder.name}: " + ", ".join(f"{k}={v}" for k, v in written.items()), flush=True)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", help="nnU-Net raw dataset folders (with dataset.json, imagesTr, labelsTr)")
    p.add_argument("--output", required=True, help="root of the SAM-Med3D layout to write")
    p.add_argument("--link", action="store_true", help="symlink images instead of copying them")
    p.add_argument("--min-volume-mm3", type=float, default=10.0, help="skip smaller masks (official: 10)")
    args = p.parse_args(argv)
    try:
        for folder in args.datasets:
            convert(Path(folder), Path(args.output), link=args.link, min_volume_mm3=args.min_volume_mm3)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
