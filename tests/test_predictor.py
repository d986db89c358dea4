"""Sam3DPredictor: whole-scan round trip with a geometric stand-in network, caching/replay rules, errors,
and the real vit_mini network end to end."""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt
from torch import nn

from conftest import data_cases
from sam_med3d.extension import TilingStats
from sam_med3d.predictor import PredictionResult, Sam3DPredictor

RADIUS = 10.0  # stand-in sphere radius in crop voxels = 15 mm on the 1.5 mm grid


class CountingEncoder(nn.Module):
    """Records every crop it is given; the embedding carries nothing (the stand-in decoder ignores it)."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.images: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape == (1, 1, self.img_size, self.img_size, self.img_size)
        self.images.append(x.clone())
        e = self.img_size // 16
        return torch.zeros(1, 8, e, e, e)


class SphereSam3D(nn.Module):
    """A `Sam3D`-compatible stand-in: the low-res logits are ``RADIUS - distance`` (in crop voxels) to the
    nearest positive click, so the thresholded full-resolution mask is the union of balls of radius
    ``RADIUS`` crop voxels (``1.5 * RADIUS`` mm) around the positive clicks. Records every decode call."""

    def __init__(self, img_size: int = 64, radius: float = RADIUS) -> None:
        super().__init__()
        self.img_size = img_size
        self.radius = radius
        self.image_encoder = CountingEncoder(img_size)
        self.calls: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []

    def decode(self, image_embeddings, points, mask_input, multimask_output=False):
        coords, labels = points
        self.calls.append((coords.clone(), labels.clone(), None if mask_input is None else mask_input.clone()))
        low = self.img_size // 4
        # Centre of low-res voxel u in crop voxels, for align_corners=False upsampling by 4.
        centres = (torch.arange(low, dtype=torch.float32) + 0.5) * 4 - 0.5
        grid = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1)
        logits = torch.full((low, low, low), -self.radius)
        for point, label in zip(coords[0], labels[0]):
            if int(label) == 1:
                logits = torch.maximum(logits, self.radius - (grid - point).norm(dim=-1))
        m = 3 if multimask_output else 1
        return logits.expand(1, m, low, low, low).clone(), torch.full((1, m), 0.9)


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _deepest_voxel(label: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The labelled voxel farthest (in mm) from the label's boundary and from the scan's faces."""
    found = np.argwhere(label)
    lo, hi = found.min(0), found.max(0) + 1
    box = np.pad(label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)  # the scan's faces count as boundary
    depth = distance_transform_edt(box, sampling=spacing)
    return np.array(np.unravel_index(np.argmax(depth), box.shape)) - 1 + lo


def _load_label(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj) > 0


def _ball(shape, affine, centre_ijk, radius_mm) -> np.ndarray:
    """Voxels whose centre is within ``radius_mm`` of the centre voxel's, in world space (orthogonal axes:
    only a box of +-radius/spacing voxels around the centre needs checking)."""
    reach = np.ceil(radius_mm / np.linalg.norm(affine[:3, :3], axis=0)).astype(int) + 1
    box = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(centre_ijk, reach, shape))
    ijk = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij"), -1).reshape(-1, 3)
    distance = np.linalg.norm(_world(affine, ijk) - _world(affine, centre_ijk[None].astype(float)), axis=1)
    ball = np.zeros(shape, bool)
    ball[box] = (distance < radius_mm).reshape(ball[box].shape)
    return ball


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# ------------------------------------------------------------------------------------ geometry round trip


