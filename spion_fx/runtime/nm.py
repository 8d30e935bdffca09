"""N:M masks from weight magnitudes, and the two straight-through weight functions that use them.

Groups are M consecutive *input* weights of one output row (ALGORITHMS.md §2), which is also the
layout sparse tensor cores and our packed format want. Weights stored transposed ([in, out], GPT-2
Conv1D) are handled by grouping along dim 0 instead, so masks always have the stored shape and the
forward is a plain elementwise product in storage layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spion_fx.kernels.nm import triton_nm


def nm_mask(weight: Tensor, n: int, m: int, *, transposed: bool = False, kernel: str = "auto") -> Tensor:
    """Boolean mask keeping the ``n`` largest |w| in every group of ``m`` consecutive inputs.

    ``weight`` is [out, in] (or [in, out] when ``transposed``); ``in`` must be a multiple of ``m``.
    Ties are broken by ``topk`` (deterministic for a given input), so every group keeps exactly n.
    On CUDA (M a power of two, ≤ 32) one Triton pass computes it instead — SR-STE recomputes masks every
    step by default, and abs + topk + scatter + copy there is several passes over every weight;
    its ties go to the earlier position. ``kernel="topk"`` forces the topk path (benchmarks).
    """
    if not 0 < n < m:
        raise ValueError(f"nm_mask: need 0 < n < m, got n={n}, m={m}")
    w = weight.detach()
    if transposed:
        w = w.t()
    out_f, in_f = w.shape
    if in_f % m:
        raise ValueError(f"nm_mask: input size {in_f} is not a multiple of m={m}")
    if (kernel == "auto" and w.is_cuda and m <= 32 and not triton_nm.interpreting()
            and triton_nm.supports(n, m) is None):
        return triton_nm.nm_mask(weight, n, m, transposed=transposed)
    groups = w.abs().reshape(out_f, in_f // m, m)
    keep = groups.topk(n, dim=-1, sorted=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=w.device)
    mask.scatter_(-1, keep, True)
    mask = mask.reshape(out_f, in_f)
    return mask.t() if transposed else mask


def is_nm(mask: Tensor, n: int, m: int, *, transposed: bool = False) -> bool:
    """True when every group of ``m`` consecutive inputs has exactly ``n`` kept entries."""
    mk = mask.t() if transposed else mask
    if mk.shape[1] % m:
        return False
    counts = (mk != 0).reshape(mk.shape[0], -1, m).sum(-1)
    return bool((counts == n).all())


class SRSTEWeight(torch.autograd.Function):
    """SR-STE: forward W⊙M; backward g + λ·(1−M)⊙W (the sparse-refined term pulls pruned weights
    towards zero so the mask stabilises).

    Mask application and the decay term are one Function: the forward is one product, the
    backward one ``addcmul`` (plus inverting the 1-byte mask) instead of the three full-size
    temporaries of ``g + λ·(~M)·W``, with fp32 results bit-identical to that expression. Products
    with the bool mask, not ``where``/``masked_fill``: on CPU those run 4-5x slower than a product
    (measured, 1 thread, [768 x 1024] fp32: where 6.4 ms, W·M 1.4 ms). Under torch.compile both
    fuse into neighbouring kernels. Nothing extra is saved: W is the parameter, M the site's
    buffer."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, lam: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.lam = lam
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask = ctx.saved_tensors
        if ctx.lam == 0.0:
            return grad, None, None
        return torch.addcmul(grad, weight, ~mask, value=ctx.lam), None, None


class STEMaskedWeight(torch.autograd.Function):
    """Forward W⊙M, backward the plain straight-through gradient g for every weight.

    Used by SDGF (the authors' ``StepDecay``) and by MST, whose topology update needs the dense
    gradient of inactive weights (it is masked before the optimizer step by the controller)."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class MDGFWeight(torch.autograd.Function):
    """MDGF mask decay: forward W⊙(M + (1−M)·α), backward plain STE.

    α is a 0-d tensor (a buffer updated in place outside the graph), so one traced graph serves
    every step of the decay."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, alpha: Tensor) -> Tensor:
        keep = mask.to(weight.dtype)
        return weight * (keep + (1 - keep) * alpha.to(weight.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def srste_weight(weight: Tensor, mask: Tensor, lam: float) -> Tensor:
    return SRSTEWeight.apply(weight, mask, lam)


def ste_masked_weight(weight: Tensor, mask: Tensor) -> Tensor:
    return STEMaskedWeight.apply(weight, mask)


def mdgf_weight(weight: Tensor, mask: Tensor, alpha: Tensor) -> Tensor:
    return MDGFWeight.apply(weight, mask, alpha)
