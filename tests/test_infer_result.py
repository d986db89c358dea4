"""The label map a click returns: the box-local merge of ``SamMed3DInfer._predict`` and the file
``lib.infers.result_writer`` writes (NRRD and NIfTI read back by ITK, pynrrd and nibabel)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from app_helpers import APP_DIR
from sam_med3d.io import load_scan

sys.path.insert(0, str(APP_DIR))
try:
    from lib.errors import InvalidRequest  # noqa: E402
    from lib.infers import result_writer  # noqa: E402
    from lib.infers.viewer_clicks import LabelClicks, label_names_present  # noqa: E402
    from lib.infers.result_writer import remove_stale_results, result_folder, write_result  # noqa: E402
    from lib.infers.sam_med3d import SamMed3DInfer  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))

SHAPE = (30, 25, 20)
LABELS = {"background": 0, "spleen": 1, "liver": 2}
#: Oblique, anisotropic, flipped: every term of the geometry is exercised.
AFFINE = np.array([[-0.78, 0.05, 0.0, 120.5], [0.02, 0.81, -0.1, -80.25], [0.0, 0.03, 2.5, 14.0], [0, 0, 0, 1.0]])


class ScriptedPredictor:
    """Returns the next scripted ``(region, region_mask)`` as a PredictionResult-like object."""

    def __init__(self, script):
        self.script = list(script)

    def predict(self, points, labels, label_key):
        region, region_mask = self.script.pop(0)
        return SimpleNamespace(region_ijk=region, region_mask=region_mask, timings={"decode": 0.0}, iou=0.5,
                               encoder_ran=False, crop_boxes=((0, 0, 0),))


def _task() -> SamMed3DInfer:
    task = SamMed3DInfer.__new__(SamMed3DInfer)  # only what _predict uses: no model, no sessions
    task.label_values = dict(LABELS)
    return task


def _random_prediction(rng):
    lo = rng.integers(0, np.asarray(SHAPE) - 4)
    hi = np.minimum(lo + rng.integers(4, 16, 3), SHAPE)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return region, (rng.random(tuple(hi - lo)) > 0.4).astype(np.uint8)


def test_box_local_merge_equals_the_full_size_merge():
    """Clearing the label's old voxels in its last box and writing the new mask in the crop's region gives the
    same map as the full-size rule (clear every voxel of the label, write where no other label is), click
    after click, for labels whose crops move, a C-ordered starting map, and an uploaded map the task did not
    fill (its labels may be anywhere)."""
    rng = np.random.default_rng(0)
    task = _task()
    session = SimpleNamespace(label_map=np.zeros(SHAPE, np.uint8), predictor=None)  # C order, as a new client's
    reference = np.zeros(SHAPE, np.uint8)
    for step in range(40):
        if step == 20:  # the client sends a label file: labels scattered everywhere, unknown boxes
            uploaded = rng.choice([0, 0, 0, 1, 2], size=SHAPE).astype(np.uint8)
            session.label_map, reference = np.asfortranarray(uploaded), uploaded.copy()
        name = ("spleen", "liver")[int(rng.integers(0, 2))]
        region, region_mask = _random_prediction(rng)
        session.predictor = ScriptedPredictor([(region, region_mask)])
        target = LabelClicks(name, LABELS[name], np.zeros((1, 3), np.int64), np.ones(1, np.int64))
        per_label, timings = task._predict(session, [target])
        full = np.zeros(SHAPE, bool)
        full[region] = region_mask > 0
        reference[reference == LABELS[name]] = 0
        reference[full & (reference == 0)] = LABELS[name]
        np.testing.assert_array_equal(session.label_map, reference, err_msg=f"step {step}")
        assert session.label_map.flags.f_contiguous and "merge" in timings
        assert per_label[name]["voxels"] == int(region_mask.sum())
        # The names sent back, looked up in the boxes only, are those of the values present.
        present = set(np.unique(reference).tolist())
        expected = {n: v for n, v in LABELS.items() if v == 0 or v in present}
        assert label_names_present(session.label_map, LABELS, task._label_boxes(session)) == expected
        assert label_names_present(session.label_map, LABELS) == expected


def test_a_new_clients_map_is_fresh_and_nothing_is_searched_outside_the_written_boxes():
    """A new client's all-zero Fortran map (``fresh``) is not scanned: boxes of unwritten labels are None."""
    task = _task()
    session = SimpleNamespace(label_map=np.zeros(SHAPE, np.uint8, order="F"), predictor=None, fresh=True)
    region = (slice(2, 12), slice(3, 9), slice(0, 5))
    session.predictor = ScriptedPredictor([(region, np.ones((10, 6, 5), np.uint8))])
    task._predict(session, [LabelClicks("spleen", 1, np.zeros((1, 3), np.int64), np.ones(1, np.int64))])
    boxes = task._label_boxes(session)
    assert boxes[2] is None and boxes[1] == region
    assert label_names_present(session.label_map, LABELS, boxes) == {"background": 0, "spleen": 1}
    # A value outside its recorded box is not found there (the boxes are trusted, which is why they must hold).
    session.label_map[29, 24, 19] = 2
    assert "liver" not in label_names_present(session.label_map, LABELS, boxes)
    assert "liver" in label_names_present(session.label_map, LABELS)


