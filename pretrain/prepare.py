#!/usr/bin/env python
"""Prepare the training cache of ``pretrain/train.py``: decode, reorient and resample every image once.

    python -m pretrain.prepare --config pretrain/configs/vit_b_ori.yaml --data DIR [DIR ...] --cache-dir CACHE
    python -m pretrain.prepare ... --shard 3/16      # the 4th of 16 independent processes (any machines)
    python -m pretrain.prepare ... --status          # how much is prepared; changes nothing

Run it once before training (as nnU-Net's plan-and-preprocess). The work is split into N shards by
``--shard I/N``: start one process per shard, on one machine or many that see the same data and cache folder
(same relative paths inside each data folder); they share no process group and never wait for each other.
Every finished image is written atomically and recorded in the shard's progress file, so a stopped process
resumes where it stopped (rerun the same command; a different N works too). Training checks the cache at
start-up and refuses, naming what is missing, until every shard has finished.

The config supplies the spacing (``data.spacing_mm``) and, through the model's crop size and
``data.jitter``, how far around the masks a crop can reach; the cache folder holds one variant per such
setting. See docs/pretrain.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python pretrain/prepare.py` puts pretrain/ (not the repo) on sys.path
    sys.path.insert(0, str(REPO))

from torch.utils.data import DataLoader, Dataset  # noqa: E402

from pretrain import cache as pcache  # noqa: E402
from pretrain import data as pdata  # noqa: E402
from pretrain.config import load_config, merge_overrides  # noqa: E402


def cache_settings(cfg: Dict[str, Any]) -> Tuple[float, int]:
    """(spacing in mm, margin in voxels) of the cache a config trains on."""
    from sam_med3d.build import resolve_config

    crop_size = int(resolve_config(cfg["model"])["image_encoder"]["img_size"])
    return float(cfg["data"]["spacing_mm"]), pdata.max_window_margin(crop_size, int(cfg["data"]["jitter"]))


def parse_shard(text: str) -> Tuple[int, int]:
    """``"3/16"`` -> ``(3, 16)``."""
    try:
        shard, total = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects I/N (e.g. 0/4), got {text!r}") from None
    if total < 1 or not 0 <= shard < total:
        raise ValueError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return shard, total


class _PrepareEntries(Dataset):
    """Prepares one entry per item (in a DataLoader worker or in this process); returns its progress record."""

    def __init__(self, entries: Sequence[pcache.Entry], cases: Sequence[pdata.Case],
                 layout: pcache.CacheLayout) -> None:
        self.entries, self.cases, self.layout = list(entries), list(cases), layout

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> str:
        return json.dumps(pcache.prepare_entry(self.entries[i], self.cases, self.layout))


def _keep(item: Any) -> Any:
    return item


def prepare(cases: Sequence[pdata.Case], entries: Sequence[pcache.Entry], layout: pcache.CacheLayout,
            shard: int = 0, num_shards: int = 1, workers: int = 0, progress: bool = False) -> Dict[str, Any]:
    """Prepare this shard's entries that no progress file lists yet. Returns counts and timings."""
    t0 = time.perf_counter()
    done = layout.read_progress()
    mine = pcache.shard_of(entries, shard, num_shards)
    todo: List[pcache.Entry] = []
    recovered = 0
    for entry in mine:
        if entry.key in done:
            continue
        record = pcache.recover_record(layout, entry.key)  # written, but stopped before its progress line
        if record is not None:
            layout.append_progress(shard, num_shards, record)
            recovered += 1
        else:
            todo.append(entry)
    prepared, nbytes = 0, 0
    if todo:
        loader = DataLoader(_PrepareEntries(todo, cases, layout), batch_size=None, num_workers=int(workers),
                            collate_fn=_keep)
        if progress:
            from tqdm import tqdm

            loader = tqdm(loader, total=len(todo), desc=f"preparing shard {shard}/{num_shards}", unit="image")
        for line in loader:
            record = json.loads(line)
            layout.append_progress(shard, num_shards, record)
            prepared += 1
            nbytes += int(record["bytes"])
    return {"shard": shard, "num_shards": num_shards, "entries_in_shard": len(mine),
            "already_done": len(mine) - len(todo) - recovered, "recovered": recovered, "prepared": prepared,
            "bytes_written": nbytes, "seconds": time.perf_counter() - t0}


def status(entries: Sequence[pcache.Entry], layout: pcache.CacheLayout) -> Dict[str, Any]:
    records = layout.read_progress()
    ready = [records[e.key] for e in entries if e.key in records]
    return {"cache": str(layout.dir), "images": len(entries), "prepared": len(ready),
            "missing": len(entries) - len(ready), "bytes": sum(int(r["bytes"]) for r in ready)}


def command_hint(config: str, data: Sequence[str], cache_dir: str) -> str:
    return (f"prepare it first: python -m pretrain.prepare --config {config} --data {' '.join(map(str, data))} "
            f"--cache-dir {cache_dir} [--shard I/N]")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.prepare", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the YAML config training will use (pretrain/configs/*.yaml): "
                                                    "spacing, model crop size and jitter decide the cache variant")
    p.add_argument("--data", required=True, nargs="+", help="data folder(s), as given to train.py")
    p.add_argument("--cache-dir", required=True, help="cache folder, as given to train.py --cache-dir")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="prepare only shard I of N (0-based; default 0/1 = everything); start one process per shard")
    p.add_argument("--workers", type=int, default=0,
                   help="decoding processes inside this process (DataLoader workers; default 0: decode here)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value as train.py does (e.g. --set data.spacing_mm=1.5)")
    p.add_argument("--status", action="store_true", help="only report how much of the cache is prepared")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        shard, num_shards = parse_shard(args.shard)
        cfg = load_config(args.config, merge_overrides(args.overrides))
        spacing, margin = cache_settings(cfg)
        t0 = time.perf_counter()
        cases = pdata.discover_cases(args.data)
        entries = pcache.plan_entries(cases)
        index_s = time.perf_counter() - t0
        layout = pcache.CacheLayout(args.cache_dir, spacing, margin)
        print(f"{len(cases)} masks of {len(entries)} images under {' '.join(args.data)} (indexed in {index_s:.1f} s); "
              f"cache {layout.dir}", flush=True)
        if not args.status:
            result = prepare(cases, entries, layout, shard, num_shards, args.workers, not args.no_progress)
            print(f"shard {shard}/{num_shards}: {result['prepared']} images prepared "
                  f"({result['bytes_written'] / 2 ** 20:.1f} MiB) in {result['seconds']:.1f} s, "
                  f"{result['already_done'] + result['recovered']} already done", flush=True)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = status(entries, layout)
    if state["missing"]:
        print(f"cache: {state['prepared']} of {state['images']} images prepared; {state['missing']} remain "
              f"(other shards, or rerun to resume)", flush=True)
    else:
        print(f"cache complete: {state['images']} images, {state['bytes'] / 2 ** 20:.1f} MiB; training can start",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
