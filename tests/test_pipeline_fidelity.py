"""The predictor IS the official SAM-Med3D inference: proof on the official pipeline's own outputs.

``../shared/fixtures/sam_med3d_pipeline`` holds, for 11 entries (CT and MRI; RAS/LAS/LPS/PSR/oblique;
0.5-7.5 mm; int16/uint8/uint16/float32 scans; crops that pad; a structure at the scan's edge), what the official
``utils/infer_utils.py`` (torchio 0.19.9) computed: the 1.5 mm canonical grid, the crop (``A_roi``), the clicks of
three click steps, the low-res logits after each step and the final mask on the scan's grid.

``tests/fixtures/sam_med3d_pipeline_extra`` adds 4 entries made by the same official generator on scans derived
from the shared data by its ``make_scans.py`` (rebuilt here, checked by sha256): an int16 CT at exactly 1.5 mm (the
1.5 mm sample points fall on stored voxel centres) with a 552-voxel rib and a 297 mm muscle (larger than the crop),
an int16 CT at 0.5 mm, and a 1 mm MRI (paste-back ties) with a 943-voxel structure.

Each entry is replayed through the public API: ``set_image(scan file)``, then
``predict(clicks so far, crop_affine=A_roi)`` one click at a time with the clicks as continuous scan indices
(``click_ijk``). Bounds: low-res logits within 1e-3 at every click step, on every scan (integer scans
included: the resampling rounds as ITK does, so no voxel lands on the other side of its truncation), and the
final mask on the scan's grid within 0.1 % of the union on every voxel, rounding ties included (the
paste-back rounds as ITK does).
"""

from __future__ import annotations

import hashlib
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_med3d import build_sam_med3d
from sam_med3d.checkpoint import load_checkpoint
from sam_med3d.geometry import PreparedScan
from sam_med3d.io import load_scan
from sam_med3d.predictor import Sam3DPredictor

from conftest import SHARED, require

PIPELINE = SHARED / "fixtures" / "sam_med3d_pipeline"
EXTRA = Path(__file__).resolve().parent / "fixtures" / "sam_med3d_pipeline_extra"
LOGIT_ATOL = 1e-3
MASK_DISAGREEMENT = 1e-3  # of the union, every voxel


def _entries() -> dict:
    """``{id: (folder of its npz, manifest entry)}`` over the shared fixtures and the project's extra ones."""
    found = {}
    for folder in (PIPELINE, EXTRA):
        path = folder / "manifest.json"
        if path.exists():
            found.update({entry["id"]: (folder, entry) for entry in json.loads(path.read_text())["entries"]})
    return found


ENTRIES = _entries()
SHARED_IDS = sorted(i for i, (folder, _) in ENTRIES.items() if folder == PIPELINE)
# When the shared folder is absent the parametrisation holds one placeholder that skips (or fails) clearly.
IDS = sorted(ENTRIES) if SHARED_IDS else ["<missing sam_med3d_pipeline fixtures>"]


@pytest.fixture(scope="session")
def extra_scans(tmp_path_factory) -> Path:
    """The scans of the extra entries, rebuilt from the shared data by ``make_scans.py``."""
    require(SHARED / "data")
    sys.path.insert(0, str(EXTRA))
    try:
        from make_scans import make
    finally:
        sys.path.remove(str(EXTRA))
    root = tmp_path_factory.mktemp("pipeline_extra")
    make(root, SHARED)
    return root


def _checked(path: Path, sha256: str) -> Path:
    path = require(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == sha256, f"{path} is not the file the fixtures were made from (sha256 {digest})"
    return path


def _source(entry_id: str, request) -> tuple:
    """``(manifest entry, its arrays, scan path, label path)``, files checked against the manifest."""
    if entry_id not in ENTRIES:
        require(PIPELINE / "manifest.json")
    folder, entry = ENTRIES[entry_id]
    root = SHARED if folder == PIPELINE else request.getfixturevalue("extra_scans")
    return (entry, np.load(folder / entry["npz"]), _checked(root / entry["image"], entry["image_sha256"]),
            _checked(root / entry["label_file"], entry["label_file_sha256"]))


@lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    if name == "vit_tiny":
        model = build_sam_med3d("vit_tiny")
        load_checkpoint(model, PIPELINE / "weights_vit_tiny.pt")
    else:
        assert name == "vit_b_ori", name
        reference = SHARED / "fixtures" / "sam_med3d_reference"

        sys.path.insert(0, str(reference))
        try:
            import fill  # the reference fixtures' deterministic weights
        finally:
            sys.path.remove(str(reference))
        manifest = json.loads((reference / "manifest_vit_b_ori.json").read_text())
        model = build_sam_med3d("vit_b_ori")
        weights = fill.fill_state_dict({e["name"]: e["shape"] for e in manifest["entries"]})
        model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()}, strict=True)
    return model.float().eval()


def _official_crop(entry_id: str, request):
    """(manifest entry, its arrays, the prepared scan, the official crop pinned by ``A_roi``)."""
    entry, arrays, image, _ = _source(entry_id, request)
    prep = PreparedScan(load_scan(image))
    return entry, arrays, prep, prep.crop_from_affine(entry["crop"]["A_roi"], 128)


