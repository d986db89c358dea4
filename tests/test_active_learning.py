"""Active learning: the benchmark's machinery end to end on a tiny campaign, and the trainer's few-label logic.

The end-to-end test runs ``benchmarks/active_learning.py`` as a user would (a real server on 127.0.0.1, the
real client, the bundled model, two synthetic phantoms: one annotated, one evaluated, one round of one epoch)
and checks that ``summary.json`` follows the issue's schema and that the numbers in it are consistent with the
per-case rows. It does not judge whether training helped (that is the benchmark's job, in docs/app.md).
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from app_helpers import REPO, app_module

BENCHMARK = REPO / "benchmarks" / "active_learning.py"


@pytest.fixture(scope="module")
def trainer_module():
    """The app's trainer module, imported as MONAI Label imports it (app folder first on ``sys.path``)."""
    return app_module("lib.trainers.sam_med3d")


@pytest.fixture(scope="module")
def benchmark_module():
    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        return importlib.import_module("active_learning")
    finally:
        sys.path.remove(str(BENCHMARK.parent))


def _nifti(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
    return str(path)


@pytest.fixture()
def small_labels(tmp_path):
    """Two images with labels: ``good`` (a cube on the image grid) and ``shifted`` (its label on another grid)."""
    image = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    cube = np.zeros((24, 24, 24), dtype=np.uint8)
    cube[8:16, 8:16, 8:16] = 1
    return {
        "good": {"image": _nifti(tmp_path / "good.nii.gz", image), "label": _nifti(tmp_path / "good_l.nii.gz", cube)},
        "shifted": {"image": _nifti(tmp_path / "shifted.nii.gz", image),
                    "label": _nifti(tmp_path / "shifted_l.nii.gz", np.pad(cube, ((0, 4), (0, 0), (0, 0))))},
    }


# ------------------------------------------------------------------------------------------ trainer logic
def test_a_label_on_another_grid_is_skipped_with_a_warning(trainer_module, small_labels, caplog):
    datalist = [small_labels["shifted"], small_labels["good"]]
    with caplog.at_level(logging.WARNING, logger=trainer_module.__name__):
        samples = trainer_module.expand_targets(datalist)
    assert samples == [dict(small_labels["good"], label_value=1)]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "shifted_l.nii.gz has size 28x24x24 but its image shifted.nii.gz has 24x24x24; skipped" in warning


def _trainer(trainer_module, tmp_path, val_split: float):
    from monailabel.tasks.train.basic_train import Context

    trainer = trainer_module.SamMed3DTrainer(str(tmp_path), SimpleNamespace(device="cpu"), {"spleen": 1}, epochs=1,
                                             val_split=val_split, lr=1e-4, train_clicks=2, multi_gpu=False)
    context = Context()
    context.request, context.local_rank = {"val_split": val_split}, 0
    return trainer, context


def test_one_label_is_validated_on_itself_so_a_worse_model_is_not_published(trainer_module, small_labels, tmp_path):
    trainer, context = _trainer(trainer_module, tmp_path, 0.2)
    context.datalist = [small_labels["good"]]  # val_split 0.2 of one image holds nothing back
    train, val = trainer.partition_datalist(context)
    assert train == [dict(small_labels["good"], label_value=1)]
    # Validation exists (so PublishBest publishes only on improvement): the training target, once per
    # validation copy, each with its own crop centre and clicks.
    assert val == [dict(train[0], val_sequence=r) for r in range(trainer_module.VAL_SEQUENCES)]


def test_val_split_zero_still_means_no_validation(trainer_module, small_labels, tmp_path):
    trainer, context = _trainer(trainer_module, tmp_path, 0.0)
    context.datalist = [small_labels["good"]]
    _, val = trainer.partition_datalist(context)
    assert val == []


@pytest.mark.parametrize("targets,per_epoch,draws", [(1, 16, 16), (3, 16, 16), (20, 16, 20), (2, 1, 2)])
def test_few_targets_are_drawn_again_within_an_epoch(trainer_module, tmp_path, targets, per_epoch, draws):
    """``samples_per_epoch``: one epoch draws at least that many samples, each target equally often (+-1), and
    the dataset (the cache) holds each target once."""
    trainer, context = _trainer(trainer_module, tmp_path, 0.0)
    context.request["samples_per_epoch"] = per_epoch
    context.train_datalist = [{"index": i} for i in range(targets)]
    context.dataset_type, context.dataloader_type, context.train_batch_size = "Dataset", "ThreadDataLoader", 1
    context.multi_gpu = False
    trainer.train_pre_transforms = lambda context: []
    loader = trainer.train_data_loader(context)
    assert len(loader.dataset) == targets
    for _ in range(2):  # every epoch
        drawn = [int(batch["index"][0]) for batch in loader]
        assert len(drawn) == draws
        counts = np.bincount(drawn, minlength=targets)
        assert counts.max() - counts.min() <= 1, counts
    context.request["samples_per_epoch"] = 0
    with pytest.raises(ValueError, match="samples_per_epoch"):
        trainer.train_data_loader(context)


def _draws(trainer_module, tmp_path, seed):
    """One epoch of the trainer's loader (order and the random transform's output) after ``seed`` is applied."""
    from monai.transforms import RandGaussianNoised

    trainer, context = _trainer(trainer_module, tmp_path, 0.0)
    context.request.update(seed=seed, samples_per_epoch=6)
    context.datalist = []
    used = trainer.seed(context)
    context.train_datalist = [{"index": i, "x": np.zeros((1, 2, 2, 2), np.float32)} for i in range(3)]
    context.dataset_type, context.dataloader_type, context.train_batch_size = "Dataset", "ThreadDataLoader", 1
    context.multi_gpu = False
    trainer.train_pre_transforms = lambda context: [RandGaussianNoised(keys="x", prob=1.0)]
    batches = list(trainer.train_data_loader(context))
    return used, [int(b["index"][0]) for b in batches], np.stack([np.asarray(b["x"]) for b in batches])


def test_a_seeded_training_run_draws_the_same_samples_and_augmentations_again(trainer_module, tmp_path):
    from monai.utils import set_determinism

    try:
        used, order, noise = _draws(trainer_module, tmp_path, 7)
        assert used == 7
        again = _draws(trainer_module, tmp_path, 7)
        assert again[1] == order and np.array_equal(again[2], noise)
        other = _draws(trainer_module, tmp_path, 8)
        assert not np.array_equal(other[2], noise)
        unseeded = _draws(trainer_module, tmp_path, -1)  # the default: nothing is seeded
        assert unseeded[0] is None
    finally:
        set_determinism(seed=None)


def test_seed_is_checked_before_training_starts(trainer_module):
    preflight = importlib.import_module("lib.trainers.preflight")  # the app's lib, loaded by trainer_module
    InvalidRequest = importlib.import_module("lib.errors").InvalidRequest
    check = preflight.check_train_options
    check({"seed": 0})
    check({"seed": -1})
    for bad in (-2, 1.5, "7", True):
        with pytest.raises(InvalidRequest, match="train option seed must be an integer in -1..2147483647"):
            check({"seed": bad})


@pytest.mark.parametrize("retention", [1.0, 0.0])
def test_the_network_keeps_a_frozen_copy_of_the_base_weights_for_the_retention_term(trainer_module, tmp_path,
                                                                                   retention):
    from monailabel.tasks.train.basic_train import Context
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = save_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "served.pt")
    served = SimpleNamespace(device="cpu", path=lambda: path, expected_arch="auto", base=SimpleNamespace(path=path))
    trainer = trainer_module.SamMed3DTrainer(str(tmp_path), served, {"spleen": 1}, epochs=1, val_split=0.0,
                                             lr=1e-4, train_clicks=2, multi_gpu=False, retention=0.5)
    context = Context()
    context.request, context.device = {"retention": retention}, "cpu"
    network = trainer.network(context)
    assert network.retention_weight == retention
    metrics = trainer.train_additional_metrics(context)  # the agreement goes to the train stats when on
    assert (metrics is None) if not retention else (list(metrics) == [trainer_module.RETENTION_METRIC])
    if not retention:
        assert network.teacher is None
        return
    teacher = network.teacher
    assert teacher is not network.sam and not any(p.requires_grad for p in teacher.parameters())
    for (name, a), b in zip(network.sam.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, b), name
    # Tuning the network leaves the teacher as served.
    with torch.no_grad():
        next(network.sam.mask_decoder.parameters()).add_(1.0)
    assert not torch.equal(next(network.sam.mask_decoder.parameters()), next(teacher.mask_decoder.parameters()))
    # Without the option in the request, the trainer's default (from --conf) applies.
    context.request = {}
    assert trainer.network(context).retention_weight == 0.5


