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
from scipy.ndimage import distance_transform_edt

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


def test_zoom_strategy_finds_a_part_of_the_structure_the_slide_does_not_reach(totalseg):
    """Both kidneys as one label, clicked on the left one: sliding follows only the clicked part (the right
    kidney lies 78 mm beyond the first crop's reach), while the zoom strategy's coarse pass (6 mm voxels, 384 mm)
    sees both and places 1.5 mm crops over the right kidney too."""
    image, label_map, values = totalseg
    gt = (label_map == values["kidney_left"]) | (label_map == values["kidney_right"])
    click = _deepest(label_map == values["kidney_left"])
    scores = {}
    for strategy in ("slide", "zoom"):
        predictor = CropAwarePredictor(GroundTruthSam3D(gt), extension=ExtensionConfig(
            strategy=strategy, zoom_spacing_mm=6.0, max_crops=64, time_budget_s=600))
        predictor.set_image(image)
        result = predictor.predict(click, [1])
        scores[strategy] = dice(result.mask > 0, gt)
        right = label_map == values["kidney_right"]
        assert not (result.mask > 0)[~gt].any()
        if strategy == "slide":
            assert not (result.mask > 0)[right].any() and scores[strategy] < 0.7
        else:
            assert int((right & (result.mask == 0)).sum()) == 0 and scores[strategy] >= 0.99, scores


def _canonical_box(prepared, mask):
    """``[lo, hi)`` of a label's voxels on the canonical grid (nearest canonical voxel of each)."""
    found = np.floor(prepared.to_canonical(np.argwhere(mask)) + 0.5).astype(int)
    return found.min(0), found.max(0) + 1


def test_zoom_strategy_tiles_the_coarse_mask_nearest_first(totalseg):
    """The "zoom" crops are planned from the coarse mask (6 mm voxels: the coarse crop sees the whole liver): one
    lattice of stride size - overlap, centred on the structure and just large enough to span it, decoded before
    the sliding pass fills in; under a crop cap, the lattice crops nearest the first one are decoded first."""
    image, label_map, values = totalseg
    gt = label_map == values["liver"]
    stride = SIZE - SIZE // 4
    results, models = {}, {}
    for cap in (64, 4):
        models[cap] = GroundTruthSam3D(gt)
        predictor = CropAwarePredictor(models[cap], extension=ExtensionConfig(
            strategy="zoom", zoom_spacing_mm=6.0, max_crops=cap, time_budget_s=600))
        predictor.set_image(image)
        results[cap] = predictor.predict(_deepest(gt), [1])
    full, capped = results[64], results[4]
    assert dice(full.mask > 0, gt) >= 0.99
    first = np.asarray(full.crop_boxes[0][0])
    added = np.array([box[0] for box in full.crop_boxes[1:]])
    on_lattice = np.all((added - added[0]) % stride == 0, axis=1)
    planned = int(np.argmin(on_lattice)) if not on_lattice.all() else len(added)  # then the slide fills in
    added = added[:planned]
    assert len(added) >= 4
    # Each prompted with derived_points clicks from the coarse mask (the click is not in them).
    click_in = [predictor.prepared.crop(start, SIZE).contains(_deepest(gt))[0] for start in added]
    derived = [len(models[64].prompts[predictor.spacing_mm, tuple(start)][0]) - int(c)
               for start, c in zip(added.tolist(), click_in)]
    assert max(derived) == 2 and derived.count(2) >= len(added) // 2, derived
    lo, hi = _canonical_box(predictor.prepared, gt)
    span_lo, span_hi = added.min(0), added.max(0) + SIZE
    slop = 4  # one coarse voxel
    assert np.all(span_lo <= lo + slop) and np.all(span_hi >= hi - slop), (span_lo, span_hi, lo, hi)
    assert np.all(span_hi - span_lo < hi - lo + stride), (span_lo, span_hi, lo, hi)  # no lattice row to spare
    assert np.all(np.abs((span_lo + span_hi) / 2 - (lo + hi) / 2) <= slop), (span_lo, span_hi, lo, hi)
    # Capped: the first crop and the 3 lattice crops nearest to it.
    kept = np.array([box[0] for box in capped.crop_boxes[1:]])
    assert len(capped.crop_boxes) == 4 and capped.crop_boxes[0] == full.crop_boxes[0]
    distance = np.abs(added - first).sum(1)
    assert {tuple(s) for s in kept} <= {tuple(s) for s in added.tolist()}
    assert np.abs(kept - first).sum(1).max() <= np.sort(distance)[2]


def test_zoom_strategy_follows_a_new_scan(totalseg):
    """One predictor, two scans: the coarse pass of the second runs on the second scan, as a fresh predictor's."""
    image, label_map, values = totalseg
    scan = nib.load(str(image))
    sub = (slice(10, None), slice(None), slice(0, 100))  # another extent and origin
    affine = scan.affine.copy()
    affine[:3, 3] = nib.affines.apply_affine(scan.affine, [10, 0, 0])
    array, gt = np.asarray(scan.dataobj, np.float32)[sub], (label_map == values["liver"])[sub]
    config = ExtensionConfig(strategy="zoom", zoom_spacing_mm=6.0, max_crops=64, time_budget_s=600)
    model = GroundTruthSam3D(label_map == values["liver"])
    reused = CropAwarePredictor(model, extension=config)
    reused.set_image(np.asarray(scan.dataobj, np.float32), scan.affine)
    assert len(reused.predict(_deepest(label_map == values["liver"]), [1]).crop_boxes) > 2
    model.label = gt.astype(np.uint8)
    reused.set_image(array, affine)
    fresh = CropAwarePredictor(GroundTruthSam3D(gt), extension=config)
    fresh.set_image(array, affine)
    a, b = reused.predict(_deepest(gt), [1]), fresh.predict(_deepest(gt), [1])
    assert a.crop_boxes == b.crop_boxes and np.array_equal(a.mask, b.mask) and dice(a.mask > 0, gt) >= 0.99


