"""Reliability of the real server under hostile input, concurrent annotators, killed training and SIGTERM.

ONE ``monailabel start_server`` (vit_mini weights, labels spleen=1, liver=2, 127.0.0.1, a free port) on a
studies folder copied from ``../shared/data``; the tests run in file order and the last one stops it:

1. the bad-input corpus (:data:`BAD_INPUTS`, one row per request: expected status and a substring of the
   message); after each, ``/info/`` still answers, and a good click works at the end;
2. 8 concurrent clients x 25 clicks (threads; 2 clients per image): 0 errors, 0 mix-ups (every answer has
   its own image's shape, only its own label's value, its own click count), ``/info/`` polled throughout and
   each answer within 2 s, while a 60-click request replays on another image;
3. ``kill -9`` of a running training subprocess: the served weights stay a complete, loadable checkpoint
   and the server keeps serving;
4. SIGTERM of the server while a training runs, a click is in flight and a client stalls mid-upload: the
   process group is gone within :data:`SHUTDOWN_LIMIT_S`, no subprocess is left, no partial file.

The slowest parts are the two training tests (a training subprocess starts: 20-60 s each on 2 loaded cores).

Traversal and file-system attacks on the datastore are tested in ``tests/test_datastore_safety.py``, two
annotators of one image (who never see each other's unsaved labels) in ``tests/test_sessions.py``.
Everything is bounded in time; every process started is stopped (the fixture stops the group at the end).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from monailabel.client import MONAILabelClient

from app_helpers import APP_DIR, copy_app, copy_studies, mini_conf, start_server, wait_for_training

sys.path.insert(0, str(APP_DIR))
try:
    from lib.upstream_fixes.task_shutdown import ARMED_MESSAGE  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))

CASES = {  # image id -> (dataset folder, case) in ../shared/data
    "t2": ("sct_spinalcord_mri", "t2"),                    # 60x55x52, labelled (training)
    "t1w": ("sct_spinalcord_mri", "t1w"),                  # 42x76x77, labelled (training)
    "mr_sm": ("totalseg_mr_multiorgan", "example_mr_sm"),  # 117x91x20
    "breast1": ("pyradiomics_mri_tumor", "breast1"),       # 45x120x21, bad input
    "brain1": ("pyradiomics_mri_tumor", "brain1"),         # 256x256x25, long requests
}
MODEL = "sam_med3d"
LABELS = {"background": 0, "spleen": 1, "liver": 2}
#: Seconds within which every GET /info/ must answer while clicks run.
INFO_LIMIT_S = 2.0
#: Seconds within which the server's whole process group must be gone after SIGTERM.
SHUTDOWN_LIMIT_S = 20.0
PUBLISHED = "finetuned_vit_mini.pt"  # <model_dir>/finetuned_<base checkpoint file name>.pt


def _start(app: Path, studies: Path, checkpoint: Path, log_path: Path):
    return start_server(app, studies, mini_conf(checkpoint), log_path=log_path,
                        env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})


@pytest.fixture(scope="module")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    app = copy_app(root / "app")
    studies = copy_studies(root / "studies", data_dir, CASES)
    # Published weights exist from the start (as after an earlier run), so killing a training run tests that
    # the file it might be replacing stays whole.
    (app / "model").mkdir(parents=True)
    shutil.copy(mini_checkpoint, app / "model" / PUBLISHED)
    srv = _start(app, studies, mini_checkpoint, root / "server.log")
    srv.root, srv.app, srv.studies, srv.data_dir, srv.checkpoint = root, app, studies, data_dir, mini_checkpoint
    for image_id in ("t2", "t1w"):
        dataset, case = CASES[image_id]
        with open(data_dir / dataset / "labelsTr" / f"{case}.nii.gz", "rb") as f:
            response = requests.put(f"{srv.url}/datastore/label", params={"image": image_id, "tag": "final"},
                                    files={"label": (f"{image_id}.nii.gz", f)}, timeout=60)
        assert response.status_code == 200, response.text
    yield srv
    srv.stop()


def _shape(server, image_id: str) -> tuple:
    return tuple(nib.load(str(server.studies / f"{image_id}.nii.gz")).shape)


# ------------------------------------------------------------------------------------------ bad-input corpus
def _nifti_bytes(array: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array, np.eye(4)).to_bytes(), compresslevel=1)


def _header_only_nifti(shape: tuple) -> bytes:
    """A .nii.gz whose header claims ``shape`` (uint8) but holds almost no data: a decompression bomb's header."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1024)


