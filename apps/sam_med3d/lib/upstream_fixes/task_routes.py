"""The app's own handlers for MONAI Label's task endpoints: no request runs on the event loop, names are checked.

MONAI Label 0.8.5 declares ``POST /infer/{model}`` (and the train, scoring and active-learning endpoints) as
``async def`` handlers that call blocking code directly, so the server's single asyncio loop runs the whole
click: while one annotator's click is segmented, ``GET /info/``, the other annotators' clicks and every other
request wait (92 s behind a 150-click request). :func:`install_task_routes` replaces those routes with
handlers that keep MONAI Label's request and response formats and

- run the work in a worker thread (``starlette.concurrency.run_in_threadpool``), so the loop keeps answering;
- check an infer request once (:func:`lib.validation.check_infer_request`: the model, the image id, the
  uploads' names, ``params`` as a JSON object and its fields), on the form FastAPI parsed: an unknown model is
  a 404 naming the known ones, invalid ``params`` a 422 (MONAI Label: 500 for both); the request guard leaves
  this route to it (the guard answers unknown trainers, scoring methods and strategies the same way);
- store uploads (``file``, ``label``) under a name the server chooses, with their checked extension; tell the
  task which files came with the request (:data:`~lib.infers.fields.UPLOADED_IMAGE`, :data:`~lib.infers.fields.UPLOADED_LABEL`, set after the client's
  ``params`` are merged, so a client cannot name a server path as its label file);
- say who the request is from when it carries no ``client_id`` (the OHIF bundled with MONAI Label sends none):
  the authenticated user when MONAI Label's authentication is on, else the caller's address
  (:data:`~lib.infers.fields.CLIENT_FALLBACK`), which keys the annotator's session label map;
- refuse ``output=dicom_seg`` (it needs dcmqi, which this app does not install) with 422 instead of a 500;
- stream the label map of a multipart answer instead of building it in memory (:mod:`lib.result_response`).

The datastore's upload and dataset routes are replaced the same way, by :mod:`lib.datastore.routes` (their
temporary files never outlive the request).

``?run_sync=true`` training is refused by :mod:`lib.trainers.preflight`; ``run_sync`` scoring runs in a
worker thread like everything else here.

Install once, in the server process (``MONAILabelApp.on_init_complete``), before the first request.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Dict, Optional

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from monailabel.config import settings
from monailabel.endpoints import activelearning, scoring, train
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import MONAILabelException
from monailabel.utils.others.generic import remove_file
from starlette.concurrency import run_in_threadpool

from lib.errors import InvalidRequest
from lib.datastore import routes as datastore_routes
from lib.validation import check_infer_request, check_task_name, split_extension, upload_basename
from lib.infers.fields import CLIENT_FALLBACK, UPLOADED_IMAGE, UPLOADED_LABEL
from lib.result_response import send_result

logger = logging.getLogger(__name__)

#: ``(method, path)`` of every MONAI Label route this module replaces (paths without the API prefix).
REPLACED = (("POST", "/infer/{model}"), ("POST", "/train/"), ("POST", "/train/{model}"), ("POST", "/scoring/"),
            ("POST", "/scoring/{method}"), ("POST", "/activelearning/{strategy}")) + datastore_routes.REPLACED


def _app():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _caller(http: Request, user: Optional[User]) -> str:
    """Who sent a request without ``client_id``: the authenticated user, else the caller's address."""
    if settings.MONAI_LABEL_AUTH_ENABLE and user is not None and getattr(user, "username", None):
        return f"user:{user.username}"
    host = http.client.host if http.client else "unknown"
    return f"address:{host}"


def _save_upload(upload: UploadFile, saved: list) -> str:
    """Write an uploaded file (its name checked by :func:`lib.validation.check_infer_request`) to a temporary file
    (its path is appended to ``saved`` at once, so that the caller removes it whether the request succeeds or
    fails)."""
    extension = split_extension(upload_basename(upload.filename), "the uploaded file name")[1]
    handle, path = tempfile.mkstemp(prefix="sam_med3d_upload_", suffix=extension)
    saved.append(path)
    with os.fdopen(handle, "wb") as out:
        while True:
            chunk = upload.file.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
    return path


def run_inference(background_tasks: BackgroundTasks, model: str, image: str, session_id: str, params: str,
                  file: Optional[UploadFile], label: Optional[UploadFile], output: Optional[str],
                  caller: str) -> Any:
    """MONAI Label's ``run_inference`` with the checks above (runs in a worker thread).

    Uploaded files are written to temporary files that are removed after the response is sent, and at once when
    the request fails (FastAPI runs background tasks only after a successful response, so a rejected upload
    would otherwise stay in the temporary folder for good).
    """
    saved: list = []
    try:
        result = _run_inference(saved, background_tasks, model, image, session_id, params, file, label, output,
                                caller)
    except BaseException:
        for path in saved:
            remove_file(path)
        raise
    for path in saved:
        background_tasks.add_task(remove_file, path)
    return result


