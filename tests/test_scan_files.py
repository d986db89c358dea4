"""Scan files are read only when their header keeps the voxels inside them, and only within the voxel cap.

Each hostile header below is first shown to leak through SimpleITK's own reader (the control), then refused by
:func:`sam_med3d.io.load_scan` / :func:`~sam_med3d.io.load_label` / :func:`~sam_med3d.io.read_header`.
"""

from __future__ import annotations

import gzip
import os
import resource
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sam_med3d.io import ScanTooLarge, load_label, load_scan, read_header

SECRET = b"TOPSECRET-" * 400


@pytest.fixture()
def secret(tmp_path) -> Path:
    """A file outside any studies folder whose bytes must never come back as voxels."""
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _nrrd_header(data_line: str, sizes: str = "4 5 6", encoding: str = "raw") -> str:
    return f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {sizes}\nencoding: {encoding}\n{data_line}\n\n"


def _mha_header(data_file: str, dims: str = "4 5 6") -> str:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = MET_UCHAR\n"
            f"ElementDataFile = {data_file}\n")


def _leaks_through_simpleitk(path: Path) -> bool:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return bytes(array.ravel()[:10].astype(np.uint8)) == SECRET[:10]


@pytest.mark.parametrize("line", ["data file: {secret}", "datafile: {secret}", "DATA FILE: {secret}",
                                  "data file: LIST\n{secret}", "data file: {parent}/part%03d.raw 1 3 1"])
def test_nrrd_naming_another_file_is_refused(tmp_path, secret, line):
    path = tmp_path / "evil.nrrd"
    path.write_text(_nrrd_header(line.format(secret=secret, parent=secret.parent)))
    if line.startswith("data file: {secret}"):
        assert _leaks_through_simpleitk(path)  # the attack is real
    for read in (load_scan, load_label, read_header):
        with pytest.raises(ValueError, match="names another file"):
            read(path)


@pytest.mark.parametrize("data_file", ["{secret}", "LIST\n{secret}", "local_not"])
def test_metaimage_naming_another_file_is_refused(tmp_path, secret, data_file):
    path = tmp_path / "evil.mha"
    path.write_text(_mha_header(data_file.format(secret=secret)))
    if data_file == "{secret}":
        assert _leaks_through_simpleitk(path)
    for read in (load_scan, load_label, read_header):
        with pytest.raises(ValueError, match="names another file"):
            read(path)


def test_formats_with_a_second_file_are_refused(tmp_path, secret):
    volume = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    mhd = tmp_path / "scan.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(mhd))
    pair = tmp_path / "pair.hdr"
    nib.save(nib.Nifti1Pair(volume, np.eye(4)), str(pair))
    analyze = tmp_path / "old.img"
    nib.save(nib.AnalyzeImage(volume, np.eye(4)), str(analyze))
    nhdr = tmp_path / "scan.nhdr"
    nhdr.write_text(_nrrd_header(f"data file: {secret}"))
    for path in (mhd, pair, analyze, nhdr):
        with pytest.raises(ValueError, match="not a single-file scan"):
            load_scan(path)
    # The user's own datasets on the command line may still use them.
    assert load_scan(mhd, detached_ok=True).shape == (6, 5, 4)


def test_content_must_match_the_name(tmp_path, secret):
    """The name decides which parser runs, and the content must be that format."""
    nrrd_as_nifti = tmp_path / "evil.nii"
    nrrd_as_nifti.write_text(_nrrd_header(f"data file: {secret}"))
    mha_as_nrrd = tmp_path / "evil2.nrrd"
    mha_as_nrrd.write_text(_mha_header(str(secret)))
    with pytest.raises(ValueError, match="not a NIfTI file"):
        load_scan(nrrd_as_nifti)
    with pytest.raises(ValueError, match="not an NRRD file"):
        load_scan(mha_as_nrrd)


def test_nifti_pair_header_under_a_nii_name_is_refused(tmp_path):
    """A ``.hdr`` (magic ``ni1``: voxels in the ``.img`` beside it) renamed ``.nii``."""
    volume = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Pair(volume, np.eye(4)), str(tmp_path / "pair.hdr"))
    disguised = tmp_path / "pair.nii"
    (tmp_path / "pair.hdr").rename(disguised)
    with pytest.raises(ValueError, match="not a single-file NIfTI-1"):
        load_scan(disguised)