@pytest.mark.parametrize("entry_id", IDS)
def test_canonical_grid_and_crop_match_official(entry_id, request):
    """The 1.5 mm canonical grid (resample in stored orientation, then reorient) and the official crop."""
    entry, _, image, label_path = _source(entry_id, request)
    prep = PreparedScan(load_scan(image))
    assert prep.scan.integer == (entry["scan"]["stored_dtype"] != "float32")
    assert list(prep.shape) == entry["canonical"]["shape"]
    np.testing.assert_allclose(prep.affine, np.asarray(entry["canonical"]["A_canonical"]), atol=1e-4)
    # Placed from the label, the crop is the official CropOrPad(mask_name="label") crop.
    label = load_scan(label_path).array == entry["label"]
    start = prep.crop_box_of_mask(label, 128)
    assert list(start) == entry["crop"]["start_in_canonical_grid"]
    crop = prep.crop(start, 128)
    np.testing.assert_allclose(crop.affine, np.asarray(entry["crop"]["A_roi"]), atol=1e-4)
    assert prep.crop_from_affine(entry["crop"]["A_roi"], 128).key == crop.key
    # The affines the official paste-back hands to SimpleITK, float for float.
    assert np.array_equal(prep.itk.canonical_affine, np.asarray(entry["canonical"]["A_canonical"]))
    assert np.array_equal(crop.itk_affine, np.asarray(entry["crop"]["A_roi"]))


@pytest.mark.parametrize("entry_id", IDS)
def test_crop_input_matches_official(entry_id, request):
    """Resampling (with integer truncation, rounded as ITK rounds), zero padding and the z-score over raw
    voxels > 0."""
    entry, arrays, prep, crop = _official_crop(entry_id, request)
    image = crop.image.numpy()
    mean, std = crop.mean_std
    assert abs(mean - entry["crop"]["znorm_mean"]) <= 1e-4 * max(1.0, abs(mean))
    assert abs(std - entry["crop"]["znorm_std"]) <= 1e-4 * max(1.0, abs(std))
    if "input_f16" in arrays.files:
        official = arrays["input_f16"][0, 0].astype(np.float32)
        tol = 2.0 ** -11 * np.abs(official) + 1e-4  # float16 storage
        bad = np.abs(image - official) > tol
        assert not bad.any(), f"{int(bad.sum())} input voxels differ, max {np.abs(image - official)[bad].max()}"
    np.testing.assert_allclose(image[::4, ::4, ::4], arrays["input_subsample_s4"], atol=1e-4)


@pytest.mark.parametrize("entry_id", IDS)
def test_predictor_reproduces_official_click_steps(entry_id, request):
    """Pinned to the official crop and fed the official clicks one step at a time through ``predict``."""
    entry, arrays, image, _ = _source(entry_id, request)
    predictor = Sam3DPredictor(_model(entry["model"]["name"]))
    predictor.set_image(image)
    points, labels = [], []
    result = None
    for t, step in enumerate(entry["steps"]):
        points.append(step["click_ijk"])
        labels.append(step["label"])
        result = predictor.predict(points, labels, label_key=entry_id, crop_affine=entry["crop"]["A_roi"])
        assert result.encoder_ran == (t == 0) and result.decode_steps == 1
        assert result.prompt_clicks == t + 1
        diff = float(np.abs(result.low_res_logits.numpy() - arrays["low_res_logits"][t]).max())
        assert diff <= LOGIT_ATOL, f"step {t + 1}: low-res logits differ by {diff:.3g} (bound {LOGIT_ATOL})"
    np.testing.assert_allclose(result.crop_affine, np.asarray(entry["crop"]["A_roi"]), atol=1e-4)
    np.testing.assert_allclose(result.affine, arrays["mask_affine"], atol=1e-4)
    official = arrays["mask"].astype(bool)
    ours = result.mask.astype(bool)
    assert ours.shape == official.shape
    union = int((ours | official).sum())
    differing = int((ours != official).sum())
    assert differing <= MASK_DISAGREEMENT * max(union, 1), (
        f"final mask differs from the official one on {differing} of {union} union voxels")
    # The crop mask itself (before paste-back) is the same threshold.
    crop_mask = result.crop_probabilities.numpy() > 0.5
    assert (crop_mask != arrays["crop_mask"].astype(bool)).sum() <= MASK_DISAGREEMENT * max(
        int((crop_mask | arrays["crop_mask"].astype(bool)).sum()), 1)


@pytest.mark.parametrize("entry_id", IDS)
def test_official_paste_back_rule_on_official_crop_mask(entry_id, request):
    """Paste-back alone: the official crop mask pasted by ours is the official scan mask, voxel for voxel,
    rounding ties included (``mask_tie_undecided`` marks where ITK's rounding decides)."""
    _, arrays, prep, crop = _official_crop(entry_id, request)
    pasted = prep.paste_back(crop, arrays["crop_mask"], np.zeros(prep.scan.shape, np.uint8))
    assert np.array_equal(pasted, arrays["mask"]), f"{int((pasted != arrays['mask']).sum())} voxels differ"


@pytest.mark.parametrize("entry_id", [i for i in SHARED_IDS if i.endswith(("int16", "small", "uint16", "femur"))] or IDS)
def test_trainer_validation_crop_is_the_official_crop(entry_id, request):
    """``validation_transforms``' default samples (``OfficialCropd``, pretrain's validation) are the official
    crop: label and input. (The app's trainer validates on click-centred crops, ``center="click"``.)"""
    from sam_med3d.training import validation_transforms

    entry, arrays, image, label = _source(entry_id, request)
    sample = validation_transforms(128)({
        "image": str(image),
        "label": str(label),
        "label_value": entry["label"]})
    assert sample["image"].shape == (1, 128, 128, 128) and sample["label"].shape == (1, 128, 128, 128)
    assert np.array_equal(sample["label"][0].numpy().astype(np.uint8), arrays["crop_label"])
    if "input_f16" in arrays.files:
        official = arrays["input_f16"][0, 0].astype(np.float32)
        close = np.abs(sample["image"][0].numpy() - official) <= 2.0 ** -11 * np.abs(official) + 1e-4
        assert close.all()
