"""The ``/train/sam_med3d`` task: fine-tune the served SAM-Med3D on the labels saved in the datastore.

A MONAI Label ``BasicTrainTask`` (ignite ``SupervisedTrainer`` / ``SupervisedEvaluator``); MONAI Label runs it
in a subprocess, so the server keeps answering clicks while it trains. The recipe is the paper's
click-iteration training from :mod:`sam_med3d.training` (not re-implemented here).

Two sets of defaults (``--conf`` options set to ``auto``, :data:`lib.options.OPTIONS`), by what
the published weights will answer (``--conf finetuned_for``):

- ``trained`` (the app's default): the fine-tuned weights answer only the labels they were trained on (the
  checkpoint records their names as ``structures``, :meth:`SamMed3DTrainer.publish`), the base weights every
  other label. So nothing elsewhere needs keeping: every weight is tuned (``freeze_encoder`` false, lr 5e-4),
  without retention, rehearsal or reference check; validation on held-back labels still decides publishing;
- ``all``: the fine-tuned weights answer every label, so the guards below are on (encoder frozen, lr 1e-3,
  retention 4.0, rehearsal 0.5, ``max_forgetting`` 0.05, ``max_structure_forgetting`` 0.10).

The recipe:

- data: every (image, final label) pair of the datastore, split by image into train/validation
  (``val_split``); each label value present in a saved label map becomes one binary target. A Train request
  with nothing to train on is refused by the server (HTTP 409) before MONAI Label starts the training
  subprocess: :meth:`SamMed3DTrainer.preflight`, called through :mod:`lib.trainers.preflight`;
- preprocessing: ``sam_med3d.training.training_transforms`` (RAS, 1.5 mm, cubic crop of the model's input
  size centred on a random voxel of the target plus jitter, as the predictor centres its crop on a first click
  anywhere in the structure; foreground z-score, flips); the deterministic part is cached;
- step: ``sam_med3d.training.ClickTrainingStep``: the image is encoded once, the first click is a random
  voxel of the target, every further click a random voxel of the error region, the previous low-res mask is
  the mask prompt, DiceCE loss averaged over the click iterations (``train_clicks``: N, or ``LOW-HIGH`` drawn
  per sample; validation and the reference check use ``HIGH``) (plus the IoU-head loss, which the
  model-based active-learning score relies on), no mask-only iterations (:data:`MASK_ONLY_ITERATIONS`); AdamW
  on every weight, or on the prompt encoder and mask decoder only (``freeze_encoder``);
- retention (``retention``): the frozen base weights (the checkpoint the app was
  started with, not the fine-tuned ones served now, so rounds do not drift step by step) are the teacher of
  ``sam_med3d.training.retention_loss``: on each crop a short simulated session on something else than the
  target, whose answers are kept close to the base model's (learning without forgetting), so tuning on one
  structure does not teach the decoder to segment it wherever the user clicks;
- rehearsal (``rehearsal``; data from ``--conf rehearsal_data``, default ``auto``):
  each epoch also draws that many samples per user sample from a rehearsal set of labelled scans of other
  structures (``sam_med3d.rehearsal``; for the bundled model, phantoms drawn like its training data), one of
  their structures per draw, trained with the same click recipe, so the decoder keeps segmenting them;
- validation Dice: the same click simulation with a fixed seed, on the crops the app's predictor uses
  (``sam_med3d.training.validation_transforms(center="click")``: the official preprocessing, the crop centred
  on a seeded voxel of the target as for a first click there), each target :data:`VAL_SEQUENCES` times with
  other crop centres and clicks, averaged; no augmentation; it also runs once before the first epoch, so the
  served weights' Dice is the bar to beat;
- reference check (with a rehearsal set and validation, unless both margins are 1): the tuned model is scored on the rehearsal set's
  held-back scans (``sam_med3d.rehearsal.ReferenceScore``: every structure, seeded clicks) whenever its
  validation Dice makes it a candidate for publishing, and the base model once; the scores are in the train
  stats (``val_reference_dice``, ``val_reference_dice_base``, and ``val_reference_worst_drop``: the largest
  drop of one structure's Dice, averaged over its held-back targets; the log names the structure);
- blending (``blend``, default 0.5): when an epoch's weights beat validation but fail the reference check, the
  blend ``base + blend * (tuned - base)`` and then half of it are validated and checked like an epoch
  (:class:`BlendOnForgetting`); one that passes is published (the checkpoint records its ``blend``), and
  training goes on from the tuned weights;
- publishing: whenever validation Dice beats the best so far (and the reference Dice is at most
  ``max_forgetting`` below the base model's, and no reference structure's Dice is more than
  ``max_structure_forgetting`` below the base model's there; 1 turns each off), the weights are written
  atomically with ``sam_med3d.checkpoint.save_checkpoint`` to ``<model_dir>/finetuned_<base>.pt``, which the
  infer task picks up on its next click. When the split holds no image back although ``val_split`` > 0 (one or two
  labelled images), validation runs on the training targets at the inference crop, so a run that makes the
  served model worse on them publishes nothing; with ``val_split`` 0 the weights are published when training
  ends;
- bad files: an unreadable label, or one whose grid size differs from its image's, or an image or label that
  :mod:`sam_med3d.io` refuses (a header naming another file), is skipped with a warning; ``train_ds`` and
  ``val_ds`` (MONAI Label's datalists naming any server file) are refused by the server and never read;
- ``freeze_encoder``: tune the prompt encoder and mask decoder only (the image encoder's weights are kept and
  left out of the optimizer): with few labels and weights that answer every label it forgot less and learned
  more than tuning all weights; for weights that answer only their labels, tuning all weights learned more
  (docs/experiments.md).

- epochs: at least ``samples_per_epoch`` (default 16) samples each: with fewer saved targets they are drawn
  again within the epoch (:meth:`SamMed3DTrainer.train_data_loader`), so one or two labels still give the
  optimizer a few hundred steps, not 20.

Which options a Train request may set, their ranges and defaults: :data:`lib.options.OPTIONS` (the
defaults come from ``--conf``; ``rehearsal_data`` only from ``--conf``: a request never names a folder); read
them with :meth:`SamMed3DTrainer.option`. ``seed`` (default -1, not seeded) makes a run repeat:
:meth:`SamMed3DTrainer.seed`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.inferers import SimpleInferer
from monai.transforms import AsDiscreted
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.errors import InvalidRequest
from lib.options import train_config, train_value

logger = logging.getLogger(__name__)

#: Weight of the IoU-head loss (MSE between predicted and actual IoU): keeps the IoU head, which the
#: official recipe never trains, meaningful for the uncertainty score used by active learning.
IOU_LOSS_WEIGHT = 1.0
#: The official recipe's points-free refinement passes (one random iteration in [2, 8] and the last): off. With
#: a few labels and ~100 steps they cost Dice (benchmarks/active_learning.py, docs/experiments.md), as they did when
#: the bundled model was trained (its model card).
MASK_ONLY_ITERATIONS = False
#: Clicks of the simulated session on something else in the crop that the retention term runs per training
#: sample (:func:`sam_med3d.training.retention_loss`).
RETENTION_CLICKS = 3
#: Train metric (in the train stats) of the retention term: mean agreement with the served model elsewhere.
RETENTION_METRIC = "train_retention_agreement"
#: Targets smaller than this (voxels) in a saved label are skipped: too small to crop around and click in.
MIN_TARGET_VOXELS = 8
#: Seed of the validation click simulation (fixed, so epochs are compared on the same clicks).
VAL_SEED = 1234
#: Metric names of the reference check (evaluator metrics, so they are in the train stats).
REFERENCE_METRIC = "val_reference_dice"
BASE_REFERENCE_METRIC = "val_reference_dice_base"
WORST_DROP_METRIC = "val_reference_worst_drop"
#: Times each validation target is validated: each copy is centred on another seeded voxel of the target and
#: gets other seeded clicks; the Dice metric averages them. With the few labels of an annotation round, one
#: crop and one click sequence make the score that decides publishing depend on a handful of random draws.
VAL_SEQUENCES = 5


def label_voxel_counts(label_path: str) -> Dict[int, int]:
    """Voxel count of every nonzero value of a saved label map, read through :func:`sam_med3d.io.load_label`
    (a single-file format whose header names no other file; integer values 0..255).

    Raises:
        ValueError: the file cannot be read as a label map (the message names it).
    """
    from sam_med3d.io import load_label

    counts = np.bincount(load_label(str(label_path)).ravel(order="K"), minlength=1)
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0}


def label_values(label_path: str) -> List[int]:
    """The nonzero values of a saved label map with at least :data:`MIN_TARGET_VOXELS` voxels each."""
    return [v for v, n in label_voxel_counts(label_path).items() if n >= MIN_TARGET_VOXELS]


def check_label_grid(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the files when a saved label's grid size differs from its image's, or when
    either file is one :func:`sam_med3d.io.read_header` refuses (a header naming another file, ...)."""
    from sam_med3d.io import read_header

    label, scan = read_header(record["label"]), read_header(record["image"])
    if label.size != scan.size:
        raise ValueError(f"label map {record['label']} has size {label.shape_str()} but its image "
                         f"{os.path.basename(str(record['image']))} has {scan.shape_str()}")


