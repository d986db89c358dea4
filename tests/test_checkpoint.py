"""sam_med3d.checkpoint: official / bare / DDP / our own files, safe unpickling, strict errors, URL cache.

Mini-model tests use "vit_mini" (0.7M parameters) with seeded random weights; the full "vit_b_ori" is checked
against a manifest recorded from the official code (its model registry and train.py's save call).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import pickle
import socket
import threading
from pathlib import Path
from typing import Dict, Iterator

import pytest
import torch

from sam_med3d import build_sam_med3d
from sam_med3d import checkpoint as ckpt
from sam_med3d.checkpoint import (CheckpointDownloadError, CheckpointError, CheckpointMismatchError,
                                  UnsafeCheckpointError, load_checkpoint, load_model, resolve_checkpoint,
                                  save_checkpoint)


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty download cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAM_MED3D_CACHE", str(cache))
    return cache


def mini_model(seed: int = 0):
    """vit_mini with seeded random weights (different from a freshly built model's)."""
    model = build_sam_med3d("vit_mini")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
    return model


def assert_same_weights(model, state: Dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert list(ours) == list(state)
    for name, tensor in state.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], tensor.float()), f"{name} differs"


def official_container(model, *, stepped_optimizer: bool = True, prefix: str = "") -> dict:
    """What the official train.py saves: real AdamW and MultiStepLR states and a real argparse.Namespace."""
    optimizer = torch.optim.AdamW([{"params": model.image_encoder.parameters()},
                                   {"params": model.prompt_encoder.parameters(), "lr": 8e-5},
                                   {"params": model.mask_decoder.parameters(), "lr": 8e-5}], lr=8e-4)
    if stepped_optimizer:  # one step so the state holds exp_avg / exp_avg_sq / step tensors
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        state_before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer.step()
        with torch.no_grad():  # keep the weights as they were; only the optimizer state matters here
            for k, v in model.state_dict().items():
                v.copy_(state_before[k])
        optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [120, 180], 0.1)
    args = argparse.Namespace(task_name="union_train", model_type="vit_b_ori", multi_gpu=bool(prefix),
                              gpu_ids=[0, 1], step_size=[120, 180], lr=8e-4, img_size=128, device="cuda")
    return {"epoch": 7, "model_state_dict": {prefix + k: v for k, v in model.state_dict().items()},
            "optimizer_state_dict": optimizer.state_dict(), "lr_scheduler_state_dict": scheduler.state_dict(),
            "losses": [0.9, 0.5], "dices": [0, 0], "best_loss": 0.5, "best_dice": 0.0, "args": args,
            "used_datas": ["data/train/liver/ct_WORD"]}


class _Server:
    """A local HTTP server in a thread: serves ``files`` and counts requests per path. ``/partial/<name>``
    announces the full length but sends only a tenth of the bytes, then closes the connection."""

    def __init__(self) -> None:
        self.files: Dict[str, bytes] = {}
        self.hits: Dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                partial = self.path.startswith("/partial/")
                body = server.files.get("/" + self.path.split("/")[-1] if partial else self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 10] if partial else body)
                if partial:
                    self.close_connection = True

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    yield srv
    srv.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ our own format
def test_ours_fp32_roundtrip_rebuilds_config(tmp_path):
    model = mini_model()
    path = save_checkpoint(model, tmp_path / "ours.pt", epoch=3, metrics={"dice": 0.81}, note="test")
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.img_size == 64
    assert not loaded.training
    assert_same_weights(loaded, model.state_dict())
    info = loaded.checkpoint_info
    assert info["format"] == "sam_med3d" and info["dtype"] == "float32" and info["epoch"] == 3
    assert info["extra"] == {"epoch": 3, "metrics": {"dice": 0.81}, "note": "test"}
    # the raw file is loadable with plain weights_only=True and records the format
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "sam_med3d" and raw["version"] == 1 and raw["config"] == model.config


