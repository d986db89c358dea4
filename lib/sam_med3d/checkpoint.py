"""Reading and writing SAM-Med3D checkpoints: the official releases and our own files.

Formats understood by :func:`load_checkpoint` / :func:`load_model`:

``"official"``
    The training container written by the official ``train.py`` (and shipped as ``sam_med3d.pth`` /
    ``sam_med3d_turbo.pth``): a dict with ``model_state_dict`` plus ``epoch``, ``optimizer_state_dict``,
    ``lr_scheduler_state_dict``, ``losses``, ``dices``, ``best_loss``, ``best_dice``, ``args`` (an
    ``argparse.Namespace``) and ``used_datas``. It records no architecture; it is the ``vit_b_ori`` one.
``"state_dict"``
    A bare ``{name: tensor}`` state dict.
``"sam_med3d"``
    Ours, written by :func:`save_checkpoint`: ``{"format": "sam_med3d", "version": 1, "config": ...,
    "dtype": "float32" | "float16", "model_state_dict": ..., **extra}``.

In all three the parameter names may carry the ``module.`` prefix of a ``DistributedDataParallel`` wrapper;
it is stripped.

Security: files are always read with ``torch.load(..., weights_only=True)``. The only global allowed beyond
torch's defaults is ``argparse.Namespace`` (the official container's ``args``; its optimizer and
``MultiStepLR`` states need only tensors, containers and ``collections.Counter``, which torch allows by
default). A file that needs any other global is refused with :class:`UnsafeCheckpointError` naming it;
nothing in it is executed.

URLs (``http://`` / ``https://``) are downloaded once into the cache directory (``$SAM_MED3D_CACHE``, else
``~/.cache/sam_med3d``), through a temporary file that is renamed into place only once complete.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

__all__ = [
    "TURBO_URL", "SAM_MED3D_URL", "SAM_MED3D_PAGE", "BUNDLED_PATH", "CheckpointError", "CheckpointDownloadError",
    "CheckpointMismatchError", "UnsafeCheckpointError", "cache_dir", "resolve_checkpoint", "load_checkpoint",
    "save_checkpoint", "atomic_torch_save", "load_model",
]

#: SAM-Med3D-turbo (``vit_b_ori``, fine-tuned on 44 datasets), the checkpoint the official README links
#: (https://huggingface.co/blueyo0/SAM-Med3D/blob/main/sam_med3d_turbo.pth); ``resolve`` is the direct download.
TURBO_URL = "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth"
#: The original ``sam_med3d.pth`` is published only on Google Drive / Baidu NetDisk (no direct-download URL),
#: so there is nothing to fetch automatically; download it from :data:`SAM_MED3D_PAGE` and pass the path.
SAM_MED3D_URL: Optional[str] = None
SAM_MED3D_PAGE = "https://drive.google.com/file/d/1PFeUjlFMAppllS9x1kAWyCYUJM9re2Ub/view?usp=drive_link"
#: Small offline model shipped with the package (produced by the bundled-model training script).
BUNDLED_PATH = Path(__file__).resolve().parent / "bundled" / "sam_med3d_bundled.pt"

FORMAT_NAME = "sam_med3d"
FORMAT_VERSION = 1
_RESERVED_KEYS = ("format", "version", "config", "dtype", "model_state_dict")
_ALLOWED_GLOBALS = [argparse.Namespace]
_DDP_PREFIX = "module."
_LIST_LIMIT = 10
_DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20

PathOrUrl = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------------ errors
class CheckpointError(RuntimeError):
    """A checkpoint could not be read, downloaded or applied."""


class CheckpointDownloadError(CheckpointError):
    """Downloading a checkpoint URL failed (offline machine, HTTP error, truncated transfer)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model (missing, unexpected or mis-shaped keys)."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs Python globals outside the allow-list to unpickle; it was not loaded."""


