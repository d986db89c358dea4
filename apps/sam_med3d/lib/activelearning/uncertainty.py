"""Model-based active learning: rank unlabelled images by how unsure SAM-Med3D is about them.

Score (``ScoringMethod``, run by MONAI Label after start, training and "next sample", in a subprocess):
for each unlabelled image, ``n`` automatic prompts are placed (single positive clicks on voxels drawn from
the image's Otsu foreground, with a generator seeded by the image id so the score is reproducible); each
is decoded with ``multimask_output=True`` and the IoU head's predicted IoU of the returned mask is read.
The image's uncertainty is ``1 - mean(predicted IoU)``: high when the model cannot produce a mask it
trusts, i.e. when a label for it teaches the model most. It is stored in the datastore's image info under
``sam_med3d_uncertainty``, with the weights file and mtime it was computed with, so images are re-scored
only after new weights are published.

Strategy: the unlabelled image with the highest score that was not handed out by this strategy in the
last ``recent_s`` seconds (so two annotators pressing "Next sample" get different images); images not
scored yet rank after scored ones, in id order.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Dict, List, Optional

import numpy as np
from monailabel.interfaces.datastore import Datastore
from sam_med3d.io import file_identity
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from lib.errors import InvalidRequest

#: The app's default ``--conf max_voxels`` (2^28).
DEFAULT_MAX_VOXELS = 2 ** 28

logger = logging.getLogger(__name__)


def automatic_prompts(array: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` voxel indices ``(i, j, k)`` (``(count, 3)`` int64) inside the Otsu foreground of ``array``.

    The threshold is computed on a strided subsample (cheap on 512x512xN CT). If the foreground is empty
    (constant-ish image), voxels are drawn from the whole volume.
    """
    from skimage.filters import threshold_otsu

    step = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
    sample = array[::step, ::step, ::step]
    try:
        threshold = float(threshold_otsu(sample))
    except ValueError:  # a single intensity
        threshold = float(sample.min())
    candidates = np.argwhere(sample > threshold)
    if len(candidates) == 0:
        candidates = np.argwhere(np.ones(sample.shape, dtype=bool))
    rng = np.random.default_rng(seed)
    picks = candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)]
    return (picks * step).astype(np.int64)


def _seed(image_id: str) -> int:
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:4], "little")


class UncertaintyScoring(ScoringMethod):
    """Writes ``sam_med3d_uncertainty`` (0..1, higher = more informative) for each unlabelled image.

    Args:
        served: the app's :class:`~lib.served_model.ServedModel`.
        prompts: automatic prompts per image.
        max_voxels: images whose header claims more voxels are skipped before anything is decoded (the app's
            ``--conf max_voxels``; a scan put into the studies folder by hand is not checked by any upload).
    """

    KEY = "sam_med3d_uncertainty"
    MODEL_KEY = "sam_med3d_uncertainty_model"

    def __init__(self, served: Any, prompts: int = 3, max_voxels: Optional[int] = DEFAULT_MAX_VOXELS):
        super().__init__("SAM-Med3D uncertainty: 1 - mean IoU-head score over automatic prompts")
        self.served = served
        self.prompts = int(prompts)
        self.max_voxels = max_voxels

    def score_image(self, model: Any, image_path: str, image_id: str) -> float:
        """The uncertainty of one image (see the module docstring)."""
        from sam_med3d.io import load_scan
        from sam_med3d.predictor import Sam3DPredictor

        # The app's one reader: single-file formats whose header names no other file, the voxel cap from the
        # header before decoding, finite values.
        scan = load_scan(image_path, max_voxels=self.max_voxels)
        predictor = Sam3DPredictor(model, device=self.served.device)
        predictor.set_image(scan)
        ious: List[float] = []
        for index, point in enumerate(automatic_prompts(scan.array, self.prompts, _seed(image_id))):
            result = predictor.predict(point[None, :], np.ones(1, dtype=np.int64), label_key=f"auto_{index}",
                                       multimask_output=True)
            ious.append(float(np.clip(result.iou, 0.0, 1.0)))
        return float(1.0 - np.mean(ious)) if ious else 1.0

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        model, _ = self.served.get()
        path = self.served.path()
        model_version = "{}@{}:{}:{}".format(*file_identity(path))  # a republished file is a new version
        result: Dict[str, Any] = {}
        skipped = 0
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            if info.get(self.MODEL_KEY) == model_version and self.KEY in info:
                skipped += 1
                continue
            start = time.perf_counter()
            try:
                score = self.score_image(model, datastore.get_image_uri(image_id), image_id)
            except (ValueError, InvalidRequest) as err:  # unreadable, too large, 2D, a link leading out: unscored
                logger.warning("SAM-Med3D uncertainty: skipping %s: %s", image_id, err)
                continue
            entry = {self.KEY: score, self.MODEL_KEY: model_version, f"{self.KEY}_ts": int(time.time())}
            datastore.update_image_info(image_id, entry)
            result[image_id] = entry
            logger.info("SAM-Med3D uncertainty of %s: %.4f (%.1f s)", image_id, score, time.perf_counter() - start)
        logger.info("SAM-Med3D uncertainty: scored %d image(s), %d already up to date", len(result), skipped)
        return result


class UncertaintyStrategy(Strategy):
    """Next sample = the most uncertain unlabelled image (see the module docstring)."""

    def __init__(self, key: str = UncertaintyScoring.KEY, recent_s: float = 600.0):
        super().__init__("Most uncertain unlabelled image for SAM-Med3D (scored by its IoU head)")
        self.key = key
        self.recent_s = float(recent_s)

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request.get("strategy", "")
        now = time.time()
        ranked = []
        for image_id in sorted(images):
            info = datastore.get_image_info(image_id)
            score = info.get(self.key)
            served_ts = info.get("strategy", {}).get(strategy, {}).get("ts", 0)
            recently = now - served_ts < self.recent_s
            # Sort key: not recently served first, then scored before unscored, then highest score, then id.
            ranked.append(((recently, score is None, -(score or 0.0), image_id), image_id, score))
        ranked.sort(key=lambda item: item[0])
        _, image_id, score = ranked[0]
        if score is None:
            logger.info("%s: no image scored yet (scoring runs in the background); giving %s", strategy, image_id)
        return {"id": image_id, self.key: score}
