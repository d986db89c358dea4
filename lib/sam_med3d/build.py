"""Named SAM-Med3D configurations and the builder.

A configuration is a plain dict with three sections, ``image_encoder``, ``prompt_encoder`` and
``mask_decoder``, holding constructor arguments (the form of the reference fixtures' ``mini_config.json``).
``mask_decoder.fixed_by_official_constructor`` may carry the two-way transformer settings.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Union

from .modeling import ImageEncoderViT3D, MaskDecoder3D, PromptEncoder3D, Sam3D

_TRANSFORMER_DEFAULTS = {"transformer_depth": 2, "transformer_mlp_dim": 2048, "transformer_num_heads": 8,
                         "attention_downsample_rate": 2}


def _config(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, window_size: int,
            global_attn_indexes, out_chans: int, mask_in_chans: int = 16, iou_head_hidden_dim: int = 256,
            transformer_mlp_dim: int = 2048) -> Dict[str, Any]:
    grid = img_size // patch_size
    return {
        "image_encoder": {"img_size": img_size, "patch_size": patch_size, "in_chans": 1, "embed_dim": embed_dim,
                          "depth": depth, "num_heads": num_heads, "mlp_ratio": 4.0, "out_chans": out_chans,
                          "qkv_bias": True, "layer_norm_eps": 1e-6, "use_abs_pos": True, "use_rel_pos": True,
                          "window_size": window_size, "global_attn_indexes": list(global_attn_indexes)},
        "prompt_encoder": {"embed_dim": out_chans, "image_embedding_size": [grid] * 3,
                           "input_image_size": [img_size] * 3, "mask_in_chans": mask_in_chans},
        "mask_decoder": {"transformer_dim": out_chans, "num_multimask_outputs": 3, "iou_head_depth": 3,
                         "iou_head_hidden_dim": iou_head_hidden_dim,
                         "fixed_by_official_constructor": dict(_TRANSFORMER_DEFAULTS,
                                                               transformer_mlp_dim=transformer_mlp_dim)},
    }


#: Named configurations. ``vit_b_ori`` is the released SAM-Med3D / SAM-Med3D-turbo architecture.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "vit_b_ori": _config(img_size=128, patch_size=16, embed_dim=768, depth=12, num_heads=12, window_size=14,
                         global_attn_indexes=(2, 5, 8, 11), out_chans=384),
    # Small models for tests, CPU training and the bundled offline model.
    "vit_tiny": _config(img_size=128, patch_size=16, embed_dim=192, depth=4, num_heads=4, window_size=14,
                        global_attn_indexes=(1, 3), out_chans=96, iou_head_hidden_dim=96, transformer_mlp_dim=384),
    "vit_mini": _config(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=4, window_size=3,
                        global_attn_indexes=(1,), out_chans=48, iou_head_hidden_dim=32),
}


def resolve_config(config: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """A named configuration or a config dict -> a validated deep copy of the dict."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown SAM-Med3D model {config!r}; known models: {', '.join(sorted(CONFIGS))}")
        return copy.deepcopy(CONFIGS[config])
    missing = [s for s in ("image_encoder", "prompt_encoder", "mask_decoder") if s not in config]
    if missing:
        raise ValueError(f"model config lacks section(s) {missing}; it needs image_encoder, prompt_encoder "
                         "and mask_decoder")
    return copy.deepcopy(dict(config))


def build_sam_med3d(config: Union[str, Mapping[str, Any]] = "vit_b_ori") -> Sam3D:
    """Build an (untrained) SAM-Med3D from a configuration name (see :data:`CONFIGS`) or dict."""
    cfg = resolve_config(config)
    enc = dict(cfg["image_encoder"])
    enc["global_attn_indexes"] = tuple(enc.get("global_attn_indexes", ()))
    pe = dict(cfg["prompt_encoder"])
    dec = {k: v for k, v in cfg["mask_decoder"].items() if k != "fixed_by_official_constructor"}
    fixed = dict(_TRANSFORMER_DEFAULTS)
    fixed.update({k: v for k, v in cfg["mask_decoder"].get("fixed_by_official_constructor", {}).items()
                  if k in _TRANSFORMER_DEFAULTS})
    dec.update(fixed)
    model = Sam3D(image_encoder=ImageEncoderViT3D(**enc), prompt_encoder=PromptEncoder3D(**pe),
                  mask_decoder=MaskDecoder3D(**dec), config=cfg)
    return model.eval()
