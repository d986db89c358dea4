"""SAM-Med3D: image encoder, prompt encoder and mask decoder under the official submodule names."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """The three SAM-Med3D modules plus the configuration they were built from (``self.config``)."""

    def __init__(self, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D,
                 mask_decoder: MaskDecoder3D, config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config or {}

    @property
    def img_size(self) -> int:
        """Edge length in voxels of the cubic input crop."""
        return self.image_encoder.img_size

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    def decode(self, image_embeddings: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]],
               mask_input: Optional[torch.Tensor], multimask_output: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One prompt step: ``points`` as ``(coords (B, N, 3) in d,h,w input voxels, labels (B, N))``,
        ``mask_input`` the previous low-res logits ``(B, 1, 4E, 4E, 4E)`` or None.
        Returns low-res logits ``(B, M, 4E, 4E, 4E)`` and IoU predictions ``(B, M)``."""
        sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=mask_input)
        return self.mask_decoder(image_embeddings=image_embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask_output)

    def forward(self, image: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                mask_input: Optional[torch.Tensor] = None, multimask_output: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encode ``image`` ``(B, 1, S, S, S)`` and decode one prompt step (see :meth:`decode`)."""
        return self.decode(self.image_encoder(image), points, mask_input, multimask_output)
