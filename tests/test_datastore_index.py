"""The datastore index (``datastore_v2.json``) survives crashes, stays small, and names cannot be spoofed.

- Unit tests on :class:`SafeLocalDatastore` (no server): an empty, cut-short or garbage index is set aside and
  rebuilt from the studies folder with every image and label; a failing write leaves the old index whole;
  ``info`` is bounded; ids that differ from existing ones only by case or Unicode form are refused.
- One real server (``monailabel start_server`` on 127.0.0.1) killed with SIGKILL at seeded random moments of
  many writes (label saves, ``info`` updates, image uploads), restarted after every kill: it must start, and
  every label whose save was answered 200 must be listed with its file; an empty index planted before a start
  changes nothing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from app_helpers import APP_DIR, copy_app, start_server

sys.path.insert(0, str(APP_DIR))
try:
    from lib.datastore.local import SafeLocalDatastore  # noqa: E402
    from lib.errors import InvalidRequest  # noqa: E402
    from lib.upstream_fixes import datastore_index  # noqa: E402
    from lib.upstream_fixes.datastore_index import MAX_INFO_BYTES  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))

SHAPE = (12, 10, 8)
AFFINE = np.diag([1.5, 1.2, 3.0, 1.0])
INDEX = "datastore_v2.json"


def _scan(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    nib.save(nib.Nifti1Image(rng.normal(0, 100, SHAPE).astype(np.float32), AFFINE), str(path))
    return path


def _label(path: Path, value: int) -> Path:
    array = np.zeros(SHAPE, dtype=np.uint8)
    array[2:6, 3:7, 1:4] = value
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


@pytest.fixture()
def studies(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    for index, name in enumerate(("a", "b", "c")):
        _scan(folder / f"{name}.nii.gz", index)
    return folder


def _saved(ds: SafeLocalDatastore, uploads: Path, image_id: str, value: int) -> None:
    ds.save_label(image_id, str(_label(uploads / f"{image_id}_{value}.nii.gz", value)), "final", {"by": "test"})


@pytest.mark.parametrize("content", [b"", b'{"name": "new-dataset", "objects": {"a": {"ima', b"\x00" * 100,
                                     b"[1, 2, 3]", b"\xff\xfe not utf-8"])
def test_an_unreadable_index_is_kept_aside_and_rebuilt_with_every_label(studies, tmp_path, content):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    ds = SafeLocalDatastore(str(studies))
    _saved(ds, uploads, "a", 1)
    _saved(ds, uploads, "a", 2)  # the first version goes to the label history
    _saved(ds, uploads, "b", 3)
    (studies / INDEX).write_bytes(content)

    reopened = SafeLocalDatastore(str(studies))  # MONAI Label's constructor raised here: the server never started
    assert sorted(reopened.list_images()) == ["a", "b", "c"]
    assert sorted(reopened.get_labeled_images()) == ["a", "b"]
    assert np.asarray(nib.load(reopened.get_label_uri("a", "final")).dataobj).max() == 2
    assert len(reopened.label_history("a", "final")) == 1
    kept = list((studies / ".history" / "index").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == content
    rebuilt = json.loads((studies / INDEX).read_text())
    assert set(rebuilt["objects"]) == {"a", "b", "c"}
    assert not list(studies.glob(f".{INDEX}.*.tmp"))


def test_a_read_only_datastore_with_an_unreadable_index_starts_and_writes_nothing(studies):
    SafeLocalDatastore(str(studies))
    (studies / INDEX).write_bytes(b"")
    before = sorted(p.name for p in studies.rglob("*"))
    reopened = SafeLocalDatastore(str(studies), read_only=True)
    assert reopened.list_images() == []
    assert sorted(p.name for p in studies.rglob("*")) == before
    assert (studies / INDEX).read_bytes() == b""


def test_a_write_that_fails_midway_leaves_the_previous_index_whole(studies, monkeypatch):
    ds = SafeLocalDatastore(str(studies))
    before = (studies / INDEX).read_bytes()

    def crash(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(datastore_index.os, "replace", crash)
    with pytest.raises(OSError):
        ds.update_image_info("a", {"note": "x" * 1000})
    monkeypatch.undo()
    assert (studies / INDEX).read_bytes() == before
    assert not list(studies.glob(f".{INDEX}.*.tmp")), "the temporary file of the failed write was left behind"


def test_temporary_files_of_an_interrupted_write_are_removed_at_start(studies):
    SafeLocalDatastore(str(studies))
    partial = studies / f".{INDEX}.abc123.tmp"
    partial.write_text('{"name": "cut sh')
    SafeLocalDatastore(str(studies))
    assert not partial.exists()


def test_info_is_bounded_per_image_and_label(studies, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    ds = SafeLocalDatastore(str(studies))
    size_before = (studies / INDEX).stat().st_size
    with pytest.raises(InvalidRequest) as err:
        ds.update_image_info("a", {"blob": "x" * (1 << 20)})
    assert err.value.status_code == 413 and "at most" in err.value.detail
    # Many updates below the limit cannot add up past it either.
    chunk = "y" * (MAX_INFO_BYTES // 4)
    with pytest.raises(InvalidRequest):
        for key in range(8):
            ds.update_image_info("a", {f"k{key}": chunk})
    assert (studies / INDEX).stat().st_size < size_before + MAX_INFO_BYTES + 4096
    with pytest.raises(InvalidRequest) as err:
        ds.save_label("b", str(_label(uploads / "b.nii.gz", 1)), "final", {"blob": "x" * (1 << 20)})
    assert err.value.status_code == 413
    assert not ds.get_labeled_images(), "a refused label must not land"
    with pytest.raises(InvalidRequest) as err:
        ds.update_label_info("a", "final", {"x": 1})
    assert err.value.status_code == 404
    with pytest.raises(InvalidRequest) as err:
        ds.update_image_info("a", ["not", "an", "object"])
    assert err.value.status_code == 422
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidRequest) as err:
            ds.update_image_info("a", {"score": value})
        assert err.value.status_code == 422 and "JSON" in err.value.detail


@pytest.mark.parametrize("twin, why", [("A", "case"), ("Ａ", "full-width")])
def test_an_image_id_that_differs_only_by_case_or_form_is_refused(studies, twin, why):
    ds = SafeLocalDatastore(str(studies))
    with pytest.raises(InvalidRequest) as err:
        ds.add_image(twin, str(_scan(studies.parent / "upload.nii.gz", 7)), {})
    assert err.value.status_code == 409 and "only by letter case or Unicode form" in err.value.detail, why
    assert sorted(ds.list_images()) == ["a", "b", "c"]


def test_nfc_and_nfd_forms_of_an_id_are_one_image(studies, tmp_path):
    ds = SafeLocalDatastore(str(studies))
    nfc = "caf\u00e9"
    assert ds.add_image(nfc, str(_scan(tmp_path / "upload.nii.gz", 8)), {}) == nfc
    with pytest.raises(InvalidRequest) as err:
        ds.add_image("cafe\u0301", str(_scan(tmp_path / "upload2.nii.gz", 9)), {})
    assert err.value.status_code == 409
    assert ds.get_image_info("cafe\u0301")["name"] == f"{nfc}.nii.gz"


def test_a_tag_that_differs_only_by_case_is_refused(studies, tmp_path):
    ds = SafeLocalDatastore(str(studies))
    with pytest.raises(InvalidRequest) as err:
        ds.save_label("a", str(_label(tmp_path / "l.nii.gz", 1)), "Final", {})
    assert err.value.status_code == 409 and "'final'" in err.value.detail


def test_a_save_stopped_before_its_file_is_in_place_leaves_the_previous_label_current(studies, tmp_path,
                                                                                     monkeypatch):
    """A save killed at its worst moment (the new label copied, not yet moved into place) must leave the
    previous label as the current one, not only in the history: a crash never leaves an image without its
    last saved label."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    ds = SafeLocalDatastore(str(studies))
    _saved(ds, uploads, "a", 1)
    real_replace = os.replace

    def crash_when_placing(source, dest, *args, **kwargs):
        if str(source).endswith(".partial"):  # the new label's copy about to become the current file
            raise KeyboardInterrupt("killed here")
        return real_replace(source, dest, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_when_placing)
    with pytest.raises(KeyboardInterrupt):
        _saved(ds, uploads, "a", 2)
    monkeypatch.setattr(os, "replace", real_replace)
    reopened = SafeLocalDatastore(str(studies))
    uri = reopened.get_label_uri("a", "final")
    assert uri, "the previous label is no longer current"
    assert np.asarray(nib.load(uri).dataobj).max() == 1
    assert not list((studies / "labels" / "final").glob(".*.partial")), "the partial copy was left behind"


