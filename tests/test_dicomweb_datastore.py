"""The app's DICOMweb datastore against a real Orthanc on 127.0.0.1: offline start, DICOM SEG out and back.

- the server starts in DICOMweb mode without downloading anything (MONAI Label 0.8.5 would fetch dcmqi);
- a final label saved the way 3D Slicer submits it (``PUT /datastore/label``, full-size, two structures) becomes
  a DICOM SEG on Orthanc that reads back voxel-identical (highdicom, independently of the app's reader);
  bad labels get 422 and the server keeps serving;
- a SEG written by another tool, with its own segment numbering (OHIF numbers segments alphabetically), is the
  image's final label with the **server's** values, mapped by segment name; unknown names are ignored.

Without Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) the tests skip; ``REQUIRE_BROWSER=1`` (``.ci/run``,
which installs it) makes that a failure.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np
import pytest
import requests

from app_helpers import app_module, copy_app, start_server
from browser_helpers import wait_until
from dicomweb_helpers import orthanc_missing, start_orthanc, write_ct_series

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _require_orthanc() -> None:
    missing = orthanc_missing()
    if missing:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)


@pytest.fixture(scope="module")
def series(data_dir, tmp_path_factory):
    """The spleen CT as a DICOM series, its ground-truth spleen (slice, row, column) and SOP UIDs."""
    import pydicom
    import SimpleITK as sitk

    case = data_dir / "msd_spleen_ct"
    folder = tmp_path_factory.mktemp("ct_series")
    files = write_ct_series(case / "imagesTr" / "spleen_8.nii.gz", folder)
    truth = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(case / "labelsTr" / "spleen_8.nii.gz")),
                                                    "LPS")) > 0
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {"files": files, "truth": truth, "series_uid": str(first.SeriesInstanceUID),
            "sop_uids": [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]}


@pytest.fixture
def orthanc(series, tmp_path):
    _require_orthanc()
    server = start_orthanc(tmp_path / "orthanc")
    try:
        server.upload(series["files"])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def datastore_module():
    """``lib.datastore.dicomweb`` imported as MONAI Label imports the app (app folder first on sys.path)."""
    return app_module("lib.datastore.dicomweb")


def _two_structures(truth: np.ndarray) -> np.ndarray:
    """A full-size label map with the server's values: the spleen (2) and a box standing in for liver (1)."""
    label = np.where(truth, LABELS["spleen"], 0).astype(np.uint8)
    label[10:20, 200:260, 300:380] = LABELS["liver"]
    return label


