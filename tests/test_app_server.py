"""End-to-end tests of the SAM-Med3D MONAI Label app: a real ``monailabel start_server`` driven over HTTP.

One server (vit_mini weights saved in a tmp dir) serves a studies folder built from a few cases of
``../shared/data``; the tests talk to it with ``monailabel.client.MONAILabelClient`` (and ``requests`` where
the client has no method), the way 3D Slicer and OHIF do: ``/info``, ``/infer`` with both viewers' request
shapes, ``/datastore/label``, ``/activelearning``, ``/scoring``, ``/train``. A second server runs the full
``vit_b_ori`` architecture on the reference fixtures' weights for one click.

Each test uses its own image where click history matters, so test order does not change what they see.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient

from app_helpers import app_module, copy_app, start_server, wait_for_training

#: Studies folder content: image id -> (dataset folder, case) in ../shared/data.
CASES = {
    "t2": ("sct_spinalcord_mri", "t2"),                 # 60x55x52, Slicer-shape clicks, training label
    "t1w": ("sct_spinalcord_mri", "t1w"),               # 42x76x77, OHIF-shape clicks, training label
    "mr_sm": ("totalseg_mr_multiorgan", "example_mr_sm"),  # 117x91x20, multi-label merging
    "breast1": ("pyradiomics_mri_tumor", "breast1"),    # 45x120x21, bad input
    "brain1": ("pyradiomics_mri_tumor", "brain1"),      # 256x256x25, stays unlabelled
}
LABELS = "spleen=1,liver=2"
MODEL = "sam_med3d"


def _studies(data_dir: Path, root: Path) -> Path:
    studies = root / "studies"
    studies.mkdir()
    for image_id, (dataset, case) in CASES.items():
        shutil.copy(data_dir / dataset / "imagesTr" / f"{case}.nii.gz", studies / f"{image_id}.nii.gz")
    return studies


def _source_label(data_dir: Path, image_id: str) -> Path:
    dataset, case = CASES[image_id]
    return data_dir / dataset / "labelsTr" / f"{case}.nii.gz"


@pytest.fixture(scope="session")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    """The app served on a free port of 127.0.0.1 (vit_mini, labels spleen=1, liver=2)."""
    root = tmp_path_factory.mktemp("app_server")
    app = copy_app(root / "app")
    studies = _studies(data_dir, root)
    tmp = root / "tmp"  # the server's temporary folder, where uploads are written while a request runs
    tmp.mkdir()
    # One crop per click (extension off): these tests check caching and request shapes, and untrained weights
    # would send the extension across the whole scan on every click (spleen_server runs it on).
    srv = start_server(app, studies, {"model": "vit_mini", "checkpoint": str(mini_checkpoint), "labels": LABELS,
                                      "device": "cpu", "preload": "true", "extension": "off"},
                       log_path=root / "server.log",
                       # Scoring runs when a test asks for it, not in the background at start.
                       env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "TMPDIR": str(tmp)})
    srv.root, srv.app, srv.studies, srv.tmp = root, app, studies, tmp
    yield srv
    srv.stop()


@pytest.fixture()
def client(server, tmp_path) -> MONAILabelClient:
    # The client saves results under <tmpdir>/<server's temp file name>; a private tmpdir keeps it from
    # colliding with the server's own temp file, which the server deletes after answering.
    return MONAILabelClient(server.url, tmpdir=str(tmp_path))


def _image(server, image_id: str) -> nib.Nifti1Image:
    return nib.load(str(server.studies / f"{image_id}.nii.gz"))


# ------------------------------------------------------------------------------- app pieces (no server)
@pytest.fixture(scope="module")
def app_lib():
    """The app's ``lib`` package, imported as MONAI Label imports it (app folder first on sys.path)."""
    return {name: app_module(f"lib.{name}")
            for name in ("options", "served_model", "infers.viewer_clicks", "trainers.sam_med3d")}


@pytest.mark.parametrize("text, expected", [
    ("spleen=1,liver=6", {"background": 0, "spleen": 1, "liver": 6}),
    ("spleen,liver", {"background": 0, "spleen": 1, "liver": 2}),
    ('{"spleen":3}', {"background": 0, "spleen": 3}),
    ('["a","b"]', {"background": 0, "a": 1, "b": 2}),
])
def test_labels_option_forms_without_spaces(app_lib, text, expected):
    assert app_lib["options"].parse_labels(text) == expected