def test_after_a_first_round_the_teacher_is_still_the_base_model_not_the_fine_tuned_one(trainer_module, tmp_path):
    """Round 2 fine-tunes the weights round 1 published, but keeps its answers elsewhere close to the base
    model's: a teacher that followed the served weights would let every round drift further."""
    from monailabel.tasks.train.basic_train import Context
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    torch.manual_seed(0)
    base = build_sam_med3d("vit_mini")
    base_path = save_checkpoint(base, tmp_path / "base.pt")
    tuned = build_sam_med3d("vit_mini")  # other random weights: "published by round 1"
    tuned_path = save_checkpoint(tuned, tmp_path / "finetuned_base.pt")
    served = SimpleNamespace(device="cpu", path=lambda: tuned_path, expected_arch="auto",
                             base=SimpleNamespace(path=base_path))
    trainer = trainer_module.SamMed3DTrainer(str(tmp_path), served, {"spleen": 1}, epochs=1, val_split=0.0,
                                             lr=1e-4, train_clicks=2, multi_gpu=False, retention=4.0)
    context = Context()
    context.request, context.device = {}, "cpu"
    network = trainer.network(context)
    for name, value in network.sam.state_dict().items():  # the student starts from the served (tuned) weights
        assert torch.equal(value, tuned.state_dict()[name]), name
    teacher = network.teacher.state_dict()
    assert all(torch.equal(teacher[name], value) for name, value in base.state_dict().items())
    assert not any(p.requires_grad for p in network.teacher.parameters()) and not network.teacher.training


