"""MONAI dict transforms that read scans and label maps through :mod:`sam_med3d.io`, the package's one reader.

MONAI's ``LoadImaged`` hands a path to nibabel or ITK, which follow whatever the header says (an NRRD
``data file:``, a MetaImage ``ElementDataFile``, an Analyze ``.img`` beside a ``.hdr``) and allocate whatever
size it claims. :class:`LoadScand` is its replacement for training on datastore files: every file is read
through :func:`sam_med3d.io.load_scan` / :func:`sam_med3d.io.load_label`, so training applies the same rules as
the server's uploads (single-file formats whose header names no other file, DICOM folders without links, the
voxel cap from the header before decoding, finite values, a label on its image's grid with integer values
0..255). A scan of one constant value is read (the datastore accepts it), as ``LoadImaged`` read it.

Output: what ``LoadImaged(image_only=True)`` gives for the same file, so the transforms after it are unchanged:
a float32 :class:`monai.data.MetaTensor` ``(I, J, K)`` in the stored voxel order with its RAS affine and no
channel axis (``EnsureChannelFirstd`` adds it), the file name in ``filename_or_obj``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Hashable, Mapping, Optional

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .io import LPS_TO_RAS, ScanHeader, load_label, load_scan, read_header

#: The voxel cap training applies when its caller gives none: the app's default ``--conf max_voxels``.
DEFAULT_MAX_VOXELS = 2 ** 28

__all__ = ["DEFAULT_MAX_VOXELS", "LoadScand", "header_affine"]


def header_affine(header: ScanHeader) -> np.ndarray:
    """The RAS voxel->world affine that a :class:`~sam_med3d.io.ScanHeader` (ITK's LPS geometry) describes."""
    lps = np.eye(4)
    direction = np.asarray(header.direction, dtype=np.float64).reshape(3, 3)
    lps[:3, :3] = direction * np.asarray(header.spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = header.origin
    return LPS_TO_RAS @ lps


class LoadScand(MapTransform):
    """Read ``image`` (a scan) and ``label`` (a label map on the image's grid) through :mod:`sam_med3d.io`.

    Args:
        keys: the keys to read; ``label_keys`` among them are label maps, the others scans.
        max_voxels: refuse a file whose header claims more voxels (``ScanTooLarge``, a ``ValueError``), before
            anything is decoded.
        image_key: the scan whose grid the label maps must share (when it is among the data's keys).
        label_keys: the keys read as label maps.

    Raises:
        ValueError: naming the file, for anything :func:`sam_med3d.io.load_scan` or
            :func:`sam_med3d.io.load_label` refuses.
    """

    def __init__(self, keys: KeysCollection, max_voxels: Optional[int] = DEFAULT_MAX_VOXELS,
                 image_key: str = "image", label_keys: KeysCollection = ("label",),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.max_voxels = None if max_voxels is None else int(max_voxels)
        self.image_key = image_key
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        image_header: Optional[ScanHeader] = None
        image_affine: Optional[np.ndarray] = None
        if self.image_key in self.keys and self.image_key in d:
            path = os.fspath(d[self.image_key])
            scan = load_scan(path, max_voxels=self.max_voxels, constant_ok=True)
            image_header, image_affine = read_header(path), scan.affine
            d[self.image_key] = self._tensor(scan.array, scan.affine, path)
        for key in self.key_iterator(d):
            if key == self.image_key:
                continue
            path = os.fspath(d[key])
            if key in self.label_keys:
                array = load_label(path, image_header, self.max_voxels)
                # On the image's grid (checked within tolerance): the image's affine, so that both are
                # resampled onto exactly the same grid afterwards.
                affine = image_affine if image_affine is not None else header_affine(read_header(path))
                d[key] = self._tensor(array.astype(np.float32), affine, path)
            else:
                scan = load_scan(path, max_voxels=self.max_voxels, constant_ok=True)
                d[key] = self._tensor(scan.array, scan.affine, path)
        return d

    @staticmethod
    def _tensor(array: np.ndarray, affine: np.ndarray, path: str) -> MetaTensor:
        affine_t = torch.as_tensor(affine, dtype=torch.float64)
        meta = {"filename_or_obj": path, "original_channel_dim": "no_channel", "space": "RAS",
                "spatial_shape": np.asarray(array.shape), "original_affine": affine_t.clone()}
        return MetaTensor(torch.from_numpy(np.asarray(array, dtype=np.float32)), affine=affine_t, meta=meta)
