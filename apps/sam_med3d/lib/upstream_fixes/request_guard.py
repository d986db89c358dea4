"""Refuse hostile request fields before MONAI Label's endpoint code turns them into paths.

MONAI Label 0.8.5's endpoints hand query parameters, form fields and JSON bodies to code that joins them into
file paths, runs subprocesses with them or reads whatever they name (``docs/reliability.md``, section *Files,
paths and uploads*, lists each hole). The app's datastore (:mod:`lib.datastore.local`) is safe on its own;
this ASGI middleware closes the holes that are in MONAI Label's endpoints and tasks, and answers every
refusal with a 4xx JSON ``{"detail": "<field>: <problem>"}`` (the body FastAPI gives an ``HTTPException``):

- every ``image`` / ``id`` / ``label`` / ``tag`` / ``label_tag`` / ``session_id`` query parameter must be a
  plain name (:func:`~lib.validation.check_name`);
- ``POST /infer/<model>`` is not looked at here: the app's own route (:mod:`.task_routes`) checks its model,
  query and form once, with :func:`lib.validation.check_infer_request`;
- ``POST /infer/wsi*``: refused (the app has no whole-slide models);
- ``POST /train``, ``/scoring``, ``/activelearning``, ``/batch/infer``: the task must exist; no
  ``bundle_path`` anywhere in the body (MONAI Label appends it to the subprocess' ``PYTHONPATH``), the run
  ``name`` is a plain name (MONAI Label makes it a folder under ``model_dir``), ``tracking_uri`` is empty or an
  http(s) URL (a ``file:`` URI or a path would make MLflow write there), tags are plain names;
- ``PUT /session/``: no ``uncompress`` (MONAI Label unpacks archives with ``shutil.unpack_archive``, which
  follows ``../`` members), plain upload names; ``/session/<id>`` ids are plain names;
- ``PUT`` / ``DELETE /model/<model>``: refused (uploads would replace or rename the served weights);
- ``PUT /datastore/image`` and ``/datastore/label``: upload names are plain names with a known extension
  and ``params`` is a JSON object;
- ``/ohif/`` and ``/proxy/`` paths with ``..`` segments are refused.

Request bodies that must be looked at are spooled to a temporary file (memory stays bounded) and replayed
to MONAI Label unchanged. Install it once, in the server process (``install_request_guard``).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from typing import Any, Awaitable, Callable, Iterable, Optional

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse

from lib.validation import (IMAGE_EXTENSIONS, LABEL_UPLOAD_EXTENSIONS, PYTHON_PATH_FIELDS, check_datastore_image,
                            check_name, check_task_name, check_upload_name, parse_json_object, upload_basename)
from lib.errors import InvalidRequest

logger = logging.getLogger(__name__)

#: Query parameters that name a datastore image, label, tag or session.
NAME_QUERY_FIELDS = ("image", "id", "label", "tag", "label_tag", "session_id")

#: Largest JSON body the guard reads for task requests (train, scoring, active learning, batch infer).
MAX_JSON_BODY = 1 << 20

#: Session uploads may also be DICOM files (``.dcm`` or no extension).
SESSION_EXTENSIONS = IMAGE_EXTENSIONS + (".dcm",)

_SPOOL_MEMORY = 8 << 20

Receive = Callable[[], Awaitable[dict]]


def _app() -> Any:
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _known_task(kind: str, name: str, what: str) -> None:
    """``kind``: the app's ``infers``, ``trainers``, ``strategies`` or ``scoring_methods``."""
    check_task_name(dict(getattr(_app(), f"_{kind}", {}) or {}), name, what)


def _check_query_names(query: QueryParams) -> None:
    for key in NAME_QUERY_FIELDS:
        for value in query.getlist(key):
            if value != "":
                check_name(value, f"query parameter {key!r}")


