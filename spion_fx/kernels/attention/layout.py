"""Block-sparse layout shared by every attention kernel.

The convention is FlexAttention's BlockMask, minus the batch dimension (a SPION pattern is shared
by all samples): for each query block row, the number of kv blocks it attends to and their column
indices; and the transpose (for each kv block, the query blocks that read it), which the backward
pass walks to produce dK/dV without atomics. H' is 1 (one pattern shared by all heads, as SPION)
or the number of heads (per-head patterns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Compressed block pattern.

    kv_num_blocks: int32 [H', nQB]       kv blocks per query-block row
    kv_indices:    int32 [H', nQB, maxK] their column indices, ascending, padded with 0
    q_num_blocks:  int32 [H', nKB]       query blocks per kv-block column
    q_indices:     int32 [H', nKB, maxQ] their row indices, ascending, padded with 0
    block_size:    edge of a square block, in tokens
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    block_size: int

    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_num_blocks.shape[1]

    @property
    def density(self) -> float:
        """Fraction of blocks kept (over the full nQB x nKB grid)."""
        total = self.num_heads * self.num_q_blocks * self.num_kv_blocks
        return float(self.kv_num_blocks.sum()) / max(total, 1)

    @classmethod
    def from_dense(cls, block_mask: torch.Tensor, block_size: int) -> BlockLayout:
        """Build from a boolean block grid [nQB, nKB] or [H', nQB, nKB]."""
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
        if block_mask.dim() == 2:
            block_mask = block_mask.unsqueeze(0)
        if block_mask.dim() != 3:
            raise ValueError(f"block_mask must be [nQB, nKB] or [H, nQB, nKB], got {tuple(block_mask.shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        kv_num, kv_idx = _compress_rows(block_mask)
        q_num, q_idx = _compress_rows(block_mask.transpose(1, 2))
        return cls(kv_num, kv_idx, q_num, q_idx, int(block_size))

    @classmethod
    def diagonal(cls, n_blocks: int, block_size: int, device=None) -> BlockLayout:
        """Only the diagonal blocks; built from arange alone, so it can be traced (equals
        ``from_dense(torch.eye(n_blocks))``)."""
        ones = torch.ones(1, n_blocks, dtype=torch.int32, device=device)
        index = torch.arange(n_blocks, dtype=torch.int32, device=device).view(1, n_blocks, 1)
        return cls(ones, index, ones.clone(), index.clone(), int(block_size))

    @classmethod
    def lower_triangular(cls, n_blocks: int, block_size: int, device=None) -> BlockLayout:
        """Every block on or below the diagonal; traceable (equals ``from_dense(ones.tril())``)."""
        i = torch.arange(n_blocks, dtype=torch.int32, device=device)
        zero = torch.zeros((), dtype=torch.int32, device=device)
        kv_num = (i + 1).view(1, -1)
        kv_idx = torch.where(i.view(1, -1) <= i.view(-1, 1), i.view(1, -1), zero)  # row r: 0..r
        q_num = (n_blocks - i).view(1, -1)
        q_idx = i.view(-1, 1) + i.view(1, -1)  # column c: c, c+1, ..., n-1
        q_idx = torch.where(q_idx < n_blocks, q_idx, zero)
        return cls(kv_num, kv_idx.unsqueeze(0).contiguous(), q_num, q_idx.unsqueeze(0).contiguous(), int(block_size))

    def to_dense(self) -> torch.Tensor:
        """Boolean block grid [H', nQB, nKB]."""
        h, nqb, maxk = self.kv_indices.shape
        nkb = self.num_kv_blocks
        # Padding entries point at a scratch column nkb, so they cannot clear a real column 0.
        grid = torch.zeros(h, nqb, nkb + 1, dtype=torch.bool, device=self.kv_indices.device)
        valid = torch.arange(maxk, device=self.kv_indices.device) < self.kv_num_blocks.unsqueeze(-1)
        columns = torch.where(valid, self.kv_indices.long(), torch.full_like(self.kv_indices.long(), nkb))
        grid.scatter_(2, columns, True)
        return grid[..., :nkb]

    def to(self, device: torch.device | str) -> BlockLayout:
        return BlockLayout(
            self.kv_num_blocks.to(device),
            self.kv_indices.to(device),
            self.q_num_blocks.to(device),
            self.q_indices.to(device),
            self.block_size,
        )


def _compress_rows(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, R, C] bool -> (count [H, R], ascending column indices [H, R, max(count)])."""
    counts = grid.sum(-1)
    max_count = max(int(counts.max()) if counts.numel() else 0, 1)
    # A stable sort of (not kept) puts kept columns first, in ascending order.
    order = torch.sort((~grid).to(torch.int8), dim=-1, stable=True).indices[..., :max_count]
    valid = torch.arange(max_count, device=grid.device) < counts.unsqueeze(-1)
    indices = torch.where(valid, order, torch.zeros_like(order))
    return counts.to(torch.int32), indices.to(torch.int32).contiguous()
