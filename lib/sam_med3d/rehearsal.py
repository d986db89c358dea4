"""Rehearsal: keep what a base model could do while it is fine-tuned on a few labels of one structure.

Fine-tuned on a handful of labels of one structure, SAM-Med3D's decoder learns to segment that structure wherever
it is clicked and forgets the others (``benchmarks/active_learning.py``). Two pieces here answer that, both on a
**rehearsal set**: labelled scans of other structures, in the Medical Segmentation Decathlon layout
(``imagesTr/`` + ``labelsTr/``, the layout ``pretrain/`` and the evaluator read), ideally the data the base model
learned from:

- :func:`rehearsal_datalist` splits it into targets to train on alongside the user's labels (one record per
  scan, its structures drawn per sample by :class:`sam_med3d.training.RandStructured`) and **reference targets**
  held back (every :data:`HOLD_BACK_EVERY`-th scan);
- :class:`ReferenceScore` measures a model on the reference targets: Dice after seeded simulated click sessions
  on the crops inference uses, per target and per structure. A trainer compares the tuned model's scores with
  the base model's and refuses to publish weights that forgot more than a set margin, on average or on any one
  structure (:func:`worst_drop`): the mean over all held-back structures moves little when one organ is lost.

:class:`MixedSampler` draws an epoch of the user's targets and rehearsal scans together; :func:`rehearsal_folder`
says which set a setting names; :func:`bundled_rehearsal_set` writes the rehearsal set of the bundled offline model: phantoms drawn as its
training data was (:mod:`sam_med3d.phantoms`, the seeds of its model card, CT and MR-like).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Every how many-th scan of a rehearsal set (sorted by name, counting from 1) is held back as reference.
HOLD_BACK_EVERY = 4
#: Structures smaller than this (voxels at the stored resolution) are not used.
MIN_VOXELS = 200
#: The bundled model's rehearsal set: (modality, seed, cases) as in its model card's training data.
BUNDLED_SETS: Tuple[Tuple[str, int, int], ...] = (("ct", 100, 4), ("mr", 300, 4))
#: Seed of the reference click sessions.
REFERENCE_SEED = 4321
#: Seeded click sessions per reference target, averaged: one session's Dice moves by up to 0.2 with where the
#: random error clicks fall, too much for a per-structure comparison of two models.
REFERENCE_SEQUENCES = 2
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def structures(label_path: os.PathLike, min_voxels: int = MIN_VOXELS) -> List[int]:
    """The label values of a label map with at least ``min_voxels`` voxels, ascending."""
    import nibabel as nib

    arr = np.asarray(nib.load(str(label_path)).dataobj)
    values, counts = np.unique(arr[arr > 0].astype(np.int64), return_counts=True)
    return [int(v) for v, c in zip(values, counts) if c >= min_voxels]


def rehearsal_datalist(folder: os.PathLike, min_voxels: int = MIN_VOXELS, hold_back_every: int = HOLD_BACK_EVERY
                       ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Training records and reference targets of a rehearsal set (``folder/imagesTr`` + ``folder/labelsTr``).

    Returns:
        ``(train, reference)``: ``train`` one record per scan ``{"image", "label", "label_value": [values]}``
        (a list: :class:`~sam_med3d.training.RandStructured` draws one per sample), ``reference`` one record per
        structure of the held-back scans ``{"image", "label", "label_value": int, "structure": name}`` (the name
        from the folder's ``dataset.json`` labels, else ``label_<value>``). A set of one scan is used for
        training only.

    Raises:
        FileNotFoundError: the folder has no ``imagesTr``/``labelsTr`` pair.
    """
    folder = Path(folder)
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise FileNotFoundError(f"rehearsal data {folder} has no imagesTr/ and labelsTr/ folders (the Medical "
                                "Segmentation Decathlon layout)")
    labels = {_stem(p): p for p in labels_dir.iterdir() if p.is_file()}
    pairs = [(p, labels[_stem(p)]) for p in sorted(images_dir.iterdir())
             if p.is_file() and not p.name.startswith(".") and _stem(p) in labels]
    if not pairs:
        raise FileNotFoundError(f"rehearsal data {folder}: no image in imagesTr/ has a label of the same name in "
                                "labelsTr/")
    from .evaluate import label_names

    try:
        names = label_names(folder, folder)
    except ValueError as err:  # a broken dataset.json only costs the names
        logger.warning("rehearsal data %s: %s; structures are named by label value", folder, err)
        names = {}
    train: List[Dict[str, Any]] = []
    reference: List[Dict[str, Any]] = []
    for index, (image, label) in enumerate(pairs, start=1):
        values = structures(label, min_voxels)
        if not values:
            continue
        if len(pairs) > 1 and index % max(int(hold_back_every), 2) == 0:
            reference += [{"image": str(image), "label": str(label), "label_value": v,
                           "structure": names.get(v, f"label_{v}")} for v in values]
        else:
            train.append({"image": str(image), "label": str(label), "label_value": values})
    return train, reference


