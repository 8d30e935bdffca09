"""CPU kernels for block-sparse attention: rows grouped by kv-block count, one fused SDPA per group.

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

The backward calls the fused CPU flash backward per group with the saved out/lse (no recompute).
Dropout needs the probabilities, so it takes a plain matmul/softmax path whose keep-mask comes
from a generator seeded by ``seed``; the backward regenerates the same mask and differentiates a
recompute of that path.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


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
class GroupPlan:
    groups: tuple[RowGroup, ...]
    shared: bool


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
) -> GroupPlan:
    """Host-side grouping of the layout's rows (run once per layout, then cached)."""
    n_heads = kv_num_blocks.shape[0]
    n_kv_blocks = -(-lk // block)
    partial_edge = lk % block != 0
    counts = kv_num_blocks.tolist()
    indices = kv_indices.tolist()
    buckets: dict[tuple, list[tuple[int, int, list[int]]]] = {}
    for h in range(n_heads):
        for qb, cnt in enumerate(counts[h]):
            full, special = [], []
            for kb in indices[h][qb][:cnt]:
                if causal and kb > qb:
                    continue  # entirely above the diagonal: nothing visible
                diag = causal and kb == qb
                edge = partial_edge and kb == n_kv_blocks - 1
                kind = "diag_edge" if diag and edge else "diag" if diag else "edge" if edge else "full"
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
    return GroupPlan(tuple(groups), shared=n_heads == 1)


def get_plan(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    lq: int,
    lk: int,
    causal: bool,
    group_size: int,
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
    )
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        num, idx, plan = hit
        if torch.equal(num, kv_num_blocks) and torch.equal(idx, kv_indices):
            _PLAN_CACHE.move_to_end(key)
            return plan
    plan = build_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, group_size)
    _PLAN_CACHE[key] = (kv_num_blocks.clone(), kv_indices.clone(), plan)
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


# ----------------------------------------------------------------------------- gathers / scatters


