#!/usr/bin/env python3
"""Download the wheels ``benchmarks/gpu_check.sh`` installs on a machine that has only Python 3 and a CUDA torch.

Run it where PyPI is reachable, before the GPU machine is lent; the folder (ignored by git) then travels with
the working tree, which may carry at most 64 MiB:

    python3 benchmarks/gpu_check_wheels.py --python-version 3.12          # for the GPU image: its Python
    python3 benchmarks/gpu_check_wheels.py --python-version 3.11 --all   # a bare venv here (the CPU dry run)

What it does: ``pip download --no-deps`` of exactly ``benchmarks/gpu_check_requirements.txt`` for that Python
(a pure-Python package published only as a source archive is built into a wheel), leaving out the packages
the GPU image already has (:data:`GPU_IMAGE_HAS`; ``--all`` keeps them, for a machine with torch alone). Two
wheels are made smaller without changing what the checks import: MONAI Label's without its web viewers and
sample apps (``monailabel/endpoints/static``, the ``.data`` folder: the checks talk to the REST API), and
wheels above 8 MB recompressed with LZMA (pip reads any zip compression; SimpleITK's 53 MB becomes ~29 MB).
Prints each wheel's size and the total; exits 1 if the total is over 64 MiB.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "benchmarks" / "gpu_check_requirements.txt"
LIMIT_BYTES = 64 * 2 ** 20
RECOMPRESS_ABOVE = 8 * 10 ** 6
#: Distributions of the requirements that the lent GPU machines' image already has (its package list).
GPU_IMAGE_HAS = {"numpy", "scipy", "pyyaml", "tqdm", "packaging", "click", "anyio", "h11", "idna", "httpx",
                 "httpcore", "certifi", "requests", "urllib3", "charset-normalizer", "pillow", "attrs", "six", "psutil",
                 "tensorboard", "protobuf", "absl-py"}
#: Parts of MONAI Label's wheel that no check uses (viewer bundles, sample apps).
MONAILABEL_LEFT_OUT = re.compile(r"^(monailabel/endpoints/static/ohif/|monailabel-[^/]+\.data/data/)")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(all_packages: bool):
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and (all_packages or canonical(line.split("==")[0]) not in GPU_IMAGE_HAS):
            yield line


def rewrite(wheel: Path, keep=lambda name: True, compression: int = zipfile.ZIP_DEFLATED) -> None:
    """Rewrite ``wheel`` in place with the entries ``keep`` accepts (RECORD lists only those)."""
    partial = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(partial, "w", compression) as target:
        for info in source.infolist():
            if not keep(info.filename):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [row for row in data.decode().splitlines() if keep(row.split(",", 1)[0])]
                data = ("\n".join(lines) + "\n").encode()
            target.writestr(info, data, compress_type=compression)
    partial.replace(wheel)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12", help="the Python of the machine (default 3.12)")
    parser.add_argument("--dest", default=None, help="folder (default .gpu-check-wheels/cpXY)")
    parser.add_argument("--all", action="store_true", help="also the packages the GPU image already has")
    parser.add_argument("--keep-compression", action="store_true",
                        help="no LZMA recompression (quicker, larger: for a set that does not travel)")
    args = parser.parse_args(argv)
    tag = "cp" + args.python_version.replace(".", "")
    dest = Path(args.dest or REPO / ".gpu-check-wheels" / tag)
    dest.mkdir(parents=True, exist_ok=True)
    for requirement in requirements(args.all):
        name = canonical(requirement.split("==")[0])
        if any(canonical(w.name.split("-")[0]) == name for w in dest.glob("*.whl")):
            continue
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", "-d", str(dest)]
        download += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        if subprocess.run(download + [requirement]).returncode != 0:
            # No wheel published: build one from the source archive (pure Python only, so any machine's does).
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, requirement],
                               check=True)
                built = list(Path(tmp).glob("*.whl"))
                if not all(w.name.endswith("-none-any.whl") for w in built):
                    raise SystemExit(f"{requirement}: no wheel for Python {args.python_version}, and its source "
                                     "builds a platform wheel")
                for w in built:
                    w.replace(dest / w.name)
    for wheel in dest.glob("monailabel-*.whl"):
        rewrite(wheel, keep=lambda name: not MONAILABEL_LEFT_OUT.match(name))
    for wheel in [] if args.keep_compression else dest.glob("*.whl"):
        if wheel.stat().st_size > RECOMPRESS_ABOVE:
            with zipfile.ZipFile(wheel) as z:
                done = all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist())
            if not done:
                rewrite(wheel, compression=zipfile.ZIP_LZMA)
    sizes = sorted((w.stat().st_size, w.name) for w in dest.glob("*.whl"))
    for size, name in sizes:
        print(f"{size / 2 ** 20:8.2f} MiB  {name}")
    total = sum(size for size, _ in sizes)
    print(f"{total / 2 ** 20:8.2f} MiB  in all, {len(sizes)} wheels in {dest} (limit {LIMIT_BYTES / 2 ** 20:.0f} MiB)")
    return 0 if total <= LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
