"""Reading the clicks of an ``/infer`` request in the shapes 3D Slicer and OHIF send.

Request shapes (the JSON ``params`` of ``POST /infer/<model>``; points are voxel indices ``[i, j, k]`` of the
image *as stored* in the datastore: NIfTI array axes / ITK index order, what Slicer's RAS->IJK matrix and
OHIF's ``worldToIndex`` give):

1. DeepEdit (3D Slicer's MONAI Label module for models of type ``deepedit``, and OHIF v3's "Point Prompts"):
   one key per label name holding that label's clicks, ``"background"`` holding background clicks, and the
   label being edited::

       {"spleen": [[250, 201, 18]], "liver": [], "background": [[240, 180, 18]], "label": "spleen"}

   OHIF v3 sends the same without ``"label"``.
2. Foreground/background (Slicer and OHIF for ``deepgrow``-type models, and scripts)::

       {"foreground": [[250, 201, 18]], "background": [[240, 180, 18]], "label": "spleen"}

Which labels are (re)segmented:

- ``"label"`` names a label: that label, from its clicks (positive) and the background clicks (negative);
- ``"label"`` is ``"background"`` or absent: every label that has at least one click (a background click
  changes every label's mask).

Coordinates may be integers or floats (rounded to the nearest voxel); anything else is refused, and so are
coordinates beyond :data:`MAX_COORDINATE` in magnitude (``1e308``, a 400-digit integer: no scan is that large).

Limits (each click of a label's prompt is one decoder run plus a paste-back when the session is new or the
clicks changed, so a request's cost grows with its clicks; 150 clicks in one request held the full model for
95 s on a loaded 2-core CPU):

- :data:`MAX_CLICKS` clicks per segmented label (its own clicks plus the background clicks, which every
  label's prompt carries): an annotation needs a handful, and a viewer sends the full list so far;
- :data:`MAX_PROMPT_CLICKS` prompt clicks over all labels segmented by one request (a background-only request
  re-segments every label that has clicks);
- :data:`MAX_REQUEST_CLICKS` clicks of any kind in one request (what is parsed at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

BACKGROUND = "background"
#: Largest accepted coordinate magnitude (voxels); anything beyond is not a voxel of any scan.
MAX_COORDINATE = 1e6
#: Most clicks one segmented label's prompt may carry (its own clicks plus the background clicks).
MAX_CLICKS = 64
#: Most prompt clicks over all the labels one request segments (the decoder runs of a new session).
MAX_PROMPT_CLICKS = 256
#: Most clicks of any kind (all labels and background together) one request may carry.
MAX_REQUEST_CLICKS = 1024


@dataclass(frozen=True)
class LabelClicks:
    """The prompt for one label.

    Attributes:
        name: label name (a key of the app's labels).
        value: the label's value in the label map.
        points: ``(N, 3)`` int64 voxel indices ``(i, j, k)``, positives first, then negatives.
        point_labels: ``(N,)`` int64, 1 = positive (inside the structure), 0 = negative (background).
    """

    name: str
    value: int
    points: np.ndarray
    point_labels: np.ndarray


def _point(raw: Any, where: str) -> Tuple[int, int, int]:
    """One click -> ``(i, j, k)`` ints; ``ValueError`` naming ``where`` for anything but three finite numbers."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence) or len(raw) != 3:
        raise ValueError(f"click {raw!r} in {where} is not a point [i, j, k] of three voxel indices")
    coords = []
    for c in raw:
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise ValueError(f"click {raw!r} in {where} has a non-numeric coordinate {c!r}; "
                             "coordinates are voxel indices (numbers)")
        if isinstance(c, float) and not math.isfinite(c):
            raise ValueError(f"click {raw!r} in {where} has a non-finite coordinate {c!r}")
        if abs(c) > MAX_COORDINATE:
            shown = f"{c:.3g}" if isinstance(c, float) else f"an integer of {len(str(abs(c)))} digits"
            raise ValueError(f"click in {where} has a coordinate out of range ({shown}); coordinates are voxel "
                             "indices of the scan")
        coords.append(int(round(c)))
    return coords[0], coords[1], coords[2]


def _points(raw: Any, where: str) -> List[Tuple[int, int, int]]:
    if raw is None:
        return []
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"{where} must be a list of clicks [[i, j, k], ...], got {raw!r}")
    # A single bare point ([i, j, k]) is a common scripting slip; accept it as one click.
    if len(raw) == 3 and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in raw):
        return [_point(raw, where)]
    return [_point(p, where) for p in raw]


def _known_label(name: Any, labels: Mapping[str, int]) -> str:
    if not isinstance(name, str) or name not in labels:
        known = ", ".join(n for n in labels if n != BACKGROUND)
        raise ValueError(f"unknown label {name!r}; this server's labels are: {known} (and background)")
    return name


def has_clicks(request: Mapping[str, Any], labels: Mapping[str, int]) -> bool:
    """Whether the request holds any click (foreground, background or a label's), valid or not."""
    keys = [name for name in labels] + ["foreground"]
    return any(request.get(key) not in (None, [], "") for key in keys)


