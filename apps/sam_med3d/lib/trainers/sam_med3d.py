"""The ``/train/sam_med3d`` task: fine-tune the served SAM-Med3D on the labels saved in the datastore.

A MONAI Label ``BasicTrainTask`` (ignite ``SupervisedTrainer`` / ``SupervisedEvaluator``), run by MONAI Label in a
subprocess so the server keeps answering clicks. It is glue; the pieces live elsewhere:

- data: :mod:`lib.trainers.label_datalist` (each saved label value one binary target; bad files skipped), split by
  image into training and validation (``val_split``); with no image to hold back, validation runs on the training
  targets, so a run that makes the served model worse on them publishes nothing. Each epoch draws at least
  ``samples_per_epoch`` samples (few targets are drawn again, each with new jitter, flips and clicks), plus
  ``rehearsal`` x as many from a rehearsal set (:mod:`sam_med3d.rehearsal`, ``--conf rehearsal_data``);
- recipe: :mod:`sam_med3d.training`: crops centred on a random voxel of the target, the paper's click iterations
  (``train_clicks``) with DiceCE plus the IoU-head loss, the retention term against the frozen **base** weights
  (``retention``), AdamW on every weight or, with ``freeze_encoder``, on the prompt encoder and mask decoder only;
  validation Dice on the crops inference uses, :data:`VAL_SEQUENCES` seeded sessions per target, also before the
  first epoch (the served weights' Dice is the bar);
- publishing: :mod:`sam_med3d.publishing` (atomic; when validation Dice beats the bar), guarded by
  :mod:`sam_med3d.forgetting` (reference check and blending) when a rehearsal set and a margin are given.

Options: :data:`lib.options.OPTIONS` gives every option's default, range and ``auto`` value (the guards are on
with ``--conf finetuned_for all`` and off with ``trained``); read them with :meth:`SamMed3DTrainer.option`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from ignite.engine import Events
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.inferers import SimpleInferer
from monai.transforms import AsDiscreted
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from sam_med3d.forgetting import (BASE_REFERENCE_METRIC, REFERENCE_METRIC, WORST_DROP_METRIC,  # noqa: F401
                                  BlendOnForgetting, ReferenceCheck)
from sam_med3d.publishing import PublishBest, publish_weights
from sam_med3d.rehearsal import MixedSampler
from sam_med3d.training import bare_sam, retention_agreement

from lib.options import CONF_OPTIONS, TRAIN_OPTIONS, Choice, train_config, train_value
from lib.served_model import load_weights
from lib.trainers.label_datalist import (NothingToTrain, expand_targets, label_values,  # noqa: F401
                                         label_voxel_counts, structure_names, trainable_datalist)
from lib.trainers.preflight import EXTERNAL_DATALIST_FIELDS

logger = logging.getLogger(__name__)

#: Weight of the IoU-head loss: keeps the IoU head, which the official recipe never trains, meaningful for the
#: uncertainty score of active learning.
IOU_LOSS_WEIGHT = 1.0
#: The official recipe's points-free refinement passes: off. With a few labels and ~100 steps they cost Dice
#: (benchmarks/active_learning.py, docs/experiments.md).
MASK_ONLY_ITERATIONS = False
#: Clicks of the retention term's simulated session on something else in the crop, per training sample.
RETENTION_CLICKS = 3
#: Train metric (in the train stats) of the retention term: mean agreement with the base model elsewhere.
RETENTION_METRIC = "train_retention_agreement"
#: Times each validation target is validated, each centred on another seeded voxel of the target with other
#: seeded clicks: with the few labels of an annotation round, one crop and one click sequence would make the
#: score that decides publishing depend on a handful of random draws.
VAL_SEQUENCES = 5


class SamMed3DTrainer(BasicTrainTask):
    """Click-iteration fine-tuning of the served SAM-Med3D (see the module docstring).

    Args:
        model_dir: folder for this task's runs (stats, ignite checkpoints, events).
        served: the app's :class:`~lib.served_model.ServedModel` (weights to start from and publish to).
        labels: the app's labels (shown in ``/info``; training uses every saved label value).
        rehearsal_data: ``--conf rehearsal_data`` (a request never names a folder); None: the schema's default.
        max_voxels: ``--conf max_voxels``: training and validation read no scan or label whose header claims more.
        defaults: the defaults of the Train request options, by ``--conf`` name
            (:meth:`lib.options.AppOptions.train_defaults`); others take :func:`lib.options.train_config`'s.
    """

    def __init__(self, model_dir: str, served: Any, labels: Mapping[str, int], rehearsal_data: Optional[str] = None,
                 max_voxels: Optional[int] = None,
                 description: str = "Fine-tune SAM-Med3D on the saved labels with simulated clicks", **defaults: Any):
        self.served = served
        self.label_values = {str(name): int(value) for name, value in labels.items()}
        self.rehearsal_data = CONF_OPTIONS["rehearsal_data"].default if rehearsal_data is None else rehearsal_data
        self.max_voxels = int(CONF_OPTIONS["max_voxels"].default if max_voxels is None else max_voxels)
        self.reference_records: List[Dict[str, Any]] = []
        #: Label names this run trains on (:meth:`partition_datalist`); with those the starting weights were
        #: trained on (:meth:`network`) they are published as ``structures``, the labels the weights answer.
        self.trained_structures: List[str] = []
        self._start_structures: List[str] = []
        self._base_sam: Optional[torch.nn.Module] = None
        self._sam_img_size: Optional[int] = None
        super().__init__(model_dir=model_dir, description=description,
                         config=dict(train_config(defaults), device=served.device),
                         amp=served.device.startswith("cuda"),
                         # DDP fails on the second iteration when a parameter got no gradient; some never do here
                         # (no_mask_embed: a mask prompt is always given).
                         find_unused_parameters=True,
                         publish_path=None,  # published by PublishBest through sam_med3d.publishing
                         n_saved=1, labels=list(labels))

    def option(self, context: Context, key: str) -> Any:
        """Train option ``key``, checked and typed by the schema (:func:`lib.options.train_value`): the request's
        value (``BasicTrainTask`` fills the request from this task's config), else the config's."""
        return train_value(key, context.request[key] if key in context.request else self._config.get(key))

    # ------------------------------------------------------------------------------------------------ data
    def preflight(self, datastore: Datastore) -> None:
        """Raise :class:`NothingToTrain` (409) when the datastore holds nothing to train on; the server calls this
        before starting the training subprocess (:mod:`lib.trainers.preflight`)."""
        trainable_datalist(datastore)

    def pre_process(self, request: Dict[str, Any], datastore: Datastore) -> List[Dict[str, Any]]:
        # A choice option's config value is its list of choices (a viewer's drop-down): take the one chosen.
        for key, option in TRAIN_OPTIONS.items():
            if isinstance(option.kind, Choice) and key in request:
                request[key] = train_value(key, request[key])
        return trainable_datalist(datastore)

    def seed(self, context: Context) -> Optional[int]:
        """Seed torch, numpy, ``random`` and MONAI when the request asks for ``seed`` >= 0 (offset by the rank);
        called before the data loaders exist, so crops, flips, sampling and clicks repeat. Returns the seed."""
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
        for key in EXTERNAL_DATALIST_FIELDS:  # refused by the server; never read: only the datastore's labels
            context.request.pop(key, None)
        # Split images first, then expand labels, so an image never feeds both training and validation.
        train_images, val_images = super().partition_datalist(context, shuffle=shuffle)
        train, val = expand_targets(train_images), expand_targets(val_images)
        if not train and val:  # the split put every image with a structure into validation
            logger.warning("Training: the training split holds no structure; training on the %d validation "
                           "target(s) without validation", len(val))
            train, val = val, []
        if not train:
            raise ValueError("the saved labels hold no structure to train on (all empty or tiny)")
        self.trained_structures = self.structure_names(train + val)
        rehearsal_train, self.reference_records = self.rehearsal_datalist(context)
        if not val_images and self.option(context, "val_split") > 0.0:
            logger.warning("Training: %d labelled image(s) are too few to hold one back for validation; "
                           "validating on the training labels (publishing only if they improve)",
                           len(train_images))
            val = [dict(sample) for sample in train]
        logger.info("Training targets: %d from %d image(s); validation targets: %d from %d image(s), each "
                    "validated %d times", len(train), len(train_images), len(val), len(val_images), VAL_SEQUENCES)
        # Each copy gets other seeded clicks (ClickValidationStep) and another crop centre (val_sequence).
        val = [dict(sample, val_sequence=r) for r in range(VAL_SEQUENCES) for sample in val]
        if not val:
            self.reference_records = []  # nothing decides publishing (val_split 0): the run publishes at its end
        return train + rehearsal_train, val

    def structure_names(self, targets: List[Mapping[str, Any]]) -> List[str]:
        """The app's label names of ``targets``' label values (:func:`lib.trainers.label_datalist.structure_names`)."""
        return structure_names(targets, self.label_values)

    def rehearsal_folder(self) -> Optional[Path]:
        """The rehearsal set ``--conf rehearsal_data`` names (:func:`sam_med3d.rehearsal.rehearsal_folder`)."""
        from sam_med3d.rehearsal import rehearsal_folder

        base, finetuned = getattr(getattr(self.served, "base", None), "path", None), getattr(self.served, "finetuned", "")
        return rehearsal_folder(self.rehearsal_data, base, Path(finetuned).parent)

    def rehearsal_datalist(self, context: Context) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """(training records marked ``"rehearsal": True``, reference targets) of the rehearsal set; the set is not
        read when nothing would use it (``rehearsal`` 0 and both margins 1)."""
        rehearse = self.option(context, "rehearsal") > 0
        if not rehearse and not self._checks_forgetting(context):
            logger.info("Training: no rehearsal and no reference check (rehearsal 0, max_forgetting and "
                        "max_structure_forgetting 1)")
            return [], []
        folder = self.rehearsal_folder()
        if folder is None:
            logger.info("Training: no rehearsal data for this base model (--conf rehearsal_data)")
            return [], []
        from sam_med3d.rehearsal import rehearsal_datalist

        train, reference = rehearsal_datalist(folder)
        train = train if rehearse else []
        logger.info("Training: rehearsal set %s: %d scan(s) rehearsed, %d structure(s) held back as reference",
                    folder, len(train), len(reference))
        return [dict(r, rehearsal=True) for r in train], reference

    def _checks_forgetting(self, context: Context) -> bool:
        """Whether the reference check can refuse anything (a Dice cannot fall by more than 1)."""
        return self.option(context, "max_forgetting") < 1.0 or self.option(context, "max_structure_forgetting") < 1.0

    def train_data_loader(self, context: Context, num_workers: int = 0, shuffle: bool = True):
        """MONAI Label's training loader, drawing at least ``samples_per_epoch`` samples per epoch (the cache still
        holds each target once)."""
        from monai.data import DataLoader, ThreadDataLoader
        from torch.utils.data import RandomSampler

        dataset, datalist = self._dataset(context, context.train_datalist, is_train=True)
        rehearsed = [i for i, record in enumerate(datalist) if record.get("rehearsal")]
        users = [i for i, record in enumerate(datalist) if not record.get("rehearsal")]
        draws = max(len(users), self.option(context, "samples_per_epoch"))
        extra = int(round(self.option(context, "rehearsal") * draws)) if rehearsed else 0
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

    def train_pre_transforms(self, context: Context):
        from sam_med3d.training import training_transforms

        # Centred on a random voxel of the target, as the predictor centres its crop on a first click there.
        return training_transforms(crop_size=self._img_size(context), augment=True, center="voxel",
                                   max_voxels=self.max_voxels)

    def val_pre_transforms(self, context: Context):
        from sam_med3d.training import validation_transforms

        return validation_transforms(crop_size=self._img_size(context), center="click",  # the crops inference sees
                                     max_voxels=self.max_voxels)

    def train_post_transforms(self, context: Context):
        return [AsDiscreted(keys="pred", threshold=0.0)]  # logits > 0 -> mask, for the Dice metric

    def val_post_transforms(self, context: Context):
        return [AsDiscreted(keys="pred", threshold=0.0)]

    # ----------------------------------------------------------------------------------------------- model
    def network(self, context: Context) -> torch.nn.Module:
        from sam_med3d.training import ClickIterationModel, default_loss, freeze_image_encoder

        path = self.served.path()
        sam, arch = load_weights(path, self.served.expected_arch, str(context.device))
        self._sam_img_size = int(sam.img_size)
        recorded = ((getattr(sam, "checkpoint_info", None) or {}).get("extra") or {}).get("structures")
        self._start_structures = [str(n) for n in recorded] if isinstance(recorded, (list, tuple)) else []
        frozen = self.option(context, "freeze_encoder")
        freeze_image_encoder(sam, frozen)
        retention = self.option(context, "retention")
        # The teacher is the base model, not the served (maybe fine-tuned) one: a teacher that followed the served
        # weights would let every round drift further from what the base could do elsewhere (measured: other
        # structures -0.03 after one round, -0.09 after three).
        self._base_sam = None
        if retention > 0:
            same = Path(path) == Path(self.served.base.path)
            self._base_sam = copy.deepcopy(sam).requires_grad_(False).eval() if same else self.base_model(context)
            logger.info("Retention teacher: the base weights %s", self.served.base.path)
        logger.info("Fine-tuning SAM-Med3D %s from %s (%s; retention weight %g)", arch, path,
                    "image encoder frozen: prompt encoder and mask decoder tuned" if frozen else "all weights tuned",
                    retention)
        return ClickIterationModel(sam, loss_fn=default_loss(), iou_loss_weight=IOU_LOSS_WEIGHT,
                                   mask_only_iterations=MASK_ONLY_ITERATIONS, teacher=self._base_sam,
                                   retention_weight=retention, retention_clicks=RETENTION_CLICKS)

    def base_model(self, context: Context) -> torch.nn.Module:
        """The base weights (frozen, eval mode): the retention teacher when there is one, else loaded now."""
        if self._base_sam is None:
            base, _ = load_weights(self.served.base.path, self.served.expected_arch, str(context.device))
            self._base_sam = base.requires_grad_(False).eval()
        return self._base_sam

    def _img_size(self, context: Context) -> int:
        if self._sam_img_size is None:
            self._sam_img_size = int(bare_sam(context.network).img_size)
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

    # ------------------------------------------------------------------------------------------ iterations
    def train_iteration_update(self, context: Context):
        from sam_med3d.training import ClickTrainingStep, WithModelCompleted

        return WithModelCompleted(ClickTrainingStep(num_click_iterations=self.option(context, "train_clicks"),
                                                    seed=int(context.local_rank), grad_clip=1.0))

    def val_iteration_update(self, context: Context):
        from sam_med3d.training import ClickValidationStep, WithModelCompleted

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

    def train_additional_metrics(self, context: Context):
        """With the retention term on, :data:`RETENTION_METRIC` (1 = the tuned model still answers clicks elsewhere
        as the base model does) in the train stats (``/info``) next to the Dice."""
        if self.option(context, "retention") <= 0:
            return None
        from ignite.metrics import Average

        return {RETENTION_METRIC: Average(output_transform=retention_agreement)}

    def train_handlers(self, context: Context):
        handlers = super().train_handlers(context)
        if context.evaluator:  # also validate before the first epoch: the served weights' Dice is the bar
            handlers = [h for h in handlers if not isinstance(h, ValidationHandler)]
            handlers.append(ValidationHandler(1, validator=context.evaluator, epoch_level=True, exec_at_start=True))
        return handlers

    # ------------------------------------------------------------------------------------------ publishing
    def publish(self, context: Context, **extra: Any) -> None:
        """Write the current weights over the served fine-tuned file (atomic; the infer task reloads them)."""
        publish_weights(bare_sam(context.network), self.served.finetuned, base_checkpoint=self.served.base.path,
                        run_id=str(context.run_id),
                        structures=set(self.trained_structures) | set(self._start_structures), **extra)

    def finalize(self, context: Context) -> None:
        checked = bool(context.local_rank == 0 and context.evaluator and self.reference_records)
        publisher = PublishBest(self, context, self.VAL_METRIC_MEAN_DICE,
                                self.option(context, "max_forgetting") if checked else None,
                                self.option(context, "max_structure_forgetting") if checked else None)
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
