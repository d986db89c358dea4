"""Rehearsal data and the reference check (``sam_med3d.rehearsal``), and drawing one structure per sample."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam_med3d import rehearsal
from sam_med3d.training import RandStructured


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 1.5, 1.0])), str(path))


def make_set(folder: Path, count: int, size: int = 32) -> Path:
    """``count`` scans in ``imagesTr``/``labelsTr``: values 1 and 2 (big), 3 (tiny, below MIN_VOXELS)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.normal(100, 10, (size, size, size)).astype(np.float32)
        label = np.zeros((size, size, size), np.uint8)
        label[4:14, 4:14, 4:14] = 1
        label[18:28, 18:28, 18:28] = 2
        label[0, 0, :3] = 3
        image[label == 1] += 200
        image[label == 2] -= 80
        _save(folder / "imagesTr" / f"case_{i}.nii.gz", image)
        _save(folder / "labelsTr" / f"case_{i}.nii.gz", label)
    return folder


def test_rehearsal_datalist_holds_back_every_fourth_scan_with_each_of_its_structures(tmp_path):
    folder = make_set(tmp_path / "set", 5)
    (folder / "imagesTr" / "no_label.nii.gz").write_bytes(b"")  # an image without a label is ignored
    train, reference = rehearsal.rehearsal_datalist(folder)
    names = [Path(r["image"]).name for r in train]
    assert names == ["case_0.nii.gz", "case_1.nii.gz", "case_2.nii.gz", "case_4.nii.gz"]
    assert all(r["label_value"] == [1, 2] for r in train)  # the tiny value 3 is left out
    assert [(Path(r["image"]).name, r["label_value"]) for r in reference] == [("case_3.nii.gz", 1),
                                                                               ("case_3.nii.gz", 2)]
    assert all(Path(r["label"]).parent.name == "labelsTr" for r in train + reference)


def test_a_one_scan_set_is_rehearsed_without_reference_and_a_wrong_folder_is_named(tmp_path):
    train, reference = rehearsal.rehearsal_datalist(make_set(tmp_path / "one", 1))
    assert len(train) == 1 and reference == []
    with pytest.raises(FileNotFoundError, match="imagesTr/ and labelsTr/"):
        rehearsal.rehearsal_datalist(tmp_path / "missing")


def test_the_bundled_rehearsal_set_is_the_bundled_training_phantoms_written_once(tmp_path, monkeypatch):
    from sam_med3d.phantoms import generate_case

    monkeypatch.setattr(rehearsal, "BUNDLED_SETS", (("ct", 100, 1), ("mr", 300, 1)))
    folder = rehearsal.bundled_rehearsal_set(tmp_path / "model" / "rehearsal_bundled")
    images = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert images == ["synth_ct_000.nii.gz", "synth_mr_000.nii.gz"]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == images
    expected = generate_case(100, 0)  # the model card's CT training seed, case 0
    assert np.array_equal(np.asarray(nib.load(str(folder / "labelsTr" / images[0])).dataobj), expected.label)
    assert [p.name for p in folder.parent.iterdir()] == ["rehearsal_bundled"]  # no temporary folder left
    stamp = (folder / "imagesTr" / images[0]).stat().st_mtime_ns
    assert rehearsal.bundled_rehearsal_set(folder) == folder
    assert (folder / "imagesTr" / images[0]).stat().st_mtime_ns == stamp  # not written again
    # The structures are named (dataset.json), also in a set written before the names were.
    (folder / "dataset.json").unlink()
    rehearsal.bundled_rehearsal_set(folder)
    assert json.loads((folder / "dataset.json").read_text())["labels"]["4"] == "kidney_left"


def test_reference_targets_are_named_by_the_sets_dataset_json_or_by_label_value(tmp_path):
    folder = make_set(tmp_path / "set", 4)
    _, reference = rehearsal.rehearsal_datalist(folder)
    assert [r["structure"] for r in reference] == ["label_1", "label_2"]
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    _, reference = rehearsal.rehearsal_datalist(folder)
    assert [r["structure"] for r in reference] == ["liver", "spleen"]
    (folder / "dataset.json").write_text("{not json")  # a broken file costs the names, not the check
    _, reference = rehearsal.rehearsal_datalist(folder)
    assert [r["structure"] for r in reference] == ["label_1", "label_2"]


