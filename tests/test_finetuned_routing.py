"""Fine-tuned weights answer the labels they were trained on; the base weights answer every other label.

The trainer records the label names it trained on in the published checkpoint (``structures``); with
``--conf finetuned_for trained`` (the default) the infer task routes each label's clicks to the weights that
answer it, through a sibling predictor on the same scan that shares the crop embeddings when fine-tuning left
the image encoder as it was. Real (vit_mini) networks, the real infer task, a real scan file.
"""

from __future__ import annotations

import copy
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from app_helpers import APP_DIR
from sam_med3d import build_sam_med3d
from sam_med3d.checkpoint import save_checkpoint
from sam_med3d.extension import ExtensionConfig
from sam_med3d.predictor import Sam3DPredictor

sys.path.insert(0, str(APP_DIR))
try:
    from lib.options import AppOptions  # noqa: E402
    from lib.served_model import BaseWeights, ServedModel  # noqa: E402
    from lib.infers.sam_med3d import SamMed3DInfer  # noqa: E402
finally:
    sys.path.remove(str(APP_DIR))

LABELS = {"background": 0, "spleen": 1, "liver": 2}
SPLEEN_CLICK, LIVER_CLICK = [20, 22, 24], [26, 20, 22]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A base vit_mini checkpoint, its "fine-tuned" copy (decoder changed, encoder as it was) recording
    ``structures=["spleen"]``, and a scan."""
    folder = tmp_path_factory.mktemp("routing")
    torch.manual_seed(0)
    base = build_sam_med3d("vit_mini")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for parameter in tuned.mask_decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    base_path = save_checkpoint(base, folder / "base.pt")
    tuned_path = save_checkpoint(tuned, folder / "finetuned_base.pt", structures=["spleen"])
    image = np.random.default_rng(0).normal(size=(48, 44, 40)).astype(np.float32)
    image[12:30, 14:32, 16:34] += 3.0
    scan = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 1.5, 1.0])), str(scan))
    return {"base": base_path, "tuned": tuned_path, "scan": str(scan)}


def _task(weights, finetuned_for="trained", use_finetuned=True):
    served = ServedModel(BaseWeights(weights["base"], "test", "test base"), "auto", "cpu", weights["tuned"],
                         use_finetuned, finetuned_for)
    return SamMed3DInfer(served, LABELS, cache_size=2, cache_ttl_s=60, extension=ExtensionConfig(enabled=False))


def _mask_alone(path, click):
    """What the weights in ``path`` alone answer for one positive click (the reference)."""
    from sam_med3d.checkpoint import load_model

    predictor = Sam3DPredictor(load_model(str(path)), extension=False)
    predictor.set_image(path_or_array=_mask_alone.scan)
    return predictor.predict([click], [1]).mask.astype(bool)


def _click(task, scan, name, click, client):
    path, result = task({"image": scan, name: [click], "background": [], "label": name, "client_id": client})
    labels = np.asarray(nib.load(path).dataobj)
    return labels == LABELS[name], result


def test_each_label_is_answered_by_the_weights_trained_on_it(weights):
    _mask_alone.scan = weights["scan"]
    tuned_spleen, base_spleen = _mask_alone(weights["tuned"], SPLEEN_CLICK), _mask_alone(weights["base"], SPLEEN_CLICK)
    tuned_liver, base_liver = _mask_alone(weights["tuned"], LIVER_CLICK), _mask_alone(weights["base"], LIVER_CLICK)
    assert (tuned_spleen != base_spleen).any() and (tuned_liver != base_liver).any()  # the weights differ

    task = _task(weights)
    spleen, result = _click(task, weights["scan"], "spleen", SPLEEN_CLICK, "a")
    assert result["sam_med3d"]["spleen"]["weights"] == "fine-tuned" and result["encoder_ran"]
    assert np.array_equal(spleen, tuned_spleen)
    liver, result = _click(task, weights["scan"], "liver", LIVER_CLICK, "b")
    assert result["sam_med3d"]["liver"]["weights"] == "base"
    assert np.array_equal(liver, base_liver)
    # Another annotator clicks "liver" where "spleen" was clicked: the same crop, so the base weights reuse
    # the embedding the fine-tuned weights' encoder made (one encoder module: the encoder was not tuned).
    liver, result = _click(task, weights["scan"], "liver", SPLEEN_CLICK, "c")
    assert not result["encoder_ran"] and result["sam_med3d"]["liver"]["weights"] == "base"
    assert np.array_equal(liver, base_spleen)


def test_finetuned_for_all_answers_every_label_with_the_finetuned_weights(weights):
    _mask_alone.scan = weights["scan"]
    task = _task(weights, finetuned_for="all")
    liver, result = _click(task, weights["scan"], "liver", LIVER_CLICK, "a")
    assert result["sam_med3d"]["liver"]["weights"] == "fine-tuned"
    assert np.array_equal(liver, _mask_alone(weights["tuned"], LIVER_CLICK))


def test_without_finetuned_weights_the_base_answers_everything(weights):
    task = _task(weights, use_finetuned=False)
    _, result = _click(task, weights["scan"], "spleen", SPLEEN_CLICK, "a")
    assert result["sam_med3d"]["spleen"]["weights"] == "base"
    assert task.served.structures() is None


def test_a_checkpoint_without_structures_answers_every_label(weights, tmp_path):
    legacy = save_checkpoint(build_sam_med3d("vit_mini"), tmp_path / "finetuned_base.pt")  # an older trainer's
    task = _task(dict(weights, tuned=legacy))
    _, result = _click(task, weights["scan"], "liver", LIVER_CLICK, "a")
    assert result["sam_med3d"]["liver"]["weights"] == "fine-tuned" and task.served.structures() is None


def test_finetuned_for_is_checked_when_the_server_starts(tmp_path):
    assert AppOptions.from_conf({}, str(tmp_path)).finetuned_for == "trained"
    assert AppOptions.from_conf({"finetuned_for": "ALL"}, str(tmp_path)).finetuned_for == "all"
    with pytest.raises(ValueError, match="finetuned_for must be one of trained, all"):
        AppOptions.from_conf({"finetuned_for": "spleen"}, str(tmp_path))
