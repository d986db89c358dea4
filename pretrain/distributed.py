"""Process-group setup for ``torchrun`` (single node or multi-node) and plain single-process runs.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through its
rendezvous). Under ``torchrun`` a process group is always created, also for a world size of 1, so that a
single-GPU ``torchrun`` run goes through the same NCCL + DDP code as a multi-GPU one. A plain ``python
pretrain/train.py`` (none of torchrun's variables) runs as one process with no process group. The backend
follows the device: NCCL when each process has a CUDA GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Mapping, Optional

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when this process is in a process group (launched by torchrun, any world size)."""
        return self.backend is not None


def launched_by_torchrun(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether torchrun (or another ``env://`` launcher) started this process: it sets all of these."""
    environ = os.environ if environ is None else environ
    return all(key in environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


#: Default timeout of every collective. torch's own default (10 minutes for NCCL) is implicit; a run states its own.
DEFAULT_TIMEOUT_S = 1800.0


def setup(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Initialise from torchrun's environment (``env://``); ``device``: ``auto`` | ``cpu`` | ``cuda`` (each
    process on the GPU of its local rank) | ``cuda:N`` (one process per node, on GPU N).
    ``timeout_s``: how long any collective may wait for the other processes before it fails."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    index = None
    if device.startswith("cuda:") and device[5:].isdigit():
        index, device = int(device[5:]), "cuda"
        if local_world > 1:
            raise ValueError(f"--device cuda:{index} names one GPU but {local_world} processes run on this node; "
                             "use --device cuda (each process takes the GPU of its local rank)")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {'cuda' if index is None else f'cuda:{index}'} was requested but no CUDA GPU "
                         "is visible")
    if use_cuda:
        index = local_rank if index is None else index
        if index >= torch.cuda.device_count():
            raise ValueError(f"GPU {index} (local rank {local_rank}) does not exist: only {torch.cuda.device_count()} "
                             "visible; start at most that many processes per node (--nproc_per_node)")
        # The current device: every allocation, synchronize and NCCL call without a device goes to this GPU.
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world, device=dev)
    if world > 1 or launched_by_torchrun():
        ctx.backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=ctx.backend, timeout=timedelta(seconds=float(timeout_s)), **kwargs)
    return ctx


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_gather_object(ctx: DistContext, obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(ctx: DistContext, values: List[float]) -> List[float]:
    """Element-wise sum of ``values`` over ranks (float64 on the process's device)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()