@pytest.mark.parametrize("text, message", [
    ("spleen=0", "must be in 1..255"),
    ("spleen=1,liver=1", "the same value 1"),
    ("spleen,liver=2", "mixes"),
    ("{spleen:1}", "does not parse"),
    ("background=3", "always 0"),
])
def test_bad_labels_option_is_refused_by_name(app_lib, text, message):
    with pytest.raises(ValueError, match="--conf labels") as err:
        app_lib["options"].parse_labels(text)
    assert message in str(err.value)


def test_every_conf_option_is_documented(app_lib):
    from app_helpers import REPO

    doc = (REPO / "docs" / "app.md").read_text()
    missing = [name for name in app_lib["options"].DEFAULTS if f"| `{name}` |" not in doc]
    assert not missing, f"docs/app.md lacks a row for --conf {missing}"


def test_single_label_foreground_background_shape(app_lib):
    clicks = app_lib["infers.viewer_clicks"].parse_clicks(
        {"foreground": [[1, 2, 3], [4.4, 5.6, 6]], "background": [[7, 8, 9]], "label": "liver"},
        {"background": 0, "spleen": 1, "liver": 2})
    assert [c.name for c in clicks] == ["liver"]
    np.testing.assert_array_equal(clicks[0].points, [[1, 2, 3], [4, 6, 6], [7, 8, 9]])
    np.testing.assert_array_equal(clicks[0].point_labels, [1, 1, 0])


@pytest.mark.parametrize("params, message", [
    ({"spleen": [[1e308, 1, 1]], "label": "spleen"}, r"out of range \(1e\+308\)"),
    ({"spleen": [[10 ** 400, 1, 1]], "label": "spleen"}, "integer of 401 digits"),
    ({"spleen": [[1, 2, 3]] * 60, "background": [[4, 5, 6]] * 41, "label": "spleen"}, r"too many clicks.*101"),
])
def test_absurd_coordinates_and_click_floods_are_refused_by_name(app_lib, params, message):
    with pytest.raises(ValueError, match=message):
        app_lib["infers.viewer_clicks"].parse_clicks(params, {"background": 0, "spleen": 1})


def test_cors_origins_option_accepts_origins_only(app_lib):
    options = app_lib["options"]
    parsed = options.AppOptions.from_conf({"cors_origins": "https://a.example.org,http://b.local:3000/"}, "/tmp")
    assert parsed.cors_origins == ("https://a.example.org", "http://b.local:3000")
    assert options.AppOptions.from_conf({}, "/tmp").cors_origins == ()
    for bad in ("*", "a.example.org", "https://a.example.org/ohif", "ftp://x"):
        with pytest.raises(ValueError, match="cors_origins"):
            options.AppOptions.from_conf({"cors_origins": bad}, "/tmp")


def test_train_clicks_option_is_a_count_or_a_range(app_lib):
    options = app_lib["options"]
    assert options.AppOptions.from_conf({"train_clicks": "7"}, "/tmp").train_clicks == (7, 7)
    parsed = options.AppOptions.from_conf({"train_clicks": "2-9"}, "/tmp").train_clicks
    shown = options.train_config  # the training task's config, as a viewer shows the option
    assert parsed == (2, 9) and shown({"train_clicks": parsed})["train_clicks"] == "2-9"
    assert shown({"train_clicks": (4, 4)})["train_clicks"] == 4
    for bad in ("0", "9-2", "x"):
        with pytest.raises(ValueError, match="--conf train_clicks"):
            options.AppOptions.from_conf({"train_clicks": bad}, "/tmp")


def test_rehearsal_data_option_is_auto_none_or_a_training_layout_folder(app_lib, tmp_path):
    options = app_lib["options"]
    assert options.AppOptions.from_conf({}, "/tmp").rehearsal_data == "auto"
    assert options.AppOptions.from_conf({"rehearsal_data": "None"}, "/tmp").rehearsal_data == "none"
    (tmp_path / "set" / "imagesTr").mkdir(parents=True)
    (tmp_path / "set" / "labelsTr").mkdir()
    assert options.AppOptions.from_conf({"rehearsal_data": str(tmp_path / "set")}, "/tmp").rehearsal_data == \
        str(tmp_path / "set")
    with pytest.raises(ValueError, match="--conf rehearsal_data .* imagesTr/ and labelsTr/"):
        options.AppOptions.from_conf({"rehearsal_data": str(tmp_path)}, "/tmp")
    with pytest.raises(ValueError, match="--conf rehearsal"):
        options.AppOptions.from_conf({"rehearsal": "-1"}, "/tmp")