@pytest.mark.parametrize("strategy", ["slide", "zoom"])
def test_every_crop_is_prompted_with_the_user_clicks_inside_it(totalseg, strategy):
    """The user's clicks reach every crop they fall in, the coarse crop of the zoom strategy too, at their
    place on that crop, after the clicks derived from the known mask; so does the request for three masks."""
    image, label_map, values = totalseg
    gt = label_map == values["liver"]
    model = GroundTruthSam3D(gt)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(strategy=strategy, max_crops=64,
                                                                    time_budget_s=600))
    predictor.set_image(image)
    deepest = _deepest(gt)[0]
    inside = np.argwhere(gt)
    points = np.array([deepest, inside[0], inside[len(inside) // 2], inside[-1]], float)
    result = predictor.predict(points, [1, 1, 0, 1], multimask_output=True)
    grids = {predictor.spacing_mm: predictor.prepared}
    if strategy == "zoom":
        from sam_med3d.geometry import PreparedScan

        grids[3.0] = PreparedScan(predictor.prepared.scan, 3.0)
        assert 3.0 in {spacing for spacing, _ in model.prompts}
    starts = {box[0] for box in result.crop_boxes}
    assert starts <= {start for spacing, start in model.prompts if spacing == predictor.spacing_mm}
    reached, derived_counts = 0, []
    assert all(multimask for _, _, multimask in model.prompts.values())  # every crop picks the best of three
    for (spacing, start), (prompt, labels, _) in model.prompts.items():
        if spacing == predictor.spacing_mm and start not in starts:
            continue
        crop = grids[spacing].crop(start, SIZE)
        mine = [i for i in range(len(points)) if crop.contains(points[i:i + 1])[0]]
        derived = len(prompt) - len(mine)
        assert derived >= 0 and np.all(labels[:derived] == 1), (spacing, start)
        if spacing != predictor.spacing_mm or start == result.crop_boxes[0][0]:
            assert derived == 0, (spacing, start)  # the coarse crop and the first one: the user's clicks only
        else:
            derived_counts.append(derived)
        np.testing.assert_allclose(prompt[derived:], crop.to_crop(points[mine]), atol=1e-4)
        assert labels[derived:].tolist() == [[1, 1, 0, 1][i] for i in mine]
        reached += len(mine)
    assert reached > len(points)  # some clicks lie in several crops
    # Each crop added across a face: up to derived_points clicks from the known mask, all of them where it knows
    # enough (a crop placed on a positive click no crop held has none).
    assert max(derived_counts) == ExtensionConfig().derived_points == 2 and derived_counts.count(2) > 1


def test_blend_window_and_derived_points():
    w = blend_window(64, 16)
    assert w.shape == (64,) and w[0] < 0.05 and w[31] == 1.0 and np.allclose(w, w[::-1])
    known = np.zeros((32, 32, 32), np.float32)
    known[4:20, 4:20, 4:20] = 1.0
    pts = derived_points(known, np.ones(known.shape, bool), 2, 4.0)
    assert len(pts) == 2 and all(known[tuple(p.astype(int))] == 1 for p in pts) and pts.dtype == np.float64
    assert np.linalg.norm(pts[0] - pts[1]) >= 4.0
    assert len(derived_points(np.zeros_like(known), np.ones(known.shape, bool), 2, 4.0)) == 0
    assert derived_points(np.zeros_like(known), np.ones(known.shape, bool), 2, 4.0).shape == (0, 3)
    # The deepest voxel of the known part, whatever lies around it; probabilities of 0.5 are not known.
    known[:] = 0.5
    known[6:15, 20:29, 2:11] = 0.9
    inside = known > 0.5
    pts = derived_points(known, np.ones(known.shape, bool), 3, 3.0)
    assert len(pts) == 3 and all(inside[tuple(p.astype(int))] for p in pts)
    assert pts[0].tolist() == [10, 24, 6]  # the centre of the 9^3 block, 5 voxels deep
    # Along a bar 5 voxels across, the deepest voxels (3 deep) lie on its axis: the first one in index order, then
    # every min_distance along it; a blob too small for more gives fewer clicks, all inside it.
    for axis in range(3):
        bar = np.zeros_like(known)
        bar[tuple(slice(2, 30) if a == axis else slice(10, 15) for a in range(3))] = 1.0
        expected = np.full((3, 3), 12.0)
        expected[:, axis] = [4, 10, 16]
        np.testing.assert_array_equal(derived_points(bar, np.ones(known.shape, bool), 3, 6.0), expected)
    blob = np.zeros_like(known)
    blob[7:9, 7:9, 7:9] = 1.0
    pts = derived_points(blob, np.ones(known.shape, bool), 3, 4.0)
    assert len(pts) == 1 and blob[tuple(pts[0].astype(int))] == 1
    # A known part one voxel thin (a structure grazing the crop's face) still gives clicks on it.
    for axis in range(3):
        sheet = np.zeros_like(known)
        sheet[(slice(4, 20),) * axis + (31,)] = 1.0
        pts = derived_points(sheet, np.ones(known.shape, bool), 2, 4.0)
        assert len(pts) == 2 and all(sheet[tuple(p.astype(int))] == 1 for p in pts), axis

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


def test_clicked_parts_by_hand():
    """The part a positive prompt point holds: its voxel is the floor of the point (clamped into the crop),
    parts join across corners (26-connectivity), a probability of exactly 0.5 is not mask, and negative points
    select nothing."""
    from sam_med3d.extension import clicked_parts

    probs = np.zeros((16, 16, 16), np.float32)
    probs[2:6, 2:6, 2:6] = 1.0          # A: 64 voxels
    probs[6:9, 6:9, 6:9] = 0.8          # B: 27 voxels, meets A only at the corner (5, 5, 5) - (6, 6, 6)
    probs[10:14, 10:14, 10:14] = 0.5    # not mask
    probs[12:14, 0:3, 0:3] = 0.51       # C: 18 voxels
    probs[0, 15, 0] = 1.0               # D: one voxel on the crop's corner
    a, b, c, d = (np.zeros(probs.shape, bool) for _ in range(4))
    a[2:6, 2:6, 2:6] = b[6:9, 6:9, 6:9] = c[12:14, 0:3, 0:3] = d[0, 15, 0] = True

    def parts(points, labels):
        found = clicked_parts(_tile(probs, points, labels))
        assert found.shape == probs.shape and found.dtype == bool
        return found

    np.testing.assert_array_equal(parts([[3.9, 3.9, 3.9]], [1]), a | b)
    np.testing.assert_array_equal(parts([[8.6, 8.6, 8.6]], [1]), a | b)   # voxel 8 (rounding would give 9)
    assert not parts([[9.2, 9.2, 9.2]], [1]).any()
    assert not parts([[11, 11, 11]], [1]).any()                            # 0.5 is not in the mask
    np.testing.assert_array_equal(parts([[12.5, 1.5, 1.5]], [1]), c)
    np.testing.assert_array_equal(parts([[-0.4, 15.7, -0.3]], [1]), d)     # clamped into the crop
    np.testing.assert_array_equal(parts([[3, 3, 3], [12, 1, 1]], [0, 1]), c)  # the negative point selects nothing
    np.testing.assert_array_equal(parts([[3, 3, 3], [9.5, 9.5, 9.5], [12, 1, 1]], [1, 1, 1]), a | b | c)
    assert not clicked_parts(_tile(np.zeros_like(probs), [[3, 3, 3]], [1])).any()


def test_open_faces_by_hand():
    """Which faces of a 32^3 crop at (40, 40, 40) open, with margin 2, and the centre each one gives: the mask's
    voxels in the two slabs next to a face count, those 2 voxels in do not; a face at the scan's end stays shut;
    a face whose voxels just beyond lie all in the interior of another crop stays shut, and opens again when some
    lie in that crop's margin or beyond it."""
    from types import SimpleNamespace

    from sam_med3d.extension import open_faces

    probs = np.zeros((32, 32, 32), np.float32)
    probs[10:20, 10:20, 0:5] = 1.0      # touches the low face of axis 2
    probs[25:32, 12:15, 12:16] = 1.0    # touches the high face of axis 0
    probs[10:14, 2:6, 20:24] = 1.0      # 2 voxels from the low face of axis 1: not touching
    probs[10:14, 26:30, 20:24] = 1.0    # 2 voxels from the high face of axis 1 (voxel 29): not touching
    probs[0:3, 28:31, 28:31] = 0.5      # touches the low face of axis 0, but 0.5 is not mask
    scan = SimpleNamespace(shape=(200, 200, 200))
    tile = _tile(probs, [[15, 15, 15]], [1])

    def faces(tile, others=(), scan=scan):
        found = open_faces(tile, list(others), scan, 2)  # every part of the mask counts (the default)
        return [(axis, side, np.asarray(centre).tolist()) for axis, side, centre in found]

    # Axis 0, high face: voxels 30..31 x 12..14 x 12..15, canonical 70..71 x 52..54 x 52..55 -> centre (71, 53, 54)
    # (the middle of [lo, hi + 1), rounded down).
    # Axis 2, low face: voxels 10..19 x 10..19 x 0..1, canonical 50..59 x 50..59 x 40..41 -> centre (55, 55, 41).
    assert faces(tile) == [(0, 1, [71, 53, 54]), (2, -1, [55, 55, 41])]
    # The scan ends exactly at a face: nothing beyond it; one voxel more and the face opens.
    assert faces(tile, scan=SimpleNamespace(shape=(72, 200, 200))) == [(2, -1, [55, 55, 41])]
    assert faces(tile, scan=SimpleNamespace(shape=(73, 200, 200))) == faces(tile)
    at_origin = _tile(probs, [[15, 15, 15]], [1], start=(0, 0, 0))
    assert [(a, s) for a, s, _ in faces(at_origin)] == [(0, 1)]
    through = np.zeros_like(probs)
    through[14:18, 14:18, :] = 1.0      # through the crop along axis 2: shut at the scan's start, open at the other end
    assert [(a, s) for a, s, _ in faces(_tile(through, [[15, 15, 15]], [1], start=(0, 0, 0)))] == [(2, 1)]
    assert [(a, s) for a, s, _ in faces(_tile(probs, [[15, 15, 15]], [1], start=(0, 0, 1)))] == [(0, 1), (2, -1)]
    # Beyond the axis-0 face lie canonical 72 x 52..54 x 52..55. A crop whose interior holds all of it shuts the
    # face; the tile itself in the list changes nothing.
    covering = _tile(probs, [[0, 0, 0]], [1], start=(70, 40, 40))   # interior 72..99 on each axis
    assert faces(tile, [tile, covering]) == [(2, -1, [55, 55, 41])]
    assert faces(tile, [tile]) == faces(tile)
    # Beyond the low face of axis 2 lies canonical z = 39: shut by a crop whose interior ends there (start z 10,
    # interior 12..39) or starts there (start z 37, interior 39..66).
    for start in [(40, 40, 10), (40, 40, 37)]:
        assert faces(tile, [_tile(probs, [[0, 0, 0]], [1], start=start)]) == [(0, 1, [71, 53, 54])], start
    # Moved one voxel along axis 0, the voxels beyond lie in its margin: the face opens again.
    assert faces(tile, [_tile(probs, [[0, 0, 0]], [1], start=(71, 40, 40))]) == faces(tile)
    # Covering only part of them (axis 1 interior from 54) leaves the face open.
    assert faces(tile, [_tile(probs, [[0, 0, 0]], [1], start=(70, 52, 40))]) == faces(tile)
    # A wide face (24 x 2 x 24 voxels by the high face of axis 1): every voxel beyond it is looked at, canonical
    # 44..67 x 72 x 44..67. A crop whose interior holds all of it shuts the face; one whose interior starts a voxel
    # later along axis 2 leaves the row k = 44 open, the first one touching the face.
    band = np.zeros_like(probs)
    band[4:28, 30:, 4:28] = 1.0
    wide = _tile(band, [[15, 31, 15]], [1])
    assert faces(wide) == [(1, 1, [56, 71, 56])]
    assert faces(wide, [_tile(band, [[0, 0, 0]], [1], start=(40, 70, 40))]) == []
    assert faces(wide, [_tile(band, [[0, 0, 0]], [1], start=(40, 70, 43))]) == faces(wide)
    # Crops covering all but the first (i 44..50) or the last (i 60..67) rows leave the face open.
    for start in [(49, 70, 40), (30, 70, 40)]:
        assert faces(wide, [_tile(band, [[0, 0, 0]], [1], start=start)]) == faces(wide), start
    # Four crops covering all of it but the one voxel (51, 72, 56) (interiors i 23..50 and 52..79 over every k;
    # k 28..55 and 57..84 over i 42..69): that voxel alone opens the face; a fifth crop holding it shuts it.
    around = [_tile(band, [[0, 0, 0]], [1], start=s) for s in [(21, 70, 40), (50, 70, 40), (40, 70, 26), (40, 70, 55)]]
    assert faces(wide, around) == faces(wide)
    assert faces(wide, around + [_tile(band, [[0, 0, 0]], [1], start=(40, 70, 40))]) == []


# ------------------------------------------------------------------------- blending tiles that disagree
#
# A scan stored in neither RAS order nor RAS direction: array axis i runs anterior (1.5 mm), j inferior
# (2.5 mm), k left (1.5 mm), so canonical R comes from -k, A from i and S from -j. An axis mixed up anywhere in
# the blend shows as the probabilities varying along the wrong array axis.
PERMUTED_SHAPE = (40, 30, 56)
PERMUTED_AFFINE = np.array([[0.0, 0.0, -1.5, 20.0],
                            [1.5, 0.0, 0.0, -30.0],
                            [0.0, -2.5, 0.0, 40.0],
                            [0.0, 0.0, 0.0, 1.0]])


def _permuted_scan():
    from sam_med3d.geometry import PreparedScan
    from sam_med3d.io import load_scan

    array = np.random.default_rng(0).normal(size=PERMUTED_SHAPE).astype(np.float32)
    prepared = PreparedScan(load_scan(array, PERMUTED_AFFINE))
    assert nib.aff2axcodes(PERMUTED_AFFINE) == ("A", "I", "L")
    assert prepared.source_axis.tolist() == [2, 0, 1] and prepared.shape == (56, 40, 50)
    return prepared


def _crop_tile(prepared, start, probs):
    import torch
    from sam_med3d.extension import Tile

    size = probs.shape[0]
    return Tile(prepared.crop(start, size), np.zeros((0, 3)), np.zeros(0, np.int64), torch.zeros(1),
                torch.from_numpy(np.asarray(probs, np.float32)))


def _blend_reference(prepared, tiles, window):
    """The blend rule voxel by voxel: each scan voxel's nearest canonical voxel, each crop's weight there (the
    product of the window over the three crop axes) and its probability; their weighted mean."""
    ijk = np.indices(prepared.scan.shape).reshape(3, -1).T
    nearest = np.floor(prepared.to_canonical(ijk) + 0.5).astype(np.int64)
    num = np.zeros(len(ijk))
    den = np.zeros(len(ijk))
    for tile in tiles:
        local = nearest - np.asarray(tile.crop.start)
        inside = np.all((local >= 0) & (local < tile.crop.size), axis=1)
        r, a, s = local[inside].T
        weight = window[r] * window[a] * window[s]
        num[inside] += weight * tile.probs.numpy()[r, a, s]
        den[inside] += weight
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0).reshape(prepared.scan.shape)


def test_blend_weights_decide_the_overlap_on_a_non_ras_scan():
    """Two 16^3 crops overlapping by 4 voxels along canonical R (array axis k, reversed), one saying 0.9 and
    the other 0.2 everywhere. blend_window(16, 4) gives 0.875, 0.625, 0.375, 0.125 over the last 4 voxels of
    the first crop and the reverse over the first 4 of the second; the other axes' weights are the same for both
    crops and cancel. So, by hand: 0.875*0.9 + 0.125*0.2 = 0.8125, then 0.6375, 0.4625, 0.2875 (in mask, in
    mask, out, out), along k from k = 55 - 12 downwards, whatever i and j."""
    from sam_med3d.extension import blend_window, combine_in_region, combine_on_scan

    prepared = _permuted_scan()
    window = blend_window(16, 4)
    np.testing.assert_allclose(window[:4], [0.125, 0.375, 0.625, 0.875])
    tiles = [_crop_tile(prepared, (0, 0, 0), np.full((16,) * 3, 0.9)),
             _crop_tile(prepared, (12, 0, 0), np.full((16,) * 3, 0.2))]
    mask, probs = combine_on_scan(prepared, tiles, window, with_probabilities=True)
    expected_r = [0.9] * 12 + [0.8125, 0.6375, 0.4625, 0.2875] + [0.2] * 12  # canonical R = 0 .. 27
    j_inside = [j for j in range(PERMUTED_SHAPE[1])
                if 0 <= np.floor(prepared.to_canonical([[0, j, 0]])[0, 2] + 0.5) < 16]
    assert len(j_inside) >= 9
    block = probs[:16, j_inside][:, :, ::-1][:, :, :28]  # k = 55 .. 28, i.e. canonical R = 0 .. 27
    np.testing.assert_allclose(block, np.broadcast_to(expected_r, block.shape), rtol=1e-6)
    assert mask[:16, j_inside][:, :, ::-1][:, :, :28].astype(bool).tolist() == (block > 0.5).tolist()
    assert not probs[:, :, :28].any() and not probs[16:].any() and not mask[16:].any()  # no crop there
    assert mask.dtype == np.uint8 and probs.dtype == np.float32 and combine_on_scan(prepared, tiles, window)[1] is None
    _, plain_mask, nothing = combine_in_region(prepared, tiles, window)
    assert nothing is None and plain_mask.dtype == np.uint8
    # The region form is the same numbers on the box the crops cover.
    region, region_mask, region_probs = combine_in_region(prepared, tiles, window, with_probabilities=True)
    assert region == (slice(0, 16), slice(j_inside[0], j_inside[-1] + 1), slice(28, 56))
    np.testing.assert_array_equal(region_probs, probs[region])
    np.testing.assert_array_equal(region_mask, mask[region])


def test_blended_mask_comes_in_the_scan_memory_order():
    """The blended mask is laid out like the scan (Fortran order for scans read from files, i fastest), so that
    the app's merge into the label map runs along memory; the values do not depend on the layout."""
    from sam_med3d.extension import blend_window, combine_in_region
    from sam_med3d.geometry import PreparedScan
    from sam_med3d.io import load_scan

    array = np.random.default_rng(0).normal(size=PERMUTED_SHAPE).astype(np.float32)
    window = blend_window(16, 4)
    ramp = np.linspace(0.2, 0.8, 16)[:, None, None] * np.ones((16, 16, 16))
    masks = {}
    for order in ("C", "F"):
        prepared = PreparedScan(load_scan(np.asarray(array, order=order), PERMUTED_AFFINE))
        assert prepared.scan.array.flags[f"{order}_CONTIGUOUS"]
        tiles = [_crop_tile(prepared, (0, 0, 0), ramp), _crop_tile(prepared, (12, 2, 0), ramp[::-1])]
        _, mask, _ = combine_in_region(prepared, tiles, window)
        assert mask.flags[f"{order}_CONTIGUOUS"] and not mask.flags["C_CONTIGUOUS" if order == "F" else "F_CONTIGUOUS"]
        masks[order] = mask
    assert 0 < masks["C"].mean() < 1
    np.testing.assert_array_equal(masks["C"], masks["F"])


def test_blend_of_tiles_varying_along_every_axis_matches_the_voxel_by_voxel_rule():
    """Three crops overlapping along different canonical axes, each with probabilities that vary along all
    three crop axes differently: the vectorised blend equals the voxel-by-voxel rule on the whole scan and on a
    new crop's grid."""
    from sam_med3d.extension import blend_window, combine_on_scan, known_probabilities

    prepared = _permuted_scan()
    size = 16
    window = blend_window(size, 5)
    d = np.arange(size) / (size - 1)
    ramps = [d[:, None, None] * 0.6 + d[None, :, None] * 0.3 + d[None, None, :] * 0.1,
             1 - d[:, None, None] * 0.2 - d[None, :, None] * 0.7 + 0 * d[None, None, :],
             d[None, None, :] ** 2 + 0 * d[:, None, None] * d[None, :, None]]
    tiles = [_crop_tile(prepared, start, ramp) for start, ramp in
             zip([(-3, 2, 5), (9, 6, 4), (2, 14, 12)], ramps)]
    mask, probs = combine_on_scan(prepared, tiles, window, with_probabilities=True)
    expected = _blend_reference(prepared, tiles, window)
    assert (expected > 0).sum() > 5000
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_array_equal(mask, (expected > 0.5).astype(np.uint8))
    # The same rule on a new crop's grid (what its derived clicks come from), voxel by voxel.
    target = prepared.crop((4, 8, 9), size)
    known, covered = known_probabilities(target, tiles, window)
    canonical = np.indices((size,) * 3).reshape(3, -1).T + np.asarray(target.start)
    num, den = np.zeros(len(canonical)), np.zeros(len(canonical))
    for tile in tiles:
        local = canonical - np.asarray(tile.crop.start)
        inside = np.all((local >= 0) & (local < size), axis=1)
        r, a, s = local[inside].T
        num[inside] += window[r] * window[a] * window[s] * tile.probs.numpy()[r, a, s]
        den[inside] += window[r] * window[a] * window[s]
    assert covered.reshape(-1).tolist() == (den > 0).tolist() and 0 < covered.mean() < 1
    np.testing.assert_allclose(known.reshape(-1), np.divide(num, den, out=np.zeros_like(num), where=den > 0),
                               atol=1e-6)


def test_known_probabilities_blend_and_coverage_on_the_target_crop():
    """What a new crop is prompted from: on its own grid, the blend of the crops it overlaps (same numbers as
    on the scan), and where no crop reaches it, nothing known. Target crop at (8, 4, 0): along R its voxels
    0..3 are the first crop's alone (0.9), 4..7 the blended overlap, 8..15 the second crop's alone (0.2);
    along A its voxels 12..15 lie beyond both crops (A = 16..19)."""
    from sam_med3d.extension import blend_window, known_probabilities

    prepared = _permuted_scan()
    window = blend_window(16, 4)
    tiles = [_crop_tile(prepared, (0, 0, 0), np.full((16,) * 3, 0.9)),
             _crop_tile(prepared, (12, 0, 0), np.full((16,) * 3, 0.2))]
    # A crop that does not reach the target (22 voxels before it along R) adds nothing, wherever it is listed.
    far = _crop_tile(prepared, (-14, 4, 0), np.full((16,) * 3, 0.5))
    known, covered = known_probabilities(prepared.crop((8, 4, 0), 16), [far] + tiles, window)
    assert known.shape == covered.shape == (16, 16, 16) and known.dtype == np.float32
    expected_r = np.array([0.9] * 4 + [0.8125, 0.6375, 0.4625, 0.2875] + [0.2] * 8)
    assert covered[:, :12].all() and not covered[:, 12:].any()
    np.testing.assert_allclose(known[:, :12], np.broadcast_to(expected_r[:, None, None], (16, 12, 16)), rtol=1e-6)
    assert not known[:, 12:].any()


def test_predictor_blends_disagreeing_tiles_by_the_weights_on_a_non_ras_scan():
    """End to end: a bar along canonical R, longer than one crop, on the permuted scan; the first crop says 0.95
    inside it, the crop the extension adds says 0.27 (below 0.5: it would drop the bar on its own). The result
    is the voxel-by-voxel blend of the two, so the mask ends inside the overlap where the weights say."""
    from extension_helpers import DisagreeingSam3D
    from sam_med3d.extension import blend_window

    bar = np.zeros(PERMUTED_SHAPE, bool)
    bar[18:22, 12:16, 4:50] = True  # i (A), j (S, reversed), k (R, reversed): long along R
    model = DisagreeingSam3D(bar, [3.0, -1.0], img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(overlap=8))
    predictor.set_image(np.random.default_rng(0).normal(size=PERMUTED_SHAPE).astype(np.float32), PERMUTED_AFFINE)
    result = predictor.predict([[20, 14, 40]], [1])
    assert len(result.crop_boxes) == 2 and result.tiling.crops_added == 1
    prepared = predictor.prepared
    shift = np.subtract(result.crop_boxes[1][0], result.crop_boxes[0][0])
    assert abs(shift[0]) == 32 - 8  # the added crop lies along R, overlapping by 8
    tiles = [_crop_tile(prepared, box[0], _sigmoid(model.tile_logits(prepared.crop(box[0], 32))))
             for box in result.crop_boxes]
    expected = _blend_reference(prepared, tiles, blend_window(32, 8))
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-6)
    np.testing.assert_array_equal(result.mask, (expected > 0.5).astype(np.uint8))
    # The bar is kept where the first crop is alone and through part of the overlap, then dropped.
    along = result.mask[20, 14, :]
    kept = np.flatnonzero(along)
    assert 0 < len(kept) < bar[20, 14].sum() and np.all(np.diff(kept) == 1)
    overlap_k = sorted(int(55 - r) for r in (result.crop_boxes[1][0][0], result.crop_boxes[0][1][0] - 1)) \
        if shift[0] > 0 else sorted(int(55 - r) for r in (result.crop_boxes[0][0][0], result.crop_boxes[1][1][0] - 1))
    edge = kept[0] if shift[0] > 0 else kept[-1]  # where the mask ends, towards the added crop
    assert overlap_k[0] < edge < overlap_k[1], (edge, overlap_k)


def _sigmoid(logits):
    return 1.0 / (1.0 + np.exp(-logits.numpy().astype(np.float64)))


def test_where_new_crops_go_and_which_clicks_change_them():
    """The placement rules, on the permuted scan's canonical grid: the crop across a face is shifted by
    size - overlap along that axis and centred on the touching part across it; a place within size // 4 of an
    existing crop on every axis is not new; a follow-up click changes the later crops when it falls inside one,
    or when it is positive and no crop holds it (a negative click outside every crop changes nothing)."""
    from sam_med3d.extension import changes_beyond_first, contains_interior, is_new_place, neighbour_start

    prepared = _permuted_scan()
    flat = np.full((16,) * 3, 0.9)
    first, later = _crop_tile(prepared, (0, 0, 0), flat), _crop_tile(prepared, (12, 0, 0), flat)
    assert neighbour_start(first, 0, 1, np.array([15, 20, 9]), 4) == (12, 12, 1)
    assert neighbour_start(later, 1, -1, np.array([20, 3, 30]), 4) == (12, -12, 22)
    assert is_new_place((4, 20, 0), [first], 16) and not is_new_place((4, 4, -4), [first], 16)
    assert is_new_place((5, 0, 0), [first], 16) and not is_new_place((16, 3, 0), [first, later], 16)
    canonical = np.array([[2, 2, 2], [1, 8, 8], [8, 8, 8], [8, 14, 8], [8, 13, 8], [-1, 5, 5]])
    assert contains_interior(first, canonical, 2).tolist() == [True, False, True, False, True, False]
    assert contains_interior(later, canonical + [12, 0, 0], 2).tolist() == [True, False, True, False, True, False]
    tiles = [first, later]
    # Original indices of canonical voxels: inside the first crop only, the later one only, and neither.
    only_first, only_later, neither = (np.round(prepared.to_original([c]))[0] for c in
                                       ([4, 8, 8], [24, 8, 8], [40, 8, 8]))
    points = np.array([only_first, only_later, neither, neither])
    labels = np.array([1, 0, 0, 1])
    assert not changes_beyond_first(tiles, points, labels, [0])      # the first crop is the caller's
    assert changes_beyond_first(tiles, points, labels, [1])          # a click inside a later crop
    assert not changes_beyond_first(tiles, points, labels, [2])      # a negative click outside every crop
    assert changes_beyond_first(tiles, points, labels, [3])          # a positive one gets a crop of its own
    assert not changes_beyond_first(tiles, points, labels, [])
    assert not changes_beyond_first([first], points, labels, [1])    # no later crop, negative click


def test_extension_settings_are_checked():
    for bad, message in [(dict(strategy="magic"), "strategy"), (dict(max_crops=0), "max_crops"),
                         (dict(time_budget_s=-1), "time_budget_s"), (dict(time_budget_s=float("nan")), "time_budget_s"),
                         (dict(derived_points=0), "derived_points"), (dict(zoom_spacing_mm=0), "zoom_spacing_mm")]:
        with pytest.raises(ValueError, match=message):
            ExtensionConfig(**bad)
    with pytest.raises(ValueError, match=r"^extension strategy must be one of slide, zoom, got 'magic'$"):
        ExtensionConfig(strategy="magic")
    config = ExtensionConfig(max_crops=1, time_budget_s=0, derived_points=1, zoom_spacing_mm=0.75)
    assert config.max_crops == 1 and config.overlap_for(64) == 16 and config.overlap_for(128) == 32
    assert type(config.overlap_for(64)) is int  # crop starts are whole voxels
    assert ExtensionConfig(overlap=1).overlap_for(64) == 1 and ExtensionConfig(overlap=63).overlap_for(64) == 63
    for overlap in (0, 64):
        with pytest.raises(ValueError, match="overlap must be between 1 and 63"):
            ExtensionConfig(overlap=overlap).overlap_for(64)


def test_one_crop_is_the_official_paste_back_and_crops_off_the_scan_give_nothing():
    """A single crop is pasted back unchanged (threshold strictly above 0.5, as the official code), with
    probabilities only when asked; crops that all miss the scan give an empty region."""
    from sam_med3d.extension import blend_window, combine_in_region

    prepared = _permuted_scan()
    window = blend_window(16, 4)
    probs = np.tile(np.linspace(0.3, 0.7, 5)[None, None, [0, 1, 2, 3, 4, 2, 2, 2, 1, 0, 3, 4, 2, 2, 0, 4]],
                    (16, 16, 1))
    assert (probs == 0.5).sum() > 1000
    tile = _crop_tile(prepared, (20, 10, 30), probs)
    region, mask, none = combine_in_region(prepared, [tile], window)
    assert none is None and mask.dtype == np.uint8
    expected_region, expected_mask = prepared.paste_back_region(tile.crop, (probs > 0.5).astype(np.uint8))
    assert region == expected_region and 0 < mask.mean() < 1
    np.testing.assert_array_equal(mask, expected_mask)
    _, _, pasted = combine_in_region(prepared, [tile], window, with_probabilities=True)
    np.testing.assert_array_equal(pasted, prepared.paste_back_region(tile.crop, probs.astype(np.float32))[1])
    off = [_crop_tile(prepared, (100, 0, 0), probs), _crop_tile(prepared, (0, -40, 0), probs)]
    for with_probabilities in (False, True):
        region, mask, found = combine_in_region(prepared, off, window, with_probabilities)
        assert region is None and mask.shape == (0, 0, 0) and mask.dtype == np.uint8
        assert found is None if not with_probabilities else (found.shape == (0, 0, 0) and found.dtype == np.float32)


# ------------------------------------------------------------------------- the zoom lattice on a synthetic scan
#
# 32^3 crops (48 mm) on a 1.5 mm scan with a 6 mm coarse pass: coarse voxel k covers the scan voxels 4k .. 4k+3,
# so structures made of whole 4-voxel blocks come out of the coarse pass exactly (their coarse box in scan voxels:
# one voxel more on the low side, where the coarse voxel's edge falls mid-voxel). Lattice stride 32 - 8 = 24.
SYNTHETIC_SHAPE = (80, 80, 96)


def _zoom_on_synthetic(gt, click, **settings):
    model = GroundTruthSam3D(gt, img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(strategy="zoom", zoom_spacing_mm=6.0, max_crops=64,
                                                                    time_budget_s=600, **settings))
    scan = np.random.default_rng(0).normal(size=SYNTHETIC_SHAPE).astype(np.float32)
    predictor.set_image(scan, np.diag([1.5] * 3 + [1]))  # 1.5 mm, RAS: canonical voxels are scan voxels
    result = predictor.predict(np.asarray([click], float), [1])
    assert int((gt & (result.mask == 0)).sum()) == 0 and not (result.mask > 0)[~gt].any()
    return result, model, predictor


@pytest.mark.parametrize("length, click, crops, overlap", [(48, 28, 2, None), (56, 28, 3, None), (52, 32, 3, None),
                                                           (52, 28, 2, 7)])
def test_zoom_lattice_is_just_large_enough_for_the_coarse_mask(length, click, crops, overlap):
    """A bar 8 voxels across (one crop across) and ``length`` voxels long from z = 20, clicked at z = ``click``:
    the lattice spans the coarse box (length + 1) with as few crops as fit it, one across (2 for 48 and 52
    voxels, 3 for 56), a lattice crop within 8 voxels of the first crop is not decoded again, and the sliding
    pass adds a crop where a lattice crop's face still cuts the bar (52). A coarse box one coarse voxel too small
    (56) or too large (52), or a second crop across, costs a crop more for the same mask. With an odd overlap
    (7: stride 25, 2 crops span 57 voxels) the lattice is still centred to the voxel: the box of the 52 voxels
    from z = 20 is 19 .. 71, the lattice 17 .. 73, 2 voxels to spare at the far end, so no crop is added there."""
    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[36:44, 36:44, 20:20 + length] = True
    result, _, _ = _zoom_on_synthetic(gt, (40, 40, click), overlap=overlap)
    starts = np.array([box[0] for box in result.crop_boxes])
    assert len(starts) == crops, starts.tolist()
    assert np.all(np.ptp(starts[:, :2], axis=0) <= 8), starts.tolist()  # one crop across the bar, never two


def test_zoom_lattice_is_centred_by_rounding_down_at_the_scan_start():
    """A bar against the scan's low x face (i 0..7, j 36..43, z 20..67): its coarse box along x is -1 .. 8 (one
    voxel more on the low side), centre 3.5; the lattice's one crop across is centred on it rounded down, as
    everywhere else (start 3 - 16 = -13, not -12 as rounding towards zero would give), and 2 crops along z."""
    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[0:8, 36:44, 20:68] = True
    result, model, _ = _zoom_on_synthetic(gt, (4, 40, 40))
    lattice = [start for spacing, start in model.prompts if spacing == 1.5 and start != result.crop_boxes[0][0]]
    assert lattice == [(-13, 23, 15), (-13, 23, 39)]


def test_zoom_decodes_every_lattice_crop_holding_the_coarse_mask_past_empty_ones():
    """Two parts of one label, 24 voxels apart diagonally; the clicked one longer than a crop. The lattice is
    2 x 2 across, and its two off-diagonal crops hold neither part: they are skipped, and the far part is still
    found (the sliding pass cannot reach it), in 4 crops + the first one."""
    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[24:32, 24:32, 16:56] = True
    far = np.zeros_like(gt)
    far[56:64, 56:64, 32:40] = True
    result, model, _ = _zoom_on_synthetic(gt | far, (28, 28, 36))
    assert len(result.crop_boxes) == 5
    assert sum(1 for spacing, _ in model.prompts if spacing == 1.5) == 5  # the empty crops are never decoded


def test_zoom_derived_clicks_are_an_eighth_of_a_crop_apart():
    """Every added crop's derived clicks lie at least img_size / 8 (4 voxels) apart, as the sliding pass's: a bar
    16 x 16 across and 56 long with a block touching one of its edges, whose coarse mask, cut by a lattice crop,
    has its next-deepest voxels on a ridge where the first in index order lies 3.6 voxels from the deepest: it
    is passed over for one 4.2 voxels away."""
    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[12:68, 32:48, 40:56] = True
    gt[0:12, 48:60, 44:48] = True
    click = np.array([[18, 40, 48]], float)
    result, model, predictor = _zoom_on_synthetic(gt, click[0])
    checked = 0
    for (spacing, start), (prompt, _, _) in model.prompts.items():
        if spacing != 1.5 or start == result.crop_boxes[0][0]:
            continue
        derived = prompt[:len(prompt) - int(predictor.prepared.crop(start, 32).contains(click)[0])]
        gaps = [np.linalg.norm(a - b) for i, a in enumerate(derived) for b in derived[i + 1:]]
        assert min(gaps, default=4.0) >= 4.0, (start, derived.tolist())
        checked += len(gaps)
    assert checked >= 3


def test_slide_derived_clicks_are_an_eighth_of_a_crop_apart():
    """The same for the crops the sliding pass adds, with six derived clicks per crop: on the bar and block above,
    each crop's known mask (the overlap with its neighbours) has next-deepest voxels 3.6 voxels from a chosen
    one; every pair of derived clicks in a crop lies at least 4 voxels apart."""
    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[12:68, 32:48, 40:56] = True
    gt[0:12, 48:60, 44:48] = True
    click = np.array([[18.0, 40.0, 48.0]])
    model = GroundTruthSam3D(gt, img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(max_crops=64, time_budget_s=600, derived_points=6))
    predictor.set_image(np.random.default_rng(0).normal(size=SYNTHETIC_SHAPE).astype(np.float32),
                        np.diag([1.5] * 3 + [1]))
    result = predictor.predict(click, [1])
    assert int((gt & (result.mask == 0)).sum()) == 0 and len(result.crop_boxes) > 1
    gaps = []
    for (_, start), (prompt, _, _) in model.prompts.items():
        if start != result.crop_boxes[0][0]:
            derived = prompt[:len(prompt) - int(predictor.prepared.crop(start, 32).contains(click)[0])]
            gaps += [np.linalg.norm(a - b) for i, a in enumerate(derived) for b in derived[i + 1:]]
    assert len(gaps) >= 20 and min(gaps) >= 4.0, sorted(gaps)[:5]


def test_zoom_lattice_crops_are_prompted_from_the_coarse_mask_at_its_place_on_a_flipped_scan():
    """The coarse mask is carried onto each lattice crop at its own place, on a 1.5 mm scan stored neither in RAS
    order nor direction (array i runs A, j runs S reversed, k runs R reversed, so the coarse grid's offsets are
    not zero). A bar 8 voxels across (two 6 mm coarse voxels, i 32..39, j 40..47) and 72 long (k 16..87, canonical
    R 16..87), clicked at k = 30: the first crop starts at canonical R 73 - 16 = 57; the coarse box on the 1.5 mm
    grid is R [15, 88), A [31, 40), S [47, 56) (one voxel more on the low side), so the lattice is 3 crops along R
    from (15 + 88) // 2 - 40 = 11, stride 24, at A 35 - 16 = 19 and S 51 - 16 = 35; the one at R 59 lies within 8
    voxels of the first crop and is not decoded. The sliding pass then adds the crop across the first crop's
    high R face (the bar ends 2 voxels before it). Each lattice crop's derived clicks are the deepest voxels of
    the bar as the coarse mask gives it: across the bar, i = 35 and j = 44 (the first of the two middle voxels
    in canonical order)."""
    shape = (80, 96, 104)
    affine = np.array([[0.0, 0.0, -1.5, 50.0], [1.5, 0.0, 0.0, -20.0], [0.0, -1.5, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]])
    gt = np.zeros(shape, bool)
    gt[32:40, 40:48, 16:88] = True
    model = GroundTruthSam3D(gt, img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(strategy="zoom", zoom_spacing_mm=6.0, max_crops=64,
                                                                    time_budget_s=600))
    predictor.set_image(np.random.default_rng(0).normal(size=shape).astype(np.float32), affine)
    assert nib.aff2axcodes(affine) == ("A", "I", "L") and predictor.prepared.step.tolist() == [-1, 1, -1]
    click = np.array([[36.0, 44.0, 30.0]])
    result = predictor.predict(click, [1])
    assert int((gt & (result.mask == 0)).sum()) == 0 and not (result.mask > 0)[~gt].any()
    assert [box[0] for box in result.crop_boxes] == [(57, 20, 35), (35, 19, 35), (11, 19, 35), (81, 20, 36)]
    for start in [(35, 19, 35), (11, 19, 35)]:
        prompt, labels, _ = model.prompts[1.5, start]
        assert len(prompt) == 2 and labels.tolist() == [1, 1]  # the click lies in neither
        derived = predictor.prepared.to_original(np.asarray(start) + prompt)
        assert derived[:, :2].tolist() == [[35.0, 44.0]] * 2, (start, derived.tolist())
        assert np.all((derived[:, 2] >= 16) & (derived[:, 2] < 88))


def test_zoom_lattice_crop_reaching_past_the_coarse_crop_knows_nothing_there():
    """A bar along z through a whole 1.5 mm scan 200 voxels long, clicked at z = 100: the coarse crop (32 voxels
    of 6 mm) sees z = 36 .. 163 only (coarse voxels 9 .. 40), and the lattice over that box reaches 13 voxels past
    it at both ends. The lowest lattice crop (z = 23 .. 54) is prompted from what the coarse pass saw: the bar
    from z = 36, whose first voxel 4 deep is z = 39 (centre of the bar across: 39, 39), then 4 voxels on."""
    shape = (80, 80, 200)
    gt = np.zeros(shape, bool)
    gt[36:44, 36:44, :] = True
    model = GroundTruthSam3D(gt, img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(strategy="zoom", zoom_spacing_mm=6.0, max_crops=64,
                                                                    time_budget_s=600))
    predictor.set_image(np.random.default_rng(0).normal(size=shape).astype(np.float32), np.diag([1.5] * 3 + [1]))
    result = predictor.predict(np.array([[40.0, 40.0, 100.0]]), [1])
    assert int((gt & (result.mask == 0)).sum()) == 0 and not (result.mask > 0)[~gt].any()
    assert [start for spacing, start in model.prompts if spacing == 6.0] == [(-6, -6, 9)]
    prompt, labels, _ = model.prompts[1.5, (23, 23, 23)]
    assert labels.tolist() == [1, 1] and (prompt + 23).tolist() == [[39, 39, 39], [39, 39, 43]]


class _SlowRecordingSam3D(GroundTruthSam3D):
    """The ground-truth stand-in, taking ``delay_s`` per decoder run and recording each run's crop, mask prompt
    and answer."""

    def __init__(self, label, img_size, delay_s):
        super().__init__(label, img_size=img_size)
        self.delay_s = delay_s
        self.runs = []  # (spacing_mm, crop start, mask_input, logits of the first mask, multimask_output)

    def decode(self, crop, points, mask_input, multimask_output=False):
        import time

        time.sleep(self.delay_s)
        logits, iou = super().decode(crop, points, mask_input, multimask_output)
        self.runs.append((crop.prepared.spacing_mm, crop.start, None if mask_input is None else mask_input.clone(),
                          logits[:, :1].clone(), multimask_output))
        return logits, iou


def test_every_crop_feeds_its_previous_mask_back_and_its_decoder_time_is_counted():
    """As the official click loop, on every crop, the added ones too: the first decoder run of a crop gets the
    all-zero low-res mask, each later run the mask the run before gave, in a later call too (a follow-up click
    re-runs a crop from its last mask), and every run answers the request for three masks. Every run's time counts in the call's
    "decode" stage (a stand-in taking 20 ms per run: at least 20 ms per decode step, at most the call's total)."""
    import torch

    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[36:44, 36:44, 8:88] = True
    model = _SlowRecordingSam3D(gt, img_size=32, delay_s=0.02)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(max_crops=64, time_budget_s=600))
    predictor.set_image(np.random.default_rng(0).normal(size=SYNTHETIC_SHAPE).astype(np.float32),
                        np.diag([1.5] * 3 + [1]))
    result = predictor.predict(np.array([[40.0, 40.0, 30.0], [40.0, 40.0, 34.0]]), [1, 1], multimask_output=True)
    assert int((gt & (result.mask == 0)).sum()) == 0 and len(result.crop_boxes) >= 3
    assert len(model.runs) == result.decode_steps and result.decode_steps > len(result.crop_boxes)
    # A negative click in a crop the extension added re-runs that crop from where it stopped.
    again = predictor.predict(np.array([[40.0, 40.0, 30.0], [40.0, 40.0, 34.0], [40.0, 40.0, 80.0]]), [1, 1, 0],
                              multimask_output=True)
    assert again.decode_steps >= 1 and again.tiling.crops_rerun >= 1 and again.crop_boxes == result.crop_boxes
    # One in the overlap of two added crops re-runs both.
    crops = [predictor.prepared.crop(box[0], 32) for box in result.crop_boxes]
    holders = {z: [i for i, c in enumerate(crops) if c.contains([[40, 40, z]])[0]] for z in range(96)}
    z = next(z for z, held in holders.items() if len(held) == 2 and 0 not in held)
    third = predictor.predict(np.array([[40.0, 40.0, 30.0], [40.0, 40.0, 34.0], [40.0, 40.0, 80.0], [40.0, 40.0, z]]),
                              [1, 1, 0, 0], multimask_output=True)
    assert third.tiling.crops_rerun == 2 and third.decode_steps == 2 and third.crop_boxes == result.crop_boxes
    assert len(model.runs) == result.decode_steps + again.decode_steps + third.decode_steps
    low = predictor.low_res_size
    previous = {}
    assert all(multimask for *_, multimask in model.runs)  # the best of three masks, on every run
    for spacing, start, mask_input, logits, _ in model.runs:
        expected = previous.get(start, torch.zeros(1, 1, low, low, low))
        assert mask_input is not None and torch.equal(mask_input, expected), start
        previous[start] = logits
    assert set(previous) == {box[0] for box in result.crop_boxes}
    for answer in (result, again):
        assert 0.02 * answer.decode_steps <= answer.timings["decode"] <= answer.timings["total"]


