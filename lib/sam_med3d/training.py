"""Training pieces shared by ``pretrain/train.py`` and the MONAI Label app's trainer.

Three things live here:

1. **Training-crop transforms** (:func:`training_transforms`, split into :func:`preprocess_transforms`, the
   deterministic and cacheable part, and :func:`crop_transforms`, the per-sample random part). A sample is a
   dict ``{"image", "label"}``; the output is ``image`` float32 ``(1, S, S, S)`` and ``label`` float32 ``{0, 1}``
   ``(1, S, S, S)`` (plain tensors), in the same frame the predictor uses: array axes = canonical **RAS**
   (MONAI ``Orientation("RAS")``, i.e. torchio's ``ToCanonical``), voxels of ``spacing_mm`` (1.5 mm,
   bilinear image / nearest label), a cubic crop of ``S`` voxels around the target (the bounding-box centre of
   the target plus a random jitter, zero padding outside the scan, as the official ``CropOrPad(mask_name=
   "label")``), then z-scored with the mean/std of the crop's voxels > 0 applied to every voxel (the official
   ``ZNormalization(masking_method=lambda x: x > 0)``), then random flips along each axis.

2. **The click-iteration step** (:func:`click_iteration_step`, :class:`ClickIterationModel`,
   :class:`ClickTrainingStep`): SAM-Med3D's interactive training recipe (the official ``train.py``
   ``BaseTrainer.interaction``):

   - the image is encoded **once** per batch;
   - iteration 0 clicks a uniformly random voxel of the target (positive); every later iteration adds one click
     drawn uniformly from the error region (false negatives -> positive, false positives -> negative) of the
     current prediction (:func:`sam_med3d.clicks.simulate_clicks_batch`, ``mode="random"``);
   - each iteration decodes with the clicks so far and the previous low-res logits as the mask prompt (zeros
     at iteration 0, exactly as the official trainer and inference do);
   - as in the official trainer, one random iteration in ``[2, 8]`` and the last one are decoded from the
     mask prompt alone (no points), which teaches the decoder to refine its own previous mask
     (``mask_only_iterations=True``);
   - the loss (DiceCE on the logits upsampled trilinearly to ``S``, vs the label) is computed at every
     iteration and **averaged** (the official sums; AdamW is invariant to that constant factor, and the mean
     keeps loss values and the gradient-clipping threshold comparable across click counts);
   - gradients flow through the chain of mask prompts (the official does not detach either;
     ``detach_mask_prompt=True`` cuts it to save memory).

   Deviations from the official code, on purpose: all clicks so far are given (the official default
   ``--multi_click`` off gives only the newest click; the released inference gives them all), and the
   prediction used to place the next click is ``logits > 0`` (probability > 0.5; the official thresholds the
   raw logits at 0.5). An optional IoU-head loss (``iou_loss_weight``; the official never trains the IoU head)
   makes ``iou_pred`` meaningful.

3. **Fine-tuning glue** for ignite/MONAI engines (:class:`ClickValidationStep`, :class:`WithModelCompleted`,
   :func:`freeze_image_encoder`, :func:`retention_agreement`): what the app's trainer plugs into MONAI Label's
   ``BasicTrainTask``.

Coordinates: click points are voxel indices ``(d, h, w)`` along tensor axes 2, 3, 4 of the ``(B, 1, S, S, S)``
crop (= RAS array axes i, j, k after :func:`training_transforms`).
"""

from __future__ import annotations

import os
import zlib
from contextlib import nullcontext
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.losses import DiceCELoss
from monai.transforms import (Compose, EnsureChannelFirstd, MapTransform, Orientationd, RandFlipd, Randomizable,
                              Spacingd)
from torch import nn

from .clicks import simulate_clicks_batch
from .geometry import TARGET_SPACING_MM, normalize_intensity, upsample_logits
from .reader_transforms import DEFAULT_MAX_VOXELS, LoadScand

__all__ = [
    "DEFAULT_SPACING_MM", "preprocess_transforms", "crop_transforms", "training_transforms", "RandStructured",
    "SelectTargetd",
    "RandTargetCropd", "ForegroundZNormd", "ToTrainingTensord", "OfficialCropd", "validation_transforms",
    "zscore_foreground", "default_loss",
    "ClickIterationModel", "click_iteration_step", "ClickTrainingStep", "batch_dice", "off_target_clicks",
    "disagreement_clicks", "retention_loss", "click_iterations",
]

#: Isotropic voxel size of the training/inference frame (the official preprocessing resamples to 1.5 mm).
DEFAULT_SPACING_MM = TARGET_SPACING_MM


# ------------------------------------------------------------------------------------------------ transforms
def zscore_foreground(image: torch.Tensor) -> torch.Tensor:
    """Z-score ``image`` with the mean/std of its voxels > 0, applied to all voxels (the official rule).

    Delegates to :func:`sam_med3d.geometry.normalize_intensity`, so training crops are normalised exactly as
    the predictor's crops (same statistics and fallbacks). ``image``: any-shape tensor -> float32, same shape.
    """
    return normalize_intensity(torch.as_tensor(image))[0]


