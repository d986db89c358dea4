"""Driving the OHIF bundled with MONAI Label in headless Chromium (selenium), for the browser test.

Chromium runs with a fresh profile, no network services of its own (no QUIC, sync, component updates,
background networking, crash reporter) and talks only to the URLs the test opens (127.0.0.1). chromedriver is
started in its own process group, so stopping that group also ends every Chromium process it started.

Positions come from OHIF itself: ``window.cornerstone`` (exposed by the OHIF build) gives each viewport's
camera and its voxel-index <-> canvas transform, so a click lands on a chosen voxel whatever the layout.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-crash-reporter", "--disable-breakpad", "--no-default-browser-check",
                  "--window-size=1600,1000"]


def browser_missing() -> Optional[str]:
    """Why the browser test cannot run here (None when it can)."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} not found (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def require_browser_and_orthanc() -> None:
    """Skip a browser test, naming what is missing of Chromium, chromedriver, selenium and Orthanc+DICOMweb; with
    ``REQUIRE_BROWSER=1`` (CI) fail instead."""
    import pytest
    from dicomweb_helpers import orthanc_missing

    missing = browser_missing() or orthanc_missing()
    if missing:
        reason = f"browser test needs Chromium, chromedriver, selenium and Orthanc+DICOMweb: {missing}"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def artifacts_dir(name: str) -> Path:
    """``outputs/<name>`` (or ``$SAM_MED3D_ARTIFACTS/<name>``), emptied: where a browser test keeps screenshots and
    logs."""
    from app_helpers import REPO

    folder = Path(os.environ.get("SAM_MED3D_ARTIFACTS", REPO / "outputs")) / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def mask_on_series_grid(label_path: Path) -> Any:
    """A NIfTI label's foreground as (slice, row, column) of the DICOM series written from the same scan (LPS)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(label_path)), "LPS")) > 0


def interior_point(mask_2d: Any) -> Tuple[int, int]:
    """(row, column) deepest inside a 2D mask (largest distance to its border)."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    distance = distance_transform_edt(mask_2d)
    row, column = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(column)


def spleen_tinted(rgb: Any) -> Any:
    """Pixels in the spleen segment's colour (OHIF draws it purple, rgb(157, 108, 162), over grey CT)."""
    return (rgb[..., 0] - rgb[..., 1] > 12) & (rgb[..., 2] - rgb[..., 1] > 12)


def png(browser: "Browser", path: Path) -> Any:
    """A screenshot saved to ``path``, as an RGB int array."""
    import io

    import numpy as np
    from PIL import Image

    data = browser.driver.get_screenshot_as_png()
    path.write_bytes(data)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something truthy; ``TimeoutError`` naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as err:  # the page is re-rendering: elements come and go
            last_error = err
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s} s" + (f" (last error: {last_error})" if last_error else ""))


def stop_and_keep_logs(stoppers: Sequence[Callable[[], Any]], work: Path, artifacts: Path) -> None:
    """Run ``stoppers`` newest first (a failing one does not keep the others from running), then copy the server's,
    chromedriver's and Orthanc's logs from ``work`` into ``artifacts``."""
    for stop in reversed(stoppers):
        try:
            stop()
        except Exception as err:  # keep stopping the others
            print(f"cleanup: {err}")
    for log in ("server.log", "chromedriver.log", "orthanc/orthanc.log"):
        if (work / log).exists():
            shutil.copy(work / log, artifacts / Path(log).name)


