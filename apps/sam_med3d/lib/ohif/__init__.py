"""The OHIF viewer at ``/ohif/``: MONAI Label 0.8.5's prebuilt OHIF with this app's additions, no rebuild.

MONAI Label serves the OHIF v3 build in its wheel (``monailabel/endpoints/static/ohif``). Its MONAI Label panel
has no control that saves a label, ignores the Strategy drop-down (no change handler: every Next Sample runs
``random``), shows a dialog and a browser confirmation and reloads the page on Next Sample with the panel
disconnected, and shows training progress only as of the moment it connected. :func:`install_ohif` replaces
MONAI Label's ``GET /ohif/{path}`` route with one that serves the same files, except

- ``app-config.js``: the bundle's own configuration followed by ``sam-med3d-ohif.js`` (this folder), which
  defines ``window.samMed3d`` (save, auto-connect, strategy, Next Sample, training state, edit merging);
- the chunk with the MONAI Label extension (:data:`PANEL_CHUNK`), with the small text replacements of
  :data:`CHUNK_PATCHES` that call ``window.samMed3d``, and the main bundle (:data:`APP_BUNDLE`), whose
  Segmentation mode loses its failing *Export DICOM SEG* menu items (:data:`APP_PATCHES`). Each file must have
  the SHA-256 its patches were written for (:data:`PATCHED_FILES`) and each replaced text must occur exactly
  once; otherwise the bundle is served unpatched and the server logs an error (``tests/test_ohif_patches.py`` fails loudly in that case, so an
  upgrade of monailabel is noticed in CI; ``docs/ohif_upgrade.md`` says what to do).

Everything else is served from the bundle's folder, as MONAI Label does (any path that is not a file there is
the single-page app's ``index.html``); nothing is downloaded or built.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
#: The scripts appended, in this order, to the bundle's ``app-config.js``.
ADDITIONS_JS = [HERE / "sam-med3d-ohif.js", HERE / "sam-med3d-edit.js"]
#: The chunk of the bundled OHIF holding the MONAI Label extension (panel, client, Next Sample form).
PANEL_CHUNK = "3933.bundle.92d0a0e9bc7e6861b7c9.js"
#: Its SHA-256 in the monailabel 0.8.5 wheel: the patches below were written against exactly this file.
PANEL_CHUNK_SHA256 = "7844f59159b8eda422079064b0bffa17d2b76aa025b054097ff4ae8bc3b55acd"

#: ``(what it changes, text in the chunk, replacement)``; each text must occur exactly once.
CHUNK_PATCHES: List[Tuple[str, str, str]] = [
    (
        "Save Label button under the panel's title",
        '}, "Options / Configurations"), /*#__PURE__*/react.createElement("hr", {',
        '}, "Options / Configurations"), /*#__PURE__*/react.createElement("button", {\n'
        '      id: "samMed3dSave",\n'
        '      className: "actionInput",\n'
        '      style: { backgroundColor: "lightgray", marginTop: "6px" },\n'
        '      title: "Save what the viewer shows as this image\'s final label",\n'
        '      onClick: () => window.samMed3d.saveLabel(this)\n'
        '    }, "Save Label"), /*#__PURE__*/react.createElement("hr", {',
    ),
    (
        "connect to the server in the cookie once the study is shown (also after Next Sample)",
        "    // await this.onInfo();",
        "    window.samMed3d.autoConnect(this);",
    ),
    (
        "the Strategy drop-down: a change handler (the bundle has none) and the remembered choice",
        "    this.state = {\n"
        "      strategy: 'random',",
        "    this.onChangeStrategy = evt => {\n"
        "      window.samMed3d.rememberStrategy(evt.target.value);\n"
        "      this.setState({\n"
        "        strategy: evt.target.value\n"
        "      });\n"
        "    };\n"
        "    this.state = {\n"
        "      strategy: window.samMed3d.strategy(props.info.data.strategies),",
    ),
    (
        "the training state polled from the server",
        "  async componentDidMount() {\n"
        "    const training = await this.props.client().is_train_running();\n"
        "    this.setState({\n"
        "      training: training\n"
        "    });\n"
        "  }",
        "  async componentDidMount() {\n"
        "    window.samMed3d.watchTraining(this);\n"
        "  }",
    ),
    (
        "Next Sample opens the chosen study at once (no dialog, no confirmation)",
        "        this.uiModelService.show({\n"
        "          content: NextSampleForm,",
        "        window.samMed3d.openNextSample(response.data);\n"
        "        false && this.uiModelService.show({\n"
        "          content: NextSampleForm,",
    ),
    (
        "training state after Update Model / Stop Training is re-read from the server",
        "        this.setState({\n"
        "          training: !training\n"
        "        });",
        "        this.setState({\n"
        "          training: !training\n"
        "        });\n"
        "        window.samMed3d.refreshTraining(this);",
    ),
    (
        "the Training and Train Acc rows show the server's training state",
        "    const ts = this.props.info.data.train_stats ? Object.values(this.props.info.data.train_stats)[0] : null;\n"
        "    const epochs = ts ? ts.total_time ? 0 : ts.epoch ? ts.epoch : 1 : 0;\n"
        "    const total_epochs = ts && ts.total_epochs ? ts.total_epochs : 1;\n"
        "    const training = Math.round(100 * (epochs / total_epochs)) + '%';\n"
        "    const trainingTip = epochs ? epochs + '/' + total_epochs + ' epochs completed' : 'Not Running';\n"
        "    const accuracy = ts && ts.best_metric ? Math.round(100 * ts.best_metric) + '%' : '0%';\n"
        "    const accuracyTip = ts && ts.best_metric ? accuracy + ' is current best metric' : 'not determined';\n",
        "    const {\n"
        "      training,\n"
        "      trainingTip,\n"
        "      accuracy,\n"
        "      accuracyTip\n"
        "    } = window.samMed3d.trainingView(this);\n",
    ),
    (
        "an id on the Training row's value (read by the tests and by the poller)",
        "      className: \"w3-round w3-container w3-orange w3-center\",\n"
        "      style: {\n"
        "        backgroundColor: 'white'\n"
        "      }\n"
        "    }, training)",
        "      className: \"w3-round w3-container w3-orange w3-center\",\n"
        "      id: \"samMed3dTraining\",\n"
        "      style: {\n"
        "        backgroundColor: 'white'\n"
        "      }\n"
        "    }, training)",
    ),
    (
        "an id on the Train Acc row's value",
        "      className: \"w3-round w3-container w3-green w3-center\",\n"
        "      style: {\n"
        "        backgroundColor: 'white'\n"
        "      }\n"
        "    }, accuracy)",
        "      className: \"w3-round w3-container w3-green w3-center\",\n"
        "      id: \"samMed3dAccuracy\",\n"
        "      style: {\n"
        "        backgroundColor: 'white'\n"
        "      }\n"
        "    }, accuracy)",
    ),
]


#: The main bundle (OHIF's own panels and menus).
APP_BUNDLE = "app.bundle.af87d1dd396d277eac89.js"
APP_BUNDLE_SHA256 = "eefbda3a38a30e1a60aa986a05ab4f976ad17f4078dd29e1cacf911855bc40d7"
_EXPORT_ITEM_MENU = ("/*#__PURE__*/react.createElement(DropdownMenu_DropdownMenuItem, {\n"
                     "    onClick: () => storeSegmentation(activeSegmentation.id)\n"
                     "  }, t('Export DICOM SEG')), ")
_EXPORT_ITEM_LIST = ("/*#__PURE__*/react.createElement(DropdownMenu_DropdownMenuItem, {\n"
                     "    onClick: e => {\n"
                     "      e.stopPropagation();\n"
                     "      storeSegmentation(segmentation.segmentationId);\n"
                     "    }\n"
                     "  }, t('Export DICOM SEG')), ")
_EXPORT_ITEM_OLD_MENU = ("...(!disableEditing ? [{\n"
                         "      title: t('Export DICOM SEG'),\n"
                         "      onClick: () => {\n"
                         "        storeSegmentation(activeSegmentation.id);\n"
                         "      }\n"
                         "    }] : []), ")
#: The Segmentation mode's *Export DICOM SEG* is taken out of its three menus: in this build it fails (the menu
#: calls the command without a data source) and, stored from the console, it placed the painted voxels on
#: mirrored slices. *Download DICOM SEG* stays; labels are saved from the MONAI Label mode's Save Label.
APP_PATCHES: List[Tuple[str, str, str]] = [
    ("no Export DICOM SEG in the segmentation's menu", _EXPORT_ITEM_MENU, ""),
    ("no Export DICOM SEG in the segmentation list's menu", _EXPORT_ITEM_LIST, ""),
    ("no Export DICOM SEG in the segmentation's drop-down", _EXPORT_ITEM_OLD_MENU, ""),
]

#: ``{file: (SHA-256 it must have, patches)}``.
PATCHED_FILES: Dict[str, Tuple[str, List[Tuple[str, str, str]]]] = {
    PANEL_CHUNK: (PANEL_CHUNK_SHA256, CHUNK_PATCHES),
    APP_BUNDLE: (APP_BUNDLE_SHA256, APP_PATCHES),
}

def bundle_dir() -> Path:
    """The OHIF build in the installed monailabel wheel."""
    import monailabel

    return Path(monailabel.__file__).resolve().parent / "endpoints" / "static" / "ohif"


def patch_file(name: str, text: str) -> str:
    """``name`` of :data:`PATCHED_FILES` with its patches applied; ValueError when the file is not the one the
    patches were written for or a patched text does not occur exactly once."""
    expected, patches = PATCHED_FILES[name]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != expected:
        raise ValueError(f"{name} has SHA-256 {digest}, not {expected} (the monailabel 0.8.5 build the patches "
                         "were written for)")
    for what, old, new in patches:
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{name}: the text patched for '{what}' occurs {count} times, not once")
        text = text.replace(old, new)
    return text


def patch_chunk(text: str) -> str:
    """The panel chunk with :data:`CHUNK_PATCHES` applied (see :func:`patch_file`)."""
    return patch_file(PANEL_CHUNK, text)


class OhifFiles:
    """The files served at ``/ohif/``: the bundle's, with the patched chunk and the extended app-config."""

    def __init__(self, root: Optional[Path] = None):
        self.root = (root or bundle_dir()).resolve()
        self.overrides: Dict[str, bytes] = {}
        self.patched = False
        try:
            patched = {name: patch_file(name, (self.root / name).read_bytes().decode("utf-8")).encode("utf-8")
                       for name in PATCHED_FILES}
        except (OSError, ValueError) as err:
            logger.error("OHIF served WITHOUT this app's additions (no Save button, Strategy, training state): %s; "
                         "see docs/ohif_upgrade.md", err)
            return
        config = (self.root / "app-config.js").read_bytes().decode("utf-8")
        additions = "\n".join(path.read_text(encoding="utf-8") for path in ADDITIONS_JS)
        self.overrides = dict(patched, **{"app-config.js": (config + "\n" + additions).encode("utf-8")})
        self.patched = True

    def resolve(self, path: str) -> Tuple[Optional[bytes], Path]:
        """``(override bytes or None, file)`` for a request path; unknown paths are the app's ``index.html``."""
        name = path.strip("/")
        if name in self.overrides:
            return self.overrides[name], self.root / name
        candidate = (self.root / name).resolve() if name else self.root / "index.html"
        if name and candidate.is_file() and os.path.commonpath([candidate, self.root]) == str(self.root):
            return None, candidate
        return None, self.root / "index.html"