class SelectTargetd(MapTransform):
    """Binarise the label: ``label == label_value`` (multi-class labels) or ``label > 0`` (``label_value=None``).

    A per-sample ``"label_value"`` entry in the dict, when present, overrides the constructor's value, so one
    cached multi-class volume can serve each of its classes as a separate target.
    """

    def __init__(self, keys: KeysCollection = "label", label_value: Optional[int] = None,
                 value_key: str = "label_value") -> None:
        super().__init__(keys)
        self.label_value = label_value
        self.value_key = value_key

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        value = d.get(self.value_key, self.label_value)
        for key in self.key_iterator(d):
            lab = torch.as_tensor(d[key])
            d[key] = (lab > 0) if value is None else (lab == int(value))
        return d


class RandStructured(Randomizable, MapTransform):
    """Draw the target of a sample among several structures of its label map: when the sample's ``"label_value"``
    is a list of values, replace it by one of them, uniformly at random (an int or ``None`` is left as it is).

    So one cached volume serves all its structures (rehearsal data: each draw of the scan trains on another of
    its organs) without one cached copy per structure. Put it before :class:`SelectTargetd`.
    """

    def __init__(self, value_key: str = "label_value") -> None:
        super().__init__(keys=value_key)
        self.value_key = value_key

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        values = d.get(self.value_key)
        if isinstance(values, (list, tuple)):
            if not values:
                raise ValueError("label_value is an empty list: no structure to draw")
            d[self.value_key] = int(values[self.R.randint(len(values))])
        return d


#: Where a training crop is centred: ``box`` = the target's bounding-box centre (the official recipe, as the
#: official inference centres its crop on the label), ``voxel`` = a uniformly random voxel of the target (as the
#: app's predictor centres its crop on a first click somewhere in the structure).
CROP_CENTERS = ("box", "voxel")


class RandTargetCropd(Randomizable, MapTransform):
    """Cubic crop of ``crop_size`` voxels around the target, with a random jitter.

    The window centre is the centre of the bounding box of ``label > 0`` (``center="box"``) or a uniformly
    random voxel of it (``center="voxel"``), the scan centre when the label is empty, plus an integer offset
    drawn uniformly from ``[-jitter, jitter]`` per axis. Parts of the window outside the scan are zero-padded
    (image and label), as the official ``CropOrPad``. Works on channel-first ``(C, I, J, K)`` tensors; returns
    plain tensors (the crop's affine is not needed for training). Either way the window stays within
    ``crop_size // 2 + jitter`` voxels of the target's bounding box.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), label_key: str = "label", crop_size: int = 128,
                 jitter: int = 0, center: str = "box") -> None:
        super().__init__(keys)
        if int(crop_size) <= 0:
            raise ValueError(f"crop_size must be a positive number of voxels, got {crop_size}")
        if int(jitter) < 0:
            raise ValueError(f"jitter must be >= 0 voxels, got {jitter}")
        if center not in CROP_CENTERS:
            raise ValueError(f"center must be one of {', '.join(CROP_CENTERS)}, got {center!r}")
        self.label_key = label_key
        self.crop_size = int(crop_size)
        self.jitter = int(jitter)
        self.center = center
        self._offset = np.zeros(3, dtype=np.int64)
        self._pick = 0.0

    def randomize(self, data: Any = None) -> None:
        self._offset = self.R.randint(-self.jitter, self.jitter + 1, size=3) if self.jitter else np.zeros(3, int)
        self._pick = self.R.random_sample() if self.center == "voxel" else 0.0

    def window(self, label: torch.Tensor) -> np.ndarray:
        """Start voxel (3,) of the crop window for a ``(C, I, J, K)`` label (uses the current random draws)."""
        shape = np.asarray(label.shape[-3:])
        fg = torch.nonzero(torch.as_tensor(label).reshape(label.shape[-3:]) > 0)
        if not fg.numel():
            centre = shape // 2
        elif self.center == "voxel":
            centre = fg[min(int(self._pick * fg.shape[0]), fg.shape[0] - 1)].cpu().numpy()
        else:
            lo, hi = fg.min(0).values.cpu().numpy(), fg.max(0).values.cpu().numpy() + 1
            centre = (lo + hi) // 2
        return centre + self._offset - self.crop_size // 2

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        self.randomize()
        label = d[self.label_key]
        start = self.window(label)
        for key in self.key_iterator(d):
            d[key] = crop_or_pad(torch.as_tensor(d[key]), start, self.crop_size)
        return d


def crop_or_pad(x: torch.Tensor, start: Sequence[int], size: int) -> torch.Tensor:
    """The window ``[start, start + size)`` of the last three axes of ``x``, zero-padded where outside ``x``."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor
    shape = x.shape[-3:]
    src, dst = [], []
    for axis in range(3):
        a, b = int(start[axis]), int(start[axis]) + size
        lo, hi = max(a, 0), min(b, shape[axis])
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - a, lo - a + max(hi - lo, 0)))
    out = torch.zeros(x.shape[:-3] + (size, size, size), dtype=x.dtype, device=x.device)
    out[(Ellipsis, *dst)] = x[(Ellipsis, *src)]
    return out


class ForegroundZNormd(MapTransform):
    """:func:`zscore_foreground` on each key (statistics of voxels > 0, applied to all voxels)."""

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = zscore_foreground(d[key])
        return d


class ToTrainingTensord(MapTransform):
    """Plain contiguous float32 tensors (MetaTensor metadata dropped: the training step needs none)."""

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
            d[key] = x.float().contiguous()
        return d


