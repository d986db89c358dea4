"""Which weights the server serves, and why: the ``checkpoint`` option resolved to one local file.

Order of precedence for the *base* weights (``--conf checkpoint``):

- ``default``: SAM-Med3D-turbo, downloaded once into ``<model_dir>/`` on the first start; when that download
  fails (offline machine), the small bundled model shipped with ``sam_med3d``; when that is missing too, a
  clear error telling the user to pass a checkpoint path;
- ``turbo``: SAM-Med3D-turbo only (download failure is an error);
- ``bundled``: the bundled model only;
- an http(s) URL: downloaded once into ``<model_dir>/``;
- a local path.

Fine-tuned weights published by the app's trainer (``<model_dir>/finetuned_<arch>.pt``) take precedence over
the base weights when they exist (``--conf use_finetuned true``); the infer task checks that file's mtime on
every click and reloads when training publishes a better model.

The server resolves the base weights once and exports the answer in ``SAM_MED3D_APP_WEIGHTS``, so the
training and scoring subprocesses MONAI Label spawns reuse it instead of retrying a failed download.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Optional, Tuple

import torch
from sam_med3d.io import file_identity

from lib.options import FINETUNED_FOR  # which labels the fine-tuned weights answer

logger = logging.getLogger(__name__)

#: Environment variable through which the server hands its resolved base weights to its subprocesses.
ENV_RESOLVED = "SAM_MED3D_APP_WEIGHTS"


@dataclass(frozen=True)
class BaseWeights:
    """The resolved base checkpoint.

    Attributes:
        path: local file holding the weights.
        requested: the ``checkpoint`` option as given (``default``, ``turbo``, a path, ...).
        reason: one human sentence saying which model this is and why it was chosen.
    """

    path: Path
    requested: str
    reason: str


def _download(source: str, model_dir: Path) -> Path:
    """``turbo`` or a URL, downloaded once into ``model_dir`` (:func:`sam_med3d.checkpoint.resolve_checkpoint`)."""
    from sam_med3d.checkpoint import resolve_checkpoint

    model_dir.mkdir(parents=True, exist_ok=True)
    return Path(resolve_checkpoint(source, download_dir=model_dir))


def _bundled() -> Path:
    from sam_med3d.checkpoint import BUNDLED_PATH

    return Path(BUNDLED_PATH)  # where it would be: the app says what to do when it is missing


def resolve_base_weights(checkpoint: str, model_dir: str) -> BaseWeights:
    """Resolve the ``checkpoint`` option to a local file (downloading if needed); see the module docstring.

    Raises:
        FileNotFoundError: a path, the bundled model or (for ``default``) every candidate is missing.
        sam_med3d.checkpoint.CheckpointDownloadError: ``turbo`` or a URL could not be downloaded.
    """
    from sam_med3d.checkpoint import CheckpointDownloadError

    inherited = os.environ.get(ENV_RESOLVED)
    if inherited:
        requested, _, path = inherited.partition("|")
        if requested == checkpoint and Path(path).is_file():
            return BaseWeights(Path(path), checkpoint, f"{path} (as resolved by the server process)")

    directory = Path(model_dir)
    if checkpoint in ("default", "turbo"):
        copied = directory / "sam_med3d_turbo.pth"  # a copy the user placed there by hand (offline install)
        if copied.is_file():
            return BaseWeights(copied, checkpoint, f"SAM-Med3D-turbo ({copied})")
        try:
            path = _download("turbo", directory)
            return BaseWeights(path, checkpoint, f"SAM-Med3D-turbo ({path})")
        except (CheckpointDownloadError, OSError) as err:
            if checkpoint == "turbo":
                raise
            bundled = _bundled()
            why = str(err).split(". ")[0]  # the core reason; the downloader's advice does not fit this case
            if bundled.is_file():
                return BaseWeights(bundled, checkpoint,
                                   f"the bundled offline model {bundled}, because SAM-Med3D-turbo could not be "
                                   f"downloaded ({why})")
            raise FileNotFoundError(
                f"no model to serve: SAM-Med3D-turbo could not be downloaded ({why}) and the "
                f"bundled offline model {bundled} is not installed. Download sam_med3d_turbo.pth on a machine "
                f"with internet access and start with '--conf checkpoint /path/to/sam_med3d_turbo.pth' (or copy "
                f"it into {directory}).") from err
    if checkpoint == "bundled":
        bundled = _bundled()
        if not bundled.is_file():
            raise FileNotFoundError(
                f"--conf checkpoint bundled: the bundled offline model {bundled} is not installed in this "
                "checkout; use '--conf checkpoint turbo' or a checkpoint path")
        return BaseWeights(bundled, checkpoint, f"the bundled offline model {bundled} (asked for)")
    if checkpoint.lower().startswith(("http://", "https://")):
        path = _download(checkpoint, directory)
        return BaseWeights(path, checkpoint, f"{path} (downloaded from {checkpoint})")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--conf checkpoint {checkpoint!r}: no such file ({path.resolve()})")
    return BaseWeights(path.resolve(), checkpoint, f"{path.resolve()} (given by --conf checkpoint)")


def export_for_subprocesses(weights: BaseWeights) -> None:
    """Record the resolution in the environment that MONAI Label's train/scoring subprocesses inherit."""
    os.environ[ENV_RESOLVED] = f"{weights.requested}|{weights.path}"