def parse_clicks(request: Mapping[str, Any], labels: Mapping[str, int]) -> List[LabelClicks]:
    """The labels to segment and their clicks, from a Slicer or OHIF request (see the module docstring).

    Args:
        request: the infer request (MONAI Label merges the JSON params into it).
        labels: the app's labels ``{name: value}`` including ``"background": 0``.

    Returns:
        One :class:`LabelClicks` per label to segment, in label-value order; each has at least one positive click.

    Raises:
        ValueError: unknown label, no clicks, malformed or non-numeric coordinates.
    """
    current = request.get("label")
    if current is not None:
        current = _known_label(current, labels)
    background = _points(request.get(BACKGROUND), "'background'")

    if "foreground" in request:
        if current in (None, BACKGROUND):
            names = [n for n in labels if n != BACKGROUND]
            if len(names) != 1:
                raise ValueError("the request has 'foreground' clicks but no 'label' saying which label they belong "
                                 f"to; add \"label\": one of {', '.join(names)}")
            current = names[0]
        positives = {current: _points(request.get("foreground"), "'foreground'")}
    else:
        positives = {name: _points(request.get(name), repr(name)) for name in labels
                     if name != BACKGROUND and name in request}

    if current not in (None, BACKGROUND):
        targets = [current]
        if not positives.get(current):
            raise ValueError(f"no foreground click for label {current!r}; click inside the {current} first"
                             + (" (the request has only background clicks)" if background else ""))
    else:
        targets = [name for name in labels if positives.get(name)]
        if not targets:
            raise ValueError("the request has no foreground clicks for any label: send "
                             "{\"<label>\": [[i, j, k], ...], \"label\": \"<label>\"} (Slicer/OHIF DeepEdit) or "
                             "{\"foreground\": [[i, j, k], ...], \"background\": [...], \"label\": \"<label>\"}")

    total = len(background) + sum(len(positives.get(name) or []) for name in positives)
    if total > MAX_REQUEST_CLICKS:
        raise ValueError(f"too many clicks in one request: {total} (at most {MAX_REQUEST_CLICKS} in all)")
    for name in targets:
        count = len(positives[name]) + len(background)
        if count > MAX_CLICKS:
            raise ValueError(f"too many clicks for label {name!r}: {count} ({len(positives[name])} on the label, "
                             f"{len(background)} background; at most {MAX_CLICKS} per label and request); start "
                             "the label again with fewer clicks, or correct the mask by painting")
    prompt = sum(len(positives[name]) + len(background) for name in targets)
    if prompt > MAX_PROMPT_CLICKS:
        raise ValueError(f"too many clicks for the {len(targets)} labels segmented by this request: {prompt} prompt "
                         f"clicks (each label's own plus the background ones; at most {MAX_PROMPT_CLICKS}); name one "
                         "label in \"label\"")
    result = []
    for name in sorted(targets, key=lambda n: labels[n]):
        pos = positives[name]
        points = np.asarray(pos + background, dtype=np.int64).reshape(-1, 3)
        point_labels = np.asarray([1] * len(pos) + [0] * len(background), dtype=np.int64)
        result.append(LabelClicks(name=name, value=int(labels[name]), points=points, point_labels=point_labels))
    return result


def check_inside(clicks: Sequence[LabelClicks], shape: Sequence[int]) -> None:
    """Raise ``ValueError`` for the first click outside a scan of ``shape`` ``(I, J, K)``."""
    size = "x".join(str(int(n)) for n in shape)
    upper = np.asarray(shape, dtype=np.int64)
    for target in clicks:
        for point, lab in zip(target.points, target.point_labels):
            if np.any(point < 0) or np.any(point >= upper):
                kind = f"for label {target.name!r}" if lab == 1 else "(background)"
                raise ValueError(f"click ({', '.join(str(int(c)) for c in point)}) {kind} is outside the scan "
                                 f"{size}; clicks are voxel indices (i, j, k) with 0 <= i < {shape[0]}, "
                                 f"0 <= j < {shape[1]}, 0 <= k < {shape[2]}")


def label_names_present(label_map: np.ndarray, labels: Mapping[str, int],
                        boxes: Optional[Mapping[int, Optional[Tuple[slice, slice, slice]]]] = None) -> Dict[str, int]:
    """``{"background": 0, name: value, ...}`` for the labels whose value occurs in ``label_map``, by value.

    Returned to the viewer as ``label_names``: 3D Slicer maps the i-th label value present in the returned map
    to the i-th non-background name it is given, so listing absent labels would shift the names.

    ``boxes`` (optional, ``{value: box of the map that holds every voxel of that value, or None: none}``) limits
    the search for a value to its box; values not in it are looked for in the whole map. Each value costs one
    comparison over its box, not a sort of the map (``np.unique`` of a 512x512x300 map took 1.3 s).
    """
    boxes = boxes or {}
    names = {BACKGROUND: 0}
    for name, value in sorted(labels.items(), key=lambda item: item[1]):
        if name == BACKGROUND:
            continue
        value = int(value)
        box = boxes.get(value, (slice(None),) * 3)
        if box is not None and _contains(label_map[box], value):
            names[name] = value
    return names


def _contains(array: np.ndarray, value: int) -> bool:
    """Whether ``value`` occurs in ``array``, one slab at a time (no temporary of the whole array)."""
    if array.size == 0:
        return False
    axis = 2 if array.flags.f_contiguous and not array.flags.c_contiguous else 0  # the outermost in memory
    step = max(1, (1 << 22) // max(1, array.size // max(1, array.shape[axis])))
    for start in range(0, array.shape[axis], step):
        part = array[(slice(None),) * axis + (slice(start, start + step),)]
        if (part == value).any():
            return True
    return False
