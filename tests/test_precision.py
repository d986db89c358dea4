"""Numerical precision settings that GPUs change and a CPU does not show by itself.

- Under bf16 autocast the prompt encoder's positional encoding (projection, sin, cos) must stay float32: in bf16
  its error (up to ~0.15) exceeds the change a one-voxel shift of a click makes, so training under autocast would
  see other click positions than float32 inference. CPU autocast casts matmul to bf16 as CUDA autocast does.
- Where the project claims fidelity to the float32 reference (the predictor on a scan, the GPU encoder check),
  TF32 must be off for both cuDNN convolutions (on by default in PyTorch) and matmul: TF32 keeps a 10-bit
  mantissa (~5e-4 relative error), enough to flip boundary voxels against the CPU.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def prompt_encoder():
    from sam_med3d import build_sam_med3d

    torch.manual_seed(0)
    return build_sam_med3d("vit_mini").prompt_encoder.eval()


def test_point_encoding_under_bf16_autocast_equals_float32(prompt_encoder):
    n = prompt_encoder.input_image_size[0]
    # Clicks all over the crop, including pairs one voxel apart.
    points = torch.tensor([[[3.0, 7.0, 11.0], [4.0, 7.0, 11.0], [n - 2.0, n / 2, 1.0], [n / 3, n - 1.0, n / 5]]])
    labels = torch.tensor([[1, 1, 0, 1]])
    with torch.no_grad():
        reference, _ = prompt_encoder((points, labels), None, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast, _ = prompt_encoder((points, labels), None, None)
        one_voxel = (prompt_encoder.pe_layer.forward_with_coords(points[:, :1], prompt_encoder.input_image_size)
                     - prompt_encoder.pe_layer.forward_with_coords(points[:, 1:2], prompt_encoder.input_image_size))
    assert autocast.dtype == torch.float32
    # The encoding of a click moves by this much for one voxel; the autocast error must be far below it.
    assert float(one_voxel.abs().max()) > 0.05
    torch.testing.assert_close(autocast, reference, atol=1e-6, rtol=1e-6)


def test_dense_positional_encoding_under_bf16_autocast_equals_float32(prompt_encoder):
    with torch.no_grad():
        reference = prompt_encoder.get_dense_pe()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = prompt_encoder.get_dense_pe()
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, reference, atol=1e-6, rtol=1e-6)


def test_positional_encoding_keeps_float64():
    from sam_med3d.modeling.prompt_encoder import PositionEmbeddingRandom3D

    layer = PositionEmbeddingRandom3D(8).double()
    coords = torch.rand(2, 5, 3, dtype=torch.float64)
    assert layer.encode(coords).dtype == torch.float64


@pytest.fixture
def tf32_on():
    """TF32 on for cuDNN and matmul, as PyTorch's default (cuDNN) or a training run (both) leaves it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_the_predictor_runs_without_tf32(tf32_on):
    """The predictor (the app's clicks, the evaluator) reproduces the float32 reference: no TF32 anywhere."""
    from sam_med3d import Sam3DPredictor, build_sam_med3d

    Sam3DPredictor(build_sam_med3d("vit_mini"), device="cpu")
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_the_gpu_encoder_check_runs_without_tf32(tf32_on, monkeypatch):
    """The GPU check's fp32 fast-vs-reference tolerance (1e-4) assumes full float32 convolutions and matmuls."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.py"
    spec = importlib.util.spec_from_file_location("gpu_checks", path)
    gpu_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_checks)
    seen = {}

    def stop_after_setup(arch):  # the worker builds the model right after its precision settings
        seen["flags"] = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        raise KeyboardInterrupt

    monkeypatch.setattr("sam_med3d.build_sam_med3d", stop_after_setup)
    with pytest.raises(KeyboardInterrupt):
        gpu_checks.worker_encoder("cpu", "vit_mini")
    assert seen["flags"] == (False, False)
