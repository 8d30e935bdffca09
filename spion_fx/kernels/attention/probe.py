"""`spion::attention_probe`: accumulate a layer's attention map A_s without disturbing training.

A_s is the post-softmax attention averaged over batch and heads (SPION's stability signal). The
op is opaque to the compiler and mutates two accumulator buffers in place, so it survives
dead-code elimination and costs nothing in steps that are not probed (those run a graph variant
without it). It materialises a chunk of query rows at a time (about 16 MB of scores over all (batch, head)
pairs), never B·H full L×L matrices; causal rows skip the keys right of the diagonal.

It also classifies the mask it sees, because the sparse kernel only understands a causal flag and
a key-padding vector: code 0 = no mask or padding only, 1 = causal (+ padding), 2 = anything else
(arbitrary float biases, per-head masks, …), which keeps the site dense.
"""

from __future__ import annotations

import torch

MASK_PADDING, MASK_CAUSAL, MASK_ARBITRARY = 0, 1, 2
MASK_KIND_NONE, MASK_KIND_BOOL_KEEP, MASK_KIND_BOOL_FILL, MASK_KIND_ADDITIVE = 0, 1, 2, 3


@torch.library.custom_op("spion::attention_probe", mutates_args=("accum", "stats"))
def attention_probe(
    accum: torch.Tensor,
    stats: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    mask_kind: int,
    scale: float,
    causal: bool,
) -> None:
    """accum [Lq, Lk] (or [H, Lq, Lk] per head) += mean over batch (and heads) of softmax(q kᵀ·scale + mask, causal).

    accum may be a larger frame than this batch (the site's reference length, the longest one
    seen): the batch's map is added into its top-left [lq, lk] corner, position by position, and
    the caller counts which positions it covered (runtime/attention_site.py).
    stats (float64 [3]): [batches accumulated, non-finite probes skipped, mask code (max seen)].
    mask: [B or 1, 1 or H, Lq, Lk] of kind MASK_KIND_* (bool keep, bool fill, additive float).
    """
    with torch.no_grad():
        while mask is not None and mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
            stats[1] += 1  # a diverging model must never trigger a switch
            return
        visible, binary = visibility(mask, mask_kind, q.shape[0])
        b, h, lq, _ = q.shape
        lk, hk = k.shape[-2], k.shape[1]
        if lq > accum.shape[-2] or lk > accum.shape[-1]:
            raise ValueError(
                f"attention_probe: a batch of {lq}x{lk} does not fit the accumulator frame "
                f"{tuple(accum.shape[-2:])}; grow the frame first"
            )
        per_head = accum.dim() == 3  # [H, Lq, Lk]: one map per head (per-head patterns)
        total = torch.zeros(h if per_head else 1, lq, lk, dtype=torch.float32, device=q.device)
        keys = k.float().repeat_interleave(h // hk, dim=1) if hk != h else k.float()
        bias = mask if mask_kind == MASK_KIND_ADDITIVE and not binary else None
        rows = _rows_per_chunk(b * h, lk)
        for r0 in range(0, lq, rows):
            r1 = min(lq, r0 + rows)
            # Causal rows never see keys right of the diagonal: their scores are not computed
            # at all, which halves the work of a causal probe.
            end = min(lk, r1) if causal else lk
            # Scale folded into q (D-sized, not L²-sized); all (batch, head) pairs in one bmm.
            scores = (q[:, :, r0:r1].float() * scale) @ keys[:, :, :end].transpose(-1, -2)
            rows_may_be_empty = False
            if visible is not None:
                if bias is not None:
                    scores.add_(bias[..., r0:r1, :end].float())
                scores.masked_fill_(~visible[..., r0:r1, :end], float("-inf"))
                rows_may_be_empty = True
            if causal and end > r0:
                diagonal = torch.ones(r1 - r0, end - r0, dtype=torch.bool, device=q.device).triu_(1)
                scores[..., r0:end].masked_fill_(diagonal, float("-inf"))  # the diagonal stays
            probs = torch.softmax(scores, dim=-1)
            if rows_may_be_empty:
                probs.nan_to_num_(0.0)
            total[:, r0:r1, :end] += probs.sum(0) if per_head else probs.sum((0, 1))
        total /= b if per_head else b * h
        if not per_head:
            total = total[0]
        if not torch.isfinite(total).all():
            stats[1] += 1
            return
        accum[..., :lq, :lk] += total.to(accum.dtype)
        stats[0] += 1
        code = mask_structure(visible, causal) if binary else MASK_ARBITRARY
        stats[2] = max(float(stats[2]), float(code))


@attention_probe.register_fake
def _(accum, stats, q, k, mask, mask_kind, scale, causal) -> None:
    return None


def _rows_per_chunk(maps: int, keys: int, budget: int = 1 << 22) -> int:
    """Query rows per chunk: all (batch, head) maps of a chunk stay within ~16 MB of float32,
    so the scores of one chunk are computed, soft-maxed and summed while still in cache."""
    return max(16, budget // max(1, maps * keys))


def visible_keys(mask: torch.Tensor, mask_kind: int) -> torch.Tensor:
    """True where a mask of the given kind lets a query attend (tensor ops only: traceable)."""
    if mask_kind == MASK_KIND_BOOL_KEEP:
        return mask.bool()
    if mask_kind == MASK_KIND_BOOL_FILL:
        return ~mask.bool()
    floor = torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else -1e30
    return mask > floor  # HF writes finfo.min where a key is dropped


def visibility(mask: torch.Tensor | None, mask_kind: int, batch: int) -> tuple[torch.Tensor | None, bool]:
    """(bool visibility [B, 1|H, Lq, Lk] or None, whether the mask is purely keep/drop).

    An additive mask is binary when every entry is 0 or hugely negative (HF writes finfo.min);
    anything else (ALiBi-like biases) cannot be expressed as a block pattern plus padding.
    """
    if mask is None or mask_kind == MASK_KIND_NONE:
        return None, True
    vis = visible_keys(mask, mask_kind)
    binary = mask_kind != MASK_KIND_ADDITIVE or bool(((mask == 0) | ~vis).all())
    while vis.dim() < 4:
        vis = vis.unsqueeze(0)
    return vis.expand(batch, *vis.shape[1:]), binary


def mask_structure(visible: torch.Tensor | None, causal: bool) -> int:
    """Classify a visibility mask as padding-only, causal(+padding) or arbitrary.

    Rows of padded queries are ignored (their outputs are never used), and so is the head
    dimension when it is 1.
    """
    if visible is None:
        return MASK_CAUSAL if causal else MASK_PADDING
    if visible.shape[1] != 1 and not bool((visible == visible[:, :1]).all()):
        return MASK_ARBITRARY
    vis = visible[:, 0]
    lq, lk = vis.shape[-2:]
    key_padding = vis[:, -1, :]  # the last query row sees every real key, causal or not
    real_rows = key_padding if lq == lk else torch.ones(vis.shape[0], lq, dtype=torch.bool, device=vis.device)
    padding_only = key_padding[:, None, :].expand_as(vis)
    if causal or not _rows_equal(vis, padding_only, real_rows):
        tril = torch.ones(lq, lk, dtype=torch.bool, device=vis.device).tril()
        if _rows_equal(vis, padding_only & tril, real_rows):
            return MASK_CAUSAL
        return MASK_ARBITRARY
    return MASK_PADDING


def _rows_equal(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> bool:
    return bool(((a == b) | ~rows[:, :, None]).all())
