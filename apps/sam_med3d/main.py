"""MONAI Label app serving SAM-Med3D: clicks in 3D Slicer / OHIF -> 3D masks, saved labels -> fine-tuning.

Start it with (the venv's ``python`` must be first on PATH, or set ``MONAILABEL_PYEXE``)::

    monailabel start_server --app apps/sam_med3d --studies <folder or DICOMweb URL> \\
        --conf labels spleen=1,liver=2 --conf checkpoint default

Tasks (names as the viewers show them):

- model ``sam_med3d`` (type ``deepedit``): interactive segmentation, see ``lib/infers/sam_med3d.py``;
- trainer ``sam_med3d``: click-iteration fine-tuning on the datastore's saved labels;
- strategies ``random``, ``first`` (MONAI Label's) and ``sam_med3d_uncertainty`` (model-based);
- scoring ``sam_med3d_uncertainty``: writes each unlabelled image's score into the datastore.

All ``--conf`` options and their defaults: ``lib/options.py`` and ``docs/app.md``.
"""

from __future__ import annotations

import logging
import os
from typing import Dict

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.configs.sam_med3d import SamMed3DConfig
from lib.datastore.dicomweb import OfflineDICOMWebDatastore, connect_dicomweb
from lib.datastore.local import SafeLocalDatastore
from lib.infers.result_writer import remove_stale_results
from lib.ohif import install_ohif
from lib.request_guard import install_request_guard
from lib.routes import install_task_routes
from lib.trainers.preflight import install_train_preflight
from lib.upstream_fixes.auth_everywhere import install_require_token
from lib.upstream_fixes.checksum_route import install_checksum_route
from lib.upstream_fixes.cors_policy import install_cors_policy
from lib.upstream_fixes.gpu_log_route import install_gpu_log_route
from lib.upstream_fixes.login_route import install_login_route
from lib.upstream_fixes.proxy_route import install_proxy_refusal
from lib.upstream_fixes.reload_route import install_reload_refusal
from lib.upstream_fixes.session_image_route import install_session_image_route
from lib.upstream_fixes.session_upload_route import install_session_upload_route
from lib.upstream_fixes.task_shutdown import (exit_with_parent, install_clean_shutdown, is_task_subprocess,
                                              remove_partial_saves)
from lib.upstream_fixes.token_algorithms import install_token_algorithms

logger = logging.getLogger(__name__)

TASK_NAME = "sam_med3d"


class SamMed3DApp(MONAILabelApp):
    """The app: one :class:`~lib.configs.sam_med3d.SamMed3DConfig` providing every task."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        if is_task_subprocess():
            exit_with_parent()  # a server killed outright (kill -9, crash) takes its training/scoring run along
        self.config = SamMed3DConfig()
        self.config.init(TASK_NAME, os.path.join(app_dir, "model"), conf, None, app_dir=app_dir)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAM-Med3D",
            description="Promptable 3D segmentation (SAM-Med3D) from foreground/background clicks, with "
                        "fine-tuning on saved labels and active learning",
            version="1.0",
            # A list ordered by value, "background" first: OHIF v3 drops the first entry as background and
            # numbers the rest 1..N; Slicer shows them in this order.
            labels=[name for name, _ in sorted(self.config.labels.items(), key=lambda item: item[1])],
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return dict(self.config.infer())

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {TASK_NAME: self.config.trainer()}

    def init_strategies(self) -> Dict[str, Strategy]:
        strategies: Dict[str, Strategy] = {"random": Random(), "first": First()}
        strategies.update(self.config.strategy())
        return strategies

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return dict(self.config.scoring_method())

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        # MONAI Label's LocalDatastore joins request fields into paths and keeps no label history; ours
        # validates ids, tags and uploads and archives superseded labels (lib/datastore/local.py).
        return SafeLocalDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                  auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                  read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
                                  max_voxels=self.config.options.max_voxels)

    def init_remote_datastore(self) -> Datastore:
        if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        # MONAI Label's own DICOMweb datastore needs dcmqi, downloaded from GitHub at start; ours writes DICOM
        # SEG with highdicom and reads SEGs by segment name (lib/datastore/dicomweb.py).
        logger.info("Using DICOMweb: %s (DICOM SEG labels via highdicom, nothing downloaded)", self.studies)
        return connect_dicomweb(self.studies, self.config.labels)

    def _download_dcmqi_tools(self) -> None:
        """Never download dcmqi: nothing here runs ``itkimage2segimage`` (MONAI Label calls this at start)."""

    def _prefetch_dicomweb(self) -> None:
        """Download and convert the first ``prefetch`` DICOMweb series in the background, so that the first
        click on a study opened from OHIF's study list does not wait for it (seconds per series)."""
        if not isinstance(self._datastore, OfflineDICOMWebDatastore) or self.config.options.prefetch <= 0:
            return
        try:
            images = self._datastore.list_images()
        except Exception as err:  # the server still starts; the first click will download the series
            logger.warning("DICOMweb prefetch skipped: the series could not be listed (%s)", err)
            return
        logger.info("Prefetching %d of %d DICOMweb series in the background",
                    min(len(images), self.config.options.prefetch), len(images))
        self._datastore.prefetch(images[: self.config.options.prefetch])

    def on_init_complete(self) -> None:
        # Only the server calls this (not the training/scoring subprocesses), so the model is loaded once, at
        # start, where a broken checkpoint is reported before the first click.
        if self.config.options.preload:
            for task in self._infers.values():
                task.warm_up()
        # A Train request with nothing to train on is refused here (409), not in the training subprocess.
        install_train_preflight(self)
        # Clicks and task requests run off the event loop; unknown names are 404, bad params 4xx (lib/routes.py).
        install_task_routes()
        # SIGTERM stops the training/scoring subprocesses and waits at most seconds for requests.
        install_clean_shutdown([self.config.options.model_dir])
        # What a save interrupted by a kill or a crash left beside the weights (no training runs yet), and
        # result files a killed server could not delete after answering (in RAM when in /dev/shm).
        remove_partial_saves([self.config.options.model_dir], when="Start")
        removed = remove_stale_results()
        if removed:
            logger.info("Start: removed %d result file(s) left by an earlier server", removed)
        # Only the configured web origins (default: none) may read the API's answers from their pages.
        install_cors_policy(self.config.options.cors_origins)
        # With MONAI_LABEL_AUTH_ENABLE: valid RS256 tokens work, and every request without one is 401 before
        # anything else runs (the request guard included). Then hostile ids, tags, paths and task fields are
        # refused before MONAI Label's endpoints see them.
        install_token_algorithms()
        install_login_route()
        install_require_token()
        install_request_guard()
        # MONAI Label 0.8.5 routes that answered 500 for some inputs, or that anyone could use to drop every
        # annotator's work (lib/upstream_fixes/, one module each; the datastore index fix is in the datastores).
        install_reload_refusal()
        install_checksum_route()
        install_gpu_log_route()
        install_proxy_refusal(self.studies)
        install_session_image_route()
        install_session_upload_route(self.config.options.max_voxels)
        # /ohif/: the bundled OHIF with a Save button, working Strategy/Next Sample and training state (lib/ohif).
        install_ohif()
        self._prefetch_dicomweb()
        super().on_init_complete()
