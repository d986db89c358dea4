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
known options must have their type and range (``max_epochs`` an integer in 1..:data:`MAX_EPOCHS`, ``lr`` a
number in (0, 1], ``val_split`` in [0, 1), ...), so ``{"max_epochs": -3}`` or ``{"lr": "fast"}`` is a 422
naming the option instead of a task that fails minutes later in its log. ``train_ds`` and ``val_ds`` are
refused (422): MONAI Label reads them as datalists, or JSON files holding one, that name any file on the server
for training; the app trains only on the datastore's saved labels. ``bundle_path`` is refused for every
task (MONAI Label puts it on the subprocess's Python path). ``run_sync`` training and batch inference are
refused (400): they would run inside the server process and hold it for minutes; start the task without
``run_sync`` and poll ``GET /train/``. (``run_sync`` scoring runs in a worker thread, see :mod:`lib.routes`.)

Install it once, in the server process only (``MONAILabelApp.on_init_complete``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Optional

from fastapi import HTTPException
from monailabel.utils.async_tasks.task import AsyncTask

from lib.configs.options import MAX_REHEARSAL, MAX_RETENTION
from lib.errors import InvalidRequest

logger = logging.getLogger(__name__)

#: Most epochs one Train request may ask for.
MAX_EPOCHS = 1000
#: Upper bound of the ``samples_per_epoch`` Train option.
MAX_SAMPLES_PER_EPOCH = 10000
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


def _integer(options: Mapping[str, Any], key: str, low: int, high: int) -> None:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"train option {key} must be an integer in {low}..{high}, got {_short(value)}")


def _clicks(options: Mapping[str, Any], key: str) -> None:
    from sam_med3d.training import click_iterations

    try:
        click_iterations(options[key])
    except ValueError:
        raise InvalidRequest(f"train option {key} must be an integer in 1..100 or a range LOW-HIGH within it "
                             f"(drawn per sample), got {_short(options[key])}") from None


def _number(options: Mapping[str, Any], key: str, low: float, high: float, low_open: bool, high_open: bool) -> None:
    value = options[key]
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        raise InvalidRequest(f"train option {key} must be a number in {interval}, got {_short(value)}")


def _choice(options: Mapping[str, Any], key: str, choices: tuple) -> None:
    value = options[key]
    values = value if isinstance(value, list) and value else [value]  # a drop-down's whole list = its default
    if not all(isinstance(v, str) and v in choices for v in values):
        raise InvalidRequest(f"train option {key} must be one of {', '.join(choices)}, got {_short(value)}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


#: ``option: check`` for every Train option this app reads; other keys are passed on unchecked.
_TRAIN_CHECKS = {
    "max_epochs": lambda o: _integer(o, "max_epochs", 1, MAX_EPOCHS),
    "train_clicks": lambda o: _clicks(o, "train_clicks"),
    "samples_per_epoch": lambda o: _integer(o, "samples_per_epoch", 1, MAX_SAMPLES_PER_EPOCH),
    "train_batch_size": lambda o: _integer(o, "train_batch_size", 1, 64),
    "val_batch_size": lambda o: _integer(o, "val_batch_size", 1, 64),
    "early_stop_patience": lambda o: _integer(o, "early_stop_patience", -1, MAX_EPOCHS),
    "seed": lambda o: _integer(o, "seed", -1, 2**31 - 1),
    "lr": lambda o: _number(o, "lr", 0.0, 1.0, low_open=True, high_open=False),
    "retention": lambda o: _number(o, "retention", 0.0, MAX_RETENTION, low_open=False, high_open=False),
    "rehearsal": lambda o: _number(o, "rehearsal", 0.0, MAX_REHEARSAL, low_open=False, high_open=False),
    "max_forgetting": lambda o: _number(o, "max_forgetting", 0.0, 1.0, low_open=False, high_open=False),
    "max_structure_forgetting": lambda o: _number(o, "max_structure_forgetting", 0.0, 1.0, low_open=False,
                                                  high_open=False),
    "blend": lambda o: _number(o, "blend", 0.0, 1.0, low_open=False, high_open=False),
    "val_split": lambda o: _number(o, "val_split", 0.0, 1.0, low_open=False, high_open=True),
    "dataset": lambda o: _choice(o, "dataset", ("CacheDataset", "Dataset")),
    "dataloader": lambda o: _choice(o, "dataloader", ("ThreadDataLoader", "DataLoader")),
    "tracking": lambda o: _choice(o, "tracking", ("None", "mlflow")),
}
_BOOLEANS = ("multi_gpu", "pretrained")
_STRINGS = ("name", "tracking_uri", "tracking_experiment_name", "client_id")


def check_train_options(options: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidRequest` (422) naming the first Train option with a wrong type or range."""
    for key, check in _TRAIN_CHECKS.items():
        if key in options:
            check(options)
    for key in _BOOLEANS:
        if key in options and not isinstance(options[key], bool):
            raise InvalidRequest(f"train option {key} must be true or false, got {_short(options[key])}")
    for key in _STRINGS:
        if options.get(key) is not None and (not isinstance(options[key], str) or len(options[key]) > 256):
            raise InvalidRequest(f"train option {key} must be a string of at most 256 characters, got "
                                 f"{_short(options[key])}")
    if "device" in options:
        devices = options["device"] if isinstance(options["device"], list) else [options["device"]]
        if not devices or not all(isinstance(d, str) and re.fullmatch(r"cpu|cuda(:\d{1,2})?", d) for d in devices):
            raise InvalidRequest(f"train option device must be 'cpu', 'cuda' or 'cuda:N', got "
                                 f"{_short(options['device'])}")
    if "gpus" in options and not (isinstance(options["gpus"], str)
                                  and re.fullmatch(r"all|\d{1,2}(,\d{1,2})*", options["gpus"])):
        raise InvalidRequest(f"train option gpus must be 'all' or GPU indices such as '0,1', got "
                             f"{_short(options['gpus'])}")
