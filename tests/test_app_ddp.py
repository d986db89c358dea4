"""The app's multi-GPU training (``multi_gpu``): MONAI Label wraps the trainer's network in DDP.

Some parameters never get a gradient in a step (``prompt_encoder.no_mask_embed``: the mask prompt is always
given), which DDP refuses on the second iteration unless it looks for unused parameters. Two gloo processes run
the trainer's own network, optimizer and DDP wrapping (``BasicTrainTask._create_network_and_optimizer``, with the
trainer's DDP arguments; only the GPU ``device_ids``, which a CPU module cannot take, are dropped) and its
training step, for two iterations.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "sam_med3d"
WORLD = 2


def _worker(rank: int, checkpoint: str, result: str) -> None:
    """One rank (run as ``python tests/test_app_ddp.py RANK CHECKPOINT RESULT`` with MASTER_ADDR/PORT set)."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    sys.path[:0] = [str(APP_DIR), str(REPO / "lib")]
    from lib.trainers import sam_med3d as trainer_module
    from monailabel.tasks.train.basic_train import Context

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    real_ddp, seen = torch.nn.parallel.DistributedDataParallel, {}

    def cpu_ddp(module, device_ids=None, output_device=None, **kwargs):
        seen.update(device_ids=device_ids, **kwargs)
        return real_ddp(module, **kwargs)  # a CPU module takes no device ids; every other argument as given

    torch.nn.parallel.DistributedDataParallel = cpu_ddp
    served = SimpleNamespace(device="cpu", path=lambda: checkpoint, expected_arch="auto",
                             base=SimpleNamespace(path=checkpoint))
    trainer = trainer_module.SamMed3DTrainer(str(Path(result).parent / f"model{rank}"), served, {"spleen": 1},
                                             epochs=1, val_split=0.0, lr=1e-4, train_clicks=2, multi_gpu=True,
                                             retention=0.0)  # the teacher only adds time here
    context = Context()
    context.request, context.device, context.multi_gpu, context.local_rank = {}, torch.device("cpu"), True, rank
    context.world_size = WORLD
    # MONAI Label's own build-and-wrap step of BasicTrainTask.train(), which as a whole needs one CUDA device per
    # rank for multi_gpu (BasicTrainTask._device): the trainer's network(), optimizer() and DDP arguments.
    network, optimizer = trainer._create_network_and_optimizer(context)
    step = trainer.train_iteration_update(context).step
    n = int(network.module.sam.img_size)
    label = torch.zeros(1, 1, n, n, n)
    label[..., n // 4:n // 2, n // 4:n // 2, n // 4:n // 2] = 1
    losses = []
    for iteration in range(2):  # DDP raises at the start of the second
        image = torch.randn(1, 1, n, n, n, generator=torch.Generator().manual_seed(rank * 10 + iteration))
        out = step.train_step(network, optimizer, {"image": image, "label": label}, device=torch.device("cpu"))
        losses.append(out["loss"])
    dist.destroy_process_group()
    Path(result).write_text(json.dumps({"losses": losses, "ddp": isinstance(network, real_ddp),
                                        "find_unused_parameters": seen.get("find_unused_parameters")}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_gpu_training_survives_parameters_without_gradient(tmp_path):
    import torch
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "served.pt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(checkpoint), str(tmp_path / f"{rank}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0] * WORLD, "\n".join(log[-3000:] for log in logs)
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["ddp"] and result["find_unused_parameters"] is True
        assert len(result["losses"]) == 2


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
