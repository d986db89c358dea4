"""Training configuration: YAML files in ``pretrain/configs/`` merged over :data:`DEFAULTS`, validated.

Sections: ``model`` (a name in ``sam_med3d.CONFIGS`` or a config dict), ``seed``, ``data``, ``train``,
``clicks``, ``val``, ``log``. Every key a file may set appears in :data:`DEFAULTS`; an unknown key is an error
(a typo would otherwise be silently ignored).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

import yaml

DEFAULTS: Dict[str, Any] = {
    "model": "vit_b_ori",
    "seed": 0,
    "data": {
        "spacing_mm": 1.5,          # isotropic training voxel size (mm)
        "jitter": 16,               # max random offset (voxels per axis) of the crop centre from the target centre
        "crop_center": "box",       # crop centre: box = target's bounding-box centre (official), voxel = a random
                                    # voxel of the target (as the app centres its crop on a first click)
        "min_target_voxels": 1000,  # smaller targets (voxels at spacing_mm) are skipped
        "val_fraction": 0.05,       # whole cases held out for validation (0: validate on training targets)
        "val_max_targets": 64,      # validation targets used at most
        "num_workers": 4,           # DataLoader workers per process
        "memory_cases": 4,          # masks and open cache files kept per worker (LRU)
    },
    "train": {
        "batch_size": 2,            # per process
        "grad_accum": 1,            # micro-batches per optimizer step
        "epochs": 100,
        "lr": 8.0e-4,
        "decoder_lr_scale": 0.1,    # lr factor of the prompt encoder and mask decoder (official: 0.1)
        "weight_decay": 0.1,
        "betas": [0.9, 0.999],
        "warmup_steps": 0,          # linear warm-up (optimizer steps)
        "milestones": [],           # lr x gamma at each milestone
        "milestone_unit": "step",   # "epoch" or "step"; step values < 1 are fractions of the total steps
        "gamma": 0.1,
        "grad_clip": 0.0,           # max global grad norm; 0 = off
        "amp": "bf16",              # bf16 | fp16 | none; GPU only (CPU trains in float32)
        "freeze_encoder": False,
    },
    "clicks": {
        "num_click_iterations": 11,  # int, or [low, high] drawn per micro-batch
        "mask_only_iterations": True,
        "detach_mask_prompt": False,
        "iou_loss_weight": 0.0,
        "mode": "random",            # random (official) | center
    },
    "val": {
        "every_steps": 500,          # 0: only at the end
        "clicks": 5,
        "batch_size": 2,
    },
    "log": {
        "every_steps": 10,
        "checkpoint_every_steps": 500,  # 0: only at the end
    },
}

_AMP = ("bf16", "fp16", "none")


def _merge(base: Dict[str, Any], override: Mapping[str, Any], where: str) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"unknown config key {where}{key!r}; known keys: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and key != "model":
            if not isinstance(value, Mapping):
                raise ValueError(f"config section {where}{key!r} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Check value ranges; raises ValueError naming the key. Returns ``cfg``."""
    from sam_med3d.build import CONFIGS

    model = cfg["model"]
    if isinstance(model, str) and model not in CONFIGS:
        raise ValueError(f"config model {model!r} is not a known SAM-Med3D model ({', '.join(sorted(CONFIGS))}) "
                         "nor a config dict")
    t, c, d = cfg["train"], cfg["clicks"], cfg["data"]
    for key in ("batch_size", "grad_accum", "epochs"):
        if int(t[key]) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {t[key]}")
    if float(t["lr"]) <= 0:
        raise ValueError(f"train.lr must be > 0, got {t['lr']}")
    if t["amp"] not in _AMP:
        raise ValueError(f"train.amp must be one of {_AMP}, got {t['amp']!r}")
    if t["milestone_unit"] not in ("epoch", "step"):
        raise ValueError(f"train.milestone_unit must be 'epoch' or 'step', got {t['milestone_unit']!r}")
    n = c["num_click_iterations"]
    lo, hi = (n, n) if isinstance(n, int) else (tuple(n) if len(n) == 2 else (0, 0))
    if not 1 <= int(lo) <= int(hi):
        raise ValueError(f"clicks.num_click_iterations must be an int >= 1 or [low, high], got {n!r}")
    if c["mode"] not in ("random", "center"):
        raise ValueError(f"clicks.mode must be 'random' or 'center', got {c['mode']!r}")
    if float(d["spacing_mm"]) <= 0:
        raise ValueError(f"data.spacing_mm must be > 0, got {d['spacing_mm']}")
    if int(d["jitter"]) < 0:
        raise ValueError(f"data.jitter must be >= 0, got {d['jitter']}")
    if d["crop_center"] not in ("box", "voxel"):
        raise ValueError(f"data.crop_center must be 'box' or 'voxel', got {d['crop_center']!r}")
    if not 0 <= float(d["val_fraction"]) < 1:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {d['val_fraction']}")
    return cfg


def load_config(path: Union[str, Path], overrides: Mapping[str, Any] = ()) -> Dict[str, Any]:
    """Read a YAML config, merge it over :data:`DEFAULTS` (then ``overrides``) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found (see pretrain/configs/)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"config file {path} must hold a YAML mapping, got {type(raw).__name__}")
    cfg = _merge(DEFAULTS, raw, "")
    cfg = _merge(cfg, dict(overrides), "")
    return validate(cfg)


def parse_override(text: str) -> Dict[str, Any]:
    """``"train.lr=1e-4"`` -> ``{"train": {"lr": 1e-4}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    dotted, value = text.split("=", 1)
    keys: List[str] = dotted.strip().split(".")
    out: Dict[str, Any] = {}
    node = out
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = yaml.safe_load(value)
    return out


def merge_overrides(items: List[str]) -> Dict[str, Any]:
    """Merge several ``--set`` items into one nested dict."""
    out: Dict[str, Any] = {}

    def put(dst: Dict[str, Any], src: Mapping[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
                put(dst[k], v)
            else:
                dst[k] = v

    for item in items:
        put(out, parse_override(item))
    return out