def test_max_structure_forgetting_option_reaches_the_trainer_and_is_checked(app_lib):
    options = app_lib["options"]
    assert options.AppOptions.from_conf({}, "/tmp").max_structure_forgetting == 1.0  # auto, finetuned_for trained
    assert options.AppOptions.from_conf({"finetuned_for": "all"}, "/tmp").max_structure_forgetting == 0.1
    assert options.AppOptions.from_conf({"max_structure_forgetting": "0.2"}, "/tmp").max_structure_forgetting == 0.2
    for bad in ("-0.1", "1.5", "x"):
        with pytest.raises(ValueError, match="max_structure_forgetting"):
            options.AppOptions.from_conf({"max_structure_forgetting": bad}, "/tmp")


def test_auto_training_defaults_follow_finetuned_for_and_explicit_values_win(app_lib):
    options = app_lib["options"]
    names = ("lr", "freeze_encoder", "retention", "rehearsal", "max_forgetting", "max_structure_forgetting")

    def chosen(conf):
        o = options.AppOptions.from_conf(conf, "/tmp")
        return tuple(getattr(o, n) for n in names)

    # Weights that answer only their labels tune everything, unguarded; weights that answer all keep the guards.
    assert chosen({}) == (0.0005, False, 0.0, 0.0, 1.0, 1.0)
    assert chosen({"finetuned_for": "all"}) == (0.001, True, 4.0, 0.5, 0.05, 0.1)
    assert chosen({"finetuned_for": "all", "retention": "1", "freeze_encoder": "false", "lr": "auto"}) == \
        (0.001, False, 1.0, 0.5, 0.05, 0.1)
    with pytest.raises(ValueError, match="freeze_encoder"):
        options.AppOptions.from_conf({"freeze_encoder": "maybe"}, "/tmp")


def test_default_checkpoint_offline_falls_back_to_bundled_or_says_what_to_do(app_lib, tmp_path, monkeypatch):
    import sam_med3d.checkpoint as checkpoint

    weights = app_lib["served_model"]
    monkeypatch.delenv(weights.ENV_RESOLVED, raising=False)
    # An address nothing listens on: the download fails at once, as on an offline machine.
    monkeypatch.setattr(checkpoint, "TURBO_URL", "http://127.0.0.1:9/sam_med3d_turbo.pth")
    if checkpoint.BUNDLED_PATH.is_file():
        chosen = weights.resolve_base_weights("default", str(tmp_path))
        assert chosen.path == checkpoint.BUNDLED_PATH
        assert "could not be downloaded" in chosen.reason
    else:
        with pytest.raises(FileNotFoundError, match="no model to serve") as err:
            weights.resolve_base_weights("default", str(tmp_path))
        assert "--conf checkpoint /path/to/sam_med3d_turbo.pth" in str(err.value)
    with pytest.raises(checkpoint.CheckpointDownloadError):
        weights.resolve_base_weights("turbo", str(tmp_path))


# ------------------------------------------------------------------------------- trainer data (full-size labels)
def _spleen_label(data_dir: Path) -> Path:
    return data_dir / "msd_spleen_ct" / "labelsTr" / "spleen_8.nii.gz"


class _Datastore:
    """The one datastore method the trainer's data checks use."""

    def __init__(self, datalist):
        self._datalist = datalist

    def datalist(self):
        return self._datalist


