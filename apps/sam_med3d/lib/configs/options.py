"""The app's ``--conf`` options: names, documented defaults and parsing into typed values.

MONAI Label hands the app every ``--conf KEY VALUE`` pair as strings. Its ``monailabel`` launcher re-splits
its arguments on spaces, so every value here has a form without spaces: labels are written
``spleen=1,liver=2`` (or ``spleen,liver``, or JSON without spaces such as ``{"spleen":1,"liver":2}``).

Every bad value raises ``ValueError`` naming the option and the value, so a typo stops the server at start
with one readable line instead of failing on the first click.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

import torch

#: Largest weight of the retention term (``--conf retention`` and the Train option of the same name).
MAX_RETENTION = 100.0

#: Largest ratio of rehearsal samples to the user's (``--conf rehearsal`` and the Train option).
MAX_REHEARSAL = 4.0

#: What the ``auto`` trainer defaults are, by ``finetuned_for``. Fine-tuned weights that answer only the labels
#: they were trained on ("trained") need not keep what the model could do elsewhere, so every weight is tuned
#: (a lower rate for the encoder's sake) and the forgetting guards are off: tuned so, 5 annotated spleens raised
#: Dice@5 on other spleens by +0.097, against +0.018 with the encoder frozen (docs/app.md). Weights that answer
#: every label ("all") keep the guards: retention, rehearsal and the reference check, with the encoder frozen.
AUTO_TRAINING: Dict[str, Dict[str, str]] = {
    "trained": {"lr": "0.0005", "freeze_encoder": "false", "retention": "0", "rehearsal": "0",
                "max_forgetting": "1", "max_structure_forgetting": "1"},
    "all": {"lr": "0.001", "freeze_encoder": "true", "retention": "4.0", "rehearsal": "0.5",
            "max_forgetting": "0.05", "max_structure_forgetting": "0.1"},
}

#: Every option the app reads, with its default (as the string a user would pass) and one line of help.
#: docs/app.md renders the same table; keep the two in step.
DEFAULTS: Dict[str, str] = {
    "checkpoint": "default",
    "model": "auto",
    "labels": "liver,spleen,kidney_right,kidney_left,lung_right,lung_left,vertebrae,aorta",
    "device": "auto",
    "model_dir": "",
    "cache_size": "16",
    "cache_ttl_s": "1800",
    "cache_max_gb": "8",
    "preload": "true",
    "use_finetuned": "true",
    "finetuned_for": "trained",
    "epochs": "20",
    "samples_per_epoch": "16",
    "retention": "auto",
    "rehearsal": "auto",
    "rehearsal_data": "auto",
    "max_forgetting": "auto",
    "max_structure_forgetting": "auto",
    "blend": "0.5",
    "val_split": "0.2",
    "lr": "auto",
    "train_clicks": "5",
    "freeze_encoder": "auto",
    "multi_gpu": "false",
    "uncertainty_prompts": "3",
    "prefetch": "16",
    "extension": "slide",
    "extension_max_crops": "8",
    "extension_time_s": "10",
    "cors_origins": "",
    "max_voxels": "268435456",
    "result_compress": "false",
}

HELP: Dict[str, str] = {
    "checkpoint": "weights to serve: a path, an http(s) URL, 'turbo' (official SAM-Med3D-turbo), 'bundled' "
                  "(small offline model) or 'default' (turbo downloaded into model_dir, else bundled)",
    "model": "architecture: 'auto' (what the checkpoint records; official files are vit_b_ori) or a name from "
             "sam_med3d.CONFIGS (vit_b_ori, vit_tiny, vit_mini) that the checkpoint must match",
    "labels": "label names and values: 'spleen=1,liver=2', 'spleen,liver' (values 1..N) or JSON without spaces",
    "device": "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'",
    "model_dir": "where downloaded and fine-tuned weights live (default: <app>/model)",
    "cache_size": "how many images keep their session (image embedding, each annotator's clicks and label map) "
                  "between clicks",
    "cache_ttl_s": "seconds after its last click before an image's predictor is dropped",
    "cache_max_gb": "estimated memory (GiB) all sessions may hold together; least recently used beyond are dropped "
                    "(0: no bound)",
    "preload": "load the model when the server starts (true) or on the first click (false)",
    "use_finetuned": "serve <model_dir>/finetuned_<base>.pt (written by training) when it exists",
    "finetuned_for": "which labels the fine-tuned weights answer: 'trained' (the labels they were trained on; "
                     "every other label is answered by the base weights, so tuning on one structure never "
                     "changes the others) or 'all'",
    "epochs": "default max_epochs of a training run (the Train request may override it)",
    "samples_per_epoch": "training samples drawn per epoch at least: with fewer saved targets each is drawn "
                         "again (new crop jitter, flips and clicks) so a few labels still give enough steps",
    "retention": "weight of the term that keeps the tuned model's answers to clicks elsewhere in the image "
                 "close to the served model's (0: off), so tuning on one structure does not forget the others; 'auto': 0 "
                 "with finetuned_for trained, 4.0 with all",
    "rehearsal": "rehearsal samples per sample of the user's labels in each epoch (0: off): structures of the "
                 "rehearsal set trained alongside, so the model keeps segmenting them; 'auto': 0 with finetuned_for "
                 "trained, 0.5 with all",
    "rehearsal_data": "labelled scans of other structures to rehearse and to check forgetting on (imagesTr/ + "
                      "labelsTr/): 'auto' (the bundled model: phantoms like its training data; other models: "
                      "none), 'none' or a folder",
    "max_forgetting": "a round publishes only if the Dice on the rehearsal set's held-back scans is at most this "
                      "far below the base model's (1: off; 'auto': 1 with finetuned_for trained, 0.05 with all)",
    "max_structure_forgetting": "... and no single structure there is more than this far below the base model's "
                                "(1: off; 'auto': 1 with finetuned_for trained, 0.1 with all)",
    "blend": "when a candidate epoch fails max_forgetting or max_structure_forgetting, publish instead base + blend * (tuned - base) (then "
             "half of it) if that passes validation and the check; 0: off",
    "val_split": "default fraction of labelled images held out for validation Dice",
    "lr": "default AdamW learning rate for fine-tuning; 'auto': 0.0005 with finetuned_for trained, 0.001 with all",
    "train_clicks": "simulated click iterations per training sample (paper-style click training)",
    "freeze_encoder": "tune the prompt encoder and mask decoder only (true) or every weight (false); 'auto': "
                      "false with finetuned_for trained, true with all",
    "multi_gpu": "default for the trainer's multi_gpu (torch.distributed over all visible GPUs)",
    "uncertainty_prompts": "automatic prompts per image for the model-based active-learning score",
    "prefetch": "DICOMweb only: how many series to download and convert in the background at start (0: none)",
    "extension": "structures larger than one 192 mm crop: 'slide' (follow the mask into neighbouring crops), "
                 "'zoom' (coarse 3 mm pass, then 1.5 mm crops) or 'off' (one crop, the official behaviour)",
    "extension_max_crops": "most crops one click may use for a structure larger than a crop",
    "extension_time_s": "time budget (s) per click for extra crops; the mask so far is returned when it runs out",
    "cors_origins": "web origins whose pages may call the API, comma-separated (e.g. https://viewer.example.org); "
                    "default none (OHIF at /ohif/ is same-origin, Slicer is not a browser)",
    "max_voxels": "largest scan accepted (voxels, read from the file's header before the data is decompressed); "
                  "default 2^28 = 512x512x1024, about 1 GiB as float32",
    "result_compress": "gzip the NRRD label map sent back when the request does not say (3D Slicer never does); "
                       "true for viewers on a network: 78 MB -> about 0.5 MB for a 512x512x300 CT, for about "
                       "0.1 s of server time per click",
}

def _finetuned_for(value: str) -> str:
    from lib.configs.weights import FINETUNED_FOR

    choice = str(value).strip().lower()
    if choice not in FINETUNED_FOR:
        raise ValueError(f"--conf finetuned_for must be one of {', '.join(FINETUNED_FOR)}, got {value!r}")
    return choice


def _origins(value: str) -> tuple:
    origins = tuple(o.strip().rstrip("/") for o in str(value).split(",") if o.strip())
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest or "*" in origin:
            raise ValueError(f"--conf cors_origins: {origin!r} is not an origin like https://viewer.example.org "
                             "(scheme and host[:port], no path, no wildcard)")
    return origins


def _clicks(value: str) -> tuple:
    from sam_med3d.training import click_iterations

    try:
        return click_iterations(str(value))
    except ValueError as err:
        raise ValueError(f"--conf train_clicks: {err}") from None


def _extension(value: str) -> str:
    text = str(value).strip().lower()
    if text in ("slide", "zoom", "off"):
        return text
    raise ValueError(f"--conf extension {value!r} must be 'slide', 'zoom' or 'off'")


def _rehearsal_data(value: str) -> str:
    text = str(value).strip()
    if text.lower() in ("auto", "none"):
        return text.lower()
    folder = os.path.abspath(os.path.expanduser(text))
    if not (os.path.isdir(os.path.join(folder, "imagesTr")) and os.path.isdir(os.path.join(folder, "labelsTr"))):
        raise ValueError(f"--conf rehearsal_data {value!r} must be 'auto', 'none' or a folder with imagesTr/ and "
                         "labelsTr/ (the Medical Segmentation Decathlon layout)")
    return folder


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(name: str, value: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"--conf {name} must be true or false, got {value!r}")


def _int(name: str, value: str, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"--conf {name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"--conf {name} must be an integer >= {minimum}, got {number}")
    return number


def _float(name: str, value: str, low: float, high: float, low_open: bool = False) -> float:
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"--conf {name} must be a number in {interval}, got {value!r}") from None
    if not (low < number <= high if low_open else low <= number <= high):
        raise ValueError(f"--conf {name} must be in {interval}, got {number}")
    return number


def parse_labels(text: str) -> Dict[str, int]:
    """Parse the ``labels`` option into ``{name: value}`` with ``"background": 0`` first.

    Accepted forms (none needs a space, see the module docstring):

    - ``spleen=1,liver=6``: explicit values;
    - ``spleen,liver``: values 1, 2, ... in the order given;
    - JSON without spaces: ``{"spleen":1,"liver":6}`` or ``["spleen","liver"]``.

    Values must be integers 1..255 (label maps are written as 8-bit or 16-bit images and 0 is background),
    unique, and names unique and non-empty. ``background`` may be listed only with value 0.

    Raises:
        ValueError: naming the option and what is wrong with it.
    """
    raw = str(text).strip()
    if not raw:
        raise ValueError("--conf labels is empty; give e.g. 'spleen=1,liver=2' or 'spleen,liver'")
    pairs: list
    if raw[0] in "{[":
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"--conf labels looks like JSON but does not parse ({err.msg} at character "
                             f"{err.pos}): {raw!r}") from None
        if isinstance(parsed, dict):
            pairs = list(parsed.items())
        elif isinstance(parsed, list):
            pairs = [(name, i + 1) for i, name in enumerate(parsed)]
        else:
            raise ValueError(f"--conf labels JSON must be an object or a list, got {raw!r}")
    else:
        items = [item.strip() for item in raw.split(",")]
        if any(not item for item in items):
            raise ValueError(f"--conf labels has an empty entry: {raw!r}")
        if all("=" in item for item in items):
            pairs = [tuple(part.strip() for part in item.split("=", 1)) for item in items]
        elif any("=" in item for item in items):
            raise ValueError(f"--conf labels mixes 'name=value' and bare names: {raw!r}; use one form")
        else:
            pairs = [(name, i + 1) for i, name in enumerate(items)]

    labels: Dict[str, int] = {"background": 0}
    seen_values: Dict[int, str] = {}
    for name, value in pairs:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"--conf labels has an empty label name in {raw!r}")
        name = name.strip()
        try:
            number = int(value)
            if isinstance(value, float) and value != number:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"--conf labels: the value of {name!r} must be an integer, got {value!r}") from None
        if name == "background":
            if number != 0:
                raise ValueError(f"--conf labels: 'background' is always 0, got {number}")
            continue
        if not 1 <= number <= 255:
            raise ValueError(f"--conf labels: the value of {name!r} must be in 1..255 (0 is background), "
                             f"got {number}")
        if name in labels:
            raise ValueError(f"--conf labels lists {name!r} twice")
        if number in seen_values:
            raise ValueError(f"--conf labels gives {seen_values[number]!r} and {name!r} the same value {number}")
        labels[name] = number
        seen_values[number] = name
    if len(labels) == 1:
        raise ValueError(f"--conf labels names no label besides background: {raw!r}")
    return labels


def resolve_device(value: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; otherwise check the name is usable here."""
    text = str(value).strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--conf device {value!r} asks for CUDA, but no CUDA device is available here; "
                             "use 'cpu' or 'auto'")
        if text.startswith("cuda:"):
            index = _int("device", text[5:], 0)
            if index >= torch.cuda.device_count():
                raise ValueError(f"--conf device {value!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return text
    raise ValueError(f"--conf device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


@dataclass(frozen=True)
class AppOptions:
    """The parsed ``--conf`` options (see :data:`DEFAULTS` and :data:`HELP`)."""

    checkpoint: str
    model: str
    labels: Dict[str, int]
    device: str
    model_dir: str
    cache_size: int
    cache_ttl_s: float
    preload: bool
    use_finetuned: bool
    epochs: int
    val_split: float
    lr: float
    train_clicks: tuple
    multi_gpu: bool
    uncertainty_prompts: int
    prefetch: int
    extension: str = "slide"
    extension_max_crops: int = 8
    extension_time_s: float = 10.0
    cors_origins: tuple = ()
    max_voxels: int = 268435456
    result_compress: bool = False
    cache_max_gb: float = 8.0
    samples_per_epoch: int = 16
    retention: float = 4.0
    rehearsal: float = 0.5
    rehearsal_data: str = "auto"
    max_forgetting: float = 0.05
    max_structure_forgetting: float = 0.1
    blend: float = 0.5
    finetuned_for: str = "trained"
    freeze_encoder: bool = True
    raw: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_conf(cls, conf: Optional[Mapping[str, str]], app_dir: str) -> "AppOptions":
        """Parse MONAI Label's ``conf`` dict (string values); unknown keys are kept in ``raw`` and ignored."""
        values = dict(DEFAULTS)
        values.update({k: str(v) for k, v in (conf or {}).items()})
        finetuned_for = _finetuned_for(values["finetuned_for"])
        for name, value in AUTO_TRAINING[finetuned_for].items():  # the trainer's "auto" defaults
            if values[name].strip().lower() == "auto":
                values[name] = value

        from sam_med3d.build import CONFIGS  # the named architectures live in the core package

        model = values["model"].strip()
        if model != "auto" and model not in CONFIGS:
            raise ValueError(f"--conf model {model!r} is not a known SAM-Med3D architecture; use 'auto' or one of "
                             f"{', '.join(sorted(CONFIGS))}")
        checkpoint = values["checkpoint"].strip()
        if not checkpoint:
            raise ValueError("--conf checkpoint is empty; give a path, a URL, 'turbo', 'bundled' or 'default'")
        model_dir = values["model_dir"].strip() or os.path.join(app_dir, "model")
        return cls(
            checkpoint=checkpoint,
            model=model,
            labels=parse_labels(values["labels"]),
            device=resolve_device(values["device"]),
            model_dir=os.path.abspath(os.path.expanduser(model_dir)),
            cache_size=_int("cache_size", values["cache_size"], 1),
            cache_ttl_s=_float("cache_ttl_s", values["cache_ttl_s"], 0.0, 7 * 24 * 3600.0, low_open=True),
            preload=_bool("preload", values["preload"]),
            use_finetuned=_bool("use_finetuned", values["use_finetuned"]),
            epochs=_int("epochs", values["epochs"], 1),
            val_split=_float("val_split", values["val_split"], 0.0, 0.9),
            lr=_float("lr", values["lr"], 0.0, 1.0, low_open=True),
            train_clicks=_clicks(values["train_clicks"]),
            multi_gpu=_bool("multi_gpu", values["multi_gpu"]),
            uncertainty_prompts=_int("uncertainty_prompts", values["uncertainty_prompts"], 1),
            prefetch=_int("prefetch", values["prefetch"], 0),
            extension=_extension(values["extension"]),
            extension_max_crops=_int("extension_max_crops", values["extension_max_crops"], 1),
            extension_time_s=_float("extension_time_s", values["extension_time_s"], 0.0, 3600.0),
            cors_origins=_origins(values["cors_origins"]),
            max_voxels=_int("max_voxels", values["max_voxels"], 1),
            result_compress=_bool("result_compress", values["result_compress"]),
            cache_max_gb=_float("cache_max_gb", values["cache_max_gb"], 0.0, 4096.0),
            samples_per_epoch=_int("samples_per_epoch", values["samples_per_epoch"], 1),
            retention=_float("retention", values["retention"], 0.0, MAX_RETENTION),
            rehearsal=_float("rehearsal", values["rehearsal"], 0.0, MAX_REHEARSAL),
            rehearsal_data=_rehearsal_data(values["rehearsal_data"]),
            max_forgetting=_float("max_forgetting", values["max_forgetting"], 0.0, 1.0),
            max_structure_forgetting=_float("max_structure_forgetting", values["max_structure_forgetting"], 0.0, 1.0),
            blend=_float("blend", values["blend"], 0.0, 1.0),
            finetuned_for=finetuned_for,
            freeze_encoder=_bool("freeze_encoder", values["freeze_encoder"]),
            raw=values,
        )