def preprocess_transforms(spacing_mm: float = DEFAULT_SPACING_MM, load: bool = True,
                          keys: Sequence[str] = ("image", "label"),
                          max_voxels: Optional[int] = DEFAULT_MAX_VOXELS) -> List[Any]:
    """The deterministic (cacheable) part: load -> channel first -> RAS -> ``spacing_mm`` isotropic.

    Input dict: ``image``/``label`` file paths (``load=True``) or channel-first MetaTensors with affines.
    Output: ``image`` float32 MetaTensor ``(1, I, J, K)`` (bilinear), ``label`` MetaTensor ``(1, I, J, K)``
    with the original integer values (nearest), in canonical RAS at ``spacing_mm``.
    """
    if not spacing_mm or float(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be a positive voxel size in mm, got {spacing_mm}")
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    out: List[Any] = []
    if load:
        # Through sam_med3d.io, as the server reads uploads (no header naming another file, the voxel cap).
        out += [LoadScand(keys=keys, max_voxels=max_voxels), EnsureChannelFirstd(keys=keys)]
    # Explicit RAS labels: MONAI otherwise warns about its changing default (nibabel-loaded data are RAS anyway).
    out += [Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys=keys, pixdim=(float(spacing_mm),) * 3, mode=modes)]
    return out


def crop_transforms(crop_size: int, augment: bool = True, jitter: Optional[int] = None,
                    label_value: Optional[int] = None, center: str = "box") -> List[Any]:
    """The per-sample part: binarise the target -> crop/pad around it -> z-score -> (flips) -> tensors.

    ``jitter`` defaults to ``crop_size // 8`` voxels when ``augment`` (0 otherwise). ``label_value``: the class
    to segment (``None`` = every label > 0); a ``"label_value"`` entry in the sample overrides it (a list of
    values: one of them, drawn per sample by :class:`RandStructured`). ``center``:
    see :class:`RandTargetCropd` (``box`` = the official recipe).
    """
    if jitter is None:
        jitter = crop_size // 8 if augment else 0
    out: List[Any] = [RandStructured(), SelectTargetd("label", label_value=label_value),
                      RandTargetCropd(("image", "label"), crop_size=crop_size, jitter=jitter, center=center),
                      ForegroundZNormd("image")]
    if augment:
        # Independent flips along the three axes (the official tio.RandomFlip(axes=(0, 1, 2)), p = 0.5 each).
        out += [RandFlipd(("image", "label"), prob=0.5, spatial_axis=axis) for axis in range(3)]
    out.append(ToTrainingTensord(("image", "label")))
    return out


def training_transforms(crop_size: int, spacing_mm: float = DEFAULT_SPACING_MM, augment: bool = True,
                        load: bool = True, jitter: Optional[int] = None,
                        label_value: Optional[int] = None, center: str = "box",
                        max_voxels: Optional[int] = DEFAULT_MAX_VOXELS) -> Compose:
    """MONAI dict transforms ``{"image", "label"}`` -> a training crop (see the module docstring).

    Args:
        crop_size: edge ``S`` of the cubic crop in voxels (``model.img_size``).
        spacing_mm: isotropic voxel size of the training frame.
        augment: random jitter of the crop centre and random flips.
        load: the inputs are file paths (read by :class:`~sam_med3d.reader_transforms.LoadScand`); else
            channel-first MetaTensors with affines.
        jitter: maximum crop-centre offset in voxels per axis (default ``crop_size // 8`` when augmenting).
        label_value: class to segment in a multi-class label (``None``: every label > 0).
        center: ``box`` (the official recipe: the crop centred on the target's bounding box) or ``voxel`` (on a
            random voxel of the target, as the app centres its crop on a first click).
        max_voxels: files whose header claims more voxels are refused before decoding (``ValueError``).

    Returns:
        a ``Compose`` producing ``image`` float32 ``(1, S, S, S)`` and ``label`` float32 ``{0, 1}``
        ``(1, S, S, S)``.
    """
    return Compose(preprocess_transforms(spacing_mm, load=load, max_voxels=max_voxels)
                   + crop_transforms(crop_size, augment=augment, jitter=jitter, label_value=label_value,
                                     center=center))


