"""CPU kernels for block-sparse attention: rows grouped by kv-block count, one fused SDPA per group.

``forward``/``backward`` first hand the call to the native kernel (``native_cpu``: C++ walking
the layout in place, no gathers) when it takes it: anything but SPION-compat, given a C++
compiler on the machine. What follows is the grouped kernel, built from PyTorch ops, which serves
the rest.

Why this shape (see DESIGN.md, "CPU kernel facts"): gathering each query-block row's kv blocks
and running PyTorch's fused CPU flash attention once per group of rows with the same number of
kv blocks needs no padding, and needs a mask only where the pattern meets the causal diagonal,
the ragged end of the sequence, key padding or the SPION-compat virtual key. Within a row the
blocks are reordered so that masked blocks come last; rows whose masked blocks sit at the same
positions then share one small broadcast mask.

Two head modes:
- shared pattern (H' = 1): the unit of work is a kv head; its G = H/Hkv query heads are
  concatenated along the query axis (they read the same keys), so GQA never repeats K/V.
- per-head pattern (H' = H): every (head, query block) is its own row; K/V blocks are gathered
  from kv head h // G.

Band: when every row holds the same diagonal band of blocks (SPION always forces the diagonal),
the interior rows read the band's keys in place through overlapping strided windows of K/V (the
fused kernel accepts them), so only the remaining blocks are gathered; the two partial results
are merged through their log-sum-exps. Used when there is no key padding, compat or dropout.

The backward calls the fused CPU flash backward per group (and for the band) with the saved
global out/lse: the softmax gradient splits over disjoint key sets given those, so nothing is
recomputed and window gradients are folded back onto dK/dV.
Dropout needs the probabilities, so it takes a plain matmul/softmax path whose keep-mask comes
from a generator seeded by ``seed``; the backward regenerates the same mask and differentiates a
surrogate whose gradient is the split-KV formula too (global out and lse), so the op composes
with attention over other key sets (HSA's parts).

Memory traffic is what the fused calls leave: every group's query rows are gathered once
(``_GroupRows``), gathered blocks live in a per-thread workspace (fresh memory page-faults on
first touch), and dK/dV are accumulated with ``index_add_`` per slot.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F

from . import native_cpu

flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


@dataclass(frozen=True)
class RowGroup:
    """Query-block rows with the same kv-block count and the same masked-block positions."""

    count: int  # kv blocks per row
    q_head: torch.Tensor  # long [n]: layout head of each row (per-head mode; zeros when shared)
    q_block: torch.Tensor  # long [n]: query block of each row
    kv_head: torch.Tensor  # long [n*c]: kv head of each gathered block (per-head mode)
    kv_block: torch.Tensor  # long [n*c]: kv block index, row-major over (row, slot)
    struct_visible: torch.Tensor | None  # bool [bs, c*bs], None when every key is visible


@dataclass(frozen=True)
class Band:
    """Block offsets [lo, hi] around the diagonal that every row of every head attends to.

    For the interior rows (first_row .. first_row + n_rows - 1, whose window lies inside the
    sequence and off the ragged end) its keys are read in place through overlapping strided
    windows: no gather, no padding. ``visible`` [G*bs, W*bs] is the causal diagonal's mask,
    the same for every row, or None.
    """

    lo: int
    hi: int
    first_row: int
    n_rows: int
    visible: torch.Tensor | None
    _bias: dict = field(default_factory=dict, compare=False)

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    def covers(self, qb: int, kb: int) -> bool:
        return self.first_row <= qb < self.first_row + self.n_rows and self.lo <= kb - qb <= self.hi

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.visible is None:
            return None
        if dtype not in self._bias:
            self._bias[dtype] = additive_mask(self.visible, dtype)[None, None]
        return self._bias[dtype]


@dataclass(frozen=True)
class GroupPlan:
    groups: tuple[RowGroup, ...]  # rows' blocks outside the band
    shared: bool
    band: Band | None


_PLAN_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, GroupPlan]] = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _block_struct_mask(
    kinds: tuple[str, ...], block: int, lk: int, n_kv_blocks: int
) -> torch.Tensor | None:
    """Element visibility inside one row's blocks, given each slot's kind."""
    if all(kind == "full" for kind in kinds):
        return None
    i = torch.arange(block).unsqueeze(1)
    j = torch.arange(block).unsqueeze(0)
    edge_keys = lk - (n_kv_blocks - 1) * block  # real keys in the last (partial) kv block
    parts = []
    for kind in kinds:
        vis = torch.ones(block, block, dtype=torch.bool)
        if kind in ("diag", "diag_edge"):
            vis &= j <= i
        if kind in ("edge", "diag_edge"):
            vis &= j < edge_keys
        parts.append(vis)
    return torch.cat(parts, dim=1)


def build_plan(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    lq: int,
    lk: int,
    causal: bool,
    group_size: int,
    use_band: bool = False,
) -> GroupPlan:
    """Host-side grouping of the layout's rows (run once per layout, then cached)."""
    n_heads = kv_num_blocks.shape[0]
    n_kv_blocks = -(-lk // block)
    partial_edge = lk % block != 0
    counts = kv_num_blocks.tolist()
    indices = kv_indices.tolist()
    row_sets = [
        [set(indices[h][qb][:cnt]) for qb, cnt in enumerate(counts[h])] for h in range(n_heads)
    ]
    band = None
    if use_band and lq == lk:
        band = _find_band(row_sets, n_kv_blocks, causal, block, lk, group_size)
    buckets: dict[tuple, list[tuple[int, int, list[int]]]] = {}
    for h in range(n_heads):
        for qb, kv_set in enumerate(row_sets[h]):
            full, special = [], []
            for kb in sorted(kv_set):
                if band is not None and band.covers(qb, kb):
                    continue
                if causal and kb > qb:
                    continue  # entirely above the diagonal: nothing visible
                diag = causal and kb == qb
                edge = partial_edge and kb == n_kv_blocks - 1
                kind = (
                    "diag_edge" if diag and edge else "diag" if diag else "edge" if edge else "full"
                )
                (full if kind == "full" else special).append((kind, kb))
            if not full and not special:
                continue
            # Masked slots go last, in a fixed kind order, so equal signatures mean equal masks.
            special.sort(key=lambda item: ("edge", "diag", "diag_edge").index(item[0]))
            slots = [("full", kb) for kb in sorted(kb for _, kb in full)] + special
            kinds = tuple(kind for kind, _ in slots)
            key = (len(slots), kinds[len(full) :])
            buckets.setdefault(key, []).append((h, qb, [kb for _, kb in slots]))
    groups = []
    for key in sorted(buckets):
        rows = buckets[key]
        count, special_kinds = key
        kinds = ("full",) * (count - len(special_kinds)) + special_kinds
        q_head = torch.tensor([h for h, _, _ in rows], dtype=torch.long)
        kv_head = (q_head // group_size).repeat_interleave(count)
        groups.append(
            RowGroup(
                count=count,
                q_head=q_head,
                q_block=torch.tensor([qb for _, qb, _ in rows], dtype=torch.long),
                kv_head=kv_head,
                kv_block=torch.tensor([kb for _, _, kbs in rows for kb in kbs], dtype=torch.long),
                struct_visible=_block_struct_mask(kinds, block, lk, n_kv_blocks),
            )
        )
    return GroupPlan(tuple(groups), shared=n_heads == 1, band=band)


def _find_band(
    row_sets: list[list[set[int]]],
    n_kv_blocks: int,
    causal: bool,
    block: int,
    lk: int,
    group_size: int,
) -> Band | None:
    """Widest diagonal band [lo, hi] (lo <= 0 <= hi) contained in every row of every head."""

    def holds(offset: int) -> bool:
        return all(
            qb + offset in kv_set
            for rows in row_sets
            for qb, kv_set in enumerate(rows)
            if 0 <= qb + offset < n_kv_blocks
        )

    if not holds(0):
        return None
    lo, hi = 0, 0
    while lo - 1 > -n_kv_blocks and holds(lo - 1):
        lo -= 1
    while not causal and hi + 1 < n_kv_blocks and holds(hi + 1):
        hi += 1
    last_full = n_kv_blocks - 1 if lk % block == 0 else n_kv_blocks - 2
    first_row = -lo
    n_rows = min(last_full - hi, len(row_sets[0]) - 1) - first_row + 1
    if n_rows <= 0:
        return None
    visible = None
    if causal:  # hi == 0: the diagonal block is the window's last
        visible = torch.ones(block, (hi - lo + 1) * block, dtype=torch.bool)
        visible[:, -block:] = torch.ones(block, block, dtype=torch.bool).tril()
        visible = visible.repeat(group_size, 1)  # G query heads share a window
    return Band(lo, hi, first_row, n_rows, visible)


def get_plan(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    lq: int,
    lk: int,
    causal: bool,
    group_size: int,
    use_band: bool = False,
) -> GroupPlan:
    """Cached ``build_plan``; the cached copy of the layout guards against reused storage."""
    key = (
        kv_num_blocks.data_ptr(),
        kv_indices.data_ptr(),
        tuple(kv_indices.shape),
        block,
        lq,
        lk,
        causal,
        group_size,
        use_band,
    )
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        num, idx, plan = hit
        if torch.equal(num, kv_num_blocks) and torch.equal(idx, kv_indices):
            _PLAN_CACHE.move_to_end(key)
            return plan
    plan = build_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, group_size, use_band)
    _PLAN_CACHE[key] = (kv_num_blocks.clone(), kv_indices.clone(), plan)
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


# ----------------------------------------------------------------------------- gathers / scatters


class _Workspace(threading.local):
    """Scratch buffers reused across kernel calls, one set per thread.

    The gathered K/V blocks and row buffers live only inside one call. Allocating them fresh
    each time costs a page fault per 4 KiB on first touch once glibc has handed the memory back
    to the OS (measured here: ~0.4 ms per MB faulted vs ~0.05 ms per MB overwritten), tens of
    milliseconds per training step at L=4096 — a large share of the sparse kernel's time and most
    of its run-to-run variance. A buffer grows to the largest request and is kept, up to
    ``MAX_RETAINED_BYTES`` per buffer (larger requests get fresh memory that is not kept).
    """

    MAX_RETAINED_BYTES = 256 * 2**20

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        if numel * dtype.itemsize > self.MAX_RETAINED_BYTES:
            return torch.empty(shape, dtype=dtype)
        buf = self.buffers.get((name, dtype))
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # usable as out= in and outside inference mode
                buf = torch.empty(numel, dtype=dtype)
            self.buffers[(name, dtype)] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


class _Blocks:
    """Flat block views of q-shaped and kv-shaped tensors for one call.

    Every gather and scatter is a dim-0 ``index_select``/``index_copy_``/``index_put_`` on a
    [rows, block*D] view: whole contiguous blocks move at memcpy speed, about twice as fast as
    indexing an inner dimension, and one gather already yields the [B, units*n, G'*bs] order.
    """

    def __init__(self, b: int, h: int, hkv: int, lq: int, lk: int, block: int, shared: bool):
        self.b, self.h, self.hkv, self.block, self.shared = b, h, hkv, block, shared
        self.g = h // hkv
        self.nqb, self.nkb = -(-lq // block), -(-lk // block)
        self.lq, self.lk = lq, lk
        self._index_cache: dict = {}

    def units(self) -> int:
        return self.hkv if self.shared else 1

    def indices(self, grp: RowGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat block indices: q rows in (b, unit, row, G') order, kv in (b, unit, row, slot)."""
        hit = self._index_cache.get(id(grp))
        if hit is not None:
            return hit
        if self.shared:
            heads = torch.arange(self.h).view(self.hkv, 1, self.g)
            q_base = heads * self.nqb + grp.q_block.view(1, -1, 1)
            kv_base = torch.arange(self.hkv).view(-1, 1) * self.nkb + grp.kv_block.view(1, -1)
        else:
            q_base = grp.q_head * self.nqb + grp.q_block
            kv_base = grp.kv_head * self.nkb + grp.kv_block
        batch = torch.arange(self.b).view(-1, 1)
        q_idx = (batch * (self.h * self.nqb) + q_base.reshape(1, -1)).reshape(-1)
        kv_idx = (batch * (self.hkv * self.nkb) + kv_base.reshape(1, -1)).reshape(-1)
        self._index_cache[id(grp)] = (q_idx, kv_idx)
        return q_idx, kv_idx

    def pad_q(self, t: torch.Tensor) -> torch.Tensor:
        return _pad_len(t, self.nqb * self.block).contiguous()

    def pad_kv(self, t: torch.Tensor) -> torch.Tensor:
        return _pad_len(t, self.nkb * self.block).contiguous()

    def _q_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.b * self.h * self.nqb, -1)

    def gather_q(self, t: torch.Tensor, grp: RowGroup) -> torch.Tensor:
        """Contiguous q-shaped [B, H, Lq_pad, *tail] -> [B, units*n, G'*bs, *tail]."""
        tail = t.shape[3:]
        rows = self._q_rows(t).index_select(0, self.indices(grp)[0])
        return rows.view(self.b, -1, self._q_len(), *tail)

    def scatter_q(self, dst: torch.Tensor, src: torch.Tensor, grp: RowGroup) -> None:
        """Inverse of gather_q (rows of different groups are disjoint)."""
        flat = self._q_rows(dst)
        flat.index_copy_(0, self.indices(grp)[0], src.reshape(-1, flat.shape[1]))

    def band_q(self, t: torch.Tensor, band: Band) -> torch.Tensor:
        """Contiguous q-shaped [B, H, Lq_pad, *tail] -> interior rows [B*Hkv, n, G*bs, *tail]."""
        tail = t.shape[3:]
        x = t.view(self.b, self.hkv, self.g, self.nqb, self.block, *tail)
        x = x[:, :, :, band.first_row : band.first_row + band.n_rows]
        if self.g > 1:
            x = x.transpose(2, 3)
        return x.reshape(self.b * self.hkv, band.n_rows, self.g * self.block, *tail)

    def unband_q(self, x: torch.Tensor, band: Band, fill: float) -> torch.Tensor:
        """Inverse of band_q into a fresh q-shaped tensor; other rows get ``fill``."""
        tail = x.shape[3:]
        full = x.new_full((self.b, self.hkv, self.g, self.nqb, self.block, *tail), fill)
        rows = x.view(self.b, self.hkv, band.n_rows, self.g, self.block, *tail).transpose(2, 3)
        full[:, :, :, band.first_row : band.first_row + band.n_rows] = rows
        return full.view(self.b, self.h, self.nqb * self.block, *tail)

    def band_kv(self, t: torch.Tensor, band: Band) -> torch.Tensor:
        """Overlapping windows over contiguous kv-shaped [B, Hkv, Lk_pad, D]: [B*Hkv, n, W*bs, D].

        A view: the fused kernel reads strided windows in place."""
        bs, d = self.block, t.shape[-1]
        start = (band.first_row + band.lo) * bs * d
        return t.as_strided(
            (self.b * self.hkv, band.n_rows, band.width * bs, d),
            (t.shape[2] * d, bs * d, d, 1),
            t.storage_offset() + start,
        )

    def fold_band_kv(self, windows: torch.Tensor, band: Band) -> torch.Tensor:
        """Sum window gradients [B*Hkv, n, W*bs, D] onto a fresh [B, Hkv, Lk_pad, D]."""
        bs, d, rows = self.block, windows.shape[-1], band.n_rows
        w5 = windows.view(self.b * self.hkv, rows, band.width, bs, d)
        acc = windows.new_zeros(self.b * self.hkv, self.nkb, bs, d)
        first = band.first_row + band.lo
        for slot in range(band.width):
            acc[:, first + slot : first + slot + rows] += w5[:, :, slot]
        return acc.view(self.b, self.hkv, self.nkb * bs, d)

    def gather_kv(self, t: torch.Tensor, grp: RowGroup, scratch: str | None = None) -> torch.Tensor:
        """Contiguous kv-shaped [B, Hkv, Lk_pad, D] -> [B, units*n, c*bs, D] (into the named
        workspace buffer when ``scratch`` is given: valid until the next gather into it)."""
        d = t.shape[-1]
        flat, index = t.view(-1, self.block * d), self.indices(grp)[1]
        if scratch is None:
            rows = flat.index_select(0, index)
        else:
            rows = _WORKSPACE.take(scratch, (index.numel(), flat.shape[1]), t.dtype)
            with torch.no_grad():  # out= refuses inputs that require grad (direct calls in tests)
                torch.index_select(flat, 0, index, out=rows)
        return rows.view(self.b, -1, grp.count * self.block, d)

    def scatter_add_kv(self, dst: torch.Tensor, src: torch.Tensor, grp: RowGroup) -> None:
        """Add [B, units*n, c*bs, D] block gradients onto kv-shaped [B, Hkv, Lk_pad, D].

        One index_add_ per slot along the (kv head, block) axis: the fused backward returns its
        gradients in [B, keys, rows, D] memory order, which a flat dim-0 add would first have to
        copy (measured: half the time, and no fresh buffer of the gathered size)."""
        d = dst.shape[-1]
        blocks = dst.view(self.b, self.hkv * self.nkb, self.block, d)
        for slot, index in enumerate(self.slot_indices(grp)):
            blocks.index_add_(1, index, src[:, :, slot * self.block : (slot + 1) * self.block])

    def slot_indices(self, grp: RowGroup) -> torch.Tensor:
        """[c, units*n]: kv (head, block) index of each row's slot, batch excluded."""
        key = ("slots", id(grp))
        hit = self._index_cache.get(key)
        if hit is None:
            if self.shared:
                base = torch.arange(self.hkv).view(-1, 1) * self.nkb + grp.kv_block.view(1, -1)
            else:
                base = grp.kv_head * self.nkb + grp.kv_block
            hit = base.reshape(-1, grp.count).t().contiguous()
            self._index_cache[key] = hit
        return hit

    def _q_len(self) -> int:
        return (self.g if self.shared else 1) * self.block


class _GroupRows:
    """Every group's query rows gathered by one index_select, in group order.

    Each group then reads (and writes) a contiguous slice instead of gathering and scattering
    q, out, lse and dO on its own: on a 2-core machine the per-op cost of ~6 small gathers per
    group was a visible share of the kernel. Within a slice rows are in ``_Blocks.indices``'
    (batch, unit, row, G') order, so a slice views as the group's [B, units*n, G'*bs, ...].
    """

    def __init__(self, blk: _Blocks, groups: tuple[RowGroup, ...]):
        self.blk = blk
        index = [blk.indices(grp)[0] for grp in groups]
        self.index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        ends = list(accumulate(i.numel() for i in index))
        self.bounds = list(zip([0] + ends[:-1], ends))

    def gather(self, t: torch.Tensor, scratch: str) -> torch.Tensor:
        """q-shaped [B, H, Lq_pad, *tail] (contiguous) -> [rows, bs * prod(tail)], in the named
        workspace buffer (valid until the next use of that name)."""
        flat = self.blk._q_rows(t)
        out = _WORKSPACE.take(scratch, (self.index.numel(), flat.shape[1]), t.dtype)
        with torch.no_grad():
            return torch.index_select(flat, 0, self.index, out=out)

    def empty(self, tail: tuple[int, ...], dtype: torch.dtype, scratch: str) -> torch.Tensor:
        """An uninitialised [rows, bs * prod(tail)] workspace buffer."""
        return _WORKSPACE.take(scratch, (self.index.numel(), self.blk.block * math.prod(tail)), dtype)

    def group(self, flat: torch.Tensor, i: int, tail: tuple[int, ...]) -> torch.Tensor:
        start, end = self.bounds[i]
        return flat[start:end].view(self.blk.b, -1, self.blk._q_len(), *tail)

    def scatter(self, dst: torch.Tensor, flat: torch.Tensor, accumulate: bool = False) -> None:
        rows = self.blk._q_rows(dst)
        if accumulate:
            rows.index_add_(0, self.index, flat)
        else:
            rows.index_copy_(0, self.index, flat)


def _trim(t: torch.Tensor, length: int) -> torch.Tensor:
    """Undo the block padding; ops must return contiguous tensors, as their fake kernels say."""
    return t if t.shape[2] == length else t[:, :, :length].contiguous()


def _pad_len(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[2] == length:
        return t
    pad = [0, 0] * (t.dim() - 3) + [0, length - t.shape[2]]
    return F.pad(t, pad)


# ----------------------------------------------------------------------------- masks


@dataclass
class _CallContext:
    blocks: _Blocks
    kpm_blocks: torch.Tensor | None  # bool [B, nKB, bs]
    base_count: torch.Tensor | None  # float [B or 1, 1, Lq_pad]: keys visible without the pattern
    compat: bool
    dtype: torch.dtype


def _make_context(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    compat: bool,
    shared: bool,
) -> _CallContext:
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    blocks = _Blocks(b, h, hkv, lq, lk, block, shared)
    kpm_blocks = None
    if key_padding_mask is not None:
        kpm = F.pad(key_padding_mask.bool(), (0, blocks.nkb * block - lk), value=False)
        kpm_blocks = kpm.view(b, blocks.nkb, block)
    base_count = None
    if compat:
        valid = (
            key_padding_mask.bool()
            if key_padding_mask is not None
            else torch.ones(1, lk, dtype=torch.bool)
        )
        qpos = torch.arange(blocks.nqb * block)
        if causal:
            cum = valid.long().cumsum(-1)
            base = cum[:, qpos.clamp(max=lk - 1)]
        else:
            base = valid.long().sum(-1, keepdim=True).expand(-1, qpos.numel())
        base_count = base[:, None, :].double()
    return _CallContext(blocks, kpm_blocks, base_count, compat, q.dtype)


def _group_mask(
    ctx: _CallContext, grp: RowGroup
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Additive mask for one group's fused call, and the rows that see no key (if any can).

    The mask is [1, 1, G'*bs, keys] when only the block structure masks (broadcast over every
    row), else [B or 1, units*n, G'*bs or 1, keys]; keys = c*bs, plus one virtual key in compat
    mode whose logit is log(#pruned keys).
    """
    blk = ctx.blocks
    n, bs, units = grp.q_block.numel(), blk.block, blk.units()
    gq = blk.g if blk.shared else 1
    struct = grp.struct_visible.repeat(gq, 1) if grp.struct_visible is not None else None
    if ctx.kpm_blocks is None and not ctx.compat:
        if struct is None:
            return None, None
        return additive_mask(struct, ctx.dtype)[None, None], None
    vis = torch.ones(1, 1, 1, 1, grp.count * bs, dtype=torch.bool)  # [B|1, 1, n|1, q|1, keys]
    if struct is not None:
        vis = vis & struct[None, None, None]
    if ctx.kpm_blocks is not None:
        vis = vis & ctx.kpm_blocks.index_select(1, grp.kv_block).view(
            blk.b, 1, n, 1, grp.count * bs
        )
    if ctx.compat:
        qpos = (grp.q_block[:, None] * bs + torch.arange(bs)).repeat(1, gq)  # [n, G'*bs]
        base = ctx.base_count[:, :, qpos]  # [B|1, 1, n, G'*bs]
        pruned = base - vis.sum(-1, dtype=torch.float64)
        lead = torch.broadcast_shapes(vis.shape[:-1], pruned.shape)
        bias = additive_mask(vis.expand(*lead, vis.shape[-1]), ctx.dtype)
        virtual = pruned.log().expand(lead).unsqueeze(-1).to(ctx.dtype)
        bias = torch.cat([bias, virtual], dim=-1)
        seen = (base > 0).expand(lead)
    else:
        bias = additive_mask(vis, ctx.dtype)
        seen = vis.any(-1)
    rows_b = bias.shape[0]
    bias = bias.expand(rows_b, units, n, *bias.shape[3:]).reshape(
        rows_b, units * n, *bias.shape[3:]
    )
    seen = seen.expand(rows_b, units, n, seen.shape[-1]).reshape(rows_b, units * n, -1)
    return bias, ~seen


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))


# ----------------------------------------------------------------------------- forward / backward


def _gather_kv(ctx: _CallContext, grp: RowGroup, k: torch.Tensor, v: torch.Tensor):
    blk = ctx.blocks
    kg, vg = blk.gather_kv(k, grp, "k"), blk.gather_kv(v, grp, "v")
    if ctx.compat:  # the virtual key: zero key (its logit comes from the mask), zero value
        kg = F.pad(kg, (0, 0, 0, 1))
        vg = F.pad(vg, (0, 0, 0, 1))
    return kg, vg


def _scores(qg: torch.Tensor, kg: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    s = torch.matmul(qg, kg.transpose(-1, -2)).to(torch.promote_types(qg.dtype, torch.float32)) * scale
    return s if bias is None else s + bias


def _dropped(p: torch.Tensor, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    return p if keep is None else p * keep / (1.0 - dropout_p)


def math_attention(
    qg: torch.Tensor,
    kg: torch.Tensor,
    vg: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    keep: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused attention on materialised scores (additive ``bias``, optional dropout keep-mask):
    (output, log-sum-exp; -inf on rows that see no key, whose output is 0)."""
    s = _scores(qg, kg, bias, scale)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0))
    out = torch.matmul(_dropped(p, keep, dropout_p).to(vg.dtype), vg)
    return out, lse.squeeze(-1)


def _keep_masks(gen: torch.Generator, shape: torch.Size, dropout_p: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) >= dropout_p


def _row(key_padding_mask: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if key_padding_mask is None else key_padding_mask[i : i + 1]


def _input_seed(seed: torch.Tensor, i: int) -> torch.Tensor:
    """The dropout seed of input ``i`` under a batched layout (one grouped call per input, each
    drawing its own masks; forward and backward derive the same one)."""
    return (seed.reshape(()).to(torch.int64) + i * 0x9E3779B97F4A7C1) & ((1 << 62) - 1)


def _generator(seed: torch.Tensor) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed.item()) & ((1 << 63) - 1))
    return gen


def _band_forward(
    blk: _Blocks, band: Band, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    kw, vw = blk.band_kv(kp, band), blk.band_kv(vp, band)
    ob, lb = flash_fwd(blk.band_q(qp, band), kw, vw, attn_mask=band.bias(qp.dtype), scale=scale)
    lb = lb.to(_lse_dtype(qp.dtype))
    return blk.unband_q(ob, band, 0.0), blk.unband_q(lb, band, float("-inf"))


def _band_backward(blk, band, gop, qp, kp, vp, out_p, lse_p, scale):
    dq, dk, dv = flash_bwd(
        blk.band_q(gop, band), blk.band_q(qp, band), blk.band_kv(kp, band), blk.band_kv(vp, band),
        blk.band_q(out_p, band), blk.band_q(lse_p, band), 0.0, False,
        attn_mask=band.bias(qp.dtype), scale=scale,
    )  # fmt: skip
    return blk.unband_q(dq, band, 0.0), blk.fold_band_kv(dk, band), blk.fold_band_kv(dv, band)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Working precision of lse inside a call (float64 inputs keep it exact until the end)."""
    return torch.promote_types(dtype, torch.float32)


def _merge_partial(
    o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    l1 (the band part) is finite on every row, so the weights cannot be NaN; the two weights
    sum to 1, hence one lerp (few ops matter: each op can cost a scheduler slice on a busy box).
    """
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).to(o1.dtype).unsqueeze(-1)
    return torch.lerp(o2.to(o1.dtype), o1, w1), lse


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
    compat: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if native_cpu.handles(q.dtype, compat):
        return native_cpu.forward(
            q, k, v, kv_num_blocks, kv_indices, block, scale, causal, key_padding_mask, dropout_p,
            seed,
        )  # fmt: skip
    if kv_num_blocks.dim() == 3:  # a batched layout: one grouped call per input
        if kv_num_blocks.shape[0] == 1:
            kv_num_blocks, kv_indices = kv_num_blocks[0], kv_indices[0]
        else:
            parts = [
                forward(
                    q[i : i + 1], k[i : i + 1], v[i : i + 1], kv_num_blocks[i], kv_indices[i],
                    block, scale, causal, _row(key_padding_mask, i), dropout_p,
                    _input_seed(seed, i), compat,
                )
                for i in range(q.shape[0])
            ]  # fmt: skip
            return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    use_band = key_padding_mask is None and not compat and dropout_p == 0
    plan = get_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, h // hkv, use_band)
    ctx = _make_context(q, k, block, causal, key_padding_mask, compat, plan.shared)
    blk = ctx.blocks
    qp, kp, vp = blk.pad_q(q), blk.pad_kv(k), blk.pad_kv(v)
    rows = _GroupRows(blk, plan.groups)
    q_rows = rows.gather(qp, "q")
    out_rows = rows.empty((d,), q.dtype, "out")
    lse_rows = rows.empty((), _lse_dtype(q.dtype), "lse")
    gen = _generator(seed) if dropout_p > 0 else None
    for i, grp in enumerate(plan.groups):
        qg = rows.group(q_rows, i, (d,))
        kg, vg = _gather_kv(ctx, grp, kp, vp)
        bias, empty_rows = _group_mask(ctx, grp)
        if gen is not None:
            keep = _keep_masks(
                gen, torch.Size((b, qg.shape[1], qg.shape[2], kg.shape[2])), dropout_p
            )
            og, lg = math_attention(qg, kg, vg, bias, scale, keep, dropout_p)
        else:
            og, lg = flash_fwd(qg, kg, vg, attn_mask=bias, scale=scale)
        if empty_rows is not None:
            lg = lg.masked_fill(empty_rows, float("-inf"))
        rows.group(out_rows, i, (d,)).copy_(og)
        rows.group(lse_rows, i, ()).copy_(lg)
    if plan.band is not None:
        out, lse = _band_forward(blk, plan.band, qp, kp, vp, scale)
        merged, lse_rows = _merge_partial(
            rows.gather(out, "band_out").view(-1, block, d), rows.gather(lse, "band_lse"),
            out_rows.view(-1, block, d), lse_rows,
        )
        out_rows = merged.view(-1, block * d)
    else:
        out = q.new_zeros(b, h, blk.nqb * block, d)
        lse = torch.full((b, h, blk.nqb * block), float("-inf"), dtype=_lse_dtype(q.dtype))
    rows.scatter(out, out_rows)
    rows.scatter(lse, lse_rows)
    return _trim(out, lq), _trim(lse, lq).float()


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
    compat: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if native_cpu.handles(q.dtype, compat):
        return native_cpu.backward(
            grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, block, scale, causal,
            key_padding_mask, dropout_p, seed,
        )  # fmt: skip
    if kv_num_blocks.dim() == 3:  # a batched layout: one grouped call per input
        if kv_num_blocks.shape[0] == 1:
            kv_num_blocks, kv_indices = kv_num_blocks[0], kv_indices[0]
        else:
            parts = [
                backward(
                    grad_out[i : i + 1], q[i : i + 1], k[i : i + 1], v[i : i + 1],
                    out[i : i + 1], lse[i : i + 1], kv_num_blocks[i], kv_indices[i], block,
                    scale, causal, _row(key_padding_mask, i), dropout_p, _input_seed(seed, i),
                    compat,
                )
                for i in range(q.shape[0])
            ]  # fmt: skip
            return tuple(torch.cat([p[j] for p in parts]) for j in range(3))
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    use_band = key_padding_mask is None and not compat and dropout_p == 0
    plan = get_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, h // hkv, use_band)
    ctx = _make_context(q, k, block, causal, key_padding_mask, compat, plan.shared)
    blk = ctx.blocks
    qp, kp, vp = blk.pad_q(q), blk.pad_kv(k), blk.pad_kv(v)
    gop = blk.pad_q(grad_out.to(q.dtype))
    # Rows that saw nothing get lse = +inf: the kernel's exp(s - lse) is then 0, not NaN.
    lse_safe = lse.float().masked_fill(torch.isneginf(lse), float("inf"))
    out_p = blk.pad_q(out)
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    lse_p = F.pad(lse_safe, (0, blk.nqb * block - lq), value=float("inf")).to(acc).contiguous()
    if plan.band is not None:
        # The backward splits over disjoint key sets given the global out and lse.
        dq, dk, dv = _band_backward(blk, plan.band, gop, qp, kp, vp, out_p, lse_p, scale)
        dk, dv = dk.to(acc), dv.to(acc)
    else:
        dq = q.new_zeros(b, h, blk.nqb * block, d)
        dk = torch.zeros(b, hkv, blk.nkb * block, d, dtype=acc)
        dv = torch.zeros(b, hkv, blk.nkb * block, d, dtype=acc)
    rows = _GroupRows(blk, plan.groups)
    q_rows, go_rows = rows.gather(qp, "q"), rows.gather(gop, "grad_out")
    out_rows, lse_rows = rows.gather(out_p, "out"), rows.gather(lse_p, "lse")
    dq_rows = rows.empty((d,), q.dtype, "dq")
    gen = _generator(seed) if dropout_p > 0 else None
    for i, grp in enumerate(plan.groups):
        qg, gog = rows.group(q_rows, i, (d,)), rows.group(go_rows, i, (d,))
        kg, vg = _gather_kv(ctx, grp, kp, vp)
        bias, _ = _group_mask(ctx, grp)
        og, lg = rows.group(out_rows, i, (d,)), rows.group(lse_rows, i, ())
        if gen is not None:
            keep = _keep_masks(
                gen, torch.Size((b, qg.shape[1], qg.shape[2], kg.shape[2])), dropout_p
            )
            dqg, dkg, dvg = math_attention_backward(
                qg, kg, vg, bias, scale, keep, dropout_p, gog, og, lg
            )
        else:
            dqg, dkg, dvg = flash_bwd(
                gog, qg, kg, vg, og, lg, 0.0, False, attn_mask=bias, scale=scale
            )
        if ctx.compat:  # drop the virtual key's gradients
            dkg, dvg = dkg[:, :, :-1], dvg[:, :, :-1]
        rows.group(dq_rows, i, (d,)).copy_(dqg)
        blk.scatter_add_kv(dk, dkg.to(acc), grp)
        blk.scatter_add_kv(dv, dvg.to(acc), grp)
    rows.scatter(dq, dq_rows, accumulate=plan.band is not None)
    return _trim(dq, lq), _trim(dk, lk).to(k.dtype), _trim(dv, lk).to(v.dtype)


def math_attention_backward(qg, kg, vg, bias, scale, keep, dropout_p, gog, og, lg):
    """Gradients of ``math_attention`` given the *global* output ``og`` and log-sum-exp ``lg``
    (+inf on rows that saw nothing).

    Differentiates a surrogate whose gradient is the softmax-with-dropout backward
    dS = P ⊙ (dP̃ - rowsum(dO ⊙ O)), P normalised by ``lg``: exact for these keys alone and when
    the keys are split over several calls (the band, or HSA's other parts).
    """
    with torch.enable_grad():
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (qg, kg, vg))
        p = torch.exp(_scores(qg, kg, bias, scale) - lg.unsqueeze(-1))
        part = torch.matmul(_dropped(p, keep, dropout_p).to(vg.dtype), vg)
        delta = (gog.to(p.dtype) * og.to(p.dtype)).sum(-1, keepdim=True)
        surrogate = (gog * part).sum() - (delta * p).sum()
        return torch.autograd.grad(surrogate, (qg, kg, vg))


def dropout_keep_mask(
    q_shape: tuple[int, int, int, int],
    k_shape: tuple[int, int, int, int],
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    causal: bool,
    dropout_p: float,
    seed: torch.Tensor,
    compat: bool = False,
) -> torch.Tensor:
    """The dense keep-mask [B, H, Lq, Lk] the CPU kernel draws for ``seed`` (for testing)."""
    b, h, lq, _ = q_shape
    hkv, lk = k_shape[1], k_shape[2]
    if native_cpu.handles(torch.float32, compat):  # every float dtype goes the same way
        return native_cpu.dropout_keep_mask(b, h, lq, lk, dropout_p, seed)
    if kv_num_blocks.dim() == 3:  # a batched layout: one grouped call per input
        if kv_num_blocks.shape[0] == 1:
            kv_num_blocks, kv_indices = kv_num_blocks[0], kv_indices[0]
        else:
            one_q, one_k = (1, *q_shape[1:]), (1, *k_shape[1:])
            return torch.cat([
                dropout_keep_mask(
                    one_q, one_k, kv_num_blocks[i], kv_indices[i], block, causal, dropout_p,
                    _input_seed(seed, i), compat,
                )
                for i in range(b)
            ])  # fmt: skip
    plan = get_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, h // hkv)
    blk = _Blocks(b, h, hkv, lq, lk, block, plan.shared)
    gen = _generator(seed)
    # Scatter every kept flag to its (query, key) position through the same gathers.
    key_pos = torch.arange(blk.nkb * block, dtype=torch.float64).view(1, 1, -1, 1)
    dense = torch.zeros(b, h, blk.nqb * block, blk.nkb * block, dtype=torch.bool)
    for grp in plan.groups:
        kpos = blk.gather_kv(key_pos.expand(b, hkv, -1, 1).contiguous(), grp)[
            ..., 0
        ].long()  # [B, U*n, c*bs]
        n_keys = kpos.shape[-1] + (1 if compat else 0)
        rows = blk.gather_q(torch.zeros(b, h, blk.nqb * block, 1), grp).shape[2]
        keep = _keep_masks(gen, torch.Size((b, kpos.shape[1], rows, n_keys)), dropout_p)[
            ..., : kpos.shape[-1]
        ]
        grid = torch.zeros(b, kpos.shape[1], rows, blk.nkb * block, dtype=torch.bool)
        grid.scatter_(3, kpos[:, :, None, :].expand(-1, -1, rows, -1), keep)
        blk.scatter_q(dense, grid, grp)
    return dense[:, :, :lq, :lk]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
