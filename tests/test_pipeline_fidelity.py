"""The predictor IS the official SAM-Med3D inference: proof on the official pipeline's own outputs.

``../shared/fixtures/sam_med3d_pipeline`` holds, for 11 entries (CT and MRI; RAS/LAS/LPS/PSR/oblique;
0.5-7.5 mm; int16/uint8/uint16/float32 scans; crops that pad; a structure at the scan's edge), what the official
``utils/infer_utils.py`` (torchio 0.19.9) computed: the 1.5 mm canonical grid, the crop (``A_roi``), the clicks of
three click steps, the low-res logits after each step and the final mask on the scan's grid.

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
LOGIT_ATOL = 1e-3
MASK_DISAGREEMENT = 1e-3  # of the union, every voxel


def _manifest() -> dict:
    path = PIPELINE / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"entries": []}


ENTRIES = {entry["id"]: entry for entry in _manifest()["entries"]}
# When the shared folder is absent the parametrisation holds one placeholder that skips (or fails) clearly.
IDS = sorted(ENTRIES) or ["<missing sam_med3d_pipeline fixtures>"]


@pytest.fixture(scope="module")
def pipeline_dir() -> Path:
    return require(PIPELINE / "manifest.json").parent


def _entry(entry_id: str, pipeline_dir: Path) -> dict:
    assert entry_id in ENTRIES, f"fixture entry {entry_id} missing from {pipeline_dir / 'manifest.json'}"
    return ENTRIES[entry_id]


def _shared_file(relative: str, sha256: str) -> Path:
    path = require(SHARED / relative)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == sha256, f"{path} is not the file the fixtures were made from (sha256 {digest})"
    return path


@lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    if name == "vit_tiny":
        model = build_sam_med3d("vit_tiny")
        load_checkpoint(model, PIPELINE / "weights_vit_tiny.pt")
    else:
        assert name == "vit_b_ori", name
        reference = SHARED / "fixtures" / "sam_med3d_reference"
        import sys

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


def _official_crop(entry_id: str, pipeline_dir: Path):
    """(manifest entry, its arrays, the prepared scan, the official crop pinned by ``A_roi``)."""
    entry = _entry(entry_id, pipeline_dir)
    arrays = np.load(pipeline_dir / entry["npz"])
    prep = PreparedScan(load_scan(_shared_file(entry["image"], entry["image_sha256"])))
    return entry, arrays, prep, prep.crop_from_affine(entry["crop"]["A_roi"], 128)


def _knife_edge(entry: dict, arrays) -> np.ndarray:
    """Crop voxels of an integer scan whose truncated value flips under a 1e-6 voxel shift (none for float)."""
    if entry["scan"]["stored_dtype"] == "float32" or "input_truncation_knife_edge" not in arrays.files:
        return np.zeros((128,) * 3, bool)
    return arrays["input_truncation_knife_edge"].astype(bool)


@pytest.mark.parametrize("entry_id", IDS)
def test_canonical_grid_and_crop_match_official(entry_id, pipeline_dir):
    """The 1.5 mm canonical grid (resample in stored orientation, then reorient) and the official crop."""
    entry = _entry(entry_id, pipeline_dir)
    prep = PreparedScan(load_scan(_shared_file(entry["image"], entry["image_sha256"])))
    assert prep.scan.integer == (entry["scan"]["stored_dtype"] != "float32")
    assert list(prep.shape) == entry["canonical"]["shape"]
    np.testing.assert_allclose(prep.affine, np.asarray(entry["canonical"]["A_canonical"]), atol=1e-4)
    # Placed from the label, the crop is the official CropOrPad(mask_name="label") crop.
    label_path = _shared_file(entry["label_file"], entry["label_file_sha256"])
    label = load_scan(label_path).array == entry["label"]
    start = prep.crop_box_of_mask(label, 128)
    assert list(start) == entry["crop"]["start_in_canonical_grid"]
    crop = prep.crop(start, 128)
    np.testing.assert_allclose(crop.affine, np.asarray(entry["crop"]["A_roi"]), atol=1e-4)
    assert prep.crop_from_affine(entry["crop"]["A_roi"], 128).key == crop.key


@pytest.mark.parametrize("entry_id", IDS)
def test_crop_input_matches_official(entry_id, pipeline_dir):
    """Resampling (with integer truncation), zero padding and the z-score over raw voxels > 0."""
    entry, arrays, prep, crop = _official_crop(entry_id, pipeline_dir)
    image = crop.image.numpy()
    mean, std = crop.mean_std
    assert abs(mean - entry["crop"]["znorm_mean"]) <= 1e-4 * max(1.0, abs(mean))
    assert abs(std - entry["crop"]["znorm_std"]) <= 1e-4 * max(1.0, abs(std))
    if "input_f16" in arrays.files:
        official = arrays["input_f16"][0, 0].astype(np.float32)
        knife = _knife_edge(entry, arrays)
        # float16 storage: 2^-11 relative; knife-edge voxels may sit one raw unit (1/std) away.
        tol = 2.0 ** -11 * np.abs(official) + 1e-3
        bad = (np.abs(image - official) > tol) & ~knife
        assert not bad.any(), f"{int(bad.sum())} input voxels differ, max {np.abs(image - official)[bad].max()}"
        assert (np.abs(image - official) <= tol + 1.01 / std)[knife].all()
    np.testing.assert_allclose(image[::4, ::4, ::4], arrays["input_subsample_s4"],
                               atol=1.01 / std + 1e-4 if prep.scan.integer else 1e-4)


@pytest.mark.parametrize("entry_id", IDS)
def test_predictor_reproduces_official_click_steps(entry_id, pipeline_dir):
    """Pinned to the official crop and fed the official clicks one step at a time through ``predict``."""
    entry = _entry(entry_id, pipeline_dir)
    arrays = np.load(pipeline_dir / entry["npz"])
    predictor = Sam3DPredictor(_model(entry["model"]["name"]))
    predictor.set_image(_shared_file(entry["image"], entry["image_sha256"]))
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
def test_official_paste_back_rule_on_official_crop_mask(entry_id, pipeline_dir):
    """Paste-back alone: the official crop mask pasted by ours is the official scan mask, voxel for voxel,
    rounding ties included (``mask_tie_undecided`` marks where ITK's rounding decides)."""
    _, arrays, prep, crop = _official_crop(entry_id, pipeline_dir)
    pasted = prep.paste_back(crop, arrays["crop_mask"], np.zeros(prep.scan.shape, np.uint8))
    assert np.array_equal(pasted, arrays["mask"]), f"{int((pasted != arrays['mask']).sum())} voxels differ"


@pytest.mark.parametrize("entry_id", [i for i in IDS if i.endswith(("int16", "small", "uint16", "femur"))] or IDS)
def test_trainer_validation_crop_is_the_official_crop(entry_id, pipeline_dir):
    """``validation_transforms``' default samples (``OfficialCropd``, pretrain's validation) are the official
    crop: label and input. (The app's trainer validates on click-centred crops, ``center="click"``.)"""
    from sam_med3d.training import validation_transforms

    entry = _entry(entry_id, pipeline_dir)
    arrays = np.load(pipeline_dir / entry["npz"])
    sample = validation_transforms(128)({
        "image": str(_shared_file(entry["image"], entry["image_sha256"])),
        "label": str(_shared_file(entry["label_file"], entry["label_file_sha256"])),
        "label_value": entry["label"]})
    assert sample["image"].shape == (1, 128, 128, 128) and sample["label"].shape == (1, 128, 128, 128)
    assert np.array_equal(sample["label"][0].numpy().astype(np.uint8), arrays["crop_label"])
    if "input_f16" in arrays.files:
        official = arrays["input_f16"][0, 0].astype(np.float32)
        close = np.abs(sample["image"][0].numpy() - official) <= 2.0 ** -11 * np.abs(official) + 1e-3
        assert (close | _knife_edge(entry, arrays)).all()
