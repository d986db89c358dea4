"""Training data for ``pretrain/train.py``: finding cases, their prepared cache, one sample per target.

Layouts understood (any mix, found by walking each root for folders that hold ``imagesTr/`` and ``labelsTr/``):

- **Official SAM-Med3D**: ``<root>/<category>/<modality_dataset>/imagesTr|labelsTr/<case>.nii.gz`` with binary
  masks (no ``dataset.json``): one target per case, ``label > 0``, named by its category (the class folder).
  The same image usually appears in every class folder it has a mask in; the cache stores it once.
- **Multi-class with dataset.json** (``/work/shared/data``, nnU-Net raw, MSD): ``<dataset>/dataset.json`` names
  the labels (``{"0": "background", "1": "liver"}`` or nnU-Net v2 ``{"background": 0, "liver": 1}``); every
  class present in a case becomes its own binary target.

Images are matched to labels by case name: ``imagesTr/<case>.nii.gz`` or nnU-Net's ``imagesTr/<case>_0000.nii.gz``
(first channel).

The deterministic preprocessing (decode -> RAS -> 1.5 mm, each image once) is done beforehand by
``pretrain/prepare.py`` into the cache of :mod:`pretrain.cache`; training refuses a cache that is not prepared.
Each sample reads the target's mask and only the image blocks its crop touches, then applies the random part
(target crop with jitter, z-score, flips), seeded from ``(seed, epoch, index)`` so that a resumed run sees
exactly the samples an uninterrupted run would. Datasets hold no open files nor lambdas: DataLoader workers
may use any start method (fork, spawn, forkserver).
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset, DistributedSampler

from pretrain import cache as pcache
from sam_med3d.training import RandTargetCropd, crop_or_pad, crop_transforms, validation_transforms

IMAGE_SUFFIXES = (".nii.gz", ".nii")


# ------------------------------------------------------------------------------------------------ discovery
@dataclass(frozen=True)
class Case:
    """One image/label pair. ``classes``: ``{value: name}`` from dataset.json, or None (binary: label > 0).
    ``root``: the data folder it was found under; ``category``: the class folder of the official layout (the
    dataset folder's parent), None for dataset.json folders."""

    dataset: str
    case_id: str
    image: str
    label: str
    classes: Optional[Dict[int, str]]
    root: str = ""
    category: Optional[str] = None


@dataclass(frozen=True)
class Target:
    """One binary training target: ``label == label_value`` of ``cases[case_index]`` (``None``: label > 0)."""

    case_index: int
    label_value: Optional[int]
    name: str
    voxels: int


def _strip_suffix(name: str) -> Optional[str]:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def parse_label_names(meta: Mapping[str, Any], where: str) -> Dict[int, str]:
    """``dataset.json`` ``labels`` in MSD/nnU-Net v1 (``{"1": "liver"}``) or v2 (``{"liver": 1}``) form ->
    ``{1: "liver"}`` without background. nnU-Net v2 region labels (lists of values) are refused."""
    labels = meta.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"{where}: 'labels' must be a non-empty mapping of label values and names")
    out: Dict[int, str] = {}
    for key, value in labels.items():
        if str(key).lstrip("-").isdigit():
            number, name = int(key), str(value)
        elif isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            number, name = int(value), str(key)
        else:
            raise ValueError(f"{where}: label entry {key!r}: {value!r} is neither 'value: name' nor 'name: value' "
                             "(region-based labels are not supported; convert them with pretrain/convert_nnunet.py)")
        if number != 0:
            out[number] = name.replace(" ", "_")
    return out


def find_dataset_dirs(roots: Sequence[os.PathLike]) -> List[Path]:
    """Every folder under ``roots`` (or a root itself) that holds both ``imagesTr/`` and ``labelsTr/``."""
    return sorted({folder for folder, _ in _dataset_dirs_with_roots(roots)})


def _dataset_dirs_with_roots(roots: Sequence[os.PathLike]) -> List[Tuple[Path, Path]]:
    found: Dict[Path, Path] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data folder {root} does not exist or is not a folder")
        root = Path(os.path.abspath(root))
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            if "imagesTr" in dirnames and "labelsTr" in dirnames:
                found.setdefault(Path(dirpath), root)
                dirnames[:] = []  # a dataset folder does not nest further datasets
            else:
                dirnames.sort()
    return sorted(found.items())


