"""The one ``TaskConfig`` of the app: SAM-Med3D's infer task, trainer, active-learning strategy and scoring.

Everything is configured by ``--conf`` (see :mod:`lib.options` for names and defaults); nothing is
downloaded at import time. ``init`` resolves which weights to serve (downloading SAM-Med3D-turbo into
``model_dir`` on the first start when asked) and logs one line saying which model is served and why.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning.uncertainty import UncertaintyScoring, UncertaintyStrategy
from lib.infers.sam_med3d import SamMed3DInfer
from lib.options import AppOptions
from lib.served_model import ServedModel, export_for_subprocesses, finetuned_path, resolve_base_weights
from lib.trainers.sam_med3d import SamMed3DTrainer

logger = logging.getLogger(__name__)


class SamMed3DConfig(TaskConfig):
    """Builds the app's tasks from the parsed options; ``self.options`` and ``self.served`` are set by ``init``."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs: Any) -> None:
        app_dir = kwargs.pop("app_dir", os.path.dirname(os.path.abspath(model_dir)))
        self.options = AppOptions.from_conf(conf, app_dir)
        super().init(name, self.options.model_dir, conf, planner, **kwargs)
        os.makedirs(self.options.model_dir, exist_ok=True)

        base = resolve_base_weights(self.options.checkpoint, self.options.model_dir)
        export_for_subprocesses(base)
        self.served = ServedModel(base, self.options.model, self.options.device,
                                  finetuned_path(self.options.model_dir, base.path), self.options.use_finetuned,
                                  self.options.finetuned_for)
        self.labels = dict(self.options.labels)
        self.path = [str(base.path), str(self.served.finetuned)]  # MONAI Label's convention: latest last
        # The one line an operator needs: which model answers the clicks, and why that one.
        level = logging.WARNING if "could not be downloaded" in base.reason else logging.INFO
        logger.log(level, "SAM-Med3D app serving %s on %s", self.served.describe(), self.options.device)

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        from sam_med3d.extension import ExtensionConfig

        o = self.options
        extension = ExtensionConfig(enabled=o.extension != "off", strategy="zoom" if o.extension == "zoom" else "slide",
                                    max_crops=o.extension_max_crops, time_budget_s=o.extension_time_s)
        return {self.name: SamMed3DInfer(self.served, self.labels, o.cache_size, o.cache_ttl_s, extension=extension,
                                         max_voxels=o.max_voxels, result_compress=o.result_compress,
                                         cache_max_bytes=int(o.cache_max_gb * 2 ** 30) if o.cache_max_gb else None)}

    def trainer(self) -> Optional[TrainTask]:
        return SamMed3DTrainer(model_dir=os.path.join(self.options.model_dir, f"train_{self.name}"),
                               served=self.served, labels=self.labels, rehearsal_data=self.options.rehearsal_data,
                               max_voxels=self.options.max_voxels,
                               **self.options.train_defaults())

    def strategy(self) -> Union[None, Strategy, Dict[str, Strategy]]:
        return {f"{self.name}_uncertainty": UncertaintyStrategy(key=UncertaintyScoring.KEY)}

    def scoring_method(self) -> Union[None, ScoringMethod, Dict[str, ScoringMethod]]:
        return {f"{self.name}_uncertainty": UncertaintyScoring(self.served, self.options.uncertainty_prompts,
                                                               max_voxels=self.options.max_voxels)}