def _walk_task_body(value: Any, where: str, train: bool, depth: int = 0) -> None:
    """Refuse fields of a task request body that reach paths or the Python path (see the module docstring)."""
    if depth > 32:
        raise InvalidRequest(f"{where}: the request body is nested too deeply")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _walk_task_body(item, f"{where}[{index}]", train, depth + 1)
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        field = f"{where}.{key}"
        lowered = str(key).lower()
        if lowered in PYTHON_PATH_FIELDS:
            raise InvalidRequest(f"{field} is not accepted: it would put a folder on the Python path of the "
                                 "server's subprocesses")
        if key in ("tag", "label_tag") and item not in (None, ""):
            check_name(item, field, max_length=64)
        if key == "image" and isinstance(item, str) and item:
            check_datastore_image(item, field, _app().datastore())
        if train and key == "name":
            check_name(item, f"{field} (the training run name)", max_length=64)
        if key == "tracking_uri" and item not in (None, ""):
            if not isinstance(item, str) or not re.match(r"^https?://[^\s/]+", item):
                raise InvalidRequest(f"{field} must be empty or an http(s) URL of an MLflow server; file paths "
                                     "and file: URIs are not accepted")
        _walk_task_body(item, field, train, depth + 1)


class _Spool:
    """A request body kept in a temporary file (in memory up to 8 MiB) and replayed to the next app."""

    def __init__(self):
        self.file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)
        self.size = 0

    async def fill(self, receive: Receive, limit: Optional[int] = None) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionAbortedError("the client disconnected")
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if limit is not None and self.size > limit:
                raise InvalidRequest(f"the request body is larger than {limit} bytes", status_code=413)
            self.file.write(chunk)
            if not message.get("more_body", False):
                break

    async def chunks(self):
        self.file.seek(0)
        while True:
            chunk = self.file.read(1 << 20)
            if not chunk:
                return
            yield chunk

    def replay(self, receive: Receive) -> Receive:
        """A ``receive`` that yields the spooled body, then hands over to the original ``receive``."""
        self.file.seek(0)
        done = False

        async def replayed() -> dict:
            nonlocal done
            if done:
                return await receive()
            chunk = self.file.read(1 << 20)
            more = self.file.tell() < self.size
            if not more:
                done = True
            return {"type": "http.request", "body": chunk, "more_body": more}

        return replayed

    def close(self) -> None:
        self.file.close()


async def _form(scope: dict, spool: _Spool):
    """The spooled body parsed as a form (multipart or urlencoded)."""
    iterator = spool.chunks()

    async def receive() -> dict:
        try:
            chunk = await iterator.__anext__()
            return {"type": "http.request", "body": chunk, "more_body": True}
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}

    request = Request(scope, receive)
    try:
        return await request.form(max_files=10000, max_fields=1000)
    except Exception as err:  # malformed multipart bodies raise several types
        too_large = "maximum size" in str(err)  # Starlette's limit of a form field (1 MiB)
        raise InvalidRequest(f"the request's form data could not be read ({err})",
                             status_code=413 if too_large else 422) from None


def _uploads(form, field_names: Iterable[str]):
    for name in field_names:
        for value in form.getlist(name):
            if not isinstance(value, str):
                yield name, value


def _check_upload_names(form, fields: Iterable[str], extensions=IMAGE_EXTENSIONS) -> None:
    for name, upload in _uploads(form, fields):
        if upload.filename is not None and upload.filename != "":
            check_upload_name(upload.filename, f"the file name of form field {name!r}", extensions)


def _segments(path: str):
    return [part for part in path.split("/") if part]