def test_unknown_nrrd_fields_and_missing_header_end_are_refused(tmp_path):
    unknown = tmp_path / "unknown.nrrd"
    unknown.write_text(_nrrd_header("fancy field: 1"))
    with pytest.raises(ValueError, match="NRRD field this server does not read"):
        read_header(unknown)
    endless = tmp_path / "endless.nrrd"
    endless.write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n")
    with pytest.raises(ValueError, match="no end of its NRRD header"):
        read_header(endless)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@pytest.mark.parametrize("kind", ["nrrd", "mha", "nii.gz", "nii"])
def test_huge_header_is_refused_before_anything_is_allocated(tmp_path, kind):
    """1024^3 voxels claimed by a file of about 1 MB: refused from the header, fast, without memory growth."""
    path = tmp_path / f"huge.{kind}"
    payload = gzip.compress(b"\0" * (1 << 20))
    if kind == "nrrd":
        path.write_bytes(_nrrd_header("", sizes="1024 1024 1024", encoding="gzip").encode() + payload)
    elif kind == "mha":
        path.write_bytes((_mha_header("LOCAL", dims="1024 1024 1024").replace("ElementDataFile",
                          "CompressedData = True\nElementDataFile")).encode() + payload)
    else:
        header = nib.Nifti1Header()
        header.set_data_shape((1024, 1024, 1024))
        header.set_data_dtype(np.uint8)
        raw = header.binaryblock + b"\0" * 4 + b"\0" * (1 << 20)
        path.write_bytes(gzip.compress(raw) if kind == "nii.gz" else raw)
    before = _peak_rss_mb()
    for read in (lambda p: load_scan(p, max_voxels=2 ** 28), lambda p: load_label(p, max_voxels=2 ** 28),
                 lambda p: read_header(p, max_voxels=2 ** 28)):
        with pytest.raises(ScanTooLarge, match="1073741824 voxels"):
            read(path)
    assert _peak_rss_mb() - before < 200  # decoding it would take 1 GiB (uint8) or 4 GiB (float32)


def _dicom_series(folder: Path, slices: int = 4) -> None:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.77"
    for k in range(slices):
        slc = sitk.GetImageFromArray((np.arange(30, dtype=np.int16).reshape(5, 6) * (k + 1)))
        for tag, value in {"0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".1",
                           "0008|0018": f"{series}.{k + 1}", "0020|0013": str(k + 1),
                           "0020|0032": f"0\\0\\{k * 2.0}", "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
            slc.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{k}.dcm"))
        writer.Execute(slc)


def test_dicom_series_is_held_to_the_voxel_cap_and_refuses_links(tmp_path, secret):
    folder = tmp_path / "series"
    _dicom_series(folder)
    assert load_scan(folder, max_voxels=6 * 5 * 4).shape == (6, 5, 4)
    with pytest.raises(ScanTooLarge, match="120 voxels"):
        load_scan(folder, max_voxels=100)
    os.symlink(secret, folder / "s9.dcm")
    with pytest.raises(ValueError, match="holds a link"):
        load_scan(folder)


def test_label_is_read_on_the_image_grid_with_label_values(tmp_path):
    image = tmp_path / "image.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(120, dtype=np.int16).reshape(4, 5, 6)), str(image))
    header = read_header(image)
    good = tmp_path / "label.nii.gz"
    values = np.zeros((6, 5, 4), np.uint8)
    values[1:3, 2, 1] = 2
    nib.save(nib.Nifti1Image(values, np.diag([-1.0, -1.0, 1.0, 1.0])), str(good))
    np.testing.assert_array_equal(load_label(good, header), values)
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(values, np.diag([-1.0, -1.0, 1.0, 1.0]) + np.eye(4, k=3) * 5), str(shifted))
    with pytest.raises(ValueError, match="origin"):
        load_label(shifted, header)
    for bad, message in ((np.full((6, 5, 4), np.nan, np.float32), "NaN"), (np.full((6, 5, 4), 0.5, np.float32),
                                                                            "fractional"),
                         (np.full((6, 5, 4), 300, np.int16), "0..255")):
        path = tmp_path / "bad.nii.gz"
        nib.save(nib.Nifti1Image(bad, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
        with pytest.raises(ValueError, match=message):
            load_label(path, (6, 5, 4))


def test_nifti2_single_file_is_read(tmp_path):
    path = tmp_path / "two.nii"
    volume = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti2Image(volume, np.eye(4)), str(path))
    assert struct.unpack("<i", path.read_bytes()[:4])[0] == 540
    np.testing.assert_array_equal(load_scan(path).array, volume)


def test_metaimage_header_end_spelled_otherwise_is_refused(tmp_path, secret):
    """A lower-case ``elementdatafile = LOCAL`` first, the real field naming the secret after it: whichever
    line the reader takes as the end, the file is refused."""
    path = tmp_path / "twice.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 5 6\nElementType = MET_UCHAR\n"
                    f"elementdatafile = LOCAL\nElementDataFile = {secret}\n")
    with pytest.raises(ValueError, match="names another file"):
        read_header(path)