# ------------------------------------------------------------------------------------ resolving + download
def _is_url(value: PathOrUrl) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def cache_dir() -> Path:
    """The download cache: ``$SAM_MED3D_CACHE`` if set, else ``~/.cache/sam_med3d`` (not created here)."""
    env = os.environ.get("SAM_MED3D_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sam_med3d"


def _cache_path(url: str, directory: Optional[Path] = None) -> Path:
    """``<cache>/<first 12 hex of sha256(url)>-<file name in the URL>``: readable, and two URLs ending in the
    same file name never share a cache entry. In a caller's own ``directory`` the file keeps its plain name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", _url_file_name(url))
    if directory is not None:
        return Path(directory) / name
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return cache_dir() / f"{digest}-{name}"


def _url_file_name(url: str) -> str:
    """The file name at the end of ``url`` (what a user saves the download as)."""
    return Path(urllib.parse.urlparse(url).path).name or "checkpoint.pth"


def _offline_advice(url: str, dst: Path) -> str:
    return (f"Download {url} on a machine with internet access and pass the local file's path instead "
            f"(load_model('/path/to/{_url_file_name(url)}')), or copy it to {dst}; "
            "or use load_model('bundled') for the small model shipped with the package.")


def _download(url: str, dst: Path) -> None:
    """Fetch ``url`` into ``dst`` atomically: stream into a temporary file beside ``dst`` with a tqdm bar, check
    the byte count against Content-Length (urllib silently accepts a connection closed early), then
    ``os.replace``. Any failure or interruption removes the temporary file, so ``dst`` is complete or absent."""
    from tqdm.auto import tqdm  # imported here: only downloads need it

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "sam_med3d"})
        try:
            response = urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise CheckpointDownloadError(
                f"downloading checkpoint {url} failed: the server answered HTTP {exc.code} {exc.reason}. "
                f"Check the URL, or download the file by other means and pass its local path.") from exc
        except (urllib.error.URLError, OSError) as exc:  # refused, DNS failure, timeout, no route
            reason = getattr(exc, "reason", exc)
            raise CheckpointDownloadError(
                f"cannot download checkpoint {url}: {reason}. This machine seems to be offline or cannot reach "
                f"the server. {_offline_advice(url, dst)}") from exc
        with response, os.fdopen(fd, "wb") as out:
            fd = -1  # now owned by ``out``
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"Downloading {_url_file_name(url)}") as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except OSError as exc:  # connection reset / timeout mid-transfer
                        raise CheckpointDownloadError(
                            f"download of {url} was interrupted after {received} bytes: {exc}. Nothing was cached; "
                            f"try again. {_offline_advice(url, dst)}") from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise CheckpointDownloadError(
                    f"download of {url} is incomplete: received {received} of {total} bytes (the connection "
                    f"was closed early). Nothing was cached; try again. {_offline_advice(url, dst)}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def resolve_checkpoint(path_or_url: PathOrUrl, download_dir: Optional[PathOrUrl] = None) -> Path:
    """The one resolver of checkpoint sources: a name (``"turbo"``, ``"bundled"``, ``"sam_med3d"``), a local
    path (checked to exist) or an http(s) URL (downloaded once into :func:`cache_dir`, or into ``download_dir``
    under the URL's file name when given) -> local path.

    Raises :class:`FileNotFoundError` for a missing local file (the bundled model included) and
    :class:`CheckpointDownloadError` when a URL cannot be fetched.
    """
    path_or_url = _named_source(path_or_url)
    if _is_url(path_or_url):
        url = str(path_or_url)
        dst = _cache_path(url, Path(download_dir).expanduser() if download_dir is not None else None)
        if not dst.is_file():
            _download(url, dst)
        return dst
    path = Path(path_or_url).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path_or_url)!r} not found (resolved to {path.resolve()})")
    return path


# ---------------------------------------------------------------------------------------------- reading
def _pickle_globals(path: Path, max_pickles: int = 8) -> List[str]:
    """Globals referenced by the pickle stream(s) of a non-zip file, found by parsing opcodes with
    ``pickletools`` (nothing is executed). Legacy torch files hold several pickles back to back."""
    import pickletools

    names: List[str] = []
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            strings: List[str] = []
            try:
                for opcode, arg, _pos in pickletools.genops(f):
                    if opcode.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # end of the pickles, or tensor bytes after them
                break
    return names


def _unsafe_globals(path: Path, message: str) -> List[str]:
    """Names of the globals the file needs beyond torch's defaults and our allow-list."""
    from torch._weights_only_unpickler import _get_allowed_globals  # torch's own default allow-list

    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # zip (current) format
    except Exception:  # legacy / plain pickle files cannot be scanned by torch
        names = _pickle_globals(path)
    allowed = set(_get_allowed_globals()) | {f"{g.__module__}.{g.__qualname__}" for g in _ALLOWED_GLOBALS}
    names = [n for n in dict.fromkeys(names) if n not in allowed]
    return names or re.findall(r"Unsupported global: GLOBAL ([\w.]+)", message)


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and only ``argparse.Namespace`` added to torch's allow-list."""
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path, str(exc))
        if names or "weights only load failed" in str(exc).lower():
            what = ", ".join(names) if names else "a Python object torch's safe loader does not allow"
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: it needs {what} to unpickle, which is not on the allow-list "
                f"(tensors, containers, numbers, strings, argparse.Namespace). Such a file could run arbitrary "
                f"code, so nothing in it was executed. If you trust it, re-save its state_dict with plain "
                f"tensors.") from exc
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file: {exc}") from exc
    except Exception as exc:  # garbage bytes make the unpickler fail in arbitrary ways (IndexError, EOFError...)
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file (truncated or another format?): "
                              f"{exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_ddp_prefix(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Remove the ``module.`` prefix a DistributedDataParallel wrapper adds, when every key carries it."""
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        return {k[len(_DDP_PREFIX):]: v for k, v in state.items()}, True
    return dict(state), False