def test_per_structure_means_and_the_worst_drop_name_the_structure_that_lost_most():
    means = rehearsal.per_structure(["liver", "kidney", "liver", "kidney"], [0.8, 0.6, 0.6, 0.4])
    assert means == pytest.approx({"liver": 0.7, "kidney": 0.5})
    drop, name = rehearsal.worst_drop({"liver": 0.7, "kidney": 0.5, "aorta": 0.4},
                                      {"liver": 0.75, "kidney": 0.2, "aorta": 0.3})
    assert drop == pytest.approx(0.3) and name == "kidney"
    drop, name = rehearsal.worst_drop({"liver": 0.7}, {"liver": 0.9})
    assert drop == pytest.approx(-0.2) and name == "liver"  # better everywhere: a negative drop
    drop, name = rehearsal.worst_drop({"liver": 0.7}, {"spleen": 0.9})
    assert np.isnan(drop) and name is None


def test_rand_structured_draws_each_listed_structure_and_leaves_a_single_value_alone():
    draw = RandStructured()
    draw.set_random_state(0)
    seen = [draw({"label_value": [1, 4, 7]})["label_value"] for _ in range(200)]
    assert set(seen) == {1, 4, 7} and all(isinstance(v, int) for v in seen)
    assert min(np.bincount(seen)[[1, 4, 7]]) > 40
    assert draw({"label_value": 3})["label_value"] == 3
    assert draw({"label_value": None})["label_value"] is None
    with pytest.raises(ValueError, match="empty list"):
        draw({"label_value": []})


def test_reference_score_is_repeatable_and_its_cache_keeps_the_embeddings(tmp_path):
    from sam_med3d import build_sam_med3d

    folder = make_set(tmp_path / "set", 4, size=48)
    _, reference = rehearsal.rehearsal_datalist(folder)
    torch.manual_seed(0)
    sam = build_sam_med3d("vit_mini").eval()
    score = rehearsal.ReferenceScore(reference, crop_size=int(sam.img_size), num_clicks=2)
    assert len(score) == 2 and score.names == ["case_3:1", "case_3:2"]
    first = score.per_target(sam, cache_key="base")
    assert all(0.0 <= d <= 1.0 for d in first)
    assert score.per_target(sam) == first  # same clicks, same model: same Dice
    with torch.no_grad():  # another encoder: the cached embeddings are still the first model's
        for p in sam.image_encoder.parameters():
            p.add_(torch.randn_like(p))
    assert score.per_target(sam, cache_key="base") == first
    assert score(sam) == pytest.approx(float(np.mean(score.per_target(sam))))


def test_reference_score_averages_seeded_sequences_per_target_the_first_as_with_one(tmp_path, monkeypatch):
    from sam_med3d import build_sam_med3d, training

    folder = make_set(tmp_path / "set", 4, size=48)
    _, reference = rehearsal.rehearsal_datalist(folder)
    torch.manual_seed(0)
    sam = build_sam_med3d("vit_mini").eval()
    embeddings = []

    def session(sam, image, label, num_clicks, rng, mask_only_iterations, embedding):
        embeddings.append(embedding)
        return {"dice": float(rng.random())}  # a Dice that names the session's generator

    monkeypatch.setattr(training, "run_click_iterations", session)
    one = rehearsal.ReferenceScore(reference, crop_size=int(sam.img_size), num_clicks=2, sequences=1)
    two = rehearsal.ReferenceScore(reference, crop_size=int(sam.img_size), num_clicks=2, sequences=2)
    assert two.structures == ["label_1", "label_2"]
    seed = rehearsal.REFERENCE_SEED
    first = [np.random.default_rng([seed, i]).random() for i in range(2)]
    second = [np.random.default_rng([seed, i, 1]).random() for i in range(2)]
    assert one.per_target(sam) == pytest.approx(first)
    embeddings.clear()
    both = two.per_target(sam)
    assert both == pytest.approx([(a + b) / 2 for a, b in zip(first, second)])
    assert len(embeddings) == 4 and embeddings[0] is embeddings[1]  # one encoding per target
    assert two.per_structure(both) == pytest.approx(dict(zip(["label_1", "label_2"], both)))
    with pytest.raises(ValueError, match="sequences"):
        rehearsal.ReferenceScore(reference, crop_size=int(sam.img_size), sequences=0)
