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
