"""Per-image click sessions kept between requests: bounded in number and dropped after a time without clicks.

A session holds what makes a follow-up click cheap and consistent: the loaded scan, the predictor (which
caches the image embeddings of its crops and each label's clicks and previous low-res mask) and, **per
client** (annotator), the merged label map shown to that annotator.

Two annotators clicking the same image share the scan and the predictor's embedding cache (the encoder runs
once per crop for all of them), but never see each other's unsaved work: :meth:`ImageSession.for_client`
gives each client its own label map and a view of the predictor whose label keys carry the client id, so
click histories and previous masks are separate too. At most :data:`MAX_CLIENTS_PER_IMAGE` clients keep
their state per image (the least recently active is dropped beyond that).

Sessions are keyed by the image file's real path plus its size and modification time, so re-uploading an
image under the same id starts a fresh session.

Memory: besides the number of sessions, :class:`SessionCache` can bound their estimated memory
(:meth:`ImageSession.estimated_bytes`, from the voxel count: :data:`SESSION_BYTES_PER_VOXEL` per image plus
:data:`CLIENT_BYTES_PER_VOXEL` per client, as measured by ``benchmarks/session_memory.py``) and drops the
least recently used sessions beyond it.

New weights (:meth:`SessionCache.clear`) make every predictor and its embeddings stale, but not what the
annotators drew: the sessions are retired, keeping their scans and label maps only. A retired session still
answers a save of its client's map (:meth:`SessionCache.get_saved_work`), and the next click on its image makes a
fresh session (new weights, new embeddings) that takes those label maps over (:meth:`SessionCache.put`): masks
drawn before the update stay as they are; only clicks after it use the new weights.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Hashable, Optional, Set, Tuple

import numpy as np
from sam_med3d.io import file_identity

SessionKey = Tuple[str, int, int]

#: Most clients (annotators) whose label map and click states one image session keeps.
MAX_CLIENTS_PER_IMAGE = 16
#: Estimated memory of an image session per voxel of its scan (scan, preprocessed copies, embeddings), bytes.
#: ``benchmarks/session_memory.py`` measured 166-404 MB for the 512x512x32 spleen CT (8.4 M voxels, vit_b_ori).
SESSION_BYTES_PER_VOXEL = 24
#: Estimated memory per client of a session per voxel (label map, click states and masks): 77-86 MB measured.
CLIENT_BYTES_PER_VOXEL = 10


def session_key(image_path: str) -> SessionKey:
    """:func:`sam_med3d.io.file_identity` of ``image_path`` (a file or a DICOM folder): a replaced scan is a new
    session."""
    return file_identity(image_path)


class ClientPredictor:
    """The image's shared predictor as one client sees it: every ``label_key`` is prefixed with the client id.

    Embeddings stay shared (they depend on the crop only); clicks and previous masks are the client's own.
    """

    def __init__(self, predictor: Any, client: str, used_keys: Set[Hashable],
                 route: Optional[Callable[[Hashable], Any]] = None):
        self._predictor = predictor
        self._client = client
        self._used_keys = used_keys
        self._route = route  # label name -> the predictor whose weights answer it (None: always ``predictor``)

    def predict(self, points: Any, labels: Any, label_key: Hashable = "default", **kwargs: Any) -> Any:
        key = (self._client, label_key)
        self._used_keys.add(key)
        predictor = self._predictor if self._route is None else self._route(label_key)
        return predictor.predict(points, labels, label_key=key, **kwargs)

    def answers(self, label_key: Hashable) -> bool:
        """Whether ``label_key`` is answered by the session's main weights (False: by the base weights)."""
        return self._route is None or self._route(label_key) is self._predictor

    def __getattr__(self, name: str) -> Any:  # anything else (timings, image, ...) is the shared predictor's
        return getattr(self._predictor, name)


@dataclass
class ClientSession:
    """What one request works on: the shared scan, the client's view of the predictor and its label map.

    Attributes:
        scan: the image's ``sam_med3d.io.Scan`` (shared).
        predictor: a :class:`ClientPredictor`.
        label_map: this client's ``(I, J, K)`` uint8 label map (the same array the image session keeps).
        client: the client id.
        fresh: whether ``label_map`` was just created all zeros for this client (nothing to search or clear).
    """

    scan: Any
    predictor: Any
    label_map: np.ndarray
    client: str
    fresh: bool = False


