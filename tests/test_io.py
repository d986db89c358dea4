"""load_scan: every format gives the same (i, j, k) array and RAS affine; bad inputs raise clear ValueErrors."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from sam_med3d.io import Scan, load_scan

SPACING = (0.8, 1.1, 2.5)
ORIGIN = (-12.0, 30.5, 7.25)  # LPS, as ITK stores it


def _rotation() -> np.ndarray:
    """A proper rotation mixing all axes (30 deg about z, then 20 deg about x): a non-trivial direction."""
    a, b = np.deg2rad(30.0), np.deg2rad(20.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _volume() -> np.ndarray:
    """An asymmetric int16 (I, J, K) volume, so any axis flip or permutation changes it."""
    i, j, k = np.meshgrid(np.arange(14), np.arange(11), np.arange(9), indexing="ij")
    return (3 * i + 50 * j + 700 * k + (i * j) % 7).astype(np.int16)


def _sitk_image(direction: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(_volume().transpose(2, 1, 0))  # sitk wants (k, j, i)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(direction.flatten().tolist())
    return img


def _expected_affine(direction: np.ndarray) -> np.ndarray:
    """RAS voxel->world written out independently of the module: LPS (D * spacing, origin), x and y negated."""
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(SPACING)
    lps[:3, 3] = ORIGIN
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _write_dicom_series(img: sitk.Image, folder: Path) -> None:
    """One CT slice file per k, with the geometry tags GDCM uses to rebuild the volume."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = img.GetDirection()
    iop = "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                           direction[1], direction[4], direction[7]))
    series = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(img.GetDepth()):
        slc = img[:, :, k]
        position = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": series + ".1",
                "0020|000e": series, "0008|0018": f"{series}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0037": iop, "0020|0032": "\\".join(f"{v:.10f}" for v in position),
                "0018|0050": str(SPACING[2]), "0028|0030": f"{SPACING[1]}\\{SPACING[0]}"}
        for tag, value in tags.items():
            slc.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slc)


@pytest.fixture()
def direction() -> np.ndarray:
    return _rotation()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
def test_every_file_format_gives_the_same_array_and_affine(tmp_path, direction, suffix):
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(_sitk_image(direction), str(path))
    scan = load_scan(path, detached_ok=suffix == ".mhd")  # .mhd: voxels in a second file, read only on request
    assert isinstance(scan, Scan)
    assert scan.array.dtype == np.float32 and scan.array.shape == (14, 11, 9)
    np.testing.assert_array_equal(scan.array, _volume().astype(np.float32))
    # NIfTI stores the rotation as a float32 quaternion: allow its rounding.
    np.testing.assert_allclose(scan.affine, _expected_affine(direction), atol=1e-4)
    np.testing.assert_allclose(scan.spacing_mm, SPACING, atol=1e-5)
    assert scan.source == str(path)


def test_dicom_series_folder_matches_the_volume(tmp_path, direction):
    folder = tmp_path / "series"
    _write_dicom_series(_sitk_image(direction), folder)
    scan = load_scan(folder)
    np.testing.assert_array_equal(scan.array, _volume().astype(np.float32))
    np.testing.assert_allclose(scan.affine, _expected_affine(direction), atol=1e-4)
    assert "DICOM series" in scan.source