def test_zoom_pass_runs_only_when_the_clicked_part_reaches_a_face():
    """The coarse pass is for a clicked structure the first crop cannot hold: with the clicked part of the label
    inside the first crop, another part of it reaching across a face (a blob the user did not point at) starts
    neither the coarse pass nor any other crop; joined to the clicked part, it does."""
    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[36:44, 36:44, 36:44] = True       # clicked, inside the first crop (z 24 .. 55)
    blob = np.zeros_like(gt)
    blob[36:40, 48:52, 44:70] = True     # 4 voxels away across y, through the crop's high z face
    model = GroundTruthSam3D(gt | blob, img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(strategy="zoom", zoom_spacing_mm=6.0,
                                                                    max_crops=64, time_budget_s=600))
    predictor.set_image(np.random.default_rng(0).normal(size=SYNTHETIC_SHAPE).astype(np.float32),
                        np.diag([1.5] * 3 + [1]))
    result = predictor.predict(np.array([[40.0, 40.0, 40.0]]), [1])
    assert result.crop_boxes == (((24, 24, 24), (56, 56, 56)),)
    assert {spacing for spacing, _ in model.prompts} == {1.5} and len(model.prompts) == 1
    assert (result.mask > 0).sum() == gt.sum() + (blob[24:56, 24:56, 24:56]).sum()
    joined = gt | blob
    joined[36:40, 40:52, 44:48] = True   # a bridge: the blob is now part of the clicked structure
    model.label = joined.astype(np.uint8)
    predictor.set_image(np.random.default_rng(1).normal(size=SYNTHETIC_SHAPE).astype(np.float32),
                        np.diag([1.5] * 3 + [1]))
    result = predictor.predict(np.array([[40.0, 40.0, 40.0]]), [1])
    assert 6.0 in {spacing for spacing, _ in model.prompts} and len(result.crop_boxes) > 1
    assert int((joined & (result.mask == 0)).sum()) == 0


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_positive_clicks_far_apart_get_crops_up_to_the_cap(cap):
    """Three positive clicks too far apart for one crop, on three small blobs of one label, after a fourth one next
    to the latest: each far one gets a crop of its own (the latest click's first, then the others in order, past
    the one the first crop holds) until ``max_crops`` crops are decoded; no crop beyond the cap is decoded."""
    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    clicks = np.array([[70.0, 70.0, 83.0], [10.0, 10.0, 10.0], [10.0, 70.0, 50.0], [70.0, 70.0, 85.0]])
    for x, y, z in clicks[1:].astype(int):
        gt[x - 2:x + 2, y - 2:y + 2, z - 2:z + 2] = True
    model = GroundTruthSam3D(gt, img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(max_crops=cap, time_budget_s=600))
    predictor.set_image(np.random.default_rng(0).normal(size=SYNTHETIC_SHAPE).astype(np.float32),
                        np.diag([1.5] * 3 + [1]))
    result = predictor.predict(clicks, [1, 1, 1, 1])
    assert len(result.crop_boxes) == cap == len(model.prompts)
    held = [[bool(predictor.prepared.crop(box[0], 32).contains(clicks[i:i + 1])[0]) for box in result.crop_boxes]
            for i in range(4)]
    assert held[3][0] and held[0][0] and [any(h) for h in held] == [True, cap >= 2, cap >= 3, True]
    assert int((gt & (result.mask == 0)).sum()) == 64 * (3 - cap)


