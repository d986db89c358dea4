"""Clicks on a whole scan -> a 3D mask in the scan's own geometry (the SAM-style owner of the image state).

Usage::

    model = sam_med3d.load_model("turbo")
    predictor = Sam3DPredictor(model)
    predictor.set_image("scan.nii.gz")
    result = predictor.predict([[i, j, k]], [1])          # voxel indices of the scan as stored
    nib.save(nib.Nifti1Image(result.mask, result.affine), "mask.nii.gz")

How a request is answered (``predict`` always receives the FULL list of clicks so far for one label, as
MONAI Label clients send it):

1. The clicks already applied for this ``label_key`` are matched (as a multiset: order does not matter)
   against the new list. If they are all still there, only the new clicks are replayed; if any was removed
   or changed, the label starts over and all clicks are replayed.
2. Replay is ONE CLICK AT A TIME, as in the official click loop and in training: each step decodes with all
   prompt clicks so far plus the previous step's low-res logits as the mask prompt; the first step of a
   label uses an all-zero low-res mask (the official loop's initial ``prev_masks``).
3. The model sees one ``img_size``^3 crop of the canonical 1.5 mm grid, prepared exactly as the official
   inference prepares it (see :mod:`sam_med3d.geometry`), centred on the positive clicks as torchio's
   ``CropOrPad`` centres it on the label (padded, never clamped, where it leaves the scan), or pinned by
   ``crop_affine``. A new click inside the current crop keeps the crop, and the crop's image embedding is
   cached (keyed by the crop box), so the encoder does not run again (``PredictionResult.encoder_ran``). A new
   positive click outside the crop moves the crop (centred on all positive clicks if that crop holds the new
   ones, else on the new clicks), and the label's clicks inside the new crop are replayed from an empty mask.
   A new *negative* click outside the crop is recorded but changes nothing: the mask outside the crop is
   already empty there.
4. As the official post-processing: logits are upsampled to the crop (trilinear), thresholded there
   (``sigmoid > 0.5``), and the crop mask is pasted onto the original grid by nearest neighbour (0 outside
   the crop).

Negative-only prompts are allowed (SAM-Med3D accepts them; the result is usually an empty mask). The mask
only covers the current crop (192 mm at 1.5 mm for 128^3 models, 96 mm for ``vit_mini``): a structure
larger than the crop is cut at the crop's faces.

Calling :meth:`Sam3DPredictor.set_image` again with the same file (same path, size and modification time)
keeps the image state and all label states, so a server can call ``set_image`` + ``predict`` per request
and still reuse cached embeddings and previous masks.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .device import disable_tf32, synchronize
from .extension import ExtensionConfig, CropTiler, Tile, TilingStats, changes_beyond_first, combine_on_scan
from .geometry import TARGET_SPACING_MM, Crop, PreparedScan, crop_keeps_clicks, place_crop, upsample_logits
from .io import ScanInput, file_identity, load_scan

PointsLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]
LabelsLike = Union[np.ndarray, torch.Tensor, Sequence[int]]


@dataclass
class PredictionResult:
    """One prediction on the original scan grid.

    Attributes:
        shape: ``(I, J, K)`` of the scan as stored.
        region_mask: uint8, the mask on ``region_ijk`` only (shape of that box; the mask is 0 everywhere else):
            what a caller that merges or writes only where the crop is needs, at O(crop) cost on any scan.
            ``(0, 0, 0)`` when the crop misses the scan.
        affine: 4x4 RAS voxel->world of the scan (save with ``nib.Nifti1Image(mask, affine)``).
        iou: the model's IoU prediction for the returned mask (of the last decode step).
        timings: seconds spent in ``preprocess`` (crop sampling + normalisation), ``encode``, ``decode``,
            ``paste`` (upsampling + threshold + paste-back), ``extension`` (the crops beyond the first, when the
            extension ran; their encoder and decoder seconds are in ``encode`` / ``decode`` too) and ``total``
            for this call.
        encoder_ran: whether this call ran the image encoder (False when every crop's embedding was cached).
        crop_box: ``(start, stop)`` of the crop in canonical 1.5 mm voxel indices.
        crop_affine: 4x4 RAS voxel->world of the crop (``predict(..., crop_affine=...)`` pins a crop by it).
        region_ijk: the slices of the original grid covered by the crop (where the mask can be non-zero).
        decode_steps: decoder runs in this call (one per replayed click, on every crop).
        prompt_clicks: number of clicks in the prompt (the label's clicks inside the crop).
        low_res_logits: ``(1, 1, L, L, L)`` float32 logits of the crop (L = img_size / 4), for callers that
            want the raw model output.
        crop_probabilities: ``(S, S, S)`` float32 probabilities on the (first) crop grid.
        crop_boxes: ``(start, stop)`` of every crop the mask was blended from (the first is ``crop_box``); more
            than one when the structure is larger than a crop (see :mod:`sam_med3d.extension`).
        tiling: what the crops beyond the first took in this call (:class:`~sam_med3d.extension.TilingStats`).

    ``mask`` (uint8 ``(I, J, K)``, the official result: the crop's ``sigmoid(logits) > 0.5`` pasted onto the
    scan's grid by nearest neighbour, 0 outside the crop; same shape as the scan as stored) and
    ``probabilities`` (float32 ``(I, J, K)``, 0 outside the crop) are built on first access only: a full-size
    map on every click would cost time on big scans (``mask[region_ijk] == region_mask``).
    """

    shape: Tuple[int, int, int]
    region_mask: np.ndarray
    affine: np.ndarray
    iou: float
    timings: Dict[str, float]
    encoder_ran: bool
    crop_box: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    crop_affine: np.ndarray
    region_ijk: Optional[Tuple[slice, slice, slice]]
    decode_steps: int
    prompt_clicks: int
    low_res_logits: torch.Tensor = field(repr=False)
    crop_probabilities: torch.Tensor = field(repr=False)
    crop_boxes: Tuple[Tuple[Tuple[int, int, int], Tuple[int, int, int]], ...] = ()
    tiling: TilingStats = field(default_factory=TilingStats)
    _tiles: Tuple[Tile, ...] = field(default=(), repr=False, compare=False)
    _window: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @cached_property
    def mask(self) -> np.ndarray:
        """uint8 ``(I, J, K)``: the mask on the scan's whole grid (``region_mask`` in ``region_ijk``, 0 elsewhere)."""
        full = np.zeros(self.shape, np.uint8)
        if self.region_ijk is not None:
            full[self.region_ijk] = self.region_mask
        return full

    @cached_property
    def probabilities(self) -> np.ndarray:
        """float32 ``(I, J, K)``: each scan voxel's probability (the blended crop voxels its mask came from)."""
        if not self._tiles:
            raise ValueError("this result has no crop to paste probabilities from")
        window = self._window if self._window is not None else np.ones(self._tiles[0].crop.size)
        return combine_on_scan(self._tiles[0].crop.prepared, self._tiles, window, with_probabilities=True)[1]


@dataclass
class _LabelState:
    """What one label remembers between calls."""

    points: np.ndarray  # (N, 3) float64, every click received so far (original ijk)
    labels: np.ndarray  # (N,) int64
    result: PredictionResult  # the last answer; its _tiles hold each crop's prompt and low-res logits

    @property
    def tiles(self) -> Tuple[Tile, ...]:
        """The label's crops: the first (placed on the clicks), then those the extension added."""
        return self.result._tiles


def _new_click_indices(old_points: np.ndarray, old_labels: np.ndarray, points: np.ndarray,
                       labels: np.ndarray) -> Optional[List[int]]:
    """Indices (in ``points``) of the clicks not applied yet, or None if an applied click is missing."""
    remaining = Counter(zip(map(tuple, old_points.tolist()), old_labels.tolist()))
    new = []
    for index, key in enumerate(zip(map(tuple, points.tolist()), labels.tolist())):
        if remaining[key] > 0:
            remaining[key] -= 1
        else:
            new.append(index)
    if any(count > 0 for count in remaining.values()):
        return None
    return new


class Sam3DPredictor:
    """SAM-Med3D on whole scans: ``set_image`` once, then ``predict`` per click (see the module docstring).

    Args:
        model: a :class:`~sam_med3d.modeling.Sam3D` (or anything with ``img_size``, ``image_encoder`` and
            ``decode`` of the same signatures). It is moved to ``device`` and put in eval mode.
        device: where the model runs (``"cpu"``, ``"cuda"``, ...).
        spacing_mm: the canonical voxel size; 1.5 mm is what the official models were trained on.
        cache_size: how many crop embeddings to keep (least recently used are dropped); at least
            ``extension.max_crops`` are kept when the extension is on, so follow-up clicks reuse every crop.
        extension: covering structures larger than one crop (:mod:`sam_med3d.extension`): True (default
            settings), False (one crop per label), or an :class:`~sam_med3d.extension.ExtensionConfig`.

    Thread-safe: calls are serialised by a lock (a MONAI Label server may call from several threads).
    """

    def __init__(self, model: nn.Module, device: Union[str, torch.device] = "cpu",
                 spacing_mm: float = TARGET_SPACING_MM, cache_size: int = 8,
                 extension: Union[bool, ExtensionConfig] = True) -> None:
        for attribute in ("img_size", "image_encoder", "decode"):
            if not hasattr(model, attribute):
                raise ValueError(f"model has no {attribute!r}; expected a sam_med3d Sam3D")
        self.device = torch.device(device)
        disable_tf32()  # the masks must match the float32 reference, on a GPU too
        self.model = model.to(self.device).eval()
        self.img_size = int(model.img_size)
        if self.img_size % 16:
            raise ValueError(f"model img_size {self.img_size} is not a multiple of 16 (the patch size)")
        self.low_res_size = self.img_size // 4  # 4 x the embedding grid (S / 16), as the mask decoder outputs
        self.spacing_mm = float(spacing_mm)
        if isinstance(extension, bool):
            extension = ExtensionConfig(enabled=extension)
        if not isinstance(extension, ExtensionConfig):
            raise ValueError(f"extension must be True, False or an ExtensionConfig, got {extension!r}")
        self.extension = extension
        self._tiler = CropTiler(extension, self.img_size, self._embedding, self._decode_step, self._empty_low_res)
        self.cache_size = max(int(cache_size), extension.max_crops if extension.enabled else 0)
        self._lock = threading.RLock()
        self._prepared: Optional[PreparedScan] = None
        self._image_key: Optional[Hashable] = None
        self._embeddings: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self._states: Dict[Hashable, _LabelState] = {}
        self.encoder_runs = 0  # total over the predictor's life; for tests and benchmarks

    # ----------------------------------------------------------------------------------------- image state

    @property
    def prepared(self) -> Optional[PreparedScan]:
        """The current scan and its canonical grid (None before :meth:`set_image`)."""
        return self._prepared

    def set_image(self, path_or_array: ScanInput, affine: Optional[np.ndarray] = None) -> None:
        """Load and prepare a scan (no encoder run yet); see :func:`sam_med3d.io.load_scan` for inputs.

        Clears cached embeddings and all label states, except when the same file (path, size and
        modification time unchanged) is set again, which keeps everything.
        Raises ValueError for unreadable or invalid scans (the previous image is kept then).
        """
        key = self._file_key(path_or_array) if affine is None else None
        with self._lock:
            if key is not None and key == self._image_key and self._prepared is not None:
                return
            prepared = PreparedScan(load_scan(path_or_array, affine), self.spacing_mm)
            self._prepared = prepared
            self._image_key = key
            self._embeddings.clear()
            self._states.clear()

    def sibling(self, model: nn.Module) -> "Sam3DPredictor":
        """Another predictor on this predictor's scan that answers with ``model`` (e.g. weights fine-tuned for
        some structures, next to the base weights for the others).

        The prepared scan is shared (no second load or resampling) and so is the lock. When ``model``'s image
        encoder is the same module as this predictor's (fine-tuning with the encoder frozen, see
        :func:`share_image_encoder`), the crop embeddings are shared too: the encoder runs once per crop for
        both. Label states (clicks, previous masks) are the sibling's own. Call :meth:`set_image` on neither
        afterwards: a sibling belongs to the scan it was made on.
        """
        with self._lock:
            other = Sam3DPredictor(model, device=self.device, spacing_mm=self.spacing_mm,
                                   cache_size=self.cache_size, extension=self.extension)
            if other.img_size != self.img_size:
                raise ValueError(f"a sibling predictor's model must have the same input size, got "
                                 f"{other.img_size} for {self.img_size}")
            other._lock = self._lock
            other._prepared = self._prepared
            other._image_key = self._image_key
            if model.image_encoder is self.model.image_encoder:
                other._embeddings = self._embeddings
            return other

    @staticmethod
    def _file_key(path_or_array: ScanInput) -> Optional[Hashable]:
        if not isinstance(path_or_array, (str, os.PathLike)):
            return None
        try:
            return file_identity(path_or_array)
        except OSError:
            return None

    def reset(self, label_key: Optional[Hashable] = None) -> None:
        """Forget the clicks and previous mask of ``label_key`` (of every label if None). The image and its
        cached embeddings stay."""
        with self._lock:
            if label_key is None:
                self._states.clear()
            else:
                self._states.pop(label_key, None)

    # ------------------------------------------------------------------------------------------- predict

    def predict(self, points: PointsLike, labels: LabelsLike, label_key: Hashable = "default",
                multimask_output: bool = False, crop_affine: Optional[np.ndarray] = None) -> PredictionResult:
        """Segment from the full list of clicks so far for one label.

        Args:
            points: ``(N, 3)`` voxel indices ``(i, j, k)`` of the scan as stored (NIfTI array axes / ITK index
                order); integers or floats within half a voxel of the scan.
            labels: ``(N,)``, 1 = positive (object), 0 = negative (background).
            label_key: which label (segment) these clicks belong to; labels have independent states.
            multimask_output: decode 3 candidate masks per step and keep the one with the best predicted IoU
                (the official click loop uses False).
            crop_affine: optional 4x4 RAS voxel->world matrix of an ``img_size``^3 crop of this scan's canonical
                grid (e.g. the official pipeline's crop, or ``PredictionResult.crop_affine``): the model sees
                that crop instead of one placed on the clicks. Pinning a crop other than the label's current
                one starts the label over in it; clicks outside it are recorded but not seen. Later calls
                without ``crop_affine`` keep the crop while their clicks fall inside it.

        Returns:
            A :class:`PredictionResult` on the original grid.

        Raises:
            ValueError: no image set, no clicks, wrong shapes, non-finite coordinates, labels not in {0, 1},
                or a click outside the scan (naming the click and the scan shape), or a ``crop_affine`` that is
            not a whole-voxel shift of the scan's canonical grid.
        """
        with self._lock, torch.inference_mode():
            start_time = time.perf_counter()
            prepared = self._prepared
            if prepared is None:
                raise ValueError("no image set: call set_image(path_or_array) before predict()")
            pts, labs = self._validate(prepared, points, labels)
            timings = {"preprocess": 0.0, "encode": 0.0, "decode": 0.0, "paste": 0.0}
            state = self._states.get(label_key)
            new = None if state is None else _new_click_indices(state.points, state.labels, pts, labs)
            pinned = None if crop_affine is None else prepared.crop_from_affine(crop_affine, self.img_size)
            if pinned is not None and state is not None and state.tiles[0].crop.key != pinned.key:
                new = None  # another crop: the label starts over in it

            if state is not None and new is not None and (
                    pinned is not None or crop_keeps_clicks(state.tiles[0].crop, pts[new], labs[new])):
                first = state.tiles[0]
                crop, replay = first.crop, [i for i in new if bool(first.crop.contains(pts[i:i + 1])[0])]
                prompt_pts, prompt_labs, low_res = first.prompt_points, first.prompt_labels, first.low_res
                earlier = state.tiles[1:]
                if not replay and not changes_beyond_first(state.tiles, pts, labs, new):
                    # nothing the model can see changed
                    self._states[label_key] = replace(state, points=pts, labels=labs)
                    return self._repeat(state.result, start_time)
            else:
                crop = pinned if pinned is not None else place_crop(prepared, pts, labs, self.img_size, new)
                replay = [i for i in range(len(pts)) if bool(crop.contains(pts[i:i + 1])[0])]
                earlier = ()
                prompt_pts, prompt_labs = np.zeros((0, 3)), np.zeros(0, np.int64)
                low_res = self._empty_low_res()

            embedding, encoder_ran = self._embedding(crop, timings)

            tick = time.perf_counter()
            iou = float("nan") if state is None else state.result.iou
            for index in replay:
                prompt_pts = np.concatenate([prompt_pts, crop.to_crop(pts[index:index + 1])])
                prompt_labs = np.concatenate([prompt_labs, labs[index:index + 1]])
                low_res, iou = self._decode_step(embedding, prompt_pts, prompt_labs, low_res, multimask_output)
            timings["decode"] = time.perf_counter() - tick

            tick = time.perf_counter()
            probs_crop = torch.sigmoid(upsample_logits(low_res, crop.size))[0, 0].float().cpu()
            timings["paste"] = time.perf_counter() - tick
            primary = Tile(crop, prompt_pts, prompt_labs, low_res, probs_crop)
            tiles, tiling = [primary], TilingStats()
            if pinned is None and self.extension.enabled:
                tick = time.perf_counter()
                tiles, tiling = self._tiler.extend(prepared, primary, earlier, pts, labs, new, timings, start_time,
                                                   multimask_output)
                timings["extension"] = time.perf_counter() - tick

            tick = time.perf_counter()
            # The official post-processing: threshold in the crop, then nearest-neighbour onto the scan's grid
            # (with several crops: their probabilities blended, see sam_med3d.extension), computed only where
            # the crops are: O(crop) on any scan (PredictionResult.mask is built on demand).
            region, region_mask = self._tiler.combine(prepared, tiles)
            timings["paste"] += time.perf_counter() - tick
            timings["total"] = time.perf_counter() - start_time

            result = PredictionResult(
                shape=prepared.scan.shape, region_mask=region_mask, affine=prepared.scan.affine.copy(), iou=iou,
                timings=timings, encoder_ran=encoder_ran or tiling.encoder_runs > 0, crop_box=(crop.start, crop.stop),
                crop_affine=crop.affine, region_ijk=region, decode_steps=len(replay) + tiling.decode_steps,
                prompt_clicks=len(prompt_labs), low_res_logits=low_res.float().cpu(), crop_probabilities=probs_crop,
                crop_boxes=tuple((t.crop.start, t.crop.stop) for t in tiles), tiling=tiling, _tiles=tuple(tiles),
                _window=self._tiler.window)
            self._states[label_key] = _LabelState(pts, labs, result)
            return result

    # ------------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _validate(prepared: PreparedScan, points: PointsLike, labels: LabelsLike) -> Tuple[np.ndarray, np.ndarray]:
        pts = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
        if pts.size == 0:
            raise ValueError("empty prompt: give at least one click (points (N, 3), labels (N,))")
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3) (voxel indices i, j, k), got {pts.shape}")
        raw_labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
        if raw_labels.ndim != 1 or raw_labels.shape[0] != pts.shape[0]:
            raise ValueError(f"labels must have shape ({pts.shape[0]},) to match points, got {raw_labels.shape}")
        if raw_labels.dtype.kind not in "biuf" or not np.all(np.isin(raw_labels, (0, 1))):
            bad = [v for v in raw_labels.tolist() if v not in (0, 1)][:3]
            raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {bad}")
        pts = prepared.check_inside(pts, "click")
        return pts, raw_labels.astype(np.int64)

    def _empty_low_res(self) -> torch.Tensor:
        """The mask prompt of a crop's first step: all-zero low-res logits (the official loop's ``prev_masks``)."""
        return torch.zeros((1, 1) + (self.low_res_size,) * 3, device=self.device)

    def _embedding(self, crop: Crop, timings: Dict[str, float]) -> Tuple[torch.Tensor, bool]:
        cached = self._embeddings.get(crop.key)
        if cached is not None:
            self._embeddings.move_to_end(crop.key)
            return cached, False
        # Summed: one click may encode several crops (the extension).
        tick = time.perf_counter()
        image = crop.image.to(self.device)[None, None]
        timings["preprocess"] += time.perf_counter() - tick
        tick = time.perf_counter()
        embedding = self.model.image_encoder(image)
        synchronize(self.device)  # else a GPU's encoder time would show up in "decode"
        timings["encode"] += time.perf_counter() - tick
        self.encoder_runs += 1
        self._embeddings[crop.key] = embedding
        while len(self._embeddings) > self.cache_size:
            self._embeddings.popitem(last=False)
        return embedding, True

    def _decode_step(self, embedding: torch.Tensor, prompt_pts: np.ndarray, prompt_labs: np.ndarray,
                     low_res: torch.Tensor, multimask_output: bool) -> Tuple[torch.Tensor, float]:
        coords = torch.as_tensor(prompt_pts, dtype=torch.float32, device=self.device)[None]
        point_labels = torch.as_tensor(prompt_labs, dtype=torch.int64, device=self.device)[None]
        logits, iou_pred = self.model.decode(embedding, points=(coords, point_labels), mask_input=low_res,
                                             multimask_output=multimask_output)
        best = int(torch.argmax(iou_pred[0])) if logits.shape[1] > 1 else 0
        return logits[:, best:best + 1].float(), float(iou_pred[0, best])

    @staticmethod
    def _repeat(result: PredictionResult, start_time: float) -> PredictionResult:
        timings = {"preprocess": 0.0, "encode": 0.0, "decode": 0.0, "paste": 0.0,
                   "total": time.perf_counter() - start_time}
        crops = len(result.crop_boxes) or 1
        return replace(result, timings=timings, encoder_ran=False, decode_steps=0,
                       tiling=TilingStats(crops=crops, crops_reused=crops - 1))


def share_image_encoder(model: nn.Module, other: nn.Module) -> bool:
    """Make ``model`` use ``other``'s image encoder module when their encoder weights are equal (e.g. a model
    fine-tuned with the encoder frozen, and its base), so sibling predictors share crop embeddings and the
    encoder's memory. Returns whether it did; ``model`` is unchanged when the weights differ."""
    mine, theirs = model.image_encoder.state_dict(), other.image_encoder.state_dict()
    if mine.keys() != theirs.keys():
        return False
    for key, value in mine.items():
        peer = theirs[key]
        if value.shape != peer.shape or value.dtype != peer.dtype or not torch.equal(value, peer.to(value.device)):
            return False
    model.image_encoder = other.image_encoder
    return True


__all__ = ("Sam3DPredictor", "PredictionResult", "share_image_encoder")
