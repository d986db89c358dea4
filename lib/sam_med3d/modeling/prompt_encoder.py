"""The SAM-Med3D prompt encoder: clicks (with labels) and a low-resolution mask -> embeddings.

Point coordinates are ``(B, N, 3)`` voxel indices of the model input along tensor axes 2, 3, 4 (``d, h, w``);
labels are ``(B, N)``: 1 positive, 0 negative, -1 padding. The mask prompt is the previous step's raw
low-resolution logits ``(B, 1, 4E, 4E, 4E)``.

The dense positional encoding of grid cell ``(i, j, k)`` encodes ``((j+.5)/E, (i+.5)/E, (k+.5)/E)``: its first
two axes are swapped relative to the point encoding. The released weights were trained with this, so it is
kept as is.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of normalised 3D coordinates; output channels are ``[sin, cos, sin]``."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` in [0, 1], ``(..., 3)`` -> ``(..., 3 * num_pos_feats)``, float32 (float64 for float64 input).

        Computed in float32 even under autocast: in bf16 the projection's phase (up to ~2*pi*|2x-1|*|G| radians)
        keeps 8 bits, an error of up to 0.15 in sin/cos -- more than a one-voxel shift of the click changes the
        encoding -- so bf16 training would see other click positions than float32 inference.
        """
        dtype = torch.promote_types(coords.dtype, torch.float32)
        with torch.autocast(device_type=coords.device.type, enabled=False):
            coords = 2 * coords.to(dtype) - 1
            coords = coords @ self.positional_encoding_gaussian_matrix.to(dtype)
            coords = 2 * math.pi * coords
            # [sin, cos, sin] (not [sin, cos, cos]) is what the official model computes.
            return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: Tuple[int, int, int]) -> torch.Tensor:
        """Dense encoding of a grid of ``size``, channels-first ``(C, D, H, W)`` (with the D/H swap)."""
        d, h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((d, h, w), device=device, dtype=torch.float32)
        first = (grid.cumsum(dim=0) - 0.5) / d
        second = (grid.cumsum(dim=1) - 0.5) / h
        third = (grid.cumsum(dim=2) - 0.5) / w
        pe = self.encode(torch.stack([second, first, third], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Encode unnormalised voxel coordinates ``(B, N, 3)`` of an input of ``image_size``."""
        coords = coords.clone()
        for axis in range(3):
            coords[:, :, axis] = coords[:, :, axis] / image_size[axis]
        return self.encode(coords.to(torch.float))


class PromptEncoder3D(nn.Module):
    """Embeds point and mask prompts for the mask decoder."""

    def __init__(self, embed_dim: int, image_embedding_size: Sequence[int], input_image_size: Sequence[int],
                 mask_in_chans: int, activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(int(s) for s in image_embedding_size)
        self.input_image_size = tuple(int(s) for s in input_image_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.num_point_embeddings = 2  # negative, positive
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            activation(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            activation(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, ``(1, C, E, E, E)``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # centre of the voxel
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 3), device=points.device, dtype=points.dtype)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device, dtype=labels.dtype)
            points = torch.cat([points, padding_point], dim=1)
            labels = torch.cat([labels, padding_label], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        embedding = torch.where((labels == -1)[..., None], self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == 0)[..., None] * self.point_embeddings[0].weight
        embedding = embedding + (labels == 1)[..., None] * self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("box prompts are not part of SAM-Med3D; give points and/or a mask")

    def _batch_size(self, points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
                masks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return sparse ``(B, N+1, C)`` (or ``(B, 0, C)`` without points) and dense ``(B, C, E, E, E)``."""
        bs = self._batch_size(points, boxes, masks)
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
