"""The app's local datastore (``apps/sam_med3d/lib/datastore/local.py``) on a temporary studies folder.

Hostile ids, tags and file names are refused before anything touches the disk; uploads are validated (3D,
finite, readable, voxel cap from the header; labels on their image's grid with integer values 0..255);
saving over a label keeps the previous version; a label saved with another extension leaves one current
file; deleting archives and never brings back a superseded file. Every test checks that nothing appeared
outside the studies folder (a sentinel folder beside it is compared before and after).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from app_helpers import APP_DIR

sys.path.insert(0, str(APP_DIR))
try:
    from lib.datastore.local import HISTORY_DIR, SafeLocalDatastore  # noqa: E402
    from lib.activelearning.uncertainty import UncertaintyScoring  # noqa: E402
    from lib.errors import InvalidRequest  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))

SHAPE = (12, 10, 8)  # (i, j, k) as nibabel writes it
AFFINE = np.diag([1.5, 1.2, 3.0, 1.0])
AFFINE[:3, 3] = [-10.0, 5.0, 2.0]


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _scan(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return _write_nifti(path, rng.normal(0, 100, SHAPE).astype(np.float32))


def _label(path: Path, value: int = 1, dtype=np.uint8) -> Path:
    array = np.zeros(SHAPE, dtype=dtype)
    array[2:6, 3:7, 1:4] = value
    return _write_nifti(path, array)


def _snapshot(folder: Path) -> dict:
    """Every file below ``folder`` with its size and mtime (what a write/delete would change)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def place(tmp_path):
    """``root/studies`` with two scans, ``root/outside`` with a sentinel file, ``root/uploads`` for uploads."""
    root = tmp_path
    studies, outside, uploads = root / "studies", root / "outside", root / "uploads"
    for folder in (studies, outside, uploads):
        folder.mkdir()
    _scan(studies / "a.nii.gz", 1)
    _scan(studies / "b.nii.gz", 2)
    (outside / "keep.txt").write_text("must survive")
    before = _snapshot(outside)
    ds = SafeLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd", "*.png"])
    yield ds, studies, outside, uploads
    assert _snapshot(outside) == before, "something outside the studies folder changed"
    assert not list(root.glob("*.sh")) and not list(root.glob("*.py"))


def _refused(call, *args, status=None, match=None):
    with pytest.raises(InvalidRequest) as err:
        call(*args)
    assert 400 <= err.value.status_code < 500
    if status is not None:
        assert err.value.status_code == status, err.value.detail
    if match is not None:
        assert match in err.value.detail, err.value.detail
    return err.value


HOSTILE_NAMES = ["../outside/evil", "/abs/path", "a/b", "a\\b", "..", "x..y", "", " ", ".hidden", "a\x00b",
                 "tab\tname", "C:evil", "x" * 300, 5]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_image_ids_are_refused_everywhere(place, name):
    ds, studies, _, uploads = place
    before = _snapshot(studies)
    upload = _scan(uploads / "up.nii.gz")
    label = _label(uploads / "lab.nii.gz")
    if name != "":  # an empty id means "the upload's file name" (MONAI Label's convention)
        _refused(ds.add_image, name, str(upload), {})
    _refused(ds.save_label, name, str(label), "final", {})
    _refused(ds.remove_image, name)
    _refused(ds.remove_label, name, "final")
    _refused(ds.get_image_uri, name)
    _refused(ds.get_label_uri, name, "final")
    _refused(ds.update_image_info, name, {"x": 1})
    assert _snapshot(studies) == before


@pytest.mark.parametrize("tag", ["..", "../../somewhere", "a/b", "/tmp", ".history", "t\x00", "x" * 100])
def test_hostile_label_tags_are_refused(place, tag):
    ds, studies, _, uploads = place
    before = _snapshot(studies)
    label = _label(uploads / "lab.nii.gz")
    err = _refused(ds.save_label, "a", str(label), tag, {})
    assert "label tag" in err.detail
    _refused(ds.remove_label, "a", tag)
    _refused(ds.get_label_uri, "a", tag)
    assert _snapshot(studies) == before
    assert (studies / "a.nii.gz").exists()


@pytest.mark.parametrize("name", ["evil.sh", "x.py", "x.nii.gz.sh", "noext", "x.mhd", "x.png"])
def test_unknown_upload_extensions_are_refused(place, name):
    ds, studies, _, uploads = place
    before = _snapshot(studies)
    path = uploads / name
    path.write_bytes((uploads / "..").resolve().joinpath("studies", "a.nii.gz").read_bytes())
    err = _refused(ds.add_image, "", str(path), {})
    assert "extension" in err.detail
    _refused(ds.save_label, "a", str(path), "final", {}, match="extension")
    assert _snapshot(studies) == before


