"""Rehearsal data and the reference check (``sam_med3d.rehearsal``), and drawing one structure per sample."""

from __future__ import annotations

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
