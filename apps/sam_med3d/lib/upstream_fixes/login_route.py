"""``POST /auth/token`` with a wrong password answers 401, and 503 when the realm cannot be reached.

What MONAI Label 0.8.5 does: forwards the user name and password to the realm's token endpoint and calls
``raise_for_status()`` on the answer, so a wrong password (the realm's 401) or an unreachable realm raises
inside the handler: 500.

Why we change it: no input may produce a 500, and a user who mistyped the password should be told so.

How: installed only when auth is enabled (MONAI Label adds its login routes only then), a route in front of
MONAI Label's sends the same request (``grant_type=password`` for ``MONAI_LABEL_AUTH_CLIENT_ID``) and answers
the realm's token, 401 when the realm refuses the credentials, 503 when it cannot be reached or answers
otherwise.

What would let us delete it: MONAI Label mapping the realm's answer to HTTP errors itself.
"""

from __future__ import annotations

import logging

import requests
from fastapi import APIRouter, Depends, HTTPException
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.config import settings
from starlette.concurrency import run_in_threadpool

from lib.upstream_fixes._routes import put_first

logger = logging.getLogger(__name__)

TIMEOUT_S = 30


def fetch_token(username: str, password: str) -> dict:
    from monailabel.endpoints.user.auth import token_uri

    try:
        response = requests.post(token_uri(), timeout=TIMEOUT_S,
                                 data={"client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": username,
                                       "password": password, "grant_type": "password"})
    except (requests.RequestException, ValueError) as err:  # ValueError: the realm's configuration is not JSON
        logger.error("Login: the realm could not be reached: %s", err)
        raise HTTPException(status_code=503, detail="the authentication realm cannot be reached") from None
    if response.status_code in (400, 401, 403):
        raise HTTPException(status_code=401, detail="wrong user name or password",
                            headers={"WWW-Authenticate": "Bearer"})
    if response.status_code != 200:
        raise HTTPException(status_code=503, detail=f"the authentication realm answered {response.status_code}")
    return response.json()


def install_login_route() -> bool:
    """Install the route when auth is enabled; returns whether it was installed."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return False
    router = APIRouter()

    @router.post("/auth/token", include_in_schema=False)
    async def access_token(form_data: OAuth2PasswordRequestForm = Depends()):
        return await run_in_threadpool(fetch_token, form_data.username, form_data.password)

    put_first(router)
    return True
