"""The SAM-Med3D image encoder: a 3D ViT with windowed and global attention.

Conventions: the input volume is ``(B, in_chans, D, H, W)``; inside the encoder tokens are channels-last
``(B, D', H', W', C)`` on the patch grid; the output embedding is channels-first ``(B, out_chans, D', H', W')``.

Two properties of the official model are reproduced on purpose, because the released weights expect them:
windowed blocks zero-pad the token grid up to a multiple of the window (8^3 -> 14^3 for ``vit_b_ori``)
*after* ``norm1``, so padded tokens take part in attention; and GELU is the exact (erf) one.

Attention runs one of two ways, with the same outputs (``tests/test_fast_encoder.py``):

* ``"fast"`` (default, :data:`DEFAULT_ATTENTION_IMPL`): only the real tokens are projected and attend; all the
  padded keys of a window are folded into one extra key by exact algebra (:mod:`.fast_attention`), and
  ``scaled_dot_product_attention`` takes the relative-position bias as its ``attn_mask``.
* ``"reference"``: the literal official computation (pad, partition, full attention, crop).

Switch with ``ImageEncoderViT3D(..., attention_impl=...)`` or ``encoder.set_attention_impl(...)``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock
from .fast_attention import padded_window_attention, partition_boxes, unpartition_boxes, window_boxes

#: Attention implementations: ``"fast"`` (exact, skips the padding) and ``"reference"`` (the official one).
ATTENTION_IMPLS = ("fast", "reference")
#: Implementation used by encoders built without an explicit ``attention_impl``.
DEFAULT_ATTENTION_IMPL = "fast"


def _check_attention_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    return impl


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches -> channels-last tokens ``(B, D', H', W', C)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Per-axis relative position embeddings ``(q_size, k_size, head_dim)`` taken from ``rel_pos``.

    ``rel_pos`` has ``2 * max(q_size, k_size) - 1`` rows when the sizes match the ones the model was built
    for; otherwise it is linearly interpolated to that length, as in SAM.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                size=max_rel_dist, mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    return rel_pos[_relative_index(q_size, k_size, rel_pos.device)]


@functools.lru_cache(maxsize=64)
def _relative_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """``(q_size, k_size)`` row indices into the ``rel_pos`` table (cached: it only depends on the sizes, and
    rebuilding it costs ~8 small kernel launches per table per block). Built outside inference mode so that a
    later autograd forward may save it for backward."""
    with torch.inference_mode(False):
        return _build_relative_index(q_size, k_size, device)


def _build_relative_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return relative.long()


def decomposed_relative_bias(q: torch.Tensor, rel_d: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                             q_size: Tuple[int, int, int], k_size: Tuple[int, int, int]
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis terms of the relative-position attention bias.

    ``q`` is ``(B*, Nq, c)`` with ``Nq = qd*qh*qw``. Returns ``(bias_d, bias_h, bias_w)`` of shapes
    ``(B*, qd, qh, qw, kd)``, ``(..., kh)`` and ``(..., kw)``: ``bias_d[b, a, h, w, k] = q(a,h,w) . Rd[a, k]``
    and likewise for the other axes. How they are added to the attention logits is
    :func:`official_bias_layout`.
    """
    qd, qh, qw = q_size
    kd, kh, kw = k_size
    r_q = q.reshape(q.shape[0], qd, qh, qw, q.shape[-1])
    bias_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, relative_position_table(qd, kd, rel_d))
    bias_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, relative_position_table(qh, kh, rel_h))
    bias_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, relative_position_table(qw, kw, rel_w))
    return bias_d, bias_h, bias_w


