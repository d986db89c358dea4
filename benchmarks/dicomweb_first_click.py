#!/usr/bin/env python
"""First click on a DICOMweb study, as OHIF sends it: with and without the app's background prefetch.

Starts Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, 127.0.0.1, a free port) holding the 512x512x32
spleen CT of ``../shared/data/msd_spleen_ct`` as a DICOM series (one file per slice), then, for each repeat
and each mode, a fresh MONAI Label server in DICOMweb mode with an empty cache:

- ``prefetch 0``: the click arrives right after the server answers ``/info/`` and pays for the series
  download and the DICOM -> volume conversion (what every first click paid before);
- ``prefetch 16`` (the default): the server downloads and converts the series in the background at start;
  the benchmark waits until that is done (as a user opening OHIF after the server started would), then clicks.

``--scan ct300`` uses the 512x512x300 CT of ``benchmarks/app_latency.py`` instead (300 DICOM files), for the
first click on a thin-slice study.

The click is OHIF's request (``POST /infer/sam_med3d?image=<SeriesInstanceUID>&output=image``, NRRD/uint8,
no ``label`` key). Printed, seconds, mean (min): the click's round trip, the server's own total for it, and
for the prefetch mode the time from ``/info/`` answering to the series being ready.

    python benchmarks/dicomweb_first_click.py                  # bundled model (the offline default)
    python benchmarks/dicomweb_first_click.py --checkpoint /path/to/sam_med3d_turbo.pth --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server and Orthanc helpers shared with the tests

from app_helpers import copy_app, start_server  # noqa: E402
from dicomweb_helpers import orthanc_missing, start_orthanc, write_ct_series  # noqa: E402

SPLEEN = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared")) / "data" / "msd_spleen_ct"
READY_TIMEOUT_S = 300.0


#: OHIF's click (i, j, k of the DICOM series, rows along +x, columns along +y in LPS) inside the spleen, per scan.
CLICKS = {"spleen32": [129, 292, 18], "ct300": [129, 292, 173]}


def _ohif_click(url: str, series_uid: str, click=CLICKS["spleen32"]) -> Dict[str, float]:
    """OHIF's Point Prompts request for one spleen click (``output=json`` to get the server's split).

    Returns the round trip and the server's timings (``load``: reading the cached volume; ``predict``: the
    model; ``write``: the NRRD; ``total``). Without prefetch, MONAI Label fetches the series before the task
    runs, so that wait is in the round trip but not in the server's total.
    """
    params = {"background": [], "spleen": [list(click)], "result_extension": ".nrrd", "result_dtype": "uint8",
              "result_compress": False, "restore_label_idx": False}
    start = time.perf_counter()
    response = requests.post(f"{url}/infer/sam_med3d", params={"image": series_uid, "output": "json"},
                             files={"params": (None, json.dumps(params))}, timeout=600)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    timings = response.json().get("timings", {})
    return {"click round trip": elapsed, **{f"server {k}": float(timings.get(k, 0.0))
                                            for k in ("load", "predict", "write", "total")}}


def _series_cached(log: Path) -> Dict[str, float]:
    """Download and conversion seconds from the datastore's log line (``download X s, conversion Y s``)."""
    found = re.findall(r"download ([0-9.]+) s, conversion ([0-9.]+) s", log.read_text(errors="replace"))
    return {"series download": float(found[-1][0]), "series conversion": float(found[-1][1])} if found else {}


def _one_run(root: Path, orthanc_url: str, series_uid: str, checkpoint: str, prefetch: int,
             click=CLICKS["spleen32"]) -> Dict[str, float]:
    run = Path(tempfile.mkdtemp(prefix=f"prefetch{prefetch}_", dir=root))
    log = run / "server.log"
    server = start_server(copy_app(run / "app"), orthanc_url,
                          {"checkpoint": checkpoint, "prefetch": str(prefetch)}, log,
                          env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(run / "cache")})
    try:
        result: Dict[str, float] = {}
        if prefetch:
            start = time.perf_counter()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while "cached as" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the prefetch did not finish within {READY_TIMEOUT_S} s")
                time.sleep(0.1)
            result["series ready after start"] = time.perf_counter() - start
        result.update(_ohif_click(server.url, series_uid, click))
        result.update(_series_cached(log))
        return result
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="bundled", help="--conf checkpoint for the server (default bundled)")
    parser.add_argument("--repeats", type=int, default=2, help="servers started per mode (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument("--scan", choices=tuple(CLICKS), default="spleen32",
                        help="spleen32: the shared 512x512x32 CT (default); ct300: app_latency's 512x512x300 CT")
    args = parser.parse_args()

    image = SPLEEN / "imagesTr" / "spleen_8.nii.gz"
    if not image.is_file():
        parser.error(f"{image} not found: the shared data folder is expected beside the repository "
                     "(or at $SAM_MED3D_SHARED)")
    missing = orthanc_missing()
    if missing:
        parser.error(missing)
    root = Path(tempfile.mkdtemp(prefix="dicomweb_first_click_"))
    orthanc = None
    try:
        if args.scan == "ct300":
            sys.path.insert(0, str(REPO / "benchmarks"))
            from app_latency import make_scan

            (root / "scan").mkdir()
            image = make_scan("ct300", root / "scan")
        files = write_ct_series(image, root / "ct")
        orthanc = start_orthanc(root / "orthanc")
        orthanc.upload(files)
        import pydicom

        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        load_before = os.getloadavg()[0]
        runs: Dict[int, List[Dict[str, float]]] = {0: [], 16: []}
        for _ in range(args.repeats):
            for prefetch in runs:
                runs[prefetch].append(_one_run(root, orthanc.dicomweb, series_uid, args.checkpoint, prefetch,
                                               CLICKS[args.scan]))
                print(f"prefetch {prefetch:2d}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[prefetch][-1].items()),
                      flush=True)

        def cell(values: List[float]) -> str:
            return f"{statistics.mean(values):7.2f} ({min(values):6.2f})" if values else f"{'-':>15}"

        rows = ("series ready after start", "series download", "series conversion", "click round trip",
                "server load", "server predict", "server write", "server total")
        print(f"\nFirst OHIF click on a DICOMweb study ({args.scan}, {len(files)} files; {args.checkpoint}, "
              f"{args.repeats} repeats, load average "
              f"{load_before:.1f} at start), seconds, mean (min):\n")
        print(f"| {'':<25} | {'prefetch 0':>15} | {'prefetch 16':>15} |")
        print(f"|{'-' * 27}|{'-' * 17}|{'-' * 17}|")
        for row in rows:
            print(f"| {row:<25} | " + " | ".join(cell([r[row] for r in runs[p] if row in r]) for p in runs) + " |")
        return 0
    finally:
        if orthanc is not None:
            orthanc.stop()
        if args.keep:
            print(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