def finetuned_path(model_dir: str, base: Path) -> Path:
    """Where the trainer publishes the best model fine-tuned from the base weights ``base``.

    The name carries the base file's name, so switching ``--conf checkpoint`` never serves weights that were
    fine-tuned from another model (the download cache's 12-hex-digit prefix is dropped for readability).
    """
    stem = Path(base).name
    for suffix in (".pth", ".pt", ".ckpt", ".bin"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"^[0-9a-f]{12}-", "", stem)
    return Path(model_dir) / f"finetuned_{stem}.pt"


def architecture_name(config: dict) -> str:
    """The name in ``sam_med3d.CONFIGS`` whose configuration equals ``config``, else ``"custom"``."""
    from sam_med3d.build import CONFIGS

    # JSON round trip: a config read back from a checkpoint may hold tuples where CONFIGS holds lists.
    wanted = json.dumps(config, sort_keys=True, default=list)
    for name, candidate in CONFIGS.items():
        if json.dumps(candidate, sort_keys=True, default=list) == wanted:
            return name
    return "custom"


def load_weights(path: Path, expected_arch: str, device: str) -> Tuple[torch.nn.Module, str]:
    """Build the model recorded in ``path`` and load it on ``device``; check it is ``expected_arch``.

    Returns:
        ``(model, arch)``: the ``Sam3D`` in eval mode and its architecture name (see :func:`architecture_name`).

    Raises:
        ValueError: ``expected_arch`` is not ``"auto"`` and the checkpoint holds another architecture.
    """
    from sam_med3d.checkpoint import load_model

    model = load_model(str(path), device=device)
    arch = architecture_name(model.config)
    if expected_arch != "auto" and arch != expected_arch:
        raise ValueError(f"--conf model {expected_arch} was asked, but checkpoint {path} holds a {arch} model; "
                         f"pass the matching --conf model or 'auto'")
    return model, arch


