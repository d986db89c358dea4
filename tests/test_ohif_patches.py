"""The OHIF served at ``/ohif/`` (``apps/sam_med3d/lib/ohif``): the bundled build, patched, not rebuilt.

These tests fail loudly when the OHIF inside the installed monailabel wheel is not the build the patches were
written for (another monailabel version): then follow ``docs/ohif_upgrade.md``.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest

from app_helpers import APP_DIR


@pytest.fixture(scope="module")
def ohif():
    sys.path.insert(0, str(APP_DIR))
    try:
        return importlib.import_module("lib.ohif")
    finally:
        sys.path.remove(str(APP_DIR))


def test_the_bundled_panel_chunk_is_the_one_the_patches_were_written_for(ohif):
    import hashlib

    chunk = ohif.bundle_dir() / ohif.PANEL_CHUNK
    assert chunk.exists(), (f"{chunk} is missing: the installed monailabel bundles another OHIF build; "
                            "see docs/ohif_upgrade.md")
    digest = hashlib.sha256(chunk.read_bytes()).hexdigest()
    assert digest == ohif.PANEL_CHUNK_SHA256, (f"{chunk.name} changed (SHA-256 {digest}); the panel patches were "
                                               "written for monailabel 0.8.5: see docs/ohif_upgrade.md")
    patched = ohif.patch_chunk(chunk.read_text(encoding="utf-8"))
    for what, old, new in ohif.CHUNK_PATCHES:
        assert new in patched, what
    assert "window.samMed3d.saveLabel(this)" in patched


def test_a_patch_that_does_not_fit_is_refused(ohif):
    text = (ohif.bundle_dir() / ohif.PANEL_CHUNK).read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="SHA-256"):
        ohif.patch_chunk(text.replace("Next Sample", "Next sample"))


def test_files_served_at_ohif(ohif, tmp_path):
    files = ohif.OhifFiles()
    assert files.patched
    chunk, _ = files.resolve(ohif.PANEL_CHUNK)
    assert b"samMed3dSave" in chunk
    config, _ = files.resolve("app-config.js")
    text = config.decode("utf-8")
    assert text.index("window.config") < text.index("window.samMed3d =")
    # Everything else is the bundle's own file; unknown paths are the single-page app.
    content, path = files.resolve("index.html")
    assert content is None and path == ohif.bundle_dir() / "index.html"
    assert files.resolve("monai-label")[1].name == "index.html"
    assert files.resolve("../../../../etc/passwd")[1].name == "index.html"


def test_an_unpatchable_bundle_is_served_as_it_is(ohif, tmp_path):
    root = tmp_path / "ohif"
    root.mkdir()
    (root / "index.html").write_text("<html></html>")
    (root / "app-config.js").write_text("window.config = {};")
    (root / ohif.PANEL_CHUNK).write_text("// another build")
    files = ohif.OhifFiles(root)
    assert not files.patched and files.overrides == {}
    assert files.resolve("app-config.js") == (None, root / "app-config.js")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (syntax check of the JavaScript)")
def test_the_patched_chunk_and_the_additions_are_valid_javascript(ohif, tmp_path):
    files = ohif.OhifFiles()
    for name in (ohif.PANEL_CHUNK, "app-config.js"):
        path = tmp_path / name
        path.write_bytes(files.overrides[name])
        result = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
