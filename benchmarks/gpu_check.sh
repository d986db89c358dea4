#!/usr/bin/env bash
# Every GPU-only check in one command (<= 8 minutes on one GPU), one table at the end:
#   encoder fp32/bf16 fast vs reference, click latency through the server on CUDA, one fine-tuning epoch
#   through the app's trainer on CUDA, pretrain/train.py under torchrun (1 GPU, bf16) with samples/s.
# Without CUDA each check prints "<name>: skipped: CUDA is not available" and the script exits 0.
# Exit status 1 only if a check that ran failed. Arguments go to benchmarks/gpu_checks.py
# (--only NAME, --device cuda:N, --timeout-scale X, --log-dir DIR).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -f "$REPO/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$REPO/.venv/bin/activate"
fi
cd "$REPO"
exec python benchmarks/gpu_checks.py "$@"
