"""Conversion between :class:`BlockLayout` and FlexAttention's ``BlockMask``.

Both store a block-CSR pattern (counts + ascending column indices, and the transpose). A
``BlockMask`` adds a batch dimension, a full/partial split (full blocks skip ``mask_mod``) and a
``mask_mod`` for element-level masks; a ``BlockLayout`` keeps only the block pattern, with causal
and key-padding masks given to the kernels as flags.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from spion_fx.kernels.attention.layout import BlockLayout

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _causal_mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                     kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


def layout_grid(layout: BlockLayout) -> torch.Tensor:
    """Boolean block grid [H', nQB, nKB] of a layout.

    Padding entries of ``kv_indices`` are routed to a scratch column that is then dropped, so the
    zero padding can never clear a real column-0 block.
    """
    num, idx = layout.kv_num_blocks, layout.kv_indices.long()
    h, nqb, maxk = idx.shape
    nkb = layout.num_kv_blocks
    valid = torch.arange(maxk, device=idx.device) < num.unsqueeze(-1)
    idx = torch.where(valid, idx, torch.full_like(idx, nkb))
    grid = torch.zeros(h, nqb, nkb + 1, dtype=torch.bool, device=idx.device)
    grid.scatter_(2, idx, True)
    return grid[..., :nkb]


def _with_pattern(mask_mod: MaskMod | None, grid: torch.Tensor, block_size: int) -> MaskMod:
    n_heads = grid.shape[0]

    def pattern_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:
        keep = grid[h % n_heads, q_idx // block_size, kv_idx // block_size]
        if mask_mod is not None:
            keep = keep & mask_mod(b, h, q_idx, kv_idx)
        return keep

    return pattern_mod


def _to_flex_rows(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, R, C] bool -> (count int32 [H, R], indices int32 [H, R, C]) in BlockMask's format.

    BlockMask wants the index tensor as wide as the column count; a stable sort of (not kept)
    lists the kept columns first, ascending, and the entries past the count are ignored.
    """
    counts = grid.sum(-1, dtype=torch.int32)
    order = torch.sort((~grid).to(torch.int8), dim=-1, stable=True).indices
    return counts, order.to(torch.int32)


def layout_to_block_mask(
    layout: BlockLayout,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    mask_mod: MaskMod | None = None,
    pattern_in_mask_mod: bool = True,
) -> BlockMask:
    """FlexAttention ``BlockMask`` with the layout's block pattern, ``BLOCK_SIZE=layout.block_size``.

    ``causal=True`` adds the causal ``mask_mod``, drops the blocks right of the diagonal (they
    see nothing) and marks the blocks left of it as full (FlexAttention then evaluates the mask
    only on diagonal blocks, as our kernels do). A custom
    ``mask_mod`` makes every block partial. Without either, interior blocks are full. A shared
    layout (H' = 1) is broadcast over ``heads`` and ``batch`` with ``expand`` (no copy).

    ``pattern_in_mask_mod`` (default) also encodes the block pattern in the ``mask_mod``: paths
    that ignore block sparsity and evaluate ``mask_mod`` everywhere (eager ``flex_attention``,
    ``create_mask``) then stay exact. The fused kernel calls ``mask_mod`` only on partial blocks,
    which are in the pattern anyway; pass False there to save the lookup.
    """
    if causal and mask_mod is not None:
        raise ValueError("pass either causal=True or a mask_mod, not both")
    bs = layout.block_size
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
    if -(-q_len // bs) != nqb or -(-kv_len // bs) != nkb:
        raise ValueError(
            f"q_len={q_len}, kv_len={kv_len} need {-(-q_len // bs)} x {-(-kv_len // bs)} blocks of "
            f"{bs}, the layout has {nqb} x {nkb}"
        )
    if layout.num_heads not in (1, heads):
        raise ValueError(f"layout has {layout.num_heads} heads; expected 1 or heads={heads}")

    grid = layout_grid(layout)
    rows = torch.arange(nqb, device=grid.device)[:, None]
    cols = torch.arange(nkb, device=grid.device)[None, :]
    # A block is full when no element inside it is masked: interior of the sequence and, when
    # causal, strictly left of the diagonal.
    interior = ((cols + 1) * bs <= kv_len) & ((rows + 1) * bs <= q_len)
    if causal:
        # Blocks right of the diagonal are fully masked: drop them rather than have FlexAttention
        # visit them only to mask everything.
        grid = grid & (cols <= rows)
        interior = interior & (cols < rows)
        mask_mod = _causal_mask_mod
    elif mask_mod is not None:
        interior = torch.zeros_like(interior)
    if pattern_in_mask_mod:
        mask_mod = _with_pattern(mask_mod, grid, bs)
    full = grid & interior
    partial = grid & ~interior

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0).expand(batch, heads, *t.shape[1:])

    kv_num, kv_idx = _to_flex_rows(partial)
    full_num, full_idx = _to_flex_rows(full)
    return BlockMask.from_kv_blocks(
        expand(kv_num), expand(kv_idx), expand(full_num), expand(full_idx),
        BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(q_len, kv_len),
    )


def _flex_grid(num: torch.Tensor, idx: torch.Tensor, ncols: int) -> torch.Tensor:
    idx = idx.long()
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    idx = torch.where(valid & (idx < ncols), idx, torch.full_like(idx, ncols))
    grid = torch.zeros(*idx.shape[:-1], ncols + 1, dtype=torch.bool, device=idx.device)
    grid.scatter_(-1, idx, True)
    return grid[..., :ncols]


def block_mask_to_layout(block_mask: BlockMask) -> BlockLayout:
    """The block pattern of a ``BlockMask`` (full and partial blocks merged) as a BlockLayout.

    The BlockMask's batch dimension must be 1 or hold identical patterns (a layout has none);
    its head dimension becomes H'. Its ``mask_mod`` is not carried over: element-level masks
    such as causal go to the kernels as flags.
    """
    bq, bkv = block_mask.BLOCK_SIZE
    if bq != bkv:
        raise ValueError(f"BlockLayout needs square blocks, BlockMask has BLOCK_SIZE={bq, bkv}")
    q_len, kv_len = block_mask.seq_lengths
    nqb, nkb = -(-q_len // bq), -(-kv_len // bkv)
    ncols = max(block_mask.kv_indices.shape[-1], nkb)
    grid = _flex_grid(block_mask.kv_num_blocks, block_mask.kv_indices, ncols)
    if block_mask.full_kv_num_blocks is not None:
        grid = grid | _flex_grid(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, ncols)
    grid = grid[..., :nqb, :nkb]
    if grid.dim() != 4:
        raise ValueError(f"expected BlockMask tensors [B, H, nQB, nKB], got {tuple(grid.shape)}")
    if grid.shape[0] > 1 and not bool((grid == grid[:1]).all()):
        raise ValueError("BlockMask has different patterns per batch element; BlockLayout "
                         "holds one pattern for all samples")
    return BlockLayout.from_dense(grid[0].contiguous(), int(bq))


__all__ = ["block_mask_to_layout", "layout_grid", "layout_to_block_mask"]