def test_result_files_go_to_the_ram_folder_only_when_it_has_room(tmp_path, monkeypatch):
    ram = tmp_path / "shm"
    ram.mkdir()
    assert result_folder(1000, str(ram)) == str(ram)  # tmp_path has far more than the reserve free
    assert result_folder(1 << 60, str(ram)) is None  # no room: the system's temporary folder
    assert result_folder(1000, str(tmp_path / "missing")) is None
    monkeypatch.setattr(result_writer, "RAM_FOLDER", str(ram))
    monkeypatch.setattr(result_writer.tempfile, "tempdir", str(tmp_path))
    request = {"result_extension": ".nrrd", "result_dtype": "uint8"}
    path = write_result(request, "x.nii.gz", np.zeros(SHAPE, np.uint8, order="F"), AFFINE)
    assert path.startswith(str(ram) + "/" + result_writer.RESULT_PREFIX) and path.endswith(".nrrd")


def test_stale_result_files_are_removed_and_nothing_else(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setattr(result_writer.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    ram = tmp_path / "shm"
    ram.mkdir()
    old = time.time() - 7200
    stale = [ram / f"{result_writer.RESULT_PREFIX}a.nrrd", tmp_path / "tmp" / f"{result_writer.RESULT_PREFIX}b.nii.gz"]
    keep = [ram / f"{result_writer.RESULT_PREFIX}new.nrrd", ram / "other_program.bin", tmp_path / "tmp" / "x.nrrd"]
    for path in stale + keep:
        path.write_bytes(b"x")
    for path in stale + keep[1:]:
        os.utime(path, (old, old))
    assert remove_stale_results(3600, str(ram)) == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_an_empty_prediction_leaves_no_voxel_of_the_label():
    task = _task()
    session = SimpleNamespace(label_map=np.zeros(SHAPE, np.uint8, order="F"), predictor=None)
    target = LabelClicks("spleen", 1, np.zeros((1, 3), np.int64), np.ones(1, np.int64))
    region = (slice(2, 12), slice(3, 9), slice(0, 5))
    session.predictor = ScriptedPredictor([(region, np.ones((10, 6, 5), np.uint8)),
                                           (region, np.zeros((10, 6, 5), np.uint8))])
    task._predict(session, [target])
    assert session.label_map.sum() == 300
    task._predict(session, [target])
    assert not session.label_map.any()


def _map(order: str) -> np.ndarray:
    label_map = np.zeros(SHAPE, np.uint8, order=order)
    label_map[3:9, 4:20, 2:7] = 1
    label_map[20:28, 1:5, 10:19] = 2
    label_map[0, 0, 0], label_map[29, 24, 19] = 2, 1  # the corners show a transposed or flipped axis
    return label_map


@pytest.mark.parametrize("extension, dtype, compress", [
    (".nrrd", "uint8", False), (".nrrd", "uint16", False), (".nrrd", "uint8", True), (".nrrd", None, False),
    (".nii", None, False), (".nii.gz", "uint8", False), (".NRRD", "uint8", False), (".mha", "uint8", False),
])
@pytest.mark.parametrize("order", ["F", "C"])
def test_result_file_holds_the_map_on_the_scan_geometry(extension, dtype, compress, order):
    """What the viewer gets: the same voxels (i, j, k) and the scan's affine, read back by ITK (as Slicer and
    this package read it), pynrrd / nibabel, in the dtype asked for, from a Fortran- or C-ordered map."""
    label_map = _map(order)
    path = write_result({"result_extension": extension, "result_dtype": dtype, "result_compress": compress},
                        "scan.nii.gz", label_map, AFFINE)
    try:
        assert path.endswith(extension.lower())
        scan = load_scan(path)  # ITK for NRRD / MHA (LPS -> RAS), nibabel for NIfTI
        np.testing.assert_array_equal(scan.array, label_map)
        np.testing.assert_allclose(scan.affine, AFFINE, atol=1e-6)
        itk = sitk.ReadImage(path)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), label_map)
        assert sitk.GetArrayFromImage(itk).dtype == np.dtype(dtype or "uint8")
        if extension.lower() == ".nrrd":
            data, header = nrrd.read(path)
            np.testing.assert_array_equal(data, label_map)
            assert header["encoding"] == ("gzip" if compress else "raw")
            assert header["space"] == "left-posterior-superior"
        if extension.startswith(".nii"):
            image = nib.load(path)
            np.testing.assert_array_equal(np.asarray(image.dataobj), label_map)
            np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)
            assert image.get_data_dtype() == np.dtype(dtype or "uint8")
    finally:
        import os
        os.unlink(path)


def test_a_result_dtype_that_is_not_an_integer_type_is_refused():
    for bad in ("float32", "complex64", "no_such_type"):
        with pytest.raises(InvalidRequest, match="result_dtype"):
            write_result({"result_extension": ".nrrd", "result_dtype": bad}, "scan.nii.gz", _map("F"), AFFINE)


def test_result_compress_from_the_server_option_when_the_request_does_not_say(tmp_path):
    import os

    task = _task()
    label_map = _map("F")
    for conf, request, encoding in ((True, {}, "gzip"), (False, {}, "raw"), (True, {"result_compress": False}, "raw")):
        task.result_compress = conf
        path = task._write({"result_extension": ".nrrd", "result_dtype": "uint8", **request}, "x.nii.gz", label_map,
                           AFFINE)
        try:
            data, header = nrrd.read(path)
            assert header["encoding"] == encoding
            np.testing.assert_array_equal(data, label_map)
        finally:
            os.unlink(path)