# ------------------------------------------------------------------------------------------- kill -9 of a writer
KILL_ROUNDS = 10


def _write_forever(studies: str, uploads: str, acknowledged: str, seed: int) -> None:
    """Child process: save labels and update info as fast as possible; append each finished save to a file."""
    ds = SafeLocalDatastore(studies)
    rng = random.Random(seed)
    value = 0
    while True:
        value += 1
        image = rng.choice(["a", "b", "c"])
        if value % 3:
            ds.update_image_info(image, {"note": "n" * rng.randint(1000, 30000), "v": value})
        else:
            path = _label(Path(uploads) / f"{seed}_{value}.nii.gz", value % 250 + 1)
            ds.save_label(image, str(path), "final", {"v": value})
            with open(acknowledged, "a") as out:
                out.write(f"{image} {value % 250 + 1}\n")
                out.flush()
                os.fsync(out.fileno())


def test_kill_9_of_a_writing_process_at_random_moments_loses_nothing(studies, tmp_path):
    """A process writing the index (as the server and its training/scoring subprocesses do) is killed with
    SIGKILL at a random moment after its first finished save of the round; the folder must open every time with
    every acknowledged label."""
    import multiprocessing

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    acknowledged = tmp_path / "acknowledged.txt"
    acknowledged.touch()
    SafeLocalDatastore(str(studies))
    context = multiprocessing.get_context("fork")  # the child inherits the imported modules: starts at once
    rng = random.Random(1)
    torn = 0
    for round_ in range(KILL_ROUNDS):
        saves_before = len(acknowledged.read_text().splitlines())
        child = context.Process(target=_write_forever, args=(str(studies), str(uploads), str(acknowledged), round_))
        child.start()
        deadline = time.monotonic() + 60  # on a loaded machine the first save can take seconds
        while len(acknowledged.read_text().splitlines()) == saves_before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))  # then a random moment of the writes that follow
        torn += bool(list(studies.glob(f".{INDEX}.*.tmp")))
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        reopened = SafeLocalDatastore(str(studies))  # MONAI Label's LocalDatastore raised here after a torn write
        last = {}
        for line in acknowledged.read_text().splitlines():
            image, value = line.split()
            last[image] = int(value)
        assert sorted(reopened.list_images()) == ["a", "b", "c"], f"round {round_}"
        for image, value in last.items():
            assert reopened.get_label_uri(image, "final"), f"round {round_}: the label of {image} is lost"
            stored = np.asarray(nib.load(reopened.get_label_uri(image, "final")).dataobj)
            assert stored.max() >= 1, f"round {round_}: the label of {image} is empty"
    assert acknowledged.read_text(), "no label save finished: the test wrote nothing"
    print(f"{KILL_ROUNDS} kills, {torn} while an index write was in flight")