def _usable_values(record: Mapping[str, Any]) -> List[int]:
    """:func:`label_values` of a datalist record; an unreadable label, or one on another grid than its image,
    is skipped with a warning (one bad file does not fail the whole run)."""
    try:
        values = label_values(record["label"])
        if values:
            check_label_grid(record)
    except ValueError as err:
        logger.warning("Training: %s; skipped", err)
        return []
    if not values:
        logger.warning("Training: label %s has no structure of %d+ voxels; skipped", record["label"],
                       MIN_TARGET_VOXELS)
    return values


def expand_targets(datalist: List[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One training sample per (image, label value): ``{"image", "label", "label_value"}``."""
    samples = []
    for record in datalist:
        samples.extend({"image": record["image"], "label": record["label"], "label_value": v}
                       for v in _usable_values(record))
    return samples


class NothingToTrain(InvalidRequest):
    """A Train request while the datastore holds no saved label with a structure to train on.

    HTTP 409 ("Conflict": the request is fine, the datastore is not ready for it), body ``{"detail": ...}``.
    """

    def __init__(self, message: str):
        super().__init__(message, status_code=409)


def trainable_datalist(datastore: Datastore) -> List[Dict[str, Any]]:
    """The datastore's (image, final label) records, or :class:`NothingToTrain` saying why there is nothing.

    Stops reading labels at the first one with a usable structure, so the check is quick when it passes.
    """
    datalist = datastore.datalist()
    if not datalist:
        raise NothingToTrain("nothing to train on: no image has a saved final label yet; save a label first "
                             "(3D Slicer: Submit Label), then train again")
    if not any(_usable_values(record) for record in datalist):
        names = ", ".join(os.path.basename(str(r["label"])) for r in datalist[:5])
        more = f" and {len(datalist) - 5} more" if len(datalist) > 5 else ""
        raise NothingToTrain(f"nothing to train on: the {len(datalist)} saved final label(s) ({names}{more}) hold "
                             f"no structure of {MIN_TARGET_VOXELS}+ voxels (empty, tiny or unreadable); "
                             f"save a label with the structure drawn, then train again")
    return datalist


def _sam(network: torch.nn.Module) -> torch.nn.Module:
    """The bare ``Sam3D`` inside a (DDP-wrapped) ``ClickIterationModel``."""
    inner = getattr(network, "module", network)
    return getattr(inner, "sam", inner)


class MixedSampler(torch.utils.data.Sampler):
    """An epoch of ``user_draws`` draws of the user's targets (whole random permutations, then a partial one, so
    each is drawn as often as the others give or take one) and ``rehearsal_draws`` of the rehearsal scans
    (likewise), shuffled together. Uses torch's global generator, so a seeded run repeats."""

    def __init__(self, users: List[int], rehearsed: List[int], user_draws: int, rehearsal_draws: int):
        self.users, self.rehearsed = list(users), list(rehearsed)
        self.user_draws, self.rehearsal_draws = int(user_draws), int(rehearsal_draws)

    @staticmethod
    def _draw(indices: List[int], count: int) -> List[int]:
        out: List[int] = []
        while len(out) < count and indices:
            out += [indices[i] for i in torch.randperm(len(indices)).tolist()]
        return out[:count]

    def __iter__(self):
        order = self._draw(self.users, self.user_draws) + self._draw(self.rehearsed, self.rehearsal_draws)
        return iter([order[i] for i in torch.randperm(len(order)).tolist()])

    def __len__(self) -> int:
        return (self.user_draws if self.users else 0) + (self.rehearsal_draws if self.rehearsed else 0)


class WithModelCompleted:
    """Run an ignite iteration function the way MONAI's own ``_iteration`` ends: put its output in
    ``engine.state.output`` and fire ``IterationEvents.MODEL_COMPLETED``, on which MONAI engines decollate the
    batch and run the post transforms (so the Dice metrics see thresholded masks, not raw logits)."""

    def __init__(self, step: Any):
        self.step = step

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> Any:
        output = self.step(engine, batch)
        if isinstance(output, dict):  # not decollated yet: the step did not fire the event itself
            engine.state.output = output
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return engine.state.output
        return output


def retention_agreement(output: Any) -> float:
    """The mean ``retention_agreement`` of a training step's output (a dict, or the per-item dicts MONAI makes of
    it); ignite ``output_transform`` of :data:`RETENTION_METRIC`."""
    items = output if isinstance(output, (list, tuple)) else [output]
    values = [float(item["retention_agreement"]) for item in items
              if isinstance(item, Mapping) and "retention_agreement" in item]
    if not values:
        raise ValueError("the training step's output has no retention_agreement (is the retention term on?)")
    return float(np.mean(values))


class ClickValidationStep:
    """ignite ``iteration_update`` for validation: the click simulation without gradients, seeded per item."""

    def __init__(self, num_click_iterations: int, seed: int = VAL_SEED):
        self.num_click_iterations = int(num_click_iterations)
        self.seed = int(seed)

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        from sam_med3d.training import run_click_iterations

        sam = _sam(engine.network)
        device = engine.state.device
        image = torch.as_tensor(batch["image"]).to(device).float()
        label = torch.as_tensor(batch["label"]).to(device).float()
        rng = np.random.default_rng([self.seed, int(engine.state.iteration)])
        sam.eval()
        with torch.no_grad():
            out = run_click_iterations(sam, image, label, self.num_click_iterations, rng,
                                       mask_only_iterations=False)
        return {"image": image, "label": label, "pred": out["logits"]}


class ReferenceCheck:
    """Evaluator handler (before MONAI Label's stats handler): the reference Dice of the tuned model, and once, of
    the base model (:class:`sam_med3d.rehearsal.ReferenceScore` on the rehearsal set's held-back scans), put into
    the evaluator's metrics as :data:`REFERENCE_METRIC` and :data:`BASE_REFERENCE_METRIC`, with the largest drop
    of one structure's Dice below the base model's as :data:`WORST_DROP_METRIC` (the structure is logged).

    Scored only where it decides something: before training, and at epochs whose validation Dice beats the
    ``publisher``'s best (a candidate for publishing); other epochs keep the last score in the metrics."""

    def __init__(self, trainer_task: "SamMed3DTrainer", context: Context, publisher: "PublishBest", metric: str):
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
        from sam_med3d.rehearsal import ReferenceScore, worst_drop

        task, context = self.task, self.context
        dice = float(evaluator.state.metrics.get(self.metric, float("nan")))
        epoch = int(context.trainer.state.epoch)
        if epoch > 0 and not (np.isfinite(dice) and dice > self.publisher.best):
            self._put(evaluator)
            return
        sam = _sam(context.network)
        if self.score is None:
            self.score = ReferenceScore(task.reference_records, crop_size=int(sam.img_size),
                                        num_clicks=train_value("train_clicks", context.request["train_clicks"])[1],
                                        device=str(context.device))
            base = task.base_model(context)
            scores = self.score.per_target(base, cache_key="base")
            self.base = float(np.mean(scores)) if scores else float("nan")
            self.base_structures = self.score.per_structure(scores)
            logger.info("Reference check: %d target(s) of %d structure(s) of the rehearsal set held back; the base "
                        "model's Dice there: %.4f (%s)", len(self.score), len(self.base_structures), self.base,
                        ", ".join(f"{k} {v:.3f}" for k, v in self.base_structures.items()))
        frozen = not any(p.requires_grad for p in sam.image_encoder.parameters())
        scores = self.score.per_target(sam, cache_key="tuned" if frozen else None)
        self.last = float(np.mean(scores)) if scores else float("nan")
        tuned = self.score.per_structure(scores)
        self.last_worst, worst = worst_drop(self.base_structures, tuned)
        logger.info("Epoch %d: reference Dice %.4f (base model %.4f); largest drop on one structure %.4f (%s); per "
                    "structure: %s", epoch, self.last, self.base, self.last_worst, worst,
                    ", ".join(f"{k} {self.base_structures[k]:.3f}->{v:.3f}" for k, v in tuned.items()
                              if k in self.base_structures))
        self._put(evaluator)


class PublishBest:
    """Evaluator handler: save the weights when validation Dice beats the best so far (first run = baseline) and,
    with a reference check, the reference Dice is at most ``max_forgetting`` below the base model's and no
    reference structure's Dice is more than ``max_structure_forgetting`` below the base model's."""

    def __init__(self, trainer_task: "SamMed3DTrainer", context: Context, metric: str,
                 max_forgetting: Optional[float] = None, max_structure_forgetting: Optional[float] = None):
        self.task = trainer_task
        self.context = context
        self.metric = metric
        self.max_forgetting = max_forgetting
        self.max_structure_forgetting = max_structure_forgetting
        self.best = -1.0
        #: Epoch whose weights beat the validation Dice but failed the reference check (:class:`BlendOnForgetting`).
        self.refused_epoch = -1
        #: Share of the tuned weights in the weights being validated (1: the tuned weights themselves).
        self.blend = 1.0
        self.published = False

    def __call__(self, evaluator: Any) -> None:
        dice = float(evaluator.state.metrics.get(self.metric, float("nan")))
        epoch = int(self.context.trainer.state.epoch)
        if not np.isfinite(dice):
            return
        reference = float(evaluator.state.metrics.get(REFERENCE_METRIC, float("nan")))
        base = float(evaluator.state.metrics.get(BASE_REFERENCE_METRIC, float("nan")))
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
        if self.max_forgetting is not None and np.isfinite(reference) and np.isfinite(base):
            if reference < base - self.max_forgetting:
                logger.info("Epoch %d (%s): validation Dice %.4f > %.4f, but the reference Dice %.4f is more than "
                            "%.3f below the base model's %.4f (it forgot other structures); not published", epoch,
                            what, dice, self.best, reference, self.max_forgetting, base)
                self.refused_epoch = epoch
                return
            extra.update(reference_dice=reference, base_reference_dice=base)
        worst = float(evaluator.state.metrics.get(WORST_DROP_METRIC, float("nan")))
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
    """Trainer handler (after validation): when an epoch's weights beat the validation Dice but forgot (the
    reference check refused them), try the blend ``base + a * (tuned - base)`` for ``a`` = ``blend``, then half
    of it: each is validated and reference-checked by the evaluator like an epoch, and published under the same
    rules. Training then goes on from the tuned weights. Weight-space interpolation of the fine-tuned and the
    base model (WiSE-FT, Wortsman et al., CVPR 2022) keeps much of what tuning learned while moving back to what
    the base model could do. The trials keep the global random states, so training goes on as without them."""

    def __init__(self, context: Context, publisher: PublishBest, base: Callable[[], torch.nn.Module], blend: float):
        self.context = context
        self.publisher = publisher
        self.base = base  # loaded only when an epoch is refused
        self.blends = (float(blend), float(blend) / 2)

    def __call__(self, trainer: Any) -> None:
        publisher, epoch = self.publisher, int(trainer.state.epoch)
        if publisher.refused_epoch != epoch:
            return
        sam = _sam(self.context.network)
        tuned = {k: v.detach().clone() for k, v in sam.state_dict().items()}
        metrics = dict(self.context.evaluator.state.metrics)  # the train stats report the tuned weights' epoch
        with kept_random_state():  # training goes on exactly as it would have without blending
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
                if not dice > publisher.best:  # a refused blend is logged by PublishBest
                    logger.info("Epoch %d (blend %g of the tuned and base weights): validation Dice %.4f, not above "
                                "%.4f; not published", epoch, share, dice, publisher.best)
        finally:
            publisher.blend = 1.0
            sam.load_state_dict(tuned)
            self.context.evaluator.state.metrics.update(metrics)


class SamMed3DTrainer(BasicTrainTask):
    """Click-iteration fine-tuning of the served SAM-Med3D (see the module docstring).

    Args:
        model_dir: folder for this task's runs (stats, ignite checkpoints, events).
        served: the app's :class:`~lib.served_model.ServedModel` (weights to start from and publish to).
        labels: the app's labels (shown in ``/info``; training uses every saved label value).
        rehearsal_data: ``--conf rehearsal_data`` (a request never names a folder).
        defaults: the defaults of the Train request options, by ``--conf`` name (``epochs``, ``val_split``,
            ``lr``, ...: :meth:`lib.options.AppOptions.train_defaults`); one not given takes the schema's
            default for ``finetuned_for all`` (:func:`lib.options.train_config`).
    """

    def __init__(self, model_dir: str, served: Any, labels: Mapping[str, int], rehearsal_data: Optional[str] = "auto",
                 description: str = "Fine-tune SAM-Med3D on the saved labels with simulated clicks", **defaults: Any):
        self.served = served
        self.label_values = {str(name): int(value) for name, value in labels.items()}
        self.rehearsal_data = rehearsal_data
        self.reference_records: List[Dict[str, Any]] = []
        #: Label names of the user's structures this run trains on (set by :meth:`partition_datalist`), plus
        #: those the starting weights were trained on (set by :meth:`network`): published as ``structures``,
        #: the labels the fine-tuned weights answer (``--conf finetuned_for``).
        self.trained_structures: List[str] = []
        self._start_structures: List[str] = []
        self._base_sam: Optional[torch.nn.Module] = None
        device = served.device
        super().__init__(
            model_dir=model_dir,
            description=description,
            config=dict(train_config(defaults), device=device),
            amp=device.startswith("cuda"),
            # multi_gpu wraps the network in DDP, which by default fails on the second iteration when a parameter
            # got no gradient; some never do here (no_mask_embed: a mask prompt is always given).
            find_unused_parameters=True,
            publish_path=None,  # published by PublishBest through sam_med3d.checkpoint, not by file copy
            n_saved=1,
            labels=list(labels),
        )
        self._sam_img_size = None

    # ----------------------------------------------------------------------------------------- data
    def preflight(self, datastore: Datastore) -> None:
        """Raise :class:`NothingToTrain` when the datastore holds nothing to train on.

        The server calls this before starting the training subprocess (:mod:`lib.trainers.preflight`), so a
        Train request with nothing to train on is answered 409 at once instead of 200 and a failed task.
        """
        trainable_datalist(datastore)

    def pre_process(self, request: Dict[str, Any], datastore: Datastore) -> List[Dict[str, Any]]:
        # Choice options are lists in the config (viewers show them as drop-downs and send one value); a
        # request that sends none would hand BasicTrainTask the whole list, so take the first (the default).
        for key in ("dataset", "dataloader", "tracking"):
            if key in request:
                request[key] = train_value(key, request[key])
        return trainable_datalist(datastore)

    def seed(self, context: Context) -> Optional[int]:
        """Seed torch, numpy, ``random`` and MONAI (``set_determinism``) when the request asks for ``seed`` >= 0.

        Called at the start of each training process's run, before its data loaders exist: MONAI's loader draws
        the random state of the transforms (crop jitter, flips) from torch's generator, the sampler draws the
        order from it, and the click simulation is seeded by rank, so a seeded run repeats (up to the order of
        floating-point sums on a multi-threaded CPU or GPU). Returns the seed used (offset by the rank), or None.
        """
        value = self.option(context, "seed")
        if value < 0:
            return None
        from monai.utils import set_determinism

        seed = int(value) + int(context.local_rank)
        set_determinism(seed=seed)
        logger.info("Training seeded: %d", seed)
        return seed

    def partition_datalist(self, context: Context, shuffle: bool = False):
        self.seed(context)  # MONAI Label calls this first in each training process, before building loaders
        # MONAI Label reads "train_ds"/"val_ds" as datalists (or JSON files) naming any server path; the server
        # refuses them (lib.trainers.preflight), and training never reads them: only the datastore's labels.
        for key in ("train_ds", "val_ds"):
            context.request.pop(key, None)
        # Split images first, then expand labels, so an image never feeds both training and validation.
        train_images, val_images = super().partition_datalist(context, shuffle=shuffle)
        train, val = expand_targets(train_images), expand_targets(val_images)
        if not train and val:
            # The split put every image with a structure into validation (e.g. 2 labels, one of them empty):
            # train on those rather than fail after the viewer was told that training started.
            logger.warning("Training: the training split holds no structure; training on the %d validation "
                           "target(s) without validation", len(val))
            train, val = val, []
        if not train:
            raise ValueError("the saved labels hold no structure to train on (all empty or tiny)")
        self.trained_structures = self.structure_names(train + val)
        rehearsal_train, self.reference_records = self.rehearsal_datalist(context)
        if not val_images and self.option(context, "val_split") > 0.0:
            # Too few labels to hold one back (val_split 0.2 of 1-2 images): validate on the training targets
            # at the inference crop, so a run that makes the served model worse on them publishes nothing.
            logger.warning("Training: %d labelled image(s) are too few to hold one back for validation; "
                           "validating on the training labels (publishing only if they improve)",
                           len(train_images))
            val = [dict(sample) for sample in train]
        logger.info("Training targets: %d from %d image(s); validation targets: %d from %d image(s), each "
                    "validated %d times", len(train), len(train_images), len(val), len(val_images), VAL_SEQUENCES)
        # Each copy is a later item of the validation run (ClickValidationStep seeds other clicks for it) and
        # has its own crop centre (OfficialCropd's seed includes val_sequence).
        val = [dict(sample, val_sequence=r) for r in range(VAL_SEQUENCES) for sample in val]
        if not val:
            self.reference_records = []  # nothing decides publishing (val_split 0): the run publishes at its end
        return train + rehearsal_train, val

    def structure_names(self, targets: List[Mapping[str, Any]]) -> List[str]:
        """The app's label names of ``targets``' label values (sorted); a value the app has no name for is left
        out with a warning (no click can name it, so no weights need to answer it)."""
        names = {name: value for name, value in self.label_values.items() if name != "background"}
        by_value = {value: name for name, value in names.items()}
        found, unnamed = set(), set()
        for target in targets:
            value = int(target["label_value"])
            (found.add(by_value[value]) if value in by_value else unnamed.add(value))
        if unnamed:
            logger.warning("Training: label value(s) %s of the saved labels have no name in the app's labels "
                           "(--conf labels); they are trained on, but no click can ask for them",
                           sorted(unnamed))
        return sorted(found)

    def rehearsal_folder(self) -> Optional[Path]:
        """The rehearsal set (``--conf rehearsal_data``): ``auto`` = the bundled model's phantoms when the base is
        the bundled model (written into ``<model_dir>/rehearsal_bundled`` on first use), else none; ``none``;
        or a folder with ``imagesTr``/``labelsTr``."""
        value = str(self.rehearsal_data or "none").strip()
        if value.lower() == "none":
            return None
        if value.lower() == "auto":
            from sam_med3d.checkpoint import BUNDLED_PATH
            from sam_med3d.rehearsal import bundled_rehearsal_set

            base = getattr(getattr(self.served, "base", None), "path", None)
            if base is None or Path(base).resolve() != Path(BUNDLED_PATH).resolve():
                return None
            return bundled_rehearsal_set(Path(self.served.finetuned).parent / "rehearsal_bundled")
        return Path(value)

    def rehearsal_datalist(self, context: Context) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """(training records, reference targets) of the rehearsal set; both empty without a set, the training
        records also when ``rehearsal`` is 0 (the reference check stays: ``max_forgetting`` 1 turns it off).
        Training records carry ``"rehearsal": True`` (the sampler draws them apart from the user's)."""
        if self._rehearsal_ratio(context) <= 0 and not self._checks_forgetting(context):
            logger.info("Training: no rehearsal and no reference check (rehearsal 0, max_forgetting and "
                        "max_structure_forgetting 1)")
            return [], []
        folder = self.rehearsal_folder()
        if folder is None:
            logger.info("Training: no rehearsal data for this base model (--conf rehearsal_data)")
            return [], []
        from sam_med3d.rehearsal import rehearsal_datalist

        train, reference = rehearsal_datalist(folder)
        if self._rehearsal_ratio(context) <= 0:
            train = []
        logger.info("Training: rehearsal set %s: %d scan(s) rehearsed, %d structure(s) held back as reference",
                    folder, len(train), len(reference))
        return [dict(r, rehearsal=True) for r in train], reference

    def train_data_loader(self, context: Context, num_workers: int = 0, shuffle: bool = True):
        """MONAI Label's training loader, drawing at least ``samples_per_epoch`` samples per epoch.

        With fewer training targets than that, the targets are drawn again within the epoch (whole random
        permutations first, then a partial one, so every target is drawn as often as the others, give or take
        one); each draw gets its own crop jitter, flips and clicks. The cache (``CacheDataset``) still holds each
        target once.
        """
        from monai.data import DataLoader, ThreadDataLoader
        from torch.utils.data import RandomSampler

        dataset, datalist = self._dataset(context, context.train_datalist, is_train=True)
        rehearsed = [i for i, record in enumerate(datalist) if record.get("rehearsal")]
        users = [i for i, record in enumerate(datalist) if not record.get("rehearsal")]
        draws = max(len(users), self._samples_per_epoch(context))
        extra = int(round(self._rehearsal_ratio(context) * draws)) if rehearsed else 0
        logger.info("%d - Records for Training: %d; %d drawn per epoch (+ %d of %d rehearsal scans)",
                    context.local_rank, len(users), draws, extra, len(rehearsed))
        if not shuffle:
            sampler = None
        elif rehearsed:
            sampler = MixedSampler(users, rehearsed, draws, extra)
        else:
            sampler = RandomSampler(dataset, replacement=False, num_samples=draws)
        loader = ThreadDataLoader if context.dataloader_type == "ThreadDataLoader" else DataLoader
        return loader(dataset=dataset, batch_size=context.train_batch_size, sampler=sampler,
                      shuffle=False if sampler is not None else shuffle, num_workers=num_workers)

    def _samples_per_epoch(self, context: Context) -> int:
        return self.option(context, "samples_per_epoch")

    def train_pre_transforms(self, context: Context):
        from sam_med3d.training import training_transforms

        # Crops centred on a random voxel of the target (plus jitter), as the app's predictor centres its crop
        # on a first click somewhere in the structure: the model is tuned on the views it is used on.
        return training_transforms(crop_size=self._img_size(context), augment=True, center="voxel")

    def val_pre_transforms(self, context: Context):
        # Validation Dice on the crops inference sees (the official pipeline), not on the training frame.
        from sam_med3d.training import validation_transforms

        return validation_transforms(crop_size=self._img_size(context), center="click")

    def train_post_transforms(self, context: Context):
        return [AsDiscreted(keys="pred", threshold=0.0)]  # logits > 0 -> mask, for the Dice metric

    def val_post_transforms(self, context: Context):
        return [AsDiscreted(keys="pred", threshold=0.0)]

    # ---------------------------------------------------------------------------------------- model
    def network(self, context: Context) -> torch.nn.Module:
        from lib.served_model import load_weights
        from sam_med3d.training import ClickIterationModel, default_loss

        path = self.served.path()
        sam, arch = load_weights(path, self.served.expected_arch, str(context.device))
        self._sam_img_size = int(sam.img_size)
        recorded = ((getattr(sam, "checkpoint_info", None) or {}).get("extra") or {}).get("structures")
        self._start_structures = [str(n) for n in recorded] if isinstance(recorded, (list, tuple)) else []
        frozen = self.option(context, "freeze_encoder")
        for parameter in sam.image_encoder.parameters():
            parameter.requires_grad_(not frozen)
        retention = self._retention(context)
        teacher = None
        if retention > 0:
            teacher = self._teacher(sam, path, context)
        self._base_sam = teacher
        logger.info("Fine-tuning SAM-Med3D %s from %s (%s; retention weight %g)", arch, path,
                    "image encoder frozen: prompt encoder and mask decoder tuned" if frozen else "all weights tuned",
                    retention)
        return ClickIterationModel(sam, loss_fn=default_loss(), iou_loss_weight=IOU_LOSS_WEIGHT,
                                   mask_only_iterations=MASK_ONLY_ITERATIONS, teacher=teacher,
                                   retention_weight=retention, retention_clicks=RETENTION_CLICKS)

    def _teacher(self, sam: torch.nn.Module, path: Any, context: Context) -> torch.nn.Module:
        """The frozen teacher of the retention term: the **base** weights the app was started with.

        Not the weights served now: after a first round those are themselves fine-tuned, and a teacher that
        follows them lets every round drift a little further from what the base model could do elsewhere
        (measured: other structures -0.03 after one round, -0.09 after three with the served weights as the
        teacher). The base model is the one whose answers on everything else the annotator relies on.
        """
        from lib.served_model import load_weights

        base = self.served.base.path
        if Path(path) == Path(base):
            teacher = copy.deepcopy(sam)
        else:
            teacher, _ = load_weights(base, self.served.expected_arch, str(context.device))
        logger.info("Retention teacher: the base weights %s", base)
        return teacher.requires_grad_(False).eval()

    def base_model(self, context: Context) -> torch.nn.Module:
        """The base weights (frozen, eval mode): the retention teacher when there is one, else loaded now."""
        if self._base_sam is None:
            from lib.served_model import load_weights

            base, _ = load_weights(self.served.base.path, self.served.expected_arch, str(context.device))
            self._base_sam = base.requires_grad_(False).eval()
        return self._base_sam

    def _img_size(self, context: Context) -> int:
        if self._sam_img_size is None:
            self._sam_img_size = int(_sam(context.network).img_size)
        return self._sam_img_size

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        trainable = [p for p in context.network.parameters() if p.requires_grad]  # a frozen encoder is left out
        return torch.optim.AdamW(trainable, lr=self.option(context, "lr"), weight_decay=0.1)

    def loss_function(self, context: Context):
        from sam_med3d.training import default_loss

        return default_loss()

    def load_path(self, output_dir: str, pretrained: bool = True):
        return None  # network() already loaded the served weights (sam_med3d checkpoint format)

    def lr_scheduler_handler(self, context: Context):
        return None

    # ------------------------------------------------------------------------------------ iterations
    def train_iteration_update(self, context: Context):
        from sam_med3d.training import ClickTrainingStep

        clicks = self.option(context, "train_clicks")
        return WithModelCompleted(ClickTrainingStep(num_click_iterations=clicks, seed=int(context.local_rank),
                                                    grad_clip=1.0))

    def val_iteration_update(self, context: Context):
        return WithModelCompleted(ClickValidationStep(self.option(context, "train_clicks")[1]))

    def train_inferer(self, context: Context):
        return SimpleInferer()

    def val_inferer(self, context: Context):
        return SimpleInferer()

    def train_key_metric(self, context: Context):
        return {self.TRAIN_METRIC_MEAN_DICE: MeanDice(output_transform=from_engine(["pred", "label"]),
                                                      include_background=True)}

    def val_key_metric(self, context: Context):
        return {self.VAL_METRIC_MEAN_DICE: MeanDice(output_transform=from_engine(["pred", "label"]),
                                                    include_background=True)}

    def option(self, context: Context, key: str) -> Any:
        """Train option ``key``, typed (:func:`lib.options.train_value`): the request's value, which
        MONAI Label's ``BasicTrainTask`` fills from this task's config; the config's when the context was built
        without it."""
        return train_value(key, context.request[key] if key in context.request else self._config.get(key))

    def _rehearsal_ratio(self, context: Context) -> float:
        return self.option(context, "rehearsal")

    def _checks_forgetting(self, context: Context) -> bool:
        """Whether the reference check can refuse anything (``max_forgetting`` or ``max_structure_forgetting``
        below 1: a Dice cannot fall by more than 1)."""
        return self.option(context, "max_forgetting") < 1.0 or self.option(context, "max_structure_forgetting") < 1.0

    def _retention(self, context: Context) -> float:
        return self.option(context, "retention")

    def train_additional_metrics(self, context: Context):
        """With the retention term on, ``train_retention_agreement``: the epoch's mean Dice between the tuned and
        the served model's answers to the retention sessions (1 = the model still answers clicks elsewhere as the
        served one did); it is in the train stats (``/info``) next to the Dice."""
        if self._retention(context) <= 0:
            return None
        from ignite.metrics import Average

        return {RETENTION_METRIC: Average(output_transform=retention_agreement)}

    def train_handlers(self, context: Context):
        handlers = super().train_handlers(context)
        if context.evaluator:
            # Also validate before the first epoch: the served weights' Dice is the bar for publishing.
            handlers = [h for h in handlers if not isinstance(h, ValidationHandler)]
            handlers.append(ValidationHandler(1, validator=context.evaluator, epoch_level=True, exec_at_start=True))
        return handlers

    # ------------------------------------------------------------------------------------ publishing
    def publish(self, context: Context, **extra: Any) -> None:
        """Write the current weights to the served fine-tuned path (atomic; the infer task reloads them)."""
        from sam_med3d.checkpoint import save_checkpoint

        structures = sorted(set(self.trained_structures) | set(self._start_structures))
        path = save_checkpoint(_sam(context.network), self.served.finetuned,
                               base_checkpoint=str(self.served.base.path), run_id=str(context.run_id),
                               structures=structures, **extra)
        logger.info("New SAM-Med3D weights published: %s (trained on: %s)", path, ", ".join(structures) or "-")

    def finalize(self, context: Context) -> None:
        checked = bool(context.local_rank == 0 and context.evaluator and self.reference_records)
        margin = self.option(context, "max_forgetting") if checked else None
        structure_margin = self.option(context, "max_structure_forgetting") if checked else None
        publisher = PublishBest(self, context, self.VAL_METRIC_MEAN_DICE, margin, structure_margin)
        if checked:  # before MONAI Label's stats handler, so the stats carry the reference Dice
            context.evaluator.add_event_handler(
                Events.EPOCH_COMPLETED, ReferenceCheck(self, context, publisher, self.VAL_METRIC_MEAN_DICE))
            blend = self.option(context, "blend")
            if blend > 0 and not context.multi_gpu:  # after the ValidationHandler: it reads that epoch's verdict
                context.trainer.add_event_handler(
                    Events.EPOCH_COMPLETED, BlendOnForgetting(context, publisher, lambda: self.base_model(context), blend))
        super().finalize(context)  # train stats for /info (Slicer's accuracy bar)
        if context.local_rank != 0:
            return
        if context.evaluator:
            context.evaluator.add_event_handler(Events.EPOCH_COMPLETED, publisher)
        else:
            context.trainer.add_event_handler(
                Events.COMPLETED, lambda engine: self.publish(context, epoch=int(engine.state.epoch)))
