"""A DICOMweb datastore (Orthanc, DCM4CHEE, ...) that works offline and treats DICOM SEG as final labels.

MONAI Label 0.8.5's ``DICOMWebDatastore`` needs dcmqi's ``itkimage2segimage``, which the app base class
downloads from GitHub at start (the server does not start offline), to write a final label as DICOM SEG;
it reads SEGs back by segment number. :class:`OfflineDICOMWebDatastore` keeps its layout (series downloaded
into its cache folder, converted to a volume, labels kept locally as well) and changes what matters here:

- **final labels are written as DICOM SEG with highdicom** (one segment per label present, numbered 1..N,
  ``SegmentLabel`` = the app's label name) and stored on the server with STOW-RS; nothing is downloaded;
- **a SEG on the server is the image's final label**, whoever stored it (this datastore, OHIF's
  "Export DICOM SEG", any tool): segments are mapped to the app's label values **by name**, not by segment
  number (OHIF numbers its segments in its own order), frames to slices by referenced SOP instance or by
  position; a SEG whose frames are not on the image's pixel grid (mirrored, shifted, resampled, or between
  slices) is refused, not resampled. The newest SEG of an image wins; ``datalist()`` (what training reads) syncs them first;
- **series are converted once, in the background if asked** (:meth:`prefetch`), to an uncompressed NIfTI
  volume in the cache, so the first click on an image does not wait for the download and conversion.

Voxel conventions: a label map is handled as SimpleITK arrays ``(slice, row, column)`` of the volume read by
GDCM from the series (slices in GDCM's geometric order); frame ``k`` of a SEG written here is slice ``k``.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from cachetools import TTLCache, cached
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset
from sam_med3d.io import load_label

from lib.validation import check_label_file, check_name
from lib.errors import InvalidRequest
from lib.upstream_fixes.datastore_index import AtomicDatastoreIndex

logger = logging.getLogger(__name__)

#: How long the lists of series and SEGs queried from the server are reused (MONAI Label caches them 2 h,
#: which hides a SEG stored by OHIF from Next Sample and training for that long).
QUERY_CACHE_S = 10.0
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: How far (fraction of the slice spacing) a SEG frame may lie from the slice it is put on. Writers copy the
#: source's position, so real frames are within rounding; a frame farther away belongs to another
#: reconstruction (other slice positions) and is refused rather than moved to the nearest slice.
SLICE_TOLERANCE = 0.1
#: Largest difference between a SEG's frame orientation (direction cosines) and the series'.
ORIENTATION_TOLERANCE = 1e-3
#: Longest wait for another process downloading the same series.
SERIES_LOCK_S = 600.0


# ------------------------------------------------------------------------------------------------ download
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def download_series(client: Any, series_uid: str, folder: str) -> int:
    """Download every instance of a series into ``folder`` as ``<SOPInstanceUID>.dcm``; returns how many.

    One WADO-RS request for the whole series, read as a stream (``DICOMwebClient.iter_series``). MONAI Label's
    ``dicom_web_download_series`` calls ``retrieve_series``, which reads the whole multipart body into one
    bytes object and splits it part by part, copying the rest of the body each time: quadratic, 7 s of
    ``bytes.split`` for a 300-slice CT (157 MB) that Orthanc sends in 0.2 s. Streamed, each split copies at
    most one chunk. The SOP instance UID becomes a file name only if it is a UID (digits and dots).
    """
    matches = [found for found in client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
               if found.get("0020000E", {}).get("Value") == [series_uid]]
    if not matches:
        raise InvalidRequest(f"series {series_uid} was not found on the DICOMweb server")
    study_uid = str(Dataset.from_json(matches[0]).StudyInstanceUID)
    os.makedirs(folder, exist_ok=True)
    count = 0
    for instance in client.iter_series(study_uid, series_uid):
        uid = str(getattr(instance, "SOPInstanceUID", ""))
        if not _UID.fullmatch(uid) or len(uid) > 64:
            raise InvalidRequest(f"series {series_uid}: an instance has the SOP instance UID {uid[:80]!r}, not a UID")
        instance.save_as(os.path.join(folder, f"{uid}.dcm"))
        count += 1
    return count


# ------------------------------------------------------------------------------------------- volume <-> SEG
def read_series(series_dir: str) -> Tuple[Any, List[str], List[str]]:
    """The series in ``series_dir`` as a SimpleITK image, its files and SOP Instance UIDs in slice order."""
    import pydicom
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = list(reader.GetGDCMSeriesFileNames(series_dir))
    if not files:
        raise ValueError(f"no DICOM series found in {series_dir}")
    reader.SetFileNames(files)
    image = reader.Execute()
    sop_uids = [str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                for f in files]
    return image, files, sop_uids


def label_segments(label: np.ndarray, names_by_value: Mapping[int, str]) -> Tuple[np.ndarray, List[Tuple[int, str]]]:
    """Renumber a label map's values to DICOM segment numbers 1..N (by increasing value).

    Returns the renumbered map and ``[(value, name), ...]`` of the segments in segment-number order.
    Raises ValueError for an empty map or a value with no label name.
    """
    if label.dtype.kind in "ub":  # counting is 10x faster than np.unique's sort of every voxel
        values = [int(v) for v in np.flatnonzero(np.bincount(label.ravel())) if v != 0]
    else:
        values = [int(v) for v in np.unique(label) if v != 0]
    if not values:
        raise ValueError("the label is empty (no voxel is labelled); nothing to save")
    unknown = [v for v in values if v not in names_by_value]
    if unknown:
        known = ", ".join(f"{name}={value}" for value, name in sorted(names_by_value.items()))
        raise ValueError(f"the label holds values {unknown} that are not labels of this server ({known})")
    segments = np.zeros(label.shape, dtype=np.uint8)
    for number, value in enumerate(values, start=1):
        segments[label == value] = number
    return segments, [(v, names_by_value[v]) for v in values]


def _property_type(name: str) -> Any:
    """The SNOMED CT code of a label name when pydicom knows one ("spleen" -> Spleen), else Tissue."""
    from pydicom.sr.codedict import codes

    try:
        return getattr(codes.SCT, "".join(part.capitalize() for part in name.split("_")))
    except (AttributeError, RuntimeError):  # unknown, or ambiguous in pydicom's dictionary
        return codes.SCT.Tissue


def cielab(rgb: Sequence[int]) -> Tuple[int, int, int]:
    """An sRGB colour (0-255) as a DICOM CIELab value (``RecommendedDisplayCIELabValue``, 0-65535 each)."""
    import highdicom as hd
    from skimage.color import rgb2lab

    l_star, a_star, b_star = rgb2lab(np.asarray(rgb, dtype=float).reshape(1, 1, 3) / 255.0)[0, 0]
    return tuple(int(v) for v in hd.color.CIELabColor(float(np.clip(l_star, 0, 100)),
                                                       float(np.clip(a_star, -128, 127)),
                                                       float(np.clip(b_star, -128, 127))).value)


def write_seg(source_files: Sequence[str], label: np.ndarray, names_by_value: Mapping[int, str],
              series_description: str = "SAM-Med3D label",
              colours_by_value: Optional[Mapping[int, Sequence[int]]] = None) -> Dataset:
    """A binary DICOM SEG (highdicom) of ``label`` ``(slice, row, column)`` over the series ``source_files``
    (in the slice order of ``label``); one segment per label value present, ``SegmentLabel`` = its name, and
    the recommended display colour of the values in ``colours_by_value`` (sRGB 0-255, e.g. the viewer's)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    if label.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(f"label shape {label.shape} does not match the series ({len(sources)} slices of "
                         f"{sources[0].Rows}x{sources[0].Columns})")
    segments, described = label_segments(label, names_by_value)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=_property_type(name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="SAM-Med3D", version="1.0", family=codes.cid7162.ArtificialIntelligence),
        )
        for number, (_, name) in enumerate(described, start=1)
    ]
    for description, (value, _) in zip(descriptions, described):
        if colours_by_value and value in colours_by_value:
            description.RecommendedDisplayCIELabValue = list(cielab(colours_by_value[value]))
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MONAI Label",
        manufacturer_model_name="SAM-Med3D app",
        software_versions="1.0",
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=True,
    )
    return seg


