"""Per-image click sessions kept between requests: bounded in number and dropped after a time without clicks.

A session holds what makes a follow-up click cheap and consistent: the loaded scan, the predictor (which
caches the image embedding of its crop and each label's clicks and previous low-res mask) and the merged
label map shown to the annotator.

Sessions are keyed by the image file's real path plus its size and modification time, so re-uploading an
image under the same id starts a fresh session.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import numpy as np

SessionKey = Tuple[str, int, int]


def session_key(image_path: str) -> SessionKey:
    """``(real path, size in bytes, mtime in ns)`` of ``image_path`` (a file or a DICOM folder)."""
    real = os.path.realpath(image_path)
    stat = os.stat(real)
    return real, int(stat.st_size), int(stat.st_mtime_ns)


@dataclass
class ImageSession:
    """State of one image between clicks.

    Attributes:
        scan: the loaded ``sam_med3d.io.Scan`` (array ``(I, J, K)`` as stored, RAS affine).
        predictor: the ``Sam3DPredictor`` with this image set.
        label_map: ``(I, J, K)`` uint8 merged label map (values from the app's labels, 0 = background).
        last_used: ``time.monotonic()`` of the last request that used this session.
    """

    scan: Any
    predictor: Any
    label_map: np.ndarray
    last_used: float = 0.0


class SessionCache:
    """An LRU map of :class:`ImageSession` with at most ``max_items`` entries, each dropped ``ttl_s`` seconds
    after its last use. Thread-safe; eviction happens on every access (no background thread)."""

    def __init__(self, max_items: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_items = int(max_items)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._items: "OrderedDict[SessionKey, ImageSession]" = OrderedDict()
        self._lock = threading.Lock()

    def _evict_expired(self, now: float) -> None:
        for key in [k for k, s in self._items.items() if now - s.last_used > self.ttl_s]:
            del self._items[key]

    def get(self, key: SessionKey) -> Optional[ImageSession]:
        """The live session for ``key`` (marked as used now), or None."""
        with self._lock:
            now = self._clock()
            self._evict_expired(now)
            session = self._items.get(key)
            if session is not None:
                session.last_used = now
                self._items.move_to_end(key)
            return session

    def put(self, key: SessionKey, session: ImageSession) -> None:
        """Store ``session`` under ``key``, evicting the least recently used beyond ``max_items``."""
        with self._lock:
            now = self._clock()
            session.last_used = now
            self._items[key] = session
            self._items.move_to_end(key)
            self._evict_expired(now)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every session (e.g. when new weights make the cached embeddings stale)."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