def test_publish_best_publishes_only_above_the_served_weights_score(trainer_module):
    published = []
    task = SimpleNamespace(publish=lambda context, **extra: published.append(extra))
    context = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(epoch=0)))
    handler = trainer_module.PublishBest(task, context, "val_mean_dice")
    for epoch, dice in [(0, 0.6), (1, 0.5), (2, 0.6), (3, 0.7), (4, 0.65)]:
        context.trainer.state.epoch = epoch
        handler(SimpleNamespace(state=SimpleNamespace(metrics={"val_mean_dice": dice})))
    assert published == [{"epoch": 3, "val_dice": 0.7}]


def test_publish_best_does_not_publish_weights_that_forgot_the_reference_structures(trainer_module):
    published = []
    task = SimpleNamespace(publish=lambda context, **extra: published.append(extra))
    context = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(epoch=0)))
    handler = trainer_module.PublishBest(task, context, "val_mean_dice", max_forgetting=0.05)
    base = trainer_module.BASE_REFERENCE_METRIC
    ref = trainer_module.REFERENCE_METRIC
    for epoch, dice, reference in [(0, 0.5, 0.60), (1, 0.7, 0.50), (2, 0.6, 0.56), (3, 0.65, 0.40), (4, 0.8, 0.58)]:
        context.trainer.state.epoch = epoch
        handler(SimpleNamespace(state=SimpleNamespace(metrics={"val_mean_dice": dice, ref: reference, base: 0.6})))
    # Epoch 1 is better on the user's structure but 0.10 worse on the reference: refused, and not the new bar.
    assert published == [
        {"epoch": 2, "val_dice": 0.6, "reference_dice": 0.56, "base_reference_dice": 0.6},
        {"epoch": 4, "val_dice": 0.8, "reference_dice": 0.58, "base_reference_dice": 0.6},
    ]


