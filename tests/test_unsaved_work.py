"""Unsaved work survives new weights: a real server, clicks, new weights published, then a save of those clicks.

The app serves ``vit_mini`` weights; an annotator clicks two labels on one image and does not save. New weights
are then published where the trainer publishes them (``model/finetuned_<base weights>.pt``) and another
image's click makes the server load them. The first annotator's save (``save_label`` with no clicks, as 3D
Slicer and the OHIF without a save button send it) must still return exactly the map drawn before the update,
and that image's next click must be answered by the new weights while the other label's mask stays.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from app_helpers import copy_app, start_server

MODEL = "sam_med3d"
CLIENT = "annotator-1"


@pytest.fixture(scope="module")
def server(data_dir, mini_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("unsaved_work")
    studies = root / "studies"
    studies.mkdir()
    for image_id, case in (("t2", "t2"), ("t1w", "t1w")):
        shutil.copy(data_dir / "sct_spinalcord_mri" / "imagesTr" / f"{case}.nii.gz", studies / f"{image_id}.nii.gz")
    app = copy_app(root / "app")
    srv = start_server(app, studies, {"model": "vit_mini", "checkpoint": str(mini_checkpoint),
                                      "labels": "spleen=1,liver=2", "device": "cpu", "preload": "true",
                                      "extension": "off", "use_finetuned": "true"},
                       log_path=root / "server.log", env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.app = app
    yield srv
    srv.stop()


def _infer(server, image_id: str, params: dict, tmp_path, name: str):
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": image_id, "output": "image"},
                             data={"params": json.dumps({"client_id": CLIENT, "result_extension": ".nii.gz",
                                                         **params})}, timeout=300)
    if response.status_code != 200:
        return response.status_code, response.text, None
    path = tmp_path / f"{name}.nii.gz"
    path.write_bytes(response.content)
    return 200, None, np.asarray(nib.load(str(path)).dataobj)


def test_masks_drawn_before_new_weights_still_save_and_later_clicks_use_the_new_weights(server, mini_checkpoint,
                                                                                      tmp_path):
    # Two labels clicked on t2, not saved. vit_mini's random weights may draw a small mask: any map will do, as
    # long as it is the one returned for the last click.
    status, text, _ = _infer(server, "t2", {"spleen": [[30, 27, 26]], "label": "spleen"}, tmp_path, "c1")
    assert status == 200, text
    status, text, drawn = _infer(server, "t2", {"spleen": [[30, 27, 26]], "liver": [[20, 20, 20]], "label": "liver"},
                                 tmp_path, "c2")
    assert status == 200, text
    # New weights published (the trainer's path for these base weights), loaded by another image's click.
    from sam_med3d import build_sam_med3d
    from sam_med3d.checkpoint import save_checkpoint

    torch.manual_seed(1)
    finetuned = server.app / "model" / "finetuned_vit_mini.pt"
    save_checkpoint(build_sam_med3d("vit_mini"), finetuned)
    before = server.log_path.read_text(errors="replace")
    status, text, _ = _infer(server, "t1w", {"spleen": [[21, 38, 38]], "label": "spleen"}, tmp_path, "other")
    assert status == 200, text
    log = server.log_path.read_text(errors="replace")[len(before):]
    assert "Now serving new SAM-Med3D" in log and finetuned.name in log, log[-2000:]

    # The unsaved map of t2 still saves, exactly as drawn.
    status, text, saved = _infer(server, "t2", {"save_label": True, "label_tag": "final"}, tmp_path, "saved")
    assert status == 200, text
    assert np.array_equal(saved, drawn)
    labels = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]["t2"]["labels"]
    assert "final" in labels, labels

    # The next click on t2 is answered by the new weights; the liver mask drawn before stays untouched.
    response = requests.post(f"{server.url}/infer/{MODEL}", params={"image": "t2", "output": "json"},
                             data={"params": json.dumps({"client_id": CLIENT, "spleen": [[30, 27, 26], [31, 28, 26]],
                                                         "label": "spleen"})}, timeout=300)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"]["file"].endswith(finetuned.name), result["model"]
    assert result["encoder_ran"] is True, "the new weights must encode the image anew"
    status, text, after = _infer(server, "t2", {"save_label": True, "label_tag": "final"},
                                 tmp_path, "after")
    assert status == 200, text
    assert np.array_equal(after == 2, drawn == 2), "the liver mask drawn before the new weights changed"
