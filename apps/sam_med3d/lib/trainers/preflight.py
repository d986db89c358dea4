"""Refuse a Train request that has nothing to train on, in the server, before a training subprocess starts.

MONAI Label 0.8.5 answers ``POST /train/`` and ``POST /train/<model>`` by starting
``python -m monailabel.interfaces.utils.app -m train`` in a subprocess (``AsyncTask.run`` ->
``run_background_task``) and returning 200 at once. The app's ``train()`` and the task's ``pre_process`` run
only in that subprocess, so an error there never reaches the viewer as an answer: the task just ends in
``ERROR``, and OHIF, which switched its button to "Stop Training" on the 200, stays there. Between the request
and the subprocess the server calls nothing of the app's that knows it is a Train request, so this module
wraps ``AsyncTask.run`` (the one function both endpoints, ``run_sync`` included, go through) for the method
``"train"``: every trainer that has a ``preflight(datastore)`` method is asked first, and its
``InvalidRequest`` (a FastAPI ``HTTPException``) becomes the answer, e.g. HTTP 409 with
``{"detail": "nothing to train on: ..."}``. 3D Slicer shows that body in its error dialog
("Failed to run training in MONAI Label Server. Message: Status: 409; Response: {...}"); the bundled OHIF
shows its own "Failed to RUN training" notification and keeps its "Update Model" button. A datastore that
cannot list its labels (a DICOMweb server that does not answer) gets 503 with the reason instead of a bare 500.

Install it once, in the server process only (``MONAILabelApp.on_init_complete``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import HTTPException
from monailabel.utils.async_tasks.task import AsyncTask

from lib.errors import InvalidRequest

logger = logging.getLogger(__name__)


def install_train_preflight(app: Any) -> None:
    """Make ``AsyncTask.run("train", ...)`` call the trainers' ``preflight`` first (idempotent)."""
    original = AsyncTask.run
    if getattr(original, "train_preflight_of", None) is not None:
        original = original.train_preflight_of

    def run(method: str, request: Optional[dict] = None, params: Optional[dict] = None, force_sync: bool = False,
            enqueue: bool = False):
        if method == "train":
            check_trainers(app, (request or {}).get("model"))
        return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run.train_preflight_of = original
    AsyncTask.run = staticmethod(run)


def check_trainers(app: Any, model: Optional[str]) -> None:
    """Run the ``preflight`` of trainer ``model`` (all trainers when ``model`` is empty); errors propagate."""
    trainers = app._trainers  # MONAILabelApp keeps them by name; there is no public accessor in 0.8.5
    tasks = [trainers[model]] if model in trainers else [] if model else list(trainers.values())
    for task in tasks:
        preflight = getattr(task, "preflight", None)
        if preflight is None:
            continue
        try:
            preflight(app.datastore())
        except HTTPException:
            raise
        except Exception as err:  # e.g. a DICOMweb server that does not answer while labels are listed
            logger.exception("Train pre-flight failed")
            raise InvalidRequest(f"training cannot start: the saved labels could not be listed ({err})",
                                 status_code=503) from err