def _write_like(label: np.ndarray, reference_volume, path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(label)
    image.CopyInformation(reference_volume)
    sitk.WriteImage(image, str(path), True)


def _seg_on_orthanc(orthanc, tmp_path):
    """The one SEG on Orthanc, read with highdicom."""
    import highdicom as hd

    segs = orthanc.series_of_modality("SEG")
    assert len(segs) == 1, segs
    uid = segs[0]["0020000E"]["Value"][0]
    for series_id in requests.get(f"{orthanc.url}/series", timeout=30).json():
        info = requests.get(f"{orthanc.url}/series/{series_id}", timeout=30).json()
        if info["MainDicomTags"].get("SeriesInstanceUID") == uid:
            path = tmp_path / "seg.dcm"
            path.write_bytes(requests.get(f"{orthanc.url}/instances/{info['Instances'][0]}/file", timeout=30).content)
            return hd.seg.segread(str(path))
    raise AssertionError(f"SEG {uid} not found in Orthanc's REST API")


def test_server_starts_offline_and_saves_a_final_label_as_dicom_seg(orthanc, series, tmp_path):
    import SimpleITK as sitk

    app_dir = copy_app(tmp_path / "app")
    server = start_server(app_dir, orthanc.dicomweb,
                          {"checkpoint": "bundled", "labels": "liver=1,spleen=2", "uncertainty_prompts": "1"},
                          tmp_path / "server.log", env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")})
    try:
        log = server.log_path.read_text(errors="replace")
        assert "nothing downloaded" in log and "github.com" not in log, "the server tried to download at start"
        assert not (app_dir / "bin" / "itkimage2segimage").exists()
        image_id = series["series_uid"]
        # The series is downloaded and converted in the background at start (prefetch).
        volume_path = wait_until(lambda: next((tmp_path / "cache").rglob(f"{image_id}.nii"), None), 120,
                                 "the prefetched volume in the DICOMweb cache")
        time.sleep(1.0)  # the datastore registers the file right after writing it
        volume = sitk.ReadImage(str(volume_path))
        assert volume.GetSize() == (512, 512, 32)

        # 3D Slicer's Submit Label: the label map on the image's grid, params with label_info.
        label = _two_structures(series["truth"])
        label_file = tmp_path / "label.nii.gz"
        _write_like(label, volume, label_file)
        params = {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}], "client_id": "test"}
        response = requests.put(f"{server.url}/datastore/label", params={"image": image_id},
                                files={"label": ("label.nii.gz", label_file.read_bytes())},
                                data={"params": json.dumps(params)}, timeout=120)
        assert response.status_code == 200, response.text

        seg = _seg_on_orthanc(orthanc, tmp_path)
        names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        assert names == {1: "liver", 2: "spleen"}
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=series["sop_uids"],
                                                   segment_numbers=[1, 2], combine_segments=True)
        assert np.array_equal(pixels, label), "the SEG does not read back voxel-identical"

        # Bad labels: empty, wrong size; the server keeps serving.
        empty = tmp_path / "empty.nii.gz"
        _write_like(np.zeros_like(label), volume, empty)
        response = requests.put(f"{server.url}/datastore/label", params={"image": image_id},
                                files={"label": ("empty.nii.gz", empty.read_bytes())}, timeout=120)
        assert response.status_code == 422 and "empty" in response.json()["detail"], response.text
        small = tmp_path / "small.nii.gz"
        sitk.WriteImage(sitk.Image(10, 10, 10, sitk.sitkUInt8), str(small))
        response = requests.put(f"{server.url}/datastore/label", params={"image": image_id},
                                files={"label": ("small.nii.gz", small.read_bytes())}, timeout=120)
        assert response.status_code == 422 and "10x10x10" in response.json()["detail"], response.text
        # Saving the session's map (OHIF's documented save) before any click: a clear 422.
        response = requests.post(f"{server.url}/infer/sam_med3d", params={"image": image_id, "output": "json"},
                                 files={"params": (None, json.dumps({"save_label": True, "label_tag": "final"}))},
                                 timeout=120)
        assert response.status_code == 422 and "nothing to save" in response.json()["detail"], response.text
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
        assert len(orthanc.series_of_modality("SEG")) == 1
    finally:
        server.stop()