def official_bias_layout(bias_d: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor) -> torch.Tensor:
    """Broadcast the per-axis bias terms onto the ``(B*, qd, qh, qw, kd, kh, kw)`` attention grid the way the
    official SAM-Med3D does.

    The official code inserts the singleton axes so that the key index of every term lands on the *last*
    key axis (kw), and the query's own third/second index lands on a key axis. For query ``(a, b, c)`` and
    key ``(x, y, z)`` the added bias is therefore::

        q(a,b,c) . Rd[a, z]  +  q(a,b,x) . Rh[b, z]  +  q(a,b,y) . Rw[y, z]

    instead of ViTDet's ``q(a,b,c) . (Rd[a,x] + Rh[b,y] + Rw[c,z])``. The released weights were trained with
    this layout, so it is reproduced exactly; it needs a cubic token grid (all six sizes equal).
    """
    return (bias_d[:, :, :, :, None, None, :]
            + bias_h[:, :, :, None, :, None, :]
            + bias_w[:, :, :, None, None, :, :])


class Attention(nn.Module):
    """Multi-head self-attention over a channels-last token grid with 3D decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 input_size: Optional[Tuple[int, int, int]] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is True")
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, head_dim))

    def split_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, D, H, W, C)`` -> q, k, v each ``(B * heads, D*H*W, head_dim)``."""
        b, d, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, d * h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, d * h * w, -1).unbind(0)
        return q, k, v

    def merge_heads(self, out: torch.Tensor, b: int, size: Tuple[int, int, int]) -> torch.Tensor:
        """``(B * heads, N, head_dim)`` -> projected ``(B, D, H, W, C)``."""
        d, h, w = size
        out = out.view(b, self.num_heads, d, h, w, -1).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, _ = x.shape
        q, k, v = self.split_qkv(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            bias_d, bias_h, bias_w = decomposed_relative_bias(
                q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, (d, h, w), (d, h, w))
            attn = (attn.view(-1, d, h, w, d, h, w) + official_bias_layout(bias_d, bias_h, bias_w)
                    ).view(-1, d * h * w, d * h * w)
        attn = attn.softmax(dim=-1)
        return self.merge_heads(attn @ v, b, (d, h, w))

    def forward_box(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Fast exact attention of zero-padded ``window^3`` windows given only their real tokens.

        ``x``: ``(N, rd, rh, rw, C)``, the real tokens of N windows (the box at each window's low corner; the
        rest of the window is zero tokens, as after ``window_partition``). Returns ``(N, rd, rh, rw, C)``,
        equal to ``forward`` on the padded windows cropped to the box. A global block is the case
        ``rd = rh = rw = window`` = grid size. The official bias layout needs a cubic window.
        """
        n, rd, rh, rw, _ = x.shape
        q, k, v = self.split_qkv(x)
        heads, head_dim = self.num_heads, q.shape[-1]
        if self.qkv.bias is not None:
            zero_qkv = self.qkv.bias.view(3, 1, heads, head_dim).expand(3, n, heads, head_dim)
            q0, k0, v0 = zero_qkv.reshape(3, n * heads, head_dim).unbind(0)
        else:
            q0 = k0 = v0 = q.new_zeros(n * heads, head_dim)
        tables = None
        if self.use_rel_pos:
            tables = (relative_position_table(window, window, self.rel_pos_d),
                      relative_position_table(window, window, self.rel_pos_h),
                      relative_position_table(window, window, self.rel_pos_w))
        box = (n * heads, rd, rh, rw, head_dim)
        out = padded_window_attention(q.view(box), k.view(box), v.view(box), q0, k0, v0, window, tables,
                                      self.scale)
        return self.merge_heads(out, n, (rd, rh, rw))


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Zero-pad ``(B, D, H, W, C)`` to multiples of ``window_size`` and cut it into windows.

    Returns windows ``(B * nW, ws, ws, ws, C)`` and the padded size ``(Dp, Hp, Wp)``.
    """
    b, d, h, w, c = x.shape
    pad_d, pad_h, pad_w = ((window_size - s % window_size) % window_size for s in (d, h, w))
    if pad_d or pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h, 0, pad_d))
    dp, hp, wp = d + pad_d, h + pad_h, w + pad_w
    ws = window_size
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (dp, hp, wp)


