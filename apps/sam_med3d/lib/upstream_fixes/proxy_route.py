"""``/proxy/dicom/...`` on a server whose studies are a local folder answers 404 instead of a 500.

What MONAI Label 0.8.5 does: forwards the request to ``<studies>/<path>`` with ``requests``; when the studies
are a local folder, that is no URL and ``requests`` raises ``MissingSchema``: 500.

Why we change it: no input may produce a 500; there is nothing to proxy without a DICOMweb server.

How: installed only when the studies are a folder, a route in front of MONAI Label's answers every
``/proxy/...`` request with 404 naming the reason. With a DICOMweb server, MONAI Label's proxy is unchanged.

What would let us delete it: MONAI Label registering the proxy only for DICOMweb studies.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User

from lib.upstream_fixes._routes import put_first


def install_proxy_refusal(studies: str) -> bool:
    """Install the refusal when ``studies`` is not a DICOMweb URL; returns whether it was installed."""
    if studies.startswith(("http://", "https://")):
        return False
    router = APIRouter()

    @router.api_route("/proxy/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def no_dicomweb(path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        raise HTTPException(status_code=404, detail="this server's studies are a local folder: there is no DICOMweb "
                                                    "server to proxy to")

    put_first(router)
    return True
