"""Exact attention of a zero-padded window computed from its real tokens only.

Why this exists: the official SAM-Med3D windowed blocks zero-pad the token grid up to a multiple of the window
*after* ``norm1`` (``vit_b_ori``: the 8^3 grid becomes one 14^3 window), attend over all ``window^3`` tokens and
then throw away every output except the real ones. 2232 of the 2744 keys are padding. This module gets the same
outputs from the real tokens alone:

* A padded token is the zero vector, so its query/key/value are the qkv projection biases
  ``q0, k0, v0``. All padded keys share ``k0`` and ``v0``, so together they act like **one extra key** ``k0``
  with value ``v0`` whose logit is ``log sum_{padded (x,y,z)} exp(logit(x, y, z))``.
* The official relative-position bias (see ``official_bias_layout`` in ``image_encoder``) for query
  ``(a, b, c)`` and key ``(x, y, z)`` on the ``W^3`` window grid is::

      q(a,b,c).Rd[a,z]  +  q(a,b,x).Rh[b,z]  +  q(a,b,y).Rw[y,z]    =:  D[z] + H[x,z] + V[y,z]

  where ``q(a,b,x)`` is the query at another position of the same row; when ``x`` is beyond the row's real
  extent that query is padding, i.e. ``q0``. ``H`` and ``V`` depend on the query row ``(a, b)`` only, not on
  ``c``, so the padded keys' total (all ``(x,y,z)`` outside the real box ``[0,rd) x [0,rh) x [0,rw)``) is::

      exp(s q.k0) * sum_z exp(D[z]) G[z],    G[z] = sum_{(x,y): (x,y,z) padded} exp(H[x,z] + V[y,z])

  with ``G`` one ``W^3`` log-sum-exp per row (real keys masked with ``-inf``) instead of ``W^3`` logits per
  query. (It also factorises, ``sum_{x,y} exp(H+V) = (sum_x exp H)(sum_y exp V)``, but the masked grid is
  already cheap and needs fewer kernel launches.) Everything is evaluated in log space without subtractions,
  so it is as accurate as the reference softmax.

The real keys get their exact bias ``D + H + V``; one ``scaled_dot_product_attention`` call then handles
``rd*rh*rw`` real keys plus the single extra key, with the bias passed as an additive ``attn_mask``.

Conventions: per (window, head) tensors are channels-last on the real box, ``(N, rd, rh, rw, head_dim)``
with ``N = windows * batch * heads``; the window's real tokens occupy its low corner (padding is appended at
the high end of each axis, as ``window_partition`` does).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tables = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def relative_bias_and_padding_logit(q: torch.Tensor, q_pad: torch.Tensor, tables: Tables, window: int
                                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Bias of the real keys and the log-mass of all padded keys for every real query.

    ``q``: ``(N, rd, rh, rw, c)`` unscaled real queries; ``q_pad``: ``(N, c)`` the query of a padded (zero)
    token; ``tables``: ``(Rd, Rh, Rw)``, each ``(window, window, c)`` indexed ``[query coord, key coord]``
    (``relative_position_table(window, window, rel_pos_*)``).

    Returns ``bias`` ``(N, rd*rh*rw, rd*rh*rw)`` (query and key flattened d-major, like the token order) and
    ``pad_logit`` ``(N, rd*rh*rw)`` = ``log sum_{padded keys} exp(relative bias)`` (the content term
    ``scale * q.k0`` is *not* included), or None when the box fills the window (no padding).
    """
    n, rd, rh, rw, c = q.shape
    w = window
    rel_d, rel_h, rel_w = tables
    # The row (a, b, .) of queries along the last axis, padded with q0 up to the window: H and V use the query
    # at position (a, b, x) / (a, b, y) for x, y over the whole window.
    if rw < w:
        q_row = torch.cat([q, q_pad[:, None, None, None, :].expand(n, rd, rh, w - rw, c)], dim=3)
    else:
        q_row = q
    term_d = torch.einsum("nabcd,azd->nabcz", q, rel_d[:rd])        # D[z]    (n, rd, rh, rw, W)
    term_h = torch.einsum("nabxd,bzd->nabxz", q_row, rel_h[:rh])    # H[x, z] (n, rd, rh, W, W)
    term_v = torch.einsum("nabyd,yzd->nabyz", q_row, rel_w)         # V[y, z] (n, rd, rh, W, W)
    bias = (term_d[:, :, :, :, None, None, :rw]
            + term_h[:, :, :, None, :rd, None, :rw]
            + term_v[:, :, :, None, None, :rh, :rw])
    nr = rd * rh * rw
    bias = bias.reshape(n, nr, nr)
    if nr == w ** 3:
        return bias, None
    # log sum over the padded (x, y) of exp(H[x,z] + V[y,z]), per z: an (x, y, z) grid per query row (a, b) --
    # W^3 values, far fewer than the rd*rh*rw * W^3 logits it replaces -- with the real keys masked out.
    pair = term_h[:, :, :, :, None, :] + term_v[:, :, :, None, :, :]     # (n, rd, rh, Wx, Wy, Wz)
    pair[:, :, :, :rd, :rh, :rw] = float("-inf")
    if rd == w and rh == w:
        # Every (x, y) is real when z < rw: only padded z remain (keeps all-(-inf) slices, and NaN
        # gradients through them, out of the log-sum-exp).
        pair, term_d = pair[..., rw:], term_d[..., rw:]
    g = pair.flatten(3, 4).logsumexp(3)                                     # (n, rd, rh, Wz)
    pad_logit = (term_d + g[:, :, :, None, :]).logsumexp(-1)                # (n, rd, rh, rw)
    return bias, pad_logit.reshape(n, nr)