def test_a_face_whose_neighbour_place_is_taken_or_unknown_does_not_stop_the_other_faces():
    """``CropTiler.extend`` on hand-placed crops (a decoder that answers the ground truth of the crop it is
    given): an L-shaped structure, a bar along x through the first crop F (start 24) into an earlier crop C
    (start 56, i.e. 32 further along x) and an arm along z out of F's high z face. F's high x face is open (C's
    interior starts at x = 58), but the crop across it would start at x = 48, within 8 voxels of C: that place
    is taken, and the arm, across F's high z face, still gets its crops."""
    import time

    import torch
    from sam_med3d.extension import CropTiler, Tile, combine_on_scan
    from sam_med3d.geometry import PreparedScan, upsample_logits
    from sam_med3d.io import load_scan

    gt = np.zeros(SYNTHETIC_SHAPE, bool)
    gt[30:70, 36:44, 36:44] = True    # the bar along x
    gt[30:38, 36:44, 36:80] = True    # the arm along z
    prepared = PreparedScan(load_scan(np.random.default_rng(0).normal(size=SYNTHETIC_SHAPE).astype(np.float32),
                                      np.diag([1.5] * 3 + [1])))

    def decode_step(crop, points, labels, low_res, multimask):
        return torch.where(crop.sample(gt.astype(np.uint8)) > 0, 10.0, -10.0)[None, None], 0.9

    def tile(start, click):  # decoded, prompted with one positive click on the bar
        crop = prepared.crop(start, 32)
        logits, _ = decode_step(crop, None, None, None, False)
        return Tile(crop, crop.to_crop([click]), np.ones(1, np.int64), logits,
                    torch.sigmoid(upsample_logits(logits, 32))[0, 0])

    tiler = CropTiler(ExtensionConfig(max_crops=64, time_budget_s=600), 32, lambda crop, timings: (crop, False),
                      decode_step, lambda: torch.zeros(1, 1, 8, 8, 8))
    first, earlier = tile((24, 24, 24), (34, 40, 40)), tile((56, 24, 24), (64, 40, 40))
    timings = dict(preprocess=0.0, encode=0.0, decode=0.0, paste=0.0)
    tiles, stats = tiler.extend(prepared, first, [earlier], np.array([[34.0, 40.0, 40.0]]), np.array([1]), None,
                                timings, time.perf_counter())
    assert tiles[:2] == [first, earlier] and stats.crops_added == len(tiles) - 2 >= 1
    assert all(t.crop.start[2] > 24 for t in tiles[2:])  # every added crop lies up the arm
    mask, _ = combine_on_scan(prepared, tiles, tiler.window)
    np.testing.assert_array_equal(mask.astype(bool), gt)

    # A face with no derived click does not stop the other faces either: the bar's high x face is open (nothing
    # lies beyond x = 56), but two earlier crops over the bar (same x range as F, answering "not mask") outvote
    # F there, so the crop across it knows no voxel above 0.5 and is not placed; an arm along z at y 24..27,
    # beside those crops, still gets its crops, across F's low y face and its high z face.
    gt[:] = False
    gt[30:70, 36:44, 36:44] = True    # the bar along x
    gt[30:38, 24:28, 36:80] = True    # the arm along z
    gt[30:38, 24:36, 36:44] = True    # joins them
    first = tile((24, 24, 24), (34, 40, 40))
    outvoting = [Tile(c, np.zeros((0, 3)), np.zeros(0, np.int64), torch.full((1, 1, 8, 8, 8), -10.0),
                      torch.zeros(32, 32, 32)) for c in (prepared.crop((24, 28, 24), 32), prepared.crop((24, 28, 20), 32))]
    tiles, stats = tiler.extend(prepared, first, outvoting, np.array([[34.0, 40.0, 40.0]]), np.array([1]), None,
                                timings, time.perf_counter())
    added = [tuple(int(v) for v in t.crop.start) for t in tiles[3:]]
    assert stats.crops_added == len(added) >= 2 and all(start[0] < 48 for start in added), added
    assert any(start[1] == 0 for start in added) and any(start[2] == 48 for start in added), added
    mask, _ = combine_on_scan(prepared, tiles, tiler.window)
    assert mask[30:38, 0:28, 36:80].astype(bool).sum() == gt[30:38, 0:28, 36:80].sum()  # the whole arm