def test_weights_that_forgot_are_blended_with_the_base_until_a_blend_passes_the_check(trainer_module):
    """BlendOnForgetting: epoch 1's tuned weights beat validation but forget (reference 0.48 against 0.60);
    the blend 0.5 still forgets (0.54), the blend 0.25 passes (0.57) and is published as exactly
    base + 0.25 * (tuned - base); training then goes on from the tuned weights."""
    from sam_med3d import build_sam_med3d

    torch.manual_seed(0)
    tuned, base = build_sam_med3d("vit_mini"), build_sam_med3d("vit_mini")
    probe = "mask_decoder.output_upscaling.0.weight"
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    published = []
    task = SimpleNamespace(publish=lambda context, **extra: published.append(
        (extra, {k: v.clone() for k, v in tuned.state_dict().items()})))
    context = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(epoch=0)), network=SimpleNamespace(sam=tuned))
    publisher = trainer_module.PublishBest(task, context, "val_mean_dice", max_forgetting=0.05)
    runs = []

    class Evaluator:  # validation + reference check as functions of how far the weights moved from the base
        state = SimpleNamespace(metrics={})

        def run(self, epoch):
            now, b, t = tuned.state_dict()[probe], base.state_dict()[probe], tuned_state[probe]
            share = float(((now - b) / (t - b)).median()) if epoch else 0.0
            runs.append(round(share, 3))
            metrics = {"val_mean_dice": 0.5 + 0.2 * min(share * 4, 1), trainer_module.REFERENCE_METRIC:
                       0.6 - 0.12 * share, trainer_module.BASE_REFERENCE_METRIC: 0.6}
            self.state.metrics = dict(metrics)
            publisher(self)
            torch.rand(3), np.random.rand(), random.random()  # an evaluation draws from the global generators

    context.evaluator = Evaluator()
    blend = trainer_module.BlendOnForgetting(context, publisher, lambda: base, 0.5)
    context.evaluator.run(0)  # before training: the bar
    context.trainer.state.epoch = 1
    context.evaluator.run(1)
    assert publisher.refused_epoch == 1 and not published
    epoch_metrics = dict(context.evaluator.state.metrics)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    blend(context.trainer)
    # Training goes on with the random states it had: blending changes what is published, not what is drawn.
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert runs == [0.0, 1.0, 0.5, 0.25]
    assert len(published) == 1
    extra, weights = published[0]
    assert extra["blend"] == 0.25 and extra["epoch"] == 1 and extra["reference_dice"] == pytest.approx(0.57)
    expected = base.state_dict()[probe] + 0.25 * (tuned_state[probe] - base.state_dict()[probe])
    assert torch.allclose(weights[probe], expected, atol=1e-6)
    assert all(torch.equal(v, tuned_state[k]) for k, v in tuned.state_dict().items())  # tuned weights back
    assert publisher.blend == 1.0 and publisher.best == pytest.approx(0.7)
    assert context.evaluator.state.metrics == epoch_metrics  # the train stats report the tuned weights' epoch
    # An epoch that was not refused is left alone.
    context.trainer.state.epoch = 2
    blend(context.trainer)
    assert runs == [0.0, 1.0, 0.5, 0.25]