def _plain(value: Any) -> Any:
    """Namespace -> dict, recursively, so metadata is plain data."""
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


def _read(path: Path, source: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Load ``path`` and split it into a state dict (float32 for our fp16 files) and metadata."""
    obj = _torch_load(path)
    meta: Dict[str, Any] = {"source": source, "path": str(path), "epoch": None, "config": None}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        version = obj.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {source} has sam_med3d format version {version!r}; this code reads "
                                  f"version {FORMAT_VERSION} and older. Update the sam_med3d package.")
        state = obj.get("model_state_dict")
        meta.update(format=FORMAT_NAME, version=version, config=obj.get("config"),
                    dtype=obj.get("dtype", "float32"),
                    extra={k: v for k, v in obj.items() if k not in _RESERVED_KEYS})
        meta["epoch"] = meta["extra"].get("epoch")
    elif isinstance(obj, Mapping) and "model_state_dict" in obj:
        state = obj["model_state_dict"]
        args = obj.get("args")
        meta.update(format="official", epoch=obj.get("epoch"), args=_plain(args) if args is not None else None,
                    best_dice=obj.get("best_dice"), best_loss=obj.get("best_loss"),
                    extra_keys=sorted(k for k in obj if k != "model_state_dict"))
    elif _is_state_dict(obj):
        state = obj
        meta["format"] = "state_dict"
    else:
        keys = sorted(map(str, obj))[:_LIST_LIMIT] if isinstance(obj, Mapping) else None
        raise CheckpointError(
            f"checkpoint {source} is not a SAM-Med3D checkpoint: expected a state dict, an official training "
            f"container (with 'model_state_dict') or a sam_med3d file, got {type(obj).__name__}"
            + (f" with keys {keys}" if keys is not None else ""))
    if not _is_state_dict(state):
        raise CheckpointError(f"checkpoint {source}: 'model_state_dict' is not a non-empty mapping of names to "
                              f"tensors (got {type(state).__name__})")
    state, stripped = _strip_ddp_prefix(state)
    meta["module_prefix_stripped"] = stripped
    # fp16 storage is for size only; the model computes in float32, and fp16 -> fp32 is exact.
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}
    return state, meta


def _listing(title: str, items: List[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_LIST_LIMIT])
    more = f"\n    ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _apply(model: nn.Module, state: Dict[str, torch.Tensor], meta: Dict[str, Any], strict: bool) -> None:
    """Copy ``state`` into ``model``; with ``strict`` any missing/unexpected/mis-shaped key is an error listing
    them, otherwise only the matching tensors are loaded and the lists go into ``meta``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    meta.update(missing_keys=missing, unexpected_keys=unexpected, mismatched_keys=mismatched)
    if strict and (missing or unexpected or mismatched):
        parts = [f"checkpoint {meta['source']} ({meta['format']} format) does not fit the model:"]
        for title, items in (("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
                             ("shape mismatch", mismatched)):
            if items:
                parts.append(_listing(title, items))
        if meta.get("config") is None:
            parts.append("  (official and bare checkpoints hold no architecture; they are loaded into 'vit_b_ori')")
        raise CheckpointMismatchError("\n".join(parts))
    fitting = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(fitting, strict=strict)


# ------------------------------------------------------------------------------------------- public API
def load_checkpoint(model: nn.Module, path_or_url: PathOrUrl, strict: bool = True) -> Dict[str, Any]:
    """Load a checkpoint (any format in the module docstring, local path or URL) into ``model`` in place.

    ``strict=True``: every model tensor must be present with the same shape and nothing extra, else
    :class:`CheckpointMismatchError` lists the offending keys. ``strict=False`` loads the tensors that fit.

    Returns metadata: ``format`` ("official" | "state_dict" | "sam_med3d"), ``source`` (as given), ``path``
    (local file), ``epoch`` (or None), ``config`` (ours only, else None), ``module_prefix_stripped``, the
    ``missing_keys`` / ``unexpected_keys`` / ``mismatched_keys`` lists, plus ``args`` / ``best_dice`` /
    ``best_loss`` for official files and ``dtype`` / ``extra`` for ours.
    """
    path = resolve_checkpoint(path_or_url)
    state, meta = _read(path, str(path_or_url))
    _apply(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model, state, meta, strict)
    return meta


def _check_extra(value: Any, where: str) -> None:
    """Extras must load under ``weights_only=True``: tensors, numbers, strings, None and plain containers."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_extra(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"save_checkpoint extra {where}: dict key {key!r} is a {type(key).__name__}; "
                                 "keys must be str or int")
            _check_extra(item, f"{where}[{key!r}]")
        return
    raise ValueError(f"save_checkpoint extra {where} is a {type(value).__name__}; extras must be tensors, numbers, "
                     "strings, None or lists/tuples/dicts of those (so the file loads with weights_only=True)")


def atomic_torch_save(obj: Any, path: PathOrUrl) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``: a crash mid-save
    leaves the previous file intact and no partial file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(obj, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    try:  # make the rename itself durable (POSIX); not possible on every filesystem/OS
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def save_checkpoint(model: nn.Module, path: PathOrUrl, half: bool = False, **extra: Any) -> Path:
    """Write ``model`` (with its ``config``) to ``path`` in our format, atomically.

    The file is ``{"format": "sam_med3d", "version": 1, "config": model.config, "dtype": ...,
    "model_state_dict": ..., **extra}``, written to a temporary file in the same folder, fsynced, then
    ``os.replace``-d over ``path``: a crash mid-save leaves any previous file intact. ``half=True`` stores
    floating-point tensors as float16 (half the size; precision ~3 significant digits; values beyond
    +-65504 are refused); they are cast back to float32 on load. ``extra`` (e.g. ``epoch=3``,
    ``metrics={"dice": 0.8}``) must be plain data, see :func:`_check_extra`. Returns the path.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or not config:
        raise ValueError("save_checkpoint: model has no 'config' dict; build it with sam_med3d.build_sam_med3d so "
                         "the architecture can be rebuilt on load")
    reserved = sorted(set(extra) & set(_RESERVED_KEYS))
    if reserved:
        raise ValueError(f"save_checkpoint: extra key(s) {reserved} are reserved by the file format")
    for key, value in extra.items():
        _check_extra(value, key)
    state: Dict[str, torch.Tensor] = {}
    fp16_max = torch.finfo(torch.float16).max
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if half and tensor.is_floating_point():
            if tensor.numel() and tensor.abs().max().item() > fp16_max:
                raise ValueError(f"save_checkpoint(half=True): tensor {name} has values beyond the float16 range "
                                 f"(+-{fp16_max:g}); save it in float32")
            tensor = tensor.half()
        state[name] = tensor.clone()  # own storage: a view would serialize its whole base tensor
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config,
               "dtype": "float16" if half else "float32", "model_state_dict": state, **extra}

    return atomic_torch_save(payload, Path(path).expanduser())


def _named_source(name_or_path_or_url: PathOrUrl) -> PathOrUrl:
    """Map the names "turbo", "bundled" and "sam_med3d" to their URL/path; anything else passes through."""
    name = str(name_or_path_or_url)
    if name == "turbo":
        return TURBO_URL
    if name == "bundled":
        if not BUNDLED_PATH.is_file():
            raise FileNotFoundError(
                f"the bundled model {BUNDLED_PATH} is missing from this installation; reinstall the package or "
                f"use load_model('turbo') / a checkpoint path")
        return BUNDLED_PATH
    if name == "sam_med3d":
        if SAM_MED3D_URL is None:
            raise FileNotFoundError(
                f"sam_med3d.pth has no direct-download URL (it is published on Google Drive: {SAM_MED3D_PAGE}); "
                "download it and pass its path, or use 'turbo', the recommended fine-tuned release")
        return SAM_MED3D_URL
    return name_or_path_or_url


def load_model(name_or_path_or_url: PathOrUrl = "turbo", device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Build a SAM-Med3D and load its weights; returns the :class:`~sam_med3d.modeling.Sam3D` in eval mode on
    ``device``.

    ``name_or_path_or_url``: ``"turbo"`` (:data:`TURBO_URL`, downloaded once), ``"bundled"`` (the small model in
    ``sam_med3d/bundled/``), or a local path / http(s) URL. Our own files rebuild their recorded config;
    official and bare state dicts build ``vit_b_ori``. Loading is strict (see :func:`load_checkpoint`).
    The metadata of :func:`load_checkpoint` is kept on the model as ``model.checkpoint_info``.
    """
    from .build import build_sam_med3d

    path = resolve_checkpoint(name_or_path_or_url)
    state, meta = _read(path, str(name_or_path_or_url))
    config = meta["config"] if meta.get("config") else "vit_b_ori"
    model = build_sam_med3d(config)
    _apply(model, state, meta, strict=True)
    model.checkpoint_info = meta
    return model.to(torch.device(device)).eval()