def padded_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pad: torch.Tensor,
                            k_pad: torch.Tensor, v_pad: torch.Tensor, window: int, tables: Optional[Tables],
                            scale: float) -> torch.Tensor:
    """Outputs of the real queries of zero-padded ``window^3`` windows, exactly as full attention gives them.

    ``q, k, v``: ``(N, rd, rh, rw, c)`` projections of the real tokens (the box at the window's low corner);
    ``q_pad, k_pad, v_pad``: ``(N, c)`` projections of a zero token (the qkv biases); ``tables`` as in
    :func:`relative_bias_and_padding_logit`, or None without relative positions. Logits are
    ``scale * q.k + bias``. Returns ``(N, rd*rh*rw, c)``.
    """
    n, rd, rh, rw, c = q.shape
    nr = rd * rh * rw
    if min(rd, rh, rw) < 1 or max(rd, rh, rw) > window:
        raise ValueError(f"real box {rd}x{rh}x{rw} does not fit in a window of {window}")
    n_pad = window ** 3 - nr
    qf, kf, vf = q.reshape(n, nr, c), k.reshape(n, nr, c), v.reshape(n, nr, c)
    if tables is not None:
        # Bias terms in float32 (or float64) even under autocast: logsumexp of low-precision sums is lossy.
        work = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            bias, pad_logit = relative_bias_and_padding_logit(
                q.to(work), q_pad.to(work), tuple(t.to(work) for t in tables), window)
    else:
        bias = None
        pad_logit = qf.new_full((n, nr), math.log(n_pad)) if n_pad else None
    if pad_logit is None:
        mask = bias.to(qf.dtype) if bias is not None else None
    else:
        kf = torch.cat([kf, k_pad.to(kf.dtype)[:, None, :]], dim=1)
        vf = torch.cat([vf, v_pad.to(vf.dtype)[:, None, :]], dim=1)
        # nr + 1 key columns, laid out in rows padded to a multiple of 16 elements and then sliced: the CUDA
        # memory-efficient kernel needs an aligned mask stride (it would otherwise copy the mask and warn).
        width = -(-(nr + 1) // 16) * 16
        mask = qf.new_empty(n, nr, width)[..., :nr + 1]
        mask[..., :nr] = bias if bias is not None else 0.0
        mask[..., nr] = pad_logit
    # 4-D (1, N, L, c) so that the fused CUDA kernels apply (they reject 3-D inputs and fall back to math).
    out = F.scaled_dot_product_attention(qf[None], kf[None], vf[None], attn_mask=None if mask is None else mask[None],
                                         scale=scale)
    return out[0]


def window_boxes(size: Sequence[int], window: int) -> List[Tuple[Tuple[slice, slice, slice], Tuple[int, int, int]]]:
    """Split a ``(D, H, W)`` token grid into groups of equally shaped real boxes of ``window`` windows.

    Along each axis the windows are ``size // window`` full ones and, when ``size % window``, one last window
    whose real part is the remainder. Returns ``[(grid slices, (rd, rh, rw))]``: the grid region of each group
    (at most 8) and the real-box shape of its windows; the region is an exact multiple of that shape.
    """
    per_axis = []
    for s in size:
        full, rem = divmod(s, window)
        parts = []
        if full:
            parts.append((slice(0, full * window), window))
        if rem:
            parts.append((slice(full * window, s), rem))
        per_axis.append(parts)
    return [((sd, sh, sw), (rd, rh, rw))
            for sd, rd in per_axis[0] for sh, rh in per_axis[1] for sw, rw in per_axis[2]]


def partition_boxes(x: torch.Tensor, box: Tuple[int, int, int]) -> torch.Tensor:
    """``(B, nd*rd, nh*rh, nw*rw, C)`` -> ``(B*nd*nh*nw, rd, rh, rw, C)`` (windows in b, d, h, w order)."""
    b, d, h, w, c = x.shape
    rd, rh, rw = box
    x = x.reshape(b, d // rd, rd, h // rh, rh, w // rw, rw, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, rd, rh, rw, c)


def unpartition_boxes(windows: torch.Tensor, grid: Tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of :func:`partition_boxes`; ``grid`` is ``(B, D, H, W)`` of the region."""
    b, d, h, w = grid
    _, rd, rh, rw, c = windows.shape
    x = windows.reshape(b, d // rd, h // rh, w // rw, rd, rh, rw, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, c)
