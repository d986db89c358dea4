#!/usr/bin/env python
"""Write a NIfTI (or NRRD, MHA) scan as a DICOM series, one file per axial slice, so OHIF can show it.

Usage::

    python sample-datasets/nifti_to_dicom.py SCAN.nii.gz OUTPUT_DIR [--modality CT|MR] [--patient-id ID]
        [--patient-name NAME] [--description TEXT]

Then store the files on the DICOMweb server, e.g. Orthanc (``docs/orthanc.md``)::

    for f in OUTPUT_DIR/*.dcm; do curl -s -X POST http://127.0.0.1:8042/instances --data-binary @"$f" >/dev/null; done

The volume is reoriented to the usual axial layout (rows along patient left, columns along posterior, slices
from feet to head: ``LPS``), so the slices read back in the same voxel grid as the scan (SimpleITK, GDCM, OHIF).
CT voxels are stored as int16 Hounsfield units (rescale slope 1, intercept 0); MR as uint16, scaled into
0..65535 when the scan holds other values (the scaling is written as rescale slope/intercept). UIDs are derived
from the scan's content and the patient id, so converting the same scan twice gives the same study and series
UIDs (Orthanc then keeps one copy); ``--patient-id`` makes a distinct study of the same scan.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import sys
import uuid
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

#: SOP classes of the slices written.
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def derived_uid(*parts: str) -> str:
    """A UID of the form ``2.25.<128-bit integer>`` derived from ``parts`` (same parts, same UID)."""
    return "2.25." + str(uuid.UUID(bytes=hashlib.sha256("/".join(parts).encode()).digest()[:16]).int)


def _stored_values(array: np.ndarray, modality: str):
    """``(pixels, dtype, slope, intercept)``: the voxels as stored integers and the rescale back to the scan's."""
    if modality == "CT":
        return np.clip(np.rint(array), -32768, 32767).astype(np.int16), np.int16, 1.0, 0.0
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= 65535 and np.array_equal(array, np.rint(array)):
        return array.astype(np.uint16), np.uint16, 1.0, 0.0
    slope = (high - low) / 65535.0 if high > low else 1.0
    return np.rint((array - low) / slope).astype(np.uint16), np.uint16, slope, low


def nifti_to_dicom(scan_path: Path, out_dir: Path, modality: str = "CT", patient_id: str = "ANON",
                   patient_name: str = "Anonymous", description: Optional[str] = None) -> List[Path]:
    """Write ``scan_path`` as a DICOM series in ``out_dir`` (``slice_0001.dcm``, ...); returns the files in slice
    order (feet to head)."""
    import SimpleITK as sitk
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality {modality!r}: use CT or MR")
    image = sitk.ReadImage(str(scan_path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{scan_path}: a 3D scalar scan is needed, found {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image)  # (slice, row, column)
    pixels, dtype, slope, intercept = _stored_values(array.astype(np.float64), modality)
    content = hashlib.sha256(pixels.tobytes()).hexdigest()[:32]
    study_uid = derived_uid(content, patient_id, "study")
    series_uid = derived_uid(content, patient_id, "series")
    frame_uid = derived_uid(content, patient_id, "frame")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    today = datetime.date.today().strftime("%Y%m%d")
    low, high = float(array.min()), float(array.max())
    center, width = ((40.0, 400.0) if modality == "CT" else ((low + high) / 2, max(high - low, 1.0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(pixels.shape[0]):
        sop_uid = derived_uid(content, patient_id, "instance", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"slice_{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[modality], sop_uid
        ds.Modality = modality
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.SeriesDescription = description or Path(scan_path).name.split(".")[0]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if dtype == np.int16 else 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.WindowCenter, ds.WindowWidth = f"{center:.6g}", f"{width:.6g}"
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        ds.save_as(str(path), write_like_original=False)
        files.append(path)
    return files


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scan", type=Path, help="the scan (.nii.gz, .nii, .nrrd, .mha)")
    parser.add_argument("output", type=Path, help="folder for the DICOM files (created if needed)")
    parser.add_argument("--modality", default="CT", choices=sorted(SOP_CLASSES), help="CT (default) or MR")
    parser.add_argument("--patient-id", default="ANON", help="PatientID (default ANON); also makes the UIDs")
    parser.add_argument("--patient-name", default="Anonymous", help="PatientName (default Anonymous)")
    parser.add_argument("--description", default=None, help="SeriesDescription (default: the file name)")
    args = parser.parse_args(argv)
    try:
        files = nifti_to_dicom(args.scan, args.output, args.modality, args.patient_id, args.patient_name,
                               args.description)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(files)} DICOM slices written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