def install_ohif(fastapi_app=None) -> OhifFiles:
    """Serve ``/ohif/`` from :class:`OhifFiles` instead of MONAI Label's route (install once, at start)."""
    from fastapi import Depends
    from fastapi.responses import FileResponse, Response
    from fastapi.routing import APIRoute
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC, User
    from monailabel.utils.others.generic import get_mime_type

    if fastapi_app is None:
        from monailabel.app import app as fastapi_app
    files = OhifFiles()
    route_path = settings.MONAI_LABEL_API_STR + "/ohif/{path:path}"

    async def get_ohif(path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        content, file = files.resolve(path)
        media_type = get_mime_type(str(file))
        if content is not None:
            # Same name as the bundle's file, other content: the browser must not keep an old copy.
            return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        return FileResponse(file, media_type=media_type)

    def drop(router) -> None:
        kept = []
        for route in router.routes:
            nested = getattr(route, "original_router", None)
            if nested is not None:
                drop(nested)
            if isinstance(route, APIRoute) and route.path.endswith("/ohif/{path:path}"):
                continue
            kept.append(route)
        router.routes[:] = kept
        if hasattr(router, "_mark_routes_changed"):
            router._mark_routes_changed()

    drop(fastapi_app.router)
    fastapi_app.router.add_api_route(route_path, get_ohif, methods=["GET"], include_in_schema=False)
    routes = fastapi_app.router.routes
    routes.insert(0, routes.pop())  # before any catch-all
    if hasattr(fastapi_app.router, "_mark_routes_changed"):
        fastapi_app.router._mark_routes_changed()
    logger.info("OHIF at /ohif/: %s", "with the SAM-Med3D panel additions" if files.patched
                else "the bundled build, unpatched")
    return files
