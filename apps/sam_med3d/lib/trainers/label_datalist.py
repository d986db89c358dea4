"""What training reads from the datastore: the saved final labels, as one training target per structure.

Each label value present in a saved label map (with at least :data:`MIN_TARGET_VOXELS` voxels) becomes one binary
target ``{"image", "label", "label_value"}`` (:func:`expand_targets`). Bad files never fail a whole run: a label
that cannot be read, one whose grid size differs from its image's, or an image or label that
:mod:`sam_med3d.io` refuses (a header naming another file) is skipped with a warning naming it.

:func:`structure_names` names the structures a run trained on (recorded with the published weights: the labels
they answer). A Train request with nothing to train on is refused by the server (HTTP 409, :class:`NothingToTrain`) before
MONAI Label starts the training subprocess (:func:`trainable_datalist`, through :mod:`lib.trainers.preflight`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping

import numpy as np
from monailabel.interfaces.datastore import Datastore

from lib.errors import InvalidRequest

logger = logging.getLogger(__name__)

#: Targets smaller than this (voxels) in a saved label are skipped: too small to crop around and click in.
MIN_TARGET_VOXELS = 8


def label_voxel_counts(label_path: str) -> Dict[int, int]:
    """Voxel count of every nonzero value of a saved label map, read through :func:`sam_med3d.io.load_label`
    (a single-file format whose header names no other file; integer values 0..255).

    Raises:
        ValueError: the file cannot be read as a label map (the message names it).
    """
    from sam_med3d.io import load_label

    counts = np.bincount(load_label(str(label_path)).ravel(order="K"), minlength=1)
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0}


def label_values(label_path: str) -> List[int]:
    """The nonzero values of a saved label map with at least :data:`MIN_TARGET_VOXELS` voxels each."""
    return [v for v, n in label_voxel_counts(label_path).items() if n >= MIN_TARGET_VOXELS]


def check_label_grid(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the files when a saved label's grid size differs from its image's, or when
    either file is one :func:`sam_med3d.io.read_header` refuses (a header naming another file, ...)."""
    from sam_med3d.io import read_header

    label, scan = read_header(record["label"]), read_header(record["image"])
    if label.size != scan.size:
        raise ValueError(f"label map {record['label']} has size {label.shape_str()} but its image "
                         f"{os.path.basename(str(record['image']))} has {scan.shape_str()}")


def usable_values(record: Mapping[str, Any]) -> List[int]:
    """:func:`label_values` of a datalist record; an unreadable label, or one on another grid than its image,
    is skipped with a warning (empty list)."""
    try:
        values = label_values(record["label"])
        if values:
            check_label_grid(record)
    except ValueError as err:
        logger.warning("Training: %s; skipped", err)
        return []
    if not values:
        logger.warning("Training: label %s has no structure of %d+ voxels; skipped", record["label"],
                       MIN_TARGET_VOXELS)
    return values


def expand_targets(datalist: List[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One training sample per (image, label value): ``{"image", "label", "label_value"}``."""
    samples = []
    for record in datalist:
        samples.extend({"image": record["image"], "label": record["label"], "label_value": v}
                       for v in usable_values(record))
    return samples


def structure_names(targets: List[Mapping[str, Any]], labels: Mapping[str, int]) -> List[str]:
    """The names in ``labels`` (the app's ``{name: value}``) of ``targets``' label values, sorted; a value without
    a name is left out with a warning (no click can name it, so no weights need to answer it)."""
    by_value = {int(value): str(name) for name, value in labels.items() if name != "background"}
    values = {int(target["label_value"]) for target in targets}
    unnamed = sorted(values - set(by_value))
    if unnamed:
        logger.warning("Training: label value(s) %s of the saved labels have no name in the app's labels "
                       "(--conf labels); they are trained on, but no click can ask for them", unnamed)
    return sorted(by_value[value] for value in values if value in by_value)


class NothingToTrain(InvalidRequest):
    """A Train request while the datastore holds no saved label with a structure to train on.

    HTTP 409 ("Conflict": the request is fine, the datastore is not ready for it), body ``{"detail": ...}``.
    """

    def __init__(self, message: str):
        super().__init__(message, status_code=409)


def trainable_datalist(datastore: Datastore) -> List[Dict[str, Any]]:
    """The datastore's (image, final label) records, or :class:`NothingToTrain` saying why there is nothing.

    Stops reading labels at the first one with a usable structure, so the check is quick when it passes.
    """
    datalist = datastore.datalist()
    if not datalist:
        raise NothingToTrain("nothing to train on: no image has a saved final label yet; save a label first "
                             "(3D Slicer: Submit Label), then train again")
    if not any(usable_values(record) for record in datalist):
        names = ", ".join(os.path.basename(str(r["label"])) for r in datalist[:5])
        more = f" and {len(datalist) - 5} more" if len(datalist) > 5 else ""
        raise NothingToTrain(f"nothing to train on: the {len(datalist)} saved final label(s) ({names}{more}) hold "
                             f"no structure of {MIN_TARGET_VOXELS}+ voxels (empty, tiny or unreadable); "
                             f"save a label with the structure drawn, then train again")
    return datalist