# ------------------------------------------------------------------------------------------- the real server
def _label_bytes(value: int) -> bytes:
    array = np.zeros(SHAPE, dtype=np.uint8)
    array[2:6, 3:7, 1:4] = value
    return nib.Nifti1Image(array, AFFINE).to_bytes()


SERVER_KILLS = 6


class _Writes:
    """What one writer thread sent and what the server acknowledged, per image the thread owns."""

    def __init__(self, images):
        self.images = list(images)
        self.acknowledged: dict = {}  # image -> label value answered 200
        self.in_flight: dict = {}  # image -> label value sent, no answer yet (it may have landed)
        self.uploaded: list = []  # new image ids answered 200
        self.saves = 0


def _server_writer(url: str, writes: _Writes, stop: threading.Event, prefix: str, seed: int) -> None:
    """Label saves, ``info`` updates and new image uploads, as fast as the server answers, until it is killed."""
    rng = random.Random(seed)
    session = requests.Session()
    count = 0
    while not stop.is_set():
        count += 1
        image = rng.choice(writes.images)
        kind = count % 4
        try:
            if kind == 0:
                name = f"{prefix}_n{count}"
                data = _label_bytes(1)  # any valid scan; values 0/1 are not constant
                response = session.put(f"{url}/datastore/image", params={"image": name},
                                       files={"file": (f"{name}.nii", data)}, timeout=15)
                if response.status_code == 200:
                    writes.uploaded.append(name)
            elif kind == 1:
                session.put(f"{url}/datastore/image/info", params={"image": image},
                            data={"info": json.dumps({"note": "n" * rng.randint(1000, 40000), "v": count})},
                            timeout=15)
            else:
                value = rng.randint(1, 250)
                writes.in_flight[image] = value
                response = session.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                                       files={"label": ("l.nii", _label_bytes(value))}, timeout=15)
                if response.status_code == 200:
                    writes.acknowledged[image] = value
                    writes.saves += 1
                    writes.in_flight.pop(image, None)
        except requests.RequestException:
            return  # the server was killed


