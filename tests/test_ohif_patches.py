"""The OHIF served at ``/ohif/`` (``apps/sam_med3d/lib/ohif``): the bundled build, patched, not rebuilt.

These tests fail loudly when the OHIF inside the installed monailabel wheel is not the build the patches were
written for (another monailabel version): then follow ``docs/ohif_upgrade.md``.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from app_helpers import app_module


@pytest.fixture(scope="module")
def ohif():
    return app_module("lib.ohif")


@pytest.mark.parametrize("name", ["3933.bundle.92d0a0e9bc7e6861b7c9.js", "app.bundle.af87d1dd396d277eac89.js"])
def test_the_bundled_files_are_the_ones_the_patches_were_written_for(ohif, name):
    import hashlib

    assert name in ohif.PATCHED_FILES
    path = ohif.bundle_dir() / name
    assert path.exists(), (f"{path} is missing: the installed monailabel bundles another OHIF build; "
                           "see docs/ohif_upgrade.md")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected, patches = ohif.PATCHED_FILES[name]
    assert digest == expected, (f"{name} changed (SHA-256 {digest}); the patches were written for monailabel "
                                "0.8.5: see docs/ohif_upgrade.md")
    patched = ohif.patch_file(name, path.read_bytes().decode("utf-8"))
    for what, old, new in patches:
        assert new in patched and (new or old not in patched), what


def test_the_panel_gets_save_and_the_segmentation_mode_loses_export(ohif):
    files = ohif.OhifFiles()
    assert b"window.samMed3d.saveLabel(this)" in files.overrides[ohif.PANEL_CHUNK]
    app = files.overrides[ohif.APP_BUNDLE].decode("utf-8")
    assert "t('Export DICOM SEG')" not in app.replace("title: t('Export DICOM SEG')", "")
    assert app.count("Download DICOM SEG") >= 3


def test_a_patch_that_does_not_fit_is_refused(ohif):
    text = (ohif.bundle_dir() / ohif.PANEL_CHUNK).read_bytes().decode("utf-8")
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
    (root / ohif.APP_BUNDLE).write_text("// another build")
    files = ohif.OhifFiles(root)
    assert not files.patched and files.overrides == {}
    assert files.resolve("app-config.js") == (None, root / "app-config.js")


def test_the_patched_chunk_and_the_additions_are_valid_javascript(ohif, tmp_path):
    if shutil.which("node") is None:
        message = "node is not installed (syntax check of the OHIF JavaScript; Debian package nodejs)"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    files = ohif.OhifFiles()
    for name in (ohif.PANEL_CHUNK, "app-config.js"):  # the main bundle (15 MB) is exercised by the browser test
        path = tmp_path / name
        path.write_bytes(files.overrides[name])
        result = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