def _plane_slice(frame: Dataset, positions: np.ndarray, normal: np.ndarray) -> Tuple[Optional[int], float]:
    """``(nearest slice or None, distance in mm)`` of a frame's ``PlanePositionSequence`` (None: no position)."""
    plane = getattr(frame, "PlanePositionSequence", None)
    if not plane:
        return None, 0.0
    position = np.asarray([float(v) for v in plane[0].ImagePositionPatient])
    distances = np.abs((positions - position) @ normal)
    nearest = int(np.argmin(distances))
    return nearest, float(distances[nearest])


def _frame_slice_index(frame: Dataset, sop_index: Mapping[str, int], positions: np.ndarray,
                       normal: np.ndarray, frame_number: int = 0) -> Optional[int]:
    """The slice (in ``sop_index`` order) a SEG frame lies on: by referenced SOP instance, else by position.

    A frame that names its source instance **and** a position must agree on the slice: a SEG whose frames
    lie on other slices than the instances they reference (a writer that numbered frames by index, e.g. a
    mirrored stack) raises ValueError instead of becoming a label on the wrong slices.
    """
    spacing = float(np.median(np.abs(np.diff(positions @ normal)))) if len(positions) > 1 else 1.0
    tolerance = SLICE_TOLERANCE * max(spacing, 1e-3)
    nearest, distance = _plane_slice(frame, positions, normal)
    for derivation in getattr(frame, "DerivationImageSequence", []) or []:
        for source in getattr(derivation, "SourceImageSequence", []) or []:
            uid = str(getattr(source, "ReferencedSOPInstanceUID", ""))
            if uid in sop_index:
                k = sop_index[uid]
                if nearest is not None and (nearest != k or distance > tolerance):
                    raise ValueError(f"frame {frame_number} references slice {k} (instance {uid}) but its "
                                     f"position lies on slice {nearest}: the SEG's frames are not placed on the "
                                     "slices they reference (mirrored or shifted)")
                return k
    if nearest is not None and distance <= tolerance:
        return nearest
    return None


