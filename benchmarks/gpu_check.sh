#!/usr/bin/env bash
# Every GPU-only check in one command (about 5 minutes on one GPU), one table at the end:
#   encoder fp32/bf16 fast vs reference, click latency through the server on CUDA, one fine-tuning epoch
#   through the app's trainer on CUDA, pretrain/train.py under torchrun (1 GPU, bf16) with samples/s.
# Without CUDA each check prints "<name>: skipped: CUDA is not available" and the script exits 0.
# Exit status 1 only if a check that ran failed. Arguments go to benchmarks/gpu_checks.py
# (--only NAME, --device cuda:N, --timeout-scale X, --log-dir DIR, --cpu-dry-run).
#
# Runs on a machine that has only Python 3 and a CUDA torch (a lent GPU machine):
#   - beforehand, where PyPI is reachable: `bash benchmarks/gpu_check.sh --fetch-wheels --python-version 3.12`
#     puts the wheels of benchmarks/gpu_check_requirements.txt into .gpu-check-wheels/cp312 (ignored by git,
#     it travels with the working tree: benchmarks/gpu_check_wheels.py prints its size);
#   - there, the packages that python3 lacks are installed from that folder into outputs/gpu_check/site, a
#     small venv (outputs/gpu_check/venv) sees python3's packages, that folder and lib/ (torchrun's children
#     too), and holds the `monailabel` launcher the server helpers start;
#   - the scan the server checks need is a generated stand-in when ../shared/data is not there.
# Environment: GPU_CHECK_PYTHON (default: the repository's .venv if present, else python3), GPU_CHECK_WHEELS
# (default .gpu-check-wheels/cpXY for that Python), GPU_CHECK_HOME (default outputs/gpu_check).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${GPU_CHECK_PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$REPO/.venv/bin/python3" ]; then PY="$REPO/.venv/bin/python3"; else PY=python3; fi
fi
if [ "${1:-}" = "--fetch-wheels" ]; then
    shift
    exec "$PY" benchmarks/gpu_check_wheels.py "$@"
fi
HOME_DIR="${GPU_CHECK_HOME:-$REPO/outputs/gpu_check}"
TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.gpu-check-wheels/$TAG}"
SITE="$HOME_DIR/site"
VENV="$HOME_DIR/venv"
mkdir -p "$SITE"

# 1. The wheels of distributions this Python does not have yet (nothing to do on a fully set-up machine).
missing="$(PYTHONPATH="$SITE" "$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")) if Path(sys.argv[1]).is_dir() else []:
    try:
        md.distribution(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower())
    except md.PackageNotFoundError:
        print(wheel)
EOF
)"
if [ -n "$missing" ]; then
    echo "installing $(echo "$missing" | wc -l) wheel(s) from $WHEELS into $SITE" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" $missing
fi

# 2. A venv over this Python's packages, the installed wheels and lib/: the interpreter every check and every
#    child (server, training subprocess, torchrun workers) runs with; the server helpers start its launcher.
if [ ! -x "$VENV/bin/python3" ]; then
    "$PY" -m venv --without-pip "$VENV"
fi
rm -f "$VENV"/lib/python*/site-packages/sam_med3d_gpu_check.pth   # rewritten below, for this machine
PURELIB="$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" - "$SITE" "$PURELIB/sam_med3d_gpu_check.pth" <<'EOF'
import site
import sys
from pathlib import Path

dirs = [sys.argv[1]] + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
# One "import" line: .pth files run it, and addsitedir also reads those folders' own .pth files.
Path(sys.argv[2]).write_text(f"import site; list(map(site.addsitedir, {dirs!r}))\n")
EOF
cat > "$VENV/bin/monailabel" <<'EOF'
#!/usr/bin/env bash
exec "${MONAILABEL_PYEXE:-$(dirname "$0")/python3}" -m monailabel.main "$@"
EOF
chmod +x "$VENV/bin/monailabel"

export PYTHONPATH="$REPO/lib${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_HOME="$HOME_DIR"
exec "$VENV/bin/python3" benchmarks/gpu_checks.py "$@"