class RequestGuard:
    """ASGI middleware applying the checks of the module docstring; everything else passes unchanged."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Receive, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        spools: list = []
        try:
            try:
                await self._check(scope, receive, spools)
            except InvalidRequest as err:
                logger.warning("Refused %s %s: %s", scope.get("method"), scope.get("path"), err.detail)
                await JSONResponse({"detail": err.detail}, status_code=err.status_code)(scope, receive, send)
                return
            except ConnectionAbortedError:
                return
            await self.app(scope, spools[0].replay(receive) if spools else receive, send)
        finally:
            for spool in spools:
                spool.close()

    async def _check(self, scope: dict, receive: Receive, spools: list) -> None:
        """Raise :class:`InvalidRequest` for a hostile request; a body it read is appended to ``spools``."""
        method = scope["method"].upper()
        path = scope.get("path", "")
        parts = _segments(path)
        query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        if not parts:
            return
        top = parts[0]
        if top in ("ohif", "proxy") and any(p in ("..", ".") or "\\" in p for p in parts):
            raise InvalidRequest(f"the path {path[:120]!r} must not contain '..' segments", status_code=400)
        own_infer_route = top == "infer" and method == "POST" and len(parts) == 2 and parts[1] not in ("wsi", "wsi_v2")
        if not own_infer_route:
            _check_query_names(query)

        if top == "model" and method in ("PUT", "DELETE"):
            raise InvalidRequest("model files cannot be uploaded, replaced or deleted through the API on this "
                                 "server; put weights into the app's model_dir or pass --conf checkpoint",
                                 status_code=403)
        if top == "session":
            if len(parts) > 1:
                check_name(parts[1], "session id")
            if method == "PUT":
                if query.get("uncompress", "").lower() in ("1", "true", "yes", "on"):
                    raise InvalidRequest("uncompress=true is not accepted: archives are not unpacked on this server; "
                                         "upload the files themselves (several 'files' fields for a DICOM series)")
                form = await self._read_form(scope, receive, spools)
                try:
                    for _, upload in _uploads(form, ["files"]):
                        if upload.filename:
                            name = upload_basename(upload.filename, "the file name of a session upload")
                            if "." in name and not name.lower().endswith(SESSION_EXTENSIONS):
                                raise InvalidRequest(f"the session upload {name!r} has an extension this app "
                                                     f"does not read; use one of {', '.join(SESSION_EXTENSIONS)}")
                finally:
                    await form.close()
            return
        if top == "infer" and method == "POST":
            if len(parts) >= 2 and parts[1] in ("wsi", "wsi_v2"):
                raise InvalidRequest("this server has no whole-slide (WSI) models", status_code=404)
            # POST /infer/<model> is the app's own route (task_routes), which checks the model, the query and the
            # form it parses, once (lib.validation.check_infer_request).
            return
        if top == "datastore" and method == "PUT":
            form = await self._read_form(scope, receive, spools)
            try:
                _check_upload_names(form, ["file"])
                _check_upload_names(form, ["label"], LABEL_UPLOAD_EXTENSIONS)
                for field in ("params", "info"):
                    if field in form:
                        blank_is_500 = field == "info" or parts[1:2] == ["updatelabelinfo"]
                        if blank_is_500 and not str(form.get(field)).strip():
                            # MONAI Label passes the info field to json.loads unchecked: a blank one was a 500
                            raise InvalidRequest(f"form field {field!r} is empty; send a JSON object such as "
                                                 "{\"comment\": \"...\"}")
                        parse_json_object(form.get(field), f"form field {field!r}")
            finally:
                await form.close()
            return
        task_kinds = {"train": "trainers", "scoring": "scoring_methods", "activelearning": "strategies",
                      "batch": "infers"}
        if top in task_kinds and method == "POST":
            names = parts[2:3] if top == "batch" else parts[1:2]
            what = {"train": "trainer", "scoring": "scoring method", "activelearning": "strategy",
                    "batch": "model"}[top]
            if names:
                _known_task(task_kinds[top], names[0], what)
            spool = _Spool()
            spools.append(spool)
            await spool.fill(receive, limit=MAX_JSON_BODY)
            try:
                spool.file.seek(0)
                body = json.loads(spool.file.read() or b"null")
            except ValueError:
                body = None  # FastAPI answers 422 for a body that is not JSON
            except RecursionError:
                raise InvalidRequest("the request body is not usable JSON: nested too deeply") from None
            _walk_task_body(body, "body", train=top == "train")

    async def _read_form(self, scope: dict, receive: Receive, spools: list):
        spool = _Spool()
        spools.append(spool)
        await spool.fill(receive)
        return await _form(scope, spool)


def install_request_guard() -> None:
    """Put :class:`RequestGuard` in front of MONAI Label's routes (idempotent; rebuilds the middleware stack)."""
    from monailabel.app import app as fastapi_app
    from starlette.middleware import Middleware

    if not any(getattr(m, "cls", None) is RequestGuard for m in fastapi_app.user_middleware):
        # Innermost (after CORS): refusals still carry the CORS headers of an allowed origin.
        fastapi_app.user_middleware.append(Middleware(RequestGuard))
    fastapi_app.middleware_stack = None
    logger.info("Request guard: names, uploads and task fields are checked before MONAI Label's endpoints")
