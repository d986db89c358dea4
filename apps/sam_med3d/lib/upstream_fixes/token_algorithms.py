"""A valid Keycloak token is accepted: PyJWT is told which signature algorithms to accept.

What MONAI Label 0.8.5 does: ``monailabel.endpoints.user.auth.from_token`` calls ``jwt.decode(token, key,
options=...)`` without ``algorithms``. PyJWT 2 refuses every token decoded that way ("It is required that you
pass in a value for the 'algorithms' argument"), so with ``MONAI_LABEL_AUTH_ENABLE=true`` every request with a
valid token is answered 401: auth locks everyone out.

Why we change it: auth has to work for the server to be exposed safely. The realm's key
(``MONAI_LABEL_AUTH_REALM_URI``, its ``public_key``) is an RSA key, so only RSA signatures are accepted
(:data:`ALGORITHMS`); ``none`` and HMAC (which would take the public key as a shared secret) never are.

How: the ``jwt`` name inside MONAI Label's auth module is replaced by a view of PyJWT whose ``decode`` passes
``algorithms`` when the caller gave none; the rest of ``from_token`` (claims, roles, expiry check) is MONAI
Label's.

What would let us delete it: MONAI Label passing ``algorithms`` to ``jwt.decode``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import jwt

logger = logging.getLogger(__name__)

#: Signature algorithms of a Keycloak realm's RSA key.
ALGORITHMS = ("RS256", "RS384", "RS512")


class _PyJWTWithAlgorithms:
    """PyJWT, except that ``decode`` defaults ``algorithms`` to :data:`ALGORITHMS`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jwt, name)

    @staticmethod
    def decode(token: str, key: Any = "", algorithms: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        return jwt.decode(token, key, algorithms=list(algorithms or ALGORITHMS), **kwargs)


def install_token_algorithms() -> None:
    from monailabel.endpoints.user import auth

    if not isinstance(auth.jwt, _PyJWTWithAlgorithms):
        auth.jwt = _PyJWTWithAlgorithms()
    logger.info("Auth tokens: signatures checked with %s", ", ".join(ALGORITHMS))
