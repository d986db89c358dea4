"""Training data for ``pretrain/train.py``: finding cases, caching their preprocessing, one sample per target.

Layouts understood (any mix, found by walking each root for folders that hold ``imagesTr/`` and ``labelsTr/``):

- **Official SAM-Med3D**: ``<root>/<category>/<modality_dataset>/imagesTr|labelsTr/<case>.nii.gz`` with binary
  masks (no ``dataset.json``): one target per case, ``label > 0``.
- **Multi-class with dataset.json** (``/work/shared/data``, nnU-Net raw, MSD): ``<dataset>/dataset.json`` names
  the labels (``{"0": "background", "1": "liver"}`` or nnU-Net v2 ``{"background": 0, "liver": 1}``); every
  class present in a case becomes its own binary target.

Images are matched to labels by case name: ``imagesTr/<case>.nii.gz`` or nnU-Net's ``imagesTr/<case>_0000.nii.gz``
(first channel).

Caching: the expensive deterministic part (decode NIfTI -> RAS -> 1.5 mm -> crop to the labelled region plus the
largest window any target can need) runs once per case through MONAI's :class:`~monai.data.PersistentDataset`
into ``<cache>/<variant>/`` (``variant`` names spacing and margin, so changed settings never read stale files);
per-class voxel counts go to ``<cache>/<variant>/counts.json``. Each epoch then only loads the cached tensors
and applies the random part (target crop with jitter, z-score, flips), seeded from ``(seed, epoch, index)``
so that a resumed run sees exactly the samples an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import Compose, CropForegroundd, MapTransform
from torch.utils.data import Dataset, DistributedSampler

from sam_med3d.training import crop_transforms, preprocess_transforms, validation_transforms

IMAGE_SUFFIXES = (".nii.gz", ".nii")
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ discovery
@dataclass(frozen=True)
class Case:
    """One image/label pair. ``classes``: ``{value: name}`` from dataset.json, or None (binary: label > 0)."""

    dataset: str
    case_id: str
    image: str
    label: str
    classes: Optional[Dict[int, str]]


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
    found: List[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data folder {root} does not exist or is not a folder")
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            if "imagesTr" in dirnames and "labelsTr" in dirnames:
                found.append(Path(dirpath))
                dirnames[:] = []  # a dataset folder does not nest further datasets
            else:
                dirnames.sort()
    return sorted(set(found))


def discover_cases(roots: Sequence[os.PathLike]) -> List[Case]:
    """All image/label pairs under ``roots`` (see the module docstring), sorted, with their class names."""
    cases: List[Case] = []
    for folder in find_dataset_dirs(roots):
        meta_path = folder / "dataset.json"
        classes = None
        if meta_path.is_file():
            classes = parse_label_names(json.loads(meta_path.read_text()), str(meta_path))
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
                              classes=classes))
    if not cases:
        raise ValueError(f"no training cases found under {[str(r) for r in roots]}: expected folders with "
                         "imagesTr/ and labelsTr/ holding .nii.gz files")
    return cases


# ------------------------------------------------------------------------------------------------ caching
class ToCacheRecordd(MapTransform):
    """Plain tensors for the cache: image float32 ``(1, I, J, K)``, label uint8/int16 ``(1, I, J, K)``."""

    def __init__(self) -> None:
        super().__init__(("image", "label"))

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        image, label = data["image"], data["label"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        label = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        label = torch.round(label.float())
        dtype = torch.uint8 if label.min() >= 0 and label.max() <= 255 else torch.int16
        return {"image": image.float().contiguous(), "label": label.to(dtype).contiguous()}


def _file_stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


class CaseCache:
    """Deterministic preprocessing of every case, computed once and stored with ``PersistentDataset``.

    ``cache[i]`` -> ``{"image": float32 (1, I, J, K), "label": (1, I, J, K) integer}`` in RAS at ``spacing_mm``,
    cropped to the labelled region plus ``margin`` voxels (the largest window a target crop can reach).
    """

    def __init__(self, cases: Sequence[Case], cache_dir: os.PathLike, spacing_mm: float, margin: int) -> None:
        self.cases = list(cases)
        self.variant = f"v{CACHE_VERSION}_sp{spacing_mm:g}_m{int(margin)}"
        self.dir = Path(cache_dir) / self.variant
        self.dir.mkdir(parents=True, exist_ok=True)
        transform = Compose(preprocess_transforms(spacing_mm, load=True) + [
            # Everything a crop can reach lies within `margin` of the labelled voxels; the rest is never read.
            CropForegroundd(("image", "label"), source_key="label", select_fn=lambda x: x > 0, margin=int(margin),
                            allow_smaller=True),
            ToCacheRecordd()])
        # The file stamps are part of each item's hash: an edited NIfTI gets a fresh cache entry.
        items = [{"image": c.image, "label": c.label, "stamp": [_file_stamp(c.image), _file_stamp(c.label)]}
                 for c in self.cases]
        self.keys = [hashlib.md5(json.dumps(item, sort_keys=True).encode()).hexdigest() for item in items]
        self.dataset = PersistentDataset(items, transform=transform, cache_dir=self.dir)
        self.counts_path = self.dir / "counts.json"

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        try:
            return self.dataset[index]
        except Exception as err:  # name the case: MONAI's transform errors are long and anonymous
            case = self.cases[index]
            raise RuntimeError(f"preprocessing {case.image} / {case.label} failed: {err}") from err

    def read_counts(self) -> Dict[str, Dict[str, int]]:
        if self.counts_path.is_file():
            try:
                return json.loads(self.counts_path.read_text())
            except json.JSONDecodeError:
                return {}
        return {}

    def write_counts(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Atomically replace ``counts.json`` (key -> {label value: voxels at the training spacing})."""
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".counts.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(dict(counts), f)
        os.replace(tmp, self.counts_path)

    def compute_counts(self, indices: Sequence[int], progress: bool = False,
                       num_workers: int = 0) -> Dict[str, Dict[str, int]]:
        """Fill the cache for ``indices`` (skipping cases already counted) and return their voxel counts."""
        known = self.read_counts()
        todo = [i for i in indices if self.keys[i] not in known]
        out = {self.keys[i]: known[self.keys[i]] for i in indices if self.keys[i] in known}
        if todo:
            loader = torch.utils.data.DataLoader(_CountSubset(self, todo), batch_size=None, num_workers=num_workers)
            if progress:
                from tqdm import tqdm
                loader = tqdm(loader, total=len(todo), desc="caching cases", unit="case")
            for key, counts in loader:
                out[key] = counts
        return out