_RNG = np.random.default_rng(0)
UPLOADS = {  # name -> (file name, bytes)
    "2d": ("flat.nii.gz", _nifti_bytes(_RNG.random((40, 40, 1)).astype(np.float32))),
    "4d": ("cine.nii.gz", _nifti_bytes(_RNG.random((8, 8, 8, 3)).astype(np.float32))),
    "corrupt": ("scan.nii.gz", b"this is not a NIfTI file" * 20),
    "text_named_sh": ("x.sh", b"#!/bin/sh\necho hi\n"),
    "huge_header": ("bomb.nii.gz", _header_only_nifti((4096, 4096, 4096))),
    "nan": ("nan.nii.gz", _nifti_bytes(np.full((10, 10, 10), np.nan, dtype=np.float32))),
    "constant": ("flat3d.nii.gz", _nifti_bytes(np.full((10, 10, 10), 7.0, dtype=np.float32))),
    "label_wrong_shape": ("label.nii.gz", _nifti_bytes(np.zeros((5, 5, 5), dtype=np.uint8))),
    "label_fractional": ("label.nii.gz", _nifti_bytes(np.full((45, 120, 21), 0.5, dtype=np.float32))),
    "label_bin": ("scribbles.bin", b"\0" * 100),
    "label_sh": ("label.sh", b"echo"),
}

G = {"spleen": [[20, 60, 10]], "label": "spleen"}  # a good click on breast1 (45x120x21)


def _infer(params=None, image="breast1", model=MODEL, raw=None, files=None, output="json"):
    query = {"output": output} if output else {}
    if image is not None:
        query["image"] = image
    data = {"params": raw if raw is not None else json.dumps(params if params is not None else G)}
    return ("POST", f"/infer/{model}", query, data, files, None)


def _train(body, model=MODEL, query=None):
    return ("POST", f"/train/{model}" if model else "/train/", query or {}, None, None, body)