@dataclass
class ImageSession:
    """State of one image between clicks.

    Attributes:
        scan: the loaded ``sam_med3d.io.Scan`` (array ``(I, J, K)`` as stored, RAS affine).
        predictor: the ``Sam3DPredictor`` with this image set, shared by every client of the image.
        label_map: (init only) the label map a client new to this image starts from; default all zeros.
        label_maps: ``{client id: (I, J, K) uint8 label map}`` (values from the app's labels, 0 = background),
            least recently used client first.
        last_used: ``time.monotonic()`` of the last request that used this session.
        answers: the label names ``predictor``'s weights answer (None: every label); the others are answered by
            ``base_model`` through a sibling of ``predictor`` (same scan, shared embeddings when the image
            encoders are one module), made on the first click of such a label.
        base_model: the weights for labels outside ``answers``.
    """

    scan: Any
    predictor: Any
    label_map: InitVar[Optional[np.ndarray]] = None
    label_maps: "OrderedDict[str, np.ndarray]" = field(default_factory=OrderedDict)
    last_used: float = 0.0
    answers: Optional[FrozenSet[str]] = None
    base_model: Any = None

    def __post_init__(self, label_map: Optional[np.ndarray]) -> None:
        if self.answers is not None and self.base_model is None:
            raise ValueError("an image session whose predictor answers only some labels needs the base model")
        self._initial = None if label_map is None else np.array(label_map, dtype=np.uint8, copy=True)
        self._client_keys: Dict[str, Set[Hashable]] = {}
        self._lock = threading.Lock()
        self._base_predictor: Any = None

    def predictor_for(self, label: Hashable) -> Any:
        """The predictor whose weights answer clicks on ``label`` (a label name)."""
        if self.answers is None or label in self.answers:
            return self.predictor
        with self._lock:
            if self._base_predictor is None:
                self._base_predictor = self.predictor.sibling(self.base_model)
            return self._base_predictor

    def _empty(self) -> np.ndarray:
        if self._initial is not None:
            return self._initial.copy()
        # Fortran order (i fastest), as NRRD and NIfTI store voxels: written without reordering. np.zeros costs
        # nothing until pages are touched, and only the boxes a click writes are.
        return np.zeros(tuple(self.scan.shape), dtype=np.uint8, order="F")

    def for_client(self, client: str) -> ClientSession:
        """The :class:`ClientSession` of ``client`` (created empty on its first request)."""
        with self._lock:
            label_map = self.label_maps.get(client)
            fresh = label_map is None and self._initial is None
            if label_map is None:
                label_map = self.label_maps[client] = self._empty()
                while len(self.label_maps) > MAX_CLIENTS_PER_IMAGE:
                    self._drop_client(next(iter(self.label_maps)))
            self.label_maps.move_to_end(client)
            keys = self._client_keys.setdefault(client, set())
        route = None if self.answers is None else self.predictor_for
        return ClientSession(scan=self.scan, predictor=ClientPredictor(self.predictor, client, keys, route),
                             label_map=label_map, client=client, fresh=fresh)

    def estimated_bytes(self) -> int:
        """Estimated memory of this session (see the module docstring)."""
        voxels = int(np.prod(tuple(self.scan.shape)))
        return voxels * (SESSION_BYTES_PER_VOXEL + CLIENT_BYTES_PER_VOXEL * max(1, len(self.label_maps)))

    def has_client(self, client: str) -> bool:
        """Whether ``client`` has a label map in this session."""
        with self._lock:
            return client in self.label_maps

    def set_label_map(self, client: str, label_map: np.ndarray) -> None:
        """Keep ``label_map`` as ``client``'s map (after a request replaced it)."""
        with self._lock:
            self.label_maps[client] = label_map
            self.label_maps.move_to_end(client)

    def retire(self) -> None:
        """Keep the scan and the clients' label maps only (new weights: the predictors and embeddings are stale)."""
        with self._lock:
            self.predictor = None
            self._base_predictor = None
            self.base_model = None
            self._client_keys.clear()

    def adopt(self, retired: "ImageSession") -> None:
        """Take over the label maps of ``retired`` (the same image's session before new weights) for the clients
        that have none here yet; their click states start anew with this session's predictor."""
        with self._lock:
            for client, label_map in retired.label_maps.items():
                self.label_maps.setdefault(client, label_map)
            while len(self.label_maps) > MAX_CLIENTS_PER_IMAGE:
                self._drop_client(next(iter(self.label_maps)))

    def _drop_client(self, client: str) -> None:
        self.label_maps.pop(client, None)
        predictors = [p for p in (self.predictor, self._base_predictor) if p is not None]
        for key in self._client_keys.pop(client, set()):
            for predictor in predictors:
                reset = getattr(predictor, "reset", None)
                if reset is not None:
                    reset(key)


