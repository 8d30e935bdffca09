"""Block-sparse decode attention: queries at the end of a KV cache (generation).

A model generating with a KV cache calls attention with fewer queries than keys: the ``Lq``
newest tokens sit at absolute positions ``Lk-Lq .. Lk-1`` of a cache of ``Lk`` keys (``Lq = 1``
per generated token; more for chunked prefill or assisted decoding). The training op
(``block_sparse_attention``) needs ``Lq == Lk``; this module computes exactly the rows
``Lk-Lq .. Lk-1`` of what that op computes on the full sequence, reading only the kept key blocks:

* ``DecodeLayout.from_pattern(pattern, block_size, lk, max_lq)`` reads the pattern once (a host
  sync) and lists, per index head, the key tokens of every block kept by the block rows the
  queries can fall in, and which block row keeps which of them. It depends on ``lk`` only
  through ``ceil(lk / block_size)``: build it once per (pattern, number of key blocks) and reuse
  it for every decode step until the cache grows into a new block.
* ``block_sparse_decode_attention(q, k, v, layout, ...)`` gathers those K/V rows (one
  ``index_select`` each) and runs one batched matmul, a softmax (masked only where needed) and a
  matmul over them. Its cost is proportional to the kept blocks, not to ``Lk``. No host syncs
  (CUDA runs the same torch code); the masks that depend on the exact ``Lk`` (partial last
  block, causal) are built per call from the shapes.

Measured on CPU (benchmarks/decode_attention.py): the gather copy is most of the cost (it reads
and writes the kept rows), so one token over an 8192 cache keeping 10 % of its blocks is ~3-4x
cheaper than dense SDPA, not 10x; reading runs of blocks in place (two matmuls per run) and CPU
SDPA over the gathered rows were both measured no faster.

Semantics, shared with ``block_sparse_attention`` run on the full sequence of ``Lk`` tokens: the
query at position ``p`` sees key ``j`` iff block ``(p // bs, j // bs)`` is kept by the pattern,
``j <= p`` when ``causal``, and ``key_padding_mask[b, j]`` (bool ``[B, Lk]``, True = real key;
left padding for batched generation). Rows that see no key output 0. GQA (``k``/``v`` with
``Hkv`` heads, ``H % Hkv == 0``) reads the shared K/V rows once per kv head (no repeat). Inputs
that require grad get a correct gradient (every step is a differentiable torch op). ``compat``
("spion" softmax) and dropout are not supported: generation runs in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from spion_fx.kernels.attention.block_sparse_op import check_key_padding, check_qkv

__all__ = ["DecodeLayout", "block_sparse_decode_attention"]


@dataclass(frozen=True, eq=False)
class DecodeLayout:
    """Which key tokens a decode call gathers, and which query block row keeps which of them.

    token_index: int64 [Hi, S]  key positions to gather, per index head, ascending within each
                 head; the kept blocks' tokens (whole blocks, so the last block may list
                 positions >= Lk: clamped and masked per call); rows shorter than S are padded
                 with 0 (masked by ``row_keep``). Hi = 1 for a shared pattern; for a per-head
                 pattern Hi = num_kv_heads given to ``from_pattern`` (the union over the query
                 heads that share a kv head), else H.
    row_keep:    bool [M, R, S] whether block row ``first_row + r`` keeps gathered key s, per
                 pattern head (M = 1 shared, or H per head).
    block_size, num_kv_blocks (= ceil(Lk / block_size) the layout is valid for), max_lq (the most
    queries per call), first_row (the first block row a query can fall in).
    may_have_empty_rows: per causal flag (False, True): whether some query row can see no key
    before padding is applied (then the call zeroes such rows; with a key padding mask it always
    checks). rows_full: every row keeps every gathered slot (a shared pattern's single decode
    row); max_token: the largest gathered position. Both let a call skip the mask.
    """

    token_index: Tensor
    row_keep: Tensor
    block_size: int
    num_kv_blocks: int
    max_lq: int
    first_row: int
    may_have_empty_rows: tuple[bool, bool]
    rows_full: bool
    max_token: int
    _flat_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_heads(self) -> int:
        """Pattern heads M: 1 (shared) or H (per head)."""
        return self.row_keep.shape[0]

    @property
    def num_index_heads(self) -> int:
        """Heads of the gather index Hi: 1, num_kv_heads or H."""
        return self.token_index.shape[0]

    @property
    def gathered_tokens(self) -> int:
        """S: key tokens gathered per index head (padding slots included)."""
        return self.token_index.shape[1]

    @property
    def device(self) -> torch.device:
        return self.token_index.device

    @classmethod
    def from_pattern(
        cls,
        pattern: Tensor,
        block_size: int,
        lk: int,
        max_lq: int = 1,
        *,
        num_kv_heads: int | None = None,
    ) -> DecodeLayout:
        """Build from a bool block pattern ``[nB, nB]`` or ``[H', nB, nB]`` (H' = 1 or H).

        ``nB`` must be at least ``ceil(lk / block_size)``; a larger pattern is cropped to its
        top-left ``ceil(lk / block_size)`` blocks, as ``runtime.pattern.resize_pattern`` does. A
        shorter one is refused: extend it first (``resize_pattern`` adds the diagonal band), so
        that decode and the full-length op see the same pattern.

        The layout serves every call with ``ceil(Lk / block_size) == ceil(lk / block_size)`` and
        ``Lq <= max_lq``. ``num_kv_heads``: for a per-head pattern with GQA, the number of kv
        heads, so the gather index is one per kv head (the union of its query heads' blocks);
        without it a per-head pattern gathers per query head (correct, but reads shared K/V rows
        once per query head).

        Reads the pattern on the host once (a device sync on CUDA).
        """
        if not isinstance(pattern, Tensor) or pattern.dtype != torch.bool:
            raise TypeError("pattern must be a bool tensor [nB, nB] or [H', nB, nB]")
        if pattern.dim() == 2:
            pattern = pattern.unsqueeze(0)
        if pattern.dim() != 3 or pattern.shape[-1] != pattern.shape[-2]:
            raise ValueError(f"pattern must be [nB, nB] or [H', nB, nB], got {tuple(pattern.shape)}")
        for name, value in (("block_size", block_size), ("lk", lk), ("max_lq", max_lq)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        nkb = -(-lk // block_size)
        if pattern.shape[-1] < nkb:
            raise ValueError(
                f"pattern has {pattern.shape[-1]} blocks per side but lk={lk} needs {nkb} at "
                f"block_size={block_size}; extend it first (runtime.pattern.resize_pattern)"
            )
        m = pattern.shape[0]
        if m == 1:
            num_kv_heads = None  # a shared pattern gathers once for every head
        elif num_kv_heads is not None and (
            isinstance(num_kv_heads, bool) or num_kv_heads < 1 or m % num_kv_heads
        ):
            raise ValueError(f"num_kv_heads={num_kv_heads!r} must divide the pattern's {m} heads")
        # Queries of any call served: positions lk' - lq' .. lk' - 1 with lk' in the same block
        # count and lq' <= max_lq, so the earliest is (nkb - 1) * bs + 1 - max_lq.
        first_row = max(0, ((nkb - 1) * block_size + 1 - max_lq) // block_size)
        rows = pattern[:, first_row:nkb, :nkb].bool()  # [M, R, nkb]
        hi = 1 if m == 1 else (num_kv_heads or m)
        union = rows.reshape(hi, m // hi, nkb - first_row, nkb).any(2).any(1)  # [Hi, nkb]
        counts = union.sum(-1)
        max_blocks = max(int(counts.max()), 1)  # host reads (device syncs) happen only here
        # A stable sort of (not kept) lists the kept blocks first, in ascending order.
        blocks = torch.sort((~union).to(torch.int8), dim=-1, stable=True).indices[:, :max_blocks]
        slot_ok = torch.arange(max_blocks, device=pattern.device) < counts[:, None]  # [Hi, K]
        blocks = torch.where(slot_ok, blocks, torch.zeros_like(blocks))
        offsets = torch.arange(block_size, device=pattern.device)
        token_index = (blocks[:, :, None] * block_size + offsets).reshape(hi, -1)
        # row_keep[m, r, s]: pattern head m's row first_row + r keeps the block of slot s.
        heads_of = torch.arange(m, device=pattern.device) // (m // hi)  # pattern head -> index head
        slot_blocks = blocks[heads_of]  # [M, K]
        keep = torch.gather(rows, 2, slot_blocks[:, None, :].expand(m, rows.shape[1], -1))
        keep = keep & slot_ok[heads_of][:, None, :]
        row_keep = keep.repeat_interleave(block_size, dim=2).contiguous()  # [M, R, S]
        empty = _empty_rows(rows, first_row, nkb)
        return cls(
            token_index.contiguous(), row_keep, int(block_size), nkb, int(max_lq), first_row, empty,
            bool(row_keep.all()), int(token_index.max()),
        )  # fmt: skip

    def to(self, device: torch.device | str) -> DecodeLayout:
        return DecodeLayout(
            self.token_index.to(device), self.row_keep.to(device), self.block_size,
            self.num_kv_blocks, self.max_lq, self.first_row, self.may_have_empty_rows,
            self.rows_full, self.max_token,
        )  # fmt: skip

    @property
    def density(self) -> float:
        """Fraction of the cache's key positions a call gathers per index head (padding slots
        included): what a decode step reads, relative to dense attention."""
        return self.gathered_tokens / (self.block_size * self.num_kv_blocks)


def _empty_rows(rows: Tensor, first_row: int, nkb: int) -> tuple[bool, bool]:
    """Whether some query in rows first_row.. may see no key: (non-causal, causal).

    Non-causal: a row without kept blocks (every kept block has a real token, the last one too).
    Causal: a row keeping neither its diagonal block nor a block left of it (a query at the
    start of its block sees nothing else)."""
    r = torch.arange(first_row, nkb, device=rows.device)[:, None]
    j = torch.arange(nkb, device=rows.device)[None, :]
    non_causal = bool((~rows.any(-1)).any())
    causal = bool((~(rows & (j <= r)).any(-1)).any())
    return non_causal, causal


def block_sparse_decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: DecodeLayout,
    *,
    scale: float | None = None,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Attention of the ``Lq`` newest tokens over a KV cache, restricted to the layout's blocks.

    q [B, H, Lq, D] at positions ``Lk-Lq .. Lk-1``; k/v [B, Hkv, Lk, D] (H % Hkv == 0, any
    strides); layout from ``DecodeLayout.from_pattern`` for ``ceil(Lk / bs)`` blocks and
    ``max_lq >= Lq``. scale defaults to 1/sqrt(D). causal: key j visible to the query at p iff
    j <= p (the full-length op's top-left causal). key_padding_mask: bool [B, Lk], True = real
    key. Returns [B, H, Lq, D] in q's dtype (half types computed in float32), equal to rows
    ``Lk-Lq ..`` of ``block_sparse_attention`` on the full sequence; rows seeing no key are 0.
    """
    b, h, lq, d, hkv, lk = _validate(q, k, v, layout, causal, key_padding_mask)
    scale = d**-0.5 if scale is None else float(scale)
    hi, s = layout.num_index_heads, layout.gathered_tokens
    # Gather the kept key rows: [B, Hg, S, D], Hg = Hkv (shared index or one per kv head) or H.
    tokens = layout.token_index
    if layout.max_token >= lk:
        tokens = tokens.clamp(max=lk - 1)  # the last block's slots past Lk (masked below)
    kg, vg = _gather(k, tokens, hi, layout), _gather(v, tokens, hi, layout)
    hg = kg.shape[1]
    g = h // hg  # query heads per gathered head
    visible = _visibility(layout, lq, lk, causal, key_padding_mask, tokens, hg)
    empty_rows = visible is not None and (
        key_padding_mask is not None or layout.may_have_empty_rows[causal]
    )
    # Plain differentiable ops: inputs that require grad get the right gradient.
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.reshape(b, hg, g * lq, d).to(compute)
    kg, vg = kg.to(compute), vg.to(compute)
    scores = torch.matmul(qg * scale, kg.transpose(-1, -2)).view(b, hg, g, lq, s)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if empty_rows:
        # A row that sees no key is NaN after the softmax; the full op outputs 0 there. Zeroing
        # the probabilities (not the output) keeps NaN out of the gradients as well.
        probs = torch.where(visible.any(-1, keepdim=True), probs, probs.new_zeros(()))
    out = torch.matmul(probs.view(b, hg, g * lq, s), vg)
    return out.view(b, h, lq, d).to(q.dtype)