# (id, request, expected status, expected substring of the answer). Substrings name the bad value or field,
# so they hold whichever layer (the request guard, the app's routes, the task) refuses the request; where
# two layers word it differently, either wording (a tuple) or either status is accepted.
BAD_INPUTS = [
    # clicks
    ("coord_1e308", _infer({"spleen": [[1e308, 1, 1]], "label": "spleen"}), 422, "out of range"),
    ("coord_minus_1e308", _infer({"spleen": [[-1e308, 1, 1]], "label": "spleen"}), 422, "out of range"),
    ("coord_400_digits", _infer(raw='{"spleen": [[' + "9" * 400 + ', 1, 1]], "label": "spleen"}'), 422, "digits"),
    ("coord_nan", _infer(raw='{"spleen": [[NaN, 1, 1]], "label": "spleen"}'), 422, "non-finite"),
    ("coord_infinity", _infer(raw='{"spleen": [[Infinity, 1, 1]], "label": "spleen"}'), 422, "non-finite"),
    ("coord_string", _infer({"spleen": [["a", 12, 10]], "label": "spleen"}), 422, "non-numeric coordinate 'a'"),
    ("coord_bool", _infer({"spleen": [[True, 12, 10]], "label": "spleen"}), 422, "non-numeric"),
    ("coord_null", _infer({"spleen": [[None, 12, 10]], "label": "spleen"}), 422, "non-numeric"),
    ("point_two_values", _infer({"spleen": [[1, 2]], "label": "spleen"}), 422, "is not a point [i, j, k]"),
    ("point_four_values", _infer({"spleen": [[1, 2, 3, 4]], "label": "spleen"}), 422, "is not a point"),
    ("point_nested", _infer({"spleen": [[[1, 2, 3]]], "label": "spleen"}), 422, "is not a point"),
    ("points_string", _infer({"spleen": "1,2,3", "label": "spleen"}), 422, "must be a list of clicks"),
    ("points_object", _infer({"spleen": {"i": 1}, "label": "spleen"}), 422, "must be a list of clicks"),
    ("click_outside_i", _infer({"spleen": [[600, 12, 10]], "label": "spleen"}), 422,
     "click (600, 12, 10) for label 'spleen' is outside the scan 45x120x21"),
    ("click_negative", _infer({"spleen": [[-1, 12, 10]], "label": "spleen"}), 422, "outside the scan"),
    ("click_outside_k", _infer({"spleen": [[5, 12, 21]], "label": "spleen"}), 422, "outside the scan"),
    ("background_outside", _infer({"spleen": [[5, 5, 5]], "background": [[5, 5, 99]], "label": "spleen"}), 422,
     "outside the scan"),
    ("too_many_clicks", _infer({"spleen": [[5, 5, 5]] * 40, "background": [[6, 6, 6]] * 25, "label": "spleen"}),
     422, "too many clicks"),
    ("no_foreground", _infer({"spleen": [], "background": [[3, 3, 3]], "label": "spleen"}), 422,
     "no foreground click for label 'spleen'"),
    ("no_clicks", _infer({}), 422, "no foreground clicks"),
    ("foreground_without_label", _infer({"foreground": [[5, 5, 5]]}), 422, "no 'label'"),
    # labels
    ("unknown_label", _infer({"lung": [[10, 10, 10]], "label": "lung"}), 422, "unknown label 'lung'"),
    ("label_server_path", _infer({"spleen": [[5, 5, 5]], "label": "/etc/hostname"}), 422,
     ("unknown label", "not a path")),
    ("label_datastore_path", _infer({"spleen": [[5, 5, 5]], "label": "studies/labels/final/t2.nii.gz"}), 422,
     ("unknown label", "not a path")),
    ("label_number", _infer({"spleen": [[5, 5, 5]], "label": 5}), 422, "unknown label"),
    ("label_list", _infer({"spleen": [[5, 5, 5]], "label": ["spleen"]}), 422, "unknown label"),
    # result fields
    ("dtype_float32", _infer({**G, "result_dtype": "float32"}), 422, "result_dtype"),
    ("dtype_int8", _infer({**G, "result_dtype": "int8"}), 422, "result_dtype"),
    ("dtype_object", _infer({**G, "result_dtype": "object"}), 422, "result_dtype"),
    ("dtype_number", _infer({**G, "result_dtype": 8}), 422, "result_dtype"),
    ("dtype_gibberish", _infer({**G, "result_dtype": "uint8; rm -rf /"}), 422, "result_dtype"),
    ("extension_traversal", _infer({**G, "result_extension": "/../../x.nii.gz"}), 422, "result_extension"),
    ("extension_sh", _infer({**G, "result_extension": ".sh"}), 422, "result_extension"),
    ("extension_mhd", _infer({**G, "result_extension": ".mhd"}), 422, "result_extension"),
    ("extension_number", _infer({**G, "result_extension": 7}), 422, "result_extension"),
    ("extension_no_dot", _infer({**G, "result_extension": "nii.gz/.."}), 422, "result_extension"),
    ("compress_string", _infer({**G, "result_compress": "yes"}), 422, "result_compress"),
    ("compress_number", _infer({**G, "result_compress": 1}), 422, "result_compress"),
    ("client_id_number", _infer({**G, "client_id": 5}), 422, "client_id"),
    ("client_id_long", _infer({**G, "client_id": "x" * 1000}), 422, "client_id"),
    ("client_id_control_chars", _infer({**G, "client_id": "a\nb"}), 422, "client_id"),
    # params
    ("params_invalid_json", _infer(raw="{"), 422, "JSON"),
    ("params_array", _infer(raw="[]"), 422, "JSON object"),
    ("params_number", _infer(raw="5"), 422, "JSON object"),
    ("params_string", _infer(raw='"spleen"'), 422, "JSON object"),
    ("params_null", _infer(raw="null"), 422, "JSON object"),
    ("params_deep", _infer(raw="[" * 100000 + "]" * 100000), 422, "JSON"),
    # request
    ("unknown_model", _infer(model="nope"), 404, "nope"),
    ("unknown_image", _infer(image="no_such_image"), 422, "'no_such_image' was not found in the datastore"),
    ("no_image", _infer(image=None), 422, "image"),
    ("output_dicom_seg", _infer(output="dicom_seg"), 422, "dicom_seg"),
    ("output_unknown", _infer(output="pdf"), 422, "output"),
    ("save_without_session", _infer({"save_label": True, "client_id": "never-clicked"}, image="mr_sm"), 422,
     "nothing to save"),
    # uploads
    ("upload_2d", _infer({"spleen": [[2, 2, 0]], "label": "spleen"}, image="", files="2d"), 422, "2D image"),
    ("upload_4d", _infer({"spleen": [[2, 2, 2]], "label": "spleen"}, image="", files="4d"), 422, "4D"),
    ("upload_corrupt", _infer({"spleen": [[2, 2, 2]], "label": "spleen"}, image="", files="corrupt"), 422,
     "could not be read"),
    ("upload_named_sh", _infer({"spleen": [[2, 2, 2]], "label": "spleen"}, image="", files="text_named_sh"), 422,
     "x.sh"),
    ("upload_decompression_bomb", _infer({"spleen": [[2, 2, 2]], "label": "spleen"}, image="",
                                         files="huge_header"), 413, "voxels"),
    ("upload_nan", _infer({"spleen": [[2, 2, 2]], "label": "spleen"}, image="", files="nan"), 422, "NaN/inf"),
    ("upload_constant", _infer({"spleen": [[2, 2, 2]], "label": "spleen"}, image="", files="constant"), 422,
     "constant"),
    ("label_upload_wrong_shape", _infer({"spleen": [[20, 60, 10]]}, files="label:label_wrong_shape"), 422,
     "shape"),
    ("label_upload_fractional", _infer({"spleen": [[20, 60, 10]]}, files="label:label_fractional"), 422,
     "integer label values"),
    ("label_upload_bin", _infer({"spleen": [[20, 60, 10]]}, files="label:label_bin"), 422, "scribbles.bin"),
    ("label_upload_sh", _infer({"spleen": [[20, 60, 10]]}, files="label:label_sh"), 422, "label.sh"),
    # training (each is refused before anything starts)
    ("train_negative_epochs", _train({"max_epochs": -3}), 422, "max_epochs"),
    ("train_zero_epochs", _train({"max_epochs": 0}), 422, "max_epochs"),
    ("train_huge_epochs", _train({"max_epochs": 10 ** 9}), 422, "max_epochs"),
    ("train_string_epochs", _train({"max_epochs": "10"}), 422, "max_epochs"),
    ("train_fractional_epochs", _train({"max_epochs": 2.5}), 422, "max_epochs"),
    ("train_lr_fast", _train({"lr": "fast"}), 422, "lr"),
    ("train_lr_negative", _train({"lr": -0.1}), 422, "lr"),
    ("train_lr_zero", _train({"lr": 0}), 422, "lr"),
    ("train_lr_huge", _train({"lr": 1e9}), 422, "lr"),
    ("train_val_split_5", _train({"val_split": 5}), 422, "val_split"),
    ("train_val_split_1", _train({"val_split": 1.0}), 422, "val_split"),
    ("train_val_split_negative", _train({"val_split": -0.1}), 422, "val_split"),
    ("train_clicks_zero", _train({"train_clicks": 0}), 422, "train_clicks"),
    ("train_clicks_range_reversed", _train({"train_clicks": "10-1"}), 422, "train_clicks"),
    ("train_clicks_range_text", _train({"train_clicks": "many"}), 422, "train_clicks"),
    ("train_blend_negative", _train({"blend": -0.1}), 422, "blend"),
    ("train_blend_above_one", _train({"blend": 1.5}), 422, "blend"),
    ("train_samples_per_epoch_zero", _train({"samples_per_epoch": 0}), 422, "samples_per_epoch"),
    ("train_samples_per_epoch_string", _train({"samples_per_epoch": "16"}), 422, "samples_per_epoch"),
    ("train_retention_negative", _train({"retention": -1}), 422, "retention"),
    ("train_retention_huge", _train({"retention": 1e6}), 422, "retention"),
    ("train_seed_negative", _train({"seed": -2}), 422, "seed"),
    ("train_rehearsal_negative", _train({"rehearsal": -0.5}), 422, "rehearsal"),
    ("train_max_forgetting_string", _train({"max_forgetting": "0.1"}), 422, "max_forgetting"),
    ("train_max_structure_forgetting_above_one", _train({"max_structure_forgetting": 2}), 422,
     "max_structure_forgetting"),
    ("train_batch_size_string", _train({"train_batch_size": "8"}), 422, "train_batch_size"),
    ("train_multi_gpu_string", _train({"multi_gpu": "yes"}), 422, "multi_gpu"),
    ("train_dataset_unknown", _train({"dataset": "EvilDataset"}), 422, "dataset"),
    ("train_device_unknown", _train({"device": "tpu"}), 422, "device"),
    ("train_gpus_injection", _train({"gpus": "0; rm -rf /"}), 422, "gpus"),
    ("train_bundle_path", _train({"bundle_path": "/tmp"}), 422, "bundle_path"),
    ("train_run_sync", _train({"max_epochs": 1}, query={"run_sync": "true"}), 400, "run_sync"),
    ("train_unknown_model", _train({}, model="nope"), 404, "nope"),
    ("train_all_nested_not_object", _train({MODEL: 5}, model=""), 422, MODEL),
    ("train_all_nested_bad_epochs", _train({MODEL: {"max_epochs": -1}}, model=""), 422, "max_epochs"),
    ("train_all_run_sync", _train({}, model="", query={"run_sync": "true"}), 400, "run_sync"),
    ("train_body_array", _train([1, 2]), 422, ""),
    # scoring, active learning, batch inference
    ("scoring_unknown_method", ("POST", "/scoring/nope", {}, None, None, {}), 404, "nope"),
    ("scoring_bundle_path", ("POST", f"/scoring/{MODEL}_uncertainty", {}, None, None, {"bundle_path": "/tmp"}),
     422, "bundle_path"),
    ("strategy_unknown", ("POST", "/activelearning/nope", {}, None, None, {}), 404, "nope"),
    ("batch_infer_run_sync", ("POST", f"/batch/infer/{MODEL}", {"run_sync": "true"}, None, None, {}), 400,
     "run_sync"),
]