def _bomb(path: Path, dims=(4096, 4096, 4096)) -> Path:
    """A NIfTI header claiming ``dims`` uint8 voxels followed by a little gzip data (a decompression bomb)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(dims)
    header.set_qform(AFFINE, code=1)
    header.set_sform(AFFINE, code=1)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * (1 << 20)
    path.write_bytes(gzip.compress(raw))
    return path


def _write_sitk(path: Path, array: np.ndarray, vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("kind, message", [
    ("2d", "2D image"),
    ("4d", "4D or multi-channel"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
    ("text", "NIfTI file"),
    ("empty_file", "not a NIfTI file"),
    ("vector", "multi-channel"),
    ("bomb", "more than"),
])
def test_bad_image_uploads_never_land_in_the_datastore(place, kind, message):
    ds, studies, _, uploads = place
    before = _snapshot(studies)
    path = uploads / f"{kind}.nii.gz"
    if kind == "2d":
        _write_nifti(path, np.ones((10, 12), np.float32))
    elif kind == "4d":
        _write_nifti(path, np.ones((6, 5, 4, 3), np.float32))
    elif kind in ("nan", "inf"):
        array = np.ones(SHAPE, np.float32)
        array[1, 2, 3] = np.nan if kind == "nan" else np.inf
        _write_nifti(path, array)
    elif kind == "text":
        path.write_text("#!/bin/sh\necho pwned\n")
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "vector":
        path = _write_sitk(uploads / "vector.nrrd", np.ones((4, 5, 6, 3), np.float32), vector=True)
    else:
        _bomb(path)
    err = _refused(ds.add_image, f"up_{kind}", str(path), {}, status=413 if kind == "bomb" else 422, match=message)
    if kind == "bomb":
        assert "max_voxels" in err.detail
    assert _snapshot(studies) == before
    assert f"up_{kind}" not in ds.list_images()


def test_voxel_cap_is_the_constructor_option(place):
    _, studies, _, uploads = place
    small = SafeLocalDatastore(str(studies), extensions=["*.nii.gz"], max_voxels=100)
    _refused(small.add_image, "big", str(_scan(uploads / "big.nii.gz")), {}, status=413)
    _refused(small.save_label, "a", str(_label(uploads / "l.nii.gz")), "final", {}, status=413)


def test_good_upload_is_stored_atomically_and_existing_ids_are_not_overwritten(place):
    ds, studies, _, uploads = place
    # A trailing singleton dimension is a 3D scan.
    array = np.random.default_rng(3).normal(size=SHAPE + (1,)).astype(np.float32)
    up = _write_nifti(uploads / "new scan.nii.gz", array)
    assert ds.add_image("c", str(up), {"client_id": "x"}) == "c"
    assert (studies / "c.nii.gz").read_bytes() == up.read_bytes()
    assert "c" in ds.list_images()
    assert not list(studies.glob(".*.partial"))
    before = _snapshot(studies)
    err = _refused(ds.add_image, "a", str(_scan(uploads / "other.nii.gz", 9)), {}, status=409)
    assert "already exists" in err.detail
    nrrd = uploads / "other.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(up)), str(nrrd))
    _refused(ds.add_image, "a", str(nrrd), {}, status=409)  # another extension, same id
    assert _snapshot(studies) == before


@pytest.mark.parametrize("kind, message", [
    ("shape", "has shape"),
    ("spacing", "spacing"),
    ("origin", "origin"),
    ("fraction", "fractional"),
    ("negative", "0..255"),
    ("big_value", "0..255"),
    ("nan", "NaN"),
    ("2d", "2D image"),
])
def test_bad_labels_are_refused(place, kind, message):
    ds, studies, _, uploads = place
    before = _snapshot(studies)
    path = uploads / f"{kind}.nii.gz"
    good = np.zeros(SHAPE, np.float32)
    good[2:5, 2:5, 2:5] = 1
    if kind == "shape":
        _write_nifti(path, np.zeros((12, 10, 9), np.uint8))
    elif kind == "spacing":
        other = AFFINE.copy()
        other[2, 2] = 2.0
        _write_nifti(path, good.astype(np.uint8), other)
    elif kind == "origin":
        shifted = AFFINE.copy()
        shifted[:3, 3] += [5.0, 0.0, 0.0]
        _write_nifti(path, good.astype(np.uint8), shifted)
    elif kind == "fraction":
        good[3, 3, 3] = 0.5
        _write_nifti(path, good)
    elif kind == "negative":
        good[3, 3, 3] = -1
        _write_nifti(path, good.astype(np.int16))
    elif kind == "big_value":
        good[3, 3, 3] = 300
        _write_nifti(path, good.astype(np.int16))
    elif kind == "nan":
        good[3, 3, 3] = np.nan
        _write_nifti(path, good)
    else:
        _write_nifti(path, np.zeros((12, 10), np.uint8))
    _refused(ds.save_label, "a", str(path), "final", {}, status=422, match=message)
    assert _snapshot(studies) == before
    assert ds.get_label_uri("a", "final") == ""


def test_label_for_an_unknown_image_is_404(place):
    ds, studies, _, uploads = place
    err = _refused(ds.save_label, "nope", str(_label(uploads / "l.nii.gz")), "final", {}, status=404)
    assert "'nope'" in err.detail
    _refused(ds.remove_image, "nope", status=404)
    _refused(ds.remove_label, "nope", "final", status=404)
    _refused(ds.remove_label, "a", "final", status=404)


def test_float_label_with_integer_values_and_an_nrrd_label_are_accepted(place):
    ds, studies, _, uploads = place
    ds.save_label("a", str(_label(uploads / "f.nii.gz", value=2, dtype=np.float32)), "final", {})
    # The same grid written by ITK as NRRD (ITK reads both, so the geometry must match).
    image = sitk.ReadImage(str(studies / "b.nii.gz"))
    mask = sitk.Cast(image > 50, sitk.sitkUInt8)
    nrrd = uploads / "b_label.nrrd"
    sitk.WriteImage(mask, str(nrrd))
    ds.save_label("b", str(nrrd), "final", {})
    assert sorted(ds.get_labeled_images()) == ["a", "b"]


def test_label_history_keeps_every_version_and_nothing_is_resurrected(place):
    ds, studies, _, uploads = place
    first = _label(uploads / "first.nii.gz", value=1)
    second = _label(uploads / "second.nii.gz", value=2)
    ds.save_label("a", str(first), "final", {"v": 1})
    ds.save_label("a", str(second), "final", {"v": 2})
    current = studies / "labels" / "final" / "a.nii.gz"
    assert current.read_bytes() == second.read_bytes()
    history = ds.label_history("a", "final")
    assert len(history) == 1 and Path(history[0]["path"]).read_bytes() == first.read_bytes()
    assert Path(history[0]["path"]).is_relative_to(studies / HISTORY_DIR / "labels" / "final" / "a")
    assert ds.get_label_info("a", "final")["previous"].startswith(HISTORY_DIR)

    # Saving as .nrrd after .nii.gz: exactly one current file, the old one archived.
    third = uploads / "third.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(second)), str(third))
    ds.save_label("a", str(third), "final", {"v": 3})
    assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == ["a.nrrd"]
    assert ds.get_label_uri("a", "final").endswith("a.nrrd")
    assert len(ds.label_history("a", "final")) == 2

    # Deleting archives the current file and brings nothing back, also after a reload from disk.
    ds.remove_label("a", "final")
    assert list((studies / "labels" / "final").iterdir()) == []
    assert ds.get_label_uri("a", "final") == ""
    ds.refresh()
    assert "a" not in ds.get_labeled_images()
    reopened = SafeLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nrrd"])
    assert reopened.get_label_uri("a", "final") == "" and "a" in reopened.list_images()
    kept = ds.label_history("a", "final")
    assert len(kept) == 3
    assert {h["name"] for h in kept} == {"a.nii.gz", "a.nrrd"}
    # The history folder is never listed as images or a label tag.
    assert sorted(reopened.list_images()) == ["a", "b"]
    assert HISTORY_DIR not in reopened.status()["label_tags"]


def test_remove_image_removes_only_that_image_and_keeps_it(place):
    ds, studies, _, uploads = place
    ds.save_label("a", str(_label(uploads / "l.nii.gz")), "final", {})
    other = _snapshot(studies)
    ds.remove_image("a")
    assert "a" not in ds.list_images() and "b" in ds.list_images()
    assert not (studies / "a.nii.gz").exists() and (studies / "b.nii.gz").exists()
    assert (studies / "b.nii.gz").stat().st_mtime_ns == other["b.nii.gz"][1]
    assert len(list((studies / HISTORY_DIR / "images" / "a").iterdir())) == 1
    assert len(ds.label_history("a", "final")) == 1


def test_unsafe_entries_from_an_older_datastore_file_are_dropped(place):
    ds, studies, outside, _ = place
    config = studies / "datastore_v2.json"
    data = json.loads(config.read_text())
    # What MONAI Label's own datastore stored after "PUT /datastore/image?image=../outside/evil".
    data["objects"]["../outside/keep"] = {"image": {"ext": ".txt", "info": {}}, "labels": {}}
    data["objects"]["a"]["labels"]["../../x"] = {"ext": ".nii.gz", "info": {}}
    config.write_text(json.dumps(data))
    os.utime(config, (1, 1))
    reopened = SafeLocalDatastore(str(studies), extensions=["*.nii.gz"])
    assert sorted(reopened.list_images()) == ["a", "b"]
    assert "../../x" not in reopened.get_labels_by_image_id("a")
    _refused(reopened.remove_image, "../outside/keep")
    assert (outside / "keep.txt").exists()


# ------------------------------------------------------------------------------------- links and spellings
def test_links_leading_outside_the_studies_folder_are_never_read_or_written(tmp_path):
    """A scan linked in from outside is not listed or read; a label-tag folder or ``.history`` linked outside is
    never written to (each was followed by MONAI Label's datastore)."""
    studies, outside, uploads = tmp_path / "studies", tmp_path / "outside", tmp_path / "uploads"
    for folder in (studies, outside, uploads):
        folder.mkdir()
    _scan(studies / "a.nii.gz", 1)
    _scan(outside / "private.nii.gz", 5)
    os.symlink(outside / "private.nii.gz", studies / "leak.nii.gz")
    (studies / "labels").mkdir()
    os.symlink(outside, studies / "labels" / "evil")
    _scan(studies / "inside_target.nii.gz", 6)
    os.symlink(studies / "inside_target.nii.gz", studies / "alias.nii.gz")  # a link inside is fine
    before = _snapshot(outside)
    ds = SafeLocalDatastore(str(studies), extensions=["*.nii.gz"])
    assert "leak" not in ds.list_images() and "alias" in ds.list_images()
    assert all("outside" not in str(p) for r in ds.datalist() for p in r.values())
    # Writing a label under the tag whose folder leads outside.
    err = _refused(ds.save_label, "a", str(_label(uploads / "l.nii.gz")), "evil", {}, status=403)
    assert "outside the studies folder" in err.detail
    # An image whose file became a link to outside after it was listed: not read.
    os.remove(studies / "inside_target.nii.gz")
    os.symlink(outside / "private.nii.gz", studies / "inside_target.nii.gz")
    _refused(ds.get_image_uri, "inside_target", status=403)
    # The history folder linked outside: a second save (which archives the first) is refused, nothing moves out.
    ds.save_label("a", str(_label(uploads / "l1.nii.gz", 1)), "final", {})
    os.symlink(outside, studies / HISTORY_DIR)
    _refused(ds.save_label, "a", str(_label(uploads / "l2.nii.gz", 2)), "final", {}, status=403)
    assert (studies / "labels" / "final" / "a.nii.gz").exists()
    assert _snapshot(outside) == before


def test_upper_case_extensions_keep_one_current_file(place):
    """``.NII.GZ`` is stored as ``.nii.gz``; a label saved by hand as ``<id>.NII.GZ`` is archived by the next save
    and by a delete like any other (before: two current files, and a delete left one behind)."""
    ds, studies, _, uploads = place
    upper = _label(uploads / "UP.NII.GZ")
    ds.save_label("a", str(upper), "final", {})
    assert [p.name for p in (studies / "labels" / "final").iterdir()] == ["a.nii.gz"]
    assert ds.add_image("", str(_scan(uploads / "Shouting.NII.GZ", 7)), {}) == "Shouting"
    assert (studies / "Shouting.nii.gz").exists()
    # A file put there by hand with an upper-case extension.
    os.replace(studies / "labels" / "final" / "a.nii.gz", studies / "labels" / "final" / "a.NII.GZ")
    ds.save_label("a", str(_label(uploads / "again.nii.gz", 2)), "final", {})
    assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == ["a.nii.gz"]
    assert [e["name"] for e in ds.label_history("a", "final")] == ["a.NII.GZ"]
    os.replace(studies / "labels" / "final" / "a.nii.gz", studies / "labels" / "final" / "a.NII.GZ")
    ds.remove_label("a", "final")
    assert list((studies / "labels" / "final").iterdir()) == []


@pytest.mark.parametrize("kind", ["nrrd_data_file", "mha_element_data_file", "nifti_pair_header"])
def test_uploads_whose_header_names_another_file_are_refused(place, kind):
    ds, studies, outside, uploads = place
    secret = outside / "keep.txt"
    before = _snapshot(studies)
    if kind == "nrrd_data_file":
        path = uploads / "evil.nrrd"
        path.write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 12 10 8\nencoding: raw\ndata file: {secret}\n\n")
    elif kind == "mha_element_data_file":
        path = uploads / "evil.mha"
        path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = 12 10 8\nElementType = MET_UCHAR\n"
                        f"ElementDataFile = {secret}\n")
    else:
        nib.save(nib.Nifti1Pair(np.ones(SHAPE, np.uint8), AFFINE), str(uploads / "pair.hdr"))
        path = uploads / "pair.nii"
        os.replace(uploads / "pair.hdr", path)
    ds_mha = SafeLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd", "*.mha"])
    for store in (ds_mha,) if path.suffix == ".mha" else (ds, ds_mha):
        _refused(store.add_image, "evil", str(path), {}, match="another file")
        _refused(store.save_label, "a", str(path), "final", {}, match="another file")
    assert _snapshot(studies) == before


