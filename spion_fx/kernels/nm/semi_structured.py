"""2:4 semi-structured weights on CUDA sparse tensor cores, by the two libraries PyTorch ships.

- ``cusparselt``: ``torch._cslt_compress`` once, then ``torch._cslt_sparse_mm(W_c, xᵀ)`` per call.
  cuSPARSELt wants the sparse operand first, so the product computed is W·xᵀ = yᵀ [out, T];
  ``transpose_result=True`` has the library write it back as y [T, out] (no extra transpose
  kernel), and the bias rides along as the per-row bias of W·xᵀ. The token count is padded to the
  library's minimum dense tile. The algorithm is searched once per token count (``search_alg``,
  cuSPARSELt's own timing search) by the caller.
- ``cutlass``: PyTorch's CUTLASS tensor subclass (``SparseSemiStructuredTensorCUTLASS``) built
  directly, rather than by flipping the global ``_FORCE_CUTLASS`` switch, so nothing else in the
  process changes backend; ``F.linear`` dispatches to its kernel.
Both take fp16/bf16 [out, in] weights that are exactly 2:4, out a multiple of 64 and in of 128.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("cusparselt", "cutlass")
_DENSE_MIN_COLS = 16  # token-count multiple the cuSPARSELt 16-bit kernels accept for the dense side


def unavailable(kind: str, weight: Tensor, n: int, m: int) -> str | None:
    """None when ``kind`` can compute with this weight, else why not."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    if not weight.is_cuda:
        return "not on CUDA"
    if (n, m) != (2, 4):
        return f"{n}:{m} is not 2:4"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype} is not fp16/bf16"
    out_f, in_f = weight.shape
    if out_f % 64 or in_f % 128:
        return f"shape {tuple(weight.shape)} below the semi-structured minimums (out%64, in%128)"
    if kind == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "cuSPARSELt is not available in this PyTorch build"
    return None


def compress(kind: str, weight: Tensor) -> Tensor:
    """The library's compressed form of a 2:4 [out, in] weight (raises where unsupported)."""
    if kind == "cusparselt":
        return torch._cslt_compress(weight.contiguous())
    from torch.sparse.semi_structured import SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUTLASS.from_dense(weight.contiguous())


def _dense_operand(x: Tensor) -> tuple[Tensor, int]:
    """xᵀ [in, T'] with T padded to the library's multiple, and T."""
    tokens = x.shape[0]
    pad = (-tokens) % _DENSE_MIN_COLS
    return (F.pad(x, (0, 0, 0, pad)).t() if pad else x.t()), tokens


def search_alg(compressed: Tensor, x: Tensor, bias: Tensor | None) -> int:
    """cuSPARSELt's fastest algorithm for this weight at x's token count (its own timing search;
    0, the library default, where the search is unavailable)."""
    xt, _ = _dense_operand(x)
    try:
        return int(torch._cslt_sparse_mm_search(compressed, xt, bias=bias, transpose_result=True))
    except (RuntimeError, AttributeError, TypeError):
        return 0


def linear(kind: str, x: Tensor, compressed: Tensor, bias: Tensor | None, out_features: int,
           alg_id: int = 0) -> Tensor:
    """y [T, out] = x [T, in] · Wᵀ + b with W in ``compress(kind, ·)`` form."""
    if kind == "cutlass":
        return F.linear(x, compressed, bias)
    xt, tokens = _dense_operand(x)
    y = torch._cslt_sparse_mm(compressed, xt, bias=bias, transpose_result=True, alg_id=alg_id)
    return y[:tokens] if y.shape[0] != tokens else y
