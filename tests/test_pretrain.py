"""pretrain/: data discovery and caching, nnU-Net conversion, config checks, and real training runs.

The training runs use ``vit_mini`` on the two smallest shared cases (sct_spinalcord_mri: 60x55x52 and 42x76x77
voxels at 1 mm) with few clicks, so the whole file takes a few minutes on 2 CPU cores:

- a real 2-process DDP run (gloo, ``torchrun --nproc_per_node=2``): finite loss, loadable checkpoint;
- overfitting one case in one process: the loss falls;
- ``--resume`` after 2 steps continues to step 4 with exactly the losses of an uninterrupted 4-step run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pretrain import cache as pcache, convert_nnunet, data as pdata, prepare as pprep  # noqa: E402
from pretrain.config import load_config  # noqa: E402

PY = sys.executable
TRAIN = str(REPO / "pretrain" / "train.py")
MINI = str(REPO / "pretrain" / "configs" / "vit_mini.yaml")
# Few clicks and one validation click keep every run to seconds per step on a loaded CPU.
# --prepare: the first run fills the shared cache (each process its shard), later runs find it prepared.
FAST = ["--set", "clicks.num_click_iterations=2", "--set", "val.clicks=1", "--set", "data.val_max_targets=2",
        "--no-progress", "--threads", "1", "--prepare"]


def _link_case(src_dataset: Path, case: str, dst_dataset: Path, with_json: bool = True) -> None:
    for sub in ("imagesTr", "labelsTr"):
        (dst_dataset / sub).mkdir(parents=True, exist_ok=True)
        os.symlink(src_dataset / sub / f"{case}.nii.gz", dst_dataset / sub / f"{case}.nii.gz")
    if with_json:
        shutil.copy(src_dataset / "dataset.json", dst_dataset / "dataset.json")


@pytest.fixture(scope="module")
def small_data(data_dir, tmp_path_factory) -> Path:
    """The two small spinal-cord cases (a dataset.json folder), linked into a temporary root."""
    root = tmp_path_factory.mktemp("small_data")
    for case in ("t2", "t1w"):
        _link_case(data_dir / "sct_spinalcord_mri", case, root / "sct_spinalcord_mri", with_json=case == "t2")
    return root


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One prepared cache for all runs of this module (the runs only read it after the first)."""
    return tmp_path_factory.mktemp("cache")


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(args, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _metrics(out: Path, kind: str = "train"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


# ------------------------------------------------------------------------------------------------ data
def test_discovery_layouts_and_targets(data_dir, tmp_path):
    # Official layout (binary masks, no dataset.json) next to a multi-class dataset.json folder.
    _link_case(data_dir / "sct_spinalcord_mri", "t2", tmp_path / "spinal_cord" / "mr_sct", with_json=False)
    _link_case(data_dir / "totalseg_mr_multiorgan", "example_mr_sm", tmp_path / "totalseg")
    cases = pdata.discover_cases([tmp_path])
    assert [c.case_id for c in cases] == ["t2", "example_mr_sm"]
    assert cases[0].classes is None and cases[1].classes[1] == "spleen"
    keys = ["a", "b"]
    counts = {"a": {"0": 100, "1": 60}, "b": {"0": 10, "1": 500, "2": 5, "7": 80}}
    targets = pdata.make_targets(cases, keys, counts, min_voxels=50)
    assert [(t.case_index, t.label_value) for t in targets] == [(0, None), (1, 1), (1, 7)]
    with pytest.raises(ValueError, match="no training cases"):
        pdata.discover_cases([tmp_path / "spinal_cord" / "mr_sct" / "imagesTr"])


def test_cache_counts_and_samples(small_data, tmp_path):
    cases = pdata.discover_cases([small_data])
    margin = pdata.max_window_margin(64, 4)
    layout = pcache.CacheLayout(tmp_path / "cache", 1.5, margin)
    with pytest.raises(pcache.CacheNotPrepared, match="not prepared for 2 of 2 images"):
        pdata.PreparedData(cases, tmp_path / "cache", spacing_mm=1.5, margin=margin)
    result = pprep.prepare(cases, pcache.plan_entries(cases), layout)
    assert result["prepared"] == 2
    data = pdata.PreparedData(cases, tmp_path / "cache", spacing_mm=1.5, margin=margin)
    counts = data.counts
    assert set(counts) == set(data.keys) and all(layout.entry_path(e.key).is_file() for e in data.entries)
    # Counts are at 1.5 mm: the 1 mm spinal-cord masks shrink by about 1.5^3.
    raw = int((np.asarray(nib.load(cases[0].label).dataobj) > 0).sum())
    assert 0.5 * raw / 3.375 < counts[data.keys[0]]["1"] < 1.5 * raw / 3.375
    targets = pdata.make_targets(cases, data.keys, counts, min_voxels=10)
    ds = pdata.TargetDataset(data, targets, crop_size=64, augment=True, jitter=4, seed=3)
    a, b = ds[0], ds[0]
    assert a["image"].shape == (1, 64, 64, 64) and a["label"].sum() > 0
    assert torch.equal(a["image"], b["image"])  # seeded per (seed, epoch, index)
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["label"], a["label"]) or not torch.equal(ds[0]["image"], a["image"])
    # A second run prepares nothing: the progress files already list every image.
    assert pprep.prepare(cases, pcache.plan_entries(cases), layout)["prepared"] == 0


def test_resumable_sampler_skips_consumed_indices():
    ds = list(range(10))
    full = list(pdata.ResumableDistributedSampler(ds, num_replicas=2, rank=1, seed=4))
    s = pdata.ResumableDistributedSampler(ds, num_replicas=2, rank=1, seed=4)
    s.set_epoch(0)
    s.set_start(2)
    assert list(s) == full[2:] and len(s) == len(full) - 2
    s.set_epoch(0)
    assert list(s) == full


def test_convert_nnunet(data_dir, tmp_path):
    raw = tmp_path / "Dataset123_Organs"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    src = data_dir / "totalseg_mr_multiorgan"
    os.symlink(src / "imagesTr" / "example_mr_sm.nii.gz", raw / "imagesTr" / "case1_0000.nii.gz")
    os.symlink(src / "labelsTr" / "example_mr_sm.nii.gz", raw / "labelsTr" / "case1.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "spleen": 1, "absent": 10, "kidneys": [2, 3]},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    out = tmp_path / "sam_layout"
    assert convert_nnunet.main([str(raw), "--output", str(out), "--link"]) == 0
    lab = np.asarray(nib.load(str(src / "labelsTr" / "example_mr_sm.nii.gz")).dataobj)
    spleen = np.asarray(nib.load(str(out / "spleen" / "mri_Organs" / "labelsTr" / "case1.nii.gz")).dataobj)
    kidneys = np.asarray(nib.load(str(out / "kidneys" / "mri_Organs" / "labelsTr" / "case1.nii.gz")).dataobj)
    assert np.array_equal(spleen, (lab == 1).astype(np.uint8))
    assert np.array_equal(kidneys, np.isin(lab, [2, 3]).astype(np.uint8))
    assert not (out / "absent").exists()  # no voxels of label 10 in this case
    assert (out / "spleen" / "mri_Organs" / "imagesTr" / "case1.nii.gz").is_symlink()
    # The converted tree is the official layout: binary targets, found by the training data discovery.
    cases = pdata.discover_cases([out])
    assert sorted(Path(c.dataset).parent.name for c in cases) == ["kidneys", "spleen"]
    assert all(c.classes is None for c in cases)


def test_config_rejects_unknown_and_bad_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: vit_mini\ntrain:\n  learning_rate: 1.0\n")
    with pytest.raises(ValueError, match="unknown config key train.'learning_rate'"):
        load_config(bad)
    bad.write_text("model: vit_mini\ntrain:\n  amp: fp8\n")
    with pytest.raises(ValueError, match="train.amp"):
        load_config(bad)
    bad.write_text("model: vit_mini\ndata:\n  crop_center: click\n")
    with pytest.raises(ValueError, match="data.crop_center"):
        load_config(bad)
    for name in ("vit_b_ori", "vit_tiny", "vit_mini"):
        cfg = load_config(REPO / "pretrain" / "configs" / f"{name}.yaml")
        assert cfg["model"] == name


def test_cli_reports_bad_data_folder(tmp_path):
    proc = subprocess.run([PY, TRAIN, "--config", MINI, "--data", str(tmp_path / "nope"), "--output",
                           str(tmp_path / "out")], cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


# ------------------------------------------------------------------------------------------------ training runs
def test_ddp_two_processes_on_cpu(small_data, shared_cache, tmp_path):
    out = tmp_path / "ddp"
    proc = _run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, "--config", MINI,
                 "--data", str(small_data), "--output", str(out), "--cache-dir", str(shared_cache),
                 "--max-steps", "2", "--device", "cpu", "--set", "train.batch_size=1", *FAST])
    assert "on 2 x cpu" in proc.stdout and "replicas in sync across 2 processes" in proc.stdout
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    from sam_med3d.checkpoint import load_model

    model = load_model(out / "last.pt")
    assert model.img_size == 64
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert (out / "best.pt").is_file() and _metrics(out, "val")


def test_torchrun_with_one_process_uses_a_process_group(small_data, shared_cache, tmp_path):
    """A single-process torchrun run goes through DDP over a process group (NCCL on a GPU, gloo here), as the
    GPU check's world-size-1 run must, instead of silently running without one."""
    out = tmp_path / "ddp1"
    proc = _run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", TRAIN, "--config", MINI,
                 "--data", str(small_data), "--output", str(out), "--cache-dir", str(shared_cache),
                 "--max-steps", "1", "--device", "cpu", "--set", "train.batch_size=1", *FAST])
    assert "on 1 x cpu (DDP, gloo process group)" in proc.stdout, proc.stdout
    assert "replicas in sync across 1 processes" in proc.stdout
    assert [r["step"] for r in _metrics(out)] == [1]