def discover_cases(roots: Sequence[os.PathLike]) -> List[Case]:
    """All image/label pairs under ``roots`` (see the module docstring), sorted, with their class names."""
    cases: List[Case] = []
    for folder, root in _dataset_dirs_with_roots(roots):
        meta_path = folder / "dataset.json"
        classes = None
        category = None
        if meta_path.is_file():
            classes = parse_label_names(json.loads(meta_path.read_text()), str(meta_path))
        else:
            category = folder.parent.name
        for label in sorted((folder / "labelsTr").iterdir()):
            case_id = _strip_suffix(label.name)
            if case_id is None or label.name.startswith("."):
                continue
            image = None
            for stem in (case_id, f"{case_id}_0000"):
                for suffix in IMAGE_SUFFIXES:
                    candidate = folder / "imagesTr" / f"{stem}{suffix}"
                    if candidate.is_file():
                        image = candidate
                        break
                if image:
                    break
            if image is None:
                raise ValueError(f"label {label} has no image: expected {folder / 'imagesTr' / (case_id + '.nii.gz')}"
                                 f" (or {case_id}_0000.nii.gz)")
            cases.append(Case(dataset=str(folder), case_id=case_id, image=str(image), label=str(label),
                              classes=classes, root=str(root), category=category))
    if not cases:
        raise ValueError(f"no training cases found under {[str(r) for r in roots]}: expected folders with "
                         "imagesTr/ and labelsTr/ holding .nii.gz files")
    return cases


# ------------------------------------------------------------------------------------------------ the prepared cache
class PreparedData:
    """The cases of ``roots`` and their prepared cache (``pretrain/prepare.py`` fills it; see ``pretrain/cache.py``).

    ``keys[i]`` names case ``i``'s mask in the cache and ``counts[keys[i]]`` its per-value voxel counts at the
    training spacing (what :func:`make_targets` needs). Raises :class:`pretrain.cache.CacheNotPrepared` (a
    ValueError) naming what is missing when the cache lacks any case. Nothing is decoded here: opening a
    prepared cache reads only its progress files.
    """

    def __init__(self, cases: Sequence[Case], cache_dir: os.PathLike, spacing_mm: float, margin: int,
                 hint: str = "") -> None:
        self.cases = list(cases)
        self.layout = pcache.CacheLayout(cache_dir, spacing_mm, margin)
        self.entries = pcache.plan_entries(self.cases)
        records = pcache.prepared_records(self.layout, self.entries, hint)
        self.keys: List[str] = [""] * len(self.cases)
        self.counts: Dict[str, Dict[str, int]] = {}
        #: case index -> (entry key, image slot, label index in the entry, label bbox start in the entry frame)
        self.where: List[Tuple[str, int, int, Tuple[int, int, int]]] = [("", 0, 0, (0, 0, 0))] * len(self.cases)
        for case_index, key, label_index, meta in pcache.iter_labels(self.entries, records):
            name = f"{key}:{label_index}"
            self.keys[case_index] = name
            self.counts[name] = {str(k): int(v) for k, v in meta["counts"].items()}
            self.where[case_index] = (key, int(meta["image"]), label_index, tuple(int(v) for v in meta["lo"]))
        self.images = sum(len(r["images"]) for r in records.values())
        self.nbytes = sum(int(r["bytes"]) for r in records.values())

    def reader(self, max_open: int = 16) -> pcache.EntryReader:
        return pcache.EntryReader(self.layout, max_open=max_open)


def make_targets(cases: Sequence[Case], keys: Sequence[str], counts: Mapping[str, Mapping[str, int]],
                 min_voxels: int) -> List[Target]:
    """One target per (case, class) with at least ``min_voxels`` voxels at the training spacing (binary cases:
    label > 0). The official trainer skips targets of <= 1000 voxels. A binary (official layout) target is named
    by its category, a dataset.json target by its class name."""
    targets: List[Target] = []
    for index, case in enumerate(cases):
        case_counts = {int(k): int(v) for k, v in counts[keys[index]].items()}
        if case.classes is None:
            total = sum(v for k, v in case_counts.items() if k > 0)
            if total >= min_voxels:
                targets.append(Target(index, None, case.category or Path(case.dataset).name, total))
            continue
        for value, voxels in sorted(case_counts.items()):
            if value > 0 and voxels >= min_voxels:
                name = case.classes.get(value, f"label_{value}")
                targets.append(Target(index, value, name, voxels))
    return targets


def split_cases(num_cases: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Hold out ``round(val_fraction * num_cases)`` whole cases (at least 1 when the fraction is > 0 and there
    are >= 2 cases) for validation; returns ``(train_case_indices, val_case_indices)``, both sorted."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * num_cases))
    if val_fraction > 0 and num_cases >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, num_cases - 1)
    order = np.random.default_rng(seed).permutation(num_cases)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


