"""The app's click sessions (``apps/sam_med3d/lib/infers/sessions.py``): per-client label maps and click states
over one shared predictor, routing to the base weights, the per-image client limit, the bounds and expiry of the
cache, and the label maps kept for saving after new weights; first without a server, then through the real
infer route (two clients at once, the limits, unsaved work over newly published weights)."""

from __future__ import annotations

import json
import os
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

from app_helpers import APP_DIR, copy_app, copy_studies, mini_conf, start_server

sys.path.insert(0, str(APP_DIR))
try:
    from lib.infers import sessions  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))


class _Predictor:
    """Records the label keys it is asked for and forgets them on ``reset``, like ``Sam3DPredictor``."""

    def __init__(self):
        self.calls, self.states, self.clicks = [], set(), []

    def predict(self, points, labels, label_key="default", **kwargs):
        self.calls.append(label_key)
        self.clicks.append((points, labels, kwargs))
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
    assert alice.scan is bob.scan is session.scan and (alice.client, bob.client) == ("alice", "bob")
    alice.predictor.predict([[1, 1, 1]], [1], label_key="spleen", multimask=True)
    bob.predictor.predict([[2, 2, 2]], [0], label_key="spleen")
    assert session.predictor.calls == [("alice", "spleen"), ("bob", "spleen")]
    assert session.predictor.clicks == [([[1, 1, 1]], [1], {"multimask": True}), ([[2, 2, 2]], [0], {})]
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
    stored = {name: _session(shape) for name in ("a", "b", "c")}
    for name, session in stored.items():
        cache.put(name, session)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is stored["c"]
    # More clients on "c" grow its estimate: the least recently used other session goes.
    for client in ("x", "y", "z"):
        cache.get("c").for_client(client)
    assert cache.get("c") is stored["c"]  # the next access drops what no longer fits
    assert cache.get("b") is None
    cache.discard("c")
    assert len(cache) == 0


