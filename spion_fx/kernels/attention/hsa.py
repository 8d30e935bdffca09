"""MST's Hybrid Sparse Attention, computed sparsely (the original only masked a dense SDPA).

Masks (causal): *strided* — query p sees key k iff k <= p and (p - k) % stride == 0;
*local+strided* — additionally every key with 0 <= p - k < local.

Strided attention is causal attention inside each residue class p mod stride: reshaping the
sequence to [stride, L/stride] turns it into `stride` independent causal problems of length
L/stride, which PyTorch's fused SDPA (with its own backward) runs at L²/stride cost.

Local+strided splits every query's keys into three disjoint sets, each a causal attention with
its log-sum-exp: the diagonal blocks (block size = local) on the block-sparse attention op — the
mask's block-level part —, the window's remainder in the previous block (causal after reversing
the token order in both blocks), and the strided keys at least `local` back (causal inside each
residue class, shifted). The parts merge exactly by their log-sum-exps (see _LocalPlusStrided);
without dropout or key padding the two small parts run fused, else on their materialised
O(L·local) and O(L²/stride) scores. benchmarks/hsa_cpu.py measures both modes against dense
causal SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spion_fx.kernels.attention.block_sparse_cpu import (
    additive_mask,
    flash_bwd,
    flash_fwd,
    math_attention,
    math_attention_backward,
)
from spion_fx.kernels.attention.layout import BlockLayout


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
    """Causal MST attention. q: [B, H, L, D]; k, v: [B, Hkv, L, D] (GQA: kv heads are repeated).

    ``local == 0`` is the strided mask, else local+strided; dropout applies to the joint
    probabilities and ``key_padding_mask`` [B, L] (True = keep) hides keys everywhere.
    """
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
    return _LocalPlusStrided.apply(q, k, v, stride, local, scale, key_padding_mask, float(dropout_p))


def _to_classes(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, stride, n, D]: row r holds positions r, r + stride, r + 2·stride, …"""
    b, h, length, d = x.shape
    n = -(-length // stride)
    x = _pad_rows(x, n * stride - length)
    return x.view(b, h, n, stride, d).transpose(2, 3)


def _pad_rows(t: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """t with `rows` rows of `fill` appended on the token axis (-2); t itself when rows is 0
    (F.pad copies even then, and these tensors are the size of q)."""
    return F.pad(t, (0, 0, 0, rows), value=fill) if rows else t


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


class _LocalPlusStrided(torch.autograd.Function):
    """local+strided as three disjoint key sets, each attended separately, merged exactly.

    With blocks of ``local`` tokens, query p = b·local + r sees (distance = p - key):
    * distance 0..r — its own block, causal: the block-level part, on ``spion::block_sparse_attention``
      with a diagonal layout (key padding and dropout included);
    * distance r+1..local-1 — the later keys of block b-1 (key offset j > r). Reversing the token
      order inside both blocks turns "j > r" into "j' < r'", i.e. causal attention between the
      first local-1 reversed queries and keys (see ``_PreviousBlock``);
    * distances that are multiples of the stride and ≥ local — causal attention inside each
      residue class, shifted by m = ⌈local/stride⌉ class positions (see ``_StridedBack``).
    Each part returns its output and log-sum-exp; the exact result is their log-sum-exp-weighted
    sum. Dropout on the joint probabilities splits the same way (each part drops its own
    probabilities). Backward is the split-KV identity: each part's attention backward given the
    *global* output and log-sum-exp. The two small parts run fused (with their log-sum-exp) when
    there is neither dropout nor key padding, else as explicit causal attention on their
    O(L·local) and O(L²/stride) scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, stride, local, scale, key_padding_mask, dropout_p):
        from spion_fx.kernels.attention.block_sparse_op import block_sparse_attention_fwd

        layout = _layout("diagonal", q.shape[-2], local, q)
        if dropout_p > 0:
            seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        else:
            seed = torch.zeros((), dtype=torch.int64)
        out_d, lse_d = block_sparse_attention_fwd(
            q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks,
            layout.q_indices, local, float(scale), True, key_padding_mask, dropout_p, seed, False,
        )  # fmt: skip
        acc = torch.promote_types(q.dtype, torch.float32)  # merge precision
        outs, lses, keeps = [out_d.to(acc)], [lse_d.to(acc)], []
        parts = [part for part in (_PreviousBlock(q, local), _StridedBack(q, stride, local)) if part.queries]
        fused = dropout_p == 0 and key_padding_mask is None
        for part in parts:
            qp, kp, vp = part.gather_q(q), part.gather_kv(k), part.gather_kv(v)
            keep = None
            if fused:
                o, lse_p = _causal_with_lse(qp, kp, vp, scale)
            else:
                if dropout_p > 0:
                    keep = torch.rand(qp.shape[:-1] + (kp.shape[-2],), device=q.device) >= dropout_p
                bias = _part_bias(part, key_padding_mask, q.shape[1], qp, kp)
                o, lse_p = math_attention(qp, kp, vp, bias, scale, keep, dropout_p)
            keeps.append(keep)
            outs.append(part.place_q(o.to(acc)))
            lses.append(part.place_q(lse_p.to(acc).unsqueeze(-1), float("-inf")).squeeze(-1))
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        seen = torch.isfinite(lse)  # a query whose keys are all padding gets 0, as SDPA's users expect
        weights = [torch.where(seen, torch.exp(lse_p - lse), 0.0).unsqueeze(-1) for lse_p in lses]
        out = sum(o * w for o, w in zip(outs, weights)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
        ctx.layout, ctx.parts, ctx.keeps = layout, parts, keeps
        ctx.local, ctx.scale, ctx.dropout_p, ctx.fused = local, scale, dropout_p, fused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from spion_fx.kernels.attention.block_sparse_op import block_sparse_attention_bwd

        q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
        layout = ctx.layout
        grad_out = grad_out.contiguous()
        dq, dk, dv = block_sparse_attention_bwd(
            grad_out, q, k, v, out, lse, layout.kv_num_blocks, layout.kv_indices,
            layout.q_num_blocks, layout.q_indices, ctx.local, float(ctx.scale), True,
            key_padding_mask, ctx.dropout_p, seed, False,
        )  # fmt: skip
        # Rows that saw nothing (and padded query rows) get lse = +inf: probabilities 0, no gradient.
        lse_safe = lse.masked_fill(~torch.isfinite(lse), float("inf"))
        for part, keep in zip(ctx.parts, ctx.keeps):
            qp, kp, vp = part.gather_q(q), part.gather_kv(k), part.gather_kv(v)
            gop, op, lse_p = part.gather_q(grad_out), part.gather_q(out), _part_lse(part, lse_safe)
            if ctx.fused:
                gq, gk, gv = _causal_with_lse_backward(gop, qp, kp, vp, op, lse_p, ctx.scale)
            else:
                bias = _part_bias(part, key_padding_mask, q.shape[1], qp, kp)
                gq, gk, gv = math_attention_backward(
                    qp, kp, vp, bias, ctx.scale, keep, ctx.dropout_p, gop, op, lse_p
                )
            dq = dq + part.place_q(gq)
            dk = dk + part.place_kv(gk)
            dv = dv + part.place_kv(gv)
        return dq, dk, dv, None, None, None, None, None


def _part_lse(part, lse: torch.Tensor) -> torch.Tensor:
    """The global log-sum-exp at a part's query rows; padded rows +inf."""
    return part.gather_q(lse.unsqueeze(-1), float("inf")).squeeze(-1)


def _part_bias(
    part, key_padding_mask: torch.Tensor | None, heads: int, qp: torch.Tensor, kp: torch.Tensor
) -> torch.Tensor:
    """Additive causal (+ key padding) mask in a part's layout: [B or 1, H' or 1, rows, keys]."""
    visible = torch.ones(qp.shape[-2], kp.shape[-2], dtype=torch.bool, device=qp.device).tril()
    if key_padding_mask is not None:
        b, length = key_padding_mask.shape
        keys = key_padding_mask[:, None, :, None].to(torch.float32).expand(b, heads, length, 1)
        visible = visible & (part.gather_kv(keys) > 0.5).transpose(-1, -2)
    return additive_mask(visible, torch.promote_types(qp.dtype, torch.float32))


class _PreviousBlock:
    """The window's keys in the previous block, as causal attention over token-reversed blocks.

    Queries: rows 0..local-2 of blocks 1..nb-1, reversed (row r of block b -> position local-2-r);
    keys: rows 1..local-1 of blocks 0..nb-2, reversed (row j -> local-1-j). Causal on the reversed
    positions means local-1-j <= local-2-r, i.e. j > r. Blocks are flattened into the head axis.
    """

    def __init__(self, q: torch.Tensor, local: int):
        self.length, self.local = q.shape[-2], local
        self.blocks = -(-self.length // local)
        self.queries = self.blocks > 1 and local > 1

    def _blocked(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        b, h, _, d = t.shape
        padded = _pad_rows(t, self.blocks * self.local - self.length, fill)
        return padded.view(b, h, self.blocks, self.local, d)

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        b, h, n, r, d = x.shape
        return x.reshape(b, h * n, r, d)

    def gather_q(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        return self._flat(self._blocked(t, fill)[:, :, 1:, : self.local - 1].flip(3))

    def gather_kv(self, t: torch.Tensor) -> torch.Tensor:
        return self._flat(self._blocked(t)[:, :, :-1, 1:].flip(3))

    def _place(self, x: torch.Tensor, fill: float, blocks: slice, rows: slice) -> torch.Tensor:
        b, _, _, d = x.shape
        full = x.new_full((b, x.shape[1] // (self.blocks - 1), self.blocks, self.local, d), fill)
        full[:, :, blocks, rows] = x.view(b, -1, self.blocks - 1, x.shape[2], d).flip(3)
        return full.flatten(2, 3)[:, :, : self.length]

    def place_q(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        return self._place(x, fill, slice(1, None), slice(0, self.local - 1))

    def place_kv(self, x: torch.Tensor) -> torch.Tensor:
        return self._place(x, 0.0, slice(0, -1), slice(1, None))


class _StridedBack:
    """Strided keys at least ``local`` back: causal attention inside each residue class between
    class positions m.. (queries) and 0..n-m-1 (keys), m = ⌈local/stride⌉; classes into heads."""

    def __init__(self, q: torch.Tensor, stride: int, local: int):
        self.length, self.stride = q.shape[-2], stride
        self.n = -(-self.length // stride)
        self.shift = -(-local // stride)
        self.queries = self.n > self.shift

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, n, d = x.shape
        return x.reshape(b, h * s, n, d)

    def gather_q(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        padded = _pad_rows(t, self.n * self.stride - self.length, fill)
        return self._flat(_to_classes(padded, self.stride)[:, :, :, self.shift :])

    def gather_kv(self, t: torch.Tensor) -> torch.Tensor:
        return self._flat(_to_classes(t, self.stride)[:, :, :, : self.n - self.shift])

    def _classes(self, x: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, rows, d = x.shape
        full = x.new_full((b, x.shape[1] // self.stride, self.stride, self.n, d), fill)
        return full, x.view(b, -1, self.stride, rows, d)

    def place_q(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        full, part = self._classes(x, fill)
        full[:, :, :, self.shift :] = part
        return _from_classes(full, self.length)

    def place_kv(self, x: torch.Tensor) -> torch.Tensor:
        full, part = self._classes(x, 0.0)
        full[:, :, :, : self.n - self.shift] = part
        return _from_classes(full, self.length)


def _fused_cpu(q: torch.Tensor) -> bool:
    return q.device.type == "cpu"


def _causal_with_lse(q, k, v, scale):
    """Causal attention with its log-sum-exp: PyTorch's fused CPU kernel on CPU, the block-sparse
    op with a lower-triangular layout elsewhere (the Triton kernel on CUDA)."""
    if _fused_cpu(q):
        return flash_fwd(q, k, v, 0.0, True, scale=scale)
    from spion_fx.kernels.attention.block_sparse_op import block_sparse_attention_fwd

    layout, block = _layout("lower_triangular", q.shape[-2], _TRIANGLE_BLOCK, q), _TRIANGLE_BLOCK
    return block_sparse_attention_fwd(
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices,
        block, float(scale), True, None, 0.0, torch.zeros((), dtype=torch.int64), False,
    )  # fmt: skip


def _causal_with_lse_backward(grad_out, q, k, v, out, lse, scale):
    if _fused_cpu(q):
        lse = lse.to(torch.promote_types(q.dtype, torch.float32))
        return flash_bwd(grad_out.contiguous(), q, k, v, out, lse, 0.0, True, scale=scale)
    from spion_fx.kernels.attention.block_sparse_op import block_sparse_attention_bwd

    layout, block = _layout("lower_triangular", q.shape[-2], _TRIANGLE_BLOCK, q), _TRIANGLE_BLOCK
    return block_sparse_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse.float(), layout.kv_num_blocks, layout.kv_indices,
        layout.q_num_blocks, layout.q_indices, block, float(scale), True, None, 0.0,
        torch.zeros((), dtype=torch.int64), False,
    )  # fmt: skip


_LAYOUTS: dict[tuple, BlockLayout] = {}
_TRIANGLE_BLOCK = 64  # block of the lower-triangular layout the non-CPU parts run on


def _layout(kind: str, length: int, block: int, like: torch.Tensor) -> BlockLayout:
    """The diagonal / lower-triangular layout for ``length`` tokens, cached in eager mode (so the
    op's plan cache sees the same tensors every step); built afresh, by traceable arange ops,
    while Dynamo or AOT autograd trace."""
    from spion_fx.kernels.attention.block_sparse_op import _is_traced

    blocks = -(-length // block)
    build = BlockLayout.diagonal if kind == "diagonal" else BlockLayout.lower_triangular
    if torch.compiler.is_compiling() or _is_traced(like):
        return build(blocks, block, like.device)
    key = (kind, blocks, block, like.device)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = build(blocks, block, like.device)
    return _LAYOUTS[key]


def hsa_mask(length: int, stride: int, local: int = 0, device=None) -> torch.Tensor:
    """The dense [L, L] boolean mask the sparse computation above is exact for (for tests)."""
    p = torch.arange(length, device=device).view(-1, 1)
    kk = torch.arange(length, device=device).view(1, -1)
    back = p - kk
    visible = (back >= 0) & (back % stride == 0)
    if local:
        visible |= (back >= 0) & (back < local)
    return visible
