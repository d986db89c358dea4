"""Publishing fine-tuned weights to a serving app, and the served model meeting a bad fine-tuned file.

The trainer's ``publish`` (:mod:`sam_med3d.publishing`) replaces the served file while the server answers clicks;
the server's :class:`lib.served_model.ServedModel` reloads it when it changes. Checked deterministically: every
write of the new weights is cut into steps, and at each step (and just before any rename) a reader loads the
served file and must find the complete old weights. A file that does not load (truncated, garbage) is not served:
the weights served before stay, with a warning and the reason in the model's ``/info``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app_helpers import APP_DIR
from sam_med3d import build_sam_med3d
from sam_med3d.checkpoint import load_model, save_checkpoint

sys.path.insert(0, str(APP_DIR))
try:
    from lib.infers.sam_med3d import SamMed3DInfer  # noqa: E402
    from lib.served_model import BaseWeights, ServedModel  # noqa: E402
    from lib.trainers.sam_med3d import SamMed3DTrainer  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))

PROBE = "mask_decoder.output_upscaling.0.weight"
WRITE_STEPS = 8


def _mini(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_sam_med3d("vit_mini")


def _probe(model: torch.nn.Module) -> torch.Tensor:
    return model.state_dict()[PROBE]


@pytest.fixture()
def published(tmp_path):
    """Base weights, and fine-tuned weights already published: the old weights that answer the clicks."""
    base, old = _mini(0), _mini(1)
    model_dir = tmp_path / "model"
    return SimpleNamespace(base=base, old=old, base_path=save_checkpoint(base, model_dir / "base.pt"),
                           path=save_checkpoint(old, model_dir / "finetuned_base.pt", structures=["spleen"]))


def _served(published) -> ServedModel:
    return ServedModel(BaseWeights(published.base_path, "test", "the test's base weights"), "auto", "cpu",
                       published.path, use_finetuned=True)


def _write_in_steps(monkeypatch, check):
    """Make every ``torch.save`` write its bytes in :data:`WRITE_STEPS` flushed steps, calling ``check()`` after
    each, and call ``check()`` before every ``os.replace`` / ``os.rename``."""
    real_save, real_replace, real_rename = torch.save, os.replace, os.rename

    def save_in_steps(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        own = isinstance(f, (str, os.PathLike))
        out = open(f, "wb") if own else f
        try:
            for i in range(WRITE_STEPS):
                out.write(data[i * len(data) // WRITE_STEPS:(i + 1) * len(data) // WRITE_STEPS])
                out.flush()
                check()
        finally:
            if own:
                out.close()

    def checked(real):
        def rename(*args, **kwargs):
            check()
            return real(*args, **kwargs)
        return rename

    monkeypatch.setattr(torch, "save", save_in_steps)
    monkeypatch.setattr(os, "replace", checked(real_replace))
    monkeypatch.setattr(os, "rename", checked(real_rename))


def test_publishing_never_shows_a_reader_anything_but_the_complete_old_weights_until_one_rename(
        published, monkeypatch):
    served = _served(published)
    old_bytes, old_inode = published.path.read_bytes(), published.path.stat().st_ino
    model, _ = served.get()
    assert torch.equal(_probe(model), _probe(published.old))
    trainer = SamMed3DTrainer(str(published.path.parent.parent / "train"), served, {"spleen": 1, "liver": 2})
    trainer.trained_structures = ["liver"]
    new = _mini(2)
    context = SimpleNamespace(network=SimpleNamespace(sam=new), run_id="r1")  # bare_sam reads network.sam
    checks = []

    def reader_sees_the_old_weights():
        assert published.path.read_bytes() == old_bytes, f"the served file changed at write step {len(checks)}"
        assert torch.equal(_probe(load_model(published.path)), _probe(published.old))
        model, reloaded = served.get()
        assert not reloaded and torch.equal(_probe(model), _probe(published.old))
        checks.append(True)

    _write_in_steps(monkeypatch, reader_sees_the_old_weights)
    trainer.publish(context, epoch=3)
    monkeypatch.undo()

    assert len(checks) >= WRITE_STEPS + 1  # every write step and the rename were checked
    # Replaced by a rename (a new file), not rewritten in place; nothing else left in the folder.
    assert published.path.stat().st_ino != old_inode
    assert sorted(p.name for p in published.path.parent.iterdir()) == ["base.pt", "finetuned_base.pt"]
    model, reloaded = served.get()
    assert reloaded and torch.equal(_probe(model), _probe(new))
    extra = model.checkpoint_info["extra"]
    # The labels these weights answer: this run's and those the old weights were trained on (network() sets
    # them when training starts from the served weights; here only this run's).
    assert extra["structures"] == ["liver"] and extra["epoch"] == 3 and extra["run_id"] == "r1"
    assert extra["base_checkpoint"] == str(published.base_path)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4096)


@pytest.mark.parametrize("damage", [_truncated, _garbage], ids=["truncated", "garbage"])
def test_a_bad_fine_tuned_file_keeps_the_last_good_weights_served_and_says_so(published, damage, caplog):
    served = _served(published)
    infer = SamMed3DInfer(served, {"background": 0, "spleen": 1}, cache_size=1, cache_ttl_s=60)
    model, _ = served.get()
    assert "model_problem" not in infer.info()

    save_checkpoint(_mini(3), published.path, structures=["spleen"])  # a new file, then damaged on disk
    damage(published.path)
    with caplog.at_level(logging.WARNING):
        kept, reloaded = served.get()
        again, _ = served.get()
    assert kept is model and again is model and not reloaded
    assert torch.equal(_probe(kept), _probe(published.old))
    assert served.path() == published.path and served.structures() == frozenset({"spleen"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per file version, not on every click
    assert f"the fine-tuned weights {published.path} could not be loaded" in warnings[0]
    assert "still serving the fine-tuned weights loaded before" in warnings[0]
    assert "could not be loaded" in infer.info()["model_problem"]
    assert "could not be loaded" in served.describe()

    good = _mini(4)
    save_checkpoint(good, published.path, structures=["spleen"])  # the next round publishes a good file
    model, reloaded = served.get()
    assert reloaded and torch.equal(_probe(model), _probe(good))
    assert served.problem is None and "model_problem" not in infer.info()


@pytest.mark.parametrize("damage", [_truncated, _garbage], ids=["truncated", "garbage"])
def test_a_server_starting_on_a_bad_fine_tuned_file_serves_the_base_weights_and_says_so(published, damage, caplog):
    damage(published.path)
    served = _served(published)
    with caplog.at_level(logging.WARNING):
        model, reloaded = served.get()
    assert reloaded and torch.equal(_probe(model), _probe(published.base))
    assert served.path() == published.base_path and served.structures() is None  # the base answers every label
    assert "still serving the base weights" in served.problem
    assert "still serving the base weights" in caplog.text


# ----------------------------------------------------------------------------------------- when to publish
def _publisher(**margins):
    from sam_med3d.publishing import PublishBest

    published = []
    context = SimpleNamespace(trainer=SimpleNamespace(state=SimpleNamespace(epoch=0)))
    def publish(given, **extra):
        assert given is context, "the task publishes with the training context (its network, its run id)"
        published.append(extra)

    handler = PublishBest(SimpleNamespace(publish=publish), context, "val_mean_dice", **margins)

    def validate(epoch, **metrics):
        context.trainer.state.epoch = epoch
        handler(SimpleNamespace(state=SimpleNamespace(metrics=metrics)))

    return handler, validate, published


def test_the_log_says_why_weights_are_published_or_not(caplog):
    """The log is where an operator learns why a round published nothing: each verdict names the epoch, which
    weights (the tuned ones or a blend), the scores and the margin that decided."""
    from sam_med3d.forgetting import BASE_REFERENCE_METRIC as BASE, REFERENCE_METRIC as REF, WORST_DROP_METRIC as WORST

    handler, validate, published = _publisher(max_forgetting=0.05, max_structure_forgetting=0.15)
    with caplog.at_level(logging.INFO, logger="sam_med3d.publishing"):
        validate(0, val_mean_dice=0.5)
        validate(1, val_mean_dice=0.7, **{REF: 0.5, BASE: 0.6, WORST: 0.1})
        handler.blend = 0.25
        validate(2, val_mean_dice=0.6, **{REF: 0.59, BASE: 0.6, WORST: 0.3})
        handler.blend = 1.0
        validate(3, val_mean_dice=0.8, **{REF: 0.59, BASE: 0.6, WORST: 0.1})
        handler.blend = 0.5
        validate(4, val_mean_dice=0.9, **{REF: 0.58, BASE: 0.6, WORST: 0.12})
    assert [r.getMessage() for r in caplog.records] == [
        "Validation Dice of the served weights: 0.5000 (to beat)",
        "Epoch 1 (weights): validation Dice 0.7000 > 0.5000, but the reference Dice 0.5000 is more than 0.050 below "
        "the base model's 0.6000 (it forgot other structures); not published",
        "Epoch 2 (blend 0.25 of the tuned and base weights): validation Dice 0.6000 > 0.5000, but one reference "
        "structure's Dice fell 0.3000 below the base model's (more than 0.150: it forgot that structure); not "
        "published",
        "Epoch 3 (weights): validation Dice 0.8000 > 0.5000; publishing",
        "Epoch 4 (blend 0.5 of the tuned and base weights): validation Dice 0.9000 > 0.8000; publishing",
    ]
    assert handler.refused_epoch == 2 and handler.best == 0.9 and handler.published
    assert published == [
        {"epoch": 3, "val_dice": 0.8, "reference_dice": 0.59, "base_reference_dice": 0.6, "reference_worst_drop": 0.1},
        {"epoch": 4, "val_dice": 0.9, "blend": 0.5, "reference_dice": 0.58, "base_reference_dice": 0.6,
         "reference_worst_drop": 0.12},
    ]


def test_a_run_without_a_score_before_training_publishes_its_first_scored_epoch():
    """No Dice before training (the metric missing or NaN): the first epoch with a score is the first bar beaten."""
    from sam_med3d.forgetting import BASE_REFERENCE_METRIC as BASE, REFERENCE_METRIC as REF

    handler, validate, published = _publisher()  # no margins: reference scores, if any, decide nothing
    validate(0)
    validate(0, val_mean_dice=float("nan"))
    validate(1, val_mean_dice=0.3, **{REF: 0.1, BASE: 0.9})
    validate(2, val_mean_dice=float("nan"))
    validate(3, val_mean_dice=0.2)
    assert published == [{"epoch": 1, "val_dice": 0.3}]


def test_blending_leaves_alone_an_epoch_that_nothing_refused():
    from sam_med3d.forgetting import BlendOnForgetting

    handler, validate, published = _publisher(max_forgetting=0.05)
    evaluator = SimpleNamespace(run=lambda epoch: pytest.fail("a blend was validated"),
                                state=SimpleNamespace(metrics={}))
    blend = BlendOnForgetting(SimpleNamespace(evaluator=evaluator, network=None), handler,
                              lambda: pytest.fail("the base weights were loaded"), 0.5)
    for epoch in (1, 2):  # the first epochs, before and after validation published nothing and refused nothing
        blend(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
    assert published == [] and handler.refused_epoch == -1


def test_publish_weights_records_its_origin_and_says_what_it_published(tmp_path, caplog):
    from sam_med3d.publishing import publish_weights

    weights = _mini(5)
    with caplog.at_level(logging.INFO, logger="sam_med3d.publishing"):
        written = publish_weights(weights, tmp_path / "finetuned.pt", base_checkpoint=tmp_path / "base.pt",
                                  run_id="20260101_120000", structures=[])
        publish_weights(weights, tmp_path / "finetuned.pt", base_checkpoint=tmp_path / "base.pt", run_id="r",
                        structures={"spleen", "liver"}, epoch=2)
    assert written == tmp_path / "finetuned.pt"
    assert caplog.messages == [f"New SAM-Med3D weights published: {written} (trained on: -)",
                               f"New SAM-Med3D weights published: {written} (trained on: liver, spleen)"]
    info = load_model(written).checkpoint_info["extra"]
    assert info == {"base_checkpoint": str(tmp_path / "base.pt"), "run_id": "r", "structures": ["liver", "spleen"],
                    "epoch": 2}
    assert torch.equal(_probe(load_model(written)), _probe(weights))


def test_weights_exactly_at_the_forgetting_margins_are_published():
    """``max_forgetting`` and ``max_structure_forgetting`` say how far below the base model's Dice is still fine."""
    from sam_med3d.forgetting import BASE_REFERENCE_METRIC as BASE, REFERENCE_METRIC as REF, WORST_DROP_METRIC as WORST

    handler, validate, published = _publisher(max_forgetting=0.25, max_structure_forgetting=0.25)
    validate(0, val_mean_dice=0.5)
    validate(1, val_mean_dice=0.6, **{REF: 0.5, BASE: 0.75, WORST: 0.25})  # exactly 0.25 below: allowed
    validate(2, val_mean_dice=0.7, **{REF: 0.4375, BASE: 0.75, WORST: 0.0})  # 0.3125 below: refused
    validate(3, val_mean_dice=0.8, **{REF: 0.75, BASE: 0.75, WORST: 0.375})  # one structure 0.375 below: refused
    assert [extra["epoch"] for extra in published] == [1] and handler.refused_epoch == 3