def _visibility(
    layout: DecodeLayout,
    lq: int,
    lk: int,
    causal: bool,
    key_padding_mask: Tensor | None,
    tokens: Tensor,
    hg: int,
) -> Tensor | None:
    """bool [B|1, Hg|1, G|1, Lq|1, S]: the query's block row keeps the key's block, the key is a
    real position (< Lk, not padding) and, when causal, not after the query. None when every
    gathered key is visible to every query (the usual single-token decode of a shared pattern)."""
    bs, hi, s = layout.block_size, layout.num_index_heads, layout.gathered_tokens
    first = lk - lq  # absolute position of the first query
    causal_cut = causal and lq > 1  # one query at Lk - 1: key <= Lk - 1 is the same as key < Lk
    if (
        layout.rows_full and layout.max_token < lk and not causal_cut
        and key_padding_mask is None
    ):  # fmt: skip
        return None
    row_a = first // bs - layout.first_row
    keep = layout.row_keep
    if row_a == (lk - 1) // bs - layout.first_row:
        keep = keep[:, row_a:row_a + 1]  # every query in one block row: [M, 1, S]
    else:
        positions = torch.arange(first, lk, device=tokens.device)
        keep = keep.index_select(1, positions // bs - layout.first_row)  # [M, Lq, S]
    m = keep.shape[0]
    mh = hg if m > 1 else 1
    visible = keep.view(1, mh, m // mh, keep.shape[1], s)
    tok = layout.token_index.view(1, hi, 1, 1, s)
    if causal_cut:
        limit = torch.arange(first, lk, device=tokens.device).view(1, 1, 1, lq, 1)
        visible = visible & (tok <= limit)
    elif layout.max_token >= lk:
        visible = visible & (tok < lk)
    if key_padding_mask is not None:
        real = key_padding_mask.index_select(1, tokens.reshape(-1))  # [B, Hi * S]
        visible = visible & real.view(real.shape[0], hi, 1, 1, s)
    return visible


def _gather(x: Tensor, tokens: Tensor, hi: int, layout: DecodeLayout) -> Tensor:
    """Rows ``tokens`` of x [B, Hkv, Lk, D] -> [B, Hkv, S, D] (hi == 1: the same tokens for every
    kv head) or [B, Hi, S, D] (index head i reads kv head i * Hkv // Hi)."""
    b, hkv, lk, d = x.shape
    s = tokens.shape[1]
    # index_select along dim 1 of a 3-D view runs ~2x faster on CPU than along dim 2 of the 4-D
    # tensor (measured: 57 vs 139 us for 1.7 MB), so batch and heads are merged when they can be.
    mergeable = b == 1 or hkv == 1 or x.stride(0) == hkv * x.stride(1)
    if hi == 1:
        if mergeable:
            return x.view(b * hkv, lk, d).index_select(1, tokens[0]).view(b, hkv, s, d)
        return x.index_select(2, tokens[0])
    if hkv == 1:
        return x.view(b, lk, d).index_select(1, tokens.reshape(-1)).view(b, hi, s, d)
    s1, s2 = x.stride(1), x.stride(2)
    if s2 > 0 and s1 % s2 == 0:
        # Heads and tokens as one row dimension (row = head * s1 / s2 + token): one index_select
        # over a strided view, whatever the cache's head stride.
        step = s1 // s2
        rows = (hkv - 1) * step + lk
        flat = x.as_strided((b, rows, d), (x.stride(0), s2, x.stride(3)), x.storage_offset())
        base = _head_base(layout, hkv, hi, step, x.device)
        return flat.index_select(1, (tokens + base).reshape(-1)).view(b, hi, s, d)
    heads = torch.arange(hi, device=x.device)[:, None] * hkv // hi
    return x[:, heads, tokens]  # any other layout (e.g. [B, L, H, D] transposed): advanced index


def _head_base(layout: DecodeLayout, hkv: int, hi: int, step: int, device) -> Tensor:
    """[Hi, 1] row offsets of each index head's kv head; cached per (Hkv, step, device)."""
    key = (hkv, step, str(device))
    base = layout._flat_cache.get(key)
    if base is None:
        base = (torch.arange(hi, device=device)[:, None] * hkv // hi) * step
        layout._flat_cache[key] = base
    return base


def _validate(q, k, v, layout, causal, key_padding_mask) -> tuple[int, ...]:
    b, h, lq, d = check_qkv(q, k, v)
    hkv, lk = k.shape[1], k.shape[2]
    if not isinstance(layout, DecodeLayout):
        raise TypeError("layout must be a DecodeLayout (DecodeLayout.from_pattern)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if lq < 1 or lq > lk:
        raise ValueError(f"need 1 <= Lq <= Lk, got Lq={lq}, Lk={lk}")
    bs = layout.block_size
    if -(-lk // bs) != layout.num_kv_blocks:
        raise ValueError(
            f"layout is for {layout.num_kv_blocks} key blocks but Lk={lk} has {-(-lk // bs)} at "
            f"block_size={bs}: build a DecodeLayout for this block count"
        )
    if lq > layout.max_lq:
        raise ValueError(f"Lq={lq} exceeds the layout's max_lq={layout.max_lq}")
    if layout.num_heads not in (1, h):
        raise ValueError(f"layout has {layout.num_heads} pattern heads; q has {h}")
    hi = layout.num_index_heads
    if hi > 1 and hi != h and hi != hkv:
        raise ValueError(f"layout gathers for {hi} heads; k/v have {hkv} and q {h}")
    if layout.device != q.device or k.device != q.device or v.device != q.device:
        raise ValueError(f"layout on {layout.device}, q on {q.device}, k/v on {k.device}: move them")
    check_key_padding(key_padding_mask, b, lk)
    return b, h, lq, d, hkv, lk
