"""Structures larger than one crop: the extension mechanism, proven independently of model quality.

The stand-in network's decoder returns the ground truth inside whatever crop it is given (nearest-sampled onto
the crop grid, at full crop resolution), so the only way to lose voxels is the mechanism itself: crops not
added where the structure continues, or a seam where crops are blended. On the TotalSegmentator CT of
``../shared/data`` (3 mm voxels, whose 1.5 mm round trip is exact) with 64^3 crops (96 mm), the liver, the
colon and the left iliopsoas each span several crops.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from extension_helpers import CropAwarePredictor, GroundTruthSam3D
from sam_med3d.extension import ExtensionConfig, TilingStats, blend_window, derived_points
from sam_med3d.metrics import dice

SIZE = 64


@pytest.fixture(scope="module")
def totalseg(data_dir):
    folder = data_dir / "totalseg_ct_multiorgan"
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    names = {int(v): k for k, v in labels.items()} if str(next(iter(labels.values()))).isdigit() else \
        {int(k): v for k, v in labels.items()}
    label_map = np.asarray(nib.load(str(folder / "labelsTr" / "example_ct.nii.gz")).dataobj).astype(np.int32)
    return folder / "imagesTr" / "example_ct.nii.gz", label_map, {v: k for k, v in names.items()}


def _component(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of a label (TotalSegmentator's colon has islands a click cannot reach)."""
    from scipy import ndimage

    parts, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, parts, range(1, n + 1))
    return parts == 1 + int(np.argmax(sizes))


def _deepest(gt: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(gt)
    return np.array(np.unravel_index(int(np.argmax(depth)), gt.shape))[None].astype(float)


@pytest.mark.parametrize("name", ["liver", "colon", "iliopsoas_left"])
def test_stand_in_recovers_a_structure_spanning_several_crops(totalseg, name):
    image, label_map, values = totalseg
    gt = _component(label_map == values[name])
    model = GroundTruthSam3D(gt)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(max_crops=64, time_budget_s=600))
    predictor.set_image(image)
    result = predictor.predict(_deepest(gt), [1])
    single = CropAwarePredictor(GroundTruthSam3D(gt), extension=False)
    single.set_image(image)
    one = single.predict(_deepest(gt), [1])
    assert dice(one.mask > 0, gt) < 0.9, f"{name} fits one {SIZE}^3 crop: not a test of the extension"
    assert len(result.crop_boxes) > 2 and result.tiling.crops == len(result.crop_boxes)
    score = dice(result.mask > 0, gt)
    missing = int((gt & (result.mask == 0)).sum())
    extra = int((~gt & (result.mask > 0)).sum())
    assert score >= 0.99, f"{name}: Dice {score:.4f} over {len(result.crop_boxes)} crops, {missing} voxels missing"
    assert missing == 0 and extra == 0, f"{name}: {missing} missing, {extra} extra voxels (seams?)"


def test_structure_inside_one_crop_gives_exactly_the_single_crop_result(totalseg):
    image, label_map, values = totalseg
    # A compact structure (at most 60 mm, i.e. 20 voxels of 3 mm, along every axis): it fits one 96 mm crop.
    for value in sorted(set(np.unique(label_map).tolist()) - {0}):
        found = np.argwhere(label_map == value)
        if len(found) >= 200 and np.all(found.max(0) - found.min(0) < 20):
            break
    gt = label_map == value
    extended = CropAwarePredictor(GroundTruthSam3D(gt))
    extended.set_image(image)
    single = CropAwarePredictor(GroundTruthSam3D(gt), extension=False)
    single.set_image(image)
    a, b = extended.predict(_deepest(gt), [1]), single.predict(_deepest(gt), [1])
    assert len(a.crop_boxes) == 1 and a.tiling.crops == 1
    assert np.array_equal(a.mask, b.mask) and dice(a.mask > 0, gt) == 1.0