def test_reference_check_scores_the_base_once_and_the_tuned_model_only_at_candidate_epochs(trainer_module,
                                                                                            monkeypatch):
    from sam_med3d import build_sam_med3d, rehearsal

    calls = []

    class FakeScore:
        def __init__(self, records, crop_size, num_clicks, device):
            calls.append(("init", len(records), crop_size, num_clicks))

        def __len__(self):
            return 2

        def per_target(self, sam, cache_key=None):
            calls.append(cache_key)
            return [0.7, 0.5] if cache_key == "base" else [0.72, 0.28]

        def per_structure(self, scores):
            return dict(zip(["liver", "kidney_left"], scores))

    monkeypatch.setattr(rehearsal, "ReferenceScore", FakeScore)
    sam = build_sam_med3d("vit_mini")
    sam.image_encoder.requires_grad_(False)
    task = SimpleNamespace(reference_records=[{}, {}], base_model=lambda context: "base weights")
    context = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(epoch=0)), network=SimpleNamespace(sam=sam),
                              request={"train_clicks": 3}, device="cpu")
    publisher = SimpleNamespace(best=-1.0)
    check = trainer_module.ReferenceCheck(task, context, publisher, "val_mean_dice")
    seen = []
    for epoch, dice, best in [(0, 0.5, -1.0), (1, 0.4, 0.5), (2, 0.7, 0.5), (3, 0.6, 0.7)]:
        context.trainer.state.epoch, publisher.best = epoch, best
        metrics = {"val_mean_dice": dice}
        check(SimpleNamespace(state=SimpleNamespace(metrics=metrics)))
        seen.append((metrics[trainer_module.REFERENCE_METRIC], metrics[trainer_module.BASE_REFERENCE_METRIC],
                     metrics[trainer_module.WORST_DROP_METRIC]))
    # Built once; the base scored once; the tuned model before training and at epoch 2 (the only candidate).
    assert calls == [("init", 2, int(sam.img_size), 3), "base", "tuned", "tuned"]
    # Mean 0.5 against 0.6; the left kidney lost 0.22 (the liver gained): the worst drop.
    assert [v for row in seen for v in row] == pytest.approx([0.5, 0.6, 0.22] * 4)


def test_publish_best_does_not_publish_weights_that_forgot_one_structure(trainer_module):
    published = []
    task = SimpleNamespace(publish=lambda context, **extra: published.append(extra))
    context = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(epoch=0)))
    handler = trainer_module.PublishBest(task, context, "val_mean_dice", max_forgetting=0.05,
                                         max_structure_forgetting=0.15)
    base, ref, worst = (trainer_module.BASE_REFERENCE_METRIC, trainer_module.REFERENCE_METRIC,
                        trainer_module.WORST_DROP_METRIC)
    for epoch, dice, drop in [(0, 0.5, 0.0), (1, 0.7, 0.27), (2, 0.6, 0.15), (3, 0.8, float("nan"))]:
        context.trainer.state.epoch = epoch
        handler(SimpleNamespace(state=SimpleNamespace(metrics={"val_mean_dice": dice, ref: 0.59, base: 0.6,
                                                               worst: drop})))
        if epoch == 1:  # the mean is within 0.05, but one structure lost 0.27: refused, and blending may try
            assert handler.refused_epoch == 1 and not published
    assert published == [
        {"epoch": 2, "val_dice": 0.6, "reference_dice": 0.59, "base_reference_dice": 0.6, "reference_worst_drop": 0.15},
        {"epoch": 3, "val_dice": 0.8, "reference_dice": 0.59, "base_reference_dice": 0.6},
    ]


def test_mixed_sampler_draws_the_users_and_the_rehearsal_samples_evenly(trainer_module):
    sampler = trainer_module.MixedSampler([0, 1], [2, 3, 4], user_draws=16, rehearsal_draws=8)
    for _ in range(2):
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == 24
        counts = np.bincount(drawn, minlength=5)
        assert list(counts[:2]) == [8, 8]
        assert counts[2:].sum() == 8 and counts[2:].max() - counts[2:].min() <= 1
        assert drawn[:16] != [0, 1] * 8  # shuffled together, not user samples first


def _rehearsing_trainer(trainer_module, tmp_path, val_split: float, rehearsal: float):
    from test_rehearsal import make_set

    trainer, context = _trainer(trainer_module, tmp_path, val_split)
    trainer.rehearsal_data = str(make_set(tmp_path / "rehearsal", 4))
    context.request["rehearsal"] = rehearsal
    return trainer, context