@pytest.fixture(scope="module")
def full_size_labels(data_dir, tmp_path_factory):
    """Saved labels as a viewer writes them, at the real spleen CT's size (512x512x32), and their contents."""
    root = tmp_path_factory.mktemp("full_size_labels")
    spleen = nib.load(str(_spleen_label(data_dir)))
    spleen_array = np.asarray(spleen.dataobj).astype(np.uint8)
    assert spleen_array.shape == (512, 512, 32)
    # Several structures, one below the trainer's size limit: spleen 1, a box 3, 5 stray voxels of 7.
    multi = spleen_array.copy()
    multi[40:80, 300:360, 4:20] = 3
    multi[0, 0, :5] = 7
    paths = {"spleen": _spleen_label(data_dir), "multi": root / "multi.nii.gz", "empty": root / "empty.nii.gz",
             "nrrd": root / "multi.nrrd", "unreadable": root / "unreadable.nii.gz"}
    nib.save(nib.Nifti1Image(multi, spleen.affine), str(paths["multi"]))
    nib.save(nib.Nifti1Image(np.zeros_like(spleen_array), spleen.affine), str(paths["empty"]))
    # 3D Slicer saves labels as NRRD too (ITK index order: the array transposed).
    sitk.WriteImage(sitk.GetImageFromArray(multi.transpose(2, 1, 0)), str(paths["nrrd"]))
    paths["unreadable"].write_bytes(b"not a label map" * 100)
    # Their image (the trainer reads every record's image header too): the spleen CT under each name.
    (root / "images").mkdir()
    for name in ("spleen", "multi", "empty", "unreadable"):
        os.symlink(data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz", root / "images" / f"{name}.nii.gz")
    arrays = {"spleen": spleen_array, "multi": multi, "nrrd": multi}
    return paths, arrays


@pytest.mark.parametrize("kind", ["spleen", "multi", "nrrd"])
def test_label_values_of_full_size_labels_are_the_true_values_and_counts(app_lib, full_size_labels, kind):
    trainer = app_lib["trainers.sam_med3d"]
    paths, arrays = full_size_labels
    values, counts = np.unique(arrays[kind], return_counts=True)
    expected = {int(v): int(n) for v, n in zip(values, counts) if v != 0}
    assert trainer.label_voxel_counts(str(paths[kind])) == expected
    assert trainer.label_values(str(paths[kind])) == sorted(v for v, n in expected.items() if n >= 8)
    if kind == "spleen":  # the real MSD label: 163456 spleen voxels (was: zeros or garbage from freed memory)
        assert expected == {1: 163456}
    else:
        assert trainer.label_values(str(paths[kind])) == [1, 3]  # value 7 has 5 voxels: too small to train on


def _record_image(paths, name: str) -> str:
    """The image of a test datalist record (the spleen CT under ``name``)."""
    return str(paths["multi"].parent / "images" / f"{name}.nii.gz")


def test_trainer_datalist_expansion_on_full_size_labels(app_lib, full_size_labels):
    trainer = app_lib["trainers.sam_med3d"]
    paths, _ = full_size_labels
    datalist = [{"image": _record_image(paths, name), "label": str(paths[name])}
                for name in ("spleen", "empty", "multi", "unreadable")]
    # Empty and unreadable labels are skipped with a warning; every other value becomes one binary target.
    assert trainer.expand_targets(datalist) == [
        {"image": _record_image(paths, "spleen"), "label": str(paths["spleen"]), "label_value": 1},
        {"image": _record_image(paths, "multi"), "label": str(paths["multi"]), "label_value": 1},
        {"image": _record_image(paths, "multi"), "label": str(paths["multi"]), "label_value": 3},
    ]
    assert trainer.trainable_datalist(_Datastore(datalist)) == datalist


def test_a_split_that_leaves_training_empty_trains_on_the_validation_targets(app_lib, full_size_labels, tmp_path):
    from types import SimpleNamespace

    from monailabel.tasks.train.basic_train import Context

    trainer_module = app_lib["trainers.sam_med3d"]
    paths, _ = full_size_labels
    trainer = trainer_module.SamMed3DTrainer(str(tmp_path), SimpleNamespace(device="cpu"), {"spleen": 1}, epochs=1,
                                             val_split=0.5, lr=1e-4, train_clicks=2, multi_gpu=False)
    context = Context()
    context.request, context.local_rank = {"val_split": 0.5}, 0
    # MONAI Label's split (not shuffled) puts the first image into training: here the empty one.
    context.datalist = [{"image": _record_image(paths, "empty"), "label": str(paths["empty"])},
                        {"image": _record_image(paths, "spleen"), "label": str(paths["spleen"])}]
    train, val = trainer.partition_datalist(context)
    assert train == [{"image": _record_image(paths, "spleen"), "label": str(paths["spleen"]), "label_value": 1}]
    assert val == []


@pytest.mark.parametrize("labels, message", [
    ((), "nothing to train on: no image has a saved final label yet"),
    (("empty", "unreadable"), "nothing to train on: the 2 saved final label(s) (empty.nii.gz, unreadable.nii.gz) "
                              "hold no structure of 8+ voxels"),
])
def test_nothing_to_train_on_is_a_409_naming_the_reason(app_lib, full_size_labels, labels, message):
    trainer = app_lib["trainers.sam_med3d"]
    paths, _ = full_size_labels
    datalist = [{"image": f"{name}.nii.gz", "label": str(paths[name])} for name in labels]
    with pytest.raises(trainer.NothingToTrain) as err:
        trainer.trainable_datalist(_Datastore(datalist))
    assert err.value.status_code == 409
    assert message in err.value.detail


# ------------------------------------------------------------------------------------------------------ info
def test_info_lists_the_model_labels_trainer_and_strategies(client):
    info = client.info()
    model = info["models"][MODEL]
    assert model["type"] == "deepedit"  # Slicer and OHIF show their click tools for this type
    assert model["dimension"] == 3
    assert model["labels"] == {"background": 0, "spleen": 1, "liver": 2}
    assert info["labels"] == ["background", "spleen", "liver"]  # OHIF drops the first entry as background
    assert MODEL in info["trainers"]
    assert {"random", "first", f"{MODEL}_uncertainty"} <= set(info["strategies"])
    assert f"{MODEL}_uncertainty" in info["scoring"]
    assert info["datastore"]["total"] == len(CASES)


# ----------------------------------------------------------------------------------------------------- infer
def test_slicer_clicks_return_a_label_on_the_image_grid_and_reuse_the_embedding(server, client):
    image = _image(server, "t2")
    # 3D Slicer (DeepEdit multi-label mode): every label's points, "background" points, and the current label.
    params = {"spleen": [[30, 27, 26]], "liver": [], "background": [], "label": "spleen"}
    result_file, result = client.infer(MODEL, "t2", params)
    label = nib.load(result_file)
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-5)
    values = set(np.unique(np.asarray(label.dataobj)).tolist())
    assert values <= {0, 1}
    assert result["encoder_ran"] is True
    assert result["labels_updated"] == ["spleen"]
    assert result["label_names"]["background"] == 0
    assert ("spleen" in result["label_names"]) == (1 in values)
    assert result["sam_med3d"]["spleen"]["voxels"] == int((np.asarray(label.dataobj) == 1).sum())

    # A second click inside the same crop: the image encoder does not run again.
    params = {"spleen": [[30, 27, 26]], "liver": [], "background": [[33, 27, 26]], "label": "spleen"}
    result_file, result = client.infer(MODEL, "t2", params)
    assert result["encoder_ran"] is False
    assert result["timings"]["encode"] == 0.0
    assert nib.load(result_file).shape == image.shape


