"""MST's Hybrid Sparse Attention, computed sparsely (the original only masked a dense SDPA).

Masks (causal): *strided* — query p sees key k iff k <= p and (p - k) % stride == 0;
*local+strided* — additionally every key with 0 <= p - k < local.

Strided attention is causal attention inside each residue class p mod stride: reshaping the
sequence to [stride, L/stride] turns it into `stride` independent causal problems of length
L/stride, which PyTorch's fused SDPA (with its own backward) runs at L²/stride cost.

Local+strided needs one softmax over two key sets. Each query's local keys live in its own and
the previous `local`-sized block (a block-level band), its strided keys in its residue class; we
build both score sets explicitly — O(L·(2·local + L/stride)) instead of O(L²) — and normalise
them jointly, so autograd gives an exact backward. Keys the two sets share (p - k < local and a
multiple of the stride) are counted only in the local set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hybrid_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stride: int,
    local: int = 0,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q: [B, H, L, D]; k, v: [B, Hkv, L, D] (GQA by repetition-free broadcasting)."""
    if q.shape[-2] != k.shape[-2]:
        raise ValueError("hybrid sparse attention is causal self-attention: q and k lengths must match")
    if stride < 1 or local < 0:
        raise ValueError(f"stride must be >= 1 and local >= 0, got stride={stride}, local={local}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if local == 0:
        return _strided(q, k, v, stride, scale, key_padding_mask, dropout_p)
    return _local_and_strided(q, k, v, stride, local, scale, key_padding_mask, dropout_p)


def _to_classes(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, stride, n, D]: row r holds positions r, r + stride, r + 2·stride, …"""
    b, h, length, d = x.shape
    n = -(-length // stride)
    x = F.pad(x, (0, 0, 0, n * stride - length))
    return x.view(b, h, n, stride, d).transpose(2, 3)


def _from_classes(x: torch.Tensor, length: int) -> torch.Tensor:
    b, h, stride, n, d = x.shape
    return x.transpose(2, 3).reshape(b, h, n * stride, d)[:, :, :length]


def _class_padding(key_padding_mask: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, L] -> [B, 1, stride, 1, n] key visibility per residue class."""
    kp = _to_classes(key_padding_mask[:, None, :, None].float(), stride)[..., 0] > 0.5
    return kp[:, :, :, None, :]


def _strided(q, k, v, stride, scale, key_padding_mask, dropout_p):
    length = q.shape[-2]
    qc, kc, vc = (_to_classes(t, stride) for t in (q, k, v))
    if key_padding_mask is None:
        # Padding added by _to_classes sits at the end of each class: causal hides it.
        out = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, dropout_p=dropout_p)
    else:
        n = qc.shape[-2]
        visible = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() & _class_padding(key_padding_mask, stride)
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=visible, scale=scale, dropout_p=dropout_p)
        out = out.nan_to_num(0.0)  # a query whose keys are all padding
    return _from_classes(out, length)


def _local_and_strided(q, k, v, stride, local, scale, key_padding_mask, dropout_p):
    b, h, length, d = q.shape
    device = q.device
    # Local band: blocks of `local` queries see their own and the previous block.
    nb = -(-length // local)
    pad = nb * local - length
    qb = F.pad(q, (0, 0, 0, pad)).view(b, h, nb, local, d)
    kp_full = F.pad(k, (0, 0, local, pad)).view(b, h, nb + 1, local, d)
    vp_full = F.pad(v, (0, 0, local, pad)).view(b, h, nb + 1, local, d)
    kb = torch.cat([kp_full[:, :, :-1], kp_full[:, :, 1:]], dim=3)  # [B, H, nb, 2·local, D]
    vb = torch.cat([vp_full[:, :, :-1], vp_full[:, :, 1:]], dim=3)
    local_scores = (qb @ kb.transpose(-1, -2)) * scale  # [B, H, nb, local, 2·local]
    qpos = torch.arange(nb * local, device=device).view(nb, local, 1)
    kpos = (torch.arange(-local, nb * local, device=device).unfold(0, 2 * local, local))[:nb].view(nb, 1, 2 * local)
    local_visible = (qpos - kpos < local) & (qpos >= kpos) & (kpos >= 0) & (kpos < length)
    if key_padding_mask is not None:
        kp = F.pad(key_padding_mask, (local, pad), value=False).unfold(1, 2 * local, local)[:, :nb]
        local_visible = local_visible & kp[:, None, :, None, :]
    local_scores = local_scores.masked_fill(~local_visible, float("-inf"))

    # Strided keys further back than the band, per residue class.
    qc, kc, vc = (_to_classes(t, stride) for t in (q, k, v))
    n = qc.shape[-2]
    strided_scores = (qc @ kc.transpose(-1, -2)) * scale  # [B, H, stride, n, n]
    steps_back = torch.arange(n, device=device).view(n, 1) - torch.arange(n, device=device).view(1, n)
    strided_visible = steps_back * stride >= local  # also implies causal; excludes band keys
    if key_padding_mask is not None:
        strided_visible = strided_visible & _class_padding(key_padding_mask, stride)
    strided_scores = strided_scores.masked_fill(~strided_visible, float("-inf"))

    # One softmax over both key sets, laid out per query position.
    local_flat = local_scores.reshape(b, h, nb * local, 2 * local)[:, :, :length]
    strided_flat = strided_scores.transpose(2, 3).reshape(b, h, n * stride, n)[:, :, :length]
    probs = torch.softmax(torch.cat([local_flat, strided_flat], dim=-1), dim=-1).nan_to_num(0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    local_probs, strided_probs = probs.split([2 * local, n], dim=-1)
    local_probs = F.pad(local_probs, (0, 0, 0, pad)).view(b, h, nb, local, 2 * local)
    out_local = (local_probs @ vb).reshape(b, h, nb * local, d)[:, :, :length]
    strided_probs = F.pad(strided_probs, (0, 0, 0, n * stride - length)).view(b, h, n, stride, n).transpose(2, 3)
    out_strided = _from_classes(strided_probs @ vc, length)
    return out_local + out_strided


def hsa_mask(length: int, stride: int, local: int = 0, device=None) -> torch.Tensor:
    """The dense [L, L] boolean mask the sparse computation above is exact for (for tests)."""
    p = torch.arange(length, device=device).view(-1, 1)
    kk = torch.arange(length, device=device).view(1, -1)
    back = p - kk
    visible = (back >= 0) & (back % stride == 0)
    if local:
        visible |= (back >= 0) & (back < local)
    return visible