def test_ours_fp16_halves_the_file_and_loads_as_float32(tmp_path):
    model = mini_model()
    full = save_checkpoint(model, tmp_path / "fp32.pt")
    half = save_checkpoint(model, tmp_path / "fp16.pt", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    raw = torch.load(half, map_location="cpu", weights_only=True)
    assert raw["dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in raw["model_state_dict"].values())
    loaded = load_model(half)
    assert_same_weights(loaded, {k: v.half().float() for k, v in model.state_dict().items()})
    # into an existing model too, with the metadata saying what was read
    target = build_sam_med3d("vit_mini")
    meta = load_checkpoint(target, half)
    assert meta["format"] == "sam_med3d" and meta["dtype"] == "float16" and meta["config"] == model.config
    assert_same_weights(target, {k: v.half().float() for k, v in model.state_dict().items()})


def test_fp16_refuses_values_outside_its_range(tmp_path):
    model = mini_model()
    with torch.no_grad():
        model.mask_decoder.iou_token.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight.*float16 range"):
        save_checkpoint(model, tmp_path / "x.pt", half=True)
    assert not (tmp_path / "x.pt").exists()


def test_save_rejects_non_plain_extras_and_reserved_keys(tmp_path):
    model = mini_model()
    with pytest.raises(ValueError, match=r"extra history\[1\] is a object"):
        save_checkpoint(model, tmp_path / "x.pt", history=[1, object()])
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "x.pt", config={})
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    first = mini_model(seed=1)
    save_checkpoint(first, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(mini_model(seed=2), path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left behind
    assert_same_weights(load_model(path), first.state_dict())  # previous file intact


def test_newer_format_version_is_refused(tmp_path):
    model = mini_model()
    path = tmp_path / "future.pt"
    torch.save({"format": "sam_med3d", "version": 99, "config": model.config,
                "model_state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(path)


# ----------------------------------------------------------------------------- official / bare / DDP prefix
@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_training_container(tmp_path, prefix):
    model = mini_model()
    container = official_container(model, prefix=prefix)
    assert container["optimizer_state_dict"]["state"], "the optimizer state should be populated"
    path = tmp_path / "sam_model_latest.pth"
    torch.save(container, path)
    target = build_sam_med3d("vit_mini")
    meta = load_checkpoint(target, path)
    assert_same_weights(target, model.state_dict())
    assert meta["format"] == "official" and meta["epoch"] == 7 and meta["config"] is None
    assert meta["module_prefix_stripped"] is (prefix == "module.")
    assert meta["args"]["model_type"] == "vit_b_ori" and meta["args"]["step_size"] == [120, 180]
    assert meta["best_loss"] == 0.5 and meta["path"] == str(path)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_bare_state_dict(tmp_path, prefix):
    model = mini_model()
    path = tmp_path / "bare.pth"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
    target = build_sam_med3d("vit_mini")
    meta = load_checkpoint(target, str(path))
    assert meta["format"] == "state_dict" and meta["epoch"] is None
    assert meta["module_prefix_stripped"] is (prefix == "module.")
    assert_same_weights(target, model.state_dict())


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    state = mini_model().state_dict()
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    target = build_sam_med3d("vit_mini")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(target, path)
    message = str(info.value)
    assert str(path) in message
    assert "missing in checkpoint (1)" in message and "mask_decoder.iou_token.weight" in message
    assert "unexpected in checkpoint (1)" in message and "mask_decoder.extra_head.weight" in message
    assert "shape mismatch (1)" in message and "prompt_encoder.no_mask_embed.weight: checkpoint (1, 7)" in message
    assert_same_weights(target, before)  # strict failure changes nothing
    # non-strict loads what fits and reports the rest
    meta = load_checkpoint(target, path, strict=False)
    assert meta["missing_keys"] == ["mask_decoder.iou_token.weight"]
    assert meta["unexpected_keys"] == ["mask_decoder.extra_head.weight"]
    assert len(meta["mismatched_keys"]) == 1
    assert torch.equal(target.state_dict()["image_encoder.pos_embed"], state["image_encoder.pos_embed"])


def test_mismatch_listing_is_truncated_with_counts(tmp_path):
    tiny = build_sam_med3d("vit_tiny")
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(build_sam_med3d("vit_mini"), path)
    message = str(info.value)
    assert "more" in message and "shape mismatch (" in message and "unexpected in checkpoint (" in message
    assert message.count("\n    ") <= 3 * 11  # at most ~10 names (+1 "more" line) per list


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(build_sam_med3d("vit_mini"), junk)
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"not a SAM-Med3D checkpoint.*'weights'"):
        load_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "nowhere.pth")


# -------------------------------------------------------------------------------------------- security
class _Evil:
    """Unpickling this runs a shell command (the classic malicious-checkpoint pattern)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # plain pickle.dump uses protocol 4
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"model_state_dict": mini_model().state_dict(), "args": _Evil(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(path)
    assert "system" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ URLs
def test_url_is_downloaded_once_into_the_cache(tmp_path, server, isolated_cache):
    model = mini_model()
    save_checkpoint(model, tmp_path / "ours.pt", half=True)
    server.files["/models/ours.pt"] = (tmp_path / "ours.pt").read_bytes()
    url = server.url("/models/ours.pt")
    first = load_model(url)
    second = load_model(url)
    assert server.hits == {"/models/ours.pt": 1}
    assert_same_weights(first, second.state_dict())
    cached = resolve_checkpoint(url)
    assert cached.parent == isolated_cache and cached.name.endswith("-ours.pt")
    assert cached.read_bytes() == server.files["/models/ours.pt"]
    assert [p.name for p in isolated_cache.iterdir()] == [cached.name]  # no temp files
    assert first.checkpoint_info["source"] == url


def test_unreachable_url_gives_the_offline_error(isolated_cache):
    url = f"http://127.0.0.1:{closed_port()}/x.pth"
    with pytest.raises(CheckpointDownloadError) as info:
        load_model(url)
    message = str(info.value)
    assert url in message and "offline" in message and "bundled" in message and "path" in message
    assert isinstance(info.value, RuntimeError)
    assert not isolated_cache.exists() or list(isolated_cache.iterdir()) == []


def test_partial_download_leaves_no_cache_file(tmp_path, server, isolated_cache):
    save_checkpoint(mini_model(), tmp_path / "ours.pt")
    server.files["/ours.pt"] = (tmp_path / "ours.pt").read_bytes()
    url = server.url("/partial/ours.pt")
    with pytest.raises(CheckpointDownloadError, match="incomplete"):
        resolve_checkpoint(url)
    assert list(isolated_cache.iterdir()) == []
    # the next attempt tries again rather than trusting a cached fragment
    with pytest.raises(CheckpointDownloadError):
        resolve_checkpoint(url)
    assert server.hits["/partial/ours.pt"] == 2


def test_http_error_is_reported(server):
    with pytest.raises(CheckpointDownloadError, match="HTTP 404"):
        resolve_checkpoint(server.url("/missing.pth"))


# ------------------------------------------------------------------------------------------ named models
def test_named_sources(tmp_path, monkeypatch, server, isolated_cache):
    assert ckpt.TURBO_URL.startswith("https://huggingface.co/") and ckpt.TURBO_URL.endswith("sam_med3d_turbo.pth")
    # "turbo" (also the default) is TURBO_URL, downloaded once like any URL: here the release served on 127.0.0.1.
    release = mini_model(seed=3)
    save_checkpoint(release, tmp_path / "release.pt")
    server.files["/sam_med3d_turbo.pth"] = (tmp_path / "release.pt").read_bytes()
    monkeypatch.setattr(ckpt, "TURBO_URL", server.url("/sam_med3d_turbo.pth"))
    turbo = load_model("turbo")
    assert_same_weights(turbo, release.state_dict())
    assert_same_weights(load_model(), release.state_dict())
    assert server.hits == {"/sam_med3d_turbo.pth": 1}
    assert resolve_checkpoint("turbo").read_bytes() == server.files["/sam_med3d_turbo.pth"]
    assert resolve_checkpoint("turbo", download_dir=tmp_path / "mine") == tmp_path / "mine" / "sam_med3d_turbo.pth"
    if ckpt.SAM_MED3D_URL is None:  # published on Google Drive only: the error says where
        with pytest.raises(FileNotFoundError, match="Google Drive"):
            load_model("sam_med3d")
    monkeypatch.setattr(ckpt, "BUNDLED_PATH", tmp_path / "bundled" / "sam_med3d_bundled.pt")
    with pytest.raises(FileNotFoundError, match="bundled model .* is missing"):
        load_model("bundled")
    model = mini_model()
    save_checkpoint(model, ckpt.BUNDLED_PATH, half=True)
    assert_same_weights(load_model("bundled"), {k: v.half().float() for k, v in model.state_dict().items()})


# ------------------------------------------------------------- the released checkpoints, per the official code
# tests/fixtures/official_checkpoint_manifest.json was written by benchmarks/official_checkpoint_manifest.py
# from the official repository itself (its model registry's vit_b_ori state_dict and train.py's save call),
# so these tests compare our model and loader with what the official code saves, not with our own state_dict.
OFFICIAL_MANIFEST = Path(__file__).parent / "fixtures" / "official_checkpoint_manifest.json"


def _official_manifest() -> dict:
    return json.loads(OFFICIAL_MANIFEST.read_text())


def test_our_vit_b_ori_has_the_official_state_dict_names_shapes_and_order():
    manifest = _official_manifest()
    ours = build_sam_med3d("vit_b_ori").state_dict()
    expected = [(e["name"], tuple(e["shape"]), e["dtype"]) for e in manifest["entries"]]
    found = [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in ours.items()]
    missing = sorted({e[0] for e in expected} - set(ours))
    unexpected = sorted(set(ours) - {e[0] for e in expected})
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert found == expected
    assert sum(t.numel() for t in ours.values()) == manifest["total_elements"]


def test_a_container_shaped_like_the_official_save_loads_with_every_tensor_in_place(tmp_path):
    """Built from the manifest alone: every field train.py saves, a real AdamW over the three parameter groups
    it makes (image encoder, prompt encoder, mask decoder), MultiStepLR, and ``args`` with all its options."""
    manifest = _official_manifest()
    container_spec = manifest["container"]
    assert list(container_spec["fields"]) == ["epoch", "model_state_dict", "optimizer_state_dict",
                                              "lr_scheduler_state_dict", "losses", "dices", "best_loss",
                                              "best_dice", "args", "used_datas"]
    # Each tensor a distinct constant: a tensor loaded under another name or reshaped shows.
    state = {e["name"]: torch.full(e["shape"], float(index) / 1000.0, dtype=getattr(torch, e["dtype"]))
             for index, e in enumerate(manifest["entries"])}
    groups = [g["params"].split(".")[1] for g in container_spec["optimizer"]["groups"]]
    assert groups == ["image_encoder", "prompt_encoder", "mask_decoder"]
    placeholders = {name: torch.nn.Parameter(torch.zeros(1)) for name in state}
    optimizer = torch.optim.AdamW([{"params": [p for n, p in placeholders.items() if n.startswith(g + ".")]}
                                   for g in groups], lr=8e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [120, 180], 0.1)
    options = container_spec["args_options"]
    container = {"epoch": 200, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                 "lr_scheduler_state_dict": scheduler.state_dict(), "losses": [0.41, 0.39], "dices": [0.7, 0.8],
                 "best_loss": 0.39, "best_dice": 0.8, "args": argparse.Namespace(**options),
                 "used_datas": ["data/medical_preprocessed/liver/ct_WORD"]}
    assert list(container) == list(container_spec["fields"])
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save(container, path)
    del container, optimizer, placeholders
    loaded = load_model(path)
    assert loaded.checkpoint_info["format"] == "official" and loaded.img_size == 128
    assert loaded.checkpoint_info["epoch"] == 200
    assert loaded.checkpoint_info["args"]["model_type"] == options["model_type"] == "vit_b_ori"
    ours = loaded.state_dict()
    assert list(ours) == list(state)
    for name, tensor in state.items():
        assert torch.equal(ours[name], tensor), f"{name} differs"


def test_the_official_manifest_agrees_with_the_reference_fixtures(fixtures_dir):
    """Two records made independently from the official builder list the same entries."""
    reference = json.loads((fixtures_dir / "manifest_vit_b_ori.json").read_text())
    manifest = _official_manifest()
    assert [(e["name"], e["shape"]) for e in manifest["entries"]] == \
        [(e["name"], e["shape"]) for e in reference["entries"]]
    assert manifest["total_elements"] == reference["total_state_dict_elements"]
    # Our model holds the same parameters (buffers aside, which the state dict mixes in).
    assert sum(p.numel() for p in build_sam_med3d("vit_b_ori").parameters()) == reference["total_parameters"]