def test_scoring_reads_images_through_the_reader_with_the_voxel_cap(tmp_path, mini_checkpoint, caplog):
    """Active-learning scoring read every unlabelled image whatever its size (a scan put into the studies folder
    by hand is checked by no upload): one over the cap is now skipped from its header, one whose header names
    another file is never read, and the others are scored."""
    from types import SimpleNamespace

    from sam_med3d.checkpoint import load_model

    studies = tmp_path / "studies"
    studies.mkdir()
    rng = np.random.default_rng(0)
    _write_nifti(studies / "small.nii.gz", rng.normal(0, 100, (24, 24, 24)).astype(np.float32))
    _write_nifti(studies / "large.nii.gz", rng.normal(0, 100, (48, 48, 48)).astype(np.float32))  # 110592 voxels
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * 30000)
    (studies / "evil.nrrd").write_text(f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 24 24 24\nencoding: raw\n"
                                       f"data file: {secret}\n\n")
    datastore = SafeLocalDatastore(str(studies), extensions=["*.nii.gz", "*.nrrd"])
    assert sorted(datastore.get_unlabeled_images()) == ["evil", "large", "small"]
    model = load_model(str(mini_checkpoint), device="cpu")
    served = SimpleNamespace(device="cpu", get=lambda: (model, None), path=lambda: Path(mini_checkpoint))
    scoring = UncertaintyScoring(served, prompts=1, max_voxels=50_000)
    with caplog.at_level("WARNING"):
        result = scoring({}, datastore)
    assert sorted(result) == ["small"]
    assert "more than the 50000 accepted" in caplog.text and "names another file" in caplog.text
    assert UncertaintyScoring.KEY in datastore.get_image_info("small")
    assert UncertaintyScoring.KEY not in datastore.get_image_info("large")


