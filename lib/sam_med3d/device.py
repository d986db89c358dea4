"""What running on a GPU changes compared with the CPU, in one place: TF32 and asynchronous kernels.

- TF32: on Ampere and later GPUs PyTorch runs cuDNN convolutions in TF32 by default (a 10-bit mantissa, about
  5e-4 relative error), and matmuls too once anything turns ``allow_tf32`` on. Where the project claims to
  reproduce the float32 reference (the predictor, so the app and the evaluator; the GPU encoder check),
  :func:`disable_tf32` turns both off. Pretraining keeps TF32 for speed.
- Timers: CUDA kernels run asynchronously, so a timer stopped right after a call measures only the launch;
  :func:`synchronize` waits for the work queued on the given device first (a no-op on the CPU).

The legacy ``allow_tf32`` flags are used throughout the project: PyTorch refuses to read them once the newer
``fp32_precision`` settings were mixed in.
"""

from __future__ import annotations

from typing import Union

import torch


def disable_tf32() -> None:
    """Run float32 convolutions (cuDNN) and matmuls (cuBLAS) in full float32 in this process."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def synchronize(device: Union[str, torch.device]) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA); nothing to wait for elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
