"""The prepared training cache (``pretrain/prepare.py``, ``pretrain/cache.py``): each image stored once whatever
the number of masks, compact dtypes, resumable sharded preparation, samples equal to the whole-scan pipeline,
DataLoader workers under spawn, and training's refusal of an unprepared cache.

Synthetic volumes of a few ten thousand voxels in the official layout (the same image copied into several
class folders, as in SA-Med3D-140K) keep every test to seconds; one test uses real shared scans.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pretrain import cache as pcache, data as pdata, prepare as pprep  # noqa: E402
from sam_med3d.training import crop_transforms, preprocess_transforms  # noqa: E402

MINI = str(REPO / "pretrain" / "configs" / "vit_mini.yaml")
CROP, JITTER = 64, 4
MARGIN = pdata.max_window_margin(CROP, JITTER)


def _sphere(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (np.linalg.norm(grid - np.asarray(centre), axis=-1) < radius).astype(np.uint8)


def _ct(shape, seed, dtype=np.int16, scale=1.0):
    rng = np.random.default_rng(seed)
    smooth = np.add.outer(np.add.outer(np.arange(shape[0]), np.arange(shape[1])), np.arange(shape[2]))
    return ((smooth * 3 - 200 + rng.normal(0, 5, shape)) * scale).astype(dtype)


def _save(array, path: Path, spacing=(1.2, 1.0, 1.4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def _official(root: Path, shape=(40, 36, 30)) -> Path:
    """liver/ and kidney/ hold copies of the same CT case0 with their own masks; spleen/ links to it; case1 is
    another CT of the same size and name in a second dataset folder, only in liver/."""
    image = _ct(shape, 0)
    masks = {"liver": _sphere(shape, (14, 14, 12), 7), "kidney": _sphere(shape, (27, 22, 16), 5),
             "spleen": _sphere(shape, (20, 10, 20), 4)}
    for category, mask in masks.items():
        ds = root / category / "ct_demo"
        first = root / "liver" / "ct_demo" / "imagesTr" / "case0.nii.gz"
        if category == "liver":
            _save(image, first)
        elif category == "kidney":  # a byte-identical copy, as in SA-Med3D-140K
            (ds / "imagesTr").mkdir(parents=True)
            shutil.copy(first, ds / "imagesTr" / "case0.nii.gz")
        else:
            (ds / "imagesTr").mkdir(parents=True)
            os.symlink(first, ds / "imagesTr" / "case0.nii.gz")
        _save(mask, ds / "labelsTr" / "case0.nii.gz")
    _save(_ct(shape, 1), root / "liver" / "ct_other" / "imagesTr" / "case0.nii.gz")
    _save(masks["liver"], root / "liver" / "ct_other" / "labelsTr" / "case0.nii.gz")
    return root


def _count_decodes(monkeypatch):
    calls = []
    real = pcache.decode_image

    def counting(path, spacing_mm):
        calls.append(path)
        return real(path, spacing_mm)

    monkeypatch.setattr(pcache, "decode_image", counting)
    return calls


def _tree_bytes(root: Path, follow_links: bool = False) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and (follow_links or not p.is_symlink()))


def test_each_image_is_decoded_and_stored_once(tmp_path, monkeypatch):
    root = _official(tmp_path / "data")
    cases = pdata.discover_cases([root])
    entries = pcache.plan_entries(cases)
    assert len(cases) == 4 and len(entries) == 2  # case0 in 3 class folders (2 copies + a link), case1 alone
    decodes = _count_decodes(monkeypatch)
    layout = pcache.CacheLayout(tmp_path / "cache", 1.5, MARGIN)
    pprep.prepare(cases, entries, layout)
    assert len(decodes) == 2
    files = list((layout.dir / "entries").rglob("*.smc"))
    assert len(files) == 2
    data = pdata.PreparedData(cases, tmp_path / "cache", 1.5, MARGIN)
    assert data.images == 2
    # Not larger than the source files it comes from (links not counted twice).
    assert data.nbytes <= _tree_bytes(root), (data.nbytes, _tree_bytes(root))
    # Every mask refers to its image; the targets are named by their category (class folder).
    targets = pdata.make_targets(cases, data.keys, data.counts, min_voxels=10)
    described = pdata.describe_targets(cases, targets)
    assert sorted((d["name"], d["dataset"]) for d in described) == [
        ("kidney", "ct_demo"), ("liver", "ct_demo"), ("liver", "ct_other"), ("spleen", "ct_demo")]
    assert len({data.where[t.case_index][0] for t in targets}) == 2


def test_copies_that_differ_get_their_own_image(tmp_path, monkeypatch):
    root = _official(tmp_path / "data")
    # Same dataset folder, name and size as liver's copy, other bytes (the gzip header's time stamp): planning
    # groups them, the content hash keeps them apart.
    path = root / "kidney" / "ct_demo" / "imagesTr" / "case0.nii.gz"
    raw = bytearray(path.read_bytes())
    raw[4] ^= 0xFF
    path.write_bytes(bytes(raw))
    cases = pdata.discover_cases([root])
    decodes = _count_decodes(monkeypatch)
    layout = pcache.CacheLayout(tmp_path / "cache", 1.5, MARGIN)
    pprep.prepare(cases, pcache.plan_entries(cases), layout)
    assert len(decodes) == 3


def test_compact_dtypes_keep_the_foreground(tmp_path):
    rng = np.random.default_rng(0)
    floats = rng.normal(0, 100, (8, 8, 8))
    assert pcache.storage_dtype(np.rint(floats), integer_source=True) == np.int16
    assert pcache.storage_dtype(floats, integer_source=False) == np.float16
    assert pcache.storage_dtype(floats * 1e4, integer_source=False) == np.float32  # beyond float16's range
    assert pcache.storage_dtype(np.array([-1000.0, 40000.0]), integer_source=True) == np.float16  # beyond int16
    tiny = np.array([0.3, -0.3, 0.0, 1e-9, 2.6])
    assert pcache.to_storage(tiny, np.dtype(np.int16)).tolist() == [1, 0, 0, 1, 3]
    assert (pcache.to_storage(tiny, np.dtype(np.float16)) > 0).tolist() == (tiny > 0).tolist()

    # Prepared entries: an integer CT is stored as int16, a float MRI as float16.
    for name, image in (("ct", _ct((30, 30, 30), 2)), ("mr", _ct((30, 30, 30), 3, np.float32, 0.013))):
        _save(image, tmp_path / name / "tumour" / "ds" / "imagesTr" / "c.nii.gz")
        _save(_sphere((30, 30, 30), (15, 15, 15), 6), tmp_path / name / "tumour" / "ds" / "labelsTr" / "c.nii.gz")
    cases = pdata.discover_cases([tmp_path / "ct", tmp_path / "mr"])
    layout = pcache.CacheLayout(tmp_path / "cache", 1.5, MARGIN)
    pprep.prepare(cases, pcache.plan_entries(cases), layout)
    dtypes = sorted(r["images"][0]["dtype"] for r in layout.read_progress().values())
    assert dtypes == ["float16", "int16"]


def _reference_sample(whole, label_value, seed):
    """The sample the whole-scan pipeline (``whole``: the preprocessed full scan, then crop_transforms) makes."""
    crop = Compose(crop_transforms(CROP, augment=True, jitter=JITTER, center="box"))
    crop.set_random_state(seed=seed)
    return crop({"image": whole["image"], "label": whole["label"], "label_value": label_value})


def test_samples_equal_the_whole_scan_pipeline(data_dir, tmp_path):
    """Reading only the crop's blocks from the compact cache gives the crop of the whole resampled scan: the same
    mask, and the image up to the int16 rounding (at most half a unit before the z-score)."""
    root = tmp_path / "real"
    for dataset, case in (("msd_spleen_ct", "spleen_8"), ("sct_spinalcord_mri", "t2")):
        for sub in ("imagesTr", "labelsTr"):
            (root / dataset / sub).mkdir(parents=True, exist_ok=True)
            os.symlink(data_dir / dataset / sub / f"{case}.nii.gz", root / dataset / sub / f"{case}.nii.gz")
        shutil.copy(data_dir / dataset / "dataset.json", root / dataset / "dataset.json")
    cases = pdata.discover_cases([root])
    layout = pcache.CacheLayout(tmp_path / "cache", 1.5, MARGIN)
    pprep.prepare(cases, pcache.plan_entries(cases), layout)
    data = pdata.PreparedData(cases, tmp_path / "cache", 1.5, MARGIN)
    targets = pdata.make_targets(cases, data.keys, data.counts, min_voxels=10)
    ds = pdata.TargetDataset(data, targets, CROP, augment=True, jitter=JITTER, seed=5)
    wholes = {i: Compose(preprocess_transforms(1.5, load=True))({"image": c.image, "label": c.label})
              for i, c in enumerate(cases)}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i, target in enumerate(targets):
            ours = ds[i]
            ref = _reference_sample(wholes[target.case_index], target.label_value, pdata.sample_seed(5, epoch, i))
            assert torch.equal(ours["label"], ref["label"]), (epoch, i)
            assert ours["label"].sum() > 0
            assert float((ours["image"] - ref["image"]).abs().max()) < 0.02, (epoch, i)
    # Bounded reads: a sample reads at most the blocks of its crop (plus its mask), not the whole image.
    reader = ds.reader
    reader.bytes_read = 0
    ds[0]
    assert reader.bytes_read <= 3 ** 3 * pcache.BLOCK ** 3 * 2 + 2 ** 20


def test_interrupted_preparation_resumes_without_rereading(tmp_path, monkeypatch):
    root = _official(tmp_path / "data")
    for k in range(3):  # more images, each in one class folder
        _save(_ct((24, 24, 24), 10 + k), root / "lung" / f"ct_{k}" / "imagesTr" / "c.nii.gz")
        _save(_sphere((24, 24, 24), (12, 12, 12), 5), root / "lung" / f"ct_{k}" / "labelsTr" / "c.nii.gz")
    cases = pdata.discover_cases([root])
    entries = pcache.plan_entries(cases)
    layout = pcache.CacheLayout(tmp_path / "cache", 1.5, MARGIN)
    assert len(entries) == 5

    real = pcache.prepare_entry
    calls = []

    def stop_at_third(entry, cases_, layout_):
        calls.append(entry.key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped while preparing its third image
        return real(entry, cases_, layout_)

    monkeypatch.setattr(pcache, "prepare_entry", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        pprep.prepare(cases, entries, layout, shard=0, num_shards=2)  # shard 0 of 2: entries 0, 2, 4
    assert len(layout.read_progress()) == 2
    first = layout.entry_path(entries[0].key)
    stamp = first.stat().st_mtime_ns
    with pytest.raises(pcache.CacheNotPrepared, match="not prepared for 3 of 5 images"):
        pdata.PreparedData(cases, tmp_path / "cache", 1.5, MARGIN)

    # Shard 1 of 2 runs elsewhere, independently; then shard 0 is restarted and resumes.
    monkeypatch.setattr(pcache, "prepare_entry", real)
    decodes = _count_decodes(monkeypatch)
    assert pprep.prepare(cases, entries, layout, shard=1, num_shards=2)["prepared"] == 2
    result = pprep.prepare(cases, entries, layout, shard=0, num_shards=2)
    assert result["prepared"] == 1 and result["already_done"] == 2
    assert len(decodes) == 3 and first.stat().st_mtime_ns == stamp
    # A process stopped between writing an entry and recording it: the entry is recovered from its file.
    progress = layout.progress_path(0, 2)
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # killed while writing its last line
    decodes.clear()
    result = pprep.prepare(cases, entries, layout, shard=0, num_shards=2)
    assert result["recovered"] == 1 and result["prepared"] == 0 and not decodes
    assert len(layout.read_progress()) == 5
    data = pdata.PreparedData(cases, tmp_path / "cache", 1.5, MARGIN)
    assert data.images == 5


def test_dataloader_workers_under_spawn(tmp_path):
    root = _official(tmp_path / "data")
    cases = pdata.discover_cases([root])
    pprep.prepare(cases, pcache.plan_entries(cases), pcache.CacheLayout(tmp_path / "cache", 1.5, MARGIN))
    data = pdata.PreparedData(cases, tmp_path / "cache", 1.5, MARGIN)
    targets = pdata.make_targets(cases, data.keys, data.counts, min_voxels=10)
    ds = pdata.TargetDataset(data, targets, CROP, augment=True, jitter=JITTER, seed=1)
    ds[0]  # opens files in this process: they must not travel to the workers
    pickle.dumps(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == len(ds)
    for batch in batches:
        for j, i in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["image"][j], ds[i]["image"]) and torch.equal(batch["label"][j], ds[i]["label"])


def test_collectives_get_an_explicit_timeout(monkeypatch):
    from pretrain import distributed as pdist

    seen = {}
    monkeypatch.setattr(pdist.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "1")):
        monkeypatch.setenv(key, value)
    pdist.setup("cpu", timeout_s=42)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 42


def test_training_refuses_an_unprepared_cache_and_prepare_has_help(tmp_path):
    root = _official(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "pretrain" / "train.py"), "--config", MINI, "--data", str(root),
                           "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                          cwd=str(REPO), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "not prepared for 2 of 2 images" in proc.stderr and "python -m pretrain.prepare" in proc.stderr
    assert not (tmp_path / "cache" / pcache.variant_name(1.5, MARGIN) / "entries").exists()  # nothing decoded
    proc = subprocess.run([sys.executable, "-m", "pretrain.prepare", "--help"], cwd=str(REPO), capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "--shard I/N" in proc.stdout and "resumes" in proc.stdout
