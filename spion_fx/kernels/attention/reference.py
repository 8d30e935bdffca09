"""Dense float64 oracle for block-sparse attention; every kernel is tested against it.

Conventions (shared with the kernels):
- causal is top-left aligned, like SDPA's ``is_causal``: query i sees key j iff j <= i.
- key_padding_mask is bool [B, Lk], True = real token.
- compat_spion: a key that causal/padding would let a query see but the block pattern prunes
  counts as logit 0 in the softmax denominator (and contributes nothing to the output), which is
  what the original SPION's sparse softmax does. Keys hidden by causal/padding stay at -inf.
- Rows that see no key output 0 and have lse = -inf.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout


def layout_block_grid(layout: BlockLayout) -> torch.Tensor:
    """Boolean block grid [H', nQB, nKB] ([B', H', nQB, nKB] for a batched layout); padding
    slots in kv_indices are ignored."""
    *lead, maxk = layout.kv_indices.shape
    nkb = layout.num_kv_blocks
    valid = torch.arange(maxk, device=layout.kv_indices.device) < layout.kv_num_blocks.unsqueeze(-1)
    # Padding slots go to a throw-away column so they cannot clear a real entry at column 0.
    idx = torch.where(
        valid, layout.kv_indices.long(), torch.full_like(layout.kv_indices.long(), nkb)
    )
    grid = torch.zeros(*lead, nkb + 1, dtype=torch.bool, device=layout.kv_indices.device)
    grid.scatter_(-1, idx, True)
    return grid[..., :nkb]


def base_visibility(
    lq: int, lk: int, causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """What a dense attention would see: bool [B or 1, 1, Lq, Lk] (causal and padding only)."""
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        vis = torch.tril(vis)
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :].bool()
    return vis


def dense_block_mask(
    layout: BlockLayout,
    lq: int,
    lk: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-level visibility of the block pattern: bool [B or 1, H', Lq, Lk] (a batched
    layout's B' rows are its own)."""
    bs = layout.block_size
    grid = layout_block_grid(layout)
    elem = grid.repeat_interleave(bs, dim=-2).repeat_interleave(bs, dim=-1)[..., :lq, :lk]
    if elem.dim() == 3:  # shared by the batch
        elem = elem[None]
    return elem & base_visibility(lq, lk, causal, key_padding_mask, grid.device)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    compat_spion: bool = False,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in float64 -> (out in q.dtype, lse float32 [B, H, Lq]).

    Differentiable (autograd through plain ops). ``dropout_keep`` (bool, broadcastable to
    [B, H, Lq, Lk]) applies dropout with rescaling 1/(1-dropout_p) to the probabilities.
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    group = h // hkv
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    vis = dense_block_mask(layout, lq, lk, causal, key_padding_mask).expand(b, h, lq, lk)
    s = s.masked_fill(~vis, float("-inf"))
    if compat_spion:
        base = base_visibility(lq, lk, causal, key_padding_mask, q.device).expand(b, h, lq, lk)
        pruned = (base & ~vis).sum(-1, keepdim=True).double()
        # log(pruned) is the logit of one virtual key standing for all pruned ones (exp(0) each).
        s = torch.cat([s, pruned.log()], dim=-1)
        v64 = torch.cat([v64, v64.new_zeros(b, h, 1, d)], dim=-2)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    if dropout_keep is not None and dropout_p > 0:
        keep = dropout_keep.expand(b, h, lq, lk)
        if compat_spion:
            keep = torch.cat([keep, keep.new_ones(b, h, lq, 1)], dim=-1)
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, v64)
    return out.to(q.dtype), lse.squeeze(-1).float()
