"""sam_med3d.training: training-crop transforms (orientation, spacing, crop, normalisation) and the click step."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from sam_med3d import build_sam_med3d
from sam_med3d.training import (ClickIterationModel, ClickTrainingStep, click_iteration_step, crop_or_pad,
                                disagreement_clicks, freeze_image_encoder, off_target_clicks, retention_loss,
                                training_transforms, zscore_foreground)


def _nifti(tmp_path, name, array, affine):
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _phantom(tmp_path, affine, shape=(40, 40, 40)):
    """Label cube at i in [5, 15); a bright marker slab at i in [0, 3) (the far -i side of the label)."""
    image = np.full(shape, 10.0, dtype=np.float32)
    image[0:3] = 100.0
    label = np.zeros(shape, dtype=np.uint8)
    label[5:15, 15:25, 15:25] = 1
    return {"image": _nifti(tmp_path, "img", image, affine), "label": _nifti(tmp_path, "lab", label, affine)}


@pytest.mark.parametrize("x_sign", [1.0, -1.0])
def test_crops_are_canonical_ras(tmp_path, x_sign):
    # With +x along i the marker (small i) lies at small R; with -x along i (LPS-like) it lies at large R.
    affine = np.diag([x_sign * 1.5, 1.5, 1.5, 1.0])
    out = training_transforms(32, augment=False)(_phantom(tmp_path, affine))
    image, label = out["image"], out["label"]
    assert image.shape == label.shape == (1, 32, 32, 32)
    marker_d = torch.nonzero(image[0] > image[0].median() + 1)[:, 0].float().mean()
    label_d = torch.nonzero(label[0] > 0)[:, 0].float().mean()
    if x_sign > 0:
        assert marker_d < label_d
    else:
        assert marker_d > label_d


def test_resampled_to_1p5_mm_and_label_binary(tmp_path):
    # 3 mm slices along k: 10 labelled slices = 30 mm = 20 voxels at 1.5 mm; 0.75 mm in-plane: 10 voxels -> 5.
    shape = (40, 40, 20)
    label = np.zeros(shape, dtype=np.uint8)
    label[10:30, 10:30, 5:15] = 3  # multi-valued labels are binarised
    image = np.random.default_rng(0).uniform(1, 2, shape).astype(np.float32)
    affine = np.diag([0.75, 0.75, 3.0, 1.0])
    out = training_transforms(32, augment=False)({"image": _nifti(tmp_path, "i", image, affine),
                                                  "label": _nifti(tmp_path, "l", label, affine)})
    lab = out["label"][0]
    assert set(torch.unique(lab).tolist()) == {0.0, 1.0}
    extent = [int(torch.nonzero(lab)[:, a].max() - torch.nonzero(lab)[:, a].min() + 1) for a in range(3)]
    assert abs(extent[0] - 10) <= 1 and abs(extent[1] - 10) <= 1 and abs(extent[2] - 20) <= 1


def test_label_value_selects_one_class(tmp_path):
    shape = (30, 30, 30)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:8, 2:8, 2:8] = 1
    label[15:25, 15:25, 15:25] = 2
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    paths = {"image": _nifti(tmp_path, "i", np.ones(shape, np.float32), affine),
             "label": _nifti(tmp_path, "l", label, affine)}
    one = training_transforms(32, augment=False, label_value=1)(dict(paths))["label"].sum()
    two = training_transforms(32, augment=False, label_value=2)(dict(paths))["label"].sum()
    assert int(one) == 6 ** 3 and int(two) == 10 ** 3


def test_crop_pads_with_zeros_outside_the_scan():
    x = torch.arange(1, 1 + 4 * 4 * 4, dtype=torch.float32).reshape(1, 4, 4, 4)
    out = crop_or_pad(x, (-2, 0, 1), 6)
    assert out.shape == (1, 6, 6, 6)
    assert torch.equal(out[0, 2:6, 0:4, 0:3], x[0, :, :, 1:4])
    assert out[0, :2].abs().sum() == 0 and out[0, :, 4:].abs().sum() == 0


def test_zscore_uses_positive_voxels_only():
    x = torch.zeros(1, 8, 8, 8)
    x[0, :4] = torch.linspace(1, 5, 4 * 64).reshape(4, 8, 8)
    z = zscore_foreground(x)
    pos = z[x > 0]
    assert abs(float(pos.mean())) < 1e-5 and abs(float(pos.std()) - 1) < 1e-4
    assert float(z[x == 0].mean()) < -1  # zeros are normalised too (official), far below the mean


def test_jitter_moves_the_crop_but_keeps_the_target(tmp_path):
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    paths = _phantom(tmp_path, affine, shape=(60, 60, 60))
    centres = set()
    for seed in range(4):
        t = training_transforms(32, augment=True, jitter=4)
        t.set_random_state(seed)
        lab = t(dict(paths))["label"][0]
        assert lab.sum() > 0
        centres.add(tuple(torch.nonzero(lab).float().mean(0).round().tolist()))
    assert len(centres) > 1


def test_voxel_centred_crops_are_centred_on_voxels_of_the_target():
    """``center="voxel"``: each crop is centred on a random voxel of the target (as the app centres its crop on a
    first click), so a long target lands at many places in the window, never outside the target's extent; the
    default ``box`` centres every crop on the bounding box."""
    from sam_med3d.training import RandTargetCropd

    label = torch.zeros(1, 200, 60, 60)
    label[0, 20:180, 25:35, 25:35] = 1
    voxel = RandTargetCropd(("label",), crop_size=64, center="voxel")
    voxel.set_random_state(0)
    box = RandTargetCropd(("label",), crop_size=64)
    centres, box_centres = [], set()
    for _ in range(300):
        voxel.randomize()
        box.randomize()
        centres.append(voxel.window(label) + 32)
        box_centres.add(tuple(box.window(label) + 32))
    centres = np.array(centres)
    assert (centres >= [20, 25, 25]).all() and (centres <= [179, 34, 34]).all()  # on the target
    assert np.ptp(centres[:, 0]) > 120  # spread along the whole long axis
    assert box_centres == {(100, 30, 30)}
    crop = voxel({"label": label})["label"]
    assert crop.shape == (1, 64, 64, 64) and crop[0, 32, 32, 32] == 1  # the window's centre voxel is target
    with pytest.raises(ValueError, match="center"):
        RandTargetCropd(("label",), crop_size=64, center="click")


# ------------------------------------------------------------------------------------------------ click step
def _batch(s=64, b=2):
    image = torch.randn(b, 1, s, s, s)
    label = torch.zeros(b, 1, s, s, s)
    label[:, :, 20:40, 24:44, 16:36] = 1
    image = image + 2 * label
    return image, label


def test_click_step_shapes_clicks_and_gradients():
    torch.manual_seed(0)
    model = build_sam_med3d("vit_mini").train()
    image, label = _batch()
    out = click_iteration_step(model, image, label, 4, np.random.default_rng(0), iou_loss_weight=1.0)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert out["low_res_logits"].shape == (2, 1, 16, 16, 16)
    assert 0.0 <= out["dice"] <= 1.0
    assert out["points"].shape == (2, 4, 3) and out["point_labels"].shape == (2, 4)
    # The first click is positive and inside the target (the prediction is empty before it).
    for b in range(2):
        d, h, w = out["points"][b, 0].long().tolist()
        assert out["point_labels"][b, 0] == 1 and label[b, 0, d, h, w] == 1
    out["loss"].backward()
    enc = model.image_encoder.patch_embed.proj.weight.grad
    dec = model.mask_decoder.output_upscaling[0].weight.grad
    iou = model.mask_decoder.iou_prediction_head.layers[0].weight.grad
    assert enc is not None and enc.abs().sum() > 0
    assert dec is not None and dec.abs().sum() > 0
    assert iou is not None and iou.abs().sum() > 0


def test_click_step_is_reproducible_and_wrapper_matches():
    torch.manual_seed(0)
    model = build_sam_med3d("vit_mini").train()
    image, label = _batch(b=1)
    a = click_iteration_step(model, image, label, 3, np.random.default_rng(5))
    b = click_iteration_step(ClickIterationModel(model), image, label, 3, np.random.default_rng(5))
    assert torch.equal(a["points"], b["points"])
    assert torch.allclose(a["loss"], b["loss"])


def test_click_step_rejects_bad_input():
    model = build_sam_med3d("vit_mini")
    image, label = _batch(b=1)
    with pytest.raises(ValueError, match="image crop"):
        click_iteration_step(model, image[..., :32, :32, :32], label[..., :32, :32, :32], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="label must have"):
        click_iteration_step(model, image, label[:, :, :32], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_click_iterations"):
        click_iteration_step(model, image, label, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        click_iteration_step(model, image, label, 2, 0)


def test_click_training_step_in_a_monai_trainer():
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    model = build_sam_med3d("vit_mini")
    image, label = _batch(b=1)
    data = [{"image": image[0], "label": label[0]}]
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.mask_decoder.output_upscaling[0].weight.detach().clone()
    step = ClickTrainingStep(num_click_iterations=(2, 3), seed=0)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=model,
                                optimizer=opt, loss_function=torch.nn.Identity(), iteration_update=step)
    trainer.run()
    out = trainer.state.output
    assert np.isfinite(out["loss"]) and 0 <= out["dice"] <= 1
    assert out["pred"].shape == (1, 1, 64, 64, 64)
    assert not torch.equal(before, model.mask_decoder.output_upscaling[0].weight)


def test_click_iterations_parse_a_count_or_a_range_and_the_step_draws_within_it():
    """``train_clicks`` N (fixed) or LOW-HIGH (drawn per sample); anything else is refused naming the value."""
    from sam_med3d.training import click_iterations

    assert click_iterations(5) == (5, 5) and click_iterations("5") == (5, 5)
    assert click_iterations("1-10") == (1, 10) and click_iterations([2, 4]) == (2, 4)
    for bad in (0, "0-3", "10-1", "1-101", "a", "1-2-3", True, 2.5, None, [1]):
        with pytest.raises(ValueError, match="click iterations"):
            click_iterations(bad)
    step = ClickTrainingStep(num_click_iterations=click_iterations("1-10"), seed=0)
    draws = {step.draw_iterations() for _ in range(400)}
    assert draws == set(range(1, 11))
    assert {ClickTrainingStep(num_click_iterations=click_iterations(3)).draw_iterations() for _ in range(20)} == {3}
    # A fixed count, as an int or as (N, N), draws nothing: a seeded run's clicks are what they were before ranges.
    fixed, plain = ClickTrainingStep(num_click_iterations=(5, 5), seed=0), ClickTrainingStep(5, seed=0)
    fixed.draw_iterations()
    assert fixed.rng.random() == plain.rng.random()


def test_click_centred_validation_crops_follow_a_seeded_voxel_of_the_target(tmp_path):
    """``validation_transforms(center="click")`` (the app trainer's): the crop is the predictor's crop for a
    first click on one voxel of the target, the same voxel in every run, another voxel for another copy."""
    from sam_med3d.training import validation_transforms

    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (90, 80, 70)).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[20:70, 15:60, 10:60] = 2  # a target larger than the 24^3 crop: where the crop sits matters
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image_path, label_path = _nifti(tmp_path, "img", image, affine), _nifti(tmp_path, "lab", label, affine)
    transform = validation_transforms(24, center="click")

    def sample(sequence):
        return transform({"image": str(image_path), "label": str(label_path), "label_value": 2,
                          "val_sequence": sequence})

    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    # The same files in another folder (a datastore moved, a benchmark's temporary folder): the same crop.
    moved = tmp_path / "moved"
    moved.mkdir()
    image_moved = shutil.copy(image_path, moved)
    label_moved = shutil.copy(label_path, moved)
    elsewhere = transform({"image": str(image_moved), "label": str(label_moved), "label_value": 2,
                           "val_sequence": 0})
    assert torch.equal(first["image"], elsewhere["image"])
    assert not torch.equal(first["image"], other["image"])
    official = validation_transforms(24)({"image": str(image_path), "label": str(label_path), "label_value": 2})
    assert not torch.equal(first["image"], official["image"])
    for item in (first, other):  # centred on a voxel of the target (the crop's centre voxel is in it)
        assert item["label"][0, 12, 12, 12] == 1
    with pytest.raises(ValueError, match="center"):
        validation_transforms(24, center="middle")


# ------------------------------------------------------------------------------------------------ retention
def test_off_target_clicks_avoid_the_target_and_the_padding():
    image, label = _batch(b=3)
    image[:, :, 40:] = image.min() - 1  # zero padding / air: the crop's minimum
    image[2] = image[2].min()  # nothing but padding
    rng = np.random.default_rng(0)
    for _ in range(20):
        points, labels = off_target_clicks(image, label, rng)
        assert points.shape == (3, 1, 3) and labels.tolist() == [[1], [1], [-1]]
        for b in range(2):
            d, h, w = points[b, 0].tolist()
            assert label[b, 0, d, h, w] == 0 and d < 40


def test_retention_loss_agrees_for_the_teacher_itself_and_pulls_a_changed_decoder_back():
    import copy

    torch.manual_seed(0)
    teacher = build_sam_med3d("vit_mini").eval()
    student = copy.deepcopy(teacher)
    image, label = _batch(b=1)
    embedding = student.image_encoder(image).detach()
    same = retention_loss(student, teacher, embedding, image, label, np.random.default_rng(1), num_clicks=3)
    assert same["agreement"] == 1.0
    with torch.no_grad():
        for p in student.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed = retention_loss(student, teacher, embedding, image, label, np.random.default_rng(1), num_clicks=3)
    assert changed["loss"] > same["loss"] and changed["agreement"] < 1.0  # a changed decoder answers otherwise
    changed["loss"].backward()
    grad = student.mask_decoder.output_upscaling[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="num_clicks"):
        retention_loss(student, teacher, embedding, image, label, np.random.default_rng(1), num_clicks=0)


def test_click_model_with_a_teacher_adds_the_retention_term_in_training_only():
    import copy

    torch.manual_seed(0)
    sam = freeze_image_encoder(build_sam_med3d("vit_mini"), True)
    teacher = copy.deepcopy(sam)
    model = ClickIterationModel(sam, teacher=teacher, retention_weight=1.0, retention_clicks=2)
    assert not any(k.startswith("_teacher") or "teacher" in k for k in model.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters())
    image, label = _batch(b=1)
    plain = ClickIterationModel(sam)
    a = plain(image, label, 2, np.random.default_rng(3))
    b = model.train()(image, label, 2, np.random.default_rng(3))
    assert torch.equal(a["points"], b["points"])  # the retention session comes after the target's clicks
    assert b["retention_agreement"] == 1.0 and b["retention_loss"] > 0
    assert torch.allclose(b["loss"], a["loss"] + b["retention_loss"])
    assert "embedding" not in b
    c = model.eval()(image, label, 2, np.random.default_rng(3))
    assert "retention_loss" not in c and torch.allclose(c["loss"], a["loss"])
    with pytest.raises(ValueError, match="teacher"):
        ClickIterationModel(sam, retention_weight=1.0)
    with pytest.raises(ValueError, match="retention_weight"):
        ClickIterationModel(sam, teacher=teacher, retention_weight=-1)


def test_with_the_image_encoder_tuned_the_teacher_encodes_the_crop_itself_and_stays_as_it_was():
    import copy

    torch.manual_seed(0)
    sam = build_sam_med3d("vit_mini")
    teacher = copy.deepcopy(sam)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    teacher.image_encoder.register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    model = ClickIterationModel(sam, teacher=teacher, retention_weight=4.0, retention_clicks=2,
                                mask_only_iterations=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image, label = _batch(b=1)
    out = model(image, label, 2, np.random.default_rng(0))
    out["loss"].backward()
    opt.step()
    assert seen == [False]  # the teacher's own embedding, without gradients
    assert sam.image_encoder.patch_embed.proj.weight.grad is not None
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert 0.0 <= out["retention_agreement"] <= 1.0


def test_retention_keeps_the_answers_elsewhere_when_tuning_on_one_target():
    """Tuning the decoder hard on one target changes its answers to clicks elsewhere; with the retention term
    they stay closer to the weights before tuning (measured on off-target clicks the training never drew)."""
    import copy

    def tune(weight):
        torch.manual_seed(0)
        sam = freeze_image_encoder(build_sam_med3d("vit_mini"), True)
        teacher = copy.deepcopy(sam)
        model = ClickIterationModel(sam, teacher=teacher if weight else None, retention_weight=weight,
                                    mask_only_iterations=False).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        image, label = _batch(b=1)
        rng = np.random.default_rng(0)
        for _ in range(12):
            opt.zero_grad()
            model(image, label, 2, rng)["loss"].backward()
            opt.step()
        with torch.no_grad():
            embedding = sam.image_encoder(image)
            scores = [retention_loss(sam, teacher, embedding, image, label, np.random.default_rng(100 + i),
                                     num_clicks=1)["loss"].item() for i in range(4)]
        return float(np.mean(scores))

    assert tune(1.0) < tune(0.0)


def test_disagreement_clicks_fall_where_the_masks_differ_with_the_teachers_answer():
    student = torch.zeros(3, 1, 8, 8, 8, dtype=torch.bool)
    teacher = torch.zeros_like(student)
    teacher[0, 0, 2, 3, 4] = True  # the teacher says foreground here: a positive click
    student[1, 0, 5, 5, 5] = True  # the student says foreground where the teacher does not: a negative click
    rng = np.random.default_rng(0)
    for _ in range(10):
        points, labels = disagreement_clicks(student, teacher, 4, rng)
        assert labels.tolist() == [[1], [0], [-1]]  # the third item agrees everywhere: no click
        assert (points[0, 0] // 4).tolist() == [2, 3, 4] and (points[1, 0] // 4).tolist() == [5, 5, 5]
