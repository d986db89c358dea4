"""Putting the app's handlers in front of MONAI Label's routes (Starlette answers with the first match)."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter


def put_first(router: APIRouter, fastapi_app: Optional[Any] = None, prefix: Optional[str] = None) -> None:
    """Include ``router`` (under ``prefix``, default MONAI Label's API prefix) before every route already there."""
    from monailabel.config import settings

    if fastapi_app is None:
        from monailabel.app import app as fastapi_app
    before = len(fastapi_app.router.routes)
    fastapi_app.include_router(router, prefix=settings.MONAI_LABEL_API_STR if prefix is None else prefix)
    added = fastapi_app.router.routes[before:]
    fastapi_app.router.routes[:] = added + fastapi_app.router.routes[:before]
    if hasattr(fastapi_app.router, "_mark_routes_changed"):
        fastapi_app.router._mark_routes_changed()
    fastapi_app.openapi_schema = None