def _frame_attribute(seg: Dataset, frame: Dataset, sequence: str, attribute: str) -> Optional[List[float]]:
    """A per-frame functional group attribute (e.g. ``PlaneOrientationSequence.ImageOrientationPatient``) of
    ``frame``, else the SEG's shared one; None when neither has it."""
    for group in (frame, *(getattr(seg, "SharedFunctionalGroupsSequence", None) or [])):
        items = getattr(group, sequence, None)
        if items and attribute in items[0]:
            return [float(v) for v in getattr(items[0], attribute)]
    return None


def check_seg_grid(seg: Dataset, image: Any) -> None:
    """Refuse a SEG whose frames are not on the pixel grid of ``image`` (the series read by :func:`read_series`).

    :func:`read_seg` copies frame pixels onto slices as they are: that is right only when each frame has the
    image's rows and columns, orientation and pixel spacing, and starts at its slice's origin. A SEG written
    on another grid (frames mirrored or transposed, shifted in their plane, resampled) raises ValueError
    naming the mismatch instead of becoming a label on the wrong voxels.
    """
    width, height = int(image.GetWidth()), int(image.GetHeight())
    if (int(seg.Rows), int(seg.Columns)) != (height, width):
        raise ValueError(f"the SEG's frames are {seg.Columns}x{seg.Rows} pixels but the image's slices are "
                         f"{width}x{height}")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    expected_orientation = np.concatenate([direction[:, 0], direction[:, 1]])
    spacing = image.GetSpacing()
    expected_spacing = np.asarray([spacing[1], spacing[0]])  # DICOM: between rows, then between columns
    positions, normal = slice_geometry(image)
    in_plane_tolerance = 0.5 * float(min(spacing[0], spacing[1]))
    frames = getattr(seg, "PerFrameFunctionalGroupsSequence", None) or []
    for number, frame in enumerate(frames, start=1):
        orientation = _frame_attribute(seg, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        if orientation is not None and np.abs(np.asarray(orientation) - expected_orientation).max() \
                > ORIENTATION_TOLERANCE:
            raise ValueError(f"frame {number} of the SEG has the orientation {np.round(orientation, 4).tolist()} "
                             f"but the image's slices {np.round(expected_orientation, 4).tolist()} (frames "
                             "mirrored, transposed or rotated)")
        pixel_spacing = _frame_attribute(seg, frame, "PixelMeasuresSequence", "PixelSpacing")
        if pixel_spacing is not None and not np.allclose(pixel_spacing, expected_spacing, rtol=1e-3, atol=1e-4):
            raise ValueError(f"frame {number} of the SEG has the pixel spacing {pixel_spacing} mm but the image "
                             f"{expected_spacing.tolist()} mm")
        position = _frame_attribute(seg, frame, "PlanePositionSequence", "ImagePositionPatient")
        if position is not None:
            offsets = np.asarray(position) - positions
            nearest = int(np.argmin(np.abs(offsets @ normal)))
            in_plane = offsets[nearest] - (offsets[nearest] @ normal) * normal
            if np.linalg.norm(in_plane) > in_plane_tolerance:
                raise ValueError(f"frame {number} of the SEG is shifted {np.linalg.norm(in_plane):.2f} mm in its "
                                 f"plane from the origin of slice {nearest}")


def read_seg(seg: Dataset, sop_uids: Sequence[str], positions: np.ndarray, normal: np.ndarray,
             values_by_name: Mapping[str, int]) -> Tuple[np.ndarray, List[str]]:
    """A SEG as a label map ``(slice, row, column)`` over the series with ``sop_uids`` (slice order).

    Segments are mapped to label values **by** ``SegmentLabel`` (case-insensitive); segments with other
    names are skipped and returned as the second value. Where segments overlap, the first one is kept.
    Frames are copied onto slices as they are: :func:`check_seg_grid` first refuses frames on another grid.
    """
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    rows, columns = frames.shape[1:]
    label = np.zeros((len(sop_uids), rows, columns), dtype=np.uint8)
    by_name = {name.lower(): value for name, value in values_by_name.items()}
    value_of_segment: Dict[int, int] = {}
    skipped = []
    for segment in seg.SegmentSequence:
        name = str(getattr(segment, "SegmentLabel", ""))
        if name.lower() in by_name:
            value_of_segment[int(segment.SegmentNumber)] = by_name[name.lower()]
        else:
            skipped.append(name)
    threshold = 1
    if str(getattr(seg, "SegmentationType", "BINARY")) == "FRACTIONAL":
        threshold = max(1, int(getattr(seg, "MaximumFractionalValue", 255)) // 2 + 1)
    sop_index = {uid: k for k, uid in enumerate(sop_uids)}
    for frame_number, (frame, pixels) in enumerate(zip(seg.PerFrameFunctionalGroupsSequence, frames), start=1):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        value = value_of_segment.get(number)
        if value is None:
            continue
        k = _frame_slice_index(frame, sop_index, positions, normal, frame_number)
        if k is None:
            raise ValueError(f"a frame of SEG {seg.SeriesInstanceUID} lies on no slice of the image series")
        on = (pixels >= threshold) & (label[k] == 0)
        label[k][on] = value
    return label, skipped


def slice_geometry(image: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Each slice's origin (LPS, mm) and the slice normal of a SimpleITK volume."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    positions = np.asarray([image.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(image.GetDepth())])
    return positions, direction[:, 2]


def _segment_values(segments: Any, values_by_name: Mapping[str, int]) -> Tuple[np.ndarray, Dict[int, Tuple[int, ...]]]:
    """A 256-entry table from the viewer's segment indices to the app's label values, from ``label_info``
    (``[{"name": "spleen", "idx": 3}, ...]``, as MONAI Label's OHIF client sends it; names are matched
    case-insensitively), and ``{label value: (r, g, b)}`` of the entries that give the viewer's ``"color"``.
    Indices not listed map to 255 (refused by the caller when present)."""
    by_name = {name.lower(): int(value) for name, value in values_by_name.items()}
    known = ", ".join(f"{name}={value}" for name, value in sorted(values_by_name.items(), key=lambda kv: kv[1]))
    if not isinstance(segments, list):
        raise InvalidRequest("params.label_info must be a list of {\"name\": <label name>, \"idx\": <value in "
                             "label.bin>} (one per segment of the label map)")
    table = np.full(256, 255, dtype=np.uint8)
    table[0] = 0
    colours: Dict[int, Tuple[int, ...]] = {}
    for entry in segments:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("idx"), int) or isinstance(entry.get("idx"), bool):
            raise InvalidRequest(f"params.label_info: {str(entry)[:80]} is not {{\"name\": <text>, \"idx\": <int>}}")
        idx, name = int(entry["idx"]), entry["name"]
        if not 1 <= idx <= 254:
            raise InvalidRequest(f"params.label_info: segment {name[:40]!r} has idx {idx}, not 1..254")
        value = by_name.get(name.lower())
        if value is None:
            raise InvalidRequest(f"params.label_info: segment {name[:40]!r} is not a label of this server ({known})")
        table[idx] = value
        colour = entry.get("color")
        if colour is not None:
            if not isinstance(colour, list) or len(colour) not in (3, 4) \
                    or not all(isinstance(c, (int, float)) and 0 <= c <= 255 for c in colour):
                raise InvalidRequest(f"params.label_info: the color of segment {name[:40]!r} is not [r, g, b] (0-255)")
            colours[value] = tuple(int(round(c)) for c in colour[:3])
    return table, colours


def viewer_label_to_image(volume_path: str, raw_path: str, segments: Any,
                          values_by_name: Mapping[str, int]) -> Tuple[str, Dict[int, Tuple[int, ...]]]:
    """The viewer's raw label map (uint8, column fastest, then row, then slice: the order of the cached volume,
    which is the order OHIF holds the series in) as a NIfTI on the volume's grid, with the app's label values.

    Without ``segments`` the values must already be the app's. Returns a temporary file the caller deletes and
    the viewer's colour of each label value that ``segments`` gives one for.
    Raises :class:`InvalidRequest` for a map of the wrong size or values no segment names.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(volume_path)
    reader.ReadImageInformation()
    size = tuple(int(v) for v in reader.GetSize())[:3]
    expected = int(np.prod(size))
    found = os.path.getsize(raw_path)
    if found != expected:
        raise InvalidRequest(f"label.bin holds {found} bytes, but the image is {'x'.join(map(str, size))} = "
                             f"{expected} voxels (one uint8 per voxel)")
    raw = np.fromfile(raw_path, dtype=np.uint8).reshape(size[::-1])
    colours: Dict[int, Tuple[int, ...]] = {}
    if segments is None:
        table = np.full(256, 255, dtype=np.uint8)
        for value in [0, *values_by_name.values()]:
            table[int(value)] = int(value)
    else:
        table, colours = _segment_values(segments, values_by_name)
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    unnamed = [int(v) for v in present if table[v] == 255]
    if unnamed:
        raise InvalidRequest(f"label.bin holds values {unnamed} that params.label_info does not name")
    label = sitk.GetImageFromArray(table[raw])
    label.SetOrigin(reader.GetOrigin())
    label.SetSpacing(reader.GetSpacing())
    label.SetDirection(reader.GetDirection())
    handle, path = tempfile.mkstemp(prefix="sam_med3d_viewer_label_", suffix=".nii.gz")
    os.close(handle)
    sitk.WriteImage(label, path, True)
    return path, colours


# ----------------------------------------------------------------------------------------------- datastore
class OfflineDICOMWebDatastore(AtomicDatastoreIndex, DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore without dcmqi, with SEG labels by name (see the module docstring).

    Args:
        client: the DICOMweb client.
        label_values: the app's ``{name: value}`` (``background`` ignored).
        search_filter, cache_path, fetch_by_frame: as for MONAI Label's ``DICOMWebDatastore``.
    """

    def __init__(self, client: Any, label_values: Mapping[str, int], search_filter: Dict[str, Any],
                 cache_path: Optional[str] = None, fetch_by_frame: bool = False):
        super().__init__(client=client, search_filter=search_filter, cache_path=cache_path,
                         fetch_by_frame=fetch_by_frame, convert_to_nifti=True)
        self.values_by_name = {name: int(v) for name, v in label_values.items() if int(v) != 0}
        self.names_by_value = {v: name for name, v in self.values_by_name.items()}
        self._locks: Dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._seg_meta: Dict[str, Dataset] = {}  # SEG series UID -> first instance's metadata (never changes)
        self._prefetch_thread: Optional[threading.Thread] = None

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[key]

    # ------------------------------------------------------------------------------------------ images
    def _volume_path(self, image_id: str) -> str:
        return os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii"))

    def _series_dir(self, image_id: str) -> str:
        return os.path.realpath(os.path.join(self._datastore.image_path(), image_id))

    def _download(self, series_uid: str, target: str) -> None:
        """Download a series into ``target`` (via a temporary folder: an interrupted download leaves nothing)."""
        if os.path.isdir(target) and os.listdir(target):
            return
        partial = f"{target}.partial-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(partial, ignore_errors=True)
        if self._fetch_by_frame:
            dicom_web_download_series(None, series_uid, partial, self._client, self._fetch_by_frame)
        else:
            download_series(self._client, series_uid, partial)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)

    def get_image_uri(self, image_id: str) -> str:
        """The image's volume (NIfTI, uncompressed) in the cache; downloaded and converted on first use."""
        volume = self._volume_path(image_id)
        with self._lock(image_id):
            if os.path.exists(volume) and image_id in self._datastore.objects:
                return volume
            # The training and scoring subprocesses share the cache: one process downloads, the others wait.
            with FileLock(os.path.join(self._datastore.image_path(), f".{image_id}.lock"), timeout=SERIES_LOCK_S):
                self._refresh_objects()
                if os.path.exists(volume) and image_id in self._datastore.objects:
                    return volume
                return self._download_and_convert(image_id, volume)

    def _refresh_objects(self) -> None:
        """Re-read the datastore file (another process may have added the image meanwhile)."""
        try:
            self._init_from_datastore_file()
        except Exception as err:  # a missing or half-written file: keep what this process knows
            logger.debug("datastore file not re-read: %s", err)

    def _download_and_convert(self, image_id: str, volume: str) -> str:
        import SimpleITK as sitk

        start = time.perf_counter()
        series_dir = self._series_dir(image_id)
        self._download(image_id, series_dir)
        downloaded = time.perf_counter()
        image, _, _ = read_series(series_dir)
        with tempfile.TemporaryDirectory() as tmp:
            converted = os.path.join(tmp, f"{image_id}.nii")
            sitk.WriteImage(image, converted, False)
            LocalDatastore.add_image(self, image_id, converted, self._dicom_info(image_id))
        logger.info("DICOMweb series %s cached as %s: download %.2f s, conversion %.2f s", image_id, volume,
                    downloaded - start, time.perf_counter() - downloaded)
        return volume

    def prefetch(self, image_ids: Iterable[str]) -> threading.Thread:
        """Download and convert ``image_ids`` in a background thread (the first click then finds them ready),
        then import the SEG writer's modules (the first save then does not wait for them)."""
        ids = list(image_ids)

        def run() -> None:
            for image_id in ids:
                try:
                    self.get_image_uri(image_id)
                except Exception as err:  # a broken series must not stop the others; a click reports it
                    logger.warning("Prefetch of DICOMweb series %s failed: %s", image_id, err)
            # The first final label saved would otherwise wait for these imports (4 s on 2 CPU cores).
            import highdicom  # noqa: F401
            import pydicom.sr.codedict  # noqa: F401

        thread = threading.Thread(target=run, name="DICOMwebPrefetch", daemon=True)
        thread.start()
        self._prefetch_thread = thread
        return thread

    @cached(cache=TTLCache(maxsize=4, ttl=QUERY_CACHE_S))
    def list_images(self) -> List[str]:
        datasets = self._client.search_for_series(search_filters=self._search_filter)
        return [str(Dataset.from_json(ds)["SeriesInstanceUID"].value) for ds in datasets]

    # ------------------------------------------------------------------------------------------ labels
    def _segs_on_server(self) -> Dict[str, Tuple[str, str, str]]:
        """``{image series UID: (study UID, SEG series UID, date-time)}``: the newest SEG of each listed image."""
        images = set(self.list_images())
        newest: Dict[str, Tuple[str, str, str]] = {}
        for found in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            ds = Dataset.from_json(found)
            study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            meta = self._seg_meta.get(series)
            if meta is None:
                meta = Dataset.from_json(self._client.retrieve_series_metadata(study, series)[0])
                self._seg_meta[series] = meta
            referenced = getattr(meta, "ReferencedSeriesSequence", None)
            if not referenced:
                logger.warning("SEG %s ignored: it has no ReferencedSeriesSequence", series)
                continue
            image = str(referenced[0].SeriesInstanceUID)
            if image not in images:
                continue
            when = f"{getattr(meta, 'SeriesDate', '') or getattr(meta, 'ContentDate', '')}" \
                   f"{getattr(meta, 'SeriesTime', '') or getattr(meta, 'ContentTime', '')}"
            if image not in newest or when >= newest[image][2]:
                newest[image] = (study, series, when)
        return newest

    @cached(cache=TTLCache(maxsize=16, ttl=QUERY_CACHE_S))
    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return sorted(self._segs_on_server())

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        # Labels are kept locally by image id (as LocalDatastore does); SEGs are synced by datalist().
        return LocalDatastore.get_label_uri(self, image_id or label_id, label_tag)

    def _sync_final_label(self, image_id: str, study_uid: str, seg_uid: str) -> None:
        """Make the SEG ``seg_uid`` the image's local final label, unless it already is."""
        import SimpleITK as sitk

        with self._lock(image_id):
            info = LocalDatastore.get_label_info(self, image_id, DefaultLabelTag.FINAL) or {}
            if info.get("SeriesInstanceUID") == seg_uid:
                return
        self.get_image_uri(image_id)
        with self._lock(image_id):
            image, _, sop_uids = read_series(self._series_dir(image_id))
            instances = self._client.retrieve_series(study_uid, seg_uid)
            segs = [ds for ds in instances if str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS] or instances
            positions, normal = slice_geometry(image)
            check_seg_grid(segs[0], image)
            label, skipped = read_seg(segs[0], sop_uids, positions, normal,
                                      self.values_by_name)
            if skipped:
                logger.warning("SEG %s: segments %s are not labels of this server (%s); ignored", seg_uid,
                               skipped, ", ".join(self.values_by_name))
            label_image = sitk.GetImageFromArray(label)
            label_image.CopyInformation(image)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, f"{image_id}.nii.gz")
                sitk.WriteImage(label_image, path, True)
                LocalDatastore.save_label(self, image_id, path, DefaultLabelTag.FINAL,
                                          {"SeriesInstanceUID": seg_uid, "StudyInstanceUID": study_uid,
                                           "source": "DICOM SEG on the DICOMweb server"})
            logger.info("Final label of %s taken from SEG %s (%d labelled voxels)", image_id, seg_uid,
                        int((label > 0).sum()))

    def sync_labels(self) -> None:
        """Take the newest SEG of every image on the server as its final label (what training reads)."""
        for image_id, (study, seg, _) in self._segs_on_server().items():
            try:
                self._sync_final_label(image_id, study, seg)
            except Exception as err:  # one unreadable SEG must not hide the other labels from training
                logger.warning("SEG %s of image %s could not be read: %s", seg, image_id, err)

    def datalist(self, full_path: bool = True) -> List[Dict[str, Any]]:
        self.sync_labels()
        return LocalDatastore.datalist(self, full_path)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any],
                   label_id: str = "") -> str:
        """Save a label; a final one is also written as DICOM SEG and stored on the DICOMweb server."""
        # Names become paths in the local cache folder; the label must hold integer values 0..255 (#12).
        check_name(image_id, "image id")
        check_name(label_tag, "label tag", max_length=64)
        volume = self.get_image_uri(image_id)
        converted = ""
        colours: Dict[int, Tuple[int, ...]] = {}
        if label_filename.endswith(".bin"):  # MONAI Label's OHIF client: the viewer's label map, raw uint8
            segments = (label_info or {}).get("label_info")
            converted, colours = viewer_label_to_image(volume, label_filename, segments, self.values_by_name)
            label_filename = converted
        try:
            check_label_file(label_filename, None, what="the label")
            if label_tag == DefaultLabelTag.FINAL:
                with self._lock(image_id):
                    image, files, _ = read_series(self._series_dir(image_id))
                try:  # the app's one reader (its header was checked above); (i, j, k) -> ITK's (k, j, i)
                    label = np.ascontiguousarray(load_label(label_filename, what="the label").transpose(2, 1, 0))
                except ValueError as err:
                    raise InvalidRequest(str(err)) from err
                size = tuple(reversed(label.shape))
                if size != tuple(image.GetSize()):
                    raise InvalidRequest(f"the label is {'x'.join(map(str, size))} but the image "
                                         f"{image_id} is {'x'.join(map(str, image.GetSize()))}")
                try:
                    seg = write_seg(files, label, self.names_by_value, colours_by_value=colours)
                except ValueError as err:
                    raise InvalidRequest(f"label of {image_id}: {err}") from err
                start = time.perf_counter()
                self._client.store_instances([seg])
                logger.info("Final label of %s stored as DICOM SEG %s (%.2f s)", image_id, seg.SeriesInstanceUID,
                            time.perf_counter() - start)
                image_info = self.get_image_info(image_id)
                label_info = dict(label_info or {})
                label_info.update({"SeriesInstanceUID": str(seg.SeriesInstanceUID),
                                   "StudyInstanceUID": image_info.get("StudyInstanceUID"),
                                   "PatientID": image_info.get("PatientID"),
                                   "Modality": "SEG",
                                   "saved": datetime.datetime.now().isoformat(timespec="seconds")})
                self._seg_meta.pop(str(seg.SeriesInstanceUID), None)
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if converted and os.path.exists(converted):
                os.unlink(converted)


def connect_dicomweb(url: str, label_values: Mapping[str, int]) -> OfflineDICOMWebDatastore:
    """The datastore for a DICOMweb ``url``, with MONAI Label's settings (credentials, prefixes, cache, filter)."""
    session = None
    if "googleapis.com" in url:
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        session = create_session_from_gcp_credentials()
    elif settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    return OfflineDICOMWebDatastore(client, label_values, search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
                                    cache_path=cache_path, fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)
