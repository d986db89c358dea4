"""The app's option schema (``apps/sam_med3d/lib/options.py``) is the one home of every option: the docs
table, the checks at start and before a training run, and the training task's defaults all come from it."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from app_helpers import REPO, app_module


@pytest.fixture(scope="module")
def lib():
    """The app's ``lib`` modules, imported as MONAI Label imports them (app folder first on sys.path)."""
    return SimpleNamespace(options=app_module("lib.options"), preflight=app_module("lib.trainers.preflight"),
                           trainer=app_module("lib.trainers.sam_med3d"), errors=app_module("lib.errors"))


def test_the_docs_options_table_is_the_schemas(lib):
    doc = (REPO / "docs" / "app.md").read_text()
    found = re.search(r"<!-- options table:.*?-->\n(.*?)<!-- end of options table -->", doc, re.S)
    assert found, "docs/app.md has no generated options table (between '<!-- options table' and its end marker)"
    assert found.group(1) == lib.options.options_table(), (
        "docs/app.md's options table differs from the schema; regenerate it with "
        "`cd apps/sam_med3d && python -m lib.options`")


def test_ranges_at_start_and_before_training_are_the_same(lib):
    """A value accepted by --conf is accepted in a Train request and the other way round."""
    check = lib.preflight.check_train_options
    invalid = lib.errors.InvalidRequest
    for name, inside, outside in [("val_split", 0.95, 1.0), ("lr", 1.0, 0.0), ("rehearsal", 4.0, 4.5),
                                  ("epochs", 1000, 1001), ("samples_per_epoch", 10000, 0)]:
        key = lib.options.CONF_OPTIONS[name].request
        lib.options.AppOptions.from_conf({name: str(inside)}, "/tmp")
        check({key: inside})
        with pytest.raises(ValueError, match=f"--conf {name}"):
            lib.options.AppOptions.from_conf({name: str(outside)}, "/tmp")
        with pytest.raises(invalid, match=f"train option {key} must be"):
            check({key: outside})


def test_the_training_task_defaults_are_the_conf_options(lib, tmp_path):
    """What a Train request gets when it sets nothing: the parsed --conf values (auto resolved), e.g. the learning
    rate 5e-4 of finetuned_for trained, not a fallback of the trainer's own."""
    parsed = lib.options.AppOptions.from_conf({"train_clicks": "2-9", "epochs": "3"}, str(tmp_path))
    trainer = lib.trainer.SamMed3DTrainer(str(tmp_path), SimpleNamespace(device="cpu"), {"spleen": 1},
                                          **parsed.train_defaults())
    config = trainer.config()  # MONAI Label's public view of the task's config
    assert (config["max_epochs"], config["train_clicks"], config["lr"], config["freeze_encoder"]) == \
        (3, "2-9", 0.0005, False)
    context = SimpleNamespace(request={})
    assert trainer.option(context, "lr") == 0.0005 and trainer.option(context, "train_clicks") == (2, 9)
    context.request = {"lr": 0.01, "freeze_encoder": "true"}  # the request wins, typed like the config
    assert trainer.option(context, "lr") == 0.01 and trainer.option(context, "freeze_encoder") is True
    with pytest.raises(TypeError, match="not options of a Train request: cache_size"):
        lib.trainer.SamMed3DTrainer(str(tmp_path), SimpleNamespace(device="cpu"), {"spleen": 1}, cache_size=3)