def test_round_trip_on_every_case_gives_a_15mm_ball_around_the_click(data_dir):
    """The acceptance test of the geometry: on every case (LPS, RAS, LAS, PSR, oblique; 0.5-7.5 mm) the mask
    comes back on the scan's own grid, contains the clicked voxel, and is a ball of 15 mm radius in world
    space around it (Dice with the exact ball on the original grid)."""
    model = SphereSam3D(img_size=64)
    predictor = Sam3DPredictor(model)
    for dataset, case, image, label_path in data_cases(data_dir):
        predictor.set_image(image)
        scan = predictor.prepared.scan
        label = _load_label(label_path)
        click = _deepest_voxel(label, scan.spacing_mm)
        assert label[tuple(click)]
        result = predictor.predict([click], [1])
        assert isinstance(result, PredictionResult)
        assert result.mask.shape == scan.shape and result.mask.dtype == np.uint8
        assert result.probabilities.shape == scan.shape and result.probabilities.dtype == np.float32
        np.testing.assert_array_equal(result.affine, scan.affine)
        assert result.mask[tuple(click)] == 1, f"{dataset}/{case}: the clicked voxel is not in the mask"
        expected = _ball(scan.shape, scan.affine, click, 1.5 * RADIUS)
        dice = _dice(result.mask > 0, expected)
        assert dice > 0.85, f"{dataset}/{case}: Dice {dice:.3f} with the 15 mm ball"
        # Physical size: every mask voxel lies within the ball (up to half a voxel diagonal).
        tolerance = 0.5 * np.linalg.norm(scan.spacing_mm) + 0.75
        found = np.argwhere(result.mask > 0)
        distance = np.linalg.norm(_world(scan.affine, found) - _world(scan.affine, click[None].astype(float)),
                                  axis=1)
        assert distance.max() < 1.5 * RADIUS + tolerance, f"{dataset}/{case}: mask reaches {distance.max():.1f} mm"


def test_the_encoder_sees_the_crop_around_the_click(data_dir):
    """The crop handed to the encoder is the normalised 1.5 mm RAS crop; the prompt point is its centre."""
    model = SphereSam3D(img_size=64)
    predictor = Sam3DPredictor(model)
    predictor.set_image(data_dir / "sct_spinalcord_mri" / "imagesTr" / "t2.nii.gz")  # PSR
    click = np.array([30, 27, 26])
    predictor.predict([click], [1])
    image = model.image_encoder.images[-1][0, 0]
    prep = predictor.prepared
    crop = prep.crop_around([click], 64)
    torch.testing.assert_close(image, crop.image)
    coords = model.calls[-1][0][0, 0].numpy()
    np.testing.assert_allclose(coords, crop.to_crop([click])[0], atol=1e-5)
    # The scan (40x37x35 mm at 1.5 mm) is smaller than the crop, so it is centred; the click is its middle.
    np.testing.assert_allclose(coords, [32, 32, 32], atol=1.5)


# ------------------------------------------------------------------------------------ caching and replay