class SessionCache:
    """An LRU map of :class:`ImageSession` with at most ``max_items`` entries (and, with ``max_bytes``, at most
    that estimated memory), each dropped ``ttl_s`` seconds after its last use. Thread-safe; eviction happens on
    every access (no background thread)."""

    def __init__(self, max_items: int, ttl_s: float, clock: Callable[[], float] = time.monotonic,
                 max_bytes: Optional[int] = None):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_items = int(max_items)
        self.ttl_s = float(ttl_s)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._clock = clock
        self._items: "OrderedDict[SessionKey, ImageSession]" = OrderedDict()
        # Sessions retired by new weights that hold label maps not yet taken over by a fresh session; they count
        # toward max_items and expire as live ones do.
        self._retired: "OrderedDict[SessionKey, ImageSession]" = OrderedDict()
        self._lock = threading.Lock()

    def _evict_expired(self, now: float) -> None:
        for items in (self._items, self._retired):
            for key in [k for k, s in items.items() if now - s.last_used > self.ttl_s]:
                del items[key]

    def _evict_over_count(self) -> None:
        """Drop retired sessions first, then the least recently used live ones, beyond ``max_items``."""
        while len(self._items) + len(self._retired) > self.max_items:
            if self._retired:
                self._retired.popitem(last=False)
            else:
                self._items.popitem(last=False)

    def _evict_over_budget(self) -> None:
        """Drop least recently used sessions while the estimate exceeds ``max_bytes`` (the newest stays)."""
        if self.max_bytes is None:
            return
        while len(self._items) > 1 and sum(s.estimated_bytes() for s in self._items.values()) > self.max_bytes:
            self._items.popitem(last=False)

    def get(self, key: SessionKey) -> Optional[ImageSession]:
        """The live session for ``key`` (marked as used now), or None."""
        with self._lock:
            now = self._clock()
            self._evict_expired(now)
            session = self._items.get(key)
            if session is not None:
                session.last_used = now
                self._items.move_to_end(key)
                self._evict_over_budget()  # clients added since may have grown it
            return session

    def put(self, key: SessionKey, session: ImageSession) -> None:
        """Store ``session`` under ``key``, evicting the least recently used beyond ``max_items``."""
        with self._lock:
            now = self._clock()
            retired = self._retired.pop(key, None)
            if retired is not None and now - retired.last_used <= self.ttl_s:
                session.adopt(retired)
            session.last_used = now
            self._items[key] = session
            self._items.move_to_end(key)
            self._evict_expired(now)
            self._evict_over_count()
            self._evict_over_budget()

    def get_saved_work(self, key: SessionKey) -> Optional[ImageSession]:
        """The session holding the label maps of ``key``'s image: the live one, else the one retired by new
        weights (for saving what was drawn before them; never for clicking), or None."""
        with self._lock:
            now = self._clock()
            self._evict_expired(now)
            session = self._items.get(key)
            if session is None:
                session = self._retired.get(key)
            if session is not None:
                session.last_used = now
            return session

    def discard(self, key: SessionKey) -> None:
        """Drop the session of ``key`` if there is one (e.g. an image uploaded with a single request)."""
        with self._lock:
            self._items.pop(key, None)
            self._retired.pop(key, None)

    def clear(self) -> None:
        """New weights: retire every session (its predictor and embeddings are stale). Sessions with label maps
        are kept for :meth:`get_saved_work` and for the image's next session to take over; the rest are
        dropped."""
        with self._lock:
            for key, session in self._items.items():
                if session.label_maps:
                    session.retire()
                    self._retired[key] = session
                    self._retired.move_to_end(key)
            self._items.clear()
            self._evict_over_count()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