def test_rehearsal_scans_join_the_training_list_and_one_is_held_back_as_reference(trainer_module, small_labels,
                                                                                   tmp_path):
    trainer, context = _rehearsing_trainer(trainer_module, tmp_path, 0.2, 0.5)
    context.datalist = [small_labels["good"]]
    train, val = trainer.partition_datalist(context)
    assert train[0] == dict(small_labels["good"], label_value=1)
    rehearsed = train[1:]
    assert [Path(r["image"]).name for r in rehearsed] == ["case_0.nii.gz", "case_1.nii.gz", "case_2.nii.gz"]
    assert all(r["rehearsal"] is True and r["label_value"] == [1, 2] for r in rehearsed)
    assert not any(r.get("rehearsal") for r in val)  # validation Dice stays the user's structures'
    assert [(Path(r["image"]).name, r["label_value"]) for r in trainer.reference_records] == [
        ("case_3.nii.gz", 1), ("case_3.nii.gz", 2)]

    # The loader: 16 draws of the user's target and 8 of the rehearsal scans per epoch.
    context.train_datalist = [dict(r, index=i) for i, r in enumerate(train)]
    context.dataset_type, context.dataloader_type, context.train_batch_size = "Dataset", "ThreadDataLoader", 1
    context.multi_gpu = False
    trainer.train_pre_transforms = lambda context: []
    drawn = [int(b["index"][0]) for b in trainer.train_data_loader(context)]
    assert len(drawn) == 24 and drawn.count(0) == 16


@pytest.mark.parametrize("val_split,rehearsal", [(0.2, 0.0), (0.0, 0.5)])
def test_no_rehearsal_when_off_and_no_reference_check_without_validation(trainer_module, small_labels, tmp_path,
                                                                         val_split, rehearsal):
    trainer, context = _rehearsing_trainer(trainer_module, tmp_path, val_split, rehearsal)
    context.datalist = [small_labels["good"]]
    train, _ = trainer.partition_datalist(context)
    assert len(train) == (1 if rehearsal == 0 else 4)
    # rehearsal 0 still checks forgetting on the held-back scans; without validation nothing is checked.
    assert len(trainer.reference_records) == (0 if val_split == 0 else 2)


def test_no_rehearsal_set_at_all_when_rehearsal_and_both_margins_are_off(trainer_module, small_labels, tmp_path):
    """The defaults with ``--conf finetuned_for trained``: nothing to rehearse and nothing a check could refuse,
    so the rehearsal set is not even read (nor, for the bundled model, written)."""
    trainer, context = _rehearsing_trainer(trainer_module, tmp_path, 0.2, 0.0)
    context.request.update(max_forgetting=1.0, max_structure_forgetting=1.0)
    trainer.rehearsal_folder = lambda: pytest.fail("the rehearsal set was looked up")
    context.datalist = [small_labels["good"]]
    train, _ = trainer.partition_datalist(context)
    assert len(train) == 1 and trainer.reference_records == []
    context.request["max_structure_forgetting"] = 0.5  # one margin on: the set is read for the check
    trainer.rehearsal_folder = lambda: Path(trainer.rehearsal_data)
    trainer.partition_datalist(context)
    assert len(trainer.reference_records) == 2


def test_auto_rehearsal_data_is_the_bundled_models_phantoms_and_none_for_other_models(trainer_module, tmp_path,
                                                                                       monkeypatch):
    from sam_med3d import rehearsal
    from sam_med3d.checkpoint import BUNDLED_PATH

    written = []
    monkeypatch.setattr(rehearsal, "bundled_rehearsal_set", lambda folder: written.append(folder) or folder)
    for base, expected in [(tmp_path / "turbo.pth", None), (Path(BUNDLED_PATH), tmp_path / "rehearsal_bundled")]:
        served = SimpleNamespace(device="cpu", base=SimpleNamespace(path=base), finetuned=tmp_path / "finetuned.pt")
        trainer = trainer_module.SamMed3DTrainer(str(tmp_path), served, {"spleen": 1}, epochs=1, val_split=0.2,
                                                 lr=1e-4, train_clicks=2, multi_gpu=False)
        assert trainer.rehearsal_folder() == expected
    assert written == [tmp_path / "rehearsal_bundled"]
    trainer.rehearsal_data = "none"
    assert trainer.rehearsal_folder() is None


