"""The evaluation CLI end to end: every shared case, both methods, outputs, coverage, reproducibility."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import data_cases
from sam_med3d.evaluate import discover_cases, main


def read_rows(out: Path):
    with open(out / "per_case.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# Two labels per case keeps the 104-class TotalSegmentator CT affordable on CPU; the default (every label) is
# exercised in test_default_evaluates_every_label.
MAX_LABELS = 2


@pytest.fixture(scope="module")
def full_run(data_dir, mini_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_all")
    code = main(["--data", str(data_dir), "--checkpoint", str(mini_checkpoint), "--clicks", "1,3", "--output",
                 str(out), "--method", "sam_med3d", "random_walker", "--max-labels-per-case", str(MAX_LABELS),
                 "--rw-work-size", "32", "--seed", "0", "--quiet",
                 # untrained weights fill their crops: cap the extension so the run stays affordable
                 "--max-crops", "2"])
    assert code == 0
    return out


def test_outputs_exist_and_are_well_formed(full_run):
    for name in ("per_case.csv", "summary.json", "dice_vs_clicks.png"):
        assert (full_run / name).stat().st_size > 0, name
    rows = read_rows(full_run)
    assert list(rows[0].keys()) == ["method", "dataset", "case", "label", "label_name", "larger_than_crop",
                                    "clicks", "dice", "nsd", "crops", "seconds"]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["nsd"]) <= 1.0
        assert float(r["seconds"]) >= 0.0
        assert r["clicks"] in ("1", "3")
        assert r["larger_than_crop"] in ("0", "1")
        assert 1 <= int(r["crops"]) <= (2 if r["method"] == "sam_med3d" else 1)
    summary = json.loads((full_run / "summary.json").read_text())
    assert set(summary["methods"]) == {"sam_med3d", "random_walker"}
    for block in summary["methods"].values():
        assert set(block["dice"]) == {"1", "3"} and set(block["nsd"]) == {"1", "3"}
        assert all(0.0 <= v <= 1.0 for v in block["dice"].values())
    assert summary["dice"] == summary["methods"]["sam_med3d"]["dice"]
    assert "msd_spleen_ct/spleen" in summary["per_label"]
    # Structures larger than one crop (96 mm for vit_mini) are reported as their own group.
    groups = summary["methods"]["sam_med3d"]["groups"]
    assert groups["larger_than_crop"]["n"] > 0 and groups["fits_one_crop"]["n"] > 0
    assert groups["larger_than_crop"]["n"] + groups["fits_one_crop"]["n"] == \
        summary["methods"]["sam_med3d"]["n_evaluated"]


def test_every_case_and_label_is_evaluated_or_skipped(full_run, data_dir):
    rows = read_rows(full_run)
    summary = json.loads((full_run / "summary.json").read_text())
    evaluated = {(r["method"], r["dataset"], r["case"], int(r["label"]), int(r["clicks"])) for r in rows}
    skipped = {(s["dataset"], s["case"], int(s["label"])) for s in summary["skipped"]}
    for dataset, case, _, label_path in data_cases(data_dir):
        declared = {int(k) for k in json.loads((data_dir / dataset / "dataset.json").read_text())["labels"]} - {0}
        present = sorted(int(v) for v in np.unique(np.asarray(nib.load(str(label_path)).dataobj)) if v != 0)
        for value in present[:MAX_LABELS]:
            for method in ("sam_med3d", "random_walker"):
                for k in (1, 3):
                    assert (method, dataset, case, value, k) in evaluated or (dataset, case, value) in skipped, (
                        method, dataset, case, value, k)
        for value in declared - set(present):  # declared but empty in this case: skipped, not scored 0
            assert (dataset, case, value) in skipped
            assert not any(e[1:4] == (dataset, case, value) for e in evaluated)
    assert summary["methods"]["random_walker"]["n_evaluated"] >= len(data_cases(data_dir))


def test_random_walker_finds_the_spleen(full_run, data_dir, tmp_path):
    # The shared run uses vit_mini's 64^3 (96 mm) crop; an easy organ at the default 128^3 crop:
    out = tmp_path / "spleen"
    assert main(["--data", str(data_dir / "msd_spleen_ct"), "--clicks", "3", "--output", str(out),
                 "--method", "random_walker", "--seed", "0", "--quiet"]) == 0
    (row,) = read_rows(out)
    assert row["label_name"] == "spleen" and float(row["dice"]) > 0.3


def test_same_seed_same_numbers_whatever_else_runs(full_run, data_dir, mini_checkpoint, tmp_path):
    """Clicks are seeded per (seed, case, label): a subset rerun reproduces the full run's numbers."""
    out = tmp_path / "again"
    assert main(["--data", str(data_dir / "sct_spinalcord_mri"), str(data_dir / "msd_spleen_ct"), "--checkpoint",
                 str(mini_checkpoint), "--clicks", "1,3", "--output", str(out), "--method", "random_walker",
                 "sam_med3d", "--max-labels-per-case", str(MAX_LABELS), "--rw-work-size", "32", "--rw-crop-size",
                 "64", "--seed", "0", "--quiet", "--max-crops", "2"]) == 0

    def keyed(rows):
        return {(r["method"], r["dataset"], r["case"], r["label"], r["clicks"]): (float(r["dice"]), float(r["nsd"]))
                for r in rows}

    again = keyed(read_rows(out))
    first = keyed(read_rows(full_run))
    assert again and set(again) <= set(first)
    for key, value in again.items():
        assert value == pytest.approx(first[key], abs=1e-6), key
    other = tmp_path / "other_seed"
    assert main(["--data", str(data_dir / "sct_spinalcord_mri"), "--clicks", "1", "--output", str(other),
                 "--method", "random_walker", "--rw-work-size", "32", "--rw-crop-size", "64", "--seed", "1",
                 "--quiet"]) == 0
    changed = keyed(read_rows(other))
    assert any(changed[k] != first[k] for k in changed)  # a different seed gives different clicks


