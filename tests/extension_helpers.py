"""A stand-in SAM-Med3D that decodes the ground truth of whatever crop it is given, for testing and
benchmarking the extension to structures larger than one crop independently of model quality (shared by
``tests/test_extension.py`` and ``benchmarks/extension.py``)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from sam_med3d.predictor import Sam3DPredictor


class GroundTruthSam3D(nn.Module):
    """Decodes the ground truth of the crop it is given (see :class:`CropAwarePredictor`), ignoring prompts.

    ``encoder``: an optional real image encoder that runs on every new crop (its output is discarded), so that
    benchmarks pay the real encoder's cost; by default the encoder is free.
    """

    def __init__(self, label: np.ndarray, img_size: int = 64, encoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.label = label.astype(np.uint8)
        self.image_encoder = encoder if encoder is not None else nn.Identity()
        self.decodes = 0

    def decode(self, crop, points, mask_input, multimask_output=False):
        self.decodes += 1
        inside = crop.sample(self.label, "nearest").float()
        logits = torch.where(inside > 0, 10.0, -10.0)[None, None]  # full crop resolution: upsampling is a no-op
        m = 3 if multimask_output else 1
        size = self.img_size
        return logits.expand(1, m, size, size, size).clone(), torch.full((1, m), 0.9)


class CropAwarePredictor(Sam3DPredictor):
    """The real predictor, whose image embedding is the crop itself (so the stand-in knows where it is); the
    encoder accounting and the embedding cache are the real ones."""

    def _embedding(self, crop, timings):
        _, ran = super()._embedding(crop, timings)
        return crop, ran


class DisagreeingSam3D(nn.Module):
    """Tiles that disagree: inside ``label`` the n-th distinct crop it decodes (in decode order, which is the
    order of ``PredictionResult.crop_boxes``) predicts the logit ``logits[n]`` (the last one for later crops),
    -10 outside. Where crops overlap, only the blend weights decide the result. Use with
    :class:`CropAwarePredictor`."""

    def __init__(self, label: np.ndarray, logits, img_size: int = 32) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.label = label.astype(np.uint8)
        self.logits = [float(v) for v in logits]
        self.image_encoder = nn.Identity()
        self.order: dict = {}  # crop key -> tile index

    def tile_logits(self, crop) -> torch.Tensor:
        """``(S, S, S)`` logits this stand-in gives ``crop`` (its tile index fixed at its first decode)."""
        n = self.order.setdefault(crop.key, len(self.order))
        inside = crop.sample(self.label, "nearest") > 0
        return torch.where(inside, self.logits[min(n, len(self.logits) - 1)], -10.0)

    def decode(self, crop, points, mask_input, multimask_output=False):
        m = 3 if multimask_output else 1
        size = self.img_size
        return self.tile_logits(crop)[None, None].expand(1, m, size, size, size).clone(), torch.full((1, m), 0.9)