def test_plain_python_run_has_no_process_group(monkeypatch):
    from pretrain import distributed as pdist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not pdist.launched_by_torchrun()
    ctx = pdist.setup("cpu")
    assert not ctx.distributed and ctx.backend is None and ctx.device == torch.device("cpu")
    assert pdist.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
                                       "MASTER_PORT": "1"})


def test_overfitting_one_case_lowers_the_loss(data_dir, shared_cache, tmp_path):
    root = tmp_path / "one"
    _link_case(data_dir / "sct_spinalcord_mri", "t2", root / "sct")
    out = tmp_path / "overfit"
    _run([PY, TRAIN, "--config", MINI, "--data", str(root), "--output", str(out), "--cache-dir", str(shared_cache),
          "--max-steps", "16", "--set", "train.batch_size=1", "--set", "data.jitter=0", "--set", "train.lr=3e-3",
          *FAST])
    losses = [r["loss"] for r in _metrics(out)]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_resume_continues_exactly(small_data, shared_cache, tmp_path):
    common = ["--config", MINI, "--data", str(small_data), "--cache-dir", str(shared_cache), *FAST]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run([PY, TRAIN, *common, "--output", str(straight), "--max-steps", "4"])
    _run([PY, TRAIN, *common, "--output", str(resumed), "--max-steps", "2"])
    proc = _run([PY, TRAIN, *common, "--output", str(resumed), "--max-steps", "4", "--resume"])
    assert "resumed" in proc.stdout and "at step 2" in proc.stdout
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7), (ra, rb)
        assert ra["lr"] == rb["lr"]
    # Without --resume an existing run is not overwritten.
    proc = subprocess.run([PY, TRAIN, *common, "--output", str(resumed), "--max-steps", "4"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_init_and_freeze_encoder(small_data, shared_cache, tmp_path):
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import load_model, save_checkpoint

    torch.manual_seed(123)
    init = save_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "init.pt")
    out = tmp_path / "ft"
    proc = _run([PY, TRAIN, "--config", MINI, "--data", str(small_data), "--cache-dir", str(shared_cache),
                 "--output", str(out), "--max-steps", "1", "--init", str(init), "--freeze-encoder", *FAST])
    assert "initialised from" in proc.stdout
    before, after = load_model(init).state_dict(), load_model(out / "last.pt").state_dict()
    enc = [k for k in before if k.startswith("image_encoder.")]
    dec = [k for k in before if k.startswith("mask_decoder.")]
    assert all(torch.equal(before[k], after[k]) for k in enc)
    assert any(not torch.equal(before[k], after[k]) for k in dec)
