"""SAM-Med3D: promptable 3D segmentation for CT and MRI.

Public API:
- :func:`build_sam_med3d` builds the network from a named configuration or a config dict.
"""

from .build import CONFIGS, build_sam_med3d
from .modeling import Sam3D

__all__ = ["CONFIGS", "build_sam_med3d", "Sam3D"]
