"""The app's click sessions (``apps/sam_med3d/lib/infers/sessions.py``) without a server: per-client label maps
and click states over one shared predictor, the per-image client limit, and the memory bound of the cache."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np

from app_helpers import APP_DIR

sys.path.insert(0, str(APP_DIR))
try:
    from lib.infers import sessions  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))


class _Predictor:
    """Records the label keys it is asked for and forgets them on ``reset``, like ``Sam3DPredictor``."""

    def __init__(self):
        self.calls, self.states = [], set()

    def predict(self, points, labels, label_key="default", **kwargs):
        self.calls.append(label_key)
        self.states.add(label_key)
        return SimpleNamespace(mask=np.ones((2, 2, 2), dtype=bool))

    def reset(self, label_key=None):
        self.states.discard(label_key)


def _session(shape=(4, 5, 6)):
    return sessions.ImageSession(scan=SimpleNamespace(shape=shape), predictor=_Predictor())


def test_clients_have_their_own_label_maps_and_click_states_over_one_predictor():
    session = _session()
    alice, bob = session.for_client("alice"), session.for_client("bob")
    alice.label_map[0, 0, 0] = 1
    assert bob.label_map.sum() == 0 and session.for_client("alice").label_map[0, 0, 0] == 1
    alice.predictor.predict([[1, 1, 1]], [1], label_key="spleen")
    bob.predictor.predict([[2, 2, 2]], [1], label_key="spleen")
    assert session.predictor.calls == [("alice", "spleen"), ("bob", "spleen")]
    replaced = np.full((4, 5, 6), 2, dtype=np.uint8)
    session.set_label_map("bob", replaced)
    assert session.for_client("bob").label_map is replaced and session.for_client("alice").label_map.max() == 1


def test_a_client_beyond_the_per_image_limit_drops_the_least_recent_one_with_its_click_states():
    session = _session()
    for index in range(sessions.MAX_CLIENTS_PER_IMAGE):
        session.for_client(f"c{index}").predictor.predict([[0, 0, 0]], [1], label_key="spleen")
    session.for_client("c0")  # c0 is now the most recent; c1 the least
    session.for_client("new").predictor.predict([[0, 0, 0]], [1], label_key="spleen")
    assert not session.has_client("c1") and session.has_client("c0") and session.has_client("new")
    assert ("c1", "spleen") not in session.predictor.states and ("c0", "spleen") in session.predictor.states
    assert len(session.label_maps) == sessions.MAX_CLIENTS_PER_IMAGE


def test_the_cache_keeps_its_estimated_memory_under_max_bytes_dropping_the_least_recent():
    shape = (100, 100, 10)  # 1e5 voxels
    one = 100_000 * (sessions.SESSION_BYTES_PER_VOXEL + sessions.CLIENT_BYTES_PER_VOXEL)
    assert _session(shape).estimated_bytes() == one
    cache = sessions.SessionCache(max_items=10, ttl_s=60, max_bytes=int(2.5 * one))
    for name in ("a", "b", "c"):
        cache.put(name, _session(shape))
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is not None
    # More clients on "c" grow its estimate: the least recently used other session goes.
    for client in ("x", "y", "z"):
        cache.get("c").for_client(client)
    assert cache.get("c") is not None  # the next access drops what no longer fits
    assert cache.get("b") is None
    cache.discard("c")
    assert len(cache) == 0


def test_without_max_bytes_only_the_count_bounds_the_cache():
    cache = sessions.SessionCache(max_items=2, ttl_s=60)
    for name in ("a", "b", "c"):
        cache.put(name, _session((500, 500, 500)))
    assert len(cache) == 2 and cache.get("a") is None
