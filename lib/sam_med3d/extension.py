"""Structures larger than one crop: more crops where the mask reaches a crop face, blended into one mask.

SAM-Med3D sees one ``img_size``^3 crop at 1.5 mm (192 mm for the 128^3 models). A lung, the liver or the aorta
is larger, and the single-crop mask is cut at the crop's faces. :class:`CropTiler` extends the mask beyond the
label's first crop (the paper's "sliding" extension, which the official code never shipped);
:class:`~sam_med3d.predictor.Sam3DPredictor` decodes the first crop and hands it to the tiler, which returns
all crops and :class:`TilingStats`. The pieces:

1. **Open faces** (:func:`open_faces`): after a crop is decoded, each of its six faces is *open* when the
   crop mask reaches it (voxels within ``face_margin`` of the face) and the scan continues beyond it, and the
   voxels just beyond the touching part are not already inside another crop. Only the parts of the mask
   connected to a positive prompt point count (``clicked_only``, :func:`clicked_parts`): a false-positive blob
   that reaches a face elsewhere in the crop is not followed (a fine-tuned model's leaks onto a neighbouring
   organ were, and grew over up to 6 crops: docs/experiments.md).
2. **New crops** (:func:`neighbour_start`): an open face gets a crop shifted by ``img_size - overlap`` along
   that axis and centred, across it, on the part of the mask that touches the face.
3. **Prompts** (:func:`derived_points`): a new crop knows no clicks of its own beyond the user's clicks that
   fall inside it, so it is prompted from what is already known: the deepest voxels of the current mask in
   its overlap with the existing crops become positive clicks (replayed one at a time with the previous
   low-res mask, as the official click loop does), followed by the user's clicks inside it.
4. **Blending** (:func:`blend_window`, :func:`combine_on_scan`): every scan voxel takes the weighted mean of
   the probabilities of the crops that cover it; a crop's weight ramps from almost 0 at its faces to 1 over
   ``overlap`` voxels, so neighbouring crops hand over smoothly and there is no seam. A voxel that only one
   crop covers keeps that crop's probability, so a structure that fits one crop gives exactly the single-crop
   result.
5. Repeat until no face is open, or ``max_crops`` / ``time_budget_s`` is reached.

The alternative strategy ``"zoom"`` (nnInteractive's AutoZoom idea) first segments a zoomed-out crop (the same
``img_size``^3 at ``zoom_spacing_mm``, e.g. 3 mm over 384 mm), then refines at 1.5 mm with crops tiling the
coarse mask, each prompted by the coarse mask's deepest voxels inside it; docs/predictor.md compares the two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from .geometry import Crop, PreparedScan, outer_take, place_crop, upsample_logits

STRATEGIES = ("slide", "zoom")


@dataclass
class ExtensionConfig:
    """How far the predictor goes beyond one crop.

    Attributes:
        enabled: extend at all (False: one crop per label, the official behaviour for every structure).
        strategy: ``"slide"`` (crops added along open faces at 1.5 mm) or ``"zoom"`` (coarse pass at
            ``zoom_spacing_mm``, then 1.5 mm crops over the coarse mask).
        max_crops: most crops per label, the first one included.
        time_budget_s: stop adding crops once a call has spent this long (the mask so far is returned).
        overlap: voxels shared by neighbouring crops (blending ramp length); default ``img_size // 4``.
        face_margin: mask voxels this close to a face (in crop voxels) count as touching it.
        derived_points: positive clicks derived from the known mask for each new crop.
        zoom_spacing_mm: voxel size of the coarse pass of the ``"zoom"`` strategy.
        clicked_only: open a face only where the part of the mask connected to a positive prompt point (the
            user's click, or a derived one) reaches it; False: wherever any part of the mask does.
    """

    enabled: bool = True
    strategy: str = "slide"
    max_crops: int = 12
    time_budget_s: float = 30.0
    overlap: Optional[int] = None
    face_margin: int = 2
    derived_points: int = 2
    zoom_spacing_mm: float = 3.0
    clicked_only: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"extension strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if int(self.max_crops) < 1:
            raise ValueError(f"max_crops must be >= 1, got {self.max_crops}")
        if not float(self.time_budget_s) >= 0:
            raise ValueError(f"time_budget_s must be >= 0 seconds, got {self.time_budget_s}")
        if int(self.derived_points) < 1:
            raise ValueError(f"derived_points must be >= 1, got {self.derived_points}")
        if not float(self.zoom_spacing_mm) > 0:
            raise ValueError(f"zoom_spacing_mm must be > 0, got {self.zoom_spacing_mm}")

    def overlap_for(self, size: int) -> int:
        overlap = size // 4 if self.overlap is None else int(self.overlap)
        if not 1 <= overlap < size:
            raise ValueError(f"overlap must be between 1 and {size - 1} voxels, got {overlap}")
        return overlap


@dataclass
class Tile:
    """One crop of a label's mask and its decode state.

    Attributes:
        crop: the crop (1.5 mm canonical grid).
        prompt_points, prompt_labels: ``(n, 3)`` crop coordinates and ``(n,)`` labels of its prompt so far.
        low_res: ``(1, 1, L, L, L)`` logits of its last decode step.
        probs: ``(S, S, S)`` float32 probabilities on the crop grid (cpu).
        clicks: indices (into the label's clicks) already in its prompt.
    """

    crop: Crop
    prompt_points: np.ndarray
    prompt_labels: np.ndarray
    low_res: torch.Tensor
    probs: torch.Tensor
    clicks: List[int] = field(default_factory=list)

    @property
    def start(self) -> np.ndarray:
        return np.asarray(self.crop.start, dtype=np.int64)


def blend_window(size: int, overlap: int, floor: float = 1e-3) -> np.ndarray:
    """``(size,)`` float64 per-axis blending weight: ramps linearly from ``floor`` at the faces to 1 over
    ``overlap`` voxels (the 3D weight of a crop voxel is the product over its three axes)."""
    d = np.arange(size, dtype=np.float64)
    ramp = np.minimum(d + 0.5, size - d - 0.5) / float(overlap)
    return np.clip(ramp, floor, 1.0)


def _overlap_box(a: np.ndarray, b: np.ndarray, size: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Canonical box ``[lo, hi)`` shared by the crops starting at ``a`` and ``b``, or None."""
    lo, hi = np.maximum(a, b), np.minimum(a, b) + size
    return (lo, hi) if np.all(hi > lo) else None


def known_probabilities(target: Crop, tiles: Sequence[Tile], window: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Blended probabilities of ``tiles`` on ``target``'s grid: ``(prob, covered)`` ``(S, S, S)``, prob 0
    where no tile covers it. Crops of one scan share the canonical grid, so this is slicing, no resampling."""
    size = target.size
    num = np.zeros((size,) * 3, np.float64)
    den = np.zeros((size,) * 3, np.float64)
    t0 = np.asarray(target.start, dtype=np.int64)
    for tile in tiles:
        box = _overlap_box(t0, tile.start, size)
        if box is None:
            continue
        lo, hi = box
        dst = tuple(slice(int(l - t), int(h - t)) for l, h, t in zip(lo, hi, t0))
        src = tuple(slice(int(l - s), int(h - s)) for l, h, s in zip(lo, hi, tile.start))
        w = (window[src[0]][:, None, None] * window[src[1]][None, :, None] * window[src[2]][None, None, :])
        num[dst] += w * tile.probs.numpy()[src]
        den[dst] += w
    covered = den > 0
    prob = np.zeros_like(num)
    prob[covered] = num[covered] / den[covered]
    return prob.astype(np.float32), covered


def contains_interior(tile: Tile, canonical: np.ndarray, margin: int) -> np.ndarray:
    """``(N,)`` bool: canonical voxels ``(N, 3)`` inside ``tile``'s crop, at least ``margin`` from its faces."""
    rel = canonical - tile.start
    return np.all((rel >= margin) & (rel < tile.crop.size - margin), axis=1)


def clicked_parts(tile: Tile) -> np.ndarray:
    """``tile``'s crop mask restricted to its connected parts (26-connectivity) that hold a positive prompt point
    (a user's click or a derived one): what the user pointed at, without blobs elsewhere in the crop."""
    from scipy.ndimage import label as connected

    mask = tile.probs.numpy() > 0.5
    positives = np.asarray(tile.prompt_points, dtype=np.float64).reshape(-1, 3)[
        np.asarray(tile.prompt_labels).reshape(-1) == 1]
    if not mask.any() or not len(positives):
        return np.zeros_like(mask)
    parts, _ = connected(mask, structure=np.ones((3, 3, 3), bool))
    index = np.clip(np.floor(positives).astype(np.int64), 0, np.array(mask.shape) - 1)
    held = np.unique(parts[index[:, 0], index[:, 1], index[:, 2]])
    held = held[held > 0]
    return np.isin(parts, held) if len(held) else np.zeros_like(mask)


def open_faces(tile: Tile, others: Sequence[Tile], prepared: PreparedScan, margin: int,
               clicked_only: bool = False) -> List[Tuple[int, int, np.ndarray]]:
    """The faces of ``tile`` that the extension must cross: ``[(axis, side, centre)]`` with ``side`` -1 / +1
    and ``centre`` the canonical centre (3,) of the mask voxels touching that face.

    A face is open when the crop mask has voxels within ``margin`` of it, the canonical grid continues beyond
    it, and some of the voxels just beyond the touching part are not in the interior of another tile. With
    ``clicked_only`` only the mask's parts connected to a positive prompt point count (:func:`clicked_parts`).
    """
    size = tile.crop.size
    mask = clicked_parts(tile) if clicked_only else tile.probs.numpy() > 0.5
    faces = []
    for axis in range(3):
        for side in (-1, 1):
            slab_index = [slice(None)] * 3
            slab_index[axis] = slice(0, margin) if side < 0 else slice(size - margin, size)
            slab = mask[tuple(slab_index)]
            if not slab.any():
                continue
            edge = tile.crop.start[axis] if side < 0 else tile.crop.start[axis] + size
            if (side < 0 and edge <= 0) or (side > 0 and edge >= prepared.shape[axis]):
                continue  # the scan ends here: nothing beyond the face
            touching = np.argwhere(slab)
            offset = np.zeros(3, np.int64)
            offset[axis] = 0 if side < 0 else size - margin
            touching = touching + offset + tile.start
            # Every canonical voxel just across the face from a touching one (at most size^2 of them).
            footprint = np.argwhere(slab.any(axis=axis)) + np.delete(tile.start, axis)
            beyond = np.insert(footprint, axis, edge - 1 if side < 0 else edge, axis=1)
            covered = np.zeros(len(beyond), bool)
            for other in others:
                if other is not tile:
                    covered |= contains_interior(other, beyond, margin)
            if covered.all():
                continue
            lo, hi = touching.min(axis=0), touching.max(axis=0) + 1
            faces.append((axis, side, (lo + hi) // 2))
    return faces


def neighbour_start(tile: Tile, axis: int, side: int, centre: np.ndarray, overlap: int) -> Tuple[int, int, int]:
    """Start of the crop across face ``(axis, side)`` of ``tile``: shifted by ``size - overlap`` along the axis,
    centred across it on ``centre`` (canonical)."""
    size = tile.crop.size
    start = np.asarray(centre, dtype=np.int64) - size // 2
    start[axis] = tile.crop.start[axis] + side * (size - overlap)
    return tuple(int(v) for v in start)


def is_new_place(start: Sequence[int], tiles: Sequence[Tile], size: int) -> bool:
    """False when an existing tile starts within ``size // 4`` voxels of ``start`` on every axis."""
    s = np.asarray(start, dtype=np.int64)
    return all(np.any(np.abs(tile.start - s) > size // 4) for tile in tiles)


def derived_points(known: np.ndarray, covered: np.ndarray, count: int, min_distance: float) -> np.ndarray:
    """Up to ``count`` positive clicks ``(n, 3)`` (crop voxel coordinates) from a known mask: the deepest
    voxels of ``known > 0.5`` (restricted to ``covered``), each at least ``min_distance`` from the previous."""
    inside = (known > 0.5) & covered
    if not inside.any():
        return np.zeros((0, 3))
    # Depth inside the known mask; the region beyond the known part counts as outside.
    lo = np.argwhere(inside).min(axis=0)
    hi = np.argwhere(inside).max(axis=0) + 1
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    depth = distance_transform_edt(np.pad(inside[box], 1))[1:-1, 1:-1, 1:-1]
    points = []
    axes = [np.arange(n, dtype=np.float64) for n in depth.shape]
    for _ in range(count):
        if not depth.max() > 0:
            break
        best = np.array(np.unravel_index(int(np.argmax(depth)), depth.shape))
        points.append(best + lo)
        d2 = ((axes[0] - best[0]) ** 2)[:, None, None] + ((axes[1] - best[1]) ** 2)[None, :, None] \
            + ((axes[2] - best[2]) ** 2)[None, None, :]
        depth[d2 < min_distance ** 2] = 0
    return np.asarray(points, dtype=np.float64).reshape(-1, 3)


def combine_in_region(prepared: PreparedScan, tiles: Sequence[Tile], window: np.ndarray,
                      with_probabilities: bool = False
                      ) -> Tuple[Optional[Tuple[slice, slice, slice]], np.ndarray, Optional[np.ndarray]]:
    """The blended mask of ``tiles`` on the part of the ORIGINAL scan grid they cover: ``(region, mask,
    probabilities)``.

    ``region`` is the box (slices of the scan's grid) spanning every tile's ``crop.region_ijk`` (None when no
    tile covers the scan), ``mask`` uint8 of the region's shape and ``probabilities`` float32 of that shape (or
    None). Every scan voxel takes, from each crop covering it, the crop voxel nearest to its centre (the
    official paste-back rule) and the weighted mean of those probabilities over the crops; mask = mean > 0.5.
    With a single tile this is exactly the single-crop paste-back. Outside ``region`` the mask is 0. Costs
    O(region), whatever the scan's size.
    """
    if len(tiles) == 1:
        tile = tiles[0]
        probs = tile.probs.numpy()
        region, mask = prepared.paste_back_region(tile.crop, (probs > 0.5).astype(np.uint8))
        full = prepared.paste_back_region(tile.crop, probs)[1] if with_probabilities else None
        return region, mask, full
    lookups = [(tile, tile.crop.paste_lookup) for tile in tiles if tile.crop.paste_lookup is not None]
    if not lookups:
        return None, np.zeros((0, 0, 0), np.uint8), np.zeros((0, 0, 0), np.float32) if with_probabilities else None
    lo = np.min([[r.start for r in lookup[0]] for _, lookup in lookups], axis=0)
    hi = np.max([[r.stop for r in lookup[0]] for _, lookup in lookups], axis=0)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    num = np.zeros(tuple(int(b - a) for a, b in zip(lo, hi)), np.float32)
    den = np.zeros_like(num)
    for tile, (region, index) in lookups:
        order = [int(a) for a in prepared.target_axis]
        weights = [window[index[a]] for a in range(3)]
        w = (weights[order[0]][:, None, None] * weights[order[1]][None, :, None]
             * weights[order[2]][None, None, :]).astype(np.float32)
        p = outer_take(tile.probs.numpy(), index).transpose(*order)
        local = tuple(slice(r.start - int(a), r.stop - int(a)) for r, a in zip(region, lo))
        num[local] += w * p
        den[local] += w
    mean = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    order = "F" if prepared.scan.array.flags.f_contiguous and not prepared.scan.array.flags.c_contiguous else "C"
    return box, (mean > 0.5).astype(np.uint8, order=order), mean if with_probabilities else None


def combine_on_scan(prepared: PreparedScan, tiles: Sequence[Tile], window: np.ndarray,
                    with_probabilities: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """:func:`combine_in_region` on the whole ORIGINAL scan grid: ``(mask uint8, probabilities float32 or None)``
    of the scan's shape, 0 outside the region the tiles cover."""
    region, mask_region, probs_region = combine_in_region(prepared, tiles, window, with_probabilities)
    shape = prepared.scan.shape
    mask = np.zeros(shape, np.uint8)
    full = np.zeros(shape, np.float32) if with_probabilities else None
    if region is not None:
        mask[region] = mask_region
        if full is not None:
            full[region] = probs_region
    return mask, full



@dataclass
class TilingStats:
    """What covering one label's mask took in one call, beyond its first crop.

    Attributes:
        crops: crops the mask is blended from, the first one included (``len(PredictionResult.crop_boxes)``).
        crops_added: crops placed and decoded in this call.
        crops_rerun: crops of earlier calls decoded again (a new click fell inside them).
        crops_reused: crops of earlier calls kept as they were.
        encoder_runs: image-encoder runs (crops whose embedding was not cached; the ``"zoom"`` coarse crop too).
        decode_steps: decoder runs.
    """

    crops: int = 1
    crops_added: int = 0
    crops_rerun: int = 0
    crops_reused: int = 0
    encoder_runs: int = 0
    decode_steps: int = 0


#: ``(crop, timings) -> (embedding, whether the encoder ran)``; adds its seconds to ``timings``.
EmbedFn = Callable[[Crop, dict], Tuple[object, bool]]
#: ``(embedding, prompt points (n, 3), prompt labels (n,), previous low-res logits, multimask) -> (logits, iou)``.
DecodeFn = Callable[[object, np.ndarray, np.ndarray, torch.Tensor, bool], Tuple[torch.Tensor, float]]


def changes_beyond_first(tiles: Sequence[Tile], points: np.ndarray, labels: np.ndarray, new: Sequence[int]) -> bool:
    """Whether the ``new`` clicks (indices into ``points`` / ``labels``) change a label's crops other than the
    first ``tiles[0]``: one falls inside a later crop, or a positive one falls outside every crop (it gets a
    crop of its own)."""
    def inside(tile: Tile, i: int) -> bool:
        return bool(tile.crop.contains(points[i:i + 1])[0])

    touched = any(inside(tile, i) for tile in tiles[1:] for i in new)
    return touched or any(labels[i] == 1 and not any(inside(tile, i) for tile in tiles) for i in new)


class CropTiler:
    """Covers a label's mask beyond its first crop (see the module docstring) and blends the crops.

    Args:
        config: the extension's settings.
        size: the model's crop edge (``img_size``).
        embed: the predictor's cached image encoder (:data:`EmbedFn`).
        decode_step: one decoder run (:data:`DecodeFn`).
        empty_low_res: the all-zero low-res mask prompt of a crop's first step.
    """

    def __init__(self, config: ExtensionConfig, size: int, embed: EmbedFn, decode_step: DecodeFn,
                 empty_low_res: Callable[[], torch.Tensor]) -> None:
        self.config = config
        self.size = int(size)
        self.window = blend_window(self.size, config.overlap_for(self.size))
        self._embed = embed
        self._decode_step = decode_step
        self._empty_low_res = empty_low_res
        self._coarse: Optional[PreparedScan] = None  # the "zoom" strategy's coarse grid of the last scan

    def combine(self, prepared: PreparedScan, tiles: Sequence[Tile]
                ) -> Tuple[Optional[Tuple[slice, slice, slice]], np.ndarray]:
        """The blended mask of ``tiles`` where they cover the scan: ``(region, mask)``
        (:func:`combine_in_region`)."""
        region, mask, _ = combine_in_region(prepared, tiles, self.window)
        return region, mask

    def extend(self, prepared: PreparedScan, primary: Tile, earlier: Sequence[Tile], points: np.ndarray,
               labels: np.ndarray, new: Optional[Sequence[int]], timings: dict, started: float,
               multimask_output: bool = False) -> Tuple[List[Tile], TilingStats]:
        """Cover the structure beyond ``primary`` (the label's first crop, decoded): update the ``earlier`` extra
        crops with the ``new`` clicks inside them, add a crop for every positive click no crop holds, then add
        crops across open faces until none is left, ``max_crops`` is reached or ``time_budget_s`` has passed
        since ``started`` (``time.perf_counter()``).

        Args:
            points, labels: all the label's clicks ``(N, 3)`` (original voxel indices) and ``(N,)``.
            new: indices of the clicks not applied yet to ``earlier`` (None or empty: none).
            timings: seconds of ``preprocess``, ``encode`` and ``decode``, added to.

        Returns:
            All tiles (``primary`` first, then ``earlier`` in order, then the added ones) and the statistics.
        """
        cfg = self.config
        size = self.size
        overlap = cfg.overlap_for(size)
        deadline = started + float(cfg.time_budget_s)
        stats = TilingStats()
        tiles = [primary]
        for tile in earlier:  # a follow-up click: re-run only the crops it falls in
            inside = [i for i in (new or []) if bool(tile.crop.contains(points[i:i + 1])[0])]
            if inside:
                tile = self._run_tile(tile.crop, np.zeros((0, 3)), inside, points, labels, timings,
                                      multimask_output, stats, previous=tile)
                stats.crops_rerun += 1
            else:
                stats.crops_reused += 1
            tiles.append(tile)
        if cfg.strategy == "zoom" and not earlier and open_faces(primary, tiles, prepared, cfg.face_margin,
                                                                 cfg.clicked_only):
            tiles.extend(self._zoom_tiles(prepared, primary, points, labels, timings, multimask_output, deadline,
                                          stats))
        # Positive clicks farther apart than one crop are all honoured: each gets a crop of its own.
        for i in np.flatnonzero(labels == 1):
            if len(tiles) >= cfg.max_crops or time.perf_counter() > deadline:
                break
            if any(bool(t.crop.contains(points[i:i + 1])[0]) for t in tiles):
                continue
            crop = prepared.crop_around(points[i:i + 1], size)
            user = [j for j in range(len(points)) if bool(crop.contains(points[j:j + 1])[0])]
            tiles.append(self._run_tile(crop, np.zeros((0, 3)), user, points, labels, timings, multimask_output,
                                        stats))
        queue = list(tiles)
        while queue and len(tiles) < cfg.max_crops and time.perf_counter() <= deadline:
            tile = queue.pop(0)
            for axis, side, centre in open_faces(tile, tiles, prepared, cfg.face_margin, cfg.clicked_only):
                if len(tiles) >= cfg.max_crops or time.perf_counter() > deadline:
                    break
                start = neighbour_start(tile, axis, side, centre, overlap)
                if not is_new_place(start, tiles, size):
                    continue
                crop = prepared.crop(start, size)
                known, covered = known_probabilities(crop, tiles, self.window)
                seeds = derived_points(known, covered, cfg.derived_points, size / 8)
                if not len(seeds):
                    continue
                user = [j for j in range(len(points)) if bool(crop.contains(points[j:j + 1])[0])]
                added = self._run_tile(crop, seeds, user, points, labels, timings, multimask_output, stats)
                tiles.append(added)
                queue.append(added)
        stats.crops = len(tiles)
        stats.crops_added = len(tiles) - 1 - len(earlier)
        return tiles, stats

    def _zoom_tiles(self, prepared: PreparedScan, primary: Tile, points: np.ndarray, labels: np.ndarray,
                    timings: dict, multimask_output: bool, deadline: float, stats: TilingStats) -> List[Tile]:
        """The ``"zoom"`` strategy's coarse pass: the user's clicks on a crop of the same size at
        ``zoom_spacing_mm``, then 1.5 mm crops tiling the coarse mask, each prompted by its deepest voxels."""
        cfg = self.config
        size = self.size
        coarse_prep = self._coarse_prepared(prepared)
        coarse = place_crop(coarse_prep, points, labels, size)
        user = [j for j in range(len(points)) if bool(coarse.contains(points[j:j + 1])[0])]
        coarse_tile = self._run_tile(coarse, np.zeros((0, 3)), user, points, labels, timings, multimask_output,
                                     stats)
        mask = coarse_tile.probs.numpy() > 0.5
        if not mask.any():
            return []
        # The coarse mask's box on the 1.5 mm canonical grid, tiled with overlapping crops.
        found = np.argwhere(mask)
        corners = np.array([found.min(0) - 0.5, found.max(0) + 0.5]) + np.asarray(coarse.start)
        fine = prepared.to_canonical(coarse_prep.to_original(corners))
        lo, hi = np.floor(fine.min(0)).astype(int), np.ceil(fine.max(0)).astype(int)
        stride = size - cfg.overlap_for(size)
        starts = []
        for a in range(3):
            n = max(1, int(np.ceil((hi[a] - lo[a] - size) / stride)) + 1)
            first = (lo[a] + hi[a]) // 2 - ((n - 1) * stride + size) // 2
            starts.append([first + k * stride for k in range(n)])
        tiles: List[Tile] = []
        for start in sorted(((x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]),
                            key=lambda s: float(np.abs(np.asarray(s) - primary.start).sum())):
            if 1 + len(tiles) >= cfg.max_crops or time.perf_counter() > deadline:
                break
            if not is_new_place(start, [primary] + tiles, size):
                continue
            crop = prepared.crop(start, size)
            # The coarse mask on this crop's grid (nearest), as the known mask to derive clicks from.
            known = _coarse_on_crop(coarse_prep, coarse_tile, crop)
            seeds = derived_points(known, np.ones(known.shape, bool), cfg.derived_points, size / 8)
            if not len(seeds):
                continue
            user = [j for j in range(len(points)) if bool(crop.contains(points[j:j + 1])[0])]
            tiles.append(self._run_tile(crop, seeds, user, points, labels, timings, multimask_output, stats))
        return tiles

    def _coarse_prepared(self, prepared: PreparedScan) -> PreparedScan:
        if self._coarse is None or self._coarse.scan is not prepared.scan:
            self._coarse = PreparedScan(prepared.scan, self.config.zoom_spacing_mm)
        return self._coarse

    def _run_tile(self, crop: Crop, seeds: np.ndarray, user: Sequence[int], points: np.ndarray, labels: np.ndarray,
                  timings: dict, multimask_output: bool, stats: TilingStats, previous: Optional[Tile] = None) -> Tile:
        """Decode one crop: from ``previous``'s state (or an empty mask), the derived positive ``seeds`` (crop
        coordinates) then the user's clicks ``user`` (indices), one click at a time."""
        embedding, ran = self._embed(crop, timings)
        stats.encoder_runs += int(ran)
        tick = time.perf_counter()
        if previous is None:
            prompt_pts, prompt_labs = np.zeros((0, 3)), np.zeros(0, np.int64)
            low_res = self._empty_low_res()
            done: List[int] = []
        else:
            prompt_pts, prompt_labs, low_res = previous.prompt_points, previous.prompt_labels, previous.low_res
            done = list(previous.clicks)
        steps = [(p, 1) for p in np.asarray(seeds).reshape(-1, 3)]
        steps += [(crop.to_crop(points[i:i + 1])[0], int(labels[i])) for i in user if i not in done]
        for point, label in steps:
            prompt_pts = np.concatenate([prompt_pts, np.asarray(point, dtype=np.float64)[None]])
            prompt_labs = np.concatenate([prompt_labs, np.asarray([label], dtype=np.int64)])
            low_res, _ = self._decode_step(embedding, prompt_pts, prompt_labs, low_res, multimask_output)
        timings["decode"] += time.perf_counter() - tick
        stats.decode_steps += len(steps)
        probs = torch.sigmoid(upsample_logits(low_res, crop.size))[0, 0].float().cpu()
        return Tile(crop, prompt_pts, prompt_labs, low_res, probs, done + [i for i in user if i not in done])


def _coarse_on_crop(coarse_prep: PreparedScan, coarse_tile: Tile, crop: Crop) -> np.ndarray:
    """The coarse probabilities resampled (nearest) onto a 1.5 mm crop's grid: ``(S, S, S)`` float32, 0
    outside the coarse crop. Both canonical grids come from the same scan, so their axes correspond and
    the lookup is separable."""
    size = crop.size
    index = []
    for a in range(3):
        original = crop.prepared.original_coords(a, crop.start[a], size)
        pos = (original - coarse_prep.offset[a]) / coarse_prep.step[a] - coarse_tile.crop.start[a]
        index.append(np.clip(np.floor(pos + 0.5).astype(np.int64), -1, coarse_tile.crop.size) + 1)
    return np.pad(coarse_tile.probs.numpy(), 1)[np.ix_(*index)]


__all__ = ("ExtensionConfig", "Tile", "TilingStats", "CropTiler", "STRATEGIES", "blend_window", "changes_beyond_first",
           "clicked_parts", "known_probabilities", "open_faces", "neighbour_start", "is_new_place", "derived_points",
           "combine_in_region", "combine_on_scan", "contains_interior")