class _Blocks:
    """Block views of q-shaped and kv-shaped tensors for one call (padding to whole blocks)."""

    def __init__(self, b: int, h: int, hkv: int, lq: int, lk: int, block: int, shared: bool):
        self.b, self.h, self.hkv, self.block, self.shared = b, h, hkv, block, shared
        self.g = h // hkv
        self.nqb, self.nkb = -(-lq // block), -(-lk // block)
        self.lq, self.lk = lq, lk

    def pad_q(self, t: torch.Tensor) -> torch.Tensor:
        return _pad_len(t, self.nqb * self.block)

    def pad_kv(self, t: torch.Tensor) -> torch.Tensor:
        return _pad_len(t, self.nkb * self.block)

    def gather_q(self, t: torch.Tensor, grp: RowGroup) -> torch.Tensor:
        """q-shaped [B, H, Lq_pad, *] -> [B, units*n, G'*bs, *] (trailing dim may be absent)."""
        tail = t.shape[3:]
        n, bs = grp.q_block.numel(), self.block
        if self.shared:
            t6 = t.view(self.b, self.hkv, self.g, self.nqb, bs, *tail)
            x = t6.index_select(3, grp.q_block).transpose(2, 3)
            return x.reshape(self.b, self.hkv * n, self.g * bs, *tail)
        t5 = t.view(self.b, self.h, self.nqb, bs, *tail)
        return t5[:, grp.q_head, grp.q_block]

    def scatter_q(self, dst: torch.Tensor, src: torch.Tensor, grp: RowGroup) -> None:
        """Inverse of gather_q into a zero-initialised q-shaped buffer (rows are disjoint)."""
        tail = dst.shape[3:]
        n, bs = grp.q_block.numel(), self.block
        if self.shared:
            d6 = dst.view(self.b, self.hkv, self.g, self.nqb, bs, *tail)
            s6 = src.reshape(self.b, self.hkv, n, self.g, bs, *tail).transpose(2, 3)
            d6.index_copy_(3, grp.q_block, s6)
        else:
            dst.view(self.b, self.h, self.nqb, bs, *tail)[:, grp.q_head, grp.q_block] = src

    def gather_kv(self, t: torch.Tensor, grp: RowGroup) -> torch.Tensor:
        """kv-shaped [B, Hkv, Lk_pad, D] -> [B, units*n, c*bs, D]."""
        n, c, bs, d = grp.q_block.numel(), grp.count, self.block, t.shape[-1]
        t5 = t.view(self.b, self.hkv, self.nkb, bs, d)
        if self.shared:
            x = t5.index_select(2, grp.kv_block)
            return x.view(self.b, self.hkv * n, c * bs, d)
        return t5[:, grp.kv_head, grp.kv_block].view(self.b, n, c * bs, d)

    def scatter_add_kv(self, dst: torch.Tensor, src: torch.Tensor, grp: RowGroup) -> None:
        n, c, bs, d = grp.q_block.numel(), grp.count, self.block, dst.shape[-1]
        if self.shared:
            d5 = dst.view(self.b, self.hkv, self.nkb, bs, d)
            d5.index_add_(2, grp.kv_block, src.reshape(self.b, self.hkv, n * c, bs, d))
        else:  # dst is our own contiguous buffer, so (kv head, block) flattens
            flat = dst.view(self.b, self.hkv * self.nkb, bs, d)
            flat.index_add_(1, grp.kv_head * self.nkb + grp.kv_block, src.reshape(self.b, n * c, bs, d))

    def units(self) -> int:
        return self.hkv if self.shared else 1


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
        valid = key_padding_mask.bool() if key_padding_mask is not None else torch.ones(1, lk, dtype=torch.bool)
        qpos = torch.arange(blocks.nqb * block)
        if causal:
            cum = valid.long().cumsum(-1)
            base = cum[:, qpos.clamp(max=lk - 1)]
        else:
            base = valid.long().sum(-1, keepdim=True).expand(-1, qpos.numel())
        base_count = base[:, None, :].double()
    return _CallContext(blocks, kpm_blocks, base_count, compat, q.dtype)


def _group_mask(ctx: _CallContext, grp: RowGroup) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
        return _additive(struct, ctx.dtype)[None, None], None
    vis = torch.ones(1, 1, 1, 1, grp.count * bs, dtype=torch.bool)  # [B|1, 1, n|1, q|1, keys]
    if struct is not None:
        vis = vis & struct[None, None, None]
    if ctx.kpm_blocks is not None:
        vis = vis & ctx.kpm_blocks.index_select(1, grp.kv_block).view(blk.b, 1, n, 1, grp.count * bs)
    if ctx.compat:
        qpos = (grp.q_block[:, None] * bs + torch.arange(bs)).repeat(1, gq)  # [n, G'*bs]
        base = ctx.base_count[:, :, qpos]  # [B|1, 1, n, G'*bs]
        pruned = base - vis.sum(-1, dtype=torch.float64)
        lead = torch.broadcast_shapes(vis.shape[:-1], pruned.shape)
        bias = _additive(vis.expand(*lead, vis.shape[-1]), ctx.dtype)
        virtual = pruned.log().expand(lead).unsqueeze(-1).to(ctx.dtype)
        bias = torch.cat([bias, virtual], dim=-1)
        seen = (base > 0).expand(lead)
    else:
        bias = _additive(vis, ctx.dtype)
        seen = vis.any(-1)
    rows_b = bias.shape[0]
    bias = bias.expand(rows_b, units, n, *bias.shape[3:]).reshape(rows_b, units * n, *bias.shape[3:])
    seen = seen.expand(rows_b, units, n, seen.shape[-1]).reshape(rows_b, units * n, -1)
    return bias, ~seen


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))


# ----------------------------------------------------------------------------- forward / backward


