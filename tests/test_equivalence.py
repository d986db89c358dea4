"""Equivalence with the official SAM-Med3D: our modules reproduce the reference fixtures exactly.

The fixtures were produced by the official implementation with deterministic weights (``fill.py`` for the full
``vit_b_ori`` model, ``mini_state_dict.npz`` for the mini model). Tolerances: atol 1e-4, rtol 1e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam_med3d import build_sam_med3d

ATOL, RTOL = 1e-4, 1e-3
CASES = ["case1_point", "case1z_point_zero_mask", "case2_three_points_mask", "case3_mask_only"]


def assert_close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    actual = actual.detach().cpu().numpy()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL, err_msg=what)


def run_case(model, embeddings, case):
    """Run one stored prompt case through prompt encoder + decoder; returns dict of outputs."""
    points = None
    if "point_coords" in case:
        points = (torch.from_numpy(case["point_coords"]), torch.from_numpy(case["point_labels"]))
    mask = torch.from_numpy(case["mask_input"]) if "mask_input" in case else None
    sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=mask)
    out = {"sparse_embeddings": sparse, "dense_embeddings": dense}
    pe = model.prompt_encoder.get_dense_pe()
    for multimask, prefix in ((False, ""), (True, "multimask_")):
        masks, iou = model.mask_decoder(image_embeddings=embeddings, image_pe=pe, sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=multimask)
        out[prefix + "low_res_masks"] = masks
        out[prefix + "iou_predictions"] = iou
    out["decoder_tokens_out"] = model.mask_decoder.predict_masks(embeddings, pe, sparse, dense)[2]
    return out


# ----------------------------------------------------------------------------------------------- mini model
@pytest.fixture(scope="module")
def mini(fixtures_dir):
    config = json.loads((fixtures_dir / "mini_config.json").read_text())
    model = build_sam_med3d(config)
    weights = np.load(fixtures_dir / "mini_state_dict.npz")
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files}, strict=True)
    reference = np.load(fixtures_dir / "mini_reference.npz")
    return model, {k: reference[k] for k in reference.files}, config


def test_mini_state_dict_keys_and_shapes_match_official(mini):
    model, _, config = mini
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(name, shape) for name, shape in config["state_dict_keys"]]
    assert sum(p.numel() for p in model.parameters()) == config["num_parameters"]


@torch.no_grad()
def test_mini_encoder_matches_reference(mini):
    model, ref, _ = mini
    image = torch.from_numpy(ref["image"])
    tokens = model.image_encoder.tokens(image)
    assert_close(tokens, ref["patch_embed_plus_pos"], "patch_embed_plus_pos")
    for i, block in enumerate(model.image_encoder.blocks):
        tokens = block(tokens)
        assert_close(tokens[0], ref["block_outputs"][i], f"block {i}")
    assert_close(model.image_encoder(image), ref["image_embeddings"], "image_embeddings")
    assert_close(model.prompt_encoder.get_dense_pe(), ref["dense_pe"], "dense_pe")


@pytest.mark.parametrize("case_name", CASES)
@torch.no_grad()
def test_mini_prompt_cases_match_reference(mini, case_name):
    model, ref, _ = mini
    case = {k.split("/", 1)[1]: v for k, v in ref.items() if k.startswith(case_name + "/")}
    out = run_case(model, torch.from_numpy(ref["image_embeddings"]), case)
    for name, value in out.items():
        assert_close(value, case[name], f"{case_name}/{name}")
    # decoder internals, stored for the mini model only
    sparse, dense = out["sparse_embeddings"], out["dense_embeddings"]
    emb = torch.from_numpy(ref["image_embeddings"]) + dense
    pe = model.prompt_encoder.get_dense_pe()
    tokens = torch.cat([model.mask_decoder.iou_token.weight, model.mask_decoder.mask_tokens.weight])[None]
    _, image_out = model.mask_decoder.transformer(emb, pe, torch.cat([tokens, sparse], dim=1))
    assert_close(image_out, case["decoder_image_out"], f"{case_name}/decoder_image_out")
    upscaled = model.mask_decoder.output_upscaling(image_out.transpose(1, 2).reshape(emb.shape))
    assert_close(upscaled, case["upscaled_embedding"], f"{case_name}/upscaled_embedding")


# ----------------------------------------------------------------------------------------- full vit_b_ori
@pytest.fixture(scope="module")
def full(fixtures_dir, fill_module):
    manifest = json.loads((fixtures_dir / "manifest_vit_b_ori.json").read_text())
    model = build_sam_med3d("vit_b_ori")
    shapes = {e["name"]: e["shape"] for e in manifest["entries"]}
    weights = fill_module.fill_state_dict(shapes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    return model, manifest


@pytest.fixture(scope="module")
def full_embeddings(full, fixtures_dir, fill_module):
    model, _ = full
    image = torch.from_numpy(fill_module.make_image(128))
    ref = np.load(fixtures_dir / "vit_b_ori_encoder.npz")
    np.testing.assert_allclose(image[0, 0, ::8, ::8, ::8].numpy(), ref["image_probe_stride8"])
    with torch.no_grad():
        tokens = model.image_encoder.tokens(image)
        block_outputs = []
        for block in model.image_encoder.blocks:
            tokens = block(tokens)
            block_outputs.append(tokens[0, ..., :64].clone())
        embeddings = model.image_encoder.neck(tokens.permute(0, 4, 1, 2, 3))
    return embeddings, torch.stack(block_outputs), image


@pytest.mark.slow
def test_full_encoder_matches_reference(full, full_embeddings, fixtures_dir):
    model, _ = full
    embeddings, block_outputs, image = full_embeddings
    ref = np.load(fixtures_dir / "vit_b_ori_encoder.npz")
    probes = np.load(fixtures_dir / "vit_b_ori_encoder_probes.npz")
    with torch.no_grad():
        assert_close(model.image_encoder.tokens(image)[..., :64], probes["patch_embed_plus_pos"], "patch+pos")
    for i in range(len(block_outputs)):
        assert_close(block_outputs[i], probes["block_outputs"][i], f"block {i}")
    assert_close(embeddings, ref["image_embeddings"], "image_embeddings")
    assert_close(model.prompt_encoder.get_dense_pe(), ref["dense_pe"], "dense_pe")


@pytest.mark.slow
@pytest.mark.parametrize("case_name", CASES)
@torch.no_grad()
def test_full_prompt_cases_match_reference(full, full_embeddings, fixtures_dir, case_name):
    model, _ = full
    case = dict(np.load(fixtures_dir / f"vit_b_ori_{case_name}.npz"))
    ref_emb = torch.from_numpy(np.load(fixtures_dir / "vit_b_ori_encoder.npz")["image_embeddings"])
    for name, value in run_case(model, ref_emb, case).items():
        assert_close(value, case[name], f"{case_name}/{name} (stored embeddings)")
    # end to end, from our own embeddings of make_image(128)
    out = run_case(model, full_embeddings[0], case)
    assert_close(out["low_res_masks"], case["low_res_masks"], f"{case_name}/low_res_masks (end to end)")
