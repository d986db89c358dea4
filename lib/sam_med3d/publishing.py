"""Publishing fine-tuned weights to a server that is answering clicks: when, and how.

**How** (:func:`publish_weights`): the weights are written with :func:`sam_med3d.checkpoint.save_checkpoint`,
i.e. into a temporary file beside the served file, fsynced, then renamed over it in one ``os.replace``. A server
that reloads the file whenever it changes therefore sees the old weights or the new ones, never a partial file,
also when the training process is killed mid-save. The checkpoint records where the weights came from
(``base_checkpoint``, ``run_id``) and which labels they were trained on (``structures``), plus the scores that
made them worth publishing.

**When** (:class:`PublishBest`, an evaluator handler): whenever validation Dice beats the best so far (the first
validation, before any training step, scores the weights served now: the bar to beat) and, with a reference check
(:mod:`sam_med3d.forgetting`), the reference Dice is at most ``max_forgetting`` below the base model's and no
reference structure's Dice is more than ``max_structure_forgetting`` below the base model's there. Refused weights
are remembered (``refused_epoch``), so :class:`sam_med3d.forgetting.BlendOnForgetting` can try blends of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .forgetting import BASE_REFERENCE_METRIC, REFERENCE_METRIC, WORST_DROP_METRIC

logger = logging.getLogger(__name__)


def publish_weights(sam: torch.nn.Module, path: os.PathLike, base_checkpoint: os.PathLike, run_id: str,
                    structures: Sequence[str], **extra: Any) -> Path:
    """Replace the served weights at ``path`` with ``sam``'s, atomically (see the module docstring).

    Args:
        sam: the bare ``Sam3D`` (not a DDP or click-model wrapper).
        path: the served fine-tuned file.
        base_checkpoint: the base weights the fine-tuning started from.
        run_id: the training run.
        structures: label names the weights were trained on (the labels they answer).
        extra: plain values recorded in the checkpoint (``epoch``, ``val_dice``, ...).

    Returns the path written.
    """
    structures = sorted(str(name) for name in structures)
    written = save_checkpoint(sam, path, base_checkpoint=str(base_checkpoint), run_id=str(run_id),
                              structures=structures, **extra)
    logger.info("New SAM-Med3D weights published: %s (trained on: %s)", written, ", ".join(structures) or "-")
    return written


class PublishBest:
    """Evaluator handler: publish when validation Dice beats the best so far and the reference check passes.

    Args:
        trainer_task: has ``publish(context, **extra)``.
        context: the training context (``context.trainer.state.epoch`` is the epoch validated).
        metric: the evaluator's validation Dice metric name.
        max_forgetting: largest drop of the reference Dice below the base model's; None: not checked.
        max_structure_forgetting: largest drop of one reference structure's Dice; None: not checked.
    """

    def __init__(self, trainer_task: Any, context: Any, metric: str, max_forgetting: Optional[float] = None,
                 max_structure_forgetting: Optional[float] = None):
        self.task = trainer_task
        self.context = context
        self.metric = metric
        self.max_forgetting = max_forgetting
        self.max_structure_forgetting = max_structure_forgetting
        self.best = -1.0
        #: Epoch whose weights beat the validation Dice but failed the reference check.
        self.refused_epoch = -1
        #: Share of the tuned weights in the weights being validated (1: the tuned weights themselves).
        self.blend = 1.0
        self.published = False

    def __call__(self, evaluator: Any) -> None:
        metrics = evaluator.state.metrics
        dice = float(metrics.get(self.metric, float("nan")))
        epoch = int(self.context.trainer.state.epoch)
        if not np.isfinite(dice):
            return
        if epoch == 0:  # validation before training: the served weights' score
            self.best = dice
            logger.info("Validation Dice of the served weights: %.4f (to beat)", dice)
            return
        if dice <= self.best:
            return
        what = "weights" if self.blend >= 1.0 else f"blend {self.blend:g} of the tuned and base weights"
        extra: Dict[str, Any] = {"epoch": epoch, "val_dice": dice}
        if self.blend < 1.0:
            extra["blend"] = self.blend
        reference = float(metrics.get(REFERENCE_METRIC, float("nan")))
        base = float(metrics.get(BASE_REFERENCE_METRIC, float("nan")))
        if self.max_forgetting is not None and np.isfinite(reference) and np.isfinite(base):
            if reference < base - self.max_forgetting:
                logger.info("Epoch %d (%s): validation Dice %.4f > %.4f, but the reference Dice %.4f is more than "
                            "%.3f below the base model's %.4f (it forgot other structures); not published", epoch,
                            what, dice, self.best, reference, self.max_forgetting, base)
                self.refused_epoch = epoch
                return
            extra.update(reference_dice=reference, base_reference_dice=base)
        worst = float(metrics.get(WORST_DROP_METRIC, float("nan")))
        if self.max_structure_forgetting is not None and np.isfinite(worst):
            if worst > self.max_structure_forgetting:
                logger.info("Epoch %d (%s): validation Dice %.4f > %.4f, but one reference structure's Dice fell %.4f "
                            "below the base model's (more than %.3f: it forgot that structure); not published", epoch,
                            what, dice, self.best, worst, self.max_structure_forgetting)
                self.refused_epoch = epoch
                return
            extra.update(reference_worst_drop=worst)
        logger.info("Epoch %d (%s): validation Dice %.4f > %.4f; publishing", epoch, what, dice, self.best)
        self.best = dice
        self.published = True
        self.task.publish(self.context, **extra)
