"""``GET /logs/gpu`` on a machine without ``nvidia-smi`` answers 404 with a message instead of a 500.

What MONAI Label 0.8.5 does: runs ``subprocess.run(["nvidia-smi"])``; where the program is not installed
(CPU servers, other GPUs) that raises ``FileNotFoundError``: 500.

Why we change it: no input may produce a 500, and the answer should say why there is nothing to show.

How: a route in front of MONAI Label's answers 404 "nvidia-smi is not installed" when the program is not on
``PATH``; otherwise its output, as MONAI Label does (admin role, as MONAI Label requires).

What would let us delete it: MONAI Label checking for ``nvidia-smi`` before running it.
"""

from __future__ import annotations

import shutil
import subprocess

from fastapi import APIRouter, Depends, HTTPException, Response
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from starlette.concurrency import run_in_threadpool

from lib.upstream_fixes._routes import put_first

TIMEOUT_S = 20


def gpu_info() -> Response:
    program = shutil.which("nvidia-smi")
    if program is None:
        raise HTTPException(status_code=404, detail="nvidia-smi is not installed on this server: no NVIDIA GPU "
                                                    "information to show")
    try:
        output = subprocess.run([program], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT_S).stdout
    except subprocess.TimeoutExpired:
        raise HTTPException(status_code=504, detail=f"nvidia-smi did not answer within {TIMEOUT_S} s") from None
    return Response(content=output.decode("utf-8", errors="replace"), media_type="text/plain")


def install_gpu_log_route() -> None:
    router = APIRouter()

    @router.get("/logs/gpu", include_in_schema=False)
    async def api_gpu_info(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        return await run_in_threadpool(gpu_info)

    put_first(router)