# ------------------------------------------------------------------------------------------------ datasets
def sample_seed(*parts: int) -> int:
    """A 32-bit seed that depends only on ``parts`` (e.g. run seed, epoch, sample index)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class TargetDataset(Dataset):
    """``dataset[i]`` -> ``{"image": float32 (1, S, S, S), "label": float32 {0, 1} (1, S, S, S)}`` for
    ``targets[i]``, read from the prepared cache.

    The random crop transforms are reseeded from ``(seed, epoch, i)`` for every sample, so the sample does
    not depend on which DataLoader worker makes it nor on where a run was resumed. Call :meth:`set_epoch`
    before iterating (workers are started at iteration start and copy the epoch).

    A sample is what :func:`sam_med3d.training.crop_transforms` makes of the whole resampled scan, but the crop
    window is chosen on the target's mask first and only the image blocks inside it are read. ``memory_cases``:
    how many masks (and open cache files) each worker keeps (LRU).
    """

    def __init__(self, data: PreparedData, targets: Sequence[Target], crop_size: int, augment: bool = True,
                 jitter: Optional[int] = None, seed: int = 0, memory_cases: int = 4, center: str = "box") -> None:
        if not targets:
            raise ValueError("no training targets: every case's labels are empty or smaller than the configured "
                             "min_target_voxels")
        self.targets = list(targets)
        # Only what a sample needs, so that workers started by spawn receive a small pickle.
        self._where = [data.where[t.case_index] for t in self.targets]
        self.reader = data.reader(max_open=max(1, int(memory_cases)))
        self.crop_size = int(crop_size)
        self.transforms = crop_transforms(crop_size, augment=augment, jitter=jitter, center=center)
        self._crop_at = next(i for i, t in enumerate(self.transforms) if isinstance(t, RandTargetCropd))
        self.transform = Compose(self.transforms)
        self.seed = int(seed)
        self.epoch = 0
        self.memory_cases = int(memory_cases)
        self._labels: "OrderedDict[Tuple[str, int], np.ndarray]" = OrderedDict()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_labels"] = OrderedDict()
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def _label(self, key: str, index: int) -> np.ndarray:
        name = (key, index)
        if name in self._labels:
            self._labels.move_to_end(name)
            return self._labels[name]
        label = self.reader.label(key, index)
        if self.memory_cases > 0:
            self._labels[name] = label
            while len(self._labels) > self.memory_cases:
                self._labels.popitem(last=False)
        return label

    def __getitem__(self, i: int) -> Dict[str, Any]:
        target = self.targets[i]
        key, slot, label_index, lo = self._where[i]
        self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, i))
        label = torch.from_numpy(self._label(key, label_index).astype(np.int64))[None]
        d: Dict[str, Any] = {"label": label, "label_value": target.label_value}
        for t in self.transforms[:self._crop_at]:  # target selection: binary mask of this target
            d = t(d)
        crop = self.transforms[self._crop_at]
        crop.randomize()
        # The mask holds the target's whole bounding box, so the window is the one the crop would choose on
        # the whole scan; shift it into the stored frame and read only that part of the image.
        start = crop.window(d["label"])
        frame_start = [int(a) + int(b) for a, b in zip(start, lo)]
        d["label"] = crop_or_pad(torch.as_tensor(d["label"]), start, self.crop_size)
        d["image"] = torch.from_numpy(self.reader.image_window(key, slot, frame_start, self.crop_size))[None]
        for t in self.transforms[self._crop_at + 1:]:
            d = t(d)
        return {"image": d["image"], "label": d["label"], "index": i}


class OfficialValidationDataset(Dataset):
    """Validation targets as inference sees them: ``dataset[i]`` -> ``{"image", "label", "index"}`` from
    :func:`sam_med3d.training.validation_transforms` on the original files (the official pipeline's crop around
    the target), not from the training cache's frame. Samples are computed once and kept (validation repeats
    the same targets every time)."""

    def __init__(self, cases: Sequence[Case], targets: Sequence[Target], crop_size: int) -> None:
        self.cases = list(cases)
        self.targets = list(targets)
        self.transform = validation_transforms(crop_size)
        self._samples: Dict[int, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if i not in self._samples:
            target = self.targets[i]
            case = self.cases[target.case_index]
            out = self.transform({"image": case.image, "label": case.label, "label_value": target.label_value})
            self._samples[i] = {"image": out["image"], "label": out["label"].bool()}
        sample = self._samples[i]
        return {"image": sample["image"], "label": sample["label"].float(), "index": i}


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled per epoch from ``seed``, same length on every rank) that can start an
    epoch part-way through: ``set_start(k)`` skips this rank's first ``k`` indices of the current epoch (used
    once, when resuming mid-epoch; :meth:`set_epoch` resets it)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def describe_targets(cases: Sequence[Case], targets: Sequence[Target]) -> List[Dict[str, Any]]:
    """Plain-dict listing (for logs/JSON): dataset, case, class name/value, voxels."""
    return [dict(dataset=Path(cases[t.case_index].dataset).name, case=cases[t.case_index].case_id,
                 **{k: v for k, v in asdict(t).items() if k != "case_index"}) for t in targets]


def max_window_margin(crop_size: int, jitter: int) -> int:
    """Voxels around the labelled region a crop of ``crop_size`` with ``jitter`` can reach (plus one)."""
    return int(math.ceil(crop_size / 2)) + int(jitter) + 1