def _run_inference(saved: list, background_tasks: BackgroundTasks, model: str, image: str, session_id: str,
                   params: str, file: Optional[UploadFile], label: Optional[UploadFile], output: Optional[str],
                   caller: str) -> Any:
    instance = _app()
    check_task_name(instance._infers, model, "model")  # MONAILabelApp keeps them by name; no public accessor
    uploads = {"file": file.filename if file else None, "label": label.filename if label else None}
    p = check_infer_request(image, session_id, params, uploads, list(instance.config.labels), instance.datastore())
    if output == "dicom_seg":
        raise InvalidRequest("output=dicom_seg is not supported by this app (MONAI Label converts with dcmqi's "
                             "itkimage2segimage, which is not installed); use output=image, json or all")
    request: Dict[str, Any] = {"model": model, "image": image}
    uploaded_label = None
    if file:
        request["image"] = _save_upload(file, saved)
    if label:
        uploaded_label = request["label"] = _save_upload(label, saved)
    # MONAI Label's route also merges instance.info()["config"]["infer"] here: MONAILabelApp.info() has no
    # "config", so that built the whole app info (datastore status included) on every click for nothing.
    request.update(p)
    if session_id:
        session = instance.sessions().get_session(session_id)
        if session:
            request["image"] = session.image
            request["session"] = session.to_json()
    # Set after the client's params, which cannot override them.
    request[UPLOADED_IMAGE] = bool(file) or bool(session_id)
    request[UPLOADED_LABEL] = uploaded_label
    request[CLIENT_FALLBACK] = caller

    logger.info("Infer request: %s", {k: v for k, v in request.items() if k != "session"})
    try:
        result = instance.infer(request)
    except MONAILabelException as err:
        if isinstance(err, HTTPException):
            raise
        raise InvalidRequest(err.msg) from err
    if result is None:
        raise HTTPException(status_code=500, detail="Failed to execute infer")
    return send_result(instance.datastore(), result, output, background_tasks)


def build_router() -> APIRouter:
    """The replacement routes (see the module docstring)."""
    router = APIRouter()
    role_user = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
    role_admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
    role_annotator = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))

    @router.post("/infer/{model}", tags=["Infer"], summary="Run Inference for supported model")
    async def api_run_inference(http: Request, background_tasks: BackgroundTasks, model: str, image: str = "",
                                session_id: str = "", params: str = Form("{}"), file: UploadFile = File(None),
                                label: UploadFile = File(None), output: Optional[ResultType] = None,
                                user: User = role_user):
        output_name = output.value if output is not None else None
        return await run_in_threadpool(run_inference, background_tasks, model, image, session_id, params, file,
                                       label, output_name, _caller(http, user))

    @router.post("/train/", tags=["Train"], include_in_schema=False, deprecated=True)
    async def api_train_all(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = role_admin):
        for name in _app()._trainers:
            if params and params.get(name) is not None and not isinstance(params.get(name), dict):
                raise InvalidRequest(f"params[{name!r}] must be an object of training options")
        return await run_in_threadpool(train.run, params, run_sync)

    @router.post("/train/{model}", tags=["Train"], summary="Run Training Task for specific model")
    async def api_train(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                        enqueue: Optional[bool] = False, user: User = role_admin):
        return await run_in_threadpool(train.run_model, model, params, run_sync, enqueue)

    @router.post("/scoring/", tags=["Scoring"], include_in_schema=False, deprecated=True)
    async def api_scoring_all(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                              user: User = role_annotator):
        for name in _app()._scoring_methods:
            if params and params.get(name) is not None and not isinstance(params.get(name), dict):
                raise InvalidRequest(f"params[{name!r}] must be an object of scoring options")
        return await run_in_threadpool(scoring.run, params, run_sync)

    @router.post("/scoring/{method}", tags=["Scoring"], summary="Run Scoring Task for specific method")
    async def api_scoring(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                          user: User = role_annotator):
        return await run_in_threadpool(scoring.run_method, method, params, run_sync)

    @router.post("/activelearning/{strategy}", tags=["ActiveLearning"],
                 summary="Run Active Learning strategy to get next sample")
    async def api_sample(strategy: str, params: Optional[dict] = None, user: User = role_user):
        return await run_in_threadpool(activelearning.sample, strategy, params, user.username)

    return router


def _remove_routes(router: Any, replaced: set, prefix: str) -> int:
    """Remove the ``APIRoute``s of ``router`` (and of the routers included in it) listed in ``replaced``."""
    from fastapi.routing import APIRoute

    removed = 0
    kept = []
    for route in router.routes:
        nested = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers whole
        if nested is not None:
            removed += _remove_routes(nested, replaced, settings.MONAI_LABEL_API_STR)
        elif isinstance(route, APIRoute) and any((m, prefix + route.path) in replaced for m in route.methods):
            removed += 1
            continue
        kept.append(route)
    router.routes[:] = kept
    if hasattr(router, "_mark_routes_changed"):
        router._mark_routes_changed()
    return removed


def install_task_routes(fastapi_app: Optional[Any] = None) -> int:
    """Replace MONAI Label's routes listed in :data:`REPLACED` with :func:`build_router`'s; returns how many of
    MONAI Label's were removed. The new routes also go first, so they answer even where one was not found."""
    if fastapi_app is None:
        from monailabel.app import app as fastapi_app
    prefix = settings.MONAI_LABEL_API_STR
    replaced = {(method, prefix + path) for method, path in REPLACED}
    removed = _remove_routes(fastapi_app.router, replaced, "")
    before = len(fastapi_app.router.routes)
    fastapi_app.include_router(build_router(), prefix=prefix)
    fastapi_app.include_router(datastore_routes.build_router(), prefix=prefix)
    added = fastapi_app.router.routes[before:]
    fastapi_app.router.routes[:] = added + fastapi_app.router.routes[:before]
    if hasattr(fastapi_app.router, "_mark_routes_changed"):
        fastapi_app.router._mark_routes_changed()
    fastapi_app.openapi_schema = None
    logger.info("Task routes: %d of MONAI Label's %d replaced (work off the event loop, names and params checked)",
                removed, len(REPLACED))
    return removed