def _gather_group(ctx: _CallContext, grp: RowGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    blk = ctx.blocks
    qg, kg, vg = blk.gather_q(q, grp), blk.gather_kv(k, grp), blk.gather_kv(v, grp)
    if ctx.compat:  # the virtual key: zero key (its logit comes from the mask), zero value
        kg = F.pad(kg, (0, 0, 0, 1))
        vg = F.pad(vg, (0, 0, 0, 1))
    return qg, kg, vg


def _math_group(
    qg: torch.Tensor,
    kg: torch.Tensor,
    vg: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    keep: torch.Tensor,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused attention with dropout; differentiable by autograd."""
    acc = torch.promote_types(qg.dtype, torch.float32)
    s = torch.matmul(qg, kg.transpose(-1, -2)).to(acc) * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0))
    p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p.to(vg.dtype), vg)
    return out, lse.squeeze(-1)


def _keep_masks(gen: torch.Generator, shape: torch.Size, dropout_p: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) >= dropout_p


def _generator(seed: torch.Tensor) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed.item()) & ((1 << 63) - 1))
    return gen


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
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    plan = get_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, h // hkv)
    ctx = _make_context(q, k, block, causal, key_padding_mask, compat, plan.shared)
    blk = ctx.blocks
    qp, kp, vp = blk.pad_q(q), blk.pad_kv(k), blk.pad_kv(v)
    out = q.new_zeros(b, h, blk.nqb * block, d)
    lse = torch.full((b, h, blk.nqb * block), float("-inf"), dtype=torch.float32)
    gen = _generator(seed) if dropout_p > 0 else None
    for grp in plan.groups:
        qg, kg, vg = _gather_group(ctx, grp, qp, kp, vp)
        bias, empty_rows = _group_mask(ctx, grp)
        if gen is not None:
            keep = _keep_masks(gen, torch.Size((b, qg.shape[1], qg.shape[2], kg.shape[2])), dropout_p)
            og, lg = _math_group(qg, kg, vg, bias, scale, keep, dropout_p)
        else:
            og, lg = _flash_fwd(qg, kg, vg, attn_mask=bias, scale=scale)
        lg = lg.float()
        if empty_rows is not None:
            lg = lg.masked_fill(empty_rows, float("-inf"))
        blk.scatter_q(out, og, grp)
        blk.scatter_q(lse, lg, grp)
    return _trim(out, lq), _trim(lse, lq)


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
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    plan = get_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, h // hkv)
    ctx = _make_context(q, k, block, causal, key_padding_mask, compat, plan.shared)
    blk = ctx.blocks
    qp, kp, vp = blk.pad_q(q), blk.pad_kv(k), blk.pad_kv(v)
    gop = blk.pad_q(grad_out.to(q.dtype))
    # Rows that saw nothing get lse = +inf: the kernel's exp(s - lse) is then 0, not NaN.
    lse_safe = lse.float().masked_fill(torch.isneginf(lse), float("inf"))
    lse_p = F.pad(lse_safe, (0, blk.nqb * block - lq), value=float("inf"))
    out_p = blk.pad_q(out)
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dq = q.new_zeros(b, h, blk.nqb * block, d)
    dk = torch.zeros(b, hkv, blk.nkb * block, d, dtype=acc)
    dv = torch.zeros(b, hkv, blk.nkb * block, d, dtype=acc)
    gen = _generator(seed) if dropout_p > 0 else None
    for grp in plan.groups:
        qg, kg, vg = _gather_group(ctx, grp, qp, kp, vp)
        bias, _ = _group_mask(ctx, grp)
        gog = blk.gather_q(gop, grp)
        if gen is not None:
            keep = _keep_masks(gen, torch.Size((b, qg.shape[1], qg.shape[2], kg.shape[2])), dropout_p)
            dqg, dkg, dvg = _math_group_backward(qg, kg, vg, bias, scale, keep, dropout_p, gog)
        else:
            og = blk.gather_q(out_p, grp)
            lg = blk.gather_q(lse_p, grp).to(acc)
            dqg, dkg, dvg = _flash_bwd(gog, qg, kg, vg, og, lg, 0.0, False, attn_mask=bias, scale=scale)
        if ctx.compat:  # drop the virtual key's gradients
            dkg, dvg = dkg[:, :, :-1], dvg[:, :, :-1]
        blk.scatter_q(dq, dqg, grp)
        blk.scatter_add_kv(dk, dkg.to(acc), grp)
        blk.scatter_add_kv(dv, dvg.to(acc), grp)
    return _trim(dq, lq), _trim(dk, lk).to(k.dtype), _trim(dv, lk).to(v.dtype)


def _math_group_backward(qg, kg, vg, bias, scale, keep, dropout_p, gog):
    with torch.enable_grad():
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (qg, kg, vg))
        og, _ = _math_group(qg, kg, vg, bias, scale, keep, dropout_p)
        return torch.autograd.grad(og, (qg, kg, vg), gog)


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
    plan = get_plan(kv_num_blocks, kv_indices, block, lq, lk, causal, h // hkv)
    blk = _Blocks(b, h, hkv, lq, lk, block, plan.shared)
    gen = _generator(seed)
    # Scatter every kept flag to its (query, key) position through the same gathers.
    key_pos = torch.arange(blk.nkb * block, dtype=torch.float64).view(1, 1, -1, 1)
    dense = torch.zeros(b, h, blk.nqb * block, blk.nkb * block, dtype=torch.bool)
    for grp in plan.groups:
        kpos = blk.gather_kv(key_pos.expand(b, hkv, -1, 1), grp)[..., 0].long()  # [B, U*n, c*bs]
        n_keys = kpos.shape[-1] + (1 if compat else 0)
        rows = blk.gather_q(torch.zeros(b, h, blk.nqb * block, 1), grp).shape[2]
        keep = _keep_masks(gen, torch.Size((b, kpos.shape[1], rows, n_keys)), dropout_p)[..., : kpos.shape[-1]]
        grid = torch.zeros(b, kpos.shape[1], rows, blk.nkb * block, dtype=torch.bool)
        grid.scatter_(3, kpos[:, :, None, :].expand(-1, -1, rows, -1), keep)
        blk.scatter_q(dense, grid, grp)
    return dense[:, :, :lq, :lk]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
