"""Every option of the app, in one schema: ``--conf`` options and the options of a Train request.

:data:`OPTIONS` lists each option once (:class:`Option`: name, default, help, accepted values, ``auto`` values,
the name a Train request uses for it). Everything else is read from it:

- :meth:`AppOptions.from_conf` parses MONAI Label's ``--conf KEY VALUE`` strings at start; a bad value raises
  ``ValueError`` naming the option and the value, so a typo stops the server with one readable line instead of
  failing on the first click;
- :func:`train_config` gives the training task its config (the defaults of a Train request, shown by the
  viewers) and :func:`train_value` types a value read back from a request;
- :func:`check_train_request` checks a Train request's options (type and range) in the server, before a
  training subprocess starts (:mod:`lib.trainers.preflight`);
- :func:`options_table` renders the options table of ``docs/app.md`` (a test fails when the two differ;
  regenerate with ``cd apps/sam_med3d && python -m lib.options``).

MONAI Label's ``monailabel`` launcher re-splits its arguments on spaces, so every ``--conf`` value has a form
without spaces: labels are written ``spleen=1,liver=2`` (or ``spleen,liver``, or JSON without spaces such as
``{"spleen":1,"liver":2}``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch

from sam_med3d.build import CONFIGS  # the named architectures live in the core package

#: Values of ``--conf finetuned_for``: which labels the fine-tuned weights answer.
FINETUNED_FOR = ("trained", "all")


# ------------------------------------------------------------------------------------------- value kinds
def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Kind:
    """How an option's values are written, parsed and checked.

    ``parse`` reads the ``--conf`` string; ``check`` a Train request's JSON value (raising ``ValueError`` whose
    message :func:`check_train_request` prefixes with ``train option <name>``); ``value`` types a value read back
    from a request or the task's config; ``config`` writes a parsed value as the training task's config shows it;
    ``accepted`` says in the docs what is accepted.
    """

    accepted = ""

    def parse(self, name: str, text: str) -> Any:
        return str(text).strip()

    def check(self, value: Any) -> None:
        """Raise ``ValueError("must be ..., got ...")`` unless ``value`` is acceptable in a Train request."""

    def value(self, value: Any) -> Any:
        return value

    def config(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class Integer(Kind):
    low: int
    high: Optional[int] = None

    @property
    def accepted(self) -> str:
        return f"{self.low}..{self.high}" if self.high is not None else f">= {self.low}"

    def _ok(self, number: int) -> bool:
        return self.low <= number and (self.high is None or number <= self.high)

    def parse(self, name: str, text: str) -> int:
        what = f"an integer in {self.low}..{self.high}" if self.high is not None else f"an integer >= {self.low}"
        try:
            number = int(str(text).strip())
        except ValueError:
            raise ValueError(f"--conf {name} must be {what}, got {text!r}") from None
        if not self._ok(number):
            raise ValueError(f"--conf {name} must be {what}, got {number}")
        return number

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not self._ok(value):
            what = f"in {self.low}..{self.high}" if self.high is not None else f">= {self.low}"
            raise ValueError(f"must be an integer {what}, got {_short(value)}")

    def value(self, value: Any) -> int:
        return int(value)

    config = value


@dataclass(frozen=True)
class Number(Kind):
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    @property
    def accepted(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def _ok(self, number: float) -> bool:
        return (math.isfinite(number) and (self.low < number if self.low_open else self.low <= number)
                and (number < self.high if self.high_open else number <= self.high))

    def parse(self, name: str, text: str) -> float:
        try:
            number = float(str(text).strip())
        except ValueError:
            raise ValueError(f"--conf {name} must be a number in {self.accepted}, got {text!r}") from None
        if not self._ok(number):
            raise ValueError(f"--conf {name} must be in {self.accepted}, got {number}")
        return number

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self._ok(value):
            raise ValueError(f"must be a number in {self.accepted}, got {_short(value)}")

    def value(self, value: Any) -> float:
        return float(value or 0.0)

    config = value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Flag(Kind):
    """true or false. ``words_in_requests``: a Train request may also send the words as strings (a viewer that
    sends every option as text), which :meth:`value` reads; otherwise it must send a JSON boolean (MONAI Label
    itself reads such an option with a bare ``if``, where the string ``"false"`` would count as true)."""

    words_in_requests: bool = False
    accepted = "true, false"

    def parse(self, name: str, text: str) -> bool:
        word = str(text).strip().lower()
        if word in _TRUE + _FALSE:
            return word in _TRUE
        raise ValueError(f"--conf {name} must be true or false, got {text!r}")

    def check(self, value: Any) -> None:
        words = self.words_in_requests and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE
        if not (isinstance(value, bool) or words):
            raise ValueError(f"must be true or false, got {_short(value)}")

    def value(self, value: Any) -> bool:
        if isinstance(value, str):
            return value.strip().lower() in _TRUE
        return bool(value)

    config = value


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``choices``. In a Train request the task's config shows the choices as a list (a viewer's drop-down,
    the first the default), and a request that sends the whole list means the default."""

    choices: Tuple[str, ...]

    @property
    def accepted(self) -> str:
        return ", ".join(self.choices)

    def parse(self, name: str, text: str) -> str:
        word = str(text).strip().lower()
        if word not in self.choices:
            raise ValueError(f"--conf {name} must be one of {', '.join(self.choices)}, got {text!r}")
        return word

    def check(self, value: Any) -> None:
        values = value if isinstance(value, list) and value else [value]
        if not all(isinstance(v, str) and v in self.choices for v in values):
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {_short(value)}")

    def value(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return value[0] if value else None
        return value

    def config(self, value: Any) -> Any:
        return list(self.choices) if value is None else value


@dataclass(frozen=True)
class Text(Kind):
    """A string of at most ``max_length`` characters (``None`` passes)."""

    max_length: int = 256
    accepted = "text"

    def check(self, value: Any) -> None:
        if value is not None and (not isinstance(value, str) or len(value) > self.max_length):
            raise ValueError(f"must be a string of at most {self.max_length} characters, got {_short(value)}")


@dataclass(frozen=True)
class Clicks(Kind):
    """Click iterations per training sample: ``N`` or ``LOW-HIGH`` (drawn per sample), within 1..100."""

    accepted = "1..100 or LOW-HIGH"

    def parse(self, name: str, text: str) -> Tuple[int, int]:
        from sam_med3d.training import click_iterations

        try:
            return click_iterations(str(text))
        except ValueError as err:
            raise ValueError(f"--conf {name}: {err}") from None

    def check(self, value: Any) -> None:
        from sam_med3d.training import click_iterations

        try:
            click_iterations(value)
        except ValueError:
            raise ValueError(f"must be an integer in 1..100 or a range LOW-HIGH within it (drawn per sample), "
                             f"got {_short(value)}") from None

    def value(self, value: Any) -> Tuple[int, int]:
        from sam_med3d.training import click_iterations

        return click_iterations(value)

    def config(self, value: Any) -> Any:
        """An int for a fixed count, ``"LOW-HIGH"`` for a range (as a viewer shows and sends it back)."""
        low, high = self.value(value)
        return low if low == high else f"{low}-{high}"


@dataclass(frozen=True)
class Custom(Kind):
    """An option with its own parser (``parse_text(name, text)``) and, if a request may set it, checker."""

    parse_text: Callable[[str, str], Any]
    check_value: Optional[Callable[[Any], None]] = None
    accepted: str = ""

    def parse(self, name: str, text: str) -> Any:
        return self.parse_text(name, text)

    def check(self, value: Any) -> None:
        if self.check_value is not None:
            self.check_value(value)


# ------------------------------------------------------------------------------------- custom parsers
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
            index = Integer(0).parse("device", text[5:])
            if index >= torch.cuda.device_count():
                raise ValueError(f"--conf device {value!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return text
    raise ValueError(f"--conf device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


def _checkpoint(name: str, text: str) -> str:
    checkpoint = str(text).strip()
    if not checkpoint:
        raise ValueError("--conf checkpoint is empty; give a path, a URL, 'turbo', 'bundled' or 'default'")
    return checkpoint


def _model(name: str, text: str) -> str:
    model = str(text).strip()
    if model != "auto" and model not in CONFIGS:
        raise ValueError(f"--conf model {model!r} is not a known SAM-Med3D architecture; use 'auto' or one of "
                         f"{', '.join(sorted(CONFIGS))}")
    return model


def _folder(name: str, text: str) -> str:
    """A folder, absolute; empty stays empty (:meth:`AppOptions.from_conf` puts ``<app>/model`` there)."""
    text = str(text).strip()
    return os.path.abspath(os.path.expanduser(text)) if text else ""


def _origins(name: str, value: str) -> tuple:
    origins = tuple(o.strip().rstrip("/") for o in str(value).split(",") if o.strip())
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest or "*" in origin:
            raise ValueError(f"--conf cors_origins: {origin!r} is not an origin like https://viewer.example.org "
                             "(scheme and host[:port], no path, no wildcard)")
    return origins


def _rehearsal_data(name: str, value: str) -> str:
    text = str(value).strip()
    if text.lower() in ("auto", "none"):
        return text.lower()
    folder = os.path.abspath(os.path.expanduser(text))
    if not (os.path.isdir(os.path.join(folder, "imagesTr")) and os.path.isdir(os.path.join(folder, "labelsTr"))):
        raise ValueError(f"--conf rehearsal_data {value!r} must be 'auto', 'none' or a folder with imagesTr/ and "
                         "labelsTr/ (the Medical Segmentation Decathlon layout)")
    return folder


def _request_device(value: Any) -> None:
    devices = value if isinstance(value, list) else [value]
    if not devices or not all(isinstance(d, str) and re.fullmatch(r"cpu|cuda(:\d{1,2})?", d) for d in devices):
        raise ValueError(f"must be 'cpu', 'cuda' or 'cuda:N', got {_short(value)}")


def _request_gpus(value: Any) -> None:
    if not (isinstance(value, str) and re.fullmatch(r"all|\d{1,2}(,\d{1,2})*", value)):
        raise ValueError(f"must be 'all' or GPU indices such as '0,1', got {_short(value)}")


# ---------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Option:
    """One option.

    Attributes:
        name: the ``--conf`` name (``conf`` true), else the Train request's name.
        default: the default as a user writes it on ``--conf`` (``auto``: from :attr:`auto`); for a request-only
            option the value the training task's config shows, or ``None`` when it shows none.
        kind: how values are parsed and checked (:class:`Kind`).
        help: the docs table's text (Markdown).
        auto: with ``default`` ``auto``: the value for each ``--conf finetuned_for`` (:data:`FINETUNED_FOR`).
        request: the name under which a Train request may set the option (``None``: it may not).
        conf: whether ``--conf`` sets it (false: an option of MONAI Label's training task only).
        shown_default: the default as the docs show it, when not ``default`` (e.g. a folder made at start).
    """

    name: str
    default: Any
    kind: Kind
    help: str = ""
    auto: Optional[Mapping[str, str]] = None
    request: Optional[str] = None
    conf: bool = True
    shown_default: Optional[str] = None


def _auto(trained: str, all_labels: str) -> Mapping[str, str]:
    return {"trained": trained, "all": all_labels}


#: Most epochs one training run may have.
MAX_EPOCHS = 1000

OPTIONS: Tuple[Option, ...] = (
    Option("checkpoint", "default", Custom(_checkpoint, accepted="default, turbo, bundled, a path or a URL"),
           "weights to serve: a path, an http(s) URL, `turbo` (official SAM-Med3D-turbo), `bundled` (small offline "
           "model) or `default` (turbo downloaded into `model_dir`, else bundled)"),
    Option("model", "auto", Custom(_model, accepted=", ".join(("auto",) + tuple(CONFIGS))),
           "architecture: `auto` (what the checkpoint records; official files are `vit_b_ori`) or a name from "
           "`sam_med3d.CONFIGS` that the checkpoint must match"),
    Option("labels", "liver,spleen,kidney_right,kidney_left,lung_right,lung_left,vertebrae,aorta",
           Custom(lambda name, text: parse_labels(text), accepted="names, name=value pairs or JSON"),
           "label names and values: `spleen=1,liver=2`, `spleen,liver` (values 1..N) or JSON without spaces; "
           "values 1..255, background is 0. The default matches the sample phantoms"),
    Option("device", "auto", Custom(lambda name, text: resolve_device(text), accepted="auto, cpu, cuda, cuda:N"),
           "`auto` (cuda if available, else cpu), `cpu`, `cuda` or `cuda:N`"),
    Option("model_dir", "", Custom(_folder, accepted="a folder"),
           "where downloaded and fine-tuned weights and training runs live", shown_default="`<app>/model`"),
    Option("cache_size", "16", Integer(1),
           "how many images keep their session between clicks: the scan, the image embeddings (shared by all "
           "annotators of the image) and each annotator's clicks, previous masks and label map (see "
           "[Sessions](#requests-and-results))"),
    Option("cache_ttl_s", "1800", Number(0.0, 7 * 24 * 3600.0, low_open=True),
           "seconds after its last click before an image's session is dropped"),
    Option("cache_max_gb", "8", Number(0.0, 4096.0),
           "estimated memory (GiB) all sessions may hold together (about 24 bytes per scan voxel per image plus 10 "
           "per annotator, measured by `benchmarks/session_memory.py`); least recently used sessions beyond are "
           "dropped; `0`: no bound"),
    Option("preload", "true", Flag(),
           "load the model when the server starts (`true`) or on the first click (`false`)"),
    Option("use_finetuned", "true", Flag(),
           "serve `<model_dir>/finetuned_<base>.pt` (written by training) when it exists"),
    Option("finetuned_for", "trained", Choice(FINETUNED_FOR),
           "which labels the fine-tuned weights answer: `trained` = the labels they were trained on (the names of "
           "the saved label values, recorded in the checkpoint as `structures`); every other label is answered by "
           "the base weights, so training on your spleens never changes what a click on the liver gives; `all` = "
           "every label (weights published by a trainer that recorded no `structures` also answer every label). "
           "Each result says per label which weights answered (`\"weights\": \"fine-tuned\"` / `\"base\"`)"),
    Option("epochs", "20", Integer(1, MAX_EPOCHS), "epochs of a training run", request="max_epochs"),
    Option("samples_per_epoch", "16", Integer(1, 10000),
           "training samples drawn per epoch at least: with fewer saved targets each is drawn again (new crop "
           "jitter, flips and clicks), so a few labels still give enough optimizer steps",
           request="samples_per_epoch"),
    Option("retention", "auto", Number(0.0, 100.0),
           "weight of the retention term: the tuned model's answers to simulated clicks elsewhere in the training "
           "images are kept close to the base model's (learning without forgetting), so tuning on one structure "
           "does not forget the others; `0`: off", auto=_auto("0", "4.0"), request="retention"),
    Option("rehearsal", "auto", Number(0.0, 4.0),
           "rehearsal samples per sample of your labels in each epoch (`0`: off): scans of the rehearsal set are "
           "trained alongside your labels, one of their structures per draw, so the model keeps segmenting what it "
           "could before", auto=_auto("0", "0.5"), request="rehearsal"),
    Option("rehearsal_data", "auto", Custom(_rehearsal_data, accepted="auto, none or a folder"),
           "labelled scans of other structures to rehearse and to check forgetting on, a folder with `imagesTr/` + "
           "`labelsTr/`: `auto` = for the bundled model, phantoms drawn like its training data (written to "
           "`<model_dir>/rehearsal_bundled/` on the first Train, 8 scans, ~25 s); for other models none (point it "
           "at the public data your base model was trained on); `none` = off. A Train request never names a folder"),
    Option("max_forgetting", "auto", Number(0.0, 1.0),
           "a round publishes new weights only if their Dice on the rehearsal set's held-back scans (every 4th, all "
           "their structures, seeded clicks: as many as the most `train_clicks`) is at most this far below the "
           "base model's; `1`: off", auto=_auto("1", "0.05"), request="max_forgetting"),
    Option("max_structure_forgetting", "auto", Number(0.0, 1.0),
           "... and only if no single structure there (its held-back targets averaged) lost more than this against "
           "the base model (a decoder tuned on the spleen can forget only the left kidney next to it); the log "
           "names the structure that lost most; `1`: off", auto=_auto("1", "0.1"),
           request="max_structure_forgetting"),
    Option("blend", "0.5", Number(0.0, 1.0),
           "when an epoch's weights beat validation but fail `max_forgetting` or `max_structure_forgetting`, the "
           "blend base + `blend` x (tuned - base), then half of it, is validated and checked like an epoch and "
           "published if it passes (weight-space interpolation, WiSE-FT); training goes on from the tuned weights; "
           "`0`: off", request="blend"),
    Option("val_split", "0.2", Number(0.0, 1.0, high_open=True),
           "fraction of labelled images held out for validation Dice", request="val_split"),
    Option("lr", "auto", Number(0.0, 1.0, low_open=True),
           "AdamW learning rate for fine-tuning", auto=_auto("0.0005", "0.001"), request="lr"),
    Option("freeze_encoder", "auto", Flag(words_in_requests=True),
           "tune the prompt encoder and mask decoder only (`true`) or every weight (`false`; the tuned weights "
           "answer only their labels with `finetuned_for trained`, so nothing elsewhere needs keeping)",
           auto=_auto("false", "true"), request="freeze_encoder"),
    Option("train_clicks", "5", Clicks(),
           "simulated click iterations per training sample: `N`, or `LOW-HIGH` to draw the number per sample (e.g. "
           "`1-10`: on average as many as `5`, so about as fast, but the model also learns clicks 6-10); "
           "validation and the reference check use `HIGH` clicks", request="train_clicks"),
    Option("multi_gpu", "false", Flag(), "torch.distributed over all visible GPUs for training",
           request="multi_gpu"),
    Option("uncertainty_prompts", "3", Integer(1), "automatic prompts per image for the model-based active-learning "
           "score"),
    Option("prefetch", "16", Integer(0),
           "DICOMweb only: how many series to download and convert in the background at start (`0`: none)"),
    Option("extension", "slide", Choice(("slide", "zoom", "off")),
           "structures larger than one 192 mm crop: `slide` (follow the mask into neighbouring crops), `zoom` "
           "(coarse 3 mm pass, then 1.5 mm crops) or `off` (one crop, the official behaviour)"),
    Option("extension_max_crops", "8", Integer(1), "most crops one click may use for a structure larger than a crop"),
    Option("extension_time_s", "10", Number(0.0, 3600.0),
           "time budget (s) per click for extra crops; the mask so far is returned when it runs out"),
    Option("cors_origins", "", Custom(_origins, accepted="origins, comma-separated"),
           "web origins whose pages may call the API, comma-separated (e.g. `https://viewer.example.org`); "
           "default none: OHIF at `/ohif/` is same-origin and Slicer is not a browser", shown_default="(none)"),
    Option("max_voxels", "268435456", Integer(1),
           "largest scan accepted, in voxels (2^28 = 512x512x1024, about 1 GiB as float32), checked from the file's "
           "header before its data is decompressed; a larger scan, label or DICOM series (datastore image, click "
           "upload, label sent with a click, `/session/` upload, `PUT /datastore/*` upload) is refused with 413"),
    Option("result_compress", "false", Flag(),
           "gzip the NRRD label map sent back when the request does not say (3D Slicer never does; OHIF asks for "
           "raw). Raw is fastest on the server's own machine; for viewers on a network, `true` turns the 78 MB map "
           "of a 512x512x300 CT into about 0.5 MB for about 0.1 s of server time per click (see [speed.md](speed.md))"),
    # Options of MONAI Label's training task that a Train request may set (no --conf).
    Option("seed", -1, Integer(-1, 2 ** 31 - 1),
           "`N` >= 0 seeds torch, numpy and MONAI at the start of the run, so the same labels and seed repeat the "
           "same crops, flips, sampling and clicks; `-1`: not seeded", request="seed", conf=False),
    Option("pretrained", True, Flag(), request="pretrained", conf=False),
    Option("train_batch_size", 1, Integer(1, 64), request="train_batch_size", conf=False),
    Option("val_batch_size", 1, Integer(1, 64), request="val_batch_size", conf=False),
    Option("early_stop_patience", None, Integer(-1, MAX_EPOCHS), request="early_stop_patience", conf=False),
    Option("dataset", None, Choice(("CacheDataset", "Dataset")), request="dataset", conf=False),
    Option("dataloader", None, Choice(("ThreadDataLoader", "DataLoader")), request="dataloader", conf=False),
    # MLflow logging is opt-in per request, not on by default.
    Option("tracking", None, Choice(("None", "mlflow")), request="tracking", conf=False),
    Option("train_device", None, Custom(lambda name, text: text, _request_device), request="device", conf=False),
    Option("gpus", None, Custom(lambda name, text: text, _request_gpus), request="gpus", conf=False),
    Option("name", None, Text(), request="name", conf=False),
    Option("tracking_uri", None, Text(), request="tracking_uri", conf=False),
    Option("tracking_experiment_name", None, Text(), request="tracking_experiment_name", conf=False),
    Option("client_id", None, Text(), request="client_id", conf=False),
)

CONF_OPTIONS: Dict[str, Option] = {o.name: o for o in OPTIONS if o.conf}
#: Options a Train request may set, by their name in the request.
TRAIN_OPTIONS: Dict[str, Option] = {o.request: o for o in OPTIONS if o.request}
#: ``--conf`` defaults as a user would write them.
DEFAULTS: Dict[str, str] = {name: o.default for name, o in CONF_OPTIONS.items()}


def _resolve_auto(values: Dict[str, str], finetuned_for: str) -> Dict[str, str]:
    for option in CONF_OPTIONS.values():
        if option.auto and str(values.get(option.name, option.default)).strip().lower() == "auto":
            values[option.name] = option.auto[finetuned_for]
    return values


# --------------------------------------------------------------------------------------------- parsed
class AppOptions(Mapping[str, Any]):
    """The parsed ``--conf`` options: ``options.lr``, ``options["lr"]``; ``raw`` holds the strings (unknown keys
    included: MONAI Label hands the app its own ``--conf`` keys too, which are ignored here)."""

    def __init__(self, values: Mapping[str, Any], raw: Mapping[str, str]):
        self._values = dict(values)
        self.raw = dict(raw)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"no --conf option {name!r}")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @classmethod
    def from_conf(cls, conf: Optional[Mapping[str, str]], app_dir: str) -> "AppOptions":
        """Parse MONAI Label's ``conf`` dict (string values), ``auto`` resolved by ``finetuned_for``."""
        raw = dict(DEFAULTS)
        raw.update({k: str(v) for k, v in (conf or {}).items()})
        finetuned_for = CONF_OPTIONS["finetuned_for"].kind.parse("finetuned_for", raw["finetuned_for"])
        _resolve_auto(raw, finetuned_for)
        values = {name: option.kind.parse(name, raw[name]) for name, option in CONF_OPTIONS.items()}
        values["model_dir"] = values["model_dir"] or os.path.abspath(os.path.join(app_dir, "model"))
        return cls(values, raw)

    def train_defaults(self) -> Dict[str, Any]:
        """The options a Train request may set, by ``--conf`` name (the training task's defaults)."""
        return {name: self._values[name] for name, option in CONF_OPTIONS.items() if option.request}


def train_config(given: Mapping[str, Any]) -> Dict[str, Any]:
    """The training task's config: each option a Train request may set, by its request name, as viewers show it.

    ``given``: typed values by ``--conf`` name (:meth:`AppOptions.train_defaults`); an option not given takes its
    schema default, ``auto`` resolved for ``finetuned_for all`` (the guarded defaults: a task built without
    knowing what its weights will answer keeps them from forgetting). Request-only options without a default
    are left out (MONAI Label's own default applies).
    """
    unknown = set(given) - {o.name for o in TRAIN_OPTIONS.values() if o.conf}
    if unknown:
        raise TypeError(f"not options of a Train request: {', '.join(sorted(unknown))}")
    defaults = _resolve_auto(dict(DEFAULTS), "all")
    config: Dict[str, Any] = {}
    for key, option in TRAIN_OPTIONS.items():
        if option.name in given:
            config[key] = option.kind.config(given[option.name])
        elif option.conf:
            config[key] = option.kind.config(option.kind.parse(option.name, defaults[option.name]))
        elif option.default is not None or isinstance(option.kind, Choice):  # a Choice shows its list
            config[key] = option.kind.config(option.default)
    return config


def train_value(key: str, value: Any) -> Any:
    """A Train request's (or the task's config's) value of option ``key``, checked and typed (e.g. ``"1-10"`` ->
    ``(1, 10)``); the training subprocess reads its options through this, so a request that reached it without
    the server's check still fails with the option's name."""
    option = TRAIN_OPTIONS[key]
    try:
        option.kind.check(value)
    except ValueError as err:
        raise ValueError(f"train option {key} {err}") from None
    return option.kind.value(value)


def check_train_request(options: Mapping[str, Any]) -> None:
    """Raise ``ValueError("train option <key> must be ..., got ...")`` for the first option of a Train request
    with a wrong type or range; keys that are no option are passed on unchecked."""
    for key in TRAIN_OPTIONS:
        if key in options:
            train_value(key, options[key])


# ------------------------------------------------------------------------------------------------ docs


def options_table(options: Sequence[Option] = OPTIONS) -> str:
    """The ``--conf`` options as the Markdown table of ``docs/app.md``."""
    rows = ["| option | default | accepted | Train request | meaning |", "|---|---|---|---|---|"]
    for option in options:
        if not option.conf:
            continue
        default = option.shown_default if option.shown_default is not None else f"`{option.default}`"
        meaning = option.help
        if option.auto:
            choices = ", ".join(f"`{value}` with `{which}`" for which, value in option.auto.items())
            meaning = f"{meaning}. `auto`: by `finetuned_for`: {choices}"
        request = f"`{option.request}`" if option.request else ""
        rows.append(f"| `{option.name}` | {default} | {option.kind.accepted} | {request} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(options_table(), end="")
