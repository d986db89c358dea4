"""The label map a click returns: the box-local merge of the infer task (``SamMed3DInfer``, called as MONAI
Label calls it, with a scripted predictor in the image's session) and the file ``lib.infers.result_writer``
writes (NRRD and NIfTI read back by ITK, pynrrd and nibabel)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
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
    from lib.infers.fields import UPLOADED_LABEL  # noqa: E402
    from lib.infers.viewer_clicks import label_names_present  # noqa: E402
    from lib.infers.result_writer import remove_stale_results, result_folder, write_result  # noqa: E402
    from lib.infers.sam_med3d import SamMed3DInfer  # noqa: E402
    from lib.infers.sessions import ImageSession, session_key  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))

SHAPE = (30, 25, 20)
LABELS = {"background": 0, "spleen": 1, "liver": 2}
CLIENT = "annotator"
#: Oblique, anisotropic, flipped: every term of the geometry is exercised.
AFFINE = np.array([[-0.78, 0.05, 0.0, 120.5], [0.02, 0.81, -0.1, -80.25], [0.0, 0.03, 2.5, 14.0], [0, 0, 0, 1.0]])


class ScriptedPredictor:
    """Returns the next scripted ``(region, region_mask)`` as a PredictionResult-like object."""

    def __init__(self):
        self.script = []

    def predict(self, points, labels, label_key):
        region, region_mask = self.script.pop(0)
        return SimpleNamespace(region_ijk=region, region_mask=region_mask, timings={"decode": 0.0}, iou=0.5,
                               encoder_ran=False, crop_boxes=((0, 0, 0),))


class _Served:
    """What the task asks of the served model; the scripted predictor needs no weights."""

    device, arch, problem = "cpu", "scripted", None

    def __init__(self, path: Path):
        self._path = path
        self.base = SimpleNamespace(path=path)

    def get(self):
        return None, False

    def path(self):
        return self._path

    def structures(self):
        return None


class _Task:
    """A ``SamMed3DInfer`` whose session of one scan (written here) has a :class:`ScriptedPredictor`."""

    def __init__(self, folder: Path, initial_map=None):
        self.folder = folder
        self.image = str(folder / "scan.nii.gz")
        rng = np.random.default_rng(1)
        nib.save(nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), AFFINE), self.image)
        self.task = SamMed3DInfer(_Served(folder / "weights.pt"), LABELS, cache_size=2, cache_ttl_s=600)
        self.predictor = ScriptedPredictor()
        self.session = ImageSession(scan=load_scan(self.image), predictor=self.predictor, label_map=initial_map)
        self.task.sessions.put(session_key(self.image), self.session)

    def click(self, name: str, region, region_mask, **request):
        """One click on ``name`` answered by ``region_mask`` in ``region``; the label map of the result file and
        the JSON answer."""
        self.predictor.script.append((region, region_mask))
        path, result = self.task({"image": self.image, name: [[0, 0, 0]], "label": name, "client_id": CLIENT,
                                  "result_extension": ".nrrd", "result_dtype": "uint8", **request})
        try:
            data, _ = nrrd.read(path)
        finally:
            os.unlink(path)
        return data, result


def _random_prediction(rng):
    lo = rng.integers(0, np.asarray(SHAPE) - 4)
    hi = np.minimum(lo + rng.integers(4, 16, 3), SHAPE)
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return region, (rng.random(tuple(hi - lo)) > 0.4).astype(np.uint8)


def test_box_local_merge_equals_the_full_size_merge(tmp_path):
    """Clearing the label's old voxels in its last box and writing the new mask in the crop's region gives the
    same map as the full-size rule (clear every voxel of the label, write where no other label is), click
    after click, for labels whose crops move, a C-ordered starting map, and a label file sent with a click
    (its labels may be anywhere)."""
    rng = np.random.default_rng(0)
    scripted = _Task(tmp_path, initial_map=np.zeros(SHAPE, np.uint8))  # C order, not filled by the task
    reference = np.zeros(SHAPE, np.uint8)
    for step in range(40):
        sent = {}
        if step == 20:  # the client sends a label file: labels scattered everywhere, unknown boxes
            reference = rng.choice([0, 0, 0, 1, 2], size=SHAPE).astype(np.uint8)
            label_file = tmp_path / "sent_label.nii.gz"
            nib.save(nib.Nifti1Image(reference, AFFINE), str(label_file))
            sent = {UPLOADED_LABEL: str(label_file)}
        name = ("spleen", "liver")[int(rng.integers(0, 2))]
        region, region_mask = _random_prediction(rng)
        answered, result = scripted.click(name, region, region_mask, **sent)
        full = np.zeros(SHAPE, bool)
        full[region] = region_mask > 0
        reference[reference == LABELS[name]] = 0
        reference[full & (reference == 0)] = LABELS[name]
        np.testing.assert_array_equal(answered, reference, err_msg=f"step {step}")
        (kept,) = scripted.session.label_maps.values()  # the one client's map, kept for its next click
        assert kept.flags.f_contiguous and "merge" in result["timings"]
        assert result["sam_med3d"][name]["voxels"] == int(region_mask.sum())
        # The names sent back, looked up in the boxes only, are those of the values present.
        present = set(np.unique(reference).tolist())
        assert result["label_names"] == {n: v for n, v in LABELS.items() if v == 0 or v in present}
        assert label_names_present(answered, LABELS) == result["label_names"]


def test_a_new_clients_map_is_fresh_and_nothing_is_searched_outside_the_written_boxes(tmp_path):
    """A new client's all-zero map is not scanned: only the boxes the task wrote are looked in."""
    scripted = _Task(tmp_path)
    region = (slice(2, 12), slice(3, 9), slice(0, 5))
    answered, result = scripted.click("spleen", region, np.ones((10, 6, 5), np.uint8))
    assert result["label_names"] == {"background": 0, "spleen": 1} and answered[region].all()
    assert answered.sum() == 300
    # A value outside the written boxes is not found (the boxes are trusted, which is why they must hold).
    (kept,) = scripted.session.label_maps.values()  # the one client's map, kept for its next click
    kept[29, 24, 19] = 2
    answered, result = scripted.click("spleen", region, np.ones((10, 6, 5), np.uint8))
    assert answered[29, 24, 19] == 2 and "liver" not in result["label_names"]
    assert "liver" in label_names_present(answered, LABELS)


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