def test_a_seg_from_another_tool_is_the_final_label_by_segment_name(orthanc, series, datastore_module, tmp_path):
    """OHIF-style numbering (spleen = segment 1, liver = 2, plus a segment the server does not know)."""
    import highdicom as hd
    import pydicom
    from monailabel.datastore.dicom import DICOMwebClientX
    from pydicom.sr.codedict import codes

    label = _two_structures(series["truth"])
    foreign = np.zeros_like(label)
    foreign[label == LABELS["spleen"]] = 1
    foreign[label == LABELS["liver"]] = 2
    foreign[25:28, 100:120, 100:120] = 3
    sources = [pydicom.dcmread(f) for f in series["files"]]
    descriptions = [hd.seg.SegmentDescription(segment_number=n, segment_label=name,
                                              segmented_property_category=codes.cid7150.AnatomicalStructure,
                                              segmented_property_type=codes.SCT.Tissue,
                                              algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
                    for n, name in ((1, "Spleen"), (2, "liver"), (3, "tumour"))]
    seg = hd.seg.Segmentation(source_images=sources, pixel_array=foreign,
                              segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                              segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9,
                              sop_instance_uid=hd.UID(), instance_number=1, manufacturer="another viewer",
                              manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    client = DICOMwebClientX(url=orthanc.dicomweb)
    client.store_instances([seg])

    store = datastore_module.OfflineDICOMWebDatastore(client, LABELS, search_filter={"Modality": "CT"},
                                                      cache_path=str(tmp_path / "cache"))
    assert store.get_labeled_images() == [series["series_uid"]]
    assert store.get_unlabeled_images() == []
    records = store.datalist()
    assert len(records) == 1
    import SimpleITK as sitk

    saved = sitk.GetArrayFromImage(sitk.ReadImage(records[0]["label"]))
    assert np.array_equal(saved, label), "segments were not mapped to the server's values by name"
    image = sitk.ReadImage(records[0]["image"])
    assert sitk.ReadImage(records[0]["label"]).GetOrigin() == image.GetOrigin()


def _volume_of(series, datastore_module, tmp_path):
    """The series as the datastore caches it (an uncompressed NIfTI volume, GDCM's slice order)."""
    import SimpleITK as sitk

    image, _, _ = datastore_module.read_series(str(series["files"][0].parent))
    path = tmp_path / "volume.nii"
    sitk.WriteImage(image, str(path), False)
    return path


def test_the_viewer_label_map_is_saved_by_segment_name_voxel_exact(series, datastore_module, tmp_path):
    """OHIF's save: label.bin in the viewer's voxel order (column fastest), OHIF's own segment numbers, and
    params.label_info naming them; the label saved has the server's values on the same voxels."""
    import SimpleITK as sitk

    volume = _volume_of(series, datastore_module, tmp_path)
    expected = _two_structures(series["truth"])
    expected[3, 5:9, 400:410] = LABELS["spleen"]  # off-centre: a flip or transpose would move it
    viewer = np.zeros_like(expected)
    viewer[expected == LABELS["liver"]] = 4  # OHIF numbers segments alphabetically, not by server value
    viewer[expected == LABELS["spleen"]] = 7
    raw = tmp_path / "label.bin"
    viewer.tofile(raw)
    segments = [{"name": "liver", "idx": 4, "color": [221, 130, 101, 255]}, {"name": "Spleen", "idx": 7}]
    path, colours = datastore_module.viewer_label_to_image(str(volume), str(raw), segments,
                                                           {"liver": 1, "spleen": 2})
    assert colours == {1: (221, 130, 101)}
    saved = sitk.ReadImage(path)
    assert np.array_equal(sitk.GetArrayFromImage(saved), expected)
    assert saved.GetOrigin() == sitk.ReadImage(str(volume)).GetOrigin()

    # The SEG carries the viewer's colour as its recommended display colour (CIELab, back to about that RGB).
    label = sitk.GetArrayFromImage(saved)
    seg = datastore_module.write_seg([str(f) for f in series["files"]], label, {1: "liver", 2: "spleen"},
                                     colours_by_value=colours)
    by_name = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    assert "RecommendedDisplayCIELabValue" not in by_name["spleen"]
    values = [int(v) for v in by_name["liver"].RecommendedDisplayCIELabValue]
    from skimage.color import lab2rgb

    rgb = lab2rgb(np.asarray([values[0] / 65535 * 100, values[1] / 65535 * 255 - 128,
                              values[2] / 65535 * 255 - 128]).reshape(1, 1, 3))[0, 0] * 255
    assert np.abs(rgb - [221, 130, 101]).max() < 2, rgb  # DICOM: L 0..100, a and b -128..127 over 0..65535

    errors = datastore_module.InvalidRequest
    with pytest.raises(errors, match="does not name"):
        datastore_module.viewer_label_to_image(str(volume), str(raw), segments[:1], {"liver": 1, "spleen": 2})
    with pytest.raises(errors, match="'kidney' is not a label of this server"):
        datastore_module.viewer_label_to_image(str(volume), str(raw), [{"name": "kidney", "idx": 7}],
                                               {"liver": 1, "spleen": 2})
    with pytest.raises(errors, match="is not"):
        datastore_module.viewer_label_to_image(str(volume), str(raw), [{"name": "liver"}], {"liver": 1})
    with pytest.raises(errors, match="color"):
        datastore_module.viewer_label_to_image(str(volume), str(raw), [{"name": "liver", "idx": 4, "color": "red"},
                                                                       {"name": "spleen", "idx": 7}],
                                               {"liver": 1, "spleen": 2})
    short = tmp_path / "short.bin"
    short.write_bytes(raw.read_bytes()[:-512])
    with pytest.raises(errors, match="voxels"):
        datastore_module.viewer_label_to_image(str(volume), str(short), segments, {"liver": 1, "spleen": 2})


def test_a_seg_whose_frames_are_not_on_the_slices_they_reference_is_refused(series, datastore_module):
    """A SEG writer that placed frame k on slice N-1-k (a mirrored stack) while referencing the instance of
    slice k: its positions and references disagree, and the datastore refuses it instead of training on it."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    image, _, sop_uids = datastore_module.read_series(str(series["files"][0].parent))
    positions, normal = datastore_module.slice_geometry(image)
    label = np.zeros(series["truth"].shape, dtype=np.uint8)
    label[12:16, 300:320, 100:130] = 1
    sources = [pydicom.dcmread(f) for f in series["files"]]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver", segmented_property_category=codes.cid7150.AnatomicalStructure,
        segmented_property_type=codes.SCT.Liver, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(source_images=sources, pixel_array=label,
                              segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                              segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9,
                              sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
                              manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    values = {"liver": 1}
    buffer = io.BytesIO()
    seg.save_as(buffer)
    read, _ = datastore_module.read_seg(pydicom.dcmread(io.BytesIO(buffer.getvalue())), sop_uids, positions, normal,
                                        values)
    assert np.array_equal(read, label)

    mirrored = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    for frame in mirrored.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        k = sop_uids.index(str(source.ReferencedSOPInstanceUID))
        source.ReferencedSOPInstanceUID = sop_uids[len(sop_uids) - 1 - k]
    with pytest.raises(ValueError, match="not placed on the slices they reference"):
        datastore_module.read_seg(mirrored, sop_uids, positions, normal, values)


# ------------------------------------------------------------------------- SEG geometry without a server
# Small synthetic series in any geometry, served by an in-memory DICOMweb stand-in: what the reader must get
# right where the axial identity case above cannot tell (direction, spacing, slice order, frames without
# references), and what it must refuse (frames whose pixel grid is not the image's).

def _rotation(degrees_x: float, degrees_y: float, degrees_z: float) -> np.ndarray:
    x, y, z = np.radians([degrees_x, degrees_y, degrees_z])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


FLIP_SLICES = np.diag([1.0, 1.0, -1.0])  # third column = -(row x column): slices descend along the normal
GEOMETRIES = {
    # name: (direction, spacing (x, y, z) mm, origin mm)
    "oblique": (_rotation(20, -15, 10), (0.8, 0.6, 2.5), (-30.5, 12.25, 40.0)),
    "descending": (FLIP_SLICES, (0.7, 0.9, 3.0), (10.0, -20.0, 50.0)),
    "oblique_descending": (_rotation(-25, 10, 35) @ FLIP_SLICES, (0.5, 0.75, 2.0), (5.0, 7.5, -12.5)),
}


def _synthetic_case(geometry: str, folder):
    """A 20x16x10 series in ``geometry`` and its label on the same grid, both as SimpleITK images.

    The label is asymmetric in every axis (liver box near the first slices, spleen near the last, one
    spleen voxel in a corner), so a flip, a transpose or a shift of a slice shows."""
    import SimpleITK as sitk

    from dicomweb_helpers import write_series

    direction, spacing, origin = GEOMETRIES[geometry]
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-200, 300, size=(10, 16, 20)).astype(np.int16))
    label_array = np.zeros((10, 16, 20), dtype=np.uint8)
    label_array[1:4, 2:6, 3:10] = LABELS["liver"]
    label_array[7, 10:13, 14:18] = LABELS["spleen"]
    label_array[9, 0, 19] = LABELS["spleen"]
    label = sitk.GetImageFromArray(label_array)
    for item in (image, label):
        item.SetDirection(tuple(direction.ravel()))
        item.SetSpacing(spacing)
        item.SetOrigin(origin)
    files = write_series(image, folder, f"synthetic-{geometry}")
    return image, label, files


class _MemoryDICOMweb:
    """DICOMweb as ``OfflineDICOMWebDatastore`` calls it (QIDO by exact match, WADO of a series, STOW), over
    instances kept as encoded bytes, so every read decodes a file as a server would send it."""

    base_url = "http://dicomweb.invalid"

    def __init__(self, datasets):
        self.encoded = []
        self.store_instances(datasets)

    def store_instances(self, datasets):
        for ds in datasets:
            buffer = io.BytesIO()
            ds.save_as(buffer)
            self.encoded.append(buffer.getvalue())

    def _instances(self, series_uid=None):
        import pydicom

        found = [pydicom.dcmread(io.BytesIO(data)) for data in self.encoded]
        return [ds for ds in found if series_uid is None or str(ds.SeriesInstanceUID) == series_uid]

    def search_for_series(self, search_filters=None):
        series = {}
        for ds in self._instances():
            if all(str(getattr(ds, key, "")) == str(value) for key, value in (search_filters or {}).items()):
                series.setdefault(str(ds.SeriesInstanceUID), self._header(ds))
        return list(series.values())

    @staticmethod
    def _header(ds):
        header = ds.copy()
        if "PixelData" in header:
            del header.PixelData
        return header.to_json_dict()

    def retrieve_series_metadata(self, study_uid, series_uid):
        return [self._header(ds) for ds in self._instances(series_uid)]

    def retrieve_series(self, study_uid, series_uid):
        return self._instances(series_uid)

    def iter_series(self, study_uid, series_uid):
        return iter(self._instances(series_uid))


def _seg_of(source_files, label_array, datastore_module):
    """The app's own SEG writer (highdicom) over ``source_files`` in the slice order of ``label_array``."""
    return datastore_module.write_seg([str(f) for f in source_files], label_array, {1: "liver", 2: "spleen"})


def _assert_same_grid(image, reference, what):
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5), what
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5), what
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4), what


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_a_seg_reads_back_on_oblique_and_descending_series_voxel_exact(geometry, datastore_module, tmp_path):
    """The SEG of a label, stored on the server, becomes the image's final label on the grid of the cached
    volume: same direction, spacing and origin as the series, and every voxel where the label was."""
    import pydicom
    import SimpleITK as sitk

    image, label, files = _synthetic_case(geometry, tmp_path / "series")
    # GDCM orders slices along row x column: a descending series comes back with its slices reversed.
    volume, _, _ = datastore_module.read_series(str(tmp_path / "series"))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    descending = np.linalg.det(direction) < 0
    expected_direction = direction @ FLIP_SLICES if descending else direction
    assert np.allclose(np.asarray(volume.GetDirection()).reshape(3, 3), expected_direction, atol=1e-5)
    assert np.allclose(volume.GetSpacing(), image.GetSpacing(), atol=1e-5)
    last = image.TransformIndexToPhysicalPoint((0, 0, image.GetDepth() - 1))
    assert np.allclose(volume.GetOrigin(), last if descending else image.GetOrigin(), atol=1e-4)

    # The SEG is written over the files in instance order (descending for the descending series).
    seg = _seg_of(files, sitk.GetArrayFromImage(label), datastore_module)
    client = _MemoryDICOMweb([pydicom.dcmread(f) for f in files] + [seg])
    store = datastore_module.OfflineDICOMWebDatastore(client, LABELS, search_filter={"Modality": "CT"},
                                                      cache_path=str(tmp_path / "cache"))
    records = store.datalist()
    assert len(records) == 1 and records[0].get("label"), records
    saved = sitk.ReadImage(records[0]["label"])
    cached = sitk.ReadImage(records[0]["image"])
    _assert_same_grid(cached, volume, "the cached volume is not on the series' grid")
    _assert_same_grid(saved, volume, "the final label is not on the series' grid")
    # The original label, brought onto the saved grid by physical position (nearest voxel), is what was saved.
    expected = sitk.GetArrayFromImage(sitk.Resample(label, saved, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert np.array_equal(sitk.GetArrayFromImage(saved), expected)
    assert np.array_equal(np.bincount(expected.ravel(), minlength=3), np.bincount(
        sitk.GetArrayFromImage(label).ravel(), minlength=3)), "voxels lost on the way"


def _drop_references(seg):
    for frame in seg.PerFrameFunctionalGroupsSequence:
        if "DerivationImageSequence" in frame:
            del frame.DerivationImageSequence
    return seg


@pytest.mark.parametrize("geometry", ["oblique", "descending"])
def test_frames_without_source_references_are_placed_by_position(geometry, datastore_module, tmp_path):
    """A SEG whose frames carry only their plane position (no referenced instance) lands on the same slices;
    a frame between two slices is refused, naming the problem."""
    import pydicom
    import SimpleITK as sitk

    image, label, files = _synthetic_case(geometry, tmp_path / "series")
    volume, _, sop_uids = datastore_module.read_series(str(tmp_path / "series"))
    positions, normal = datastore_module.slice_geometry(volume)
    encoded = io.BytesIO()
    _seg_of(files, sitk.GetArrayFromImage(label), datastore_module).save_as(encoded)

    by_reference, _ = datastore_module.read_seg(pydicom.dcmread(io.BytesIO(encoded.getvalue())), sop_uids,
                                                positions, normal, LABELS)
    unreferenced = _drop_references(pydicom.dcmread(io.BytesIO(encoded.getvalue())))
    assert not any("DerivationImageSequence" in f for f in unreferenced.PerFrameFunctionalGroupsSequence)
    by_position, _ = datastore_module.read_seg(unreferenced, sop_uids, positions, normal, LABELS)
    expected = sitk.GetArrayFromImage(sitk.Resample(label, volume, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert np.array_equal(by_reference, expected)
    assert np.array_equal(by_position, expected)

    between = _drop_references(pydicom.dcmread(io.BytesIO(encoded.getvalue())))
    frame = between.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    frame.ImagePositionPatient = [float(v) + 0.5 * volume.GetSpacing()[2] * n
                                  for v, n in zip(frame.ImagePositionPatient, normal)]
    with pytest.raises(ValueError, match="lies on no slice"):
        datastore_module.read_seg(between, sop_uids, positions, normal, LABELS)


def _seg_on_grid(files, label_array, orientation, positions, spacing_rc, datastore_module):
    """A SEG whose frames are on a pixel grid of their own (``orientation``, per-frame ``positions``)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver", segmented_property_category=codes.cid7150.AnatomicalStructure,
        segmented_property_type=codes.SCT.Liver, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    return hd.seg.Segmentation(
        source_images=[pydicom.dcmread(f) for f in files], pixel_array=label_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0",
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", [float(v) for v in orientation]),
        plane_positions=[hd.PlanePositionSequence("PATIENT", [float(v) for v in p]) for p in positions],
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=list(spacing_rc), slice_thickness=1.0))


@pytest.mark.parametrize("change", ["mirrored_columns", "shifted_in_plane", "other_pixel_spacing"])
def test_a_seg_whose_frames_are_not_on_the_image_grid_is_refused(change, datastore_module, tmp_path):
    """Frames mirrored left-right (row direction reversed, pixels flipped: the same label in space), shifted
    in their plane or with another pixel spacing are refused with a message naming the mismatch; the image
    keeps no final label rather than one on the wrong voxels."""
    import pydicom
    import SimpleITK as sitk

    image, label, files = _synthetic_case("oblique", tmp_path / "series")
    volume, _, sop_uids = datastore_module.read_series(str(tmp_path / "series"))
    positions, normal = datastore_module.slice_geometry(volume)
    direction = np.asarray(volume.GetDirection()).reshape(3, 3)
    spacing = volume.GetSpacing()
    label_array = (sitk.GetArrayFromImage(label) == LABELS["liver"]).astype(np.uint8)
    row, column = direction[:, 0], direction[:, 1]
    frame_positions = positions.copy()
    spacing_rc = (spacing[1], spacing[0])
    if change == "mirrored_columns":  # the same voxels in space, stored right to left
        label_array = label_array[:, :, ::-1]
        row = -row
        frame_positions = positions + (volume.GetWidth() - 1) * spacing[0] * direction[:, 0]
        match = "orientation"
    elif change == "shifted_in_plane":
        frame_positions = positions + 3 * spacing[0] * direction[:, 0]
        match = "shifted"
    else:
        spacing_rc = (spacing[1] * 2, spacing[0])
        match = "pixel spacing"
    seg = _seg_on_grid(files, label_array, (*row, *column), frame_positions, spacing_rc, datastore_module)
    encoded = io.BytesIO()
    seg.save_as(encoded)
    decoded = pydicom.dcmread(io.BytesIO(encoded.getvalue()))
    with pytest.raises(ValueError, match=match):
        datastore_module.check_seg_grid(decoded, volume)
        datastore_module.read_seg(decoded, sop_uids, positions, normal, LABELS)

    client = _MemoryDICOMweb([pydicom.dcmread(f) for f in files] + [seg])
    store = datastore_module.OfflineDICOMWebDatastore(client, LABELS, search_filter={"Modality": "CT"},
                                                      cache_path=str(tmp_path / "cache"))
    assert store.get_labeled_images() == [str(pydicom.dcmread(files[0]).SeriesInstanceUID)]
    assert store.datalist() == [], "a refused SEG became a final label"
