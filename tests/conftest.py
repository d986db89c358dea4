"""Shared test helpers: locating ``../shared`` (or ``$SAM_MED3D_SHARED``) and skipping clearly without it.

``REQUIRE_SHARED=1`` (set by ``.ci/run``) turns a missing ``shared`` folder into a failure instead of a skip.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures" / "sam_med3d_reference"
DATA = SHARED / "data"

torch.set_num_threads(int(os.environ.get("SAM_MED3D_TEST_THREADS", "2")))


def require(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail under ``REQUIRE_SHARED=1``) naming it."""
    if path.exists():
        return path
    reason = (f"{path} not found: the shared fixtures/data folder is expected beside the repository "
              f"(or at $SAM_MED3D_SHARED)")
    if os.environ.get("REQUIRE_SHARED") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return require(FIXTURES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA)


@pytest.fixture(scope="session")
def fill_module(fixtures_dir):
    """The fixtures' ``fill.py`` (deterministic weights and the test image), imported from ``shared``."""
    sys.path.insert(0, str(fixtures_dir))
    try:
        import fill  # noqa: WPS433 (imported from the shared folder on purpose)
    finally:
        sys.path.remove(str(fixtures_dir))
    return fill


@pytest.fixture(scope="session")
def mini_checkpoint(tmp_path_factory) -> Path:
    """A ``vit_mini`` SAM-Med3D (64^3 crop, seeded random weights) saved in our checkpoint format."""
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit_mini.pt"
    save_checkpoint(build_sam_med3d("vit_mini"), path)
    return path


def data_cases(data_root: Path):
    """(dataset, case, image path, label path) for every case under ``data_root``."""
    cases = []
    for dataset in sorted(p for p in data_root.iterdir() if (p / "imagesTr").is_dir()):
        for image in sorted((dataset / "imagesTr").glob("*.nii.gz")):
            cases.append((dataset.name, image.name[:-7], image, dataset / "labelsTr" / image.name))
    return cases