def test_default_evaluates_every_label(data_dir, tmp_path):
    dataset = data_dir / "totalseg_mr_multiorgan"
    out = tmp_path / "mr"
    assert main(["--data", str(dataset), "--clicks", "1", "--output", str(out), "--method", "random_walker",
                 "--rw-crop-size", "64", "--rw-work-size", "24", "--quiet"]) == 0
    (label_path,) = [c[3] for c in data_cases(data_dir) if c[0] == dataset.name]
    present = {int(v) for v in np.unique(np.asarray(nib.load(str(label_path)).dataobj))} - {0}
    assert {int(r["label"]) for r in read_rows(out)} == present


def _write_volume(path: Path, array: np.ndarray, spacing=(1.5, 1.5, 1.5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag(list(spacing) + [1.0])), str(path))


def _ball_case(shape=(40, 40, 40), radius=8):
    grid = np.indices(shape)
    ball = ((grid - np.array(shape)[:, None, None, None] // 2) ** 2).sum(0) <= radius ** 2
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 5, shape) + 100 * ball + 20).astype(np.float32)
    return image, ball.astype(np.uint8)


def test_nnunet_and_official_layouts(tmp_path):
    image, ball = _ball_case()
    nn = tmp_path / "Dataset001_Ball"
    _write_volume(nn / "imagesTr" / "ball_001_0000.nii.gz", image)
    _write_volume(nn / "imagesTr" / "ball_001_0001.nii.gz", image)  # a second channel: ignored
    _write_volume(nn / "labelsTr" / "ball_001.nii.gz", ball)
    (nn / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ball": 1},
                                                 "channel_names": {"0": "CT", "1": "CT2"}}))
    official = tmp_path / "official"
    _write_volume(official / "tumour" / "ct_balls" / "imagesTr" / "b1.nii.gz", image)
    _write_volume(official / "tumour" / "ct_balls" / "labelsTr" / "b1.nii.gz", ball)

    cases = discover_cases([nn, official])
    assert [(c.dataset, c.case, c.labels) for c in cases] == [
        ("Dataset001_Ball", "ball_001", {1: "ball"}), ("tumour/ct_balls", "b1", {1: "tumour"})]
    assert cases[0].image.name == "ball_001_0000.nii.gz"

    out = tmp_path / "out"
    assert main(["--data", str(nn), str(official), "--clicks", "1,2", "--output", str(out), "--method",
                 "random_walker", "--click-mode", "center", "--quiet"]) == 0
    rows = read_rows(out)
    assert {(r["dataset"], r["label_name"]) for r in rows} == {("Dataset001_Ball", "ball"),
                                                                ("tumour/ct_balls", "tumour")}
    # A bright ball on a flat background: the random walker gets it from the centre click.
    assert all(float(r["dice"]) > 0.8 for r in rows)


def test_bad_input_exits_with_a_clear_message(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o"), "--method",
                 "random_walker"]) == 2
    assert "does not exist" in capsys.readouterr().err
    image, ball = _ball_case()
    _write_volume(tmp_path / "ds" / "imagesTr" / "a.nii.gz", image)
    _write_volume(tmp_path / "ds" / "labelsTr" / "a.nii.gz", ball)
    assert main(["--data", str(tmp_path / "ds"), "--output", str(tmp_path / "o")]) == 2  # sam_med3d, no checkpoint
    assert "--checkpoint is required" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "ds"), "--output", str(tmp_path / "o"), "--checkpoint",
                 str(tmp_path / "no_such_weights.pt")]) == 2
    assert "no_such_weights.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "ds"), "--output", str(tmp_path / "o"), "--clicks", "0,x"])
