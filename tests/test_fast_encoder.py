"""The fast attention path of the image encoder gives the reference (official) outputs.

The fast path never materialises the zero padding of windowed blocks; it folds every padded key of a window
into one extra key by exact algebra (``sam_med3d.modeling.fast_attention``). These tests compare it with the
literal official computation on random weights: float64 to ~1e-10, float32 to atol 1e-4 / rtol 1e-3 (the
tolerance of the reference fixtures), plus gradients and the closed form of the padded keys' log-mass itself.
The fixture comparison (``tests/test_equivalence.py``) runs the fast path too, since it is the default.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sam_med3d import build_sam_med3d
from sam_med3d.modeling import ImageEncoderViT3D
from sam_med3d.modeling import image_encoder as image_encoder_module
from sam_med3d.modeling.fast_attention import relative_bias_and_padding_logit, window_boxes
from sam_med3d.modeling.image_encoder import Block, official_bias_layout, relative_position_table

ATOL32, RTOL32 = 1e-4, 1e-3
TOL64 = 1e-10

# (name, encoder kwargs): the mini model (4^3 grid, window 3 -> 8 windows, 7 of them partly padding), a mid
# model whose grid is not a multiple of the window (5^3 grid, window 3 -> full and 2-wide windows on each axis),
# and one whose single window is bigger than the grid, like vit_b_ori (6^3 grid, window 8).
SMALL_CONFIGS = {
    "vit_mini": dict(build_sam_med3d("vit_mini").config["image_encoder"]),
    "mid_5grid_w3": dict(img_size=80, patch_size=16, embed_dim=48, depth=3, num_heads=4, out_chans=32,
                         window_size=3, global_attn_indexes=(1,)),
    "mid_6grid_w8": dict(img_size=48, patch_size=8, embed_dim=48, depth=2, num_heads=3, out_chans=32,
                         window_size=8, global_attn_indexes=(1,)),
}


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights that make every term matter: relative-position tables, qkv biases (the padded tokens'
    q/k/v) and the absolute position embedding get O(0.5) values instead of their zero init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "rel_pos" in name or name.endswith("pos_embed") or name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise / max(1.0, p[0].numel()) ** 0.5)
    return module


def encoder(config: dict, dtype: torch.dtype = torch.float32, seed: int = 0) -> ImageEncoderViT3D:
    kwargs = dict(config)
    kwargs["global_attn_indexes"] = tuple(kwargs.get("global_attn_indexes", ()))
    return randomize(ImageEncoderViT3D(**kwargs), seed).to(dtype).eval()


def both_impls(enc: ImageEncoderViT3D, image: torch.Tensor):
    with torch.no_grad():
        fast = enc.set_attention_impl("fast")(image)
        reference = enc.set_attention_impl("reference")(image)
    enc.set_attention_impl("fast")
    return fast, reference


# ------------------------------------------------------------------------------------------ closed form
@pytest.mark.parametrize("box,window", [((8, 8, 8), 14), ((3, 2, 1), 3), ((2, 3, 3), 3), ((3, 3, 2), 4),
                                        ((3, 3, 2), 3), ((1, 1, 1), 2)])
def test_padding_log_mass_matches_brute_force(box, window):
    """Real-key bias and log-sum-exp of the bias over all padded keys == the full official bias grid."""
    gen = torch.Generator().manual_seed(1)
    n, c = 3, 5
    rd, rh, rw = box
    q = torch.randn(n, rd, rh, rw, c, generator=gen, dtype=torch.float64)
    q0 = torch.randn(n, c, generator=gen, dtype=torch.float64)
    rel = [torch.randn(2 * window - 1, c, generator=gen, dtype=torch.float64) for _ in range(3)]
    tables = tuple(relative_position_table(window, window, r) for r in rel)
    bias, pad_logit = relative_bias_and_padding_logit(q, q0, tables, window)

    # Brute force: the whole padded window, padded positions holding q0.
    full_q = q0[:, None, None, None, :].expand(n, window, window, window, c).clone()
    full_q[:, :rd, :rh, :rw] = q
    flat = full_q.reshape(n, -1, c)
    terms = [torch.einsum("bdhwc,dkc->bdhwk", full_q, tables[0]),
             torch.einsum("bdhwc,hkc->bdhwk", full_q, tables[1]),
             torch.einsum("bdhwc,wkc->bdhwk", full_q, tables[2])]
    assert flat.shape[1] == window ** 3
    full_bias = official_bias_layout(*terms)[:, :rd, :rh, :rw]          # real queries, all keys
    real_key = torch.zeros((window,) * 3, dtype=torch.bool)
    real_key[:rd, :rh, :rw] = True
    nr = rd * rh * rw
    expected_bias = full_bias[..., real_key].reshape(n, nr, nr)
    expected_pad = full_bias[..., ~real_key].reshape(n, nr, -1).logsumexp(-1)
    torch.testing.assert_close(bias, expected_bias, atol=TOL64, rtol=0)
    torch.testing.assert_close(pad_logit, expected_pad, atol=TOL64, rtol=0)


def test_full_window_has_no_padding_term():
    q = torch.randn(2, 3, 3, 3, 4, dtype=torch.float64)
    tables = tuple(relative_position_table(3, 3, torch.randn(5, 4, dtype=torch.float64)) for _ in range(3))
    _, pad_logit = relative_bias_and_padding_logit(q, torch.zeros(2, 4, dtype=torch.float64), tables, 3)
    assert pad_logit is None


def test_window_boxes_cover_the_grid_once():
    size, window = (7, 5, 4), 3
    covered = torch.zeros(size, dtype=torch.int64)
    for (sd, sh, sw), box in window_boxes(size, window):
        region = covered[sd, sh, sw]
        assert all(s % b == 0 for s, b in zip(region.shape, box)), (region.shape, box)
        covered[sd, sh, sw] += 1
    assert torch.equal(covered, torch.ones(size, dtype=torch.int64))
    assert len(window_boxes((8, 8, 8), 14)) == 1 and window_boxes((8, 8, 8), 14)[0][1] == (8, 8, 8)


# ---------------------------------------------------------------------------------------------- blocks
BLOCK_CASES = list(itertools.product(
    [(8, 14), (4, 3), (5, 3), (7, 4), (6, 6), (5, 0)],   # (grid, window); window 0 = global block
    [(True, True), (False, True), (True, False)],         # (use_rel_pos, qkv_bias)
))


@pytest.mark.parametrize("grid_window,flags", BLOCK_CASES)
def test_block_fast_equals_reference_float64(grid_window, flags):
    grid, window = grid_window
    use_rel_pos, qkv_bias = flags
    block = Block(24, 3, use_rel_pos=use_rel_pos, qkv_bias=qkv_bias, window_size=window,
                  input_size=(grid,) * 3)
    block = randomize(block, seed=grid * 10 + window).double().eval()
    x = torch.randn(2, grid, grid, grid, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        block.attention_impl = "reference"
        expected = block(x)
        block.attention_impl = "fast"
        actual = block(x)
    torch.testing.assert_close(actual, expected, atol=TOL64, rtol=TOL64)


# --------------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_encoder_fast_equals_reference_float64(name):
    enc = encoder(SMALL_CONFIGS[name], torch.float64, seed=4)
    image = torch.randn(2, 1, *(enc.img_size,) * 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fast, reference = both_impls(enc, image)
    assert fast.abs().max() > 0.1   # a non-degenerate embedding, so the comparison means something
    torch.testing.assert_close(fast, reference, atol=TOL64, rtol=TOL64)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_encoder_fast_equals_reference_float32(name):
    enc = encoder(SMALL_CONFIGS[name], torch.float32, seed=6)
    image = torch.randn(1, 1, *(enc.img_size,) * 3, generator=torch.Generator().manual_seed(7))
    fast, reference = both_impls(enc, image)
    torch.testing.assert_close(fast, reference, atol=ATOL32, rtol=RTOL32)


def test_padded_keys_matter_in_this_comparison():
    """Guard against a vacuous test: leaving out the padded keys' extra key (attending over the real keys with
    their exact bias only) must change the output well beyond the tolerance on these random weights."""
    block = randomize(Block(24, 3, use_rel_pos=True, window_size=14, input_size=(8,) * 3), seed=8).double()
    attn = block.attn
    x = block.norm1(torch.randn(1, 8, 8, 8, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(9)))
    with torch.no_grad():
        exact = attn.forward_box(x, 14)
        q, k, v = attn.split_qkv(x)
        tables = tuple(relative_position_table(14, 14, t) for t in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w))
        q0 = attn.qkv.bias.view(3, 3, 8)[0]
        bias, pad_logit = relative_bias_and_padding_logit(q.view(3, 8, 8, 8, 8), q0, tables, 14)
        real_only = attn.merge_heads(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=attn.scale), 1, (8, 8, 8))
    assert pad_logit is not None
    assert (exact - real_only).abs().max() > 1e-2


@pytest.mark.slow
def test_vit_b_ori_fast_equals_reference_float32():
    enc = encoder(build_sam_med3d("vit_b_ori").config["image_encoder"], torch.float32, seed=10)
    image = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(11))
    fast, reference = both_impls(enc, image)
    assert fast.shape == (1, 384, 8, 8, 8)
    torch.testing.assert_close(fast, reference, atol=ATOL32, rtol=RTOL32)


def test_gradients_match_reference_float64():
    """Training goes through the fast path too: parameter and input gradients equal the reference ones."""
    enc = encoder(SMALL_CONFIGS["mid_5grid_w3"], torch.float64, seed=12)
    image = torch.randn(1, 1, 80, 80, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    weight = torch.randn(1, 32, 5, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    grads = {}
    for impl in ("fast", "reference"):
        enc.zero_grad()
        x = image.clone().requires_grad_(True)
        (enc.set_attention_impl(impl)(x) * weight).sum().backward()
        grads[impl] = {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in enc.named_parameters()}}
    assert grads["fast"].keys() == grads["reference"].keys()
    for name, g in grads["reference"].items():
        assert torch.isfinite(grads["fast"][name]).all(), name
        torch.testing.assert_close(grads["fast"][name], g, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")


def test_bfloat16_autocast_close_to_float32():
    """CPU bf16 autocast (same code path as GPU autocast): within the documented bf16 tolerance."""
    enc = encoder(SMALL_CONFIGS["vit_mini"], torch.float32, seed=15)
    image = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        exact = enc(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_bf16 = enc(image).float()
    # Output is LayerNorm-ed (unit scale per voxel); bf16 keeps ~3 significant digits.
    assert (fast_bf16 - exact).abs().max() < 0.1
    assert torch.nn.functional.cosine_similarity(fast_bf16.flatten(), exact.flatten(), dim=0) > 0.999


# ------------------------------------------------------------------------------------------- switches
def test_inference_mode_then_training_forward():
    """Cached helper tensors made under inference_mode must not break a later autograd forward."""
    enc = build_sam_med3d("vit_mini").image_encoder
    image = torch.randn(1, 1, 64, 64, 64)
    with torch.inference_mode():
        enc(image)
    enc(image).sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_default_is_fast_and_switch_keeps_state_dict():
    model = build_sam_med3d("vit_mini")
    enc = model.image_encoder
    assert enc.attention_impl == "fast"
    keys = list(model.state_dict())
    assert enc.set_attention_impl("reference") is enc
    assert enc.attention_impl == "reference" and all(b.attention_impl == "reference" for b in enc.blocks)
    assert list(model.state_dict()) == keys
    reference_only = ImageEncoderViT3D(img_size=64, embed_dim=32, depth=2, num_heads=4, window_size=3,
                                       global_attn_indexes=(1,), out_chans=48, attention_impl="reference")
    assert reference_only.attention_impl == "reference"


def test_module_level_default(monkeypatch):
    monkeypatch.setattr(image_encoder_module, "DEFAULT_ATTENTION_IMPL", "reference")
    assert build_sam_med3d("vit_mini").image_encoder.attention_impl == "reference"


def test_unknown_impl_is_a_clear_error():
    enc = build_sam_med3d("vit_mini").image_encoder
    with pytest.raises(ValueError, match="attention_impl 'flash' is not one of fast, reference"):
        enc.set_attention_impl("flash")
    with pytest.raises(ValueError, match="attention_impl"):
        ImageEncoderViT3D(img_size=64, embed_dim=32, depth=1, num_heads=4, window_size=3, attention_impl="x")