def test_ohif_clicks_without_current_label_return_nrrd(server, client):
    image = _image(server, "t1w")
    # OHIF v3 "Point Prompts" for a deepedit model, as the bundled OHIF sends it: label keys + background,
    # no "label"; NRRD uint8 output.
    params = {"background": [[5, 5, 5]], "spleen": [[21, 38, 38]], "liver": [[21, 40, 20]],
              "result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
              "restore_label_idx": False}
    result_file, result = client.infer(MODEL, "t1w", params)
    assert result_file.endswith(".nrrd")
    assert result["labels_updated"] == ["spleen", "liver"]  # every label with clicks, in value order
    assert result["centroids"] == {}  # OHIF v3 reads this key
    written = sitk.ReadImage(result_file)
    array = sitk.GetArrayFromImage(written).transpose(2, 1, 0)  # back to the (i, j, k) order of the NIfTI
    assert array.shape == image.shape
    assert array.dtype == np.uint8
    assert set(np.unique(array).tolist()) <= {0, 1, 2}
    # Same voxel -> world mapping as the image (ITK stores LPS; the NIfTI affine is RAS).
    ras = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(written.GetDirection()).reshape(3, 3) * np.asarray(
        written.GetSpacing())[None, :]
    np.testing.assert_allclose(ras, image.affine[:3, :3], atol=1e-4)


def test_a_new_label_is_merged_without_erasing_other_labels(server, client):
    first_file, _ = client.infer(MODEL, "mr_sm", {"spleen": [[58, 45, 10]], "label": "spleen"})
    first = np.asarray(nib.load(first_file).dataobj).copy()
    second_file, second_result = client.infer(MODEL, "mr_sm", {"liver": [[30, 40, 10]], "label": "liver"})
    second = np.asarray(nib.load(second_file).dataobj)
    assert second_result["labels_updated"] == ["liver"]
    # Every spleen voxel of the first answer survives; liver only takes voxels that were free.
    assert np.array_equal(second == 1, first == 1)
    assert np.all(first[second == 2] == 0)


def test_a_previous_label_sent_by_the_client_is_kept(server, client, tmp_path):
    image = _image(server, "mr_sm")
    previous = np.zeros(image.shape, dtype=np.uint8)
    previous[5:15, 5:15, 2:6] = 1  # a hand-drawn "spleen" the server has never seen
    path = tmp_path / "previous.nii.gz"
    nib.save(nib.Nifti1Image(previous, image.affine), str(path))
    # With a label file the client cannot also send "label" (MONAI Label uses that key for the file).
    result_file, result = client.infer(MODEL, "mr_sm", {"liver": [[80, 50, 12]]}, label_in=str(path))
    merged = np.asarray(nib.load(result_file).dataobj)
    assert result["labels_updated"] == ["liver"]
    assert np.all(merged[previous == 1] == 1)