@pytest.mark.parametrize("flag", [True, "true"])
def test_frozen_encoder_is_left_out_of_the_optimizer_and_keeps_its_weights(trainer_module, tmp_path, flag):
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint
    from sam_med3d.training import ClickTrainingStep

    trainer, context = _trainer(trainer_module, tmp_path, 0.0)
    torch.manual_seed(0)
    path = save_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "served.pt")
    trainer.served = SimpleNamespace(device="cpu", path=lambda: path, expected_arch="auto",
                                     base=SimpleNamespace(path=path))
    context.request.update(freeze_encoder=flag, retention=0.0)
    context.device = "cpu"
    context.network = trainer.network(context)  # loads the served weights and freezes as asked
    sam = context.network.sam
    optimizer = trainer.optimizer(context)
    tuned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not tuned & {id(p) for p in sam.image_encoder.parameters()}
    assert {id(p) for p in sam.mask_decoder.parameters()} <= tuned

    encoder_before = [p.detach().clone() for p in sam.image_encoder.parameters()]
    decoder_before = [p.detach().clone() for p in sam.mask_decoder.parameters()]
    label = torch.zeros(1, 1, 64, 64, 64)
    label[..., 20:40, 20:40, 20:40] = 1
    ClickTrainingStep(2, seed=0).train_step(context.network, optimizer,
                                            {"image": torch.randn(1, 1, 64, 64, 64), "label": label})
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, sam.image_encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, sam.mask_decoder.parameters()))


