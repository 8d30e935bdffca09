"""Routed (per-input) block layouts, built on the device from the step's own q and k.

MoBA's plain router: each query block scores every key block by the dot product of the block's
mean-pooled queries with the key block's mean-pooled keys (times the attention scale), and keeps
the ``top_k`` best on top of blocks it always keeps: its diagonal block and the first
``sink_blocks`` blocks. Under causal masking no block right of the diagonal is a candidate.

Everything is tensor ops with shapes fixed by (B, H, Lq, Lk, block_size, top_k, sink_blocks):
no ``.item()``, no ``nonzero``, nothing read on the host, so a step that routes compiles once and
never waits on the device. Both halves of the layout (kv rows, and the transposed q columns the
backward walks) come from one boolean block grid by a stable sort, so they agree by
construction. The kv rows are ``maxK = min(top_k + sink_blocks + 1, nKB)`` wide, the q columns
``nQB`` wide (a key block may be chosen by every query block).
"""

from __future__ import annotations

import torch

from .layout import BlockLayout


def routed_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int = 1,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    kv_group: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routed block grid before compression: (kept bool [B, Hs, nQB, nKB], chosen bool
    [B, Hs, nQB, nKB] (the top-k picks alone, without diagonal and sinks), scores float
    [B, Hs, nQB, nKB] with -inf where a block was no candidate). Hs is Hkv when ``kv_group``
    (one choice per KV-head group, the group's pooled queries averaged), else H."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D [B, heads, L, D], got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if isinstance(sink_blocks, bool) or not isinstance(sink_blocks, int) or sink_blocks < 0:
        raise ValueError(f"sink_blocks must be an int >= 0, got {sink_blocks!r}")
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or h % hkv != 0:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}")
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, lk)
    ):
        raise ValueError(
            f"key_padding_mask must be bool [B={b}, Lk={lk}], got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    bs = block_size
    nqb, nkb = -(-lq // bs), -(-lk // bs)
    scale = d**-0.5 if scale is None else float(scale)
    device = q.device
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype

    # Mean-pooled queries [B, H, nQB, D] (a ragged last block averages its real rows) and keys
    # [B, Hkv, nKB, D] over the real keys of each block; block sums read q/k in place.
    q_rows = torch.clamp(lq - torch.arange(nqb, device=device) * bs, max=bs).to(work)
    q_pool = _block_sums(q, bs, nqb, work) / q_rows.view(1, 1, nqb, 1)
    if key_padding_mask is None:
        k_count = torch.clamp(lk - torch.arange(nkb, device=device) * bs, max=bs).to(work)
        k_count = k_count.view(1, 1, nkb).expand(b, 1, nkb)
        k_sum = _block_sums(k, bs, nkb, work)
    else:
        real = key_padding_mask.to(work)
        k_count = _block_sums(real.view(b, 1, lk, 1), bs, nkb, work).squeeze(-1)  # [B, 1, nKB]
        k_sum = _block_sums(k.to(work) * real[:, None, :, None], bs, nkb, work)
    k_pool = k_sum / k_count.clamp(min=1).unsqueeze(-1)

    if kv_group:
        q_pool = q_pool.view(b, hkv, h // hkv, nqb, d).mean(2)
    else:
        k_pool = k_pool.repeat_interleave(h // hkv, dim=1)
    scores = torch.matmul(q_pool, k_pool.transpose(-1, -2)) * scale  # [B, Hs, nQB, nKB]

    qb = torch.arange(nqb, device=device).view(-1, 1)
    kb = torch.arange(nkb, device=device).view(1, -1)
    visible = kb <= qb if causal else torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    forced = (kb == qb) | ((kb < sink_blocks) & visible)  # [nQB, nKB]
    has_keys = (k_count > 0).unsqueeze(-2)  # [B, 1, 1, nKB]
    candidate = (visible & ~forced) & has_keys  # [B, 1, nQB, nKB]
    scores = scores.masked_fill(~candidate, float("-inf"))

    picks = min(top_k, nkb)
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    if picks > 0:
        top = torch.topk(scores.detach(), picks, dim=-1)
        chosen = chosen.scatter(-1, top.indices, top.values > float("-inf"))
    kept = chosen | forced
    return kept, chosen, scores


def _block_sums(x: torch.Tensor, block: int, n_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, L, D] -> sums over each block of ``block`` rows, [B, H, n_blocks, D] in ``dtype``."""
    full = x.shape[2] // block
    sums = x[:, :, : full * block].unflatten(2, (full, block)).sum(3, dtype=dtype)
    if full < n_blocks:  # the ragged last block
        sums = torch.cat([sums, x[:, :, full * block :].sum(2, keepdim=True, dtype=dtype)], dim=2)
    return sums


def compress_block_grid(grid: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, C] bool -> (count int32 [..., R], ascending column indices int32 [..., R, width],
    padded with 0), on the grid's device without a host sync: the rows must keep at most
    ``width`` columns (what the caller's construction guarantees)."""
    counts = grid.sum(-1, dtype=torch.int32)
    width = max(min(width, grid.shape[-1]), 1)
    # A stable sort of (not kept) puts the kept columns first, in ascending order.
    order = torch.sort((~grid).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.arange(width, device=grid.device) < counts.unsqueeze(-1)
    indices = torch.where(valid, order, torch.zeros_like(order))
    return counts, indices.to(torch.int32).contiguous()


def routed_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int = 1,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    kv_group: bool = True,
    scale: float | None = None,
    return_scores: bool = False,
) -> BlockLayout | tuple[BlockLayout, torch.Tensor, torch.Tensor]:
    """A batched ``BlockLayout`` [B, H', nQB, ...] chosen per (input, head or KV-head group,
    query block) from q [B, H, Lq, D] and k [B, Hkv, Lk, D]: the diagonal block, the first
    ``sink_blocks`` blocks (causal: those left of the diagonal), and the ``top_k`` key blocks
    with the highest pooled-q . pooled-k score (causal: none right of the diagonal; key blocks
    with no real key are never picked). A row keeps ``min(top_k, candidates)`` picks.

    ``kv_group=True`` makes one choice per KV-head group (GQA/MQA: the heads that read the same
    keys read the same blocks; H' = 1 under MQA), ``False`` one per query head. The selection
    is not differentiable; with ``return_scores=True`` the call also returns (block mask of the
    picks, bool [B, Hs, nQB, nKB]; scores [B, Hs, nQB, nKB], differentiable in q and k, -inf
    off the candidates) for a router loss. No host sync: traceable with ``fullgraph=True``.
    """
    kept, chosen, scores = routed_blocks(
        q, k, block_size=block_size, top_k=top_k, sink_blocks=sink_blocks, causal=causal,
        key_padding_mask=key_padding_mask, kv_group=kv_group, scale=scale,
    )  # fmt: skip
    h, hs = q.shape[1], kept.shape[1]
    grid = kept if hs in (1, h) else kept.repeat_interleave(h // hs, dim=1)
    kv_num, kv_idx = compress_block_grid(grid, top_k + sink_blocks + 1)
    q_num, q_idx = compress_block_grid(grid.transpose(-1, -2), grid.shape[-2])
    layout = BlockLayout(kv_num, kv_idx, q_num, q_idx, int(block_size))._mark_verified()
    if return_scores:
        return layout, chosen, scores
    return layout


__all__ = ["compress_block_grid", "routed_blocks", "routed_layout"]