def window_unpartition(windows: torch.Tensor, window_size: int, padded_size: Tuple[int, int, int],
                       size: Tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows back to ``(B, D, H, W, C)`` without the padding."""
    dp, hp, wp = padded_size
    d, h, w = size
    ws = window_size
    b = windows.shape[0] // ((dp // ws) * (hp // ws) * (wp // ws))
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w, :].contiguous()


class Block(nn.Module):
    """Transformer block: windowed (``window_size > 0``) or global attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_norm_eps: float = 1e-6, act_layer: Type[nn.Module] = nn.GELU, use_rel_pos: bool = False,
                 window_size: int = 0, input_size: Optional[Tuple[int, int, int]] = None,
                 attention_impl: Optional[str] = None) -> None:
        super().__init__()
        self.attention_impl = _check_attention_impl(attention_impl or DEFAULT_ATTENTION_IMPL)
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        attn_size = input_size if window_size == 0 else (window_size, window_size, window_size)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                              input_size=attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def attend_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of normalised tokens ``(B, D, H, W, C)`` by the fast path (same result as the reference).

        Windowed: the grid is cut into at most 8 groups of equally shaped real boxes (full windows, and the
        partial last windows along each axis); each group attends in one batched call. Global: one box, the
        grid. Falls back to the reference for a non-cubic global grid (which the official layout lacks).
        """
        b, d, h, w, c = x.shape
        if self.window_size == 0:
            if not d == h == w:
                return self.attn(x)
            return self.attn.forward_box(x, d)
        groups = window_boxes((d, h, w), self.window_size)
        if len(groups) == 1:
            box = groups[0][1]
            return unpartition_boxes(self.attn.forward_box(partition_boxes(x, box), self.window_size), (b, d, h, w))
        out = torch.empty_like(x)
        for (sd, sh, sw), box in groups:
            region = x[:, sd, sh, sw]
            attended = self.attn.forward_box(partition_boxes(region, box), self.window_size)
            out[:, sd, sh, sw] = unpartition_boxes(attended, tuple(region.shape[:4]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.attention_impl == "fast":
            x = self.attend_fast(x)
        elif self.window_size > 0:
            size = tuple(x.shape[1:4])
            x, padded_size = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_size, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """ViT over a cubic volume; see the module docstring for shapes."""

    def __init__(self, img_size: int = 128, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 384,
                 qkv_bias: bool = True, layer_norm_eps: float = 1e-6, use_abs_pos: bool = True,
                 use_rel_pos: bool = True, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11), attention_impl: Optional[str] = None
                 ) -> None:
        super().__init__()
        attention_impl = _check_attention_impl(attention_impl or DEFAULT_ATTENTION_IMPL)
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, layer_norm_eps=layer_norm_eps,
                  use_rel_pos=use_rel_pos, window_size=0 if i in global_attn_indexes else window_size,
                  input_size=(grid, grid, grid), attention_impl=attention_impl)
            for i in range(depth))
        self._compiled_blocks: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans, eps=layer_norm_eps),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans, eps=layer_norm_eps),
        )

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus absolute position embedding, channels-last."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    @property
    def attention_impl(self) -> str:
        """The attention implementation of the blocks (``"fast"`` or ``"reference"``)."""
        return self.blocks[0].attention_impl if len(self.blocks) else DEFAULT_ATTENTION_IMPL

    def set_attention_impl(self, impl: str, compile: bool = False, **compile_kwargs) -> "ImageEncoderViT3D":
        """Choose ``"fast"`` or ``"reference"`` attention for every block; returns ``self``.

        ``compile=True`` runs the block stack through ``torch.compile(**compile_kwargs)`` (first call is slow;
        needs a C++ compiler on CPU; an encoder holding a compiled stack may not deep-copy or pickle, so call
        ``set_attention_impl(impl)`` without ``compile`` first when you need that). Parameters and state_dict
        keys are unchanged either way.
        """
        _check_attention_impl(impl)
        for block in self.blocks:
            block.attention_impl = impl
        # Compiled graphs bake in the implementation, so drop any previous one.
        self._compiled_blocks = torch.compile(self.blocks_forward, **compile_kwargs) if compile else None
        return self

    def blocks_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer blocks on channels-last tokens ``(B, D', H', W', C)``."""
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        x = self._compiled_blocks(x) if self._compiled_blocks is not None else self.blocks_forward(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
