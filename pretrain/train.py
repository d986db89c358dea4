#!/usr/bin/env python
"""Train SAM-Med3D from scratch (or fine-tune it) with the paper's click-iteration recipe, on 1..N processes.

    torchrun --nproc_per_node=N pretrain/train.py --config pretrain/configs/vit_b_ori.yaml \
        --data DIR [DIR ...] --output OUT [--resume] [--max-steps K] [--init PATH|URL] [--freeze-encoder]
    python pretrain/train.py ...            # one process, no torchrun needed

Multi-node: the same command on every node with torchrun's rendezvous options, e.g.
``torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=JOB ...``.

Outputs in OUT: ``last.pt`` / ``best.pt`` (models, ``sam_med3d.load_model(path)``), ``last_state.pt`` (resume
state), ``metrics.jsonl`` (one JSON object per logged step / validation), ``tb/`` (TensorBoard),
``config.yaml`` (the merged config), ``targets.json`` (the training/validation targets).

The data must be prepared first (``python -m pretrain.prepare``, same ``--config``, ``--data`` and
``--cache-dir``); an unprepared cache is refused, naming what is missing, unless ``--prepare`` (small data:
each process prepares its share at start-up). See docs/pretrain.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python pretrain/train.py` puts pretrain/ (not the repo) on sys.path
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pretrain import cache as pcache  # noqa: E402
from pretrain import data as pdata  # noqa: E402
from pretrain import distributed as pdist  # noqa: E402
from pretrain import state as pstate  # noqa: E402
from pretrain.config import load_config, merge_overrides  # noqa: E402
from sam_med3d.build import build_sam_med3d, resolve_config  # noqa: E402
from sam_med3d.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from sam_med3d.training import ClickIterationModel, default_loss, run_click_iterations  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (pretrain/configs/*.yaml)")
    p.add_argument("--data", required=True, nargs="+", help="data folder(s): official, dataset.json or nnU-Net layout")
    p.add_argument("--output", required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last_state.pt + OUT/last.pt if present")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (in total)")
    p.add_argument("--init", default=None, help="initial weights: checkpoint path or URL (any format "
                                                "sam_med3d.load_checkpoint reads; e.g. the turbo URL)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the prompt encoder and mask decoder")
    p.add_argument("--cache-dir", default=None, help="prepared cache (pretrain/prepare.py; default OUT/cache)")
    p.add_argument("--prepare", action="store_true",
                   help="prepare what the cache lacks before training (each process its share, then it waits for "
                        "the others' files); without it an unprepared cache is refused")
    p.add_argument("--prepare-wait-s", type=float, default=3600.0,
                   help="with --prepare: how long a process waits for the other processes' shards")
    p.add_argument("--collective-timeout-s", type=float, default=1800.0,
                   help="timeout of every collective (gradient sync, barriers, checkpoint gathers): a process "
                        "that waits longer for another fails instead of hanging")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda (GPU = local rank) or cuda:N "
                                                     "(one process per node, on GPU N)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process "
                                                            "(default: CPU count / processes on the node)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ pieces
def build_optimizer(sam: torch.nn.Module, cfg: Dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW; the image encoder at ``lr``, prompt encoder + mask decoder at ``lr * decoder_lr_scale`` (official)."""
    t = cfg["train"]
    lr = float(t["lr"])
    groups = []
    for module, scale in ((sam.image_encoder, 1.0), (sam.prompt_encoder, float(t["decoder_lr_scale"])),
                          (sam.mask_decoder, float(t["decoder_lr_scale"]))):
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * scale})
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(t["betas"]), weight_decay=float(t["weight_decay"]))