def bundled_rehearsal_set(folder: os.PathLike) -> Path:
    """The bundled model's rehearsal set in ``folder`` (written once, in the background of a first training run).

    Phantoms of :mod:`sam_med3d.phantoms` with the seeds of the bundled model's training data
    (:data:`BUNDLED_SETS`), in one ``imagesTr``/``labelsTr`` folder. Written to a temporary folder beside it and
    renamed, so an interrupted run leaves nothing half-written. Returns ``folder``.
    """
    from .phantoms import write_dataset

    folder = Path(folder)
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        if not (folder / "dataset.json").is_file():  # written by a version that did not name the structures
            _write_bundled_names(folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for modality, seed, cases in BUNDLED_SETS:
            write_dataset(work / modality, num_cases=cases, seed=seed, layout="training", modality=modality)
            for sub in ("imagesTr", "labelsTr"):
                (work / sub).mkdir(exist_ok=True)
                for path in (work / modality / sub).iterdir():
                    path.rename(work / sub / path.name)
            shutil.rmtree(work / modality)
        _write_bundled_names(work)
        try:
            work.rename(folder)
        except OSError:  # another process wrote it meanwhile
            if not (folder / "imagesTr").is_dir():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    logger.info("Rehearsal set of the bundled model written to %s", folder)
    return folder


def rehearsal_folder(value: Optional[str], base_checkpoint: Optional[os.PathLike],
                     model_dir: os.PathLike) -> Optional[Path]:
    """The rehearsal set a setting names: ``auto`` = the bundled model's phantoms when ``base_checkpoint`` is the
    bundled model (written into ``<model_dir>/rehearsal_bundled`` on first use, :func:`bundled_rehearsal_set`),
    else none; ``none`` (or empty): none; anything else: that folder."""
    text = str(value or "none").strip()
    if text.lower() == "none":
        return None
    if text.lower() == "auto":
        from .checkpoint import BUNDLED_PATH

        if base_checkpoint is None or Path(base_checkpoint).resolve() != Path(BUNDLED_PATH).resolve():
            return None
        return bundled_rehearsal_set(Path(model_dir) / "rehearsal_bundled")
    return Path(text)


def _write_bundled_names(folder: Path) -> None:
    import json

    from .phantoms import LABELS

    path = folder / "dataset.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"name": "bundled model rehearsal set (phantoms)",
                               "labels": {str(k): v for k, v in LABELS.items()}}, indent=2) + "\n")
    os.replace(tmp, path)


def per_structure(names: Sequence[str], scores: Sequence[float]) -> Dict[str, float]:
    """Mean score per structure name (targets of the same name in several scans averaged), in first-seen order."""
    groups: Dict[str, List[float]] = {}
    for name, score in zip(names, scores):
        groups.setdefault(name, []).append(float(score))
    return {name: float(np.mean(values)) for name, values in groups.items()}


def worst_drop(base: Mapping[str, float], tuned: Mapping[str, float]) -> Tuple[float, Optional[str]]:
    """The largest per-structure drop ``base - tuned`` over the structures scored in both, and that structure
    (``(nan, None)`` when none is)."""
    drops = {name: float(base[name]) - float(tuned[name]) for name in base
             if name in tuned and np.isfinite(base[name]) and np.isfinite(tuned[name])}
    if not drops:
        return float("nan"), None
    name = max(drops, key=lambda n: drops[n])
    return drops[name], name


