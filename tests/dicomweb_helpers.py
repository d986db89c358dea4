"""A throw-away Orthanc DICOMweb server on 127.0.0.1 and a CT series to put in it, for tests and benchmarks.

Orthanc 1.10 (Debian ``orthanc`` + ``orthanc-dicomweb``) has no bind-address option, so it is configured with
``RemoteAccessAllowed: false`` (it answers only loopback clients), a free HTTP port, DICOM networking off,
its own storage folder and no plugins but DICOMweb. It runs in its own process group and is stopped with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import List, Optional

import numpy as np
import requests

try:
    from app_helpers import LoggedProcess, free_port, wait_until_answering
except ImportError:  # imported as tests.dicomweb_helpers
    from tests.app_helpers import LoggedProcess, free_port, wait_until_answering

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def orthanc_missing() -> Optional[str]:
    """Why Orthanc with DICOMweb cannot run here (None when it can)."""
    if not Path(ORTHANC_BINARY).exists():
        return f"{ORTHANC_BINARY} not found (apt-get install orthanc orthanc-dicomweb)"
    plugins = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    if not plugins:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


class Orthanc(LoggedProcess):
    """A running Orthanc; ``dicomweb`` is its DICOMweb root (``http://127.0.0.1:PORT/dicom-web``)."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        super().__init__(process, log_path)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.url}/dicom-web"

    def upload(self, files: List[Path]) -> None:
        """Store DICOM files through Orthanc's REST API (``POST /instances``)."""
        for path in files:
            response = requests.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
            response.raise_for_status()

    def series_of_modality(self, modality: str) -> List[dict]:
        """QIDO-RS series of ``modality`` (DICOM JSON)."""
        response = requests.get(f"{self.dicomweb}/series", params={"Modality": modality}, timeout=30)
        response.raise_for_status()
        return response.json() if response.text.strip() else []


def start_orthanc(work_dir: Path, timeout_s: float = 60.0) -> Orthanc:
    """Start Orthanc with storage under ``work_dir`` on a free loopback port; wait until it answers."""
    missing = orthanc_missing()
    if missing:
        raise RuntimeError(missing)
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    plugin = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))[0]
    config = {
        "Name": "sam-med3d-test",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # no bind-address option in 1.10: refuse every non-loopback client
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "HttpsCACertificates": "",
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Host": "127.0.0.1", "Ssl": False},
        "StableAge": 1,
    }
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = work_dir / "orthanc.log"
    log = open(log_path, "wb")
    process = subprocess.Popen([ORTHANC_BINARY, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                               cwd=work_dir, start_new_session=True)
    orthanc = Orthanc(process, port, log_path)
    wait_until_answering(orthanc, f"{orthanc.dicomweb}/studies", "Orthanc", timeout_s)
    return orthanc


def _uid(*parts: str) -> str:
    """A deterministic UUID-derived UID (``2.25.<128-bit integer>``) for ``parts``."""
    return "2.25." + str(uuid.UUID(bytes=hashlib.sha256("/".join(parts).encode()).digest()[:16]).int)


def write_ct_series(nifti_path: Path, out_dir: Path, patient_id: str = "SPLEEN8") -> List[Path]:
    """Write a NIfTI CT as a DICOM CT series, one file per slice (SimpleITK/GDCM), in ``out_dir``.

    The geometry is the NIfTI's, reoriented to the usual axial CT layout; UIDs are derived from the file
    name, so the same input gives the same study and series UIDs. Returns the files in slice order.
    """
    import SimpleITK as sitk

    # Axial slices with the usual CT orientation (rows along +x, columns along +y in LPS, slices along +z).
    image = sitk.DICOMOrient(sitk.Cast(sitk.ReadImage(str(nifti_path)), sitk.sitkInt16), "LPS")
    return write_series(image, out_dir, Path(nifti_path).name, patient_id=patient_id,
                        description="MSD spleen_8 CT", patient_name="Spleen^Eight")


def write_series(image, out_dir: Path, name: str, patient_id: str = "SPLEEN8", description: str = "test series",
                 patient_name: str = "Test^Series") -> List[Path]:
    """Write a SimpleITK int16 volume as a DICOM CT series, one file per slice ``k`` (instance number k + 1).

    Any geometry: the slice orientation is the direction's first two columns and slice ``k`` sits at the
    volume's index ``(0, 0, k)``, so a direction whose third column is minus ``row x column`` gives a series
    whose slices descend along the slice normal as the instance number grows. UIDs derive from ``name``.
    """
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = _uid(name, "study"), _uid(name, "series"), _uid(name, "frame")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    spacing = image.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": CT_IMAGE_STORAGE,
            "0008|0018": _uid(name, "instance", str(k)),
            "0008|0060": "CT",
            "0008|0020": "20260101",
            "0008|0030": "120000",
            "0008|0021": "20260101",
            "0008|0031": "120000",
            "0008|103e": description,
            "0010|0010": patient_name,
            "0010|0020": patient_id,
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0052": frame_uid,
            "0020|0010": "1",
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
            "0028|1050": "40",
            "0028|1051": "400",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        path = out_dir / f"slice_{k + 1:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_image)
        files.append(path)
    return files


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
