"""The app's error for bad client input: a MONAI Label error that the server answers with HTTP 422.

MONAI Label 0.8.5 installs no exception handler for ``MONAILabelException``, so raising one from a task
ends as a bare "500 Internal Server Error". FastAPI, however, turns any ``HTTPException`` into a JSON
response ``{"detail": "<message>"}`` with its status code. ``InvalidRequest`` is both: code that handles
MONAI Label errors sees ``error == INVALID_INPUT`` and ``msg``, and the viewer gets a 4xx naming the problem
while the server keeps serving.
"""

from __future__ import annotations

from fastapi import HTTPException
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

#: "Unprocessable Content": the request arrived intact but its clicks/labels/image cannot be used.
STATUS_INVALID = 422


class InvalidRequest(MONAILabelException, HTTPException):
    """A request the app cannot serve because of its content (unknown label, bad clicks, unreadable image)."""

    def __init__(self, message: str, status_code: int = STATUS_INVALID):
        MONAILabelException.__init__(self, MONAILabelError.INVALID_INPUT, message)
        HTTPException.__init__(self, status_code=status_code, detail=message)

    def __str__(self) -> str:
        return self.msg
