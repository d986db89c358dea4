"""Correcting a mask in OHIF's MONAI Label mode, in a real browser: click -> brush -> eraser -> click -> Undo ->
click -> Save -> the saved SEG opened over the scan.

Everything runs on 127.0.0.1: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) holding the CT of
``../shared/data/msd_spleen_ct`` as a DICOM series, the MONAI Label server in DICOMweb mode with the bundled
model, and the app's OHIF (``apps/sam_med3d/lib/ohif``, ``sam-med3d-edit.js``: Brush, Eraser, Undo, edits kept
by later clicks, saved SEGs shown in this mode) in headless Chromium. The expected label maps are built here
from the server's own answers (the NRRD of each Run) and the voxels the strokes changed, never from the viewer's
or the SEG's idea of where slices are. The strokes are off-centre (top right of the slice, the top rows of the
mask), so a flip or a transpose between the viewer, the server and the SEG would show.

Screenshots and logs: ``outputs/test_ohif_edit/`` (or ``$SAM_MED3D_ARTIFACTS/test_ohif_edit``). Without
Chromium/chromedriver/Orthanc the test skips, naming what is missing; ``REQUIRE_BROWSER=1`` makes that a failure.
"""

from __future__ import annotations

import json
import re

import numpy as np
import requests

from app_helpers import copy_app, start_server
from browser_helpers import (Browser, artifacts_dir, interior_point, mask_on_series_grid, png,
                             require_browser_and_orthanc, spleen_tinted, stop_and_keep_logs, wait_until)
from dicomweb_helpers import start_orthanc, write_ct_series
from ohif_edit_helpers import newest_seg, run_click, seg_label_map, stroke, viewer_map, wait_viewer

SPLEEN = "spleen"


def _map_when(browser, shape, values, condition, what, timeout_s=20.0) -> np.ndarray:
    """OHIF's label map once ``condition(map)`` holds."""
    return wait_until(lambda: (lambda m: [m] if condition(m) else None)(viewer_map(browser, shape, values)),
                      timeout_s, what)[0]


def test_brush_eraser_click_undo_save_and_open_the_seg(data_dir, tmp_path):
    require_browser_and_orthanc()
    case = data_dir / "msd_spleen_ct"
    image_path, label_path = case / "imagesTr" / "spleen_8.nii.gz", case / "labelsTr" / "spleen_8.nii.gz"
    artifacts = artifacts_dir("test_ohif_edit")
    print(f"\nscreenshots and logs in {artifacts}")
    import pydicom

    truth = mask_on_series_grid(label_path)
    files = write_ct_series(image_path, tmp_path / "ct")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    sop_uids = [str(h.SOPInstanceUID) for h in headers]
    stoppers = []
    try:
        orthanc = start_orthanc(tmp_path / "orthanc")
        stoppers.append(orthanc.stop)
        orthanc.upload(files)
        server = start_server(copy_app(tmp_path / "app"), orthanc.dicomweb, {"checkpoint": "bundled"},
                              tmp_path / "server.log",
                              env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "dicomweb_cache")})
        stoppers.append(server.stop)
        browser = Browser(tmp_path / "chromium-profile", tmp_path / "chromedriver.log")
        stoppers.append(browser.stop)
        _correct_save_and_reopen(browser, server, orthanc, truth, sop_uids, str(headers[0].StudyInstanceUID),
                                 artifacts, tmp_path)
    finally:
        stop_and_keep_logs(stoppers, tmp_path, artifacts)


