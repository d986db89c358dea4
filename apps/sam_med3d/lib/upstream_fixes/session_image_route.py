"""``GET /session/<id>?image=true`` of a session made of several files answers 409 instead of a 500.

What MONAI Label 0.8.5 does: a session created from several uploaded files (a DICOM series) keeps them in a
folder, and ``image=true`` hands that folder to ``FileResponse``, which raises ("is not a file"): 500.

Why we change it: no input may produce a 500.

How: a route in front of MONAI Label's answers 409 naming the reason for such a session, and otherwise calls
MONAI Label's own ``get_session``.

What would let us delete it: MONAI Label sending a folder session as an archive, or refusing it itself.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints import session as session_endpoints
from monailabel.endpoints.user.auth import RBAC, User

from lib.upstream_fixes._routes import put_first


def get_session(session_id: str, update_ts: bool, image: bool):
    from monailabel.interfaces.utils.app import app_instance

    sessions = app_instance().sessions()
    info = sessions.get_session(session_id, update_ts=update_ts) if sessions is not None and image else None
    if info is not None and os.path.isdir(info.image):
        count = len(os.listdir(info.image))
        raise HTTPException(status_code=409, detail=f"session {session_id!r} holds {count} files (a series), which "
                                                    "cannot be sent as one image; ask without image=true for its info")
    return session_endpoints.get_session(session_id, update_ts, image)


def install_session_image_route() -> None:
    router = APIRouter()

    @router.get("/session/{session_id}", include_in_schema=False)
    async def api_get_session(session_id: str, update_ts: bool = False, image: bool = False,
                              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        return get_session(session_id, update_ts, image)

    put_first(router)