def _send(server, request, timeout: float = 60.0) -> requests.Response:
    method, path, query, data, files, body = request
    opened = None
    if isinstance(files, str):
        field, _, name = files.rpartition(":")
        filename, content = UPLOADS[name]
        opened = {field or "file": (filename, content)}
    return requests.request(method, f"{server.url}{path}", params=query, data=data, files=opened, json=body,
                            timeout=timeout)


def test_the_corpus_has_at_least_60_distinct_cases():
    assert len(BAD_INPUTS) >= 60
    assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


#: Cases that fail today, with the reason (strict: each must start passing once fixed, then leave this list).
KNOWN_FAILURES: dict = {}  # case id -> reason, for a case that must fail until its fix lands (strict xfail)


def _case(case):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[case[0]])] if case[0] in KNOWN_FAILURES else []
    return pytest.param(*case[1:], id=case[0], marks=marks)


@pytest.mark.parametrize("request_, status, expected", [_case(c) for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_naming_the_problem(server, request_, status, expected):
    response = _send(server, request_)
    statuses = status if isinstance(status, tuple) else (status,)
    wordings = expected if isinstance(expected, tuple) else (expected,)
    assert response.status_code in statuses, response.text[:500]
    assert any(w in response.text for w in wordings), response.text[:500]
    assert "Traceback" not in response.text
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200  # still serving


def test_a_good_click_works_after_the_corpus_and_no_training_started(server, tmp_path):
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    result_file, result = client.infer(MODEL, "breast1", dict(G))
    assert nib.load(result_file).shape == _shape(server, "breast1")
    assert result["labels_updated"] == ["spleen"]
    assert requests.get(f"{server.url}/train/", timeout=30).status_code == 404  # no training task ever ran
    leftovers = [p for p in server.app.rglob("*") if p.suffix in (".sh", ".bin")]
    assert not leftovers


# ----------------------------------------------------------------------------------------------- concurrency
def _client_plan(server, index: int, clicks: int):
    images = ["t2", "t1w", "mr_sm", "breast1"]
    image = images[index // 2]
    label = "spleen" if index % 2 == 0 else "liver"
    shape = np.asarray(_shape(server, image))
    rng = np.random.default_rng(100 + index)
    centre = shape // 2
    points = [[int(c) for c in np.clip(centre + rng.integers(-4, 5, size=3), 0, shape - 1)] for _ in range(clicks)]
    return image, label, points


def test_eight_concurrent_clients_25_clicks_no_errors_no_mixups_info_answers_fast(server, tmp_path):
    clients, clicks = 8, 25
    errors, mixups, latencies, info_latencies, encoder_runs = [], [], [], [], []
    stop = threading.Event()

    def annotator(index: int) -> None:
        image, label, points = _client_plan(server, index, clicks)
        folder = tmp_path / f"client{index}"
        folder.mkdir()
        client = MONAILabelClient(server.url, tmpdir=str(folder), client_id=f"annotator-{index}")
        shape, value = _shape(server, image), LABELS[label]
        for n in range(1, clicks + 1):
            begin = time.perf_counter()
            try:
                result_file, result = client.infer(MODEL, image, {label: points[:n], "label": label})
            except Exception as err:  # any failure counts; the test reports them all
                errors.append(f"client {index} click {n}: {err}")
                return
            latencies.append(time.perf_counter() - begin)
            encoder_runs.append(bool(result.get("encoder_ran")))
            label_map = np.asarray(nib.load(result_file).dataobj)
            os.unlink(result_file)
            own = result.get("sam_med3d", {}).get(label, {})
            if (label_map.shape != shape or not set(np.unique(label_map).tolist()) <= {0, value}
                    or result.get("labels_updated") != [label] or own.get("clicks") != n
                    or own.get("voxels") != int((label_map == value).sum())):
                mixups.append(f"client {index} ({image}, {label}) click {n}: shape {label_map.shape}, values "
                              f"{np.unique(label_map).tolist()}, result {json.dumps(result)[:300]}")

    long_spans, info_spans = [], []

    def long_requests() -> None:  # fresh sessions replaying 2 labels x 64 clicks each, on another image
        shape = np.asarray(_shape(server, "brain1"))
        spleen = [[int(shape[0] // 2 + d), int(shape[1] // 2), int(shape[2] // 2)] for d in range(-32, 32)]
        liver = [[int(shape[0] // 2), int(shape[1] // 2 + d), int(shape[2] // 2)] for d in range(-32, 32)]
        for repeat in range(2):
            params = {"spleen": spleen, "liver": liver, "client_id": f"long-{repeat}"}
            start = time.perf_counter()
            response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "brain1", "output": "json"},
                                     data={"params": json.dumps(params)}, timeout=300)
            long_spans.append((start, time.perf_counter()))
            if response.status_code != 200:
                errors.append(f"long request {repeat}: {response.status_code} {response.text[:200]}")

    def poll_info() -> None:
        while not stop.is_set():
            begin = time.perf_counter()
            try:
                ok = requests.get(f"{server.url}/info/", timeout=30).status_code == 200
            except requests.RequestException as err:
                ok = False
                errors.append(f"/info/: {err}")
            info_latencies.append(time.perf_counter() - begin)
            info_spans.append((begin, time.perf_counter()))
            if not ok:
                errors.append("/info/ did not answer 200")
            stop.wait(0.1)

    poller = threading.Thread(target=poll_info)
    workers = [threading.Thread(target=annotator, args=(i,)) for i in range(clients)]
    workers.append(threading.Thread(target=long_requests))
    begin = time.perf_counter()
    poller.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=max(1.0, 300 - (time.perf_counter() - begin)))
    stop.set()
    poller.join(timeout=60)
    wall = time.perf_counter() - begin
    assert not any(w.is_alive() for w in workers), "clients still running after 300 s"
    latencies.sort()
    # /info/ calls that started and ended while a long request was being answered (impossible if requests
    # ran on the event loop: /info/ would wait for the long request).
    nested = sum(1 for a, b in info_spans if any(s < a and b < e for s, e in long_spans))
    print(f"\n{clients} clients x {clicks} clicks + 2 requests of 2 x 64 clicks: {wall:.1f} s wall; click round trip "
          f"median {statistics.median(latencies):.3f} s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.3f} s; "
          f"encoder ran on {sum(encoder_runs)} of {len(encoder_runs)} clicks; "
          f"long requests {', '.join(f'{e - s:.2f}' for s, e in long_spans)} s; /info/ answered "
          f"{len(info_latencies)} times, max {max(info_latencies):.3f} s, {nested} of them during a long request")
    assert not errors, errors[:5]
    assert not mixups, mixups[:5]
    assert len(latencies) == clients * clicks
    assert len(info_latencies) >= 5
    assert max(info_latencies) < INFO_LIMIT_S
    assert nested >= 1


# --------------------------------------------------------------------------------- killed training, SIGTERM
def _training_processes(server) -> list:
    try:
        children = psutil.Process(server.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            cmdline = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "monailabel.interfaces.utils.app" in cmdline and "train" in cmdline:
            found.append(child)
    return found


def _start_training(server, body: dict, timeout_s: float = 120.0) -> psutil.Process:
    response = requests.post(f"{server.url}/train/{MODEL}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _training_processes(server)
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError("no training subprocess appeared")


def _assert_loadable(path: Path) -> None:
    from sam_med3d.checkpoint import load_model

    model = load_model(str(path), device="cpu")  # torch.load(weights_only=True) inside
    assert sum(p.numel() for p in model.parameters()) > 0


def test_kill_9_of_a_running_training_leaves_the_served_weights_loadable(server, tmp_path):
    published = server.app / "model" / PUBLISHED
    before = published.stat().st_mtime_ns
    trainer = _start_training(server, {"max_epochs": 200, "val_split": 0.5, "train_clicks": 1})
    # Kill it while it writes the weights if that is seen within 40 s (the temporary file of the atomic
    # save), else at 40 s.
    deadline, mid_save = time.monotonic() + 40.0, False
    while time.monotonic() < deadline and trainer.is_running():
        if list(published.parent.glob(f".{PUBLISHED}.*.tmp")):
            mid_save = True
            break
        time.sleep(0.01)
    assert trainer.is_running(), "training ended before it could be killed"
    for proc in trainer.children(recursive=True) + [trainer]:
        proc.kill()
    print(f"\ntraining killed {'while saving weights' if mid_save else 'at 40 s'}; published weights "
          f"{'replaced' if published.stat().st_mtime_ns != before else 'unchanged'} before the kill")
    status = wait_for_training(server.url, timeout_s=60)
    assert status["status"] in ("ERROR", "STOPPED"), status
    _assert_loadable(published)
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    _, result = client.infer(MODEL, "breast1", {"spleen": [[20, 60, 10]], "label": "spleen"})
    assert result["model"]["file"] == str(published)


def test_sigterm_stops_the_server_its_training_and_leaves_no_partial_file(server):
    # Slowest part of this file: a training subprocess is started and the server is stopped with it.
    trainer = _start_training(server, {"max_epochs": 200, "val_split": 0.5, "train_clicks": 1})
    group = os.getpgid(server.process.pid)
    in_flight = threading.Thread(target=lambda: requests.post(
        f"{server.url}/infer/{MODEL}", params={"image": "brain1", "output": "json"},
        data={"params": json.dumps({"spleen": [[128, 128, 12 + d % 3] for d in range(60)], "label": "spleen",
                                    "client_id": "at-shutdown"})}, timeout=60))
    in_flight.start()
    # A client that stalls mid-upload: uvicorn alone would wait for it forever ("Waiting for connections to close").
    stalled = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)
    stalled.sendall(b"POST /infer/sam_med3d?image=t2 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000\r\n\r\n--x\r\n")
    time.sleep(0.3)
    begin = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)  # the server only, as a service manager does
    server.process.wait(timeout=SHUTDOWN_LIMIT_S + 10)
    server_s = time.monotonic() - begin
    while time.monotonic() - begin < SHUTDOWN_LIMIT_S + 10:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    group_s = time.monotonic() - begin
    in_flight.join(timeout=60)
    stalled.close()
    print(f"\nSIGTERM: server exited after {server_s:.1f} s, process group gone after {group_s:.1f} s")
    assert not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, "training outlived the server"
    assert group_s < SHUTDOWN_LIMIT_S
    app_dir = str(server.app)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if app_dir in cmdline:
            left.append((proc.info["pid"], cmdline[:200]))
    assert not left, left
    model_dir = server.app / "model"
    assert not list(model_dir.glob(".*.tmp")), "a partial weights file was left"
    _assert_loadable(model_dir / PUBLISHED)
    for label in (server.studies / "labels" / "final").glob("*.nii.gz"):
        assert nib.load(str(label)).get_fdata().size > 0


def test_kill_9_of_the_server_stops_its_training_subprocess(server):
    """``kill -9`` of the server runs no handler of ours; its training subprocess must not go on and publish
    weights for a server that is gone. A second server on the same app and studies (the first was stopped
    by the SIGTERM test)."""
    leftover = server.app / "model" / f".{PUBLISHED}.12345.tmp"  # as a save killed mid-write leaves it
    leftover.write_bytes(b"partial")
    second = _start(server.app, server.studies, server.checkpoint, server.root / "server_kill9.log")
    try:
        assert not leftover.exists(), "the server kept a partial save from before its start"
        trainer = _start_training(second, {"max_epochs": 1000, "val_split": 0.5, "train_clicks": 1})
        armed = f"[{trainer.pid}] [MainThread] [INFO] (lib.upstream_fixes.task_shutdown"  # its line, in the server's log
        deadline = time.monotonic() + 120  # until the subprocess has created the app, which arms the signal
        while not any(armed in line and ARMED_MESSAGE in line
                      for line in second.log_path.read_text(errors="replace").splitlines()):
            assert time.monotonic() < deadline and trainer.is_running(), "the training never armed its exit"
            time.sleep(0.5)
        begin = time.monotonic()
        second.process.kill()  # SIGKILL of the server process only
        second.process.wait(timeout=10)
        try:
            trainer.wait(timeout=15)
        except psutil.TimeoutExpired:
            raise AssertionError(f"training (pid {trainer.pid}) still runs 15 s after the server was killed")
        print(f"\nkill -9 of the server: its training subprocess was gone after {time.monotonic() - begin:.1f} s")
    finally:
        second.stop()
        try:
            os.killpg(second.process.pid, signal.SIGKILL)  # whatever a failed test left in its group
        except ProcessLookupError:
            pass


def test_a_task_subprocess_dies_with_a_killed_server(tmp_path):
    """``kill -9`` of the server runs no handler; Linux itself then stops its task subprocesses
    (``lib.upstream_fixes.task_shutdown.exit_with_parent``, called by the app in every training/scoring subprocess)."""
    if os.uname().sysname != "Linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    import subprocess
    import sys

    ready = tmp_path / "ready"
    child = (f"import pathlib, sys, time; sys.path.insert(0, {str(copy_app(tmp_path / 'app'))!r}); "
             "from lib.upstream_fixes.task_shutdown import exit_with_parent; assert exit_with_parent(); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         f"c = subprocess.Popen([sys.executable, '-c', {child!r}]); print(c.pid, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        task = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and task.is_running(), "the task never got ready"
            time.sleep(0.1)
        parent.kill()  # SIGKILL: no handler of the parent runs
        parent.wait(timeout=10)
        task.wait(timeout=10)  # psutil.TimeoutExpired if the task outlived its parent
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