class OfficialCropd(MapTransform):
    """The official inference crop of one target, for validation: ``{"image", "label"[, "label_value"]}`` file
    paths -> ``image`` float32 ``(1, S, S, S)`` and ``label`` float32 ``{0, 1}`` ``(1, S, S, S)``.

    Exactly what the predictor feeds the model (:mod:`sam_med3d.geometry`, i.e. the official
    ``infer_utils`` preprocessing): resampled to 1.5 mm in the stored orientation, reoriented, the crop placed
    by ``CropOrPad(mask_name="label")``'s rule on the target, zero-padded, z-scored over raw voxels > 0; the
    label resampled by nearest neighbour. So validation Dice is measured on the crops that inference sees,
    not on the training frame (MONAI ``Orientation`` + ``Spacing``, whose grid differs slightly).
    """

    def __init__(self, crop_size: int, spacing_mm: float = DEFAULT_SPACING_MM,
                 label_value: Optional[int] = None, value_key: str = "label_value", center: str = "label",
                 max_voxels: Optional[int] = DEFAULT_MAX_VOXELS) -> None:
        super().__init__(("image", "label"))
        self.max_voxels = max_voxels
        if center not in ("label", "click"):
            raise ValueError(f"center must be 'label' or 'click', got {center!r}")
        self.crop_size = int(crop_size)
        self.spacing_mm = float(spacing_mm)
        self.label_value = label_value
        self.value_key = value_key
        self.center = center

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        from .geometry import PreparedScan
        from .io import load_label, load_scan, read_header

        d = dict(data)
        # Through sam_med3d.io with the voxel cap, as training's LoadScand (validation reads the same files).
        prepared = PreparedScan(load_scan(d["image"], max_voxels=self.max_voxels), self.spacing_mm)
        labels = load_label(d["label"], read_header(d["image"]), self.max_voxels)
        value = d.get(self.value_key, self.label_value)
        target = (labels > 0) if value is None else (labels == int(value))
        if self.center == "click" and target.any():
            # As the app's predictor places the crop for a first click: centred on one voxel of the target,
            # drawn with a seed of the file's name (not its folder, which may be a temporary one) and value: the
            # same voxel in every validation run.
            name = os.path.basename(str(d["label"]))
            seed = zlib.crc32(f"{name}|{value}|{d.get('val_sequence', 0)}".encode("utf-8"))
            voxels = np.flatnonzero(target.reshape(-1))
            voxel = np.unravel_index(int(voxels[np.random.default_rng(seed).integers(len(voxels))]), target.shape)
            crop = prepared.crop_around([list(voxel)], self.crop_size)
        else:
            crop = prepared.crop(prepared.crop_box_of_mask(target, self.crop_size), self.crop_size)
        d["image"] = crop.image[None].float().contiguous()
        d["label"] = crop.sample(target.astype(np.uint8), "nearest")[None].float().contiguous()
        return d


def validation_transforms(crop_size: int, spacing_mm: float = DEFAULT_SPACING_MM,
                          label_value: Optional[int] = None, center: str = "label",
                          max_voxels: Optional[int] = DEFAULT_MAX_VOXELS) -> Compose:
    """Validation samples as inference sees them (:class:`OfficialCropd`); inputs are file paths. ``center``:
    ``label`` (the official evaluation's crop) or ``click`` (the app's: centred on a seeded voxel of the target).
    ``max_voxels``: files whose header claims more voxels are refused before decoding."""
    return Compose([OfficialCropd(crop_size, spacing_mm, label_value, center=center, max_voxels=max_voxels)])


# ------------------------------------------------------------------------------------------------ click step
def default_loss() -> nn.Module:
    """The official loss: ``DiceCELoss(sigmoid=True, squared_pred=True)``, mean over the batch."""
    return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")


