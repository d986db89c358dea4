"""``POST /reload`` is refused.

What MONAI Label 0.8.5 does: ``POST /reload`` clears the app cache, so the next request builds a new app
(new datastore, file watcher, sessions, infer tasks) while the old one's threads keep running: four more
threads per call, and every annotator's unsaved session work is dropped. It has no authentication dependency
at all, so with auth enabled it still answered anyone.

Why we change it: a request anyone can send must not drop other people's work or grow the server without
bound, and restarting the server does the same thing cleanly.

How: a route in front of MONAI Label's answers 403 naming the alternative (restart the server).

What would let us delete it: MONAI Label's reload disposing of the old app (threads, watchers) and requiring
the admin role.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException

from lib.upstream_fixes._routes import put_first

logger = logging.getLogger(__name__)


def install_reload_refusal() -> None:
    router = APIRouter()

    @router.post("/reload", include_in_schema=False)
    async def refuse_reload():
        raise HTTPException(status_code=403, detail="POST /reload is disabled on this server: it would drop every "
                                                    "annotator's unsaved work; restart the server to load new code")

    put_first(router, prefix="")  # MONAI Label declares /reload on the app itself, without the API prefix
    logger.info("POST /reload: refused (restart the server instead)")
