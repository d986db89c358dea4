"""SAM-Med3D: promptable 3D segmentation for CT and MRI.

Public API (imported lazily, so ``import sam_med3d`` stays cheap):

- :func:`build_sam_med3d` / :data:`CONFIGS`: build the network from a named configuration or a config dict.
- :func:`load_checkpoint`, :func:`load_model`, :func:`save_checkpoint`: official and our own checkpoints.
- :class:`Sam3DPredictor`: clicks on a whole scan -> a 3D mask in the scan's own geometry.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CONFIGS": "sam_med3d.build",
    "build_sam_med3d": "sam_med3d.build",
    "Sam3D": "sam_med3d.modeling",
    "load_checkpoint": "sam_med3d.checkpoint",
    "load_model": "sam_med3d.checkpoint",
    "save_checkpoint": "sam_med3d.checkpoint",
    "Sam3DPredictor": "sam_med3d.predictor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sam_med3d' has no attribute {name!r}")