def batch_dice(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-item Dice ``(B,)`` of ``logits > 0`` vs ``label > 0`` (``(B, 1, S, S, S)`` each); 1 when both empty."""
    pred = (logits > 0).flatten(1)
    gt = (label > 0).flatten(1)
    inter = (pred & gt).sum(1).float()
    total = (pred.sum(1) + gt.sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def _check_batch(image: torch.Tensor, label: torch.Tensor, img_size: int) -> None:
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"image must be (B, 1, S, S, S), got shape {tuple(image.shape)}")
    if tuple(label.shape) != tuple(image.shape):
        raise ValueError(f"label must have the image's shape {tuple(image.shape)}, got {tuple(label.shape)}")
    if tuple(image.shape[2:]) != (img_size,) * 3:
        raise ValueError(f"image crop is {tuple(image.shape[2:])} but the model takes {img_size}^3 crops")


def _mask_only_iterations(n: int, rng: np.random.Generator, enabled: bool) -> set:
    """Official: one random iteration in [2, 8] and the last one use the mask prompt only (when n > 1)."""
    if not enabled or n < 2:
        return set()
    return {int(rng.integers(2, 9)), n - 1}


def run_click_iterations(sam: nn.Module, image: torch.Tensor, label: torch.Tensor, num_click_iterations: int,
                         rng: np.random.Generator, loss_fn: Optional[nn.Module] = None,
                         mask_only_iterations: bool = True, detach_mask_prompt: bool = False,
                         iou_loss_weight: float = 0.0, click_mode: str = "random",
                         embedding: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """The interactive loop on an unwrapped :class:`~sam_med3d.modeling.Sam3D` (see the module docstring).

    Args:
        sam: the model (its ``image_encoder`` and ``decode``).
        image: ``(B, 1, S, S, S)`` float, z-scored crop.
        label: ``(B, 1, S, S, S)`` {0, 1}.
        num_click_iterations: number of decoder passes (= clicks simulated; the official uses 11).
        rng: numpy Generator driving the clicks and the choice of the mask-only iteration.
        loss_fn: segmentation loss on logits (default :func:`default_loss`).
        embedding: ``sam.image_encoder(image)`` when already computed (kept from an earlier call with the same
            encoder weights); default: encoded here.

    Returns:
        dict with ``loss`` (scalar tensor with graph: mean over iterations), ``seg_loss`` (float),
        ``low_res_logits`` (detached ``(B, 1, S/4, S/4, S/4)``, last iteration), ``logits`` (detached
        upsampled ``(B, 1, S, S, S)``), ``dice`` (float: mean Dice of the last prediction), ``dice_per_item``
        ``(B,)``, ``points`` ``(B, N, 3)`` and ``point_labels`` ``(B, N)`` (the clicks given).
    """
    if num_click_iterations < 1:
        raise ValueError(f"num_click_iterations must be >= 1, got {num_click_iterations}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    img_size = int(sam.img_size)
    _check_batch(image, label, img_size)
    loss_fn = loss_fn if loss_fn is not None else default_loss()
    label = (label > 0).to(image.dtype if image.is_floating_point() else torch.float32)
    b = image.shape[0]
    low = img_size // 4
    mask_only = _mask_only_iterations(num_click_iterations, rng, mask_only_iterations)

    if embedding is None:
        embedding = sam.image_encoder(image)
    low_res = torch.zeros((b, 1, low, low, low), device=image.device, dtype=embedding.dtype)
    pred = torch.zeros_like(label, dtype=torch.bool)
    coords: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    total = image.new_zeros((), dtype=torch.float32)
    seg_total = 0.0
    logits = None
    for it in range(num_click_iterations):
        # Clicks are always simulated (as the official does), even for a mask-only pass, so the click list
        # keeps growing with the error of every prediction.
        pts, lab = simulate_clicks_batch(pred, label > 0, rng, mode=click_mode)
        coords.append(pts.to(image.device, torch.float32))
        labels.append(lab.to(image.device))
        points = None if it in mask_only else (torch.cat(coords, 1), torch.cat(labels, 1))
        mask_in = low_res.detach() if detach_mask_prompt else low_res
        low_res, iou_pred = sam.decode(embedding, points=points, mask_input=mask_in, multimask_output=False)
        # Loss in float32 whatever the autocast dtype (bf16 logits make Dice/CE noisy).
        logits = upsample_logits(low_res.float(), img_size)
        seg = loss_fn(logits, label.float())
        step_loss = seg
        pred = logits.detach() > 0
        if iou_loss_weight:
            # The IoU head learns the IoU of its own thresholded mask (SAM's recipe; not in the official 3D code).
            inter = (pred & (label > 0)).flatten(1).sum(1).float()
            union = (pred | (label > 0)).flatten(1).sum(1).float()
            true_iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
            step_loss = step_loss + iou_loss_weight * F.mse_loss(iou_pred[:, 0].float(), true_iou)
        total = total + step_loss
        seg_total += float(seg.detach())
    dice_items = batch_dice(logits.detach(), label)
    return {"loss": total / num_click_iterations, "seg_loss": seg_total / num_click_iterations,
            "low_res_logits": low_res.detach(), "logits": logits.detach(), "dice": float(dice_items.mean()),
            "dice_per_item": dice_items, "points": torch.cat(coords, 1), "point_labels": torch.cat(labels, 1),
            "embedding": embedding}


def off_target_clicks(image: torch.Tensor, label: torch.Tensor,
                      rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One positive click per batch item on a uniformly random voxel outside the target and inside the scan.

    "Inside the scan" = the crop's voxels above its minimum (zero padding and air are left out). Returns
    ``(points (B, 1, 3) int64, labels (B, 1) int64)`` on ``image``'s device; an item whose crop has no such voxel
    gets the padding point ``(0, 0, 0)`` with label ``-1`` ("not a point").
    """
    b = image.shape[0]
    points = torch.zeros((b, 1, 3), dtype=torch.long)
    labels = torch.full((b, 1), -1, dtype=torch.long)
    img = image.detach()[:, 0].float().cpu()
    lab = label.detach()[:, 0].cpu() > 0
    for i in range(b):
        candidates = torch.nonzero((img[i] > img[i].min() + 1e-3) & ~lab[i])
        if candidates.numel():
            points[i, 0] = candidates[int(rng.integers(candidates.shape[0]))]
            labels[i, 0] = 1
    return points.to(image.device), labels.to(image.device)


def disagreement_clicks(student: torch.Tensor, teacher: torch.Tensor, scale: int,
                        rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One click per batch item where two low-res masks disagree, labelled with ``teacher``'s answer there.

    ``student``/``teacher``: ``(B, 1, L, L, L)`` bool masks; ``scale``: crop voxels per low-res voxel. The click
    is a uniformly random crop voxel inside a uniformly random disagreeing low-res voxel: positive (1) where the
    teacher says foreground, negative (0) where it says background. Items that agree everywhere get the padding
    point with label ``-1``. Returns ``(points (B, 1, 3) int64, labels (B, 1) int64)`` on the masks' device.
    """
    b = student.shape[0]
    points = torch.zeros((b, 1, 3), dtype=torch.long)
    labels = torch.full((b, 1), -1, dtype=torch.long)
    s, t = student[:, 0].cpu(), teacher[:, 0].cpu()
    for i in range(b):
        wrong = torch.nonzero(s[i] != t[i])
        if wrong.numel():
            voxel = wrong[int(rng.integers(wrong.shape[0]))]
            points[i, 0] = voxel * scale + torch.from_numpy(rng.integers(0, scale, size=3))
            labels[i, 0] = int(t[i][tuple(voxel.tolist())])
    return points.to(student.device), labels.to(student.device)


def retention_loss(sam: nn.Module, teacher: nn.Module, embedding: torch.Tensor, image: torch.Tensor,
                   label: torch.Tensor, rng: np.random.Generator, num_clicks: int = 3,
                   teacher_embedding: Optional[torch.Tensor] = None,
                   loss_fn: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Learning without forgetting for promptable segmentation: keep ``sam``'s answers to prompts *elsewhere* in
    the image close to ``teacher``'s (the weights before fine-tuning).

    Fine-tuned on one structure, the decoder learns to segment that structure wherever it is clicked and forgets
    the others (benchmarks/active_learning.py). Here a simulated session is run on something else in the same
    crop: the first click is a random voxel outside the target (:func:`off_target_clicks`); the teacher's
    prediction for the clicks so far is the reference, and each further click is drawn where ``sam`` and the
    teacher disagree (:func:`disagreement_clicks`: positive where the teacher says foreground), so both models
    see the same clicks, each its own previous low-res mask as the mask prompt, as in use. The loss at each step
    is ``loss_fn`` (default :func:`default_loss`, the segmentation loss itself) of ``sam``'s low-res logits
    against the teacher's mask (its logits > 0), averaged over the steps: the Dice part weighs the structure the
    teacher segments, however small, where a voxel-wise loss against its probabilities is dominated by the
    background and lets the structure go (benchmarks/active_learning.py, docs/experiments.md). Everything runs on the
    low-res masks (``S/4``), so it costs a few decoder passes, no full-size work.

    Args:
        sam: the model being tuned.
        teacher: a frozen copy of the weights before tuning (not modified; run without gradients).
        embedding: ``sam``'s image embedding of ``image`` (with graph when the encoder is tuned).
        image, label: the training crop ``(B, 1, S, S, S)`` and its target (the first click avoids it).
        rng: numpy Generator for the clicks.
        num_clicks: clicks of the retention session.
        teacher_embedding: the teacher's embedding; default ``embedding`` detached (right when the image encoder
            is frozen, so both encoders are the same).
        loss_fn: loss of (logits, target mask); default :func:`default_loss`.

    Returns:
        ``{"loss": scalar tensor with graph, "agreement": float}`` (agreement = Dice between the two models'
        last low-res masks, 1 when both are empty).
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    loss_fn = loss_fn if loss_fn is not None else default_loss()
    b = image.shape[0]
    img_size = int(sam.img_size)
    low = img_size // 4
    t_embedding = embedding.detach() if teacher_embedding is None else teacher_embedding
    first, first_label = off_target_clicks(image, label, rng)
    coords, labels = [first.float()], [first_label]
    mask_s = torch.zeros((b, 1, low, low, low), device=image.device, dtype=embedding.dtype)
    mask_t = torch.zeros_like(mask_s)
    total = image.new_zeros((), dtype=torch.float32)
    agreement = 1.0
    for step in range(num_clicks):
        points = (torch.cat(coords, 1), torch.cat(labels, 1))
        with torch.no_grad():
            mask_t, _ = teacher.decode(t_embedding, points=points, mask_input=mask_t, multimask_output=False)
        mask_s, _ = sam.decode(embedding, points=points, mask_input=mask_s, multimask_output=False)
        pred_s, pred_t = mask_s.detach() > 0, mask_t > 0
        total = total + loss_fn(mask_s.float(), pred_t.float())
        agreement = float(batch_dice(pred_s.float() - 0.5, pred_t.float()).mean())
        if step + 1 < num_clicks:
            pts, lab = disagreement_clicks(pred_s, pred_t, img_size // low, rng)
            coords.append(pts.to(image.device, torch.float32))
            labels.append(lab)
    return {"loss": total / num_clicks, "agreement": agreement}


class ClickIterationModel(nn.Module):
    """Wraps a ``Sam3D`` so that the whole click loop is one ``forward`` (what ``DistributedDataParallel`` needs:
    wrap *this* module, not the bare model, so DDP sees one forward and one backward per step).

    ``forward(image, label, num_click_iterations, rng)`` returns the dict of :func:`run_click_iterations`.

    With a ``teacher`` (a frozen copy of the weights before tuning) and ``retention_weight`` > 0, the loss also
    gets ``retention_weight`` x :func:`retention_loss` (``retention_clicks`` clicks on something else in the
    crop), and the output carries ``retention_loss`` and ``retention_agreement`` (floats). The teacher is not a
    registered submodule: it is neither tuned, nor in ``state_dict()``, nor seen by DDP; put it on the device
    yourself. When ``sam``'s image encoder is tuned, the teacher encodes the crop itself (without gradients).
    """

    def __init__(self, sam: nn.Module, loss_fn: Optional[nn.Module] = None, mask_only_iterations: bool = True,
                 detach_mask_prompt: bool = False, iou_loss_weight: float = 0.0, click_mode: str = "random",
                 teacher: Optional[nn.Module] = None, retention_weight: float = 0.0,
                 retention_clicks: int = 3) -> None:
        super().__init__()
        self.sam = sam
        self.loss_fn = loss_fn if loss_fn is not None else default_loss()
        self.mask_only_iterations = mask_only_iterations
        self.detach_mask_prompt = detach_mask_prompt
        self.iou_loss_weight = float(iou_loss_weight)
        self.click_mode = click_mode
        if float(retention_weight) < 0:
            raise ValueError(f"retention_weight must be >= 0, got {retention_weight}")
        if float(retention_weight) > 0 and teacher is None:
            raise ValueError("retention_weight > 0 needs a teacher (a frozen copy of the weights before tuning)")
        if int(retention_clicks) < 1:
            raise ValueError(f"retention_clicks must be >= 1, got {retention_clicks}")
        self.retention_weight = float(retention_weight)
        self.retention_clicks = int(retention_clicks)
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []  # unregistered

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher[0] if self._teacher else None

    def forward(self, image: torch.Tensor, label: torch.Tensor, num_click_iterations: int,
                rng: np.random.Generator) -> Dict[str, Any]:
        out = run_click_iterations(self.sam, image, label, num_click_iterations, rng, loss_fn=self.loss_fn,
                                   mask_only_iterations=self.mask_only_iterations,
                                   detach_mask_prompt=self.detach_mask_prompt,
                                   iou_loss_weight=self.iou_loss_weight, click_mode=self.click_mode)
        if self.retention_weight > 0 and self.training:
            teacher_embedding = None
            if out["embedding"].requires_grad and any(p.requires_grad for p in self.sam.image_encoder.parameters()):
                with torch.no_grad():
                    teacher_embedding = self.teacher.image_encoder(image)
            kept = retention_loss(self.sam, self.teacher, out["embedding"], image, label, rng,
                                  num_clicks=self.retention_clicks, teacher_embedding=teacher_embedding,
                                  loss_fn=self.loss_fn)
            out["loss"] = out["loss"] + self.retention_weight * kept["loss"]
            out["retention_loss"] = float(kept["loss"].detach())
            out["retention_agreement"] = kept["agreement"]
        out.pop("embedding")
        return out


def click_iteration_step(model: nn.Module, image: torch.Tensor, label: torch.Tensor, num_click_iterations: int,
                         rng: np.random.Generator, loss_fn: Optional[nn.Module] = None,
                         **options: Any) -> Dict[str, Any]:
    """One forward pass of the click-iteration recipe (no backward, no optimizer step).

    ``model`` is a bare ``Sam3D``, a :class:`ClickIterationModel`, or a ``DistributedDataParallel`` wrapping a
    :class:`ClickIterationModel` (then the wrapper's own loss/options apply and ``loss_fn``/``options`` must
    be left out). Shapes: ``image``/``label`` ``(B, 1, S, S, S)``. Returns ``dict(loss, low_res_logits, dice,
    ...)`` as :func:`run_click_iterations`; call ``out["loss"].backward()``.
    """
    inner = getattr(model, "module", model)
    if isinstance(inner, ClickIterationModel):
        if loss_fn is not None or options:
            raise ValueError("loss_fn/options are fixed by the ClickIterationModel wrapper; set them there")
        return model(image, label, num_click_iterations, rng)
    return run_click_iterations(model, image, label, num_click_iterations, rng, loss_fn=loss_fn, **options)


def click_iterations(value: Any, maximum: int = 100) -> Tuple[int, int]:
    """Parse a number of click iterations per training sample into ``(low, high)``.

    ``N`` (an int or its string) is a fixed count (``(N, N)``); ``"LOW-HIGH"`` or ``[LOW, HIGH]`` draws the count
    per sample uniformly in ``[LOW, HIGH]``, so that a model tuned on few clicks on average still sees as many
    as an annotator gives. Raises ``ValueError`` naming the value unless ``1 <= LOW <= HIGH <= maximum``.
    """
    def fail() -> ValueError:
        return ValueError(f"click iterations must be N or LOW-HIGH with 1 <= LOW <= HIGH <= {maximum}, "
                          f"got {value!r}")

    if isinstance(value, bool):
        raise fail()
    if isinstance(value, int):
        bounds = [value, value]
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        bounds = list(value)
    elif isinstance(value, str):
        parts = value.strip().split("-")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise fail()
        bounds = [int(p) for p in parts] * (2 if len(parts) == 1 else 1)
    else:
        raise fail()
    low, high = bounds
    if not 1 <= low <= high <= maximum:
        raise fail()
    return int(low), int(high)


class ClickTrainingStep:
    """An ignite/MONAI ``iteration_update`` callable: one optimisation step of the click-iteration recipe.

    Use as ``SupervisedTrainer(..., iteration_update=ClickTrainingStep(...))``: it reads ``engine.network``
    (a ``Sam3D``, a :class:`ClickIterationModel`, or DDP around one), ``engine.optimizer``,
    ``engine.state.device``, ``engine.amp`` and ``engine.scaler`` when present, and the batch's ``"image"`` /
    ``"label"`` ``(B, 1, S, S, S)``. Also callable without an engine: ``step.train_step(model, optimizer,
    batch)``.

    Args:
        num_click_iterations: clicks per sample (int), or ``(low, high)`` to draw it per batch in
            ``[low, high]``.
        seed: seed of the click generator (numpy), so runs are reproducible.
        loss_fn: segmentation loss (default :func:`default_loss`).
        grad_clip: max global gradient norm (``None``/0: no clipping).
        amp_dtype: autocast dtype when the engine asks for AMP (bf16 on GPU by default).
        options: ``mask_only_iterations``, ``detach_mask_prompt``, ``iou_loss_weight``, ``click_mode``.

    Returns (per call) the MONAI-style output dict: ``image``, ``label``, ``pred`` (upsampled logits),
    ``loss`` (float), ``dice`` (float), ``low_res_logits``.
    """

    def __init__(self, num_click_iterations: Union[int, Tuple[int, int]] = 11, seed: int = 0,
                 loss_fn: Optional[nn.Module] = None, grad_clip: Optional[float] = 1.0,
                 amp_dtype: torch.dtype = torch.bfloat16, **options: Any) -> None:
        self.num_click_iterations = num_click_iterations
        self.rng = np.random.default_rng(seed)
        self.loss_fn = loss_fn if loss_fn is not None else default_loss()
        self.grad_clip = grad_clip
        self.amp_dtype = amp_dtype
        self.options = options

    def draw_iterations(self) -> int:
        n = self.num_click_iterations
        if isinstance(n, (tuple, list)) and int(n[0]) != int(n[1]):
            return int(self.rng.integers(int(n[0]), int(n[1]) + 1))
        return int(n[0] if isinstance(n, (tuple, list)) else n)  # a fixed count draws nothing: seeded runs repeat

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any],
                   device: Optional[torch.device] = None, amp: bool = False,
                   scaler: Optional[Any] = None) -> Dict[str, Any]:
        device = device or next(model.parameters()).device
        image = torch.as_tensor(batch["image"]).to(device).float()
        label = torch.as_tensor(batch["label"]).to(device).float()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        inner = getattr(model, "module", model)
        wrapped = isinstance(inner, ClickIterationModel)
        ctx = torch.autocast(device.type, dtype=self.amp_dtype) if amp else nullcontext()
        with ctx:
            out = click_iteration_step(model, image, label, self.draw_iterations(), self.rng,
                                       **({} if wrapped else dict(loss_fn=self.loss_fn, **self.options)))
        loss = out["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], self.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        result = {"image": image, "label": label, "pred": out["logits"], "loss": float(loss.detach()),
                  "dice": out["dice"], "low_res_logits": out["low_res_logits"]}
        result.update({k: out[k] for k in ("retention_loss", "retention_agreement") if k in out})
        return result

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> Dict[str, Any]:
        if batchdata is None:
            raise ValueError("ClickTrainingStep got no batch data (None) from the engine's data loader")
        device = getattr(getattr(engine, "state", None), "device", None) or getattr(engine, "device", None)
        device = torch.device(device) if device is not None else None
        scaler = getattr(engine, "scaler", None)
        amp = bool(getattr(engine, "amp", False))
        # bf16 autocast needs no loss scaling; a GradScaler is only used when the engine made one for fp16.
        return self.train_step(engine.network, engine.optimizer, batchdata, device=device, amp=amp,
                               scaler=scaler if amp and self.amp_dtype == torch.float16 else None)


# ------------------------------------------------------------------------------------------- fine-tuning glue
#: Seed of the validation click simulation (fixed, so epochs are compared on the same clicks).
VAL_SEED = 1234


def bare_sam(network: nn.Module) -> nn.Module:
    """The ``Sam3D`` inside a (DDP-wrapped) :class:`ClickIterationModel`, or ``network`` itself."""
    inner = getattr(network, "module", network)
    return getattr(inner, "sam", inner)


def freeze_image_encoder(sam: nn.Module, frozen: bool) -> nn.Module:
    """Tune only the prompt encoder and mask decoder (``frozen``) or every weight: sets ``requires_grad`` of the
    image encoder's parameters; an optimizer built over the parameters that require gradients then leaves a
    frozen encoder out (its weights stay as they are). Returns ``sam``."""
    for parameter in sam.image_encoder.parameters():
        parameter.requires_grad_(not frozen)
    return sam


def encoder_frozen(sam: nn.Module) -> bool:
    """Whether no weight of ``sam``'s image encoder is tuned (its crop embeddings can be kept between scores)."""
    return not any(p.requires_grad for p in sam.image_encoder.parameters())


class WithModelCompleted:
    """Run an ignite iteration function the way MONAI's own ``_iteration`` ends: put its output in
    ``engine.state.output`` and fire ``IterationEvents.MODEL_COMPLETED``, on which MONAI engines decollate the
    batch and run the post transforms (so the Dice metrics see thresholded masks, not raw logits)."""

    def __init__(self, step: Any):
        self.step = step

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> Any:
        from monai.engines.utils import IterationEvents

        output = self.step(engine, batch)
        if isinstance(output, dict):  # not decollated yet: the step did not fire the event itself
            engine.state.output = output
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return engine.state.output
        return output


class ClickValidationStep:
    """ignite ``iteration_update`` for validation: the click simulation without gradients, seeded per item
    (``[seed, iteration]``), so every epoch is scored on the same clicks."""

    def __init__(self, num_click_iterations: int, seed: int = VAL_SEED):
        self.num_click_iterations = int(num_click_iterations)
        self.seed = int(seed)

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        sam = bare_sam(engine.network)
        device = engine.state.device
        image = torch.as_tensor(batch["image"]).to(device).float()
        label = torch.as_tensor(batch["label"]).to(device).float()
        rng = np.random.default_rng([self.seed, int(engine.state.iteration)])
        sam.eval()
        with torch.no_grad():
            out = run_click_iterations(sam, image, label, self.num_click_iterations, rng,
                                       mask_only_iterations=False)
        return {"image": image, "label": label, "pred": out["logits"]}


def retention_agreement(output: Any) -> float:
    """The mean ``retention_agreement`` of a training step's output (a dict, or the per-item dicts MONAI makes of
    it): the ignite ``output_transform`` of the retention metric."""
    items = output if isinstance(output, (list, tuple)) else [output]
    values = [float(item["retention_agreement"]) for item in items
              if isinstance(item, Mapping) and "retention_agreement" in item]
    if not values:
        raise ValueError("the training step's output has no retention_agreement (is the retention term on?)")
    return float(np.mean(values))