# ------------------------------------------------------------------------------------- benchmark pieces
def test_schedule_and_noc(benchmark_module):
    assert benchmark_module.parse_schedule("1,3,5", None) == [1, 3, 5]
    assert benchmark_module.parse_schedule("2", 3) == [2, 4, 6]
    for bad in ("3,1", "0", "a"):
        with pytest.raises(ValueError, match="--cases"):
            benchmark_module.parse_schedule(bad, None)
    assert benchmark_module.noc([0.5, 0.79, 0.81, 0.9]) == 3
    assert benchmark_module.noc([0.5] * 20) == 20
    assert benchmark_module.dice_at([0.2, 0.95], 5) == 0.95  # stopped early: the last Dice holds


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("finetuned_for", ["trained", "all"])
def test_tiny_campaign_through_the_real_server_writes_a_schema_valid_summary(tmp_path, finetuned_for):
    """The default (fine-tuned weights answer only their structure; no forgetting guards) and ``all`` (the guards
    on: retention, rehearsal and the reference check), each through the real server."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCHMARK), "--structure", "kidney_left", "--cases", "1", "--eval-cases", "1",
           "--others", "1", "--other-sequences", "2", "--max-clicks", "10",
           "--train-options", '{"max_epochs": 1, "train_clicks": 2}', "--train-timeout", "300", "--output", str(out)]
    if finetuned_for != "trained":
        cmd += ["--conf", "finetuned_for", finetuned_for]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    assert summary["structure"] == "kidney_left"
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for r in summary["rounds"]:
        assert set(r["dice"]) == {"1", "3", "5", "10"}
        assert all(0.0 <= v <= 1.0 for v in r["dice"].values())
        assert 1 <= r["noc80"] <= 10
        assert set(r["other_dice"]) == {"5"} and 0.0 <= r["other_dice"]["5"] <= 1.0
    assert summary["rounds"][0]["train_seconds"] is None
    trained = summary["rounds"][1]
    assert trained["train_seconds"] > 0
    assert trained["annotated_cases"] == 1 and len(trained["annotation"]) == 1
    assert 1 <= trained["annotation"][0]["clicks"] <= 10
    # One label, val_split 0.2: validated on the training label, so the run reports a validation Dice.
    assert trained["val_dice"] is not None and 0.0 <= trained["val_dice"] <= 1.0
    served = Path(trained["served_model"]).name
    assert served in ("sam_med3d_bundled.pt", "finetuned_sam_med3d_bundled.pt")
    tuned = "fine-tuned" if served.startswith("finetuned_") else "base"
    assert summary["rounds"][0]["answered_by"] == {"evaluate": ["base"], "other": ["base"]}
    if finetuned_for == "trained":
        # Fine-tuned weights answer only the structure they were trained on, so no forgetting guard runs.
        assert trained["answered_by"] == {"evaluate": [tuned], "other": ["base"]}
        assert trained["retention_agreement"] is None and trained["reference_dice"] is None
    else:
        assert trained["answered_by"] == {"evaluate": [tuned], "other": [tuned]}
        # The retention term's agreement with the served model is in the train stats.
        assert trained["retention_agreement"] is not None and 0.0 <= trained["retention_agreement"] <= 1.0
        # The bundled model rehearses its phantoms and checks forgetting on the held-back ones.
        assert 0.0 <= trained["reference_dice"] <= 1.0 and 0.0 < trained["base_reference_dice"] <= 1.0

    # The summary's means are the means of the per-case rows.
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in summary["rounds"]:
        evaluated = [row for row in rows if row["round"] == str(r["round"]) and row["group"] == "evaluate"]
        assert len(evaluated) == 1
        assert float(evaluated[0]["dice@5"]) == pytest.approx(r["dice"]["5"], abs=1e-3)
        assert float(evaluated[0]["noc80"]) == r["noc80"]
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000
    assert "| round | annotated |" in done.stdout


def test_retention_agreement_metric_reads_the_step_output_before_and_after_decollation(trainer_module):
    read = trainer_module.retention_agreement
    assert read({"retention_agreement": 0.25, "loss": 1.0}) == 0.25
    assert read([{"retention_agreement": 0.2}, {"retention_agreement": 0.4}]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="retention_agreement"):
        read([{"loss": 1.0}])


def test_published_weights_record_the_label_names_they_were_trained_on(trainer_module, tmp_path, caplog):
    """The checkpoint's ``structures`` (the labels the fine-tuned weights answer with ``--conf finetuned_for
    trained``): the names of this run's saved label values, plus those the starting weights were trained on."""
    from monailabel.tasks.train.basic_train import Context
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import load_model, save_checkpoint

    def recorded():
        return load_model(str(finetuned)).checkpoint_info["extra"]["structures"]

    torch.manual_seed(0)
    base_path = save_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "base.pt")
    finetuned = tmp_path / "finetuned_base.pt"
    served = SimpleNamespace(device="cpu", path=lambda: finetuned if finetuned.is_file() else base_path,
                             expected_arch="auto", base=SimpleNamespace(path=base_path), finetuned=finetuned)
    labels = {"background": 0, "spleen": 1, "liver": 2, "kidney_left": 3}
    trainer = trainer_module.SamMed3DTrainer(str(tmp_path), served, labels, epochs=1, val_split=0.0, lr=1e-4,
                                             train_clicks=2, multi_gpu=False, retention=0.0)
    with caplog.at_level(logging.WARNING):
        names = trainer.structure_names([{"label_value": 2}, {"label_value": 1}, {"label_value": 2},
                                         {"label_value": 9}])
    assert names == ["liver", "spleen"] and "label value(s) [9]" in caplog.text

    context = Context()
    context.request, context.device, context.run_id = {}, "cpu", "round1"
    context.network = trainer.network(context)  # from the base weights: nothing recorded yet
    trainer.trained_structures = ["spleen"]
    trainer.publish(context, epoch=1)
    assert recorded() == ["spleen"]
    # The next round starts from those weights and trains on liver labels only: both are answered.
    context.network = trainer.network(context)
    trainer.trained_structures = ["liver"]
    trainer.publish(context, epoch=1)
    assert recorded() == ["liver", "spleen"]