def test_a_server_killed_at_random_moments_of_many_writes_starts_every_time_with_every_label(tmp_path,
                                                                                              mini_checkpoint):
    """The real server, SIGKILLed SERVER_KILLS times at seeded random moments while three clients save labels,
    update ``info`` and upload images, is started again after every kill: it must start, list every image and
    every label whose save was answered 200 (with that value, or the one of a save still in flight), have a
    readable index that matches the folder, and leave no temporary file of the index behind. Before the last start
    the index is emptied (a kill in the middle of an in-place write): it is kept aside and rebuilt with every label."""
    studies = tmp_path / "studies"
    studies.mkdir()
    images = [f"s{i}" for i in range(6)]
    for index, image in enumerate(images):
        _scan(studies / f"{image}.nii.gz", index)
    app = copy_app(tmp_path / "app")
    conf = {"model": "vit_mini", "checkpoint": str(mini_checkpoint), "labels": "spleen=1,liver=2",
            "device": "cpu", "preload": "false", "extension": "off"}
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    rng = random.Random(29)
    owners = [_Writes(images[i::3]) for i in range(3)]
    torn = 0
    starts: list = []

    def _check_started(server, when: str) -> None:
        """Every image, upload and acknowledged label of the earlier rounds is there; the index is readable, matches
        the folder and has no temporary file left."""
        listed = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        uploaded = [name for writes in owners for name in writes.uploaded]
        assert set(images + uploaded) <= set(listed), f"{when}: images missing from the index"
        for writes in owners:
            for image, value in writes.acknowledged.items():
                assert "final" in listed[image]["labels"], f"{when}: the label of {image} is lost"
                stored = requests.get(f"{server.url}/datastore/label", params={"label": image, "tag": "final"},
                                      timeout=30)
                assert stored.status_code == 200, (when, image, stored.status_code)
                found = int(np.asarray(nib.Nifti1Image.from_bytes(stored.content).dataobj).max())
                assert found in (value, writes.in_flight.get(image)), \
                    f"{when}: {image} holds label {found}, last saved {value}"
                writes.acknowledged[image] = found  # a save in flight at the kill may have landed
            writes.in_flight.clear()
        on_disk = {p.name.split(".")[0] for p in (studies / "labels" / "final").glob("[!.]*.nii*")} \
            if (studies / "labels" / "final").is_dir() else set()
        with_label = {image for image, entry in listed.items() if "final" in entry["labels"]}
        assert on_disk == with_label, f"{when}: labels on disk {on_disk} but indexed {with_label}"
        json.loads((studies / INDEX).read_text())
        assert not list(studies.glob(f".{INDEX}.*.tmp")), f"{when}: temporary index files left"

    for kill in range(SERVER_KILLS):
        started = time.monotonic()
        server = start_server(app, studies, conf, log_path=tmp_path / f"run{kill}.log", env=env, timeout_s=120)
        starts.append(time.monotonic() - started)
        try:
            _check_started(server, f"start {kill}")
            # Writes, then a kill at a random moment after the first save of the round was answered.
            stop = threading.Event()
            saves = sum(writes.saves for writes in owners)
            threads = [threading.Thread(target=_server_writer, args=(server.url, writes, stop, f"k{kill}w{i}",
                                                                     rng.randrange(1 << 30)))
                       for i, writes in enumerate(owners)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while sum(writes.saves for writes in owners) == saves and time.monotonic() < deadline:
                time.sleep(0.02)
            assert sum(writes.saves for writes in owners) > saves, f"round {kill}: no save answered in 30 s"
            time.sleep(rng.uniform(0.0, 0.8))
            torn += bool(list(studies.glob(f".{INDEX}.*.tmp")))
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        finally:
            server.stop()
    # The last kill as if it had torn an index written in place (what MONAI Label's own write leaves): the server
    # starts with an empty index, keeps it aside and rebuilds it from the folder with every label.
    (studies / INDEX).write_bytes(b"")
    server = start_server(app, studies, conf, log_path=tmp_path / "last.log", env=env, timeout_s=120)
    try:
        _check_started(server, "after the last kill, the index emptied")
        assert list((studies / ".history" / "index").iterdir()), "the unreadable index was not kept"
        assert "could not be read" in server.log_tail(400)
    finally:
        server.stop()
    print(f"{SERVER_KILLS} kills of the server, {torn} while an index write was in flight; "
          f"{sum(w.saves for w in owners)} label saves, {sum(len(w.uploaded) for w in owners)} uploads answered; "
          f"starts took {min(starts):.1f} to {max(starts):.1f} s")