# -------------------------------------------------------------------------------- datastore, active learning
def test_save_label_then_next_sample_skips_labelled_images(server, client, data_dir):
    client.save_label("t2", str(_source_label(data_dir, "t2")), tag="final")
    info = client.info()
    assert info["datastore"]["completed"] >= 1
    for strategy in ("first", "random", f"{MODEL}_uncertainty"):
        sample = client.next_sample(strategy, {})
        assert sample["id"] in CASES and sample["id"] != "t2"
        assert Path(sample["path"]).is_file()


def test_uncertainty_scoring_writes_scores_and_ranks_the_next_sample(server, client):
    response = requests.post(f"{server.url}/scoring/{MODEL}_uncertainty", params={"run_sync": "true"}, timeout=600)
    assert response.status_code == 200, response.text
    datastore = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    unlabelled = [i for i, obj in datastore["objects"].items() if "final" not in obj.get("labels", {})]
    strategy = f"{MODEL}_uncertainty"
    scores, recently_served = {}, set()
    for image_id in unlabelled:
        info = requests.get(f"{server.url}/datastore/image/info", params={"image": image_id}, timeout=30).json()
        scores[image_id] = info["sam_med3d_uncertainty"]
        assert 0.0 <= scores[image_id] <= 1.0
        if time.time() - info.get("strategy", {}).get(strategy, {}).get("ts", 0) < 600:
            recently_served.add(image_id)
    # The most uncertain image, among those this strategy has not handed out in the last 10 minutes.
    candidates = {k: v for k, v in scores.items() if k not in recently_served} or scores
    sample = client.next_sample(strategy, {})
    assert sample["id"] == max(candidates, key=candidates.get)
    assert sample["sam_med3d_uncertainty"] == pytest.approx(candidates[sample["id"]])


# ------------------------------------------------------------------------------------------------ training
def test_training_with_validation_reports_val_dice_and_clicks_are_answered_meanwhile(server, client, data_dir):
    """Publishing and the next click on the new weights are checked by the Slicer loop test below."""
    for image_id in ("t2", "t1w"):
        client.save_label(image_id, str(_source_label(data_dir, image_id)), tag="final")
    client.train_start(MODEL, {"max_epochs": 1, "val_split": 0.5, "train_clicks": 2})
    # Training runs in a subprocess: a click is answered while it runs (still running after the answer).
    _, during = client.infer(MODEL, "breast1", {"spleen": [[20, 60, 10]], "label": "spleen"})
    assert during["labels_updated"] == ["spleen"]
    assert client.train_status(check_if_running=True)
    status = wait_for_training(server.url, timeout_s=900)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    stats = client.info()["train_stats"][MODEL]
    assert stats["eval"]["key_metric_name"] == "val_mean_dice"
    assert 0.0 <= stats["eval"]["metrics"]["val_mean_dice"] <= 1.0


# ------------------------------------------------------------------- 3D Slicer's loop on the full-size spleen CT
SPLEEN_ID = "spleen_8"
SPLEEN_CLICK = [129, 219, 18]  # voxel (i, j, k) inside the spleen of msd_spleen_ct/spleen_8 (512x512x32)
SPLEEN_BACKGROUND_CLICK = [330, 250, 18]