class ReferenceScore:
    """Dice of a model on reference targets after a seeded simulated click session (the crops inference uses).

    The crops (:func:`sam_med3d.training.validation_transforms`, ``center="click"``) are prepared once; each call
    runs the same clicks (``sequences`` sessions per target, each seeded) with the given model, so two models are
    compared on equal terms.
    Image embeddings can be kept between calls (``cache_key``): right for a model whose image encoder does not
    change (the base model, or a model fine-tuned with a frozen encoder).

    Args:
        records: ``{"image", "label", "label_value"}`` targets (:func:`rehearsal_datalist`'s ``reference``).
        crop_size: the model's input size.
        num_clicks: clicks per session (the Dice after the last is scored).
        device: where the crops and the model run.
        seed: seed of the click sessions.
        sequences: sessions per target (the first seeded as with one), their Dice averaged.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], crop_size: int, num_clicks: int = 5,
                 device: str = "cpu", seed: int = REFERENCE_SEED, sequences: int = REFERENCE_SEQUENCES) -> None:
        from .training import validation_transforms

        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        if sequences < 1:
            raise ValueError(f"sequences must be >= 1, got {sequences}")
        self.sequences = int(sequences)
        transform = validation_transforms(crop_size=int(crop_size), center="click")
        self.num_clicks = int(num_clicks)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.names: List[str] = []
        #: The structure of each target (its name, or ``label_<value>``): :meth:`per_structure` groups by it.
        self.structures: List[str] = []
        self.crops: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for record in records:
            out = transform(dict(record))
            if float(out["label"].sum()) <= 0:
                continue
            self.names.append(f"{_stem(Path(record['image']))}:{record.get('label_value')}")
            self.structures.append(str(record.get("structure") or f"label_{record.get('label_value')}"))
            self.crops.append((out["image"][None].float(), out["label"][None].float()))
        self._embeddings: Dict[str, List[torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.crops)

    @torch.no_grad()
    def per_target(self, sam: torch.nn.Module, cache_key: Optional[str] = None) -> List[float]:
        """Dice of ``sam`` after :attr:`num_clicks` clicks on each reference target (mean of :attr:`sequences`
        sessions)."""
        from .training import run_click_iterations

        was_training = sam.training
        sam.eval()
        cached = self._embeddings.get(cache_key) if cache_key else None
        embeddings: List[torch.Tensor] = []
        scores: List[float] = []
        try:
            for index, (image, label) in enumerate(self.crops):
                image, label = image.to(self.device), label.to(self.device)
                embedding = cached[index] if cached is not None else sam.image_encoder(image)
                embeddings.append(embedding)
                dices = []
                for sequence in range(self.sequences):
                    key = [self.seed, index] + ([sequence] if sequence else [])
                    out = run_click_iterations(sam, image, label, self.num_clicks, np.random.default_rng(key),
                                               mask_only_iterations=False, embedding=embedding)
                    dices.append(float(out["dice"]))
                scores.append(float(np.mean(dices)))
        finally:
            sam.train(was_training)
        if cache_key and cached is None:
            self._embeddings[cache_key] = embeddings
        return scores

    def per_structure(self, scores: Sequence[float]) -> Dict[str, float]:
        """:meth:`per_target` scores averaged per structure (:func:`per_structure`)."""
        return per_structure(self.structures, scores)

    def __call__(self, sam: torch.nn.Module, cache_key: Optional[str] = None) -> float:
        """Mean Dice of ``sam`` over the reference targets (NaN when there are none)."""
        scores = self.per_target(sam, cache_key)
        return float(np.mean(scores)) if scores else float("nan")


class MixedSampler(torch.utils.data.Sampler):
    """An epoch of ``user_draws`` draws of the user's targets (whole random permutations, then a partial one, so
    each is drawn as often as the others give or take one) and ``rehearsal_draws`` of the rehearsal scans
    (likewise), shuffled together. Uses torch's global generator, so a seeded run repeats.

    Args:
        users: dataset indices of the user's targets.
        rehearsed: dataset indices of the rehearsal scans.
    """

    def __init__(self, users: Sequence[int], rehearsed: Sequence[int], user_draws: int, rehearsal_draws: int):
        self.users, self.rehearsed = list(users), list(rehearsed)
        self.user_draws, self.rehearsal_draws = int(user_draws), int(rehearsal_draws)

    @staticmethod
    def _draw(indices: List[int], count: int) -> List[int]:
        out: List[int] = []
        while len(out) < count and indices:
            out += [indices[i] for i in torch.randperm(len(indices)).tolist()]
        return out[:count]

    def __iter__(self):
        order = self._draw(self.users, self.user_draws) + self._draw(self.rehearsed, self.rehearsal_draws)
        return iter([order[i] for i in torch.randperm(len(order)).tolist()])

    def __len__(self) -> int:
        return (self.user_draws if self.users else 0) + (self.rehearsal_draws if self.rehearsed else 0)
