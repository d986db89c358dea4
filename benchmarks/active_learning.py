#!/usr/bin/env python
"""Does annotating make the served model better? A simulated annotation campaign through the real server.

For one structure, a real ``monailabel start_server`` on the SAM-Med3D app (127.0.0.1, a free port, the bundled
model by default) serves a studies folder of cases of that structure, and the real client
(``monailabel.client.MONAILabelClient``) drives it as an annotator would, round after round:

1. **annotate** the round's new cases: official random error-region clicks (:func:`sam_med3d.clicks.next_click`,
   ``mode="random"``) sent to ``POST /infer/sam_med3d`` until Dice >= 0.9 or 20 clicks, then
   ``PUT /datastore/label`` (tag ``final``). What is saved is the reference mask: the annotator finishes by hand
   what the clicks left wrong, as in the viewer (``--submit clicks`` saves the clicked mask instead);
2. **train**: ``POST /train/sam_med3d`` with the app's default settings (nothing in the request), then poll
   ``GET /train/`` until it is DONE; ``train_seconds`` is the wall time from the request to DONE;
3. **evaluate** the served model (whatever training published) on M other cases of the structure: Dice after
   1/3/5/10 clicks and NoC@80 (clicks until Dice >= 0.8; 20 when never reached within 20), and Dice after 5
   clicks on other structures (``other_dice``, the mean of ``--other-sequences`` seeded click sequences per
   target: does the model forget what it could do?).

Round 0 is the evaluation before any training. Every evaluation of a (case, structure) starts a fresh server
session (the scan's mtime is bumped) and uses the same seeded clicks in every round, so rounds differ only by
the weights. Dice is computed on the scan's own grid against the reference label.

    python benchmarks/active_learning.py --output /tmp/al                    # headline: spleen, 1/3/5 cases
    python benchmarks/active_learning.py --structure kidney_left --cases 5 --rounds 1 --output /tmp/al_k
    python benchmarks/active_learning.py --cases 1 --eval-cases 1 --others 1 --output /tmp/al_tiny \\
        --train-options '{"max_epochs": 1}'                                  # a quick smoke run

Structures (``--structure``): ``spleen`` (default), ``kidney_left``, ``kidney_right``: synthetic CT phantoms
from ``sample-datasets/make_samples.py`` (seed ``--seed``; annotated and evaluation phantoms are different
cases), plus, for ``spleen``, the real MSD spleen CT of ``../shared/data`` as one more evaluation case;
``spinal_cord`` (the two cervical-cord MRIs of ``../shared/data/sct_spinalcord_mri``: 1 annotated, 1 evaluated)
and ``brain_tumour`` (BraTS 2015 T1c whole tumour, 6 cases). Other structures: the other phantom organs of the
first two evaluation phantoms and two real MRI structures (spinal cord ``t1w``, PyRadiomics ``brain1`` tumour).

``--cases`` is the number of annotated cases after each round, cumulative (``1,3,5``: round 1 annotates one
case, round 2 two more, round 3 two more; each Train fine-tunes the served model on every label saved so far),
or a single K with ``--rounds R`` (K cases per round). Writes ``OUTPUT/summary.json``, ``OUTPUT/per_case.csv``,
``OUTPUT/dice_vs_clicks.png`` and prints a table. Each trained round of ``summary.json`` also carries what the
train stats say: ``val_dice`` (best validation Dice), ``retention_agreement``, and with a rehearsal set
``reference_dice`` / ``base_reference_dice`` (the reference check: the last candidate epoch's and the base
model's Dice on the rehearsal set's held-back scans), and ``published``: what the served checkpoint records
(run, epoch, validation and reference Dice, ``blend`` when a blend of the tuned and base weights was published).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server helpers shared with the app's tests

from app_helpers import copy_app, start_server, wait_for_training  # noqa: E402

SHARED_DATA = Path(os.environ.get("SAM_MED3D_SHARED", REPO.parent / "shared")) / "data"
MODEL = "sam_med3d"
#: Click counts reported as ``dice``; NoC is measured up to :data:`MAX_CLICKS`.
REPORT_CLICKS = (1, 3, 5, 10)
MAX_CLICKS = 20
NOC_DICE = 0.8
#: Annotation stops at this Dice (or :data:`MAX_CLICKS` clicks).
ANNOTATE_DICE = 0.9
OTHER_CLICKS = 5
#: Label values of the phantoms (``sample-datasets/make_samples.py``'s ``LABELS``) used here.
PHANTOM_ORGANS = {"spleen": 2, "kidney_right": 3, "kidney_left": 4}
#: Real cases of ../shared/data: structure -> [(dataset, case, label value or None for "any label > 0")].
REAL_CASES = {
    "spleen": [("msd_spleen_ct", "spleen_8", 1)],
    "spinal_cord": [("sct_spinalcord_mri", "t2", 1), ("sct_spinalcord_mri", "t1w", 1)],
    "brain_tumour": [("brats2015_t1c_tumor", f"brats_2013_pat000{i}_1", None) for i in range(1, 7)],
}
#: Real structures measured as "other structures" (permissively licensed MRI, one crop each).
REAL_OTHERS = [("spinal_cord", "sct_spinalcord_mri", "t1w", 1), ("tumour", "pyradiomics_mri_tumor", "brain1", 1)]
STRUCTURES = tuple(PHANTOM_ORGANS) + ("spinal_cord", "brain_tumour")


@dataclass
class Target:
    """One structure on one scan of the studies folder: ``image_id`` as the server names it, the reference mask
    (``value`` in ``label``; ``None``: every label > 0) and the label name clicks are sent under."""

    image_id: str
    label: Path
    value: Optional[int]
    name: str

    def mask(self) -> np.ndarray:
        import nibabel as nib

        arr = np.asarray(nib.load(str(self.label)).dataobj)
        return arr > 0 if self.value is None else arr == self.value


# ----------------------------------------------------------------------------------------------- the cases
def make_phantoms(folder: Path, count: int, seed: int) -> Path:
    """``count`` phantoms (training layout) from ``sample-datasets/make_samples.py``; returns the folder."""
    cmd = [sys.executable, str(REPO / "sample-datasets" / "make_samples.py"), "--output", str(folder),
           "--num-cases", str(count), "--seed", str(seed), "--layout", "training"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def _add_study(studies: Path, image: Path, image_id: str) -> str:
    shutil.copy(image, studies / f"{image_id}.nii.gz")
    return image_id


def build_campaign(structure: str, n_annotate: int, n_eval: int, n_others: int, studies: Path, work: Path,
                   seed: int) -> Dict[str, List[Target]]:
    """The studies folder's scans and the targets: ``annotate`` (in order), ``evaluate``, ``others``."""
    if structure not in STRUCTURES:
        raise ValueError(f"--structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    annotate: List[Target] = []
    evaluate: List[Target] = []
    others: List[Target] = []
    if structure in PHANTOM_ORGANS:
        phantoms = make_phantoms(work / "phantoms", n_annotate + n_eval, seed)
        names = sorted(p.name[:-7] for p in (phantoms / "imagesTr").glob("*.nii.gz"))
        for index, case in enumerate(names):
            image_id = _add_study(studies, phantoms / "imagesTr" / f"{case}.nii.gz", case)
            label = phantoms / "labelsTr" / f"{case}.nii.gz"
            target = Target(image_id, label, PHANTOM_ORGANS[structure], structure)
            (annotate if index < n_annotate else evaluate).append(target)
            if index >= n_annotate and index < n_annotate + 2:  # the first two evaluation phantoms
                others += [Target(image_id, label, value, organ) for organ, value in PHANTOM_ORGANS.items()
                           if organ != structure]
    real = [(d, c, v) for d, c, v in REAL_CASES.get(structure, []) if (SHARED_DATA / d / "imagesTr").is_dir()]
    if structure not in PHANTOM_ORGANS:
        if len(real) < 2:
            raise ValueError(f"--structure {structure} needs its cases in {SHARED_DATA} (found {len(real)})")
        n_annotate = min(n_annotate, len(real) - 1)
        pool = real[:n_annotate], real[n_annotate:n_annotate + n_eval]
    else:
        pool = [], real  # real spleen: evaluation only
    for group, cases in zip((annotate, evaluate), pool):
        for dataset, case, value in cases:
            image_id = _add_study(studies, SHARED_DATA / dataset / "imagesTr" / f"{case}.nii.gz", f"{dataset}_{case}")
            group.append(Target(image_id, SHARED_DATA / dataset / "labelsTr" / f"{case}.nii.gz", value, structure))
    for name, dataset, case, value in REAL_OTHERS:
        if name == structure or not (SHARED_DATA / dataset / "imagesTr").is_dir():
            continue
        image_id = _add_study(studies, SHARED_DATA / dataset / "imagesTr" / f"{case}.nii.gz", f"{dataset}_{case}")
        others.append(Target(image_id, SHARED_DATA / dataset / "labelsTr" / f"{case}.nii.gz", value, name))
    return {"annotate": annotate, "evaluate": evaluate, "others": others[:n_others]}


# --------------------------------------------------------------------------------------- clicking via HTTP
def _rng(seed: int, *names: Any) -> np.random.Generator:
    key = zlib.crc32("\x1f".join(str(n) for n in names).encode("utf-8"))
    return np.random.default_rng([int(seed), int(key)])


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total


def click_session(client, studies: Path, target: Target, label_values: Dict[str, int], rng: np.random.Generator,
                  max_clicks: int, stop_dice: float, min_clicks: int = 0) -> Dict[str, Any]:
    """Official random error clicks on ``target`` through ``POST /infer`` until ``stop_dice`` (after at least
    ``min_clicks``) or ``max_clicks``. Returns ``{"dice": [after click 1, 2, ...], "mask": last mask}``."""
    import nibabel as nib

    from sam_med3d.clicks import next_click

    scan = studies / f"{target.image_id}.nii.gz"
    stamp = time.time()
    os.utime(scan, (stamp, stamp))  # a new file version -> a fresh server session (no earlier clicks or masks)
    gt = target.mask()
    pred = np.zeros(gt.shape, dtype=bool)
    positives: List[List[int]] = []
    negatives: List[List[int]] = []
    dices: List[float] = []
    weights = None
    for _ in range(max_clicks):
        click = next_click(pred, gt, rng, mode="random")
        if click is None:  # nothing left to correct
            break
        (positives if click[1] == 1 else negatives).append([int(c) for c in click[0]])
        params = {target.name: positives, "background": negatives, "label": target.name}
        path, response = client.infer(MODEL, target.image_id, params)
        weights = _answered_by(response, target.name) or weights
        try:
            labels = np.asarray(nib.load(path).dataobj)
        finally:
            os.remove(path)
        if labels.shape != gt.shape:
            raise RuntimeError(f"the server returned a label of shape {labels.shape} for {target.image_id}, "
                               f"whose reference is {gt.shape}")
        pred = labels == label_values[target.name]
        dices.append(_dice(pred, gt))
        if len(dices) >= min_clicks and dices[-1] >= stop_dice:
            break
    return {"dice": dices, "mask": pred, "weights": weights}


def _answered_by(response: Any, name: str) -> Optional[str]:
    """Which weights answered ``name`` ("fine-tuned" / "base", see ``--conf finetuned_for``), from the infer
    response (a dict or its JSON text), or None when it does not say."""
    if isinstance(response, (str, bytes)):
        try:
            response = json.loads(response)
        except ValueError:
            return None
    entry = (response or {}).get("sam_med3d", {}).get(name) if isinstance(response, dict) else None
    return entry.get("weights") if isinstance(entry, dict) else None


def dice_at(dices: Sequence[float], k: int) -> float:
    """Dice after ``k`` clicks; a session that stopped earlier (perfect, or the stop rule met) keeps its last."""
    return float(dices[min(k, len(dices)) - 1]) if dices else 0.0


def noc(dices: Sequence[float], threshold: float = NOC_DICE, max_clicks: int = MAX_CLICKS) -> int:
    """Clicks until Dice >= ``threshold``; ``max_clicks`` when never reached (the interactive-segmentation NoC)."""
    for k, d in enumerate(dices, start=1):
        if d >= threshold:
            return k
    return max_clicks


def evaluate_round(client, studies: Path, campaign: Dict[str, List[Target]], labels: Dict[str, int],
                   seed: int, round_index: int, rows: List[Dict[str, Any]],
                   max_clicks: int = MAX_CLICKS, other_sequences: int = 1) -> Dict[str, Any]:
    """Dice at :data:`REPORT_CLICKS`, NoC@80 on the evaluation targets and Dice@5 on the others (mean of
    ``other_sequences`` click sequences per target) for one round."""
    per_target = []
    for target in campaign["evaluate"]:
        # Clicks until Dice >= 0.8 and at least 10 (the last reported count), at most 20.
        out = click_session(client, studies, target, labels, _rng(seed, "eval", target.image_id, target.name),
                            max_clicks, NOC_DICE, min_clicks=max(REPORT_CLICKS))
        curve = [dice_at(out["dice"], k) for k in range(1, max(REPORT_CLICKS) + 1)]
        per_target.append({"curve": curve, "noc80": noc(out["dice"], max_clicks=max_clicks)})
        rows.append({"round": round_index, "group": "evaluate", "image": target.image_id, "structure": target.name,
                     **{f"dice@{k}": round(curve[k - 1], 4) for k in REPORT_CLICKS},
                     "noc80": per_target[-1]["noc80"], "weights": out["weights"]})
    other = []
    for target in campaign["others"]:
        # Several seeded click sequences per target (a fresh session each), averaged: one sequence of random
        # error clicks swings a target's Dice by 0.3-0.5 (a collapse between two clicks), which a handful of
        # targets cannot average out. The first sequence is the one earlier runs used.
        dices, weights = [], set()
        for sequence in range(other_sequences):
            keys = ("other", target.image_id, target.name) + ((sequence,) if sequence else ())
            out = click_session(client, studies, target, labels, _rng(seed, *keys), OTHER_CLICKS, 2.0)
            dices.append(dice_at(out["dice"], OTHER_CLICKS))
            weights.add(out["weights"])
        other.append(float(np.mean(dices)))
        rows.append({"round": round_index, "group": "other", "image": target.image_id, "structure": target.name,
                     f"dice@{OTHER_CLICKS}": round(other[-1], 4),
                     "weights": "/".join(sorted(str(w) for w in weights))})
    curves = np.array([t["curve"] for t in per_target]) if per_target else np.zeros((0, max(REPORT_CLICKS)))
    return {
        "dice": {str(k): float(curves[:, k - 1].mean()) for k in REPORT_CLICKS} if per_target else {},
        "noc80": float(np.mean([t["noc80"] for t in per_target])) if per_target else None,
        "other_dice": {str(OTHER_CLICKS): float(np.mean(other)) if other else None},
        # Which weights answered (--conf finetuned_for): "base" for every other structure means the fine-tuned
        # weights answered only the structure they were trained on.
        "answered_by": {"evaluate": sorted({str(r.get("weights")) for r in rows
                                            if r["round"] == round_index and r["group"] == "evaluate"}),
                        "other": sorted({w for r in rows if r["round"] == round_index and r["group"] == "other"
                                         for w in str(r.get("weights")).split("/")})},
        "curve": [float(v) for v in curves.mean(0)] if per_target else [],
    }


# ------------------------------------------------------------------------------------- annotate and train
def published_by(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """What the served fine-tuned checkpoint says about the round that wrote it (``run_id``, ``epoch``,
    ``val_dice``, reference Dice and largest per-structure drop, ``blend`` when it is a blend of the tuned and base weights); ``None`` when the
    bundled weights are still served."""
    import torch

    if not path or not Path(path).is_file() or "finetuned" not in Path(path).name:
        return None
    meta = torch.load(path, map_location="cpu", weights_only=True)
    keys = ("run_id", "epoch", "val_dice", "reference_dice", "base_reference_dice", "reference_worst_drop", "blend")
    return {k: meta[k] for k in keys if k in meta}


def annotate(client, studies: Path, target: Target, labels: Dict[str, int], seed: int, submit: str,
             work: Path, max_clicks: int = MAX_CLICKS) -> Dict[str, Any]:
    """Click ``target`` until Dice >= 0.9 or 20 clicks, then save the final label (reference or clicked mask)."""
    import nibabel as nib

    out = click_session(client, studies, target, labels, _rng(seed, "annotate", target.image_id, target.name),
                        max_clicks, ANNOTATE_DICE)
    mask = target.mask() if submit == "reference" else out["mask"]
    reference = nib.load(str(target.label))
    path = work / f"{target.image_id}_final.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8) * np.uint8(labels[target.name]), reference.affine), str(path))
    client.save_label(target.image_id, str(path), tag="final")
    return {"image": target.image_id, "clicks": len(out["dice"]), "dice": out["dice"][-1] if out["dice"] else None}


def train(client, url: str, options: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    """``POST /train/sam_med3d`` (the app's defaults unless ``options``), wait for the end; the run's stats."""
    start = time.perf_counter()
    client.train_start(MODEL, dict(options))
    status = wait_for_training(url, timeout_s=timeout_s, poll_s=2.0)
    seconds = time.perf_counter() - start
    if status.get("status") != "DONE":
        raise RuntimeError(f"training ended {status.get('status')}:\n" + "\n".join(status.get("details", [])[-30:]))
    stats = client.info().get("train_stats", {}).get(MODEL, {})
    return {"seconds": seconds, "stats": stats}


# --------------------------------------------------------------------------------------------- outputs
def plot(summary: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = np.arange(1, max(REPORT_CLICKS) + 1)
    for r in summary["rounds"]:
        if r.get("curve"):
            label = "before training" if r["round"] == 0 else f"round {r['round']}: {r['annotated_cases']} case(s)"
            ax.plot(ks, r["curve"], marker="o", ms=3, label=label)
    ax.set_xlabel("clicks (official random error clicks)")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.set_title(f"{summary['structure']}: {summary['config']['n_evaluate']} evaluation case(s), served model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: Dict[str, Any]) -> str:
    head = (f"| round | annotated | " + " | ".join(f"Dice@{k}" for k in REPORT_CLICKS)
            + f" | NoC@80 | other Dice@{OTHER_CLICKS} | train s | val Dice |")
    lines = [head, "|" + "---|" * (len(REPORT_CLICKS) + 6)]

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    for r in summary["rounds"]:
        lines.append(f"| {r['round']} | {r['annotated_cases']} | "
                     + " | ".join(fmt(r["dice"].get(str(k))) for k in REPORT_CLICKS)
                     + f" | {fmt(r['noc80'], '.1f')} | {fmt(r['other_dice'].get(str(OTHER_CLICKS)))} | "
                     f"{fmt(r['train_seconds'], '.0f')} | {fmt(r.get('val_dice'))} |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    fields: List[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def parse_schedule(cases: str, rounds: Optional[int]) -> List[int]:
    """Cumulative annotated-case counts per round: ``"1,3,5"`` as given, or ``K`` with ``rounds`` R: K, 2K, ..."""
    parts = [p for p in str(cases).split(",") if p.strip()]
    try:
        counts = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--cases must be a number or comma-separated numbers, got {cases!r}") from None
    if len(counts) == 1:
        counts = [counts[0] * (r + 1) for r in range(rounds or 1)]
    elif rounds is not None and rounds != len(counts):
        raise ValueError(f"--rounds {rounds} contradicts --cases {cases} ({len(counts)} rounds)")
    if not counts or counts[0] < 1 or any(b <= a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"--cases must be increasing positive counts, got {cases!r}")
    return counts


def run(args: argparse.Namespace) -> Dict[str, Any]:
    schedule = parse_schedule(args.cases, args.rounds)
    if args.other_sequences < 1:
        raise ValueError(f"--other-sequences must be at least 1, got {args.other_sequences}")
    if args.max_clicks < max(REPORT_CLICKS):
        raise ValueError(f"--max-clicks must be at least {max(REPORT_CLICKS)} (Dice is reported after "
                         f"{max(REPORT_CLICKS)} clicks), got {args.max_clicks}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="active_learning_"))
    try:
        return campaign_rounds(args, schedule, out, work)
    finally:  # also on Ctrl-C / SIGTERM while the phantoms are written or the server starts
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def campaign_rounds(args: argparse.Namespace, schedule: List[int], out: Path, work: Path) -> Dict[str, Any]:
    """Write the campaign's scans to ``work``, start the server there and run the rounds; the summary."""
    from monailabel.client import MONAILabelClient

    studies = work / "studies"
    studies.mkdir()
    began = time.perf_counter()
    campaign = build_campaign(args.structure, schedule[-1], args.eval_cases, args.others, studies, work, args.seed)
    if len(campaign["annotate"]) < schedule[-1]:
        schedule = [min(c, len(campaign["annotate"])) for c in schedule]
        schedule = sorted(set(schedule))
    if not campaign["evaluate"]:
        raise ValueError("no evaluation case: raise --eval-cases")
    names = [args.structure] + sorted({t.name for t in campaign["others"]} - {args.structure})
    labels = {name: i + 1 for i, name in enumerate(names)}
    conf = {"checkpoint": args.checkpoint, "device": args.device, "model_dir": str(work / "model"),
            "labels": ",".join(f"{n}={v}" for n, v in labels.items()), **dict(args.conf)}
    server = start_server(copy_app(work / "app"), studies, conf, log_path=work / "server.log",
                          env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    rows: List[Dict[str, Any]] = []
    rounds: List[Dict[str, Any]] = []
    try:
        client = MONAILabelClient(server.url, tmpdir=str(work))
        served = client.info()["models"][MODEL].get("model_file")
        print(f"server {server.url}: serving {served}; {len(campaign['annotate'])} annotation, "
              f"{len(campaign['evaluate'])} evaluation, {len(campaign['others'])} other-structure target(s)",
              flush=True)
        done = 0
        for index in range(len(schedule) + 1):
            record: Dict[str, Any] = {"round": index, "annotated_cases": done, "train_seconds": None}
            if index > 0:
                record["annotation"] = [annotate(client, studies, t, labels, args.seed, args.submit, work,
                                                 args.max_clicks)
                                        for t in campaign["annotate"][done:schedule[index - 1]]]
                done = schedule[index - 1]
                record["annotated_cases"] = done
                trained = train(client, server.url, args.train_options, args.train_timeout)
                record["train_seconds"] = round(trained["seconds"], 1)
                evaluation = trained["stats"].get("eval", {})
                record["val_dice"] = evaluation.get("best_metric")
                record["train_epochs"] = trained["stats"].get("epoch")
                # The last epoch's agreement with the served model elsewhere (the retention term; None when off).
                record["retention_agreement"] = (trained["stats"].get("train", {}).get("metrics", {})
                                                 .get("train_retention_agreement"))
                # The reference check (rehearsal set's held-back scans; None without one): last epoch and base.
                metrics = evaluation.get("metrics", {})
                record["reference_dice"] = metrics.get("val_reference_dice")
                record["base_reference_dice"] = metrics.get("val_reference_dice_base")
                record["served_model"] = client.info()["models"][MODEL].get("model_file")
                record["published"] = published_by(record["served_model"])
            record.update(evaluate_round(client, studies, campaign, labels, args.seed, index, rows,
                                         args.max_clicks, args.other_sequences))
            rounds.append(record)
            print(f"round {index} done after {time.perf_counter() - began:.0f} s: Dice@5 "
                  f"{record['dice'].get('5', float('nan')):.3f}, NoC@80 {record['noc80']:.1f}, other Dice@"
                  f"{OTHER_CLICKS} {record['other_dice'].get(str(OTHER_CLICKS)) or float('nan'):.3f}", flush=True)
    finally:
        server.stop()
        log = work / "server.log"
        if log.exists():
            shutil.copy(log, out / "server.log")

    summary = {
        "structure": args.structure,
        "rounds": rounds,
        "config": {"schedule": schedule, "n_evaluate": len(campaign["evaluate"]),
                   "n_others": len(campaign["others"]), "checkpoint": args.checkpoint, "device": args.device,
                   "seed": args.seed, "submit": args.submit, "train_options": args.train_options,
                   "evaluate": [t.image_id for t in campaign["evaluate"]],
                   "others": [f"{t.image_id}:{t.name}" for t in campaign["others"]],
                   "annotate": [t.image_id for t in campaign["annotate"]],
                   "other_sequences": args.other_sequences, "report_clicks": list(REPORT_CLICKS),
                   "max_clicks": args.max_clicks, "noc_dice": NOC_DICE,
                   "threads": os.environ.get("OMP_NUM_THREADS", "2"),
                   "total_seconds": round(time.perf_counter() - began, 1)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_csv(out / "per_case.csv", rows)
    plot(summary, out / "dice_vs_clicks.png")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structure", default="spleen", help=f"one of {', '.join(STRUCTURES)} (default spleen)")
    parser.add_argument("--cases", default="1,3,5",
                        help="annotated cases after each round, cumulative (default 1,3,5), or K per round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of K cases when --cases is one number")
    parser.add_argument("--eval-cases", type=int, default=3, help="evaluation phantoms M (default 3)")
    parser.add_argument("--others", type=int, default=6, help="other-structure targets at most (default 6)")
    parser.add_argument("--other-sequences", type=int, default=3,
                        help="seeded click sequences per other-structure target, averaged (default 3)")
    parser.add_argument("--checkpoint", default="bundled", help="--conf checkpoint of the server (default bundled)")
    parser.add_argument("--device", default="cpu", help="--conf device (cpu, cuda, auto)")
    parser.add_argument("--max-clicks", type=int, default=MAX_CLICKS,
                        help=f"clicks per annotation / NoC measurement at most (default {MAX_CLICKS}; >= 10)")
    parser.add_argument("--seed", type=int, default=500, help="phantom and click seed (default 500)")
    parser.add_argument("--submit", choices=("reference", "clicks"), default="reference",
                        help="saved label: the reference mask (default) or the mask the clicks reached")
    parser.add_argument("--train-options", type=json.loads, default={},
                        help="JSON options of each Train request (default: none, the app's defaults)")
    parser.add_argument("--train-timeout", type=float, default=1800.0, help="seconds per training run at most")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="extra --conf option for the server (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--output", required=True, type=Path, help="folder for summary.json, per_case.csv, the plot")
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except ValueError as err:
        parser.error(str(err))
    print(f"\nActive learning on {summary['structure']} (served model, {summary['config']['n_evaluate']} evaluation "
          f"case(s), {summary['config']['n_others']} other-structure target(s); total "
          f"{summary['config']['total_seconds']:.0f} s)\n")
    print(table(summary))
    print(f"\nwrote {args.output / 'summary.json'}, per_case.csv, dice_vs_clicks.png")
    return 0


if __name__ == "__main__":
    # SIGTERM (a timeout, a kill) raises SystemExit: the phantom generator is killed, the server stopped and the
    # temporary folder removed by the ``finally`` blocks, as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())