def test_follow_up_click_reruns_only_the_crops_it_falls_in(totalseg):
    image, label_map, values = totalseg
    gt = label_map == values["liver"]
    model = GroundTruthSam3D(gt)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(max_crops=64, time_budget_s=600))
    predictor.set_image(image)
    first = predictor.predict(_deepest(gt), [1])
    runs = predictor.encoder_runs
    assert runs == len(first.crop_boxes)  # one encoder run per crop
    n = len(first.crop_boxes)
    assert first.tiling == TilingStats(crops=n, crops_added=n - 1, encoder_runs=n - 1,
                                       decode_steps=first.decode_steps - 1)
    # A background click inside exactly one of the added crops (far from the first crop).
    prepared = predictor.prepared
    boxes = [prepared.crop(b[0], SIZE) for b in first.crop_boxes]
    candidates = np.argwhere(~gt[::4, ::4, ::4]) * 4
    for ijk in candidates:
        inside = [bool(c.contains(ijk[None])[0]) for c in boxes]
        if sum(inside) == 1 and not inside[0]:
            break
    else:
        pytest.fail("no scan voxel inside exactly one added crop")
    before = model.decodes
    second = predictor.predict(np.concatenate([_deepest(gt), ijk[None].astype(float)]), [1, 0])
    assert model.decodes - before == 1 and second.decode_steps == 1
    assert predictor.encoder_runs == runs and not second.encoder_ran  # every crop's embedding was cached
    assert second.crop_boxes[:len(first.crop_boxes)] == first.crop_boxes
    assert second.tiling == TilingStats(crops=len(second.crop_boxes), crops_added=len(second.crop_boxes) - n,
                                        crops_rerun=1, crops_reused=n - 2, decode_steps=1)


def test_caps_stop_the_extension(totalseg):
    image, label_map, values = totalseg
    gt = label_map == values["colon"]
    predictor = CropAwarePredictor(GroundTruthSam3D(gt), extension=ExtensionConfig(max_crops=3))
    predictor.set_image(image)
    result = predictor.predict(_deepest(gt), [1])
    assert len(result.crop_boxes) == 3
    assert 0.0 < dice(result.mask > 0, gt) < 0.99


def test_zoom_strategy_recovers_the_liver(totalseg):
    image, label_map, values = totalseg
    gt = label_map == values["liver"]
    predictor = CropAwarePredictor(GroundTruthSam3D(gt),
                                   extension=ExtensionConfig(strategy="zoom", max_crops=64, time_budget_s=600))
    predictor.set_image(image)
    result = predictor.predict(_deepest(gt), [1])
    assert len(result.crop_boxes) > 2
    assert dice(result.mask > 0, gt) >= 0.99


def test_blend_window_and_derived_points():
    w = blend_window(64, 16)
    assert w.shape == (64,) and w[0] < 0.05 and w[31] == 1.0 and np.allclose(w, w[::-1])
    known = np.zeros((32, 32, 32), np.float32)
    known[4:20, 4:20, 4:20] = 1.0
    pts = derived_points(known, np.ones(known.shape, bool), 2, 4.0)
    assert len(pts) == 2 and all(known[tuple(p.astype(int))] == 1 for p in pts)
    assert np.linalg.norm(pts[0] - pts[1]) >= 4.0
    assert len(derived_points(np.zeros_like(known), np.ones(known.shape, bool), 2, 4.0)) == 0
    with pytest.raises(ValueError, match="strategy"):
        ExtensionConfig(strategy="magic")


def _tile(probs: np.ndarray, points, labels, start=(40, 40, 40)):
    from types import SimpleNamespace

    import torch
    from sam_med3d.extension import Tile

    crop = SimpleNamespace(start=start, size=probs.shape[0])
    return Tile(crop, np.asarray(points, float).reshape(-1, 3), np.asarray(labels), torch.zeros(1),
                torch.from_numpy(probs.astype(np.float32)))


def test_only_the_part_of_the_mask_that_was_clicked_opens_faces():
    """A blob elsewhere in the crop that reaches a face (a leak onto a neighbouring organ, a false positive)
    does not send the extension into the next crop; the clicked part reaching a face does."""
    from types import SimpleNamespace

    from sam_med3d.extension import clicked_parts, open_faces

    probs = np.zeros((32, 32, 32), np.float32)
    probs[10:20, 10:20, 10:20] = 1.0   # the clicked structure, inside the crop
    probs[0:6, 14:18, 14:18] = 0.9     # a separate blob touching the low face of axis 0
    scan = SimpleNamespace(shape=(200, 200, 200))
    tile = _tile(probs, [[15, 15, 15], [3, 16, 16]], [1, 0])  # the blob only holds a negative click
    assert clicked_parts(tile).sum() == 1000
    assert open_faces(tile, [tile], scan, margin=2, clicked_only=True) == []
    faces = open_faces(tile, [tile], scan, margin=2, clicked_only=False)
    assert [(axis, side) for axis, side, _ in faces] == [(0, -1)]
    # Joined to the clicked structure, the blob is part of it, and the face opens.
    probs[5:11, 15:17, 15:17] = 1.0
    assert [(a, s) for a, s, _ in open_faces(_tile(probs, [[15, 15, 15]], [1]), [], scan, 2, True)] == [(0, -1)]
    # A positive click outside the mask (or none at all) leaves nothing to follow.
    assert not clicked_parts(_tile(probs, [[30, 30, 30]], [1])).any()
    assert not clicked_parts(_tile(probs, np.zeros((0, 3)), [])).any()
    assert ExtensionConfig().clicked_only
