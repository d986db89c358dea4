"""Benchmark the SAM-Med3D image encoder: fast vs reference attention, plus one prompt+decode step.

Usage::

    .venv/bin/python benchmarks/encoder.py                 # vit_b_ori, CPU (2 threads), and CUDA if present
    .venv/bin/python benchmarks/encoder.py --runs 3 --model vit_tiny --no-cuda
    .venv/bin/python benchmarks/encoder.py --compile       # also time the fast path under torch.compile
    .venv/bin/python benchmarks/encoder.py --threads 1,2   # CPU rows for each thread count

Every (device, dtype, implementation) is measured in its own subprocess, so the peak-memory figure is that
configuration's alone: on CPU the kernel's high-water mark of the process RSS (``ru_maxrss``) minus the RSS
just before the first forward pass; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated
before it. Encoder times are the median (and the minimum, the least disturbed by other processes on a shared
machine) over ``--runs`` runs after ``--warmup`` warm-up runs; ``vs ref`` compares medians. The encoder input is a
random ``(1, 1, S, S, S)`` crop; decode is one click plus the previous low-res mask (a typical refinement
step), so it does not depend on the attention implementation. ``max |diff|`` compares each embedding with
the float32 reference embedding of the same device; bf16 runs use ``torch.autocast``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, KiB on Linux


def _times(fn: Callable[[], object], runs: int, warmup: int, sync: Callable[[], None]) -> List[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def worker(args: argparse.Namespace) -> None:
    """Measure one configuration; writes a JSON result to ``args.result`` and the embedding to ``args.embedding``."""
    from sam_med3d import build_sam_med3d

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.checkpoint:
        from sam_med3d.checkpoint import load_model
        model = load_model(args.checkpoint, device=str(device))
    else:
        model = build_sam_med3d(args.model).to(device)
    model.eval()
    encoder = model.image_encoder
    compile_ = args.impl == "fast+compile"
    encoder.set_attention_impl("fast" if compile_ else args.impl, compile=compile_)
    size = model.img_size
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, size, size, size, generator=gen).to(device)
    low = size // 4
    points = (torch.tensor([[[size / 2, size / 2, size / 2]]], device=device),
              torch.ones(1, 1, dtype=torch.int64, device=device))
    mask_input = torch.randn(1, 1, low, low, low, generator=gen).to(device)
    is_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def encode() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return encoder(image)

    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    else:
        mem_before = _rss_bytes()
    compile_start = time.perf_counter()
    embedding = encode()          # also the compile run under --compile; counted as warm-up
    sync()
    first_call = time.perf_counter() - compile_start
    encode_times = _times(encode, args.runs, max(0, args.warmup - 1), sync)
    peak = (torch.cuda.max_memory_allocated() if is_cuda else _peak_rss_bytes()) - mem_before

    def decode() -> None:
        with torch.no_grad(), autocast:
            model.decode(embedding, points=points, mask_input=mask_input, multimask_output=False)

    decode_s = statistics.median(_times(decode, args.runs, args.warmup, sync))
    torch.save(embedding.float().cpu(), args.embedding)
    result = {"encode_s": statistics.median(encode_times), "encode_min_s": min(encode_times),
              "decode_s": decode_s, "peak_bytes": peak, "first_call_s": first_call}
    Path(args.result).write_text(json.dumps(result))


def run_config(args: argparse.Namespace, device: str, threads: int, dtype: str, impl: str, tmp: Path
               ) -> Optional[Dict]:
    """Run :func:`worker` in a fresh interpreter; returns its result plus the embedding, or None on failure."""
    stem = tmp / f"{device}-{threads}-{dtype}-{impl}"
    cmd = [sys.executable, __file__, "--worker", "--device", device, "--dtype", dtype, "--impl", impl,
           "--model", args.model, "--threads", str(threads), "--runs", str(args.runs),
           "--warmup", str(args.warmup), "--result", f"{stem}.json", "--embedding", f"{stem}.pt"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{device} {dtype} {impl}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(Path(f"{stem}.json").read_text())
    result["embedding"] = torch.load(f"{stem}.pt", weights_only=True)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b_ori", help="configuration name (sam_med3d.build.CONFIGS)")
    parser.add_argument("--checkpoint", default=None, help="optional weights (path/URL/name for load_model)")
    parser.add_argument("--threads", default="2",
                        help="CPU threads (torch.set_num_threads); a comma list such as 1,2 gives rows for each")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--no-cuda", action="store_true", help="skip the GPU rows even when CUDA is available")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU rows")
    parser.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    # internal: one measurement in a subprocess
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="fast", choices=("fast", "reference", "fast+compile"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--embedding", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        thread_counts = [int(t) for t in str(args.threads).split(",")]
    except ValueError:
        raise ValueError(f"--threads must be an integer or a comma list of integers, got {args.threads!r}") from None
    if args.runs < 1 or args.warmup < 0 or min(thread_counts) < 1:
        raise ValueError(f"--runs and --threads must be >= 1 and --warmup >= 0, got runs={args.runs}, "
                         f"threads={args.threads}, warmup={args.warmup}")
    args.threads = thread_counts[0]
    if args.worker:
        worker(args)
        return

    impls = ["reference", "fast"] + (["fast+compile"] if args.compile else [])
    plan = []
    if not args.no_cpu:
        plan += [("cpu", t, "fp32", impl) for t in thread_counts for impl in impls]
    if torch.cuda.is_available() and not args.no_cuda:
        plan += [("cuda", thread_counts[0], dtype, impl) for dtype in ("fp32", "bf16") for impl in impls]
    gpu = f", GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() and not args.no_cuda else ""
    print(f"model {args.model}, torch {torch.__version__}, CPU threads {','.join(map(str, thread_counts))}{gpu}; "
          f"median of {args.runs} runs after {args.warmup} warm-up")
    header = (f"| {'device':7} | {'dtype':5} | {'attention':12} | {'encoder s':>9} | {'min s':>7} | {'vs ref':>6} | "
              f"{'decode s':>8} | {'peak MB':>8} | {'max abs diff':>12} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    results: Dict[tuple, Dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for device, threads, dtype, impl in plan:
            res = run_config(args, device, threads, dtype, impl, Path(tmp))
            if res is None:
                continue
            label = f"cpu/{threads}t" if device == "cpu" else device
            results[(label, dtype, impl)] = res
            ref = results.get((label, "fp32", "reference"))
            same_dtype_ref = results.get((label, dtype, "reference"))
            ratio = f"{res['encode_s'] / same_dtype_ref['encode_s']:.2f}x" if same_dtype_ref else "-"
            diff = f"{(res['embedding'] - ref['embedding']).abs().max().item():.1e}" if ref else "-"
            print(f"| {label:7} | {dtype:5} | {impl:12} | {res['encode_s']:9.3f} | {res['encode_min_s']:7.3f} | "
                  f"{ratio:>6} | "
                  f"{res['decode_s']:8.3f} | {res['peak_bytes'] / 2**20:8.0f} | {diff:>12} |", flush=True)
    if any(k[2] == "fast+compile" for k in results):
        for key, res in results.items():
            if key[2] == "fast+compile":
                print(f"torch.compile first call on {key[0]} {key[1]}: {res['first_call_s']:.1f} s")


if __name__ == "__main__":
    main()
