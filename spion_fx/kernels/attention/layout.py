"""Block-sparse layout shared by every attention kernel.

The convention is FlexAttention's BlockMask, minus the batch dimension (a SPION pattern is shared
by all samples): for each query block row, the number of kv blocks it attends to and their column
indices; and the transpose (for each kv block, the query blocks that read it), which the backward
pass walks to produce dK/dV without atomics. H' is 1 (one pattern shared by all heads, as SPION)
or the number of heads (per-head patterns).

The two halves must describe the same blocks: the backward pass reads the transpose, so a layout
whose halves disagree would compute dK/dV for other blocks than the forward used. Layouts built by
``from_dense``, ``diagonal`` and ``lower_triangular`` agree by construction and are marked
verified (as are their tensors, so a layout rebuilt around the same tensors is too); a layout
built by hand is checked once by ``check()`` (the public op calls it) and the result is kept.

Per-input layouts (routed attention, ``routing.routed_layout``) add a leading batch dim to all
four tensors: ``[B', H', nQB, ...]`` with B' = 1 or the batch size. A 3-D layout is shared by the
batch (``batched`` is False); the kernels read a 4-D one per (batch, head) row.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

# kv_num_blocks tensor -> (weak refs to the other three tensors, their versions) of layouts known
# to be consistent: an attention site rebuilds its BlockLayout around the same buffers each call.
_VERIFIED = WeakIdKeyDictionary()


@dataclass(frozen=True)
class BlockLayout:
    """Compressed block pattern.

    kv_num_blocks: int32 [H', nQB]       kv blocks per query-block row
    kv_indices:    int32 [H', nQB, maxK] their column indices, ascending, padded with 0
    q_num_blocks:  int32 [H', nKB]       query blocks per kv-block column
    q_indices:     int32 [H', nKB, maxQ] their row indices, ascending, padded with 0
    block_size:    edge of a square block, in tokens

    Batched (per-input) layouts carry a leading batch dim B' (1 or B) on all four tensors.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    block_size: int

    @property
    def batched(self) -> bool:
        """Whether the layout has a leading batch dim (one pattern per input)."""
        return self.kv_num_blocks.dim() == 3

    @property
    def num_batch(self) -> int:
        """B' of a batched layout (1 or the batch size); 1 for a layout shared by the batch."""
        return self.kv_num_blocks.shape[0] if self.batched else 1

    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[-2]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[-1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_num_blocks.shape[-1]

    @property
    def density(self) -> float:
        """Fraction of blocks kept (over the full nQB x nKB grid, every input and head)."""
        total = self.num_batch * self.num_heads * self.num_q_blocks * self.num_kv_blocks
        return float(self.kv_num_blocks.sum()) / max(total, 1)

    def as_batched(self) -> BlockLayout:
        """The same layout with a batch dim (B' = 1 when it was shared): views, no copy."""
        if self.batched:
            return self
        out = BlockLayout(*(t.unsqueeze(0) for t in self._tensors()), self.block_size)
        return out._mark_verified() if self.is_verified else out

    def select_batch(self, b: int) -> BlockLayout:
        """The 3-D layout input ``b`` uses (the shared one when B' = 1)."""
        if not self.batched:
            return self
        i = 0 if self.num_batch == 1 else b
        out = BlockLayout(*(t[i] for t in self._tensors()), self.block_size)
        return out._mark_verified() if self.is_verified else out

    @classmethod
    def from_dense(cls, block_mask: torch.Tensor, block_size: int) -> BlockLayout:
        """Build from a boolean block grid [nQB, nKB] or [H', nQB, nKB]; a 4-D grid
        [B', H', nQB, nKB] gives a batched (per-input) layout."""
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}")
        if block_mask.dim() == 2:
            block_mask = block_mask.unsqueeze(0)
        if block_mask.dim() not in (3, 4):
            raise ValueError(
                "block_mask must be [nQB, nKB], [H, nQB, nKB] or [B, H, nQB, nKB], got "
                f"{tuple(block_mask.shape)}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        kv_num, kv_idx = _compress_rows(block_mask)
        q_num, q_idx = _compress_rows(block_mask.transpose(-1, -2))
        return cls(kv_num, kv_idx, q_num, q_idx, int(block_size))._mark_verified()

    @classmethod
    def diagonal(cls, n_blocks: int, block_size: int, device=None) -> BlockLayout:
        """Only the diagonal blocks; built from arange alone, so it can be traced (equals
        ``from_dense(torch.eye(n_blocks))``)."""
        ones = torch.ones(1, n_blocks, dtype=torch.int32, device=device)
        index = torch.arange(n_blocks, dtype=torch.int32, device=device).view(1, n_blocks, 1)
        return cls(ones, index, ones.clone(), index.clone(), int(block_size))._mark_verified()

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
        layout = cls(kv_num, kv_idx.unsqueeze(0).contiguous(), q_num, q_idx.unsqueeze(0).contiguous(), int(block_size))
        return layout._mark_verified()

    def to_dense(self) -> torch.Tensor:
        """Boolean block grid [H', nQB, nKB] ([B', H', nQB, nKB] when batched)."""
        *lead, maxk = self.kv_indices.shape
        nkb = self.num_kv_blocks
        # Padding entries point at a scratch column nkb, so they cannot clear a real column 0.
        grid = torch.zeros(*lead, nkb + 1, dtype=torch.bool, device=self.kv_indices.device)
        valid = torch.arange(maxk, device=self.kv_indices.device) < self.kv_num_blocks.unsqueeze(-1)
        columns = torch.where(valid, self.kv_indices.long(), torch.full_like(self.kv_indices.long(), nkb))
        grid.scatter_(-1, columns, True)
        return grid[..., :nkb]

    def to(self, device: torch.device | str) -> BlockLayout:
        moved = BlockLayout(
            self.kv_num_blocks.to(device),
            self.kv_indices.to(device),
            self.q_num_blocks.to(device),
            self.q_indices.to(device),
            self.block_size,
        )
        return moved._mark_verified() if self.is_verified else moved

    # ---- consistency ------------------------------------------------------------------------
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.kv_num_blocks, self.kv_indices, self.q_num_blocks, self.q_indices

    def _versions(self) -> tuple[int, ...] | None:
        """In-place version counters of the four tensors (an in-place edit undoes a verification);
        None for inference tensors, which keep none."""
        try:
            return tuple(t._version for t in self._tensors())
        except (RuntimeError, AttributeError):
            return None

    def _mark_verified(self) -> BlockLayout:
        if torch.compiler.is_compiling():  # traced: nothing to remember (the op checks eagerly)
            return self
        versions = self._versions()
        object.__setattr__(self, "_verified_versions", versions)
        kv_num, *others = self._tensors()
        try:
            _VERIFIED[kv_num] = (tuple(weakref.ref(t) for t in others), versions)
        except TypeError:  # a tensor subclass without weak references: the flag alone
            pass
        return self

    @property
    def is_verified(self) -> bool:
        """Whether the two halves are known to agree (by construction or by ``check()``), without
        looking at the data: no device synchronization."""
        versions = self.__dict__.get("_verified_versions", _UNSET)
        if versions is _UNSET:
            entry = _VERIFIED.get(self.kv_num_blocks)
            if entry is None:
                return False
            refs, versions = entry
            if any(r() is not t for r, t in zip(refs, self._tensors()[1:])):
                return False
        return versions == self._versions()

    def check(self) -> None:
        """Raise ValueError, naming what disagrees, unless the two halves (kv rows
        ``kv_num_blocks``/``kv_indices``, q columns ``q_num_blocks``/``q_indices``) are well-formed
        and describe the same blocks. Reads the data once per layout (on CUDA, one copy to the
        host); the result is kept, and verified layouts return at once."""
        if self.is_verified:
            return
        _check_consistent(self)
        self._mark_verified()


_UNSET = object()


def _check_consistent(layout: BlockLayout) -> None:
    names = ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices")
    tensors = layout._tensors()
    extra = 1 if isinstance(tensors[0], torch.Tensor) and tensors[0].dim() == 3 else 0
    for name, t, dim in zip(names, tensors, (2 + extra, 3 + extra, 2 + extra, 3 + extra)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"BlockLayout.{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"BlockLayout.{name} must be {dim}-D, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"BlockLayout.{name} must be an integer tensor, got {t.dtype}")
        if t.device != tensors[0].device:
            raise ValueError(
                f"BlockLayout.{name} is on {t.device} but kv_num_blocks is on {tensors[0].device}"
            )
    if isinstance(layout.block_size, bool) or not isinstance(layout.block_size, int) or layout.block_size < 1:
        raise ValueError(f"BlockLayout.block_size must be a positive int, got {layout.block_size!r}")
    kv_num, kv_idx, q_num, q_idx = (t.detach().to("cpu", torch.int64) for t in tensors)
    if extra:
        batch = {name: t.shape[0] for name, t in zip(names, tensors)}
        if len(set(batch.values())) != 1:
            raise ValueError(f"BlockLayout halves disagree on the batch size B': {batch}")
        heads = {name: t.shape[1] for name, t in zip(names, tensors)}
        if len(set(heads.values())) != 1:
            raise ValueError(f"BlockLayout halves disagree on the number of heads H': {heads}")
        # (batch, head) rows checked as one flat head dim; messages name the flat row
        kv_num, kv_idx, q_num, q_idx = (t.flatten(0, 1) for t in (kv_num, kv_idx, q_num, q_idx))
    heads = {name: t.shape[0] for name, t in zip(names, (kv_num, kv_idx, q_num, q_idx))}
    if len(set(heads.values())) != 1:
        raise ValueError(f"BlockLayout halves disagree on the number of heads H': {heads}")
    if kv_num.shape[1] != kv_idx.shape[1]:
        raise ValueError(
            f"BlockLayout kv rows disagree: kv_num_blocks has {kv_num.shape[1]} query-block rows, "
            f"kv_indices {kv_idx.shape[1]}"
        )
    if q_num.shape[1] != q_idx.shape[1]:
        raise ValueError(
            f"BlockLayout q columns disagree: q_num_blocks has {q_num.shape[1]} kv-block columns, "
            f"q_indices {q_idx.shape[1]}"
        )
    nqb, nkb = kv_num.shape[1], q_num.shape[1]
    rows = _half_grid(kv_num, kv_idx, nkb, "kv rows", "kv_num_blocks", "kv_indices", "kv")
    cols = _half_grid(q_num, q_idx, nqb, "q columns", "q_num_blocks", "q_indices", "q")
    differ = rows != cols.transpose(1, 2)
    if bool(differ.any()):
        h, i, j = (int(x) for x in differ.nonzero()[0])
        kept, dropped = ("kv rows", "q columns") if bool(rows[h, i, j]) else ("q columns", "kv rows")
        where = f"head {h}"
        if extra:
            n_heads = tensors[0].shape[1]
            where = f"batch {h // n_heads}, head {h % n_heads}"
        raise ValueError(
            f"BlockLayout halves disagree: the {kept} keep block ({where}, q block {i}, kv block "
            f"{j}) but the {dropped} do not (differing blocks: {int(differ.sum())}); the kv rows are "
            "kv_num_blocks/kv_indices, the q columns their transpose q_num_blocks/q_indices "
            "(BlockLayout.from_dense builds both)"
        )


def _half_grid(num, idx, ncols, half, num_name, idx_name, what) -> torch.Tensor:
    """The bool grid [H, rows, ncols] one half describes, after checking its counts and indices:
    counts in [0, width], kept indices in [0, ncols) and strictly ascending."""
    width = idx.shape[2]
    if num.numel() and (int(num.min()) < 0 or int(num.max()) > width):
        raise ValueError(
            f"BlockLayout {half}: {num_name} must be in [0, {width}] (the width of {idx_name}), "
            f"got [{int(num.min())}, {int(num.max())}]"
        )
    valid = torch.arange(width) < num.unsqueeze(-1)
    kept = idx[valid]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= ncols):
        other = "kv" if what == "kv" else "query"
        raise ValueError(
            f"BlockLayout {half}: {idx_name} must be in [0, {ncols}) ({ncols} {other} blocks), "
            f"got [{int(kept.min())}, {int(kept.max())}]"
        )
    if width > 1:
        rising = idx[..., 1:] > idx[..., :-1]
        if not bool((rising | ~valid[..., 1:]).all()):
            raise ValueError(f"BlockLayout {half}: {idx_name} must be strictly ascending in each row")
    grid = torch.zeros(*num.shape, ncols + 1, dtype=torch.bool)
    grid.scatter_(2, torch.where(valid, idx, torch.full_like(idx, ncols)).clamp(0, ncols), True)
    return grid[..., :ncols]


def _compress_rows(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, C] bool -> (count [..., R], ascending column indices [..., R, max(count)])."""
    counts = grid.sum(-1)
    max_count = max(int(counts.max()) if counts.numel() else 0, 1)
    # A stable sort of (not kept) puts kept columns first, in ascending order.
    order = torch.sort((~grid).to(torch.int8), dim=-1, stable=True).indices[..., :max_count]
    valid = torch.arange(max_count, device=grid.device) < counts.unsqueeze(-1)
    indices = torch.where(valid, order, torch.zeros_like(order))
    return counts.to(torch.int32), indices.to(torch.int32).contiguous()