@pytest.fixture(scope="module")
def spleen_server(data_dir, mini_checkpoint, tmp_path_factory):
    """A server on the real 512x512x32 spleen CT alone, with no saved label at start (vit_mini weights)."""
    root = tmp_path_factory.mktemp("spleen_server")
    app = copy_app(root / "app")
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz", studies / f"{SPLEEN_ID}.nii.gz")
    srv = start_server(app, studies, {"model": "vit_mini", "checkpoint": str(mini_checkpoint), "labels": LABELS,
                                      "device": "cpu"},
                       log_path=root / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.root, srv.app, srv.studies = root, app, studies
    yield srv
    srv.stop()


def _slicer_config(info: dict, section: str, name: str) -> dict:
    """What 3D Slicer's MONAILabel module sends as a task's options (``getParamsFromConfig``): the task's
    ``config`` from ``/info``, each list (a drop-down) replaced by its first entry."""
    config = info[section].get(name, {}).get("config", {})
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def _slicer_click_params(info: dict, points: dict, current_label: str) -> dict:
    """The request of Slicer's DeepEdit multi-label mode (a deepedit model with labels): the landmarks of every
    label of ``/info`` by name (``background`` included), the segment being edited as ``label``, the model's
    options, and the NRRD/uint8 result that ``MONAILabelLogic.infer`` always asks for."""
    params = {name: points.get(name, []) for name in info["labels"]}
    params["label"] = current_label
    params.update(_slicer_config(info, "models", MODEL))
    params["result_extension"] = ".nrrd"
    params["result_dtype"] = "uint8"
    return params


def _final_labels(url: str) -> list:
    objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    return [image_id for image_id, obj in objects.items() if "final" in obj.get("labels", {})]


def _remove_final_labels(url: str, timeout_s: float = 30.0) -> None:
    """Delete every saved final label and wait until the datastore no longer lists any."""
    for image_id in _final_labels(url):
        assert requests.delete(f"{url}/datastore/label", params={"id": image_id, "tag": "final"},
                               timeout=30).status_code == 200
    deadline = time.monotonic() + timeout_s
    while _final_labels(url):
        assert time.monotonic() < deadline, "the datastore still lists deleted labels"
        time.sleep(0.5)


def _train_task_count(url: str) -> int:
    response = requests.get(f"{url}/train/", params={"all": "true"}, timeout=30)
    return 0 if response.status_code == 404 else len(response.json())  # 404: "No Train Tasks Found"


def test_train_with_nothing_to_train_on_is_refused_at_once_and_the_server_keeps_serving(spleen_server, tmp_path):
    url = spleen_server.url
    _remove_final_labels(url)  # whatever ran before: a datastore with no saved label
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    tasks_before = _train_task_count(url)

    # OHIF's Update Model (POST /train/, every trainer) and Slicer's Train (POST /train/<model>).
    for path in ("/train/", f"/train/{MODEL}"):
        response = requests.post(f"{url}{path}", json={MODEL: {"max_epochs": 1}} if path == "/train/" else {},
                                 timeout=60)
        assert response.status_code == 409, response.text
        assert response.json()["detail"].startswith("nothing to train on: no image has a saved final label")
    # What Slicer's error dialog shows: "Failed to run training ... Message: Status: 409; Response: {detail}".
    with pytest.raises(Exception) as err:
        client.train_start(MODEL, _slicer_config(client.info(), "trainers", MODEL))
    assert "Status: 409" in err.value.msg and "nothing to train on" in err.value.msg

    # A saved label with nothing drawn in it is refused the same way, naming the label file.
    empty = tmp_path / "empty.nii.gz"
    image = nib.load(str(spleen_server.studies / f"{SPLEEN_ID}.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(image.shape, dtype=np.uint8), image.affine), str(empty))
    client.save_label(SPLEEN_ID, str(empty))
    try:
        response = requests.post(f"{url}/train/{MODEL}", json={}, timeout=60)
        assert response.status_code == 409, response.text
        assert "hold no structure of 8+ voxels" in response.json()["detail"]
        assert f"{SPLEEN_ID}.nii.gz" in response.json()["detail"]
    finally:
        _remove_final_labels(url)

    assert _train_task_count(url) == tasks_before  # no training subprocess was started
    assert requests.get(f"{url}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 404
    _, result = client.infer(MODEL, SPLEEN_ID, {"spleen": [SPLEEN_CLICK], "label": "spleen"})  # still serving
    assert result["labels_updated"] == ["spleen"]


def test_the_extension_runs_in_the_server_and_reports_its_crops(spleen_server, tmp_path):
    """Default --conf extension slide: the result says how many crops each label used (untrained vit_mini
    masks reach their crop faces, so more than one), within --conf extension_max_crops (8)."""
    client = MONAILabelClient(spleen_server.url, tmpdir=str(tmp_path))
    _, result = client.infer(MODEL, SPLEEN_ID, {"spleen": [SPLEEN_CLICK], "background": [], "label": "spleen"})
    crops = result["sam_med3d"]["spleen"]["crops"]
    assert 1 <= crops <= 8 and result["timings"]["crops"] == crops
    assert result["sam_med3d"]["spleen"]["voxels"] > 0


def test_slicer_loop_click_submit_label_train_then_the_next_click_uses_the_new_weights(spleen_server, data_dir,
                                                                                       tmp_path):
    url = spleen_server.url
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    published = spleen_server.app / "model" / "finetuned_vit_mini.pt"
    assert not published.exists()
    info = client.info()
    # A deepedit model with labels: Slicer's DeepEdit multi-label mode (landmarks per label, no negative list).
    assert info["models"][MODEL]["type"] == "deepedit" and info["models"][MODEL]["labels"]
    assert info["labels"] == ["background", "spleen", "liver"]

    # Next Sample.
    if not _final_labels(url):
        sample = client.next_sample("random", _slicer_config(info, "strategies", "random"))
        assert sample["id"] == SPLEEN_ID

    # Clicks: a spleen landmark and a background landmark, the spleen segment selected.
    params = _slicer_click_params(info, {"spleen": [SPLEEN_CLICK], "background": [SPLEEN_BACKGROUND_CLICK]},
                                  "spleen")
    assert set(params) >= {"background", "spleen", "liver", "label", "result_extension", "result_dtype"}
    before_file, before = client.infer(MODEL, SPLEEN_ID, params)
    assert before_file.endswith(".nrrd")
    written = sitk.GetArrayFromImage(sitk.ReadImage(before_file)).transpose(2, 1, 0)
    assert written.shape == (512, 512, 32) and written.dtype == np.uint8
    assert set(np.unique(written).tolist()) <= {0, 1}
    assert before["labels_updated"] == ["spleen"]
    assert before["model"]["file"] != str(published)
    weights_before = requests.get(f"{url}/model/info/{MODEL}", timeout=30).json()

    # Submit Label: Slicer exports the segments (background left out) to a label map, .nii.gz by default,
    # and PUTs it with its label_info and no tag, i.e. as the image's final label.
    saved = client.save_label(SPLEEN_ID, str(_spleen_label(data_dir)),
                              params={"label_info": [{"name": "spleen", "idx": 1}]})
    assert saved["image"] == SPLEEN_ID
    assert _final_labels(url) == [SPLEEN_ID]
    assert client.info()["datastore"]["completed"] == 1

    # Train: the trainer's options as Slicer's Options table sends them, with a short run.
    train_params = _slicer_config(client.info(), "trainers", MODEL)
    train_params.update({"max_epochs": 2, "val_split": 0.0, "train_clicks": 2})
    started = client.train_start(MODEL, train_params)
    assert started["status"] in ("SUBMITTED", "RUNNING")
    status = wait_for_training(url, timeout_s=900)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    assert published.is_file()
    assert client.info()["train_stats"][MODEL]["epoch"] == 2  # Slicer's training progress bar
    weights_after = requests.get(f"{url}/model/info/{MODEL}", timeout=30).json()
    assert weights_after["checksum"] != weights_before["checksum"]
    assert client.info()["models"][MODEL]["model_file"] == str(published)

    # The same clicks again: answered by the new weights (new embedding, different IoU-head score).
    after_file, after = client.infer(MODEL, SPLEEN_ID, params)
    assert after["model"]["file"] == str(published)
    assert after["encoder_ran"] is True
    assert after["sam_med3d"]["spleen"]["iou"] != before["sam_med3d"]["spleen"]["iou"]
    assert sitk.ReadImage(after_file).GetSize() == (512, 512, 32)


# -------------------------------------------------------------------------------------- full-size model
@pytest.mark.slow
def test_full_vit_b_ori_answers_one_click(data_dir, fixtures_dir, fill_module, tmp_path_factory):
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("vit_b_server")
    manifest = json.loads((fixtures_dir / "manifest_vit_b_ori.json").read_text())
    weights = fill_module.fill_state_dict({e["name"]: e["shape"] for e in manifest["entries"]})
    model = build_sam_med3d("vit_b_ori")
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
    checkpoint = save_checkpoint(model, root / "vit_b_ori_fixture.pt")
    del model, weights

    studies = root / "studies"
    studies.mkdir()
    shutil.copy(data_dir / "sct_spinalcord_mri" / "imagesTr" / "t2.nii.gz", studies / "t2.nii.gz")
    srv = start_server(copy_app(root / "app"), studies,
                       {"model": "vit_b_ori", "checkpoint": str(checkpoint), "labels": LABELS, "device": "cpu"},
                       log_path=root / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        client = MONAILabelClient(srv.url, tmpdir=str(root))
        assert client.info()["models"][MODEL]["type"] == "deepedit"
        result_file, result = client.infer(MODEL, "t2", {"spleen": [[30, 27, 26]], "label": "spleen"})
        assert result["model"]["arch"] == "vit_b_ori"
        assert result["encoder_ran"] is True
        label = nib.load(result_file)
        image = nib.load(str(studies / "t2.nii.gz"))
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-5)
    finally:
        srv.stop()


def test_unknown_model_name_stops_the_server_with_a_clear_error(data_dir, mini_checkpoint, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    with pytest.raises(RuntimeError, match="--conf model 'vit_huge' is not a known SAM-Med3D architecture"):
        start_server(copy_app(tmp_path / "app"), studies,
                     {"model": "vit_huge", "checkpoint": str(mini_checkpoint)}, log_path=tmp_path / "server.log",
                     timeout_s=120)
