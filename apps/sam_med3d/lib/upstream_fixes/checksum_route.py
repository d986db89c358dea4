"""``HEAD /datastore/image?image=<id>&check_sum=<algo:digest>``: a malformed checksum is a 422, a valid one works.

What MONAI Label 0.8.5 does: it splits ``check_sum`` at ``:``, strips the algorithm name from the digest with
``str.lstrip`` (which removes characters, not a prefix) and compares the bare digest with
``file_checksum``'s ``"<ALGO>:<hex>"``: the comparison never matches, so every check answers 404 "checksum
failed"; an algorithm other than SHA256, SHA512 or MD5 (``check_sum=foo:1``, ``check_sum=a:b:c``) raises
``ValueError``: 500.

Why we change it: a client that asks whether the server holds the same file as it does (3D Slicer's
``check_sum``) gets a true answer, and bad input is a 4xx, not a 500.

How: a route in front of MONAI Label's parses ``[<algo>:]<hex digest>`` (algorithm SHA256 by default; SHA256,
SHA512 or MD5, any case), answers 422 for anything else, 404 when the image is unknown or its checksum
differs, 200 when it matches.

What would let us delete it: MONAI Label comparing ``<algo>:<digest>`` with ``file_checksum`` and validating
the algorithm.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Tuple

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import file_checksum
from starlette.concurrency import run_in_threadpool

from lib.errors import InvalidRequest
from lib.upstream_fixes._routes import put_first

#: Hex digest length of each algorithm MONAI Label's ``file_checksum`` computes.
DIGEST_LENGTHS = {"SHA256": 64, "SHA512": 128, "MD5": 32}


def parse_check_sum(check_sum: str) -> Tuple[str, str]:
    """``(ALGO, lower-case hex digest)`` of ``[<algo>:]<hex>``; InvalidRequest naming the problem otherwise."""
    algo, _, digest = check_sum.rpartition(":")
    algo = (algo or "SHA256").upper()
    if algo not in DIGEST_LENGTHS:
        raise InvalidRequest(f"check_sum {check_sum[:80]!r}: unknown algorithm {algo[:20]!r}; use "
                             f"<algorithm>:<hex digest> with one of {', '.join(DIGEST_LENGTHS)}")
    if not re.fullmatch(r"[0-9a-fA-F]+", digest or "") or len(digest) != DIGEST_LENGTHS[algo]:
        raise InvalidRequest(f"check_sum {check_sum[:80]!r}: the {algo} digest must be {DIGEST_LENGTHS[algo]} hex "
                             "digits")
    return algo, digest.lower()


def check_image(image: str, check_sum: Optional[str]) -> dict:
    from monailabel.interfaces.utils.app import app_instance

    wanted = parse_check_sum(check_sum) if check_sum else None
    path = app_instance().datastore().get_image_uri(image)
    if not path or not os.path.isfile(path):
        raise HTTPException(status_code=404, detail=f"image {image[:80]!r} not found")
    if wanted is not None and file_checksum(path, algo=wanted[0]).split(":", 1)[1].lower() != wanted[1]:
        raise HTTPException(status_code=404, detail=f"image {image[:80]!r} has another {wanted[0]} checksum")
    return {}


def install_checksum_route() -> None:
    router = APIRouter()

    @router.head("/datastore/image", include_in_schema=False)
    async def api_check_image(image: str, check_sum: Optional[str] = None,
                              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        return await run_in_threadpool(check_image, image, check_sum)

    put_first(router)
