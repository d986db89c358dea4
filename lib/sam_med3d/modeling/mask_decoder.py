"""The SAM-Med3D mask decoder: a two-way transformer, hypernetwork MLPs and an IoU head.

Image embeddings are ``(B or 1, C, E, E, E)``; the returned low-resolution mask logits are
``(B, M, 4E, 4E, 4E)`` with ``M = 1`` or ``num_multimask_outputs``, and IoU predictions ``(B, M)``.
"""

from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import nn

from .common import MLP, LayerNorm3d
from .transformer import TwoWayTransformer3D


class MaskDecoder3D(nn.Module):
    def __init__(self, transformer_dim: int, num_multimask_outputs: int = 3, activation: Type[nn.Module] = nn.GELU,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256, transformer_depth: int = 2,
                 transformer_mlp_dim: int = 2048, transformer_num_heads: int = 8,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer3D(depth=transformer_depth, embedding_dim=transformer_dim,
                                               num_heads=transformer_num_heads, mlp_dim=transformer_mlp_dim,
                                               attention_downsample_rate=attention_downsample_rate)
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        masks, iou_pred, _ = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                dense_prompt_embeddings)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou_pred[:, chosen]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All mask tokens' masks ``(B, 4, ...)``, IoU predictions ``(B, 4)`` and the transformer tokens."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1)

        src = image_embeddings
        if src.shape[0] != tokens.shape[0]:
            src = torch.repeat_interleave(src, tokens.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, d, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(b, c, d, h, w)
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        b, c, d, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, d * h * w)).view(b, -1, d, h, w)
        return masks, self.iou_prediction_head(iou_token_out), hs