def test_an_empty_prediction_leaves_no_voxel_of_the_label(tmp_path):
    scripted = _Task(tmp_path)
    region = (slice(2, 12), slice(3, 9), slice(0, 5))
    answered, _ = scripted.click("spleen", region, np.ones((10, 6, 5), np.uint8))
    assert answered.sum() == 300
    answered, result = scripted.click("spleen", region, np.zeros((10, 6, 5), np.uint8))
    assert not answered.any() and result["sam_med3d"]["spleen"]["voxels"] == 0
    assert result["label_names"] == {"background": 0}


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
        os.unlink(path)


def test_a_result_dtype_that_is_not_an_integer_type_is_refused():
    for bad in ("float32", "complex64", "no_such_type"):
        with pytest.raises(InvalidRequest, match="result_dtype"):
            write_result({"result_extension": ".nrrd", "result_dtype": bad}, "scan.nii.gz", _map("F"), AFFINE)


def test_result_compress_from_the_server_option_when_the_request_does_not_say(tmp_path):
    scripted = _Task(tmp_path)
    region = (slice(2, 12), slice(3, 9), slice(0, 5))
    for conf, request, encoding in ((True, {}, "gzip"), (False, {}, "raw"), (True, {"result_compress": False}, "raw")):
        scripted.task.result_compress = conf
        scripted.predictor.script.append((region, np.ones((10, 6, 5), np.uint8)))
        path, _ = scripted.task({"image": scripted.image, "spleen": [[0, 0, 0]], "label": "spleen",
                                 "result_extension": ".nrrd", "result_dtype": "uint8", **request})
        try:
            data, header = nrrd.read(path)
            assert header["encoding"] == encoding
            assert data.sum() == 300 and data[region].all()
        finally:
            os.unlink(path)