class Browser:
    """A headless Chromium driven by chromedriver; :meth:`stop` ends both (the whole process group)."""

    def __init__(self, profile_dir: Path, log_path: Path, page_timeout_s: float = 120.0):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile_dir = profile_dir
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.service = Service(CHROMEDRIVER, log_output=str(log_path), popen_kw={"start_new_session": True})
        self.driver = webdriver.Chrome(service=self.service, options=options)
        self.driver.set_page_load_timeout(page_timeout_s)
        self.driver.set_script_timeout(60)
        self._performance: List[dict] = []

    # ---------------------------------------------------------------------------------------------- basics
    def stop(self) -> None:
        """Quit the browser, then kill chromedriver's process group (any Chromium process left)."""
        process = getattr(self.service, "process", None)
        try:
            self.driver.quit()
        except Exception:
            pass
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    def screenshot(self, path: Path) -> Path:
        self.driver.save_screenshot(str(path))
        return path

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def console(self) -> List[str]:
        return [f"{e['level']} {e['message'][:400]}" for e in self.driver.get_log("browser")]

    def body_text(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def click_text(self, text: str, timeout_s: float = 30.0) -> None:
        """Click the first visible element whose own text is ``text`` (with JavaScript: panels overlap)."""
        from selenium.webdriver.common.by import By

        def find():
            for element in self.driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"):
                if element.is_displayed():
                    return element
            return None

        element = wait_until(find, timeout_s, f"a visible element with the text {text!r}")
        self.js("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", element)

    def click_button(self, text: str, timeout_s: float = 30.0, real_mouse: bool = False) -> None:
        """Click the visible ``<button>`` labelled ``text`` (scripted, or with the mouse: some OHIF dialogs act
        on pointer events only)."""
        from selenium.webdriver.common.by import By

        def find():
            buttons = self.driver.find_elements(By.XPATH, f"//button[normalize-space(text())='{text}']")
            return next((b for b in buttons if b.is_displayed()), None)

        from selenium.webdriver.common.action_chains import ActionChains

        button = wait_until(find, timeout_s, f"a visible {text!r} button")
        if real_mouse:
            self.js("arguments[0].scrollIntoView({block: 'center'});", button)
            ActionChains(self.driver).move_to_element(button).click().perform()
        else:
            self.js("arguments[0].click();", button)

    def point_count(self) -> int:
        """How many point-prompt annotations OHIF holds (cornerstone's annotation manager)."""
        return int(self.js("return cornerstoneTools.annotation.state.getAnnotationManager()"
                           ".getNumberOfAllAnnotations();") or 0)

    # ------------------------------------------------------------------------------------------- network
    def _drain_performance(self) -> None:
        for entry in self.driver.get_log("performance"):
            self._performance.append(json.loads(entry["message"])["message"])

    def requests_to(self, fragment: str) -> List[Dict[str, Any]]:
        """Requests whose URL contains ``fragment``: ``{"id", "url", "method", "post", "status"}`` (status
        once the response arrived)."""
        self._drain_performance()
        found: Dict[str, Dict[str, Any]] = {}
        for message in self._performance:
            params = message.get("params", {})
            if message.get("method") == "Network.requestWillBeSent" and fragment in params["request"]["url"]:
                found[params["requestId"]] = {"id": params["requestId"], "url": params["request"]["url"],
                                              "method": params["request"]["method"],
                                              "post": params["request"].get("postData"), "status": None,
                                              "finished": False}
            elif message.get("method") == "Network.responseReceived" and params.get("requestId") in found:
                found[params["requestId"]]["status"] = params["response"]["status"]
            elif message.get("method") == "Network.loadingFinished" and params.get("requestId") in found:
                found[params["requestId"]]["finished"] = True
        return list(found.values())

    def response_body(self, request_id: str) -> bytes:
        body = self.driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": request_id})
        return base64.b64decode(body["body"]) if body.get("base64Encoded") else body["body"].encode()

    def request_post_data(self, request_id: str) -> str:
        try:
            return self.driver.execute_cdp_cmd("Network.getRequestPostData", {"requestId": request_id})["postData"]
        except Exception:
            return ""

    # ------------------------------------------------------------------------------------------ OHIF
    def open_monai_label_mode(self, server_url: str, study_uid: str, timeout_s: float = 180.0) -> None:
        """Open the study in OHIF's MONAI Label mode and connect the MONAI Label panel to ``server_url``."""
        from selenium.webdriver.common.by import By

        self.driver.get(f"{server_url}/ohif/")
        wait_until(lambda: "Study List" in self.body_text(), timeout_s, "OHIF's study list")
        # The panel reads the server address from this cookie (default: this host on port 8000).
        self.js("document.cookie = 'MONAILABEL_SERVER_URL=' + escape(arguments[0]) + '; path=/ohif';",
                f"{server_url}/")
        self.driver.get(f"{server_url}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        wait_until(lambda: self.axial_viewport(), timeout_s, "the study's volume in OHIF's viewports")
        for button in self.driver.find_elements(By.XPATH, "//button[normalize-space(text())='Confirm and Hide']"):
            self.js("arguments[0].click()", button)
        self.wait_connected()

    def open_section(self, title: str, timeout_s: float = 30.0) -> None:
        """Open the MONAI Label panel's section ``title`` (its header toggles it: open it only when closed)."""
        def header_and_state():
            return self.js("""
                for (const label of document.querySelectorAll('label.tab-label')) {
                  if (label.textContent.trim() !== arguments[0]) continue;
                  const box = document.getElementById(label.htmlFor);
                  return box ? {checked: box.checked} : null;
                }
                return null;""", title)

        state = wait_until(header_and_state, timeout_s, f"the panel section {title!r}")
        if not state["checked"]:
            self.click_text(title)
        wait_until(lambda: (header_and_state() or {}).get("checked"), 10, f"the panel section {title!r} open")

    def wait_connected(self, timeout_s: float = 60.0) -> float:
        """Wait until the MONAI Label panel has connected to the server by itself (the app's OHIF connects once
        the study is shown); returns the seconds waited. Fails if the annotator would have to press Connect."""
        start = time.monotonic()
        wait_until(lambda: "Point Prompts" in self.body_text() and self.js(
                       "return !!window.services.segmentationService.getLabelmapVolume('1')"), timeout_s,
                   "the MONAI Label panel connected to the server (and its segmentation made) without pressing "
                   "Connect")
        return time.monotonic() - start

    def viewer_label_map(self) -> Dict[str, Any]:
        """OHIF's label map in the MONAI Label mode: ``{"size": voxels, "index": [flat index of each labelled
        voxel], "value": [its OHIF segment index], "names": {index: segment label}}`` (flat index = column +
        row * columns + slice * columns * rows, the viewer's voxel order)."""
        return self.js("""
            const service = window.services.segmentationService;
            const data = service.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray();
            const index = [], value = [];
            for (let i = 0; i < data.length; i++) if (data[i]) { index.push(i); value.push(data[i]); }
            const names = {};
            const segments = service.getSegmentation('1').segments;
            for (const key of Object.keys(segments)) if (segments[key]) names[key] = segments[key].label;
            return {size: data.length, index: index, value: value, names: names};""")

    def viewer_geometry(self) -> Dict[str, Any]:
        """The grid of OHIF's label map (the MONAI Label mode's segmentation): ``{"dimensions", "origin",
        "spacing", "direction"}`` (world = origin + direction @ (spacing * (i, j, k)), direction's columns the
        i, j, k axes; DICOM patient coordinates, mm)."""
        return self.js("""
            const volume = window.services.segmentationService.getLabelmapVolume('1');
            const data = volume.imageData;
            return {dimensions: Array.from(data.getDimensions()), origin: Array.from(data.getOrigin()),
                    spacing: Array.from(data.getSpacing()), direction: Array.from(data.getDirection())};""")

    def shown_study(self) -> Optional[str]:
        """The StudyInstanceUID of the display set in the active viewport (None while none is shown)."""
        return self.js("""
            try {
              const uids = window.services.displaySetService.getActiveDisplaySets().map(d => d.StudyInstanceUID);
              return uids.length ? uids[0] : null;
            } catch (err) { return null; }""")

    def paint_viewer(self, flat_indices: Sequence[int], segment_label: Optional[str]) -> None:
        """Set voxels of OHIF's label map to the segment named ``segment_label`` (None: erase), as a brush or
        eraser stroke does, and redraw."""
        self.js("""
            const service = window.services.segmentationService;
            const volume = service.getLabelmapVolume('1');
            const segments = service.getSegmentation('1').segments;
            let value = 0;
            if (arguments[1] !== null) {
              value = Number(Object.keys(segments).find(k => segments[k] && segments[k].label === arguments[1]));
            }
            const data = volume.voxelManager.getCompleteScalarDataArray();
            for (const i of arguments[0]) data[i] = value;
            volume.voxelManager.setCompleteScalarDataArray(data);
            cornerstoneTools.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified('1');""",
                [int(i) for i in flat_indices], segment_label)

    def axial_viewport(self) -> Optional[Dict[str, Any]]:
        """The axial viewport's id, volume size, current slice index and canvas rectangle (page pixels)."""
        return self.js("""
            if (!window.cornerstone) return null;
            for (const ee of cornerstone.getEnabledElements()) {
              const vp = ee.viewport, cam = vp.getCamera();
              if (Math.abs(cam.viewPlaneNormal[2]) < 0.99) continue;
              const data = vp.getImageData && vp.getImageData();
              if (!data) return null;
              const k = data.imageData.worldToIndex(cam.focalPoint)[2];
              const r = vp.element.getBoundingClientRect();
              return {id: vp.id, dims: data.dimensions, k: Math.round(k),
                      rect: {x: r.left, y: r.top, width: r.width, height: r.height}};
            }
            return null;""")

    def voxel_to_page(self, ijk: Sequence[float]) -> Tuple[float, float]:
        """Page coordinates (CSS pixels) of voxel ``(i, j, k)`` in the axial viewport."""
        xy = self.js("""
            for (const ee of cornerstone.getEnabledElements()) {
              const vp = ee.viewport;
              if (Math.abs(vp.getCamera().viewPlaneNormal[2]) < 0.99) continue;
              const c = vp.worldToCanvas(vp.getImageData().imageData.indexToWorld(arguments[0]));
              const r = vp.element.getBoundingClientRect();
              return [r.left + c[0], r.top + c[1]];
            }
            return null;""", [float(v) for v in ijk])
        if not xy:
            raise RuntimeError("no axial viewport in OHIF")
        return float(xy[0]), float(xy[1])

    def segment_label_at(self, ijk: Sequence[int]) -> Optional[str]:
        """The label of OHIF's segment at voxel ``(i, j, k)`` of its first segmentation (None: background)."""
        return self.js("""
            const [i, j, k] = arguments[0];
            const seg = window.services.segmentationService.getSegmentations()[0];
            if (!seg) return 'no segmentation';
            const labelmap = seg.representationData.Labelmap;
            let value;
            if (labelmap.volumeId) {
              const volume = cornerstone.cache.getVolume(labelmap.volumeId);
              value = volume.voxelManager.getAtIJK(i, j, k);
            } else {  // one derived image per slice, in the order of the referenced images
              const image = cornerstone.cache.getImage(labelmap.imageIds[k]);
              value = image.voxelManager.getScalarData()[j * image.columns + i];
            }
            if (!value) return null;
            const segment = seg.segments[value];
            return segment ? segment.label : `segment ${value}`;""", [int(v) for v in ijk])

    def click_page(self, x: float, y: float) -> None:
        """A mouse click at page coordinates (on whatever tool is active there)."""
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        actions = ActionBuilder(self.driver)
        actions.pointer_action.move_to_location(int(round(x)), int(round(y)))
        actions.pointer_action.click()
        actions.perform()


def read_nrrd(data: bytes) -> Any:
    """A NRRD file's bytes as a SimpleITK image (via a temporary file)."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.nrrd")
        with open(path, "wb") as handle:
            handle.write(data)
        return sitk.ReadImage(path)
