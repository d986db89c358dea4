"""Stand-in SAM-Med3D models that decode the ground truth of whatever crop they are given, for testing and
benchmarking the extension to structures larger than one crop independently of model quality (shared by
``tests/test_extension.py`` and ``benchmarks/extension.py``).

A real model only sees the crop's image, so the stand-ins find out where a crop lies from its image alone: the
scan handed to the predictor (:class:`CropAwarePredictor`) is the real scan's geometry filled with a position
code, the sum of one random profile per array axis. Trilinear resampling keeps such a sum a sum, and the crop's
z-scoring only shifts and scales it, so the differences of the crop image along each axis match the code's
profile at one offset only: the crop's start (:class:`CropLocator`). The predictor, its crop placement, its
encoder accounting and embedding cache are all the real, public ones."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from sam_med3d.geometry import PreparedScan
from sam_med3d.io import load_scan
from sam_med3d.predictor import Sam3DPredictor


class CropLocator(nn.Module):
    """The stand-ins' image encoder: the :class:`~sam_med3d.geometry.Crop` whose image it is given, as the
    embedding (on the grid of each spacing in :meth:`set_scan`). ``encoder``: a real image encoder run on every
    image too (its output discarded), so that benchmarks pay its cost."""

    def __init__(self, encoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.grids: list = []
        self.profiles: list = []

    def coded_scan(self, path_or_array, affine=None, seed: int = 0):
        """``(array, affine)``: the scan's geometry filled with the position code (values 900 .. 1200, so that
        the padding of a crop beyond the scan, 0, stands apart)."""
        scan = load_scan(path_or_array, affine)
        rng = np.random.default_rng(seed)
        self.profiles = [rng.uniform(300.0, 400.0, n) for n in scan.shape]
        p0, p1, p2 = self.profiles
        array = (p0[:, None, None] + p1[None, :, None] + p2[None, None, :]).astype(np.float32)
        return array, scan.affine

    def set_scan(self, scan, spacings: Sequence[float]) -> None:
        """The canonical grids (one per spacing, e.g. 1.5 mm and the zoom strategy's coarse one) of the coded
        ``scan`` (a :class:`~sam_med3d.io.Scan`) that crops are looked for on."""
        self.grids = [PreparedScan(scan, float(s)) for s in dict.fromkeys(spacings)]

    def _profile(self, grid: PreparedScan, axis: int, first: int, count: int) -> np.ndarray:
        """The code's profile along canonical ``axis`` at canonical voxels ``first ..``, NaN outside the scan."""
        p = int(grid.source_axis[axis])
        x = grid.original_coords(axis, first, count)
        values = np.interp(x, np.arange(len(self.profiles[p])), self.profiles[p])
        values[(x < -0.5) | (x >= len(self.profiles[p]) - 0.5)] = np.nan  # as the sampler
        return values

    def locate(self, image: torch.Tensor):
        volume = image.detach().reshape(image.shape[-3:]).double().cpu().numpy()
        size = volume.shape[0]
        # Padding (raw 0) lies 900 raw units below every code value, which span 300 at most: when the crop pads
        # the scan, nothing lies in the lower half of the image's range but the padding.
        low, high = volume.min(), volume.max()
        padding = volume == low
        if np.any((volume > low) & (volume < (low + high) / 2)):
            padding = np.zeros_like(padding)
        centre = np.unravel_index(int(np.argmax(np.where(padding, -np.inf, volume))), volume.shape)
        best = None
        for grid in self.grids:
            start, worst = [], 1.0
            for axis in range(3):
                row_index = list(centre)
                row_index[axis] = slice(None)
                row, outside = volume[tuple(row_index)], padding[tuple(row_index)]
                first = -size
                profile = self._profile(grid, axis, first, grid.shape[axis] + 2 * size)
                candidates = np.arange(len(profile) - size + 1)
                window = profile[candidates[:, None] + np.arange(size)[None, :]]
                fits = np.all(np.isnan(window) == outside[None, :], axis=1)
                both = ~outside[1:] & ~outside[:-1]
                seen = np.diff(row)[both]
                expected = np.diff(window, axis=1)[:, both]
                cosine = np.full(len(candidates), -1.0)
                if seen.size >= 3:
                    ok = fits & np.all(np.isfinite(expected), axis=1)
                    e = expected[ok]
                    cosine[ok] = e @ seen / (np.linalg.norm(e, axis=1) * np.linalg.norm(seen) + 1e-300)
                k = int(np.argmax(cosine))
                start.append(first + int(candidates[k]))
                worst = min(worst, float(cosine[k]))
            if best is None or worst > best[0]:
                best = (worst, grid, tuple(start))
        worst, grid, start = best
        crop = grid.crop(start, size)
        if not (worst > 0.9999 and torch.allclose(crop.image, image.detach().reshape(crop.image.shape).cpu(),
                                                  rtol=1e-4, atol=1e-4)):
            raise AssertionError(f"the stand-in could not locate a crop from its image (best match {worst:.6f})")
        return crop

    def forward(self, image: torch.Tensor):
        if self.encoder is not None:
            self.encoder(image)
        return self.locate(image)


class CropAwarePredictor(Sam3DPredictor):
    """The real predictor, for a stand-in model whose image encoder is a :class:`CropLocator`: ``set_image`` hands
    it the scan's geometry filled with the locator's position code (the scan's intensities play no part in a
    stand-in's answer)."""

    def set_image(self, path_or_array, affine=None) -> None:
        locator = self.model.image_encoder
        array, coded_affine = locator.coded_scan(path_or_array, affine)
        super().set_image(array, coded_affine)
        spacings = [self.spacing_mm]
        if self.extension.enabled and self.extension.strategy == "zoom":
            spacings.append(self.extension.zoom_spacing_mm)
        locator.set_scan(self.prepared.scan, spacings)


class GroundTruthSam3D(nn.Module):
    """Decodes the ground truth of the crop it is given (located from its image by :class:`CropLocator`; use with
    :class:`CropAwarePredictor`), ignoring prompts.

    ``encoder``: an optional real image encoder that runs on every new crop (its output is discarded), so that
    benchmarks pay the real encoder's cost; by default the encoder is free.
    """

    def __init__(self, label: np.ndarray, img_size: int = 64, encoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.img_size = int(img_size)
        self.label = label.astype(np.uint8)
        self.image_encoder = CropLocator(encoder)
        self.decodes = 0
        self.prompts: dict = {}  # (spacing_mm, crop start) -> last prompt: ((n, 3), (n,), multimask)

    def decode(self, crop, points, mask_input, multimask_output=False):
        self.decodes += 1
        self.prompts[crop.prepared.spacing_mm, crop.start] = (points[0][0].cpu().numpy(), points[1][0].cpu().numpy(),
                                                              multimask_output)
        inside = crop.sample(self.label, "nearest").float()
        logits = torch.where(inside > 0, 10.0, -10.0)[None, None]  # full crop resolution: upsampling is a no-op
        m = 3 if multimask_output else 1
        size = self.img_size
        return logits.expand(1, m, size, size, size).clone(), torch.full((1, m), 0.9)


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
        self.image_encoder = CropLocator()
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
