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

The same wrapper checks every Train request's options before anything starts (:func:`check_train_options`):
known options must have the type and range the option schema gives them (:mod:`lib.options`:
``max_epochs`` an integer in 1..1000, ``lr`` a number in (0, 1], ``val_split`` in [0, 1), ...), so ``{"max_epochs": -3}`` or ``{"lr": "fast"}`` is a 422
naming the option instead of a task that fails minutes later in its log. ``train_ds`` and ``val_ds`` are
refused (422): MONAI Label reads them as datalists, or JSON files holding one, that name any file on the server
for training; the app trains only on the datastore's saved labels. ``bundle_path`` is refused for every
task (MONAI Label puts it on the subprocess's Python path). ``run_sync`` training and batch inference are
refused (400): they would run inside the server process and hold it for minutes; start the task without
``run_sync`` and poll ``GET /train/``. (``run_sync`` scoring runs in a worker thread, see :mod:`lib.upstream_fixes.task_routes`.)

Install it once, in the server process only (``MONAILabelApp.on_init_complete``).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from fastapi import HTTPException
from monailabel.utils.async_tasks.task import AsyncTask

from lib.errors import InvalidRequest
from lib.options import check_train_request

logger = logging.getLogger(__name__)

#: Tasks that ``run_sync`` would run inside the server process (refused).
NO_RUN_SYNC = ("train", "batch_infer")
STATUS_REFUSED = 400


def install_train_preflight(app: Any) -> None:
    """Make ``AsyncTask.run("train", ...)`` call the trainers' ``preflight`` first (idempotent)."""
    original = AsyncTask.run
    if getattr(original, "train_preflight_of", None) is not None:
        original = original.train_preflight_of

    def run(method: str, request: Optional[dict] = None, params: Optional[dict] = None, force_sync: bool = False,
            enqueue: bool = False):
        check_request(method, request, params, force_sync)
        if method == "train":
            check_trainers(app, (request or {}).get("model"))
        return original(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

    run.train_preflight_of = original
    AsyncTask.run = staticmethod(run)


def check_trainers(app: Any, model: Optional[str]) -> None:
    """Run the ``preflight`` of trainer ``model`` (all trainers when ``model`` is empty); errors propagate."""
    trainers = app._trainers  # MONAILabelApp keeps them by name; there is no public accessor in 0.8.5
    if model and model not in trainers:
        raise InvalidRequest(f"unknown model {model!r} for training; this server's trainers are: "
                             f"{', '.join(sorted(trainers)) or 'none'}", status_code=404)
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


def check_request(method: str, request: Optional[Mapping[str, Any]], params: Optional[Mapping[str, Any]],
                  force_sync: bool) -> None:
    """Refuse ``run_sync`` for :data:`NO_RUN_SYNC`, a ``bundle_path`` anywhere, and bad train options."""
    if force_sync and method in NO_RUN_SYNC:
        what = "training" if method == "train" else "batch inference"
        raise InvalidRequest(f"run_sync=true is not accepted for {what}: it would run inside the server and hold "
                             f"it until done; send the request without run_sync and poll GET /"
                             f"{'train' if method == 'train' else 'batch/infer'}/ for its status",
                             status_code=STATUS_REFUSED)
    sent = dict(request or {})
    sent.update(params or {})
    if "bundle_path" in sent or any(isinstance(v, Mapping) and "bundle_path" in v for v in sent.values()):
        raise InvalidRequest("bundle_path is not accepted in a request (it would be put on the task's Python path)")
    if method == "train":
        check_no_external_datalist(sent)
        check_train_options(sent)
        for value in sent.values():  # POST /train/ nests each trainer's options under its name
            if isinstance(value, Mapping):
                check_train_options(value)


#: Train request fields with which MONAI Label's ``BasicTrainTask`` reads a datalist of any server files.
EXTERNAL_DATALIST_FIELDS = ("train_ds", "val_ds")


def check_no_external_datalist(options: Mapping[str, Any]) -> None:
    """Refuse (422) ``train_ds`` / ``val_ds`` at the top of a Train request or under a trainer's name."""
    nested = [v for v in options.values() if isinstance(v, Mapping)]
    for where in [options] + nested:
        for key in EXTERNAL_DATALIST_FIELDS:
            if where.get(key) not in (None, "", [], {}):
                raise InvalidRequest(f"train option {key} is not accepted: training reads only the images and "
                                     "final labels of the datastore (save labels there), never a datalist or file "
                                     "named by the request")


def check_train_options(options: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRequest` (422) naming the first Train option with a wrong type or range
    (:data:`lib.options.OPTIONS` says which options a Train request may set, and their ranges)."""
    try:
        check_train_request(options)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
