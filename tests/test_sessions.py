"""The app's click sessions (``apps/sam_med3d/lib/infers/sessions.py``) without a server: per-client label maps
and click states over one shared predictor, the per-image client limit, and the memory bound of the cache."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Tuple

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from app_helpers import APP_DIR, copy_app, start_server

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


def test_an_idle_session_is_dropped_after_ttl_s_and_a_used_one_is_kept():
    now = [0.0]
    cache = sessions.SessionCache(max_items=4, ttl_s=10, clock=lambda: now[0])
    cache.put("idle", _session())
    cache.put("busy", _session())
    now[0] = 8.0
    assert cache.get("busy") is not None  # used at 8 s: its 10 s start again
    now[0] = 15.0
    assert cache.get("idle") is None and cache.get("busy") is not None and len(cache) == 1


# ---------------------------------------------------------------- through the real infer route (one server)
CASES = {"t2": ("sct_spinalcord_mri", "t2"), "t1w": ("sct_spinalcord_mri", "t1w")}


@pytest.fixture(scope="module")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    """The app on 127.0.0.1 (vit_mini, one crop per click) keeping ONE image session (``cache_size 1``)."""
    root = tmp_path_factory.mktemp("sessions")
    app = copy_app(root / "app")
    studies = root / "studies"
    studies.mkdir()
    for image_id, (dataset, case) in CASES.items():
        shutil.copy(data_dir / dataset / "imagesTr" / f"{case}.nii.gz", studies / f"{image_id}.nii.gz")
    srv = start_server(app, studies, {"model": "vit_mini", "checkpoint": str(mini_checkpoint),
                                      "labels": "spleen=1,liver=2", "device": "cpu", "preload": "true",
                                      "extension": "off", "cache_size": "1"},
                       log_path=root / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.root = root
    yield srv
    srv.stop()


def _click(server, image_id: str, client: str, points, tmp_path: Path) -> Tuple[np.ndarray, dict]:
    """One ``/infer/sam_med3d`` request of ``client`` with ``points`` (the full spleen click list so far, as the
    viewers send it), sent as 3D Slicer sends it; returns the label map answered and the JSON part."""
    params = {"spleen": [list(p) for p in points], "liver": [], "background": [], "label": "spleen"}
    folder = tempfile.mkdtemp(prefix=f"{client}_", dir=tmp_path)
    client_api = MONAILabelClient(server.url, tmpdir=folder, client_id=client)
    result_file, result = client_api.infer("sam_med3d", image_id, params)
    return np.asarray(nib.load(result_file).dataobj), result


def _save_session_label(server, image_id: str, client: str) -> requests.Response:
    params = {"label": "spleen", "save_label": True, "client_id": client}
    return requests.post(f"{server.url}/infer/sam_med3d", params={"image": image_id, "output": "json"},
                         data={"params": json.dumps(params)}, timeout=120)


#: Two click histories on the spleen label of t2. Each second click is inside the crop of the first, so the
#: crop stays where the first click put it; replayed from scratch (another client's state in between) the
#: crop would be centred on both clicks instead, and the mask would differ.
HISTORIES = {"alice": [(30, 27, 26), (30, 40, 26)], "bob": [(20, 15, 30), (36, 15, 18)]}


def test_two_clients_clicking_one_label_of_one_image_at_once_each_get_their_own_history(server, tmp_path):
    # What each history gives alone, one click after the other (clients of their own).
    alone = {}
    for name, points in HISTORIES.items():
        for count in (1, 2):
            alone[name, count], _ = _click(server, "t2", f"{name}-alone", points[:count], tmp_path)
    assert not np.array_equal(alone["alice", 2], alone["bob", 2]), "the histories must give different masks"
    assert not np.array_equal(alone["alice", 2], alone["alice", 1])

    # The same two histories, from two clients at once: each step starts together (both on the same label).
    barrier = threading.Barrier(len(HISTORIES), timeout=120)
    answers: Dict[Tuple[str, int], np.ndarray] = {}

    def annotate(name: str) -> None:
        for count in (1, 2):
            barrier.wait()
            answers[name, count], info = _click(server, "t2", name, HISTORIES[name][:count], tmp_path)
            assert info["sam_med3d"]["spleen"]["clicks"] == count

    with ThreadPoolExecutor(max_workers=len(HISTORIES)) as pool:
        for future in [pool.submit(annotate, name) for name in HISTORIES]:
            future.result(timeout=240)
    for key, expected in alone.items():
        assert np.array_equal(answers[key], expected), f"{key[0]}'s mask after {key[1]} click(s) is not its own"


def test_beyond_the_per_image_client_limit_the_least_recent_client_loses_its_unsaved_map(server, tmp_path):
    from_limit = sessions.MAX_CLIENTS_PER_IMAGE + 1
    for index in range(from_limit):
        _click(server, "t1w", f"crowd{index}", [(23, 37, 37)], tmp_path)
    dropped = _save_session_label(server, "t1w", "crowd0")
    assert dropped.status_code == 422 and "nothing to save" in dropped.json()["detail"]
    kept = _save_session_label(server, "t1w", f"crowd{from_limit - 1}")
    assert kept.status_code == 200, kept.text
    assert kept.json()["saved_from_session"] is True


def test_a_click_on_another_image_beyond_cache_size_ends_the_first_images_session(server, tmp_path):
    _click(server, "t1w", "solo", [(23, 37, 37)], tmp_path)
    assert _save_session_label(server, "t1w", "solo").status_code == 200
    _click(server, "t2", "solo", [(30, 27, 26)], tmp_path)  # cache_size 1: t1w's session goes
    evicted = _save_session_label(server, "t1w", "solo")
    assert evicted.status_code == 422 and "nothing to save" in evicted.json()["detail"]
    _, again = _click(server, "t1w", "solo", [(23, 37, 37)], tmp_path)
    assert again["encoder_ran"] and "load" in again["timings"]  # the scan is read and encoded again