@pytest.fixture()
def spleen(data_dir):
    model = SphereSam3D(img_size=64)
    predictor = Sam3DPredictor(model)
    predictor.set_image(data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz")  # 512 x 512 x 32
    return predictor, model


def test_click_inside_the_crop_reuses_the_embedding(spleen):
    predictor, model = spleen
    tick = time.perf_counter()
    first = predictor.predict([[300, 200, 16]], [1])
    elapsed = time.perf_counter() - tick
    assert 0.0 < first.timings["total"] <= elapsed
    np.testing.assert_array_equal(first.affine, predictor.prepared.scan.affine)
    # The first crop's probabilities, on its grid: high at the click, which is the crop's centre.
    assert first.crop_probabilities.shape == (64, 64, 64) and first.crop_probabilities.dtype == torch.float32
    centre = np.rint(predictor.prepared.crop(first.crop_box[0], 64).to_crop([[300, 200, 16]])[0]).astype(int)
    assert float(first.crop_probabilities[tuple(centre)]) > 0.5 > float(first.crop_probabilities[0, 0, 0])
    assert first.encoder_ran and first.decode_steps == 1
    second = predictor.predict([[300, 200, 16], [310, 205, 17]], [1, 0])
    assert not second.encoder_ran and second.decode_steps == 1
    assert second.crop_box == first.crop_box
    assert predictor.encoder_runs == 1
    # The same stages on every answer (the app sums them); the cached crop was neither prepared nor encoded again.
    stages = {"preprocess", "encode", "decode", "paste", "extension", "total"}
    assert set(first.timings) == set(second.timings) == stages
    assert first.timings["preprocess"] > 0.0 and first.timings["encode"] > 0.0
    assert second.timings["preprocess"] == 0.0 and second.timings["encode"] == 0.0
    for result in (first, second):
        assert all(0.0 <= result.timings[stage] <= result.timings["total"] for stage in stages)


def test_click_far_away_moves_the_crop_and_runs_the_encoder(spleen):
    predictor, model = spleen
    first = predictor.predict([[300, 200, 16]], [1])
    moved = predictor.predict([[300, 200, 16], [60, 450, 5]], [1, 1])
    assert moved.encoder_ran and moved.crop_box != first.crop_box
    assert predictor.encoder_runs == 2
    assert moved.mask[60, 450, 5] == 1
    # The old click is outside the new crop: the new crop is replayed from scratch with the clicks inside it ...
    assert moved.prompt_clicks == 1
    assert float(model.calls[-2][2].abs().max()) == 0.0  # restarted from the all-zero mask prompt
    # ... and the old positive click is still honoured, in its own crop (the cached embedding of the first).
    assert moved.mask[300, 200, 16] == 1 and len(moved.crop_boxes) == 2 and first.crop_box in moved.crop_boxes
    assert moved.decode_steps == 2 and predictor.encoder_runs == 2
    # Going back to the first crop finds its embedding in the cache.
    again = predictor.predict([[300, 200, 16], [60, 450, 5]], [1, 1])  # the same clicks: both crops reused
    assert again.decode_steps == 0 and again.encoder_ran is False and again.crop_boxes == moved.crop_boxes
    assert again.tiling == TilingStats(crops=2, crops_reused=1)
    # A follow-up click in the moved crop decodes there only: the other crop is kept as it was, not placed again.
    follow = predictor.predict([[300, 200, 16], [60, 450, 5], [62, 452, 5]], [1, 1, 1])
    assert follow.decode_steps == 1 and follow.crop_boxes == moved.crop_boxes and not follow.encoder_ran
    assert follow.tiling == TilingStats(crops=2, crops_reused=1)
    back = predictor.predict([[300, 200, 16]], [1])
    assert not back.encoder_ran and back.crop_box == first.crop_box


def test_a_negative_click_in_the_other_crop_reruns_that_crop_only(spleen):
    predictor, _ = spleen
    clicks, labels = [[300, 200, 16], [60, 450, 5]], [1, 1]
    two = predictor.predict(clicks, labels)
    assert len(two.crop_boxes) == 2
    # Outside the label's first crop (placed on the last far click), inside the other one.
    negative = predictor.predict(clicks + [[310, 205, 16]], labels + [0])
    assert negative.decode_steps == 1 and negative.crop_boxes == two.crop_boxes and not negative.encoder_ran
    assert negative.tiling == TilingStats(crops=2, crops_rerun=1, decode_steps=1)
    assert negative.iou == two.iou  # the first crop's, which did not change
    assert negative.mask[300, 200, 16] == 1 and negative.mask[60, 450, 5] == 1


def test_the_paste_time_includes_the_upsampling(spleen, monkeypatch):
    """The upsampling of the logits to the crop is part of the paste stage, not lost between stages."""
    import sam_med3d.predictor as predictor_module

    delay_s = 0.2
    upsample = predictor_module.upsample_logits

    def slow_upsample(*args, **kwargs):  # as on a big crop
        time.sleep(delay_s)
        return upsample(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "upsample_logits", slow_upsample)
    predictor, _ = spleen
    result = predictor.predict([[300, 200, 16]], [1])
    assert result.timings["paste"] >= delay_s


def test_a_repeated_request_reports_its_crops(spleen):
    predictor, _ = spleen
    first = predictor.predict([[300, 200, 16]], [1])
    tick = time.perf_counter()
    again = predictor.predict([[300, 200, 16]], [1])
    elapsed = time.perf_counter() - tick
    assert again.decode_steps == 0 and again.tiling.crops == len(first.crop_boxes) == first.tiling.crops
    assert again.tiling == TilingStats(crops=first.tiling.crops, crops_reused=first.tiling.crops - 1)
    # Nothing ran: the same stages as any answer, at zero, and the call's own total (the app sums these).
    assert set(again.timings) == {"preprocess", "encode", "decode", "paste", "total"}
    assert all(again.timings[k] == 0.0 for k in ("preprocess", "encode", "decode", "paste"))
    assert 0.0 <= again.timings["total"] <= elapsed and again.encoder_ran is False
    np.testing.assert_array_equal(again.mask, first.mask)


def test_the_encoder_ran_when_only_an_added_crop_needed_it(spleen):
    predictor, _ = spleen
    first = predictor.predict([[300, 200, 16]], [1], label_key="liver")
    # Another label whose first crop is the cached one (placed on its last click); the far click needs a new crop.
    both = predictor.predict([[60, 450, 5], [300, 200, 16]], [1, 1], label_key="spleen")
    assert both.crop_box == first.crop_box and len(both.crop_boxes) == 2
    assert both.encoder_ran and both.tiling.encoder_runs == 1 and predictor.encoder_runs == 2


def test_without_extension_one_region_per_label(data_dir):
    predictor = Sam3DPredictor(SphereSam3D(img_size=64), extension=False)
    predictor.set_image(data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz")
    predictor.predict([[300, 200, 16]], [1])
    moved = predictor.predict([[300, 200, 16], [60, 450, 5]], [1, 1])
    assert moved.mask[60, 450, 5] == 1 and moved.mask[300, 200, 16] == 0
    assert moved.decode_steps == 1 and len(moved.crop_boxes) == 1 and moved.tiling.crops == 1


def test_a_far_click_moves_the_crop_onto_it_wherever_it_is_listed(data_dir):
    """The crop follows the new click even when the viewer lists it before the old one."""
    predictor = Sam3DPredictor(SphereSam3D(img_size=64), extension=False)
    predictor.set_image(data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz")
    predictor.predict([[300, 200, 16]], [1])
    moved = predictor.predict([[60, 450, 5], [300, 200, 16]], [1, 1])
    assert moved.mask[60, 450, 5] == 1 and moved.mask[300, 200, 16] == 0 and moved.prompt_clicks == 1


def test_crop_affine_pins_the_crop_and_follow_ups_keep_it(spleen):
    predictor, model = spleen
    free = predictor.predict([[300, 200, 16]], [1])
    grid = predictor.prepared.crop((free.crop_box[0][0] + 5, free.crop_box[0][1] - 3, free.crop_box[0][2]), 64)
    pinned = predictor.predict([[300, 200, 16]], [1], crop_affine=grid.affine)
    assert pinned.crop_box == (grid.start, grid.stop) and pinned.encoder_ran
    np.testing.assert_allclose(pinned.crop_affine, grid.affine)
    assert pinned.decode_steps == 1 and float(model.calls[-1][2].abs().max()) == 0.0  # started over in it
    # A follow-up click inside the pinned crop, without crop_affine, keeps it and its embedding.
    follow = predictor.predict([[300, 200, 16], [305, 204, 16]], [1, 1])
    assert follow.crop_box == pinned.crop_box and not follow.encoder_ran and follow.decode_steps == 1
    # Only whole-voxel shifts of the scan's canonical grid are crops of this scan.
    off_grid = grid.affine.copy()
    off_grid[:3, 3] += 0.4 * grid.affine[:3, 1]
    with pytest.raises(ValueError, match="whole-voxel shift"):
        predictor.predict([[300, 200, 16]], [1], crop_affine=off_grid)


def test_crop_is_centred_on_the_click_and_pads_at_the_scan_edge(spleen):
    """No clamping (the official CropOrPad): a click near the edge stays at the crop centre."""
    predictor, _ = spleen
    result = predictor.predict([[3, 500, 1]], [1])
    prepared = predictor.prepared
    crop = prepared.crop(result.crop_box[0], 64)
    np.testing.assert_allclose(crop.to_crop([[3, 500, 1]])[0], [32, 32, 32], atol=0.5)
    assert not bool(crop.inside.all())


def test_three_clicks_at_once_are_replayed_one_at_a_time(spleen):
    predictor, model = spleen
    clicks = [[300, 200, 16], [305, 200, 16], [300, 210, 17]]
    result = predictor.predict(clicks, [1, 0, 1])
    assert result.decode_steps == 3 and len(model.calls) == 3
    # Step k prompts with the first k clicks and the previous step's low-res logits.
    assert [c[0].shape[1] for c in model.calls] == [1, 2, 3]
    assert float(model.calls[0][2].abs().max()) == 0.0  # first step: all-zero mask prompt
    previous = model.decode(None, (model.calls[0][0], model.calls[0][1]), None)[0]
    torch.testing.assert_close(model.calls[1][2], previous)
    np.testing.assert_array_equal(model.calls[2][1][0].numpy(), [1, 0, 1])
    # Sending the same list again runs nothing; adding one click runs one step with all four.
    again = predictor.predict(clicks, [1, 0, 1])
    assert again.decode_steps == 0 and len(model.calls) == 4
    np.testing.assert_array_equal(again.mask, result.mask)
    more = predictor.predict(clicks + [[298, 195, 15]], [1, 0, 1, 1])
    assert more.decode_steps == 1 and model.calls[-1][0].shape[1] == 4
    torch.testing.assert_close(model.calls[-1][2], result.low_res_logits)  # the previous answer as mask prompt


def test_click_order_does_not_matter_but_removing_a_click_starts_over(spleen):
    predictor, model = spleen
    predictor.predict([[300, 200, 16], [305, 200, 16]], [1, 0])
    # Viewers send foreground then background lists: a new positive click may come before old negatives.
    reordered = predictor.predict([[300, 200, 16], [302, 203, 16], [305, 200, 16]], [1, 1, 0])
    assert reordered.decode_steps == 1
    removed = predictor.predict([[300, 200, 16], [302, 203, 16]], [1, 1])
    assert removed.decode_steps == 2 and float(model.calls[-2][2].abs().max()) == 0.0
    changed = predictor.predict([[300, 200, 16], [302, 203, 16]], [1, 0])  # same point, label flipped
    assert changed.decode_steps == 2


def test_the_same_click_sent_twice_counts_twice(spleen):
    """A voxel clicked twice is two clicks: sending both again runs nothing, dropping one starts over."""
    predictor, model = spleen
    twice = predictor.predict([[300, 200, 16], [300, 200, 16]], [1, 1])
    assert twice.decode_steps == 2 and twice.prompt_clicks == 2
    assert predictor.predict([[300, 200, 16], [300, 200, 16]], [1, 1]).decode_steps == 0
    once = predictor.predict([[300, 200, 16]], [1])
    assert once.decode_steps == 1 and once.prompt_clicks == 1
    assert float(model.calls[-1][2].abs().max()) == 0.0  # from the all-zero mask prompt


def test_negative_click_outside_the_crop_changes_nothing(spleen):
    predictor, model = spleen
    first = predictor.predict([[300, 200, 16]], [1])
    calls = len(model.calls)
    result = predictor.predict([[300, 200, 16], [20, 20, 2]], [1, 0])
    assert result.decode_steps == 0 and len(model.calls) == calls and not result.encoder_ran
    np.testing.assert_array_equal(result.mask, first.mask)
    # ... and it is remembered: the next click is incremental.
    assert predictor.predict([[300, 200, 16], [20, 20, 2], [301, 201, 16]], [1, 0, 1]).decode_steps == 1


def test_clicks_that_changed_nothing_are_remembered_in_their_order(spleen):
    """A negative click outside the crop, listed before the positive one (background first), is recorded with its
    own label: the same request again runs nothing, and dropping it starts the label over."""
    predictor, model = spleen
    predictor.predict([[300, 200, 16]], [1])
    calls = len(model.calls)
    for _ in range(2):
        assert predictor.predict([[20, 20, 2], [300, 200, 16]], [0, 1]).decode_steps == 0
    assert len(model.calls) == calls
    assert predictor.predict([[300, 200, 16]], [1]).decode_steps == 1


def test_labels_have_independent_states_and_reset(spleen):
    predictor, model = spleen
    liver = predictor.predict([[300, 200, 16]], [1], label_key="liver")
    spleen_mask = predictor.predict([[100, 300, 20]], [1], label_key="spleen")
    assert liver.mask[300, 200, 16] == 1 and liver.mask[100, 300, 20] == 0
    assert spleen_mask.mask[100, 300, 20] == 1 and spleen_mask.mask[300, 200, 16] == 0
    # Each label continues from its own clicks.
    assert predictor.predict([[300, 200, 16], [302, 200, 16]], [1, 1], label_key="liver").decode_steps == 1
    assert predictor.predict([[100, 300, 20], [101, 300, 20]], [1, 1], label_key="spleen").decode_steps == 1
    predictor.reset("liver")
    assert predictor.predict([[300, 200, 16], [302, 200, 16]], [1, 1], label_key="liver").decode_steps == 2
    assert predictor.predict([[100, 300, 20], [101, 300, 20]], [1, 1], label_key="spleen").decode_steps == 0
    runs = predictor.encoder_runs
    predictor.reset("never clicked")  # an unknown label: nothing to forget
    assert predictor.predict([[100, 300, 20], [101, 300, 20]], [1, 1], label_key="spleen").decode_steps == 0
    predictor.reset()
    assert predictor.predict([[100, 300, 20]], [1], label_key="spleen").decode_steps == 1
    assert predictor.encoder_runs == runs  # reset keeps the image's cached embeddings


def test_set_image_again_with_the_same_file_keeps_the_state(spleen, data_dir):
    predictor, model = spleen
    predictor.predict([[300, 200, 16]], [1])
    predictor.set_image(data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz")
    assert predictor.predict([[300, 200, 16], [301, 200, 16]], [1, 1]).decode_steps == 1
    predictor.set_image(np.random.default_rng(0).random((40, 40, 40)).astype(np.float32))
    assert predictor.prepared.scan.shape == (40, 40, 40)
    result = predictor.predict([[20, 20, 20]], [1])
    assert result.encoder_ran and result.decode_steps == 1


def test_negative_only_prompt_is_allowed():
    predictor = Sam3DPredictor(SphereSam3D(img_size=64))
    predictor.set_image(np.random.default_rng(0).random((50, 50, 50)).astype(np.float32))
    result = predictor.predict([[25, 25, 25]], [0])
    assert result.mask.sum() == 0 and result.decode_steps == 1


class ThreeCandidatesSam3D(SphereSam3D):
    """With ``multimask_output`` three candidate balls (radius x1, x1.5, x0.5) of predicted IoU 0.5, 0.9 and 0.7;
    without it the first one only."""

    def decode(self, image_embeddings, points, mask_input, multimask_output=False):
        logits, _ = super().decode(image_embeddings, points, mask_input)
        if not multimask_output:
            return logits, torch.tensor([[0.5]])
        # The stand-in's logits are radius - distance: another radius shifts them.
        candidates = torch.cat([logits, logits + 0.5 * self.radius, logits - 0.5 * self.radius], dim=1)
        return candidates, torch.tensor([[0.5, 0.9, 0.7]])


def test_multimask_output_picks_the_mask_of_the_best_predicted_iou():
    predictor = Sam3DPredictor(ThreeCandidatesSam3D(img_size=64), extension=False)
    predictor.set_image(np.random.default_rng(0).random((50, 50, 50)).astype(np.float32))
    single = predictor.predict([[25, 25, 25]], [1])
    result = predictor.predict([[25, 25, 25]], [1], multimask_output=True, label_key="multimask")
    assert result.low_res_logits.shape == (1, 1, 16, 16, 16) and result.mask[25, 25, 25] == 1
    assert single.iou == pytest.approx(0.5) and result.iou == pytest.approx(0.9)
    assert result.mask.sum() > 2 * single.mask.sum()  # the 1.5x ball: ~3.4x the volume


def test_multimask_output_applies_to_the_crops_the_extension_adds(data_dir):
    predictor = Sam3DPredictor(ThreeCandidatesSam3D(img_size=64))
    predictor.set_image(data_dir / "msd_spleen_ct" / "imagesTr" / "spleen_8.nii.gz")
    clicks = [[300, 200, 16], [60, 450, 5]]  # the first crop on the last one, a crop of its own for the other
    single = predictor.predict(clicks, [1, 1], label_key="single")
    multi = predictor.predict(clicks, [1, 1], label_key="multi", multimask_output=True)
    assert len(single.crop_boxes) == len(multi.crop_boxes) == 2
    around = (slice(260, 340), slice(160, 240), slice(0, 32))
    assert multi.mask[around].sum() > 2 * single.mask[around].sum() > 0


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors():
    predictor = Sam3DPredictor(SphereSam3D(img_size=64))
    with pytest.raises(ValueError, match=r"^no image set: call set_image\(path_or_array\) before predict\(\)$"):
        predictor.predict([[1, 2, 3]], [1])
    predictor.set_image(np.random.default_rng(0).random((512, 512, 32)).astype(np.float32))
    cases = [
        (np.zeros((0, 3)), np.zeros(0), "empty prompt"),
        ([], [], "empty prompt"),
        ([1, 2, 3], [1], r"shape \(N, 3\)"),
        ([[1, 2]], [1], r"shape \(N, 3\)"),
        ([[1, 2, 3]], [1, 0], r"labels must have shape \(1,\)"),
        ([[1, 2, 3]], [[1]], r"labels must have shape \(1,\)"),
        ([[1, 2, 3]], [2], "1 \\(positive\\) or 0 \\(negative\\)"),
        ([[1, 2, 3]], [-1], "1 \\(positive\\) or 0 \\(negative\\)"),
        ([[1, 2, 3]], ["yes"], "1 \\(positive\\) or 0 \\(negative\\)"),
        ([[1, np.nan, 3]], [1], "non-finite"),
        ([[1, np.inf, 3]], [1], "non-finite"),
        ([[600, 12, 40]], [1], r"click \(600, 12, 40\) is outside the scan 512x512x32"),
        ([[5, 5, 5], [-3, 0, 0]], [1, 1], r"click \(-3, 0, 0\) is outside the scan 512x512x32"),
    ]
    for points, labels, message in cases:
        with pytest.raises(ValueError, match=message):
            predictor.predict(points, labels)
    with pytest.raises(ValueError, match="does not exist"):
        predictor.set_image("/nonexistent/scan.nii.gz")
    assert predictor.prepared.scan.shape == (512, 512, 32)  # a failed set_image keeps the previous image


def test_model_must_look_like_sam3d():
    with pytest.raises(ValueError, match="img_size"):
        Sam3DPredictor(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- real network


def test_vit_mini_end_to_end(data_dir):
    from sam_med3d import build_sam_med3d

    torch.manual_seed(0)
    # One crop: untrained weights fill the crop, which the extension would follow across the whole scan.
    predictor = Sam3DPredictor(build_sam_med3d("vit_mini"), extension=False)
    image = data_dir / "pyradiomics_mri_tumor" / "imagesTr" / "brain1.nii.gz"
    predictor.set_image(image)
    shape = nib.load(str(image)).shape
    first = predictor.predict([[128, 128, 12]], [1])
    assert first.mask.shape == shape and first.mask.dtype == np.uint8
    assert set(np.unique(first.mask).tolist()) <= {0, 1}
    assert first.probabilities.dtype == np.float32 and first.probabilities.shape == shape
    assert 0.0 <= first.probabilities.min() and first.probabilities.max() <= 1.0
    assert np.array_equal(first.mask, (first.probabilities > 0.5).astype(np.uint8))
    assert np.isfinite(first.iou) and first.encoder_ran
    assert first.low_res_logits.shape == (1, 1, 16, 16, 16)
    # Outside the crop (96 mm cube around the click) nothing is predicted.
    region = np.zeros(shape, bool)
    region[first.region_ijk] = True
    assert not region.all() and first.probabilities[~region].max() == 0.0
    second = predictor.predict([[128, 128, 12], [130, 120, 12]], [1, 0])
    assert not second.encoder_ran and second.decode_steps == 1
    assert second.mask.shape == shape
    # With the extension the same network covers more crops, blended: mask == blended probabilities > 0.5.
    extended = Sam3DPredictor(predictor.model)
    extended.set_image(image)
    wide = extended.predict([[128, 128, 12]], [1])
    assert len(wide.crop_boxes) > 1 and wide.tiling.crops == len(wide.crop_boxes)
    assert np.array_equal(wide.mask, (wide.probabilities > 0.5).astype(np.uint8))
    assert wide.crop_boxes[0] == first.crop_box
    # The crop-local mask (what the app merges and writes) is the full-size mask inside region_ijk, exactly,
    # for one crop and for several blended crops; the full-size mask is 0 outside the region.
    for result in (first, second, wide):
        box = np.zeros(shape, bool)
        box[result.region_ijk] = True
        assert result.region_mask.dtype == np.uint8 and result.region_mask.size == int(box.sum())
        np.testing.assert_array_equal(result.region_mask, result.mask[result.region_ijk])
        assert not result.mask[~box].any() and result.region_mask.any()


def test_a_sibling_shares_the_scan_and_the_embeddings_of_a_shared_encoder(spleen):
    predictor, model = spleen
    other = SphereSam3D(img_size=model.img_size, radius=2 * RADIUS)  # other weights: twice the ball
    other.image_encoder = model.image_encoder  # one encoder module, as after share_image_encoder
    sibling = predictor.sibling(other)
    assert sibling.prepared is predictor.prepared
    first = predictor.predict([[100, 300, 20]], [1], label_key="spleen")
    runs = predictor.encoder_runs
    second = sibling.predict([[100, 300, 20]], [1], label_key="spleen")
    assert not second.encoder_ran and sibling.encoder_runs == 0 and predictor.encoder_runs == runs
    assert second.mask.sum() > 4 * first.mask.sum()  # answered by the sibling's weights (radius 2x: ~8x volume)
    # Label states are each predictor's own: the sibling's click does not continue the original's session.
    assert predictor.predict([[100, 300, 20], [101, 300, 20]], [1, 1], label_key="spleen").decode_steps == 1
    assert len(other.calls) == 1


def test_a_sibling_with_its_own_encoder_runs_it(spleen):
    predictor, model = spleen
    other = SphereSam3D(img_size=model.img_size)
    predictor.predict([[100, 300, 20]], [1])
    sibling = predictor.sibling(other)
    assert sibling.predict([[100, 300, 20]], [1]).encoder_ran and len(other.image_encoder.images) == 1
    with pytest.raises(ValueError, match="same input size"):
        predictor.sibling(SphereSam3D(img_size=2 * model.img_size))


def test_share_image_encoder_only_when_the_weights_are_equal():
    from sam_med3d.build import build_sam_med3d as build_sam3d
    from sam_med3d.predictor import share_image_encoder

    torch.manual_seed(0)
    base = build_sam3d("vit_mini")
    tuned = build_sam3d("vit_mini")
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        next(tuned.mask_decoder.parameters()).add_(1.0)  # decoder tuned, encoder frozen
    assert share_image_encoder(tuned, base) and tuned.image_encoder is base.image_encoder
    changed = build_sam3d("vit_mini")
    changed.load_state_dict(base.state_dict())
    with torch.no_grad():
        next(changed.image_encoder.parameters()).add_(1e-3)
    assert not share_image_encoder(changed, base) and changed.image_encoder is not base.image_encoder
