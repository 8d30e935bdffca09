"""Triton N:M matmul: y = x·Wᵀ with W given as packed N:M (kept values + bit-packed positions).

Two kernels, chosen by the token count T:
- T > ``DECODE_MAX_TOKENS`` (compute-bound): each program decompresses a [BLOCK_O, BLOCK_G·M]
  tile of W in registers (N loads of values and positions per group instead of M dense loads) and
  feeds ``tl.dot``. Decompressing costs more than the tensor-core work it saves, so at large T this
  is slower than dense; finalize's measured selection does not choose it there.
- T ≤ ``DECODE_MAX_TOKENS`` (decoding, memory-bound): a GEMV-style kernel. Each program streams
  the packed values and positions of a tile of output rows (N/M of the dense bytes, plus the index
  bits) over a slice of the input dimension and gathers the matching x entries, which are small
  enough to stay in cache; it never materialises W. Programs are split over output rows and, when
  there are too few rows to fill the GPU, over K (split-K partial sums meet in an fp32 buffer).
Kernels are decorated on first use rather than at import, because Triton decides between
compiling and interpreting (TRITON_INTERPRET=1, how the CPU tests run it) at decoration time.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

# Imported on first use, not here: triton's own @jit helpers (tl.zeros, ...) are also decorated
# when triton is imported, so importing it before TRITON_INTERPRET is set would break the
# interpreter for the whole process. Triton is optional: kernels/ must import without it.
triton = None
tl = None


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _import_triton() -> None:
    global triton, tl
    if triton is None:
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _nm_matmul_kernel(
    x_ptr, v_ptr, idx_ptr, y_ptr,
    n_tok, n_out, n_in,
    stride_xt, stride_xi, stride_vo, stride_io, stride_yt, stride_yo,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok = offs_t < n_tok
    o_ok = offs_o < n_out
    PER_BYTE: tl.constexpr = 8 // BITS
    r = tl.arange(0, M)
    G = n_in // M
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        ok = o_ok[:, None] & (offs_g < G)[None, :]
        w3 = tl.zeros((BLOCK_O, BLOCK_G, M), dtype=tl.float32)
        for s in tl.static_range(N):
            k = offs_g * N + s
            v = tl.load(v_ptr + offs_o[:, None] * stride_vo + k[None, :], mask=ok, other=0.0)
            byte = tl.load(idx_ptr + offs_o[:, None] * stride_io + (k // PER_BYTE)[None, :], mask=ok, other=0)
            pos = (byte.to(tl.int32) >> ((k % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
            w3 += tl.where(pos[:, :, None] == r[None, None, :], v.to(tl.float32)[:, :, None], 0.0)
        w = tl.reshape(w3, (BLOCK_O, BLOCK_G * M))
        offs_i = g0 * M + tl.arange(0, BLOCK_G * M)
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_i[None, :] * stride_xi,
            mask=t_ok[:, None] & (offs_i < n_in)[None, :], other=0.0,
        )
        if IEEE:  # fp32 inputs, or the interpreter (its bf16 tl.dot returns garbage)
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :] * stride_yo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & o_ok[None, :])


def _nm_gemv_kernel(
    x_ptr, v_ptr, idx_ptr, y_ptr,
    n_tok, n_out, n_kept, k_per_split,
    stride_xt, stride_vo, stride_io, stride_yt,
    N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_t = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok = offs_t < n_tok
    o_ok = offs_o < n_out
    PER_BYTE: tl.constexpr = 8 // BITS
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, n_kept)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # index into the kept values of a row
        ok = o_ok[:, None] & (offs_k < k_end)[None, :]
        v = tl.load(v_ptr + offs_o[:, None] * stride_vo + offs_k[None, :], mask=ok, other=0.0)
        byte = tl.load(idx_ptr + offs_o[:, None] * stride_io + (offs_k // PER_BYTE)[None, :], mask=ok, other=0)
        pos = (byte.to(tl.int32) >> ((offs_k % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
        col = ((offs_k // N) * M)[None, :] + pos  # input column of each kept value
        xg = tl.load(
            x_ptr + offs_t[:, None, None] * stride_xt + col[None, :, :],
            mask=t_ok[:, None, None] & ok[None, :, :], other=0.0,
        )
        acc += tl.sum(xg.to(tl.float32) * v.to(tl.float32)[None, :, :], axis=2)
    y_ptrs = y_ptr + offs_t[:, None] * stride_yt + offs_o[None, :]
    y_ok = t_ok[:, None] & o_ok[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
    else:  # y is the fp32 split-K buffer
        tl.atomic_add(y_ptrs, acc, mask=y_ok)


def _nm_mask_kernel(
    w_ptr, mask_ptr, n_groups, n_cols, stride_grow, stride_col, stride_j,
    N: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr,
):
    # group q = (group row q // n_cols, column q % n_cols); its M entries are stride_j apart
    offs_q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    q_ok = offs_q < n_groups
    base = (offs_q // n_cols) * stride_grow + (offs_q % n_cols) * stride_col
    r = tl.arange(0, M)
    ptrs = base[:, None] + r[None, :] * stride_j
    a = tl.abs(tl.load(w_ptr + ptrs, mask=q_ok[:, None], other=0.0).to(tl.float32))
    # rank of entry i = entries that beat it: larger |w|, or equal |w| at an earlier position
    ai = a[:, :, None]
    aj = a[:, None, :]
    earlier = (r[None, None, :] < r[None, :, None])
    beats = (aj > ai) | ((aj == ai) & earlier)
    rank = tl.sum(beats.to(tl.int32), axis=2)
    tl.store(mask_ptr + ptrs, (rank < N).to(tl.uint8), mask=q_ok[:, None])


@functools.lru_cache(maxsize=4)
def _kernel(interpret: bool, name: str = "matmul"):
    del interpret  # part of the cache key only: decoration reads the environment
    _import_triton()
    kernels = {"matmul": _nm_matmul_kernel, "gemv": _nm_gemv_kernel, "mask": _nm_mask_kernel}
    return triton.jit(kernels[name])


def nm_mask(weight: Tensor, n: int, m: int, *, transposed: bool = False) -> Tensor:
    """The N:M mask of |W| in one pass (read W, write the mask): each program ranks a block of
    groups in registers. Same rule as ``runtime.nm.nm_mask`` (keep the n largest |w| of each group
    of m consecutive inputs; ties go to the earlier position). M must be a power of two; the
    pairwise ranking costs M² per group, so it suits the small M of N:M training (≤ 32)."""
    reason = supports(n, m)
    if reason:
        raise RuntimeError(f"triton N:M mask unavailable: {reason}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got {tuple(weight.shape)}")
    w = weight.detach().contiguous()
    mask = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    rows, cols = w.shape
    size_in = rows if transposed else cols
    if size_in % m:
        raise ValueError(f"input size {size_in} is not a multiple of m={m}")
    if not transposed:  # [out, in]: groups run along a row
        n_groups, n_cols, stride_grow, stride_col, stride_j = rows * cols // m, 1, m, 0, 1
    else:  # [in, out]: groups run down a column
        n_groups, n_cols, stride_grow, stride_col, stride_j = rows // m * cols, cols, m * cols, 1, cols
    block = max(1, min(256, 4096 // (m * m)))
    _kernel(interpreting(), "mask")[(-(-n_groups // block),)](
        w, mask.view(torch.uint8), n_groups, n_cols, stride_grow, stride_col, stride_j,
        N=n, M=m, BLOCK=block,
    )
    return mask


def supports(n: int, m: int) -> str | None:
    """None if the kernel handles n:m, else the reason it does not."""
    if not available():
        return "triton is not installed"
    if m & (m - 1):
        return f"M={m} is not a power of two (tile reshape needs it)"
    if m > 256:
        return f"M={m} > 256 (8-bit positions)"
    return None


DECODE_MAX_TOKENS = 64


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_config(tokens: int, out: int, n_kept: int, n: int, sms: int, *, block_k: int | None = None,
                block_o: int | None = None) -> dict[str, int]:
    """Tile sizes and split-K of the decode kernel. The [BLOCK_T, BLOCK_O, BLOCK_K] gather lives in
    registers, so its volume is capped (8192 fp32 over 4 warps); BLOCK_K spans whole groups and
    at least 64 kept values so a row's loads are ≥ 128-byte bf16 transactions; split-K is added
    until there are about four programs per SM. ``block_k`` / ``block_o`` override the defaults
    (benchmarks/gpu_nm.py sweeps them)."""
    block_t = min(_next_pow2(tokens), 16)
    block_k = max(block_k or 64, _next_pow2(n))
    block_o = block_o or max(1, min(64, 8192 // (block_t * block_k)))
    programs = -(-out // block_o) * -(-tokens // block_t)
    chunks = -(-n_kept // block_k)
    split = max(1, min(chunks, -(-4 * sms // programs)))
    k_per_split = -(-chunks // split) * block_k
    split = -(-n_kept // k_per_split)
    return {"BLOCK_T": block_t, "BLOCK_O": block_o, "BLOCK_K": block_k, "SPLIT": split,
            "k_per_split": k_per_split}


def gemv_sm_count(x: Tensor) -> int:
    return _sm_count(x.device.index or 0) if x.is_cuda and not interpreting() else 4


def nm_gemv(
    x: Tensor, values: Tensor, index_bytes: Tensor, n: int, m: int, in_features: int, bits: int,
    *, config: dict[str, int] | None = None,
) -> Tensor:
    """The decode kernel: y [T, out] = x [T, in] · Wᵀ for small T (see the module docstring)."""
    _check(x, n, m, in_features)
    tokens, out = x.shape[0], values.shape[0]
    n_kept = values.shape[1]
    if values.stride(1) != 1 or index_bytes.stride(1) != 1:
        raise ValueError("values and index_bytes must be row-contiguous")
    x = x.contiguous()
    cfg = dict(config or gemv_config(tokens, out, n_kept, n, gemv_sm_count(x)))
    k_per_split = cfg.pop("k_per_split")
    split = cfg["SPLIT"]
    y = torch.zeros(tokens, out, device=x.device, dtype=torch.float32) if split > 1 else (
        torch.empty(tokens, out, device=x.device, dtype=x.dtype))
    grid = (-(-out // cfg["BLOCK_O"]), split, -(-tokens // cfg["BLOCK_T"]))
    _kernel(interpreting(), "gemv")[grid](
        x, values, index_bytes, y,
        tokens, out, n_kept, k_per_split,
        x.stride(0), values.stride(0), index_bytes.stride(0), y.stride(0),
        N=n, M=m, BITS=bits, **cfg,
    )
    return y.to(x.dtype) if split > 1 else y


def _check(x: Tensor, n: int, m: int, in_features: int) -> None:
    reason = supports(n, m)
    if reason:
        raise RuntimeError(f"triton N:M kernel unavailable: {reason}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [T, {in_features}], got {tuple(x.shape)}")


def nm_linear(x: Tensor, values: Tensor, index_bytes: Tensor, n: int, m: int, in_features: int, bits: int) -> Tensor:
    """y [T, out] = x [T, in] · Wᵀ by the kernel that suits T: decode GEMV for T ≤ 64, else tiles."""
    if x.shape[0] <= DECODE_MAX_TOKENS:
        return nm_gemv(x, values, index_bytes, n, m, in_features, bits)
    return nm_matmul(x, values, index_bytes, n, m, in_features, bits)


def nm_matmul(
    x: Tensor, values: Tensor, index_bytes: Tensor, n: int, m: int, in_features: int, bits: int,
    *, block_t: int | None = None, block_o: int | None = None, block_i: int | None = None,
) -> Tensor:
    """y [T, out] = x [T, in] · Wᵀ, W packed as ``values`` [out, in·n/m] and ``index_bytes``."""
    _check(x, n, m, in_features)
    tokens, out = x.shape[0], values.shape[0]
    small = interpreting() or not x.is_cuda
    block_t = block_t or (16 if small else 128)
    block_o = block_o or (16 if small else 128)
    block_i = max(block_i or (32 if small else 64), m, 16)
    y = torch.empty(tokens, out, device=x.device, dtype=x.dtype)
    kernel = _kernel(interpreting())
    grid = (-(-tokens // block_t), -(-out // block_o))
    kernel[grid](
        x, values, index_bytes, y,
        tokens, out, in_features,
        x.stride(0), x.stride(1), values.stride(0), index_bytes.stride(0), y.stride(0), y.stride(1),
        N=n, M=m, BITS=bits, BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_G=block_i // m,
        IEEE=x.dtype == torch.float32 or interpreting(),
    )
    return y
