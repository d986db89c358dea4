"""Keeping fine-tuning from forgetting: the reference check and blending, as ignite handlers.

A model fine-tuned on a few labels of one structure can forget the others. When its weights are to answer every
label (the app's ``--conf finetuned_for all``), two handlers guard what gets published
(:class:`sam_med3d.publishing.PublishBest` decides):

- :class:`ReferenceCheck` (on the evaluator, before the stats handler): the tuned model's Dice on the rehearsal
  set's held-back scans (:class:`sam_med3d.rehearsal.ReferenceScore`: every structure, seeded clicks) whenever
  its validation Dice makes it a candidate for publishing, and the base model's once. The scores go into the
  evaluator's metrics, hence into the train stats: :data:`REFERENCE_METRIC`, :data:`BASE_REFERENCE_METRIC` and
  :data:`WORST_DROP_METRIC` (the largest drop of one structure's Dice, averaged over its held-back targets; the
  log names the structure).
- :class:`BlendOnForgetting` (on the trainer, after validation): when an epoch's weights beat validation but fail
  the reference check, the blend ``base + blend * (tuned - base)`` and then half of it are validated and checked
  like an epoch; one that passes is published (the checkpoint records its ``blend``), and training goes on from
  the tuned weights. Weight-space interpolation of the fine-tuned and the base model (WiSE-FT, Wortsman et al.,
  CVPR 2022) keeps much of what tuning learned while moving back to what the base model could do.

The handlers read a MONAI Label-like training context (``context.trainer``, ``context.evaluator``,
``context.network``, ``context.request["train_clicks"]``, ``context.device``) and never import MONAI Label.
"""

from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Callable, Dict

import numpy as np
import torch

from .training import bare_sam, click_iterations, encoder_frozen

logger = logging.getLogger(__name__)

#: Metric names of the reference check (evaluator metrics, so they are in the train stats).
REFERENCE_METRIC = "val_reference_dice"
BASE_REFERENCE_METRIC = "val_reference_dice_base"
WORST_DROP_METRIC = "val_reference_worst_drop"


class ReferenceCheck:
    """Evaluator handler: the reference Dice of the tuned model, and once, of the base model, put into the
    evaluator's metrics (see the module docstring).

    Scored only where it decides something: before training, and at epochs whose validation Dice beats the
    ``publisher``'s best (a candidate for publishing); other epochs keep the last score in the metrics.

    Args:
        trainer_task: has ``reference_records`` (the held-back targets) and ``base_model(context)`` (the frozen
            base weights).
        context: the training context.
        publisher: has ``best``, the validation Dice to beat.
        metric: the evaluator's validation Dice metric name.
    """

    def __init__(self, trainer_task: Any, context: Any, publisher: Any, metric: str):
        self.task = trainer_task
        self.context = context
        self.publisher = publisher
        self.metric = metric
        self.score: Any = None
        self.base = float("nan")
        self.base_structures: Dict[str, float] = {}
        self.last = float("nan")
        self.last_worst = float("nan")

    def _put(self, evaluator: Any) -> None:
        evaluator.state.metrics[REFERENCE_METRIC] = self.last
        evaluator.state.metrics[BASE_REFERENCE_METRIC] = self.base
        evaluator.state.metrics[WORST_DROP_METRIC] = self.last_worst

    def __call__(self, evaluator: Any) -> None:
        from . import rehearsal

        task, context = self.task, self.context
        dice = float(evaluator.state.metrics.get(self.metric, float("nan")))
        epoch = int(context.trainer.state.epoch)
        if epoch > 0 and not (np.isfinite(dice) and dice > self.publisher.best):
            self._put(evaluator)
            return
        sam = bare_sam(context.network)
        if self.score is None:
            self.score = rehearsal.ReferenceScore(
                task.reference_records, crop_size=int(sam.img_size),
                num_clicks=click_iterations(context.request["train_clicks"])[1], device=str(context.device))
            scores = self.score.per_target(task.base_model(context), cache_key="base")
            self.base = float(np.mean(scores)) if scores else float("nan")
            self.base_structures = self.score.per_structure(scores)
            logger.info("Reference check: %d target(s) of %d structure(s) of the rehearsal set held back; the base "
                        "model's Dice there: %.4f (%s)", len(self.score), len(self.base_structures), self.base,
                        ", ".join(f"{k} {v:.3f}" for k, v in self.base_structures.items()))
        scores = self.score.per_target(sam, cache_key="tuned" if encoder_frozen(sam) else None)
        self.last = float(np.mean(scores)) if scores else float("nan")
        tuned = self.score.per_structure(scores)
        self.last_worst, worst = rehearsal.worst_drop(self.base_structures, tuned)
        logger.info("Epoch %d: reference Dice %.4f (base model %.4f); largest drop on one structure %.4f (%s); per "
                    "structure: %s", epoch, self.last, self.base, self.last_worst, worst,
                    ", ".join(f"{k} {self.base_structures[k]:.3f}->{v:.3f}" for k, v in tuned.items()
                              if k in self.base_structures))
        self._put(evaluator)


@contextlib.contextmanager
def kept_random_state():
    """Restore the global random states (``random``, numpy, torch, CUDA) on exit: what runs inside draws nothing
    that the training after it would otherwise have drawn."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class BlendOnForgetting:
    """Trainer handler (after validation): when the reference check refused this epoch's weights, try the blends
    ``base + a * (tuned - base)`` for ``a`` = ``blend``, then half of it; each is validated and reference-checked
    by the evaluator like an epoch and published under the same rules. Training then goes on from the tuned
    weights, with the global random states it had (blending changes what is published, not what is drawn).

    Args:
        context: the training context (``network``, ``evaluator``).
        publisher: the :class:`sam_med3d.publishing.PublishBest` on the evaluator.
        base: returns the base weights; called only when an epoch is refused.
        blend: the first share of the tuned weights tried.
    """

    def __init__(self, context: Any, publisher: Any, base: Callable[[], torch.nn.Module], blend: float):
        self.context = context
        self.publisher = publisher
        self.base = base
        self.blends = (float(blend), float(blend) / 2)

    def __call__(self, trainer: Any) -> None:
        publisher, epoch = self.publisher, int(trainer.state.epoch)
        if publisher.refused_epoch != epoch:
            return
        sam = bare_sam(self.context.network)
        tuned = {k: v.detach().clone() for k, v in sam.state_dict().items()}
        metrics = dict(self.context.evaluator.state.metrics)  # the train stats report the tuned weights' epoch
        with kept_random_state():
            self._try_blends(sam, tuned, self.base().state_dict(), epoch, metrics)

    def _try_blends(self, sam: torch.nn.Module, tuned: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor],
                    epoch: int, metrics: Dict[str, Any]) -> None:
        publisher = self.publisher
        try:
            for share in self.blends:
                mixed = {k: (base[k].to(v.device, v.dtype) + share * (v - base[k].to(v.device, v.dtype))
                             if v.is_floating_point() and k in base else v) for k, v in tuned.items()}
                sam.load_state_dict(mixed)
                publisher.blend, publisher.published = share, False
                self.context.evaluator.run(epoch)
                if publisher.published:
                    break
                dice = float(self.context.evaluator.state.metrics.get(publisher.metric, float("nan")))
                if not dice > publisher.best:  # a blend the reference check refused is logged by the publisher
                    logger.info("Epoch %d (blend %g of the tuned and base weights): validation Dice %.4f, not above "
                                "%.4f; not published", epoch, share, dice, publisher.best)
        finally:
            publisher.blend = 1.0
            sam.load_state_dict(tuned)
            self.context.evaluator.state.metrics.update(metrics)