def test_zoom_lattice_crop_far_past_the_coarse_crop_is_prompted_on_the_structure_only():
    """As above, with the bar thin (4 x 4 across, i, j 36..39) and widening into a block (i, j 36..63) from z = 150
    to the scan's end: the coarse crop's last slices (z 156 .. 163) hold the block. The lowest lattice crop
    (z = 23 .. 54) reaches 3 coarse voxels past the coarse crop, where nothing is known; were the coarse mask
    read there from its other end, the block's slab (deeper than the thin bar) would give derived clicks on
    background. Every derived click of every crop lies on the structure."""
    shape = (80, 80, 200)
    gt = np.zeros(shape, bool)
    gt[36:40, 36:40, :] = True
    gt[36:64, 36:64, 150:] = True
    model = GroundTruthSam3D(gt, img_size=32)
    predictor = CropAwarePredictor(model, extension=ExtensionConfig(strategy="zoom", zoom_spacing_mm=6.0, max_crops=64,
                                                                    time_budget_s=600))
    predictor.set_image(np.random.default_rng(0).normal(size=shape).astype(np.float32), np.diag([1.5] * 3 + [1]))
    click = np.array([[38.0, 38.0, 100.0]])
    result = predictor.predict(click, [1])
    assert int((gt & (result.mask == 0)).sum()) == 0 and not (result.mask > 0)[~gt].any()
    assert [start for spacing, start in model.prompts if spacing == 6.0] == [(-7, -7, 9)]
    assert (1.5, (33, 33, 23)) in model.prompts  # the lowest lattice crop
    for (spacing, start), (prompt, labels, _) in model.prompts.items():
        if spacing != 1.5 or start == result.crop_boxes[0][0]:
            continue
        derived = prompt[:len(prompt) - int(predictor.prepared.crop(start, 32).contains(click)[0])]
        voxels = (np.asarray(start) + derived).astype(int)
        assert len(derived) and gt[tuple(voxels.T)].all(), (start, voxels.tolist())