def test_sessions_exactly_at_max_bytes_stay_and_the_newest_stays_even_alone_over_it():
    one = _session((100, 100, 10)).estimated_bytes()
    exact = sessions.SessionCache(max_items=10, ttl_s=60, max_bytes=2 * one)
    exact.put("a", _session((100, 100, 10)))
    exact.put("b", _session((100, 100, 10)))
    assert len(exact) == 2
    small = sessions.SessionCache(max_items=10, ttl_s=60, max_bytes=one // 2)
    big = _session((100, 100, 10))
    small.put("big", big)
    assert small.get("big") is big and len(small) == 1


def test_discarding_drops_live_and_retired_sessions_and_ignores_unknown_keys():
    cache = sessions.SessionCache(max_items=4, ttl_s=60)
    cache.discard("never stored")
    for name in ("live", "retired"):
        cache.put(name, _session())
        cache.get(name).for_client("alice")
    cache.clear()
    cache.put("live", _session())
    cache.discard("retired")
    cache.discard("live")
    assert cache.get_saved_work("retired") is None and cache.get_saved_work("live") is None and len(cache) == 0


class _Clock:
    """The cache's clock, moved by the test (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timed_cache(*names: str):
    """A cache (4 sessions, ttl_s 10) on a :class:`_Clock` at 0 s, with a new session put under each name."""
    clock = _Clock()
    cache = sessions.SessionCache(max_items=4, ttl_s=10, clock=clock)
    put = {}
    for name in names:
        put[name] = _session()
        cache.put(name, put[name])
    return cache, clock, put


def test_without_max_bytes_only_the_count_bounds_the_cache():
    cache = sessions.SessionCache(max_items=2, ttl_s=60)
    for name in ("a", "b", "c"):
        cache.put(name, _session((500, 500, 500)))
    assert len(cache) == 2 and cache.get("a") is None


def test_an_idle_session_is_dropped_after_ttl_s_and_a_used_one_is_kept():
    cache, clock, put = _timed_cache("idle", "busy")
    idle, busy = put["idle"], put["busy"]
    clock.now = 8.0
    assert cache.get("busy") is busy  # used at 8 s: its 10 s start again
    clock.now = 10.0
    assert cache.get("idle") is idle  # exactly ttl_s idle: still kept
    clock.now = 20.5
    assert cache.get("idle") is None and len(cache) == 0  # both idle for more than 10 s


def test_the_cache_refuses_a_size_below_one_and_a_ttl_that_is_not_positive():
    for max_items, ttl_s in ((0, 60), (-1, 60), (1, 0), (1, -5)):
        with pytest.raises(ValueError, match="max_items" if max_items < 1 else "ttl_s"):
            sessions.SessionCache(max_items=max_items, ttl_s=ttl_s)
    cache = sessions.SessionCache(max_items=1, ttl_s=0.5)  # the smallest valid values
    cache.put("a", _session())
    assert len(cache) == 1


def test_the_session_key_changes_when_the_image_file_is_rewritten(tmp_path):
    image = tmp_path / "scan.nii.gz"
    image.write_bytes(b"x" * 100)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(image)
    key = sessions.session_key(str(image))
    assert key == sessions.session_key(str(link)) == (str(image.resolve()), image.stat().st_ino, 100,
                                                       image.stat().st_mtime_ns)
    image.write_bytes(b"y" * 101)  # another size
    resized = sessions.session_key(str(image))
    assert resized[2] == 101 and resized != key
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same size, new mtime
    touched = sessions.session_key(str(image))
    assert touched[:3] == resized[:3] and touched != resized


class _RoutedPredictor(_Predictor):
    """A predictor with ``sibling`` (same scan, other weights), like ``Sam3DPredictor``."""

    def __init__(self, model="tuned"):
        super().__init__()
        self.model, self.siblings, self.timings = model, [], {"encode": 1.5}

    def sibling(self, model):
        self.siblings.append(model)
        return _RoutedPredictor(model)


def test_labels_outside_the_tuned_ones_are_answered_by_the_base_weights_per_client():
    session = sessions.ImageSession(scan=SimpleNamespace(shape=(4, 5, 6)), predictor=_RoutedPredictor(),
                                    answers=frozenset({"spleen"}), base_model="base")
    alice = session.for_client("alice").predictor
    assert alice.answers("spleen") and not alice.answers("liver")
    alice.predict([[1, 1, 1]], [1], label_key="spleen")
    alice.predict([[1, 1, 1]], [1], label_key="liver")
    session.for_client("bob").predictor.predict([[2, 2, 2]], [1], label_key="liver")
    base = session.predictor_for("liver")
    assert session.predictor_for("spleen") is session.predictor and base.model == "base"
    assert session.predictor.siblings == ["base"] and session.predictor_for("kidney") is base  # made once
    assert session.predictor.calls == [("alice", "spleen")]
    assert base.calls == [("alice", "liver"), ("bob", "liver")]
    assert alice.timings == {"encode": 1.5}  # other attributes are the shared predictor's


def test_without_a_label_subset_the_main_weights_answer_every_label():
    session = sessions.ImageSession(scan=SimpleNamespace(shape=(4, 5, 6)), predictor=_RoutedPredictor())
    client = session.for_client("alice").predictor
    assert client.answers("anything")
    client.predict([[1, 1, 1]], [1], label_key="anything")
    assert session.predictor_for("anything") is session.predictor and session.predictor.siblings == []
    assert session.predictor.calls == [("alice", "anything")]


def test_an_image_session_answering_some_labels_needs_the_base_model():
    message = "^an image session whose predictor answers only some labels needs the base model$"
    with pytest.raises(ValueError, match=message):
        sessions.ImageSession(scan=SimpleNamespace(shape=(4, 5, 6)), predictor=_RoutedPredictor(),
                              answers=frozenset({"spleen"}))


def test_a_new_client_starts_from_an_empty_fortran_ordered_map_or_a_copy_of_the_initial_one():
    session = _session()
    first = session.for_client("alice")
    assert first.fresh and first.label_map.shape == (4, 5, 6) and first.label_map.dtype == np.uint8
    assert first.label_map.flags.f_contiguous and not first.label_map.any()
    assert not session.for_client("alice").fresh  # the second request finds the map
    initial = np.zeros((4, 5, 6), dtype=np.int64)
    initial[1, 2, 3] = 2
    seeded = sessions.ImageSession(scan=SimpleNamespace(shape=(4, 5, 6)), predictor=_Predictor(),
                                   label_map=initial)
    initial[0, 0, 0] = 1  # the caller's array changes after: the session's starting map does not
    as_stored = np.zeros((4, 5, 6), dtype=np.uint8)  # already the map's dtype: still copied
    unaliased = sessions.ImageSession(scan=SimpleNamespace(shape=(4, 5, 6)), predictor=_Predictor(),
                                      label_map=as_stored)
    as_stored[2, 2, 2] = 1
    assert not unaliased.for_client("alice").label_map.any()
    alice, bob = seeded.for_client("alice"), seeded.for_client("bob")
    assert not alice.fresh and alice.label_map.dtype == np.uint8
    assert alice.label_map[1, 2, 3] == 2 and alice.label_map.sum() == 2
    alice.label_map[3, 3, 3] = 1
    assert bob.label_map.sum() == 2 and bob.label_map is not alice.label_map


def test_new_weights_keep_drawn_label_maps_for_saving_and_for_the_images_next_session():
    cache, clock, put = _timed_cache("drawn", "untouched")
    drawn = put["drawn"]
    drawn.for_client("alice").label_map[1, 1, 1] = 3
    cache.clear()  # new weights
    assert len(cache) == 0 and cache.get("drawn") is None  # never clicked on again with stale weights
    saved = cache.get_saved_work("drawn")
    assert saved is drawn and saved.predictor is None and saved.label_maps["alice"][1, 1, 1] == 3
    assert cache.get_saved_work("untouched") is None  # nothing drawn: nothing kept
    clock.now = 8.0
    assert cache.get_saved_work("drawn") is drawn  # a save counts as a use
    clock.now = 18.0  # exactly ttl_s after the save
    fresh = _session()
    cache.put("drawn", fresh)  # the next click: a fresh session takes the map over
    taken = fresh.for_client("alice")
    assert taken.label_map[1, 1, 1] == 3 and not taken.fresh
    assert cache.get_saved_work("drawn") is fresh and cache.get("drawn") is fresh


def test_label_maps_retired_longer_than_ttl_s_are_gone():
    cache, clock, put = _timed_cache("late", "saved")
    for session in put.values():
        session.for_client("alice").label_map[0, 0, 0] = 1
    cache.clear()
    clock.now = 10.5
    fresh = _session()
    cache.put("late", fresh)  # idle more than ttl_s: nothing taken over
    assert fresh.for_client("alice").fresh
    assert cache.get_saved_work("saved") is None


def test_retired_sessions_count_toward_max_items_and_go_first():
    cache = sessions.SessionCache(max_items=2, ttl_s=60)
    retired = {}
    for name in ("a", "b"):
        retired[name] = _session()
        cache.put(name, retired[name])
        retired[name].for_client("alice")
    cache.clear()
    assert cache.get_saved_work("a") is retired["a"] and cache.get_saved_work("b") is retired["b"]
    live = _session()
    cache.put("c", live)
    assert cache.get_saved_work("a") is None and cache.get_saved_work("b") is retired["b"]
    assert cache.get("c") is live


# ---------------------------------------------------------------- through the real infer route (one server)
CASES = {"t2": ("sct_spinalcord_mri", "t2"), "t1w": ("sct_spinalcord_mri", "t1w")}


def _start(root: Path, data_dir: Path, checkpoint: Path, **conf: str):
    """The app on 127.0.0.1 (vit_mini, one crop per click, ``conf`` added) serving the two spinal-cord MRIs."""
    app = copy_app(root / "app")
    studies = copy_studies(root / "studies", data_dir, CASES)
    srv = start_server(app, studies, mini_conf(checkpoint, **conf), log_path=root / "server.log",
                       env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.root, srv.app = root, app
    return srv


@pytest.fixture(scope="module")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    """The app keeping ONE image session (``cache_size 1``)."""
    srv = _start(tmp_path_factory.mktemp("sessions"), data_dir, mini_checkpoint, cache_size="1")
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


def test_two_annotators_of_one_image_never_see_each_others_unsaved_labels(server, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    alice = MONAILabelClient(server.url, tmpdir=str(tmp_path / "a"), client_id="annotator-a")
    bob = MONAILabelClient(server.url, tmpdir=str(tmp_path / "b"), client_id="annotator-b")
    _, result_a = alice.infer("sam_med3d", "t2", {"spleen": [list(HISTORIES["alice"][0])], "label": "spleen"})
    assert result_a["sam_med3d"]["spleen"]["voxels"] > 0, "precondition: alice's click gives a mask"
    file_b, result_b = bob.infer("sam_med3d", "t2", {"liver": [list(HISTORIES["bob"][0])], "label": "liver"})
    assert result_b["sam_med3d"]["liver"]["voxels"] > 0, "precondition: bob's click gives a mask"
    assert not np.any(np.asarray(nib.load(file_b).dataobj) == 1), "bob's answer holds alice's unsaved spleen"
    assert "spleen" not in result_b["label_names"]
    # Alice's next click still has her own spleen and none of bob's liver.
    file_a2, _ = alice.infer("sam_med3d", "t2", {"spleen": [list(p) for p in HISTORIES["alice"]], "label": "spleen"})
    assert not np.any(np.asarray(nib.load(file_a2).dataobj) == 2), "alice's answer holds bob's unsaved liver"
    # Saving with no clicks returns the requesting client's own map only.
    saved = _save_session_label(server, "t2", "annotator-b")
    assert saved.status_code == 200, saved.text
    assert "spleen" not in saved.json()["label_names"] and "liver" in saved.json()["label_names"]


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


def test_a_fresh_session_takes_over_at_most_the_per_image_client_limit():
    limit = sessions.MAX_CLIENTS_PER_IMAGE
    cache = sessions.SessionCache(max_items=4, ttl_s=60)
    old = _session()
    cache.put("image", old)
    for index in range(limit):
        old.for_client(f"c{index}")
    cache.clear()
    everyone = _session()
    cache.put("image", everyone)
    assert len(everyone.label_maps) == limit  # exactly the limit: nobody lost
    cache.clear()
    crowded = _session()
    crowded.for_client("first").predictor.predict([[0, 0, 0]], [1], label_key="spleen")
    cache.put("image", crowded)  # its own client plus the limit taken over: the least recent goes
    assert len(crowded.label_maps) == limit and crowded.has_client(f"c{limit - 1}")
    crowded.for_client("newcomer")  # drops a client taken over (no click states here yet)
    assert len(crowded.label_maps) == limit and crowded.has_client("newcomer")

# ----------------------------------------------------- unsaved work over new weights (a second server)
@pytest.fixture(scope="module")
def finetuned_server(data_dir, mini_checkpoint, tmp_path_factory):
    """The app serving fine-tuned weights as soon as they are published (``use_finetuned``)."""
    srv = _start(tmp_path_factory.mktemp("unsaved_work"), data_dir, mini_checkpoint, use_finetuned="true")
    yield srv
    srv.stop()


ANNOTATOR = "annotator-1"


def _infer_as_annotator(server, image_id: str, params: dict, tmp_path: Path, name: str):
    response = requests.post(f"{server.url}/infer/sam_med3d", params={"image": image_id, "output": "image"},
                             data={"params": json.dumps({"client_id": ANNOTATOR, "result_extension": ".nii.gz",
                                                         **params})}, timeout=300)
    if response.status_code != 200:
        return response.status_code, response.text, None
    path = tmp_path / f"{name}.nii.gz"
    path.write_bytes(response.content)
    return 200, None, np.asarray(nib.load(str(path)).dataobj)


def test_masks_drawn_before_new_weights_still_save_and_later_clicks_use_the_new_weights(finetuned_server, tmp_path):
    """An annotator clicks two labels on one image and does not save; new weights are published where the trainer
    publishes them and another image's click loads them. The save (``save_label`` with no clicks, as 3D Slicer and
    the OHIF without a save button send it) returns exactly the map drawn before; that image's next click is
    answered by the new weights while the other label's mask stays."""
    import torch
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    server = finetuned_server
    # Two labels clicked on t2, not saved. vit_mini's random weights may draw a small mask: any map will do, as
    # long as it is the one returned for the last click.
    status, text, _ = _infer_as_annotator(server, "t2", {"spleen": [[30, 27, 26]], "label": "spleen"}, tmp_path, "c1")
    assert status == 200, text
    status, text, drawn = _infer_as_annotator(
        server, "t2", {"spleen": [[30, 27, 26]], "liver": [[20, 20, 20]], "label": "liver"}, tmp_path, "c2")
    assert status == 200, text
    # New weights published (the trainer's path for these base weights), loaded by another image's click.
    torch.manual_seed(1)
    finetuned = server.app / "model" / "finetuned_vit_mini.pt"
    save_checkpoint(build_sam_med3d("vit_mini"), finetuned)
    before = server.log_path.read_text(errors="replace")
    status, text, _ = _infer_as_annotator(server, "t1w", {"spleen": [[21, 38, 38]], "label": "spleen"}, tmp_path,
                                          "other")
    assert status == 200, text
    log = server.log_path.read_text(errors="replace")[len(before):]
    assert "Now serving new SAM-Med3D" in log and finetuned.name in log, log[-2000:]

    # The unsaved map of t2 still saves, exactly as drawn.
    status, text, saved = _infer_as_annotator(server, "t2", {"save_label": True, "label_tag": "final"}, tmp_path,
                                              "saved")
    assert status == 200, text
    assert np.array_equal(saved, drawn)
    labels = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]["t2"]["labels"]
    assert "final" in labels, labels

    # The next click on t2 is answered by the new weights; the liver mask drawn before stays untouched.
    response = requests.post(f"{server.url}/infer/sam_med3d", params={"image": "t2", "output": "json"},
                             data={"params": json.dumps({"client_id": ANNOTATOR, "spleen": [[30, 27, 26], [31, 28, 26]],
                                                         "label": "spleen"})}, timeout=300)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"]["file"].endswith(finetuned.name), result["model"]
    assert result["encoder_ran"] is True, "the new weights must encode the image anew"
    status, text, after = _infer_as_annotator(server, "t2", {"save_label": True, "label_tag": "final"}, tmp_path,
                                              "after")
    assert status == 200, text
    assert np.array_equal(after == 2, drawn == 2), "the liver mask drawn before the new weights changed"