@pytest.mark.parametrize("meanwhile", ["deleted", "replaced"])
def test_a_label_saved_while_its_image_is_deleted_is_not_left_behind(place, monkeypatch, meanwhile):
    """A DELETE of the image answered between the label's checks and its placement (two requests at once) left
    the label in place for an image that was gone: the next image uploaded under that id came with it."""
    ds, studies, _, uploads = place
    from lib.datastore import local

    real_check = local.check_label_file

    def check_then_delete(*args, **kwargs):
        header = real_check(*args, **kwargs)
        ds.remove_image("a")  # the other request, done while this save was validating
        if meanwhile == "replaced":
            bigger = np.random.default_rng(5).normal(0, 100, (14, 10, 8)).astype(np.float32)
            ds.add_image("a", str(_write_nifti(uploads / "other.nii.gz", bigger)), {})
        return header

    monkeypatch.setattr(local, "check_label_file", check_then_delete)
    _refused(ds.save_label, "a", str(_label(uploads / "lab.nii.gz")), "final", {}, status=409,
             match="while its label was being saved")
    monkeypatch.setattr(local, "check_label_file", real_check)
    assert not list((studies / "labels" / "final").glob("a.*")) if (studies / "labels" / "final").is_dir() else True
    reopened = SafeLocalDatastore(str(studies), extensions=["*.nii.gz"])
    if meanwhile == "replaced":
        assert reopened.get_label_uri("a", "final") == ""
    else:
        assert "a" not in reopened.list_images()