def _correct_save_and_reopen(browser, server, orthanc, truth, sop_uids, study_uid, artifacts, work):
    labels = requests.get(f"{server.url}/info/", timeout=30).json()["labels"]
    values = {name: value for value, name in enumerate(labels)}
    spleen = values[SPLEEN]
    shape = truth.shape
    browser.open_monai_label_mode(server.url, study_uid)
    browser.open_section("Point Prompts")
    browser.click_text(SPLEEN)
    k = int(browser.axial_viewport()["k"])
    row, column = interior_point(truth[k])

    # A click: the viewer shows exactly the server's answer.
    first = run_click(browser, (column, row, k))["answer"]
    assert first.shape == shape and first[k, row, column] == spleen
    wait_viewer(browser, first, values, "the first mask in OHIF")

    # Brush: a stroke along row 100, columns 360-420 (top right, far from the spleen) on the slice shown.
    browser.click_button("Brush")
    stroke(browser, [(c, 100, k) for c in range(360, 421, 5)])
    painted = _map_when(browser, shape, values, lambda m: (m != first).sum() > 200, "the brush stroke in OHIF")
    where = np.argwhere(painted != first)
    assert (painted[painted != first] == spleen).all(), "the brush wrote something else than spleen"
    assert (where[:, 0] == k).all() and (abs(where[:, 1] - 100) <= 10).all() and \
        (where[:, 2] >= 350).all() and (where[:, 2] <= 430).all(), \
        f"brush voxels outside the stroke: slices {set(where[:, 0])}, rows {where[:, 1].min()}-{where[:, 1].max()}, " \
        f"columns {where[:, 2].min()}-{where[:, 2].max()}"

    # Eraser: across the mask's top rows on this slice.
    browser.click_button("Eraser")
    on = np.argwhere(first[k] == spleen)
    top = int(on[:, 0].min()) + 6
    columns = on[on[:, 0] == top][:, 1]
    stroke(browser, [(c, top, k) for c in range(int(columns.min()) - 8, int(columns.max()) + 9, 4)])
    edited = _map_when(browser, shape, values, lambda m: ((m == 0) & (painted == spleen)).sum() > 50,
                       "the eraser stroke in OHIF")
    erased = np.argwhere((edited == 0) & (painted == spleen))
    assert (erased[:, 0] == k).all() and (abs(erased[:, 1] - top) <= 10).all(), "eraser voxels outside the stroke"
    assert np.array_equal(edited[painted == 0], painted[painted == 0]), "the eraser painted"
    browser.screenshot(artifacts / "01_brush_and_eraser.png")

    # A click after the edits keeps them wherever the new answer does not change the voxel.
    browser.click_button("Points")
    away = truth[k].copy()
    away[max(0, row - 6):row + 7, max(0, column - 6):column + 7] = False
    row2, column2 = interior_point(away)
    second = run_click(browser, (column2, row2, k))["answer"]
    expected = np.where(second != first, second, edited)
    kept = int(((edited != first) & (second == first)).sum())
    assert kept > 200, f"only {kept} edited voxels untouched by the second answer: the check would prove little"
    wait_viewer(browser, expected, values, "the edits kept by the click after them")
    browser.screenshot(artifacts / "02_click_after_edits.png")

    # Undo: the viewer goes back to the edited map, the click's point is gone.
    points = browser.point_count()
    browser.click_text("Undo (2)")
    wait_viewer(browser, edited, values, "the map before the undone click")
    assert browser.point_count() == points - 1

    # The next click continues from there: OHIF sends the first and the new point only, and the server's answer
    # is merged with the edited map.
    row3, column3 = interior_point(truth[k] & (np.arange(shape[2])[None, :] > column))
    third_request = run_click(browser, (column3, row3, k))
    third = third_request["answer"]
    post = third_request["post"] or browser.request_post_data(third_request["id"])
    params = json.loads(re.search(r'name="params"\r?\n\r?\n(.*?)\r?\n--', post, re.S).group(1))
    sent = np.asarray(params[SPLEEN], dtype=float)
    assert len(sent) == 2 and np.abs(sent - [[column, row, k], [column3, row3, k]]).max() <= 1, sent.tolist()
    expected = np.where(third != first, third, edited)
    shown = wait_viewer(browser, expected, values, "the click after undo merged with the edited map")
    browser.screenshot(artifacts / "03_after_undo_and_click.png")

    # Save: the SEG on Orthanc equals the viewer voxel for voxel, edits included.
    seen = {s["0020000E"]["Value"][0] for s in orthanc.series_of_modality("SEG")}
    browser.click_button("Save Label")
    saved = seg_label_map(newest_seg(orthanc, work, seen), sop_uids, shape, values)
    assert np.array_equal(saved, shown), f"the SEG differs from the viewer in {int((saved != shown).sum())} voxels"
    untouched = (painted != first) & (third == first)
    assert untouched.sum() > 200 and (saved[untouched] == spleen).all(), "the brush stroke was not saved"

    # The saved SEG opened from the study list in this mode: the scan stays, the label shows in its colour.
    browser.driver.get(f"{server.url}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
    wait_until(lambda: browser.axial_viewport(), 180, "the study shown again")
    browser.wait_connected(120)
    browser.driver.get_log("browser")
    wait_until(lambda: browser.js("""
        for (const e of document.querySelectorAll('*')) if (e.children.length === 0 &&
            e.textContent.trim() === 'SAM-Med3D label' && e.offsetParent) return true;
        return false;"""), 60, "the saved SEG in the study list")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    entry = next(e for e in browser.driver.find_elements(By.XPATH, "//*[normalize-space(text())='SAM-Med3D label']")
                 if e.is_displayed())
    ActionChains(browser.driver).double_click(entry).perform()
    wait_viewer(browser, saved, values, "the saved SEG in OHIF's label map", timeout_s=60)
    wait_until(lambda: browser.axial_viewport(), 20, "the scan still in the axial viewport")
    k = int(browser.axial_viewport()["k"])
    mask_k = np.argwhere(saved[k] == spleen)
    assert len(mask_k), f"nothing saved on the slice shown ({k})"
    pick = mask_k[np.linspace(0, len(mask_k) - 1, min(40, len(mask_k))).astype(int)]

    def drawn():
        rgb = png(browser, artifacts / "04_saved_seg_in_monai_label_mode.png")
        inside = np.mean([spleen_tinted(rgb[int(y), int(x)]) for x, y in
                          (browser.voxel_to_page((c, r, k)) for r, c in pick)])
        rect = browser.axial_viewport()["rect"]  # the scan, not a black viewport
        grey = rgb[int(rect["y"]):int(rect["y"] + rect["height"]), int(rect["x"]):int(rect["x"] + rect["width"])].mean()
        return (inside, grey) if inside >= 0.8 and grey > 15 else None

    inside, grey = wait_until(drawn, 30, "the saved label drawn in its colour over the scan")
    print(f"saved SEG over the scan: {inside:.0%} of sampled label pixels in the spleen colour, mean grey {grey:.0f}")
    errors = [line for line in browser.console() if "Error Boundary" in line or "Uncaught" in line]
    assert not errors, errors
