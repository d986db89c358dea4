#!/usr/bin/env python
"""Synthetic CT-like (or MR-like) torso phantoms with organ labels, so a new server has real-looking studies offline.

Usage::

    python sample-datasets/make_samples.py --output DIR [--num-cases N] [--seed S] [--layout studies|training]
        [--unlabeled K] [--in-plane PX] [--modality ct|mr]

``--layout studies`` (default) writes a MONAI Label studies folder (images at the top level, labels in
``labels/final/``); ``--unlabeled K`` keeps the labels of the last K cases in ``ground_truth/`` so the server
offers them for annotation; ``--layout training`` writes ``imagesTr``/``labelsTr`` (what ``pretrain/`` and the
evaluator read). The generator itself is :mod:`sam_med3d.phantoms` (how a phantom is made, determinism).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from sam_med3d.phantoms import LABELS, MODALITIES, ORIENTATIONS, generate_case, write_dataset  # noqa: F401


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="folder to write (created if needed)")
    parser.add_argument("--num-cases", type=int, default=4, help="number of cases (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--layout", choices=("studies", "training"), default="studies",
                        help="studies: MONAI Label studies folder (images + labels/final); "
                             "training: imagesTr/labelsTr (default studies)")
    parser.add_argument("--unlabeled", type=int, default=0,
                        help="studies layout: keep the labels of the last K cases out of labels/final (in "
                             "ground_truth/), so the server offers them for annotation (default 0)")
    parser.add_argument("--in-plane", type=int, default=256,
                        help="pixels per in-plane axis (default 256, ~1.4 mm; 512 gives ~0.7 mm)")
    parser.add_argument("--modality", choices=MODALITIES, default="ct",
                        help="ct: Hounsfield units (default); mr: the same anatomy with MR-like T1 or T2 signal, "
                             "bias field and Rician noise (cases named synth_mr_*)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        write_dataset(args.output, args.num_cases, args.seed, args.layout, args.in_plane, args.unlabeled,
                      verbose=True, modality=args.modality)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.num_cases} cases to {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