class ServedModel:
    """The model the server serves right now: fine-tuned weights when published, else the base weights.

    :meth:`get` stats the candidate file on every call (microseconds) and reloads when the file, its size or
    its mtime changed, which is how weights published by a training subprocess reach the clicks. A fine-tuned
    file that cannot be loaded (truncated, corrupt, another architecture) is not served: the weights served before
    stay (the base weights when none were), a warning is logged once per file version, and :attr:`problem` says
    why until a good file is published.
    """

    def __init__(self, base: BaseWeights, expected_arch: str, device: str, finetuned: Path, use_finetuned: bool,
                 finetuned_for: str = "trained"):
        if finetuned_for not in FINETUNED_FOR:
            raise ValueError(f"finetuned_for must be one of {', '.join(FINETUNED_FOR)}, got {finetuned_for!r}")
        self.base = base
        self.expected_arch = expected_arch
        self.device = device
        self.finetuned = Path(finetuned)
        self.use_finetuned = use_finetuned
        self.finetuned_for = finetuned_for
        self._model: "torch.nn.Module | None" = None
        self._base_model: "torch.nn.Module | None" = None
        self._loaded_key: "Tuple[str, int, int] | None" = None
        self._refused_key: "Tuple[str, int, int] | None" = None
        #: Why the fine-tuned file on disk is not the one served (None when nothing was refused).
        self.problem: Optional[str] = None
        self.arch = expected_arch

    def candidate(self) -> Path:
        """The file that should be served: the fine-tuned weights when published (and used), else the base."""
        if self.use_finetuned and self.finetuned.is_file():
            return self.finetuned
        return self.base.path

    def path(self) -> Path:
        """The file whose weights are served (or are about to be, on the next :meth:`get`): :meth:`candidate`,
        unless that file is the version :meth:`get` refused; then the file loaded instead."""
        candidate = self.candidate()
        if self._refused_key is not None and self._loaded_key is not None and str(candidate) == self._refused_key[0]:
            try:
                if self._key(candidate) == self._refused_key:
                    return Path(self._loaded_key[0])
            except OSError:
                pass
        return candidate

    def describe(self) -> str:
        """One log line: which model is served and why."""
        path = self.path()
        if path == self.finetuned:
            what = f"fine-tuned weights {path} (published by training from {self.base.path})"
        else:
            what = self.base.reason
        return f"{what}; {self.problem}" if self.problem else what

    @staticmethod
    def _key(path: Path) -> Tuple[str, int, int, int]:
        return file_identity(path)

    def get(self) -> Tuple[torch.nn.Module, bool]:
        """``(model, reloaded)``: the current model, loading it first when the served file changed."""
        path = self.candidate()
        try:
            key = self._key(path)
        except FileNotFoundError:  # the fine-tuned file went away between the two looks
            path = self.base.path
            key = self._key(path)
        if self._model is not None and key in (self._loaded_key, self._refused_key):
            return self._model, False
        try:
            model, arch = load_weights(path, self.expected_arch, self.device)
        except Exception as err:  # noqa: BLE001 - any file that does not load is not served
            if path == self.base.path:
                raise
            return self._refuse(path, key, err)
        first = self._model is None
        self._model, self._loaded_key, self.arch, self.problem = model, key, arch, None
        self._base_model = None  # loaded again on demand, sharing the new model's encoder when it can
        if first:  # the app already logged which model it serves and why, at start
            logger.debug("Loaded SAM-Med3D %s from %s on %s", arch, path, self.device)
        else:
            logger.info("Now serving new SAM-Med3D %s weights: %s", arch, self.describe())
        structures = self.structures()
        if structures is not None:
            logger.info("The fine-tuned weights answer %s; the base weights every other label (--conf "
                        "finetuned_for trained)", ", ".join(sorted(structures)) or "no label")
        return model, True

    def _refuse(self, path: Path, key: Tuple[str, int, int], err: Exception) -> Tuple[torch.nn.Module, bool]:
        """Keep serving the last good weights (the base weights when none were loaded) instead of ``path``."""
        self._refused_key = key
        reloaded = self._model is None
        if reloaded:
            self._model, self.arch = load_weights(self.base.path, self.expected_arch, self.device)
            self._loaded_key, self._base_model = self._key(self.base.path), None
        kept = "the fine-tuned weights loaded before" if self.path() == self.finetuned else "the base weights"
        why = str(err).split(". ")[0]  # the reason; the loader's advice is for files a user passes by hand
        self.problem = f"the fine-tuned weights {path} could not be loaded ({why}); still serving {kept}"
        logger.warning("SAM-Med3D: %s, until training publishes a good file", self.problem)
        return self._model, reloaded

    def structures(self) -> Optional[FrozenSet[str]]:
        """The label names the model last returned by :meth:`get` answers, or None for every label.

        Base weights answer every label. Fine-tuned weights answer only the labels they were trained on (the
        ``structures`` their checkpoint records) with ``finetuned_for`` ``trained``; every label with ``all``
        or when the checkpoint records none (written by an older trainer)."""
        if self._model is None or self.finetuned_for == "all" or self._loaded_key is None \
                or self._loaded_key[0] != str(self.finetuned):
            return None
        info = getattr(self._model, "checkpoint_info", None) or {}
        structures = (info.get("extra") or {}).get("structures")
        if not isinstance(structures, (list, tuple)):
            return None
        return frozenset(str(name) for name in structures)

    def base_model(self) -> torch.nn.Module:
        """The base weights, for the labels the served fine-tuned weights do not answer (loaded once per served
        file). Its image encoder is the served model's own module when their weights are equal (fine-tuning
        with the encoder frozen), so both share crop embeddings (``Sam3DPredictor.sibling``) and memory."""
        if self._base_model is None:
            from sam_med3d.predictor import share_image_encoder

            model, _ = load_weights(self.base.path, self.expected_arch, self.device)
            if self._model is not None:
                share_image_encoder(model, self._model)
            self._base_model = model
        return self._base_model