class _CountSubset(Dataset):
    """Loads (hence caches) cases and returns their per-value voxel counts; used by the warm-up pass."""

    def __init__(self, cache: CaseCache, indices: Sequence[int]) -> None:
        self.cache, self.indices = cache, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tuple[str, Dict[str, int]]:
        index = self.indices[i]
        label = self.cache[index]["label"].long().flatten()
        values, counts = torch.unique(label, return_counts=True)
        return self.cache.keys[index], {str(int(v)): int(c) for v, c in zip(values, counts)}


def make_targets(cases: Sequence[Case], keys: Sequence[str], counts: Mapping[str, Mapping[str, int]],
                 min_voxels: int) -> List[Target]:
    """One target per (case, class) with at least ``min_voxels`` voxels at the training spacing (binary cases:
    label > 0). The official trainer skips targets of <= 1000 voxels."""
    targets: List[Target] = []
    for index, case in enumerate(cases):
        case_counts = {int(k): int(v) for k, v in counts[keys[index]].items()}
        if case.classes is None:
            total = sum(v for k, v in case_counts.items() if k > 0)
            if total >= min_voxels:
                targets.append(Target(index, None, Path(case.dataset).name, total))
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
    ``targets[i]``.

    The random crop transforms are reseeded from ``(seed, epoch, i)`` for every sample, so the sample does
    not depend on which DataLoader worker makes it nor on where a run was resumed. Call :meth:`set_epoch`
    before iterating (workers are forked at iteration start and copy the epoch).

    ``memory_cases``: how many decoded cases each worker keeps in memory (LRU), saving repeated loads of the
    cache files when one case holds several targets.
    """

    def __init__(self, cache: CaseCache, targets: Sequence[Target], crop_size: int, augment: bool = True,
                 jitter: Optional[int] = None, seed: int = 0, memory_cases: int = 4, center: str = "box") -> None:
        if not targets:
            raise ValueError("no training targets: every case's labels are empty or smaller than the configured "
                             "min_target_voxels")
        self.cache = cache
        self.targets = list(targets)
        self.transform = Compose(crop_transforms(crop_size, augment=augment, jitter=jitter, center=center))
        self.seed = int(seed)
        self.epoch = 0
        self.memory_cases = int(memory_cases)
        self._memory: "OrderedDict[int, Dict[str, torch.Tensor]]" = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.targets)

    def _case(self, index: int) -> Dict[str, torch.Tensor]:
        if index in self._memory:
            self._memory.move_to_end(index)
            return self._memory[index]
        record = self.cache[index]
        if self.memory_cases > 0:
            self._memory[index] = record
            while len(self._memory) > self.memory_cases:
                self._memory.popitem(last=False)
        return record

    def __getitem__(self, i: int) -> Dict[str, Any]:
        target = self.targets[i]
        record = self._case(target.case_index)
        self.transform.set_random_state(seed=sample_seed(self.seed, self.epoch, i))
        out = self.transform({"image": record["image"], "label": record["label"],
                              "label_value": target.label_value})
        return {"image": out["image"], "label": out["label"], "index": i}


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
