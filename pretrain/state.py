"""Checkpoints of a training run, for exact resume.

Two files per checkpoint, both written atomically (temporary file in the same folder, fsync, ``os.replace``):

- ``last.pt`` / ``best.pt``: the model in the package format (:func:`sam_med3d.checkpoint.save_checkpoint`,
  records ``model.config``), loadable with ``sam_med3d.load_model(path)`` and by the MONAI Label app. Extra
  keys: ``step``, ``epoch``, ``train_config``, ``metrics``.
- ``last_state.pt``: everything else needed to continue exactly: optimizer, LR scheduler, GradScaler,
  ``step`` / ``epoch`` / micro-batches consumed in the epoch, best validation Dice, and each rank's RNG states
  (python, numpy, torch, cuda). Written after ``last.pt``; both carry ``step``, and resume refuses a pair whose
  steps differ (a crash between the two writes).

All tensors/primitives: both files load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from sam_med3d.checkpoint import atomic_torch_save

STATE_NAME = "last_state.pt"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors/primitives (weights_only-safe)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(out_dir: Path, *, step: int, epoch: int, batch_in_epoch: int, optimizer, scheduler,
                        scaler, best_val_dice: float, rng_states: List[Dict[str, Any]], world_size: int,
                        train_config: Dict[str, Any]) -> Path:
    """Write ``last_state.pt`` (see the module docstring)."""
    payload = {
        "format": "sam_med3d_train_state", "version": 1,
        "step": int(step), "epoch": int(epoch), "batch_in_epoch": int(batch_in_epoch),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "best_val_dice": float(best_val_dice), "rng": rng_states, "world_size": int(world_size),
        "train_config": train_config,
    }
    return atomic_torch_save(payload, Path(out_dir) / STATE_NAME)


def load_training_state(out_dir: Path) -> Optional[Dict[str, Any]]:
    """``last_state.pt`` checked against ``last.pt`` (same step), or None when there is nothing to resume."""
    out_dir = Path(out_dir)
    state_path, model_path = out_dir / STATE_NAME, out_dir / LAST_NAME
    if not state_path.is_file():
        return None
    if not model_path.is_file():
        raise ValueError(f"cannot resume: {state_path} exists but {model_path} is missing")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model_meta = torch.load(model_path, map_location="cpu", weights_only=True)
    if int(model_meta.get("step", -1)) != int(state["step"]):
        raise ValueError(f"cannot resume: {model_path} is at step {model_meta.get('step')} but {state_path} at step "
                         f"{state['step']} (a run stopped between the two writes); delete the newer one's partner "
                         "or start a new --output")
    return state
