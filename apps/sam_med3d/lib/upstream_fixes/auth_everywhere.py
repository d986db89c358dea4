"""With auth enabled, every request needs a valid token, and it is checked before anything else.

What MONAI Label 0.8.5 does: authentication is a FastAPI dependency (``RBAC``) on most routes, but not on
``POST /reload`` (which re-creates the app and drops every annotator's unsaved work), and the app's request
guard (:mod:`lib.upstream_fixes.request_guard`, middleware) and replaced routes answer before any dependency runs: an
unauthenticated caller learned which image ids and upload names exist (422 "not found in the datastore")
instead of getting 401. A token without the roles claim made ``from_token`` raise ``AttributeError``: 500.

Why we change it: "auth enabled" must mean that nothing is answered, and nothing is learned, without a
valid token.

How: :class:`RequireToken`, ASGI middleware placed in front of the request guard, checks the
``Authorization: Bearer <token>`` header of every request with MONAI Label's own ``from_token`` (signature
with the realm's public key, expiry, user and roles claims) and answers 401 (``WWW-Authenticate: Bearer``)
when it is missing or invalid, 503 when the realm's key cannot be fetched. Only what a client needs to log
in is open: ``GET /auth/`` (is auth on, which realm), ``POST /auth/token`` (password login, forwarded to the
realm), and ``/favicon.ico``. Roles are still checked by MONAI Label's ``RBAC`` on each route. With auth off
(the default) it passes everything through.

What would let us delete it: MONAI Label authenticating every route (``/reload`` included) before the app's
middleware, or offering an app-level dependency for it.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)

#: ``(method, path)`` answered without a token (paths below MONAI Label's API prefix).
OPEN = {("GET", "/auth"), ("GET", "/auth/"), ("POST", "/auth/token"), ("GET", "/favicon.ico")}


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


class RequireToken:
    """ASGI middleware: 401 for any request without a valid bearer token while auth is enabled."""

    def __init__(self, app: Callable[..., Awaitable[Any]]):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        from monailabel.config import settings

        if scope["type"] != "http" or not settings.MONAI_LABEL_AUTH_ENABLE:
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        prefix = settings.MONAI_LABEL_API_STR.rstrip("/")
        relative = path[len(prefix):] if prefix and path.startswith(prefix) else path
        if method == "OPTIONS" or (("GET" if method == "HEAD" else method), relative) in OPEN:
            await self.app(scope, receive, send)
            return
        problem, status = await self._check(_header(scope, b"authorization"))
        if problem:
            logger.warning("Refused %s %s: %s", method, path[:200], problem)
            response = JSONResponse({"detail": problem}, status_code=status,
                                    headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _check(authorization: str):
        """``(None, 200)`` for a valid token, else ``(message, status)``."""
        import requests
        from jwt import InvalidTokenError
        from monailabel.endpoints.user import auth

        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Not authenticated: send 'Authorization: Bearer <access token>' (POST /auth/token gives one)", 401
        try:
            user = await run_in_threadpool(auth.from_token, token.strip())
        except requests.RequestException as err:
            logger.error("Auth: the realm's public key could not be fetched: %s", err)
            return "the authentication realm cannot be reached; try again later", 503
        except (InvalidTokenError, ValueError, TypeError, AttributeError, KeyError) as err:
            return f"Could not validate credentials ({type(err).__name__})", 401
        if not getattr(user, "username", None):
            return "Could not validate credentials (the token names no user)", 401
        return None, 200


def install_require_token(fastapi_app: Any = None) -> None:
    """Put :class:`RequireToken` in front of the request guard (or last, if the guard is not installed yet)."""
    from monailabel.config import settings
    from starlette.middleware import Middleware

    if fastapi_app is None:
        from monailabel.app import app as fastapi_app
    middleware = fastapi_app.user_middleware
    if not any(getattr(m, "cls", None) is RequireToken for m in middleware):
        from lib.upstream_fixes.request_guard import RequestGuard

        guard = [i for i, m in enumerate(middleware) if getattr(m, "cls", None) is RequestGuard]
        middleware.insert(guard[0] if guard else len(middleware), Middleware(RequireToken))
    fastapi_app.middleware_stack = None
    logger.info("Auth: %s", "every request needs a valid token (except login)" if settings.MONAI_LABEL_AUTH_ENABLE
                else "off (MONAI_LABEL_AUTH_ENABLE is not set): anyone who reaches the port is served")