# ------------------------------------------------------------------------------ training reads through the reader
def _training_pair(folder: Path, suffix: str = ".nii.gz") -> dict:
    """A scan with an oblique int16 grid and a label on it, as the datastore stores them."""
    i, j, k = np.meshgrid(np.arange(20), np.arange(18), np.arange(16), indexing="ij")
    volume = (3 * i + 50 * j + 700 * k + (i * j) % 7).astype(np.int16)
    label = np.zeros(volume.shape, dtype=np.uint8)
    label[5:12, 4:10, 3:9] = 2
    affine = np.array([[0.9, 0.1, 0.0, -10.0], [-0.1, 1.2, 0.2, 20.0], [0.0, -0.1, 2.5, 5.0], [0, 0, 0, 1]])
    paths = {"image": folder / f"scan{suffix}", "label": folder / f"label{suffix}"}
    for key, array in (("image", volume), ("label", label)):
        if suffix.startswith(".nii"):
            nib.save(nib.Nifti1Image(array, affine), str(paths[key]))
        else:
            img = sitk.GetImageFromArray(array.transpose(2, 1, 0))
            img.SetSpacing((0.9, 1.2, 2.5))
            img.SetOrigin((10.0, -20.0, 5.0))
            sitk.WriteImage(img, str(paths[key]))
    return {key: str(path) for key, path in paths.items()}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_training_reads_the_same_volumes_as_monai_loadimaged(tmp_path, suffix):
    """The training frame (load, channel first, RAS, 1.5 mm) is what MONAI's LoadImaged gave for valid files."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from sam_med3d.training import preprocess_transforms

    record = _training_pair(tmp_path, suffix)
    ours = Compose(preprocess_transforms())(dict(record))
    theirs = Compose([LoadImaged(("image", "label"), image_only=True), EnsureChannelFirstd(("image", "label"))]
                     + preprocess_transforms(load=False))(dict(record))
    for key in ("image", "label"):
        assert tuple(ours[key].shape) == tuple(theirs[key].shape), key
        np.testing.assert_allclose(ours[key].affine.numpy(), theirs[key].affine.numpy(), atol=1e-4)
        np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(), atol=1e-2, rtol=1e-5)
    assert set(np.unique(ours["label"].numpy())) == {0.0, 2.0}


def test_training_never_reads_a_file_through_a_header_naming_another(tmp_path, secret):
    from monai.transforms import LoadImaged

    from sam_med3d.training import training_transforms

    record = _training_pair(tmp_path)
    evil = tmp_path / "evil.nrrd"
    evil.write_text(_nrrd_header(f"data file: {secret}", sizes="20 10 20"))
    leaked = LoadImaged("image", reader="ITKReader", image_only=True)({"image": str(evil)})["image"]  # real
    assert SECRET[:40] in np.asarray(leaked).astype(np.uint8).tobytes(order="F")
    for key in ("image", "label"):
        with pytest.raises(RuntimeError) as refused:  # MONAI's Compose names the transform, then the cause
            training_transforms(crop_size=16)({**record, key: str(evil), "label_value": 2})
        assert isinstance(refused.value.__cause__, ValueError)
        assert "names another file" in str(refused.value.__cause__)


def test_training_applies_the_voxel_cap_finite_values_and_the_label_grid(tmp_path):
    from sam_med3d.reader_transforms import LoadScand
    from sam_med3d.training import training_transforms

    record = _training_pair(tmp_path)
    with pytest.raises(RuntimeError) as refused:
        training_transforms(crop_size=16, max_voxels=1000)({**record, "label_value": 2})
    assert isinstance(refused.value.__cause__, ScanTooLarge)
    from sam_med3d.training import validation_transforms

    with pytest.raises(RuntimeError) as refused:  # validation reads the same files under the same cap
        validation_transforms(crop_size=16, center="click", max_voxels=1000)({**record, "label_value": 2})
    assert isinstance(refused.value.__cause__, ScanTooLarge)
    validation_transforms(crop_size=16, center="click", max_voxels=20 * 18 * 16)({**record, "label_value": 2})
    huge = tmp_path / "huge.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.int16)
    with gzip.open(huge, "wb") as out:
        out.write(header.binaryblock + b"\x00" * 4)
    with pytest.raises(ScanTooLarge):
        LoadScand(("image", "label"))({**record, "image": str(huge)})  # the default cap, 2^28
    nan = tmp_path / "nan.nii.gz"
    array = np.random.default_rng(0).normal(size=(20, 18, 16)).astype(np.float32)
    array[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(nan))
    with pytest.raises(ValueError, match="NaN"):
        LoadScand(("image", "label"))({**record, "image": str(nan)})
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 18, 16), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), str(shifted))
    with pytest.raises(ValueError, match="spacing|origin|orientation"):
        LoadScand(("image", "label"))({**record, "label": str(shifted)})
    fractional = tmp_path / "fractional.nii.gz"
    img = nib.load(record["image"])
    nib.save(nib.Nifti1Image(np.full(img.shape, 0.5, np.float32), img.affine), str(fractional))
    with pytest.raises(ValueError, match="fractional"):
        LoadScand(("image", "label"))({**record, "label": str(fractional)})


def test_validation_crops_read_through_the_reader(tmp_path, secret):
    from sam_med3d.training import OfficialCropd

    record = _training_pair(tmp_path)
    crop = OfficialCropd(crop_size=16)({**record, "label_value": 2})
    assert crop["label"].sum() > 0
    evil = tmp_path / "evil.nrrd"
    evil.write_text(_nrrd_header(f"data file: {secret}", sizes="20 10 20"))
    for key in ("image", "label"):
        with pytest.raises(ValueError, match="names another file"):
            OfficialCropd(crop_size=16)({**record, key: str(evil), "label_value": 2})


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_a_uint8_label_read_by_itk_is_the_files_content_not_freed_memory(tmp_path, suffix):
    """load_label used to return a view of SimpleITK's buffer for uint8 NRRD/MHA labels, freed as it returned:
    the caller then read whatever the allocator put there (a click's label map came back with stray values)."""
    record = _training_pair(tmp_path, suffix)
    expected = np.zeros((20, 18, 16), dtype=np.uint8)
    expected[5:12, 4:10, 3:9] = 2
    for _ in range(3):
        label = load_label(record["label"], read_header(record["image"]))
        clutter = [np.full(label.nbytes, 129, dtype=np.uint8) for _ in range(20)]  # reuse the freed memory
        np.testing.assert_array_equal(label, expected)
        del clutter


def test_a_dicom_series_whose_later_files_are_larger_is_refused_from_the_headers(tmp_path):
    """The cap was counted from the first file's header times the number of files: a small first slice let the
    others claim any size (ITK's series reader decodes each file before it compares sizes)."""
    folder = tmp_path / "series"
    _dicom_series(folder, slices=3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.77"
    big = sitk.GetImageFromArray(np.ones((300, 400), dtype=np.int16))
    for tag, value in {"0008|0060": "CT", "0020|000e": series, "0020|000d": series + ".1",
                       "0008|0018": f"{series}.9", "0020|0013": "9", "0020|0032": "0\\0\\20.0",
                       "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
        big.SetMetaData(tag, value)
    writer.SetFileName(str(folder / "s9.dcm"))
    writer.Execute(big)
    for read in (read_header, load_scan):
        with pytest.raises(ValueError, match="different sizes"):
            read(folder, max_voxels=10_000)


@pytest.mark.parametrize("kind", ["nrrd", "mha"])
def test_a_header_with_many_dimensions_is_refused_without_crashing_the_process(tmp_path, kind):
    """ITK's NRRD reader ended the process with a segmentation fault on an NRRD of 11 or more dimensions (one
    unauthenticated upload stopped the server): the header is refused before ITK sees it. Read in a child
    process, so that a crash fails this test instead of ending the test run."""
    import subprocess
    import sys

    paths = []
    for ndim in (6, 11, 16):
        sizes = " ".join(["2"] * ndim)
        path = tmp_path / f"d{ndim}.{kind}"
        if kind == "nrrd":
            header = f"NRRD0004\ntype: uint8\ndimension: {ndim}\nsizes: {sizes}\nencoding: raw\n\n"
        else:
            header = (f"ObjectType = Image\nNDims = {ndim}\nDimSize = {sizes}\nElementType = MET_UCHAR\n"
                      "ElementDataFile = LOCAL\n")
        path.write_bytes(header.encode() + bytes(2 ** ndim))
        paths.append(str(path))
    code = ("import sys\nfrom sam_med3d.io import read_header, load_label\nfor path in sys.argv[1:]:\n"
            "    for read in (read_header, load_label):\n        try:\n            read(path)\n"
            "        except ValueError as err:\n            print('refused:', err, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, f"the reader's process ended with {done.returncode}:\n{done.stdout}"
    for ndim in (6, 11, 16):
        assert done.stdout.count(f"declares {ndim} dimensions") == 2, done.stdout