def milestone_steps(cfg: Dict[str, Any], steps_per_epoch: int, total_steps: int) -> List[int]:
    """Milestones in optimizer steps (epochs x steps per epoch, or steps; step values < 1 are fractions)."""
    t = cfg["train"]
    out = []
    for m in t["milestones"]:
        if t["milestone_unit"] == "epoch":
            out.append(int(round(float(m) * steps_per_epoch)))
        else:
            out.append(int(round(float(m) * total_steps)) if float(m) < 1 else int(m))
    return sorted(out)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, milestones: List[int], gamma: float):
    """Linear warm-up over ``warmup`` steps, then x ``gamma`` at each milestone (stepped per optimizer step)."""

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        return w * gamma ** sum(step >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def click_iterations(spec: Any, rng: np.random.Generator) -> int:
    if isinstance(spec, (list, tuple)):
        return int(rng.integers(int(spec[0]), int(spec[1]) + 1))
    return int(spec)


def amp_context(ctx: pdist.DistContext, amp: str):
    if ctx.device.type != "cuda" or amp == "none":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def new_log_window() -> Dict[str, Any]:
    """Empty sums of the training metrics logged every ``log.every_steps`` steps, timed from now."""
    return {"loss": 0.0, "seg_loss": 0.0, "dice": 0.0, "n": 0, "samples": 0, "t0": time.perf_counter()}


class MetricsLog:
    """``OUT/metrics.jsonl`` + TensorBoard scalars, rank 0 only. On resume, lines after the resumed step are
    dropped (they belong to progress that the checkpoint does not contain)."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: Optional[int]) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=(resume_step + 1) if resume_step else None)
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    def write(self, record: Dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def validate(sam: torch.nn.Module, dataset: Optional[pdata.TargetDataset], cfg: Dict[str, Any],
             ctx: pdist.DistContext) -> Optional[float]:
    """Mean Dice after ``val.clicks`` simulated clicks over the validation targets (sharded over ranks)."""
    if dataset is None or len(dataset) == 0:
        return None
    sam.eval()
    v = cfg["val"]
    mine = list(range(ctx.rank, len(dataset), ctx.world_size))
    total, count = 0.0, 0.0
    for start in range(0, len(mine), int(v["batch_size"])):
        idx = mine[start:start + int(v["batch_size"])]
        items = [dataset[i] for i in idx]
        image = torch.stack([it["image"] for it in items]).to(ctx.device)
        label = torch.stack([it["label"] for it in items]).to(ctx.device)
        rng = np.random.default_rng([int(cfg["seed"]), 7919, idx[0]])  # the same clicks at every validation
        with amp_context(ctx, cfg["train"]["amp"]):
            out = run_click_iterations(sam, image, label, int(v["clicks"]), rng, mask_only_iterations=False,
                                       click_mode=cfg["clicks"]["mode"])
        total += float(out["dice_per_item"].sum())
        count += len(idx)
    sam.train()
    total, count = pdist.all_reduce_sum(ctx, [total, count])
    return total / max(count, 1.0)


def open_prepared(args: argparse.Namespace, cfg: Dict[str, Any], ctx: pdist.DistContext,
                  out_dir: Path) -> pdata.PreparedData:
    """The cases and their prepared cache. Refuses (CacheNotPrepared, naming what is missing) an unprepared
    cache, unless ``--prepare``: then each process prepares its share (shard rank/world, no collective) and
    waits for the cache files of the others, up to ``--prepare-wait-s``."""
    from pretrain import prepare as pprep

    spacing, margin = pprep.cache_settings(cfg)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_dir / "cache"
    cases = pdata.discover_cases(args.data)
    hint = pprep.command_hint(args.config, args.data, str(cache_dir)) + " (or pass --prepare)"
    if not args.prepare:
        return pdata.PreparedData(cases, cache_dir, spacing, margin, hint=hint)
    layout = pcache.CacheLayout(cache_dir, spacing, margin)
    entries = pcache.plan_entries(cases)
    pprep.prepare(cases, entries, layout, ctx.rank, ctx.world_size, workers=int(cfg["data"]["num_workers"]),
                  progress=ctx.is_main and not args.no_progress)
    deadline = time.monotonic() + float(args.prepare_wait_s)
    while True:
        try:
            return pdata.PreparedData(cases, cache_dir, spacing, margin, hint=hint)
        except pcache.CacheNotPrepared:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def prepare_data(args: argparse.Namespace, cfg: Dict[str, Any], ctx: pdist.DistContext, out_dir: Path,
                 crop_size: int):
    """Open the prepared cache (see :func:`open_prepared`), build train/val target datasets."""
    d = cfg["data"]
    t0 = time.perf_counter()
    prepared = open_prepared(args, cfg, ctx, out_dir)
    cases, counts = prepared.cases, prepared.counts
    if ctx.is_main:
        print(f"cache {prepared.layout.dir}: {len(cases)} masks of {prepared.images} images, "
              f"{prepared.nbytes / 2 ** 20:.1f} MiB, opened in {time.perf_counter() - t0:.1f} s", flush=True)
    train_cases, val_cases = pdata.split_cases(len(cases), float(d["val_fraction"]), int(cfg["seed"]))
    min_vox = int(d["min_target_voxels"])
    all_targets = pdata.make_targets(cases, prepared.keys, counts, min_vox)
    train_set, val_set = set(train_cases), set(val_cases)
    train_targets = [t for t in all_targets if t.case_index in train_set]
    if val_cases:
        val_targets = [t for t in all_targets if t.case_index in val_set]
    else:  # no held-out cases: validate on (a fixed subset of) the training targets, unaugmented
        val_targets = list(train_targets)
    rng = np.random.default_rng(int(cfg["seed"]))
    if len(val_targets) > int(d["val_max_targets"]):
        keep = sorted(rng.choice(len(val_targets), int(d["val_max_targets"]), replace=False).tolist())
        val_targets = [val_targets[i] for i in keep]
    if not train_targets:
        raise ValueError(f"no training targets with >= {min_vox} voxels at {d['spacing_mm']} mm in {args.data} "
                         f"({len(cases)} cases); lower data.min_target_voxels or add data")
    train_ds = pdata.TargetDataset(prepared, train_targets, crop_size, augment=True, jitter=int(d["jitter"]),
                                   seed=int(cfg["seed"]), memory_cases=int(d["memory_cases"]),
                                   center=str(d["crop_center"]))
    # Validation on the crops inference sees (the official pipeline), from the original files.
    val_ds = pdata.OfficialValidationDataset(cases, val_targets, crop_size) if val_targets else None
    if ctx.is_main:
        (out_dir / "targets.json").write_text(json.dumps(
            {"train": pdata.describe_targets(cases, train_targets),
             "val": pdata.describe_targets(cases, val_targets),
             "val_is_training_data": not val_cases}, indent=1))
    return train_ds, val_ds


def save_all(out_dir: Path, sam, optimizer, scheduler, scaler, cfg, ctx, *, step: int, epoch: int,
             batch_in_epoch: int, best_val_dice: float, metrics: Dict[str, Any]) -> None:
    """``last.pt`` then ``last_state.pt`` (collective: every rank must call it, for the RNG states)."""
    rngs = pdist.all_gather_object(ctx, pstate.rng_state())
    if ctx.is_main:
        save_checkpoint(sam, out_dir / pstate.LAST_NAME, step=step, epoch=epoch, train_config=cfg, metrics=metrics)
        pstate.save_training_state(out_dir, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                                   optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                   best_val_dice=best_val_dice, rng_states=rngs, world_size=ctx.world_size,
                                   train_config=cfg)
    pdist.barrier(ctx)


# ------------------------------------------------------------------------------------------------ main
def train(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = load_config(args.config, merge_overrides(args.overrides))
    if args.freeze_encoder:
        cfg["train"]["freeze_encoder"] = True
    ctx = pdist.setup(args.device, timeout_s=args.collective_timeout_s)
    try:
        return _train(args, cfg, ctx)
    finally:
        pdist.cleanup(ctx)


def _train(args: argparse.Namespace, cfg: Dict[str, Any], ctx: pdist.DistContext) -> Dict[str, Any]:
    t, c = cfg["train"], cfg["clicks"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(ctx.local_world_size, 1))
    torch.set_num_threads(threads)
    seed = int(cfg["seed"])
    np.random.seed(seed + ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(args.output)
    if not args.resume and (out_dir / pstate.LAST_NAME).exists():  # checked on every rank: no rank waits alone
        raise ValueError(f"{out_dir} already holds a run (last.pt); pass --resume to continue it or choose another "
                         "--output")
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    pdist.barrier(ctx)
    resume_state = pstate.load_training_state(out_dir) if args.resume else None

    # The data first: an unprepared cache is refused before anything else is built.
    crop_size = int(resolve_config(cfg["model"])["image_encoder"]["img_size"])
    train_ds, val_ds = prepare_data(args, cfg, ctx, out_dir, crop_size)
    # Seeded after the data (whose loaders draw from torch's RNG): the same initial weights whether or not this
    # run prepared anything, and on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(seed)
    sam = build_sam_med3d(cfg["model"])
    if resume_state is not None:
        load_checkpoint(sam, out_dir / pstate.LAST_NAME)
    elif args.init:
        meta = load_checkpoint(sam, args.init)
        if ctx.is_main:
            print(f"initialised from {args.init} ({meta['format']} format)", flush=True)
    if t["freeze_encoder"]:
        sam.image_encoder.requires_grad_(False)
    sam.to(ctx.device).train()
    net: torch.nn.Module = ClickIterationModel(
        sam, loss_fn=default_loss(), mask_only_iterations=bool(c["mask_only_iterations"]),
        detach_mask_prompt=bool(c["detach_mask_prompt"]), iou_loss_weight=float(c["iou_loss_weight"]),
        click_mode=c["mode"])
    if ctx.distributed:
        # Some parameters get no gradient in a given step (no_mask_embed: the mask prompt is always given;
        # the IoU head without its loss; the negative-point embedding without negative clicks).
        net = DDP(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                  find_unused_parameters=True)

    bs, accum = int(t["batch_size"]), int(t["grad_accum"])
    sampler = pdata.ResumableDistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank,
                                                shuffle=True, seed=seed)
    micro_per_epoch = sampler.num_samples // bs
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_ds)} training targets are too few for one optimizer step per epoch with "
                         f"batch_size {bs} x grad_accum {accum} x {ctx.world_size} processes; lower them")
    total_steps = int(args.max_steps) if args.max_steps else int(t["epochs"]) * steps_per_epoch
    optimizer = build_optimizer(sam, cfg)
    scheduler = build_scheduler(optimizer, int(t["warmup_steps"]),
                                milestone_steps(cfg, steps_per_epoch, total_steps), float(t["gamma"]))
    use_fp16 = ctx.device.type == "cuda" and t["amp"] == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)

    step, epoch, batch_in_epoch, best = 0, 0, 0, -1.0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if resume_state["scaler"]:
            scaler.load_state_dict(resume_state["scaler"])
        step, epoch = int(resume_state["step"]), int(resume_state["epoch"])
        batch_in_epoch, best = int(resume_state["batch_in_epoch"]), float(resume_state["best_val_dice"])
        if int(resume_state["world_size"]) == ctx.world_size:
            pstate.set_rng_state(resume_state["rng"][ctx.rank])
        elif ctx.is_main:
            print(f"note: resuming with {ctx.world_size} processes, the checkpoint had "
                  f"{resume_state['world_size']}: the sample order differs from an uninterrupted run", flush=True)
        if ctx.is_main:
            print(f"resumed {out_dir} at step {step} (epoch {epoch}, micro-batch {batch_in_epoch})", flush=True)
    elif args.resume and ctx.is_main:
        print(f"nothing to resume in {out_dir}: starting from scratch", flush=True)

    if ctx.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        n_params = sum(p.numel() for p in sam.parameters())
        print(f"{cfg['model'] if isinstance(cfg['model'], str) else 'custom'} ({n_params / 1e6:.2f}M params) on "
              f"{ctx.world_size} x {ctx.device.type}"
              f"{f' (DDP, {ctx.backend} process group)' if ctx.distributed else ''}; {len(train_ds)} training targets, "
              f"{len(val_ds) if val_ds else 0} validation; {steps_per_epoch} steps/epoch, {total_steps} steps",
              flush=True)
    log = MetricsLog(out_dir, ctx.is_main, step if resume_state is not None else None)
    bar = None
    if ctx.is_main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    v_every, ck_every, log_every = (int(cfg["val"]["every_steps"]), int(cfg["log"]["checkpoint_every_steps"]),
                                    max(1, int(cfg["log"]["every_steps"])))
    window = new_log_window()
    last_record: Dict[str, Any] = {}
    done = step >= total_steps
    while not done:  # total_steps bounds the loop: every epoch makes steps_per_epoch > 0 steps
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        sampler.set_start(batch_in_epoch * bs)
        loader = DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=int(cfg["data"]["num_workers"]),
                            drop_last=True, pin_memory=ctx.device.type == "cuda",
                            persistent_workers=False)
        micro = batch_in_epoch
        usable = steps_per_epoch * accum  # accumulation groups never straddle epochs
        for batch in loader:
            if micro >= usable:
                break
            image = batch["image"].to(ctx.device, non_blocking=True)
            label = batch["label"].to(ctx.device, non_blocking=True)
            # Click randomness derives from (seed, rank, step, micro-batch): identical after a resume.
            rng = np.random.default_rng([seed, ctx.rank, step, micro % accum])
            sync = (micro + 1) % accum == 0
            no_sync = net.no_sync() if (ctx.distributed and not sync) else nullcontext()
            with no_sync:
                with amp_context(ctx, t["amp"]):
                    out = net(image, label, click_iterations(c["num_click_iterations"], rng), rng)
                scaler.scale(out["loss"] / accum).backward()
            window["loss"] += float(out["loss"].detach())
            window["seg_loss"] += out["seg_loss"]
            window["dice"] += out["dice"]
            window["n"] += 1
            window["samples"] += image.shape[0] * ctx.world_size
            micro += 1
            if not sync:
                continue
            scaler.unscale_(optimizer)
            grad_norm = None
            if float(t["grad_clip"]) > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(sam.parameters(), float(t["grad_clip"])))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            batch_in_epoch = micro
            if bar is not None:
                bar.update(1)

            if step % log_every == 0 or step == total_steps:
                loss_sum, seg_sum, dice_sum, n = pdist.all_reduce_sum(
                    ctx, [window["loss"], window["seg_loss"], window["dice"], float(window["n"])])
                elapsed = time.perf_counter() - window["t0"]
                record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss_sum / n,
                          "seg_loss": seg_sum / n, "dice": dice_sum / n,
                          "lr": float(scheduler.get_last_lr()[0]), "samples_per_s": window["samples"] / elapsed}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if ctx.device.type == "cuda":
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30
                record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # rank 0
                log.write(record)
                last_record = record
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", dice=f"{record['dice']:.3f}")
                window = new_log_window()

            final = step >= total_steps
            if (v_every and step % v_every == 0) or final:
                val_dice = validate(sam, val_ds, cfg, ctx)
                if val_dice is not None:
                    log.write({"kind": "val", "step": step, "epoch": epoch, "val_dice": val_dice}, prefix="val")
                    if val_dice > best:
                        best = val_dice
                        if ctx.is_main:
                            save_checkpoint(sam, out_dir / pstate.BEST_NAME, step=step, epoch=epoch,
                                            train_config=cfg, metrics={"val_dice": val_dice})
            if (ck_every and step % ck_every == 0) or final:
                save_all(out_dir, sam, optimizer, scheduler, scaler, cfg, ctx, step=step, epoch=epoch,
                         batch_in_epoch=batch_in_epoch, best_val_dice=best,
                         metrics={k: v for k, v in last_record.items() if isinstance(v, (int, float))})
            if final:
                done = True
                break
        if done:
            break
        epoch += 1
        batch_in_epoch = 0
    if bar is not None:
        bar.close()
    log.close()
    if ctx.distributed:  # DDP keeps replicas identical; a difference would mean a broken gradient sync
        checksum = float(sum(p.detach().double().sum() for p in sam.parameters()))
        sums = pdist.all_gather_object(ctx, checksum)
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"model replicas diverged across processes (parameter sums {sums})")
        if ctx.is_main:
            print(f"replicas in sync across {ctx.world_size} processes", flush=True)
    return {"step": step, "epoch": epoch, "best_val_dice": best, "last": last_record}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = train(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"finished": result["step"], "best_val_dice": result["best_val_dice"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
