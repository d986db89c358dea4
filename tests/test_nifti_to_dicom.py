"""``sample-datasets/nifti_to_dicom.py``: a NIfTI scan written as a DICOM series reads back on the same grid."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from app_helpers import REPO


@pytest.fixture(scope="module")
def converter():
    spec = importlib.util.spec_from_file_location("nifti_to_dicom", REPO / "sample-datasets" / "nifti_to_dicom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_series(folder):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_a_ct_reads_back_voxel_exact_on_the_same_grid(converter, data_dir, tmp_path):
    import SimpleITK as sitk

    scan = data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz"
    files = converter.nifti_to_dicom(scan, tmp_path / "ct", patient_id="SPLEEN8")
    original = sitk.DICOMOrient(sitk.ReadImage(str(scan)), "LPS")
    assert len(files) == original.GetDepth()
    series = _read_series(tmp_path / "ct")
    assert np.array_equal(sitk.GetArrayFromImage(series), np.rint(sitk.GetArrayFromImage(original)))
    assert np.allclose(series.GetOrigin(), original.GetOrigin(), atol=1e-4)
    assert np.allclose(series.GetSpacing(), original.GetSpacing(), atol=1e-5)
    assert np.allclose(series.GetDirection(), original.GetDirection(), atol=1e-5)
    # The same scan and patient id give the same UIDs; another patient id another study.
    import pydicom

    again = converter.nifti_to_dicom(scan, tmp_path / "again", patient_id="SPLEEN8")
    other = converter.nifti_to_dicom(scan, tmp_path / "other", patient_id="OTHER")
    uid = lambda f: pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID  # noqa: E731
    assert uid(again[0]) == uid(files[0]) != uid(other[0])


def test_an_mr_with_fractional_values_is_rescaled(converter, tmp_path):
    import SimpleITK as sitk

    array = np.linspace(-3.5, 1200.25, 6 * 20 * 24).reshape(6, 20, 24).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 3.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-stored, as NIfTI often is
    sitk.WriteImage(image, str(tmp_path / "mr.nii.gz"))
    converter.nifti_to_dicom(tmp_path / "mr.nii.gz", tmp_path / "mr", modality="MR")
    series = _read_series(tmp_path / "mr")
    expected = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
    assert np.abs(sitk.GetArrayFromImage(series) - expected).max() < 0.02


def test_the_command_line_reports_bad_input(converter, tmp_path, capsys):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / "flat.nii.gz"))
    assert converter.main([str(tmp_path / "flat.nii.gz"), str(tmp_path / "out")]) == 2
    assert "3D scalar scan" in capsys.readouterr().err
