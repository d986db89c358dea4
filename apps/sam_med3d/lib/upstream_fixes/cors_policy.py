"""Which web pages may read the server's answers (CORS), owned by the app instead of MONAI Label's default.

MONAI Label 0.8.5 answers cross-origin requests from **any** origin, with credentials, unless
``MONAI_LABEL_CORS_ORIGINS`` is set, and setting it crashes its launcher (``start_server`` serialises its
settings with ``json.dumps``, which fails on pydantic URLs). So the app sets the policy itself, from
``--conf cors_origins``: by default no other origin is allowed. The viewers are unaffected: OHIF is served by
this server (``/ohif/``, same origin, no CORS involved) and 3D Slicer is not a browser.

The policy is applied to MONAI Label's FastAPI application when the app starts in the server process
(``install_cors_policy``), before it serves the first request.

What would let us delete it: MONAI Label allowing no origin by default and a launcher that accepts
``MONAI_LABEL_CORS_ORIGINS``.
"""

from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger(__name__)


def install_cors_policy(origins: Sequence[str]) -> None:
    """Allow exactly ``origins`` (e.g. ``["https://viewer.example.org"]``; empty: none) to read responses."""
    from fastapi.middleware.cors import CORSMiddleware
    from monailabel.app import app as fastapi_app

    origins = [str(o) for o in origins]
    replaced = False
    for index, middleware in enumerate(fastapi_app.user_middleware):
        if getattr(middleware, "cls", None) is CORSMiddleware:
            options = dict(getattr(middleware, "kwargs", {}) or {})
            options.update(allow_origins=origins, allow_credentials=bool(origins))
            fastapi_app.user_middleware[index] = type(middleware)(CORSMiddleware, **options)
            replaced = True
    if not replaced:
        fastapi_app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=bool(origins),
                                   allow_methods=["*"], allow_headers=["*"])
    # Starlette builds its middleware stack on the first call (the startup event); rebuild it for the next one.
    fastapi_app.middleware_stack = None
    logger.info("CORS: %s", f"pages from {', '.join(origins)} may call the API" if origins
                else "no other web origin may call the API (--conf cors_origins to allow some)")