def test_voxel_world_position_agrees_with_itk(tmp_path, direction):
    """The affine maps array[i, j, k] to ITK's physical point of index (i, j, k), with LPS -> RAS."""
    img = _sitk_image(direction)
    path = tmp_path / "scan.mha"
    sitk.WriteImage(img, str(path))
    scan = load_scan(path)
    for ijk in [(0, 0, 0), (13, 2, 5), (4, 10, 8)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        ras = scan.affine @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
        assert scan.array[ijk] == img[ijk]


def test_nifti_affine_is_nibabels(tmp_path):
    affine = np.array([[0.0, 0.0, -2.0, 40.0], [-0.7, 0.0, 0.0, 12.0], [0.0, 0.9, 0.0, -3.0], [0, 0, 0, 1]])
    path = tmp_path / "psr.nii.gz"
    nib.save(nib.Nifti1Image(_volume(), affine), str(path))
    scan = load_scan(path)
    np.testing.assert_allclose(scan.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(scan.array, _volume())


def test_arrays_tensors_and_image_objects(direction):
    vol = _volume()
    affine = _expected_affine(direction)
    from_numpy = load_scan(vol, affine)
    from_torch = load_scan(torch.from_numpy(vol.astype(np.float64)), torch.from_numpy(affine))
    from_nib = load_scan(nib.Nifti1Image(vol, affine))
    from_sitk = load_scan(_sitk_image(direction))
    for scan in (from_numpy, from_torch, from_nib, from_sitk):
        assert scan.array.dtype == np.float32
        np.testing.assert_array_equal(scan.array, vol)
        np.testing.assert_allclose(scan.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(load_scan(vol).affine, np.eye(4))  # default: identity


def test_metatensor_brings_its_affine(direction):
    from monai.data import MetaTensor

    affine = _expected_affine(direction)
    scan = load_scan(MetaTensor(torch.from_numpy(_volume()), affine=torch.from_numpy(affine)))
    np.testing.assert_allclose(scan.affine, affine)
    channel_first = load_scan(MetaTensor(torch.from_numpy(_volume())[None], affine=torch.from_numpy(affine)))
    np.testing.assert_array_equal(channel_first.array, _volume())
    with pytest.raises(ValueError, match="multi-channel"):  # a plain tensor has no channel convention
        load_scan(torch.from_numpy(_volume())[None])


def test_trailing_singleton_axis_is_dropped(tmp_path):
    vol = _volume()[..., None]
    assert load_scan(vol).shape == (14, 11, 9)
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    assert load_scan(path).shape == (14, 11, 9)


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 4, 4)), "empty"),
    (np.arange(20.0).reshape(4, 5), "2D"),
    (np.arange(20.0).reshape(4, 5, 1), "2D"),
    (np.arange(120.0).reshape(4, 5, 3, 2), "multi-channel"),
    (np.full((4, 5, 6), 7.0), "constant"),
    (np.array(["a"] * 8).reshape(2, 2, 2), "voxel type"),
])
def test_bad_arrays(array, message):
    with pytest.raises(ValueError, match=message):
        load_scan(array)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(bad):
    vol = _volume().astype(np.float32)
    vol[3, 4, 5] = bad
    with pytest.raises(ValueError, match=r"NaN/inf voxel\(s\), e.g. at \(3, 4, 5\)"):
        load_scan(vol)


@pytest.mark.parametrize("affine, message", [
    (np.eye(3), "4x4"),
    (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    (np.full((4, 4), np.nan), "non-finite"),
    (np.ones((4, 4)), "last row"),
])
def test_bad_affines(affine, message):
    with pytest.raises(ValueError, match=message):
        load_scan(_volume(), affine)


def test_missing_corrupt_and_truncated_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        load_scan(missing)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=str(garbage)):
        load_scan(garbage)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(_volume(), np.eye(4)), str(good))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:600]))
    with pytest.raises(ValueError, match=str(truncated)):
        load_scan(truncated)
    bad_mha = tmp_path / "bad.mha"
    bad_mha.write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(ValueError, match=str(bad_mha)):
        load_scan(bad_mha)


def test_2d_4d_and_vector_files(tmp_path):
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(30, dtype=np.int16).reshape(5, 6)), str(flat))
    with pytest.raises(ValueError, match=f"{flat} is a 2D image"):
        load_scan(flat)
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32), np.eye(4)),
             str(series))
    with pytest.raises(ValueError, match="4D or multi-channel"):
        load_scan(series)
    rgb = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6, 3), np.uint8), isVector=True), str(rgb))
    with pytest.raises(ValueError, match=f"{rgb} is a multi-channel image"):
        load_scan(rgb)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(ValueError, match="holds no DICOM series"):
        load_scan(tmp_path)


def test_affine_is_only_for_arrays(tmp_path):
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_volume(), np.eye(4)), str(path))
    with pytest.raises(ValueError, match="only for arrays"):
        load_scan(path, np.eye(4))


def test_unsupported_input_type():
    with pytest.raises(ValueError, match="cannot load a scan from a dict"):
        load_scan({"image": 1})


def test_file_identity_tells_a_replaced_file_from_the_old_one_even_with_the_same_size_and_time(tmp_path):
    from sam_med3d.io import file_identity

    path = tmp_path / "weights.pth"
    path.write_bytes(b"a" * 64)
    old = file_identity(path)
    assert old[0] == os.path.realpath(path) and old[2] == 64
    link = tmp_path / "link.pth"
    link.symlink_to(path)
    assert file_identity(link) == old  # the file behind the name, not the name
    replacement = tmp_path / "weights.pth.tmp"
    replacement.write_bytes(b"b" * 64)
    keep = tmp_path / "keep"  # hold the old inode so the new file cannot reuse its number
    os.link(path, keep)
    os.utime(replacement, ns=(old[3], old[3]))
    os.replace(replacement, path)  # an atomic publish: same name, size and modification time
    new = file_identity(path)
    assert new[0] == old[0] and new[2:] == old[2:] and new != old
    with pytest.raises(OSError):
        file_identity(tmp_path / "missing")
