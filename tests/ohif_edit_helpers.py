"""Helpers for ``tests/test_ohif_edit.py``: mouse strokes, point prompts and label maps in OHIF's MONAI Label mode.

Label maps are numpy arrays ``(slice, row, column)`` of the server's label values (the viewer's voxel order:
flat index = column + row * columns + slice * columns * rows), whatever numbers OHIF gives its segments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Sequence

import numpy as np
import requests

from browser_helpers import Browser, read_nrrd, wait_until


def stroke(browser: Browser, voxels: Sequence[Sequence[float]]) -> None:
    """A left-button drag through voxels ``(i, j, k)`` of the axial viewport (whatever tool is active)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    actions = ActionBuilder(browser.driver)
    x, y = browser.voxel_to_page(voxels[0])
    actions.pointer_action.move_to_location(int(round(x)), int(round(y)))
    actions.pointer_action.pointer_down()
    for voxel in voxels[1:]:
        x, y = browser.voxel_to_page(voxel)
        actions.pointer_action.move_to_location(int(round(x)), int(round(y)))
    actions.pointer_action.pointer_up()
    actions.perform()


def viewer_map(browser: Browser, shape: Sequence[int], values: Dict[str, int]) -> np.ndarray:
    """OHIF's label map with the server's value of each segment's name."""
    viewer = browser.viewer_label_map()
    assert viewer["size"] == int(np.prod(shape)), f"OHIF's label map has {viewer['size']} voxels, not {shape}"
    table = np.zeros(256, dtype=np.uint8)
    for index, name in viewer["names"].items():
        table[int(index)] = values.get(name, 0)
    flat = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    flat[np.asarray(viewer["index"], dtype=np.int64)] = table[np.asarray(viewer["value"], dtype=np.int64)]
    return flat.reshape(tuple(shape))


def run_click(browser: Browser, ijk: Sequence[int], timeout_s: float = 240.0) -> dict:
    """Click voxel ``ijk`` with the point tool, press Run; OHIF's finished infer request with ``answer``, the
    label map the server returned."""
    import SimpleITK as sitk

    seen = len(browser.requests_to("/infer/sam_med3d"))
    points = browser.point_count()
    browser.click_page(*browser.voxel_to_page(ijk))
    wait_until(lambda: browser.point_count() > points, 20, "OHIF's point prompt placed by the click")
    browser.click_button("Run")
    request = wait_until(lambda: [r for r in browser.requests_to("/infer/sam_med3d")[seen:] if r["finished"]],
                         timeout_s, "OHIF's /infer/sam_med3d request to finish")[0]
    assert request["status"] == 200, (request, browser.console()[-10:])
    request["answer"] = sitk.GetArrayFromImage(read_nrrd(browser.response_body(request["id"])))
    return request


def wait_viewer(browser: Browser, expected: np.ndarray, values: Dict[str, int], what: str,
                timeout_s: float = 30.0) -> np.ndarray:
    """Wait until OHIF's label map equals ``expected``; AssertionError with the number of differing voxels."""
    last = {}

    def equal():
        last["map"] = viewer_map(browser, expected.shape, values)
        return np.array_equal(last["map"], expected)

    try:
        wait_until(equal, timeout_s, what)
    except TimeoutError:
        differ = int((last.get("map", np.zeros_like(expected)) != expected).sum())
        raise AssertionError(f"{what}: OHIF's label map differs in {differ} voxels") from None
    return last["map"]


def newest_seg(orthanc, work: Path, seen: Iterable[str], timeout_s: float = 60.0) -> Path:
    """The file of the newest SEG series on Orthanc that is not in ``seen`` (SeriesInstanceUIDs)."""
    seen = set(seen)

    def find():
        for series in requests.get(f"{orthanc.url}/series", timeout=30).json():
            info = requests.get(f"{orthanc.url}/series/{series}", timeout=30).json()
            uid = info["MainDicomTags"].get("SeriesInstanceUID")
            if info["MainDicomTags"].get("Modality") == "SEG" and uid not in seen:
                return info
        return None

    info = wait_until(find, timeout_s, "a new SEG on Orthanc")
    path = work / f"seg_{len(seen)}.dcm"
    path.write_bytes(requests.get(f"{orthanc.url}/instances/{info['Instances'][0]}/file", timeout=30).content)
    return path


def seg_label_map(path: Path, sop_uids: Sequence[str], shape: Sequence[int], values: Dict[str, int]) -> np.ndarray:
    """A SEG as a label map: frames placed by the source instance they reference, slices in the order of
    ``sop_uids`` (the series as the test wrote it), segments by name."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    label = np.zeros(tuple(shape), dtype=np.uint8)
    for segment in seg.SegmentSequence:
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(sop_uids),
                                                   segment_numbers=[int(segment.SegmentNumber)],
                                                   combine_segments=True)
        label[pixels > 0] = values[str(segment.SegmentLabel)]
    return label
