"""Triton kernels for SPION block-sparse attention (forward, backward, dropout mask).

Modelled on the Triton tutorials' fused attention (FlashAttention-2): one program per
(query tile, head, batch) walks only the kv blocks its pattern row lists
(``kv_num_blocks``/``kv_indices``); the backward pass walks the transposed layout
(``q_num_blocks``/``q_indices``) for dK/dV, so every output tile has exactly one writer and the
result is deterministic (no atomics).

Conventions (shared with the CPU kernels and the float64 reference):

* q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (any strides), ``H % Hkv == 0`` (GQA: query head
  h reads kv head ``h // (H // Hkv)``; K/V are never repeated).
* Layout tensors have a leading head dim H' in {1, H}; H' = 1 is passed with head stride 0, so a
  shared pattern costs nothing per head.
* ``lse`` is float32 ``[B, H, Lq]``: natural-log log-sum-exp of the scaled, masked scores. A row
  that sees no key gets out = 0 and lse = -inf.
* causal: key j is visible to query i iff j <= i (top-left aligned).
* key_padding_mask: bool ``[B, Lk]``, True = real token.
* dropout: keep element (b, h, i, j) iff ``tl.rand(seed, ((b*H + h)*Lq + i)*Lk + j) >= p``;
  kept probabilities are scaled by 1/(1-p). :func:`dropout_keep_mask` materialises that mask.
* compat_spion: the original SPION kernels' quirk -- scores pruned by the *block pattern* count as
  logit 0 in the softmax denominator instead of -inf (they still add nothing to the output).
  Keys removed by causality or key padding stay -inf.

Internally the softmax runs in the log2 domain (``exp2``, scores pre-multiplied by log2(e)) in
fp32; the stored lse is converted back to natural log.

Compilation and launch (what makes a pattern switch cheap and small shapes fast):

* Nothing about the pattern is a compile-time constant: the walk over a layout row is bounded by
  the row's own ``kv_num_blocks`` at run time, and the diagonal/edge split of a row is counted in
  fixed-width chunks. A new pattern, or another layer's pattern, reuses the compiled kernels.
* Tiles come from a fixed table keyed by (kernel, head dim, dtype, pattern block), not from
  autotuning, so the first call after a switch compiles at most one kernel per variant and times
  nothing. The only shape rule: when the grid would leave SMs idle (short sequences), query tiles
  (kv tiles for dK/dV) drop to 64 rows inside the pattern block, doubling the programs.
  ``SPION_TRITON_AUTOTUNE=1`` (read at import) swaps the table for autotuning keyed by the
  sequence lengths too -- an offline tool for finding table entries, not for training runs.
* The launchers never read device memory on the host: no ``.item()``, no host-side layout
  preprocessing; a CPU seed is passed by value (no host-to-device copy, which PyTorch performs
  synchronously for pageable memory).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Read when this module is imported, as triton.jit does: the kernels below are either compiled
# JITFunctions or interpreter functions for the whole process.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE: bool = os.environ.get("SPION_TRITON_AUTOTUNE", "0") == "1" and not INTERPRET

LOG2E: float = 1.4426950408889634
LN2: float = 0.6931471805599453

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_PATTERN_BLOCKS = (16, 32, 64, 128)
MAX_HEAD_DIM = 256

# Width of the vector loads that count a layout row's entries below a limit; a constant, so the
# longest row of a pattern never becomes a compile-time parameter. (Compiled kernels may read a
# global only as a tl.constexpr; the interpreter would accept the plain int.)
ROW_CHUNK = 32
_ROW_CHUNK = tl.constexpr(ROW_CHUNK)

# Seeds are split into two non-negative int32 halves so that every seed launches the same
# specialisation (Triton types and specialises integer arguments by value).
_SEED_BITS = 31

# Integer arguments Triton must not specialise on. By default it compiles a variant per integer
# argument equal to 1 or divisible by 16; the layout strides carry the pattern's longest row
# (kv_indices is [B', H', nQB, maxK]; the batch strides are 0 for a layout shared by the batch)
# and the seed halves change every step, so either would compile
# new kernels for a new pattern or a new seed.
UNSPECIALISED: dict[str, tuple[str, ...]] = {
    "fwd": ("stride_numb", "stride_numh", "stride_numm", "stride_idxb", "stride_idxh",
            "stride_idxm", "seed_lo", "seed_hi"),
    "dq": ("stride_numb", "stride_numh", "stride_numm", "stride_idxb", "stride_idxh",
           "stride_idxm", "seed_lo", "seed_hi"),
    "dkdv": ("stride_numb", "stride_numh", "stride_numn", "stride_idxb", "stride_idxh",
             "stride_idxn", "seed_lo", "seed_hi"),
}


# --------------------------------------------------------------------------------------------
# Small device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The Triton interpreter computes bf16 x bf16 dots incorrectly (numpy has no bf16); the
    # launcher sets UPCAST only there, so the GPU path always runs native tensor-core dots.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dropout_keep(seed, rng_base, offs_row, offs_col, Lk, dropout_p):
    # Philox counter = flat element index of (b, h, i, j) in a [B, H, Lq, Lk] tensor, int64 so
    # that long sequences (B*H*L^2 > 2^32) never reuse a counter.
    offs = rng_base + offs_row.to(tl.int64) * Lk + offs_col.to(tl.int64)
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _seed(SEED, seed_lo, seed_hi, HAS_DROPOUT: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
    if HAS_DROPOUT:
        if SEED_IN_MEMORY:
            # The same 62 bits the host path passes (and dropout_keep_mask uses).
            seed = tl.load(SEED) & 4611686018427387903
        else:
            seed = (seed_hi.to(tl.int64) << 31) | seed_lo.to(tl.int64)
    else:
        seed = 0
    return seed


@triton.jit
def _row_counts(idx_row, n, full_limit, end_limit, CHUNK: tl.constexpr):
    # Entries of a layout row are ascending, so "how many are < limit" is the length of the
    # prefix that satisfies it. Counted CHUNK entries at a time up to the row's run-time length:
    # one vector load per chunk (rows of up to CHUNK blocks take one), and no constant that
    # depends on the pattern.
    n_full = 0
    n_end = 0
    for start in range(0, n, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        idx = tl.load(idx_row + offs, mask=offs < n, other=2147483647)
        n_full += tl.sum((idx < full_limit).to(tl.int32), axis=0)
        n_end += tl.sum((idx < end_limit).to(tl.int32), axis=0)
    return n_full, n_end


@triton.jit
def _lse2(LSE_row, offs_m, m_ok):
    # Saved natural-log lse -> log2 units; rows past Lq and rows that saw no key (-inf) become
    # +inf, which makes P = exp2(s - lse2) exactly 0 there without a score mask.
    lse = tl.load(LSE_row + offs_m, mask=m_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, n_vis,
    q, kT_ptrs, v_ptrs, KPM_row, idx_row,
    seed, rng_base, dropout_p, qk_scale,
    lo, hi, Lk,
    stride_kn, stride_vn,
    offs_m, offs_j, d_ok,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, COMPAT: tl.constexpr, EVEN_D: tl.constexpr,
    PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Pattern blocks may be larger than the kv tile: iterate a flat (list position, sub-tile)
    # index so the loop body stays a single pipelinable block. kT_ptrs/v_ptrs point at kv row 0;
    # a tile is one scalar offset away, so the loop does no per-element address arithmetic.
    # Unmasked calls (MASKED=False) only see tiles fully inside Lk and left of the causal
    # diagonal: their loads and scores need no mask at all.
    SUB: tl.constexpr = PATTERN_BLOCK // BLOCK_N
    for it in range(lo * SUB, hi * SUB):
        kb = tl.load(idx_row + it // SUB)
        start_n = kb * PATTERN_BLOCK + (it % SUB) * BLOCK_N
        offs_n = start_n + offs_j
        if MASKED:
            n_ok = offs_n < Lk
            kT = tl.load(kT_ptrs + start_n * stride_kn, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs + start_n * stride_kn)
        else:
            kT = tl.load(kT_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)
        qk = _mm(q, kT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        qk = qk * qk_scale
        if MASKED or HAS_KPM:
            visible = offs_m[:, None] >= 0
            if MASKED:
                visible = visible & n_ok[None, :]
                if IS_CAUSAL:
                    visible = visible & (offs_m[:, None] >= offs_n[None, :])
            if HAS_KPM:
                if MASKED:
                    real = tl.load(KPM_row + offs_n, mask=n_ok, other=0) != 0
                else:
                    real = tl.load(KPM_row + offs_n) != 0
                visible = visible & real[None, :]
            qk = tl.where(visible, qk, float("-inf"))
            if COMPAT:
                n_vis += tl.sum(visible.to(tl.float32), axis=1)
            m_ij = tl.maximum(m_i, tl.max(qk, axis=1))
            # A fully masked row keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            if COMPAT:
                n_vis += BLOCK_N
            m_ij = tl.maximum(m_i, tl.max(qk, axis=1))
            m_sub = m_ij
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        # The denominator uses the undropped probabilities: dropout acts after the softmax.
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=d_ok[None, :], other=0.0)
        acc = _mm(p.to(v.dtype), v, acc, UPCAST, PRECISION)
        m_i = m_ij
    return acc, l_i, m_i, n_vis


@triton.jit(do_not_specialize=UNSPECIALISED["fwd"])
def _fwd_kernel(
    Q, K, V, Out, Lse,
    KV_NUM, KV_IDX, KPM, SEED, N_ALLOWED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh,
    stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh, stride_idxm,
    stride_kpmb,
    H, H_KV, Lq, Lk,
    qk_scale, dropout_p, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr, COMPAT: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // (H // H_KV)
    start_m = pid_m * BLOCK_M
    # BLOCK_M may be smaller than the pattern block: several programs then share one layout row.
    qb = start_m // PATTERN_BLOCK

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM

    b64 = off_b.to(tl.int64)
    Q_head = Q + b64 * stride_qb + off_h.to(tl.int64) * stride_qh
    K_head = K + b64 * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_head = V + b64 * stride_vb + off_hkv.to(tl.int64) * stride_vh
    KPM_row = KPM + b64 * stride_kpmb
    kT_ptrs = K_head + offs_j[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = V_head + offs_j[:, None] * stride_vn + offs_d[None, :] * stride_vd

    # Layout row of this query tile; head stride 0 when the pattern is shared by all heads.
    n_blocks = tl.load(KV_NUM + b64 * stride_numb + off_h * stride_numh + qb * stride_numm)
    idx_row = KV_IDX + b64 * stride_idxb + off_h * stride_idxh + qb * stride_idxm
    # Blocks strictly left of the diagonal block and fully inside Lk need no score mask; with
    # ascending indices they are a prefix [0, n_full) of the row, the straddling ones follow.
    if IS_CAUSAL or not EVEN_K:
        full_limit = Lk // PATTERN_BLOCK
        end_limit = tl.cdiv(Lk, PATTERN_BLOCK)
        if IS_CAUSAL:
            full_limit = tl.minimum(full_limit, qb)
            end_limit = tl.minimum(end_limit, qb + 1)
        n_full, n_end = _row_counts(idx_row, n_blocks, full_limit, end_limit, _ROW_CHUNK)
    else:  # non-causal and Lk a multiple of the block: every listed block is full
        n_full = n_blocks
        n_end = n_blocks

    seed = _seed(SEED, seed_lo, seed_hi, HAS_DROPOUT, SEED_IN_MEMORY)
    rng_base = ((b64 * H + off_h) * Lq) * Lk

    q = tl.load(
        Q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_vis = tl.zeros([BLOCK_M], dtype=tl.float32)

    acc, l_i, m_i, n_vis = _fwd_inner(
        acc, l_i, m_i, n_vis, q, kT_ptrs, v_ptrs, KPM_row, idx_row,
        seed, rng_base, dropout_p, qk_scale, 0, n_full, Lk,
        stride_kn, stride_vn, offs_m, offs_j, d_ok,
        False, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, COMPAT, HEAD_DIM == BLOCK_D,
        PATTERN_BLOCK, BLOCK_N, UPCAST, PRECISION,
    )
    acc, l_i, m_i, n_vis = _fwd_inner(
        acc, l_i, m_i, n_vis, q, kT_ptrs, v_ptrs, KPM_row, idx_row,
        seed, rng_base, dropout_p, qk_scale, n_full, n_end, Lk,
        stride_kn, stride_vn, offs_m, offs_j, d_ok,
        True, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, COMPAT, HEAD_DIM == BLOCK_D,
        PATTERN_BLOCK, BLOCK_N, UPCAST, PRECISION,
    )

    if COMPAT:
        # Pruned-but-allowed keys contribute exp(0 - m) each to the denominator; fold them in
        # with a final rescale so the running max also covers the logit 0.
        n_allowed = tl.load(N_ALLOWED + b64 * Lq + offs_m, mask=m_ok, other=0).to(tl.float32)
        extra = tl.maximum(n_allowed - n_vis, 0.0)
        m_new = tl.where(extra > 0, tl.maximum(m_i, 0.0), m_i)
        m_new_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new_sub)
        l_i = l_i * alpha + extra * tl.math.exp2(-m_new_sub)
        acc = acc * alpha[:, None]
        m_i = m_new

    has_key = l_i > 0.0
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(has_key, (m_fin + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l * (1.0 / (1.0 - dropout_p))
    out = acc * inv_l[:, None]

    tl.store(Lse + b64 * stride_lb + off_h * stride_lh + offs_m, lse, mask=m_ok)
    O_head = Out + b64 * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(
        O_head + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,
    qT_ptrs, do_ptrs, LSE_row, DELTA_row, idx_row,
    seed, rng_base, dropout_p, qk_scale,
    lo, hi, Lq, Lk,
    stride_qm, stride_dom,
    offs_n, offs_i, d_ok,
    MASKED: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_Q: tl.constexpr, EVEN_D: tl.constexpr,
    PATTERN_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Works on transposed tiles (kv rows x q columns) so dK and dV accumulate with plain dots.
    # qT_ptrs/do_ptrs point at query row 0; a tile is one scalar offset away. With EVEN_Q (Lq a
    # multiple of the pattern block) no listed q tile crosses Lq and the loads need no row mask.
    SUB: tl.constexpr = PATTERN_BLOCK // BLOCK_M
    for it in range(lo * SUB, hi * SUB):
        qb = tl.load(idx_row + it // SUB)
        start_m = qb * PATTERN_BLOCK + (it % SUB) * BLOCK_M
        offs_m = start_m + offs_i
        m_ok = offs_m < Lq
        if EVEN_Q and EVEN_D:
            qT = tl.load(qT_ptrs + start_m * stride_qm)
            do = tl.load(do_ptrs + start_m * stride_dom)
        else:
            qT = tl.load(qT_ptrs + start_m * stride_qm, mask=m_ok[None, :] & d_ok[:, None],
                         other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dom, mask=m_ok[:, None] & d_ok[None, :],
                         other=0.0)
        lse2 = _lse2(LSE_row, offs_m, m_ok)
        qkT = _mm(k, qT, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), UPCAST, PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[None, :], offs_n[:, None], Lk, dropout_p)
            scale_keep = 1.0 / (1.0 - dropout_p)
            pT_drop = tl.where(keep, pT * scale_keep, 0.0)
        else:
            pT_drop = pT
        dv = _mm(pT_drop.to(do.dtype), do, dv, UPCAST, PRECISION)
        dpT = _mm(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32),
                  UPCAST, PRECISION)
        if HAS_DROPOUT:
            dpT = tl.where(keep, dpT * scale_keep, 0.0)
        delta = tl.load(DELTA_row + offs_m, mask=m_ok, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        dk = _mm(dsT.to(qT.dtype), tl.trans(qT), dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=UNSPECIALISED["dkdv"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, Delta,
    Q_NUM, Q_IDX, KPM, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_numb, stride_numh, stride_numn, stride_idxb, stride_idxh, stride_idxn,
    stride_kpmb,
    H, H_KV, Lq, Lk,
    sm_scale, qk_scale, dropout_p, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr, EVEN_Q: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    off_hkv = tl.program_id(1)
    off_b = tl.program_id(2)
    group = H // H_KV
    start_n = pid_n * BLOCK_N
    kb = start_n // PATTERN_BLOCK

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Lk
    d_ok = offs_d < HEAD_DIM
    kv_mask = n_ok[:, None] & d_ok[None, :]

    b64 = off_b.to(tl.int64)
    k = tl.load(K + b64 * stride_kb + off_hkv.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + off_hkv.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    seed = _seed(SEED, seed_lo, seed_hi, HAS_DROPOUT, SEED_IN_MEMORY)

    # GQA: this kv head's gradient is the sum over its query heads, accumulated in registers in a
    # fixed order -- deterministic, and K/V are loaded once for the whole group.
    for g in range(0, group):
        off_h = off_hkv * group + g
        h64 = off_h.to(tl.int64)
        n_blocks = tl.load(Q_NUM + b64 * stride_numb + off_h * stride_numh + kb * stride_numn)
        idx_row = Q_IDX + b64 * stride_idxb + off_h * stride_idxh + kb * stride_idxn
        if IS_CAUSAL:
            # q blocks above the diagonal see nothing of this kv block (skip), the diagonal block
            # needs the causal mask, blocks below it none.
            lo, mid = _row_counts(idx_row, n_blocks, kb, kb + 1, _ROW_CHUNK)
        else:
            lo = 0
            mid = 0
        qT_ptrs = (Q + b64 * stride_qb + h64 * stride_qh
                   + offs_i[None, :] * stride_qm + offs_d[:, None] * stride_qd)
        do_ptrs = (DO + b64 * stride_dob + h64 * stride_doh
                   + offs_i[:, None] * stride_dom + offs_d[None, :] * stride_dod)
        row_off = (b64 * H + off_h) * Lq
        rng_base = row_off * Lk
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, qT_ptrs, do_ptrs, LSE + row_off, Delta + row_off, idx_row,
            seed, rng_base, dropout_p, qk_scale, lo, mid, Lq, Lk,
            stride_qm, stride_dom, offs_n, offs_i, d_ok,
            True, HAS_DROPOUT, EVEN_Q, HEAD_DIM == BLOCK_D, PATTERN_BLOCK, BLOCK_M,
            UPCAST, PRECISION,
        )
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, qT_ptrs, do_ptrs, LSE + row_off, Delta + row_off, idx_row,
            seed, rng_base, dropout_p, qk_scale, mid, n_blocks, Lq, Lk,
            stride_qm, stride_dom, offs_n, offs_i, d_ok,
            False, HAS_DROPOUT, EVEN_Q, HEAD_DIM == BLOCK_D, PATTERN_BLOCK, BLOCK_M,
            UPCAST, PRECISION,
        )

    dk = dk * sm_scale
    if HAS_KPM:
        # Padded keys got P computed without their mask; each key's gradient depends only on its
        # own column, so zeroing those rows here is exact and keeps the inner loop mask-free.
        real = tl.load(KPM + b64 * stride_kpmb + offs_n, mask=n_ok, other=0) != 0
        dk = tl.where(real[:, None], dk, 0.0)
        dv = tl.where(real[:, None], dv, 0.0)
    tl.store(DK + b64 * stride_dkb + off_hkv.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + off_hkv.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta,
    kT_ptrs, vT_ptrs, KPM_row, idx_row,
    seed, rng_base, dropout_p, qk_scale,
    lo, hi, Lk,
    stride_kn, stride_vn,
    offs_m, offs_j, d_ok,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
    PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Same walk as the forward (_fwd_inner): unmasked calls see only tiles inside Lk and left of
    # the causal diagonal.
    SUB: tl.constexpr = PATTERN_BLOCK // BLOCK_N
    for it in range(lo * SUB, hi * SUB):
        kb = tl.load(idx_row + it // SUB)
        start_n = kb * PATTERN_BLOCK + (it % SUB) * BLOCK_N
        offs_n = start_n + offs_j
        if MASKED:
            n_ok = offs_n < Lk
            kT = tl.load(kT_ptrs + start_n * stride_kn, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            vT = tl.load(vT_ptrs + start_n * stride_vn, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs + start_n * stride_kn)
            vT = tl.load(vT_ptrs + start_n * stride_vn)
        else:
            kT = tl.load(kT_ptrs + start_n * stride_kn, mask=d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs + start_n * stride_vn, mask=d_ok[:, None], other=0.0)
        qk = _mm(q, kT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED or HAS_KPM:
            visible = offs_m[:, None] >= 0
            if MASKED:
                visible = visible & n_ok[None, :]
                if IS_CAUSAL:
                    visible = visible & (offs_m[:, None] >= offs_n[None, :])
            if HAS_KPM:
                if MASKED:
                    real = tl.load(KPM_row + offs_n, mask=n_ok, other=0) != 0
                else:
                    real = tl.load(KPM_row + offs_n) != 0
                visible = visible & real[None, :]
            p = tl.where(visible, p, 0.0)
        dp = _mm(do, vT, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST, PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = _mm(ds.to(kT.dtype), tl.trans(kT), dq, UPCAST, PRECISION)
    return dq


@triton.jit(do_not_specialize=UNSPECIALISED["dq"])
def _bwd_dq_kernel(
    Q, K, V, Out, DO, DQ, LSE, Delta,
    KV_NUM, KV_IDX, KPM, SEED,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_numb, stride_numh, stride_numm, stride_idxb, stride_idxh, stride_idxm,
    stride_kpmb,
    H, H_KV, Lq, Lk,
    sm_scale, qk_scale, dropout_p, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Launched before the dK/dV kernel: besides dQ it writes delta_i = rowsum(dO * O) for its
    # own rows (= sum_j P_ij dP_ij, also with dropout since O is the dropped output), which it
    # needs itself and the dK/dV kernel reads afterwards -- one launch fewer than a separate
    # preprocessing kernel, and every delta still has exactly one writer.
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // (H // H_KV)
    start_m = pid_m * BLOCK_M
    qb = start_m // PATTERN_BLOCK

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < HEAD_DIM
    mask_md = m_ok[:, None] & d_ok[None, :]

    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    K_head = K + b64 * stride_kb + off_hkv.to(tl.int64) * stride_kh
    V_head = V + b64 * stride_vb + off_hkv.to(tl.int64) * stride_vh
    KPM_row = KPM + b64 * stride_kpmb
    kT_ptrs = K_head + offs_j[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_ptrs = V_head + offs_j[None, :] * stride_vn + offs_d[:, None] * stride_vd

    n_blocks = tl.load(KV_NUM + b64 * stride_numb + off_h * stride_numh + qb * stride_numm)
    idx_row = KV_IDX + b64 * stride_idxb + off_h * stride_idxh + qb * stride_idxm
    if IS_CAUSAL or not EVEN_K:
        full_limit = Lk // PATTERN_BLOCK
        end_limit = tl.cdiv(Lk, PATTERN_BLOCK)
        if IS_CAUSAL:
            full_limit = tl.minimum(full_limit, qb)
            end_limit = tl.minimum(end_limit, qb + 1)
        n_full, n_end = _row_counts(idx_row, n_blocks, full_limit, end_limit, _ROW_CHUNK)
    else:
        n_full = n_blocks
        n_end = n_blocks

    seed = _seed(SEED, seed_lo, seed_hi, HAS_DROPOUT, SEED_IN_MEMORY)
    row_off = (b64 * H + off_h) * Lq
    rng_base = row_off * Lk

    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask_md, other=0.0)
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask_md, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + row_off + offs_m, delta, mask=m_ok)
    lse2 = _lse2(LSE + row_off, offs_m, m_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, KPM_row, idx_row,
        seed, rng_base, dropout_p, qk_scale, 0, n_full, Lk,
        stride_kn, stride_vn, offs_m, offs_j, d_ok,
        False, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, HEAD_DIM == BLOCK_D, PATTERN_BLOCK, BLOCK_N,
        UPCAST, PRECISION,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, KPM_row, idx_row,
        seed, rng_base, dropout_p, qk_scale, n_full, n_end, Lk,
        stride_kn, stride_vn, offs_m, offs_j, d_ok,
        True, IS_CAUSAL, HAS_KPM, HAS_DROPOUT, HEAD_DIM == BLOCK_D, PATTERN_BLOCK, BLOCK_N,
        UPCAST, PRECISION,
    )
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _dropout_mask_kernel(
    Mask, SEED, Lq, Lk, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Same counter formula as the attention kernels, for tests and reference computations.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(SEED)
    rng_base = bh * Lq * Lk
    keep = _dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], Lk, dropout_p)
    ptrs = Mask + rng_base + offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m < Lq)[:, None] & (offs_n < Lk)[None, :])


# --------------------------------------------------------------------------------------------
# Tile configuration: a fixed table (GPU), a small fixed tile (interpreter)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Tiles and launch parameters of one kernel.

    ``block_m`` is the query tile, ``block_n`` the kv tile, in every kernel (the dK/dV kernel
    keeps a ``block_n`` kv tile resident and streams ``block_m`` query tiles).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (kernel, head-dim bucket, 16-bit dtype?) -> tiles for a 128 pattern block and a grid that
# fills the GPU. Chosen on sm_90 by compiling every entry ahead of time (Triton to cubin, no GPU
# needed) and keeping the largest tiles that ptxas fits in registers without spilling, starting
# from the Triton tutorial's split (dK/dV: small query tiles streamed past a resident 128-row
# kv tile; dQ the reverse) and FlexAttention's sm90 defaults. 128x128 forward tiles need 8 warps
# (with 4 they spill); fp32 operands (TF32 dots) are twice as wide, so fp32 keeps small tiles.
# Speed on a GPU is not yet measured: benchmarks/gpu_suite.py is where these get judged.
_TILE_TABLE: dict[tuple[str, int, bool], TileConfig] = {
    ("fwd", 64, True): TileConfig(128, 128, 8, 3),
    ("fwd", 128, True): TileConfig(128, 64, 8, 3),
    ("fwd", 256, True): TileConfig(64, 32, 4, 3),
    ("dq", 64, True): TileConfig(128, 64, 8, 3),
    ("dq", 128, True): TileConfig(128, 64, 8, 3),
    ("dq", 256, True): TileConfig(64, 32, 8, 2),
    ("dkdv", 64, True): TileConfig(64, 128, 8, 3),
    ("dkdv", 128, True): TileConfig(32, 128, 8, 3),
    ("dkdv", 256, True): TileConfig(32, 32, 8, 2),
    ("fwd", 64, False): TileConfig(64, 32, 8, 2),
    ("fwd", 128, False): TileConfig(64, 32, 8, 2),
    ("fwd", 256, False): TileConfig(32, 32, 8, 2),
    ("dq", 64, False): TileConfig(64, 32, 8, 2),
    ("dq", 128, False): TileConfig(64, 32, 8, 2),
    ("dq", 256, False): TileConfig(32, 32, 8, 2),
    ("dkdv", 64, False): TileConfig(32, 32, 8, 2),
    ("dkdv", 128, False): TileConfig(16, 32, 8, 2),
    ("dkdv", 256, False): TileConfig(16, 32, 8, 2),
}
# Attention dropout draws a Philox number per score in registers: the 16-bit tiles that would
# spill with it are narrowed (128x128 forward with dropout spilled 4.7 KB a thread).
_DROPOUT_TILES: dict[tuple[str, int], TileConfig] = {
    ("fwd", 64): TileConfig(128, 64, 8, 3),
    ("dkdv", 64): TileConfig(32, 128, 8, 3),
    ("dkdv", 128): TileConfig(32, 64, 8, 3),
}

# A grid with fewer programs than this many per SM leaves SMs idle or runs one wave with a long
# tail; 16-bit tiles along the split dimension then halve to 64 rows to double the programs. At
# B=1, H=16, L=2048, block 128 the forward has 256 programs for 132 SMs (H100/H200).
PROGRAMS_PER_SM = 2
SMALL_GRID_TILE = 64

# Fixed tile under the interpreter: it runs every program in numpy, so big tiles only cost time.
# 16 is the smallest tile tl.dot accepts and divides every supported pattern block.
_INTERPRET_TILES = TileConfig(16, 16, 4, 1)
_forced_tiles: dict[str, TileConfig] = {}


def _dim_bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def tile_config(
    kernel: str, head_dim: int, dtype: torch.dtype, pattern_block: int, programs: int,
    sm_count: int, dropout: bool = False,
) -> TileConfig:
    """Tiles the launchers use for ``kernel`` in {"fwd", "dq", "dkdv"}: forced tiles if any
    (:func:`forced_tiles`), the interpreter's fixed tile, else :func:`table_tiles`."""
    if kernel not in ("fwd", "dq", "dkdv"):
        raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkdv', got {kernel!r}")
    if kernel in _forced_tiles:
        return _forced_tiles[kernel]
    if INTERPRET:
        return _INTERPRET_TILES
    return table_tiles(kernel, head_dim, dtype, pattern_block, programs, sm_count, dropout)


def table_tiles(
    kernel: str, head_dim: int, dtype: torch.dtype, pattern_block: int, programs: int,
    sm_count: int, dropout: bool = False,
) -> TileConfig:
    """The compiled kernels' tiles: the table entry, adjusted to the pattern block and grid.

    programs: batch x heads x cdiv(L, 128) (kv heads and Lk for "dkdv"), the grid at 128-row
    tiles. A pure function of its arguments (tests call it without a GPU).
    """
    bucket, sixteen = _dim_bucket(head_dim), dtype != torch.float32
    cfg = _TILE_TABLE[(kernel, bucket, sixteen)]
    if dropout and sixteen:
        cfg = _DROPOUT_TILES.get((kernel, bucket), cfg)
    if pattern_block <= 32:
        # Tiles as small as the block: little register pressure, one warpgroup.
        return TileConfig(min(cfg.block_m, pattern_block), min(cfg.block_n, pattern_block), 4, 2)
    bm, bn = min(cfg.block_m, pattern_block), min(cfg.block_n, pattern_block)
    warps = cfg.num_warps
    split = bn if kernel == "dkdv" else bm  # query tiles for fwd/dq, kv tiles for dK/dV
    if sixteen and split > SMALL_GRID_TILE and programs * (128 // split) < PROGRAMS_PER_SM * sm_count:
        split = SMALL_GRID_TILE
        if kernel == "dkdv":
            bn = split
        else:
            bm = split
    if kernel != "dkdv" and sixteen and bucket == 64 and bm <= 64:
        warps = 4  # one warpgroup per 64-row query tile (wider heads need 8 warps' registers)
    return TileConfig(bm, bn, warps, cfg.num_stages)


@contextlib.contextmanager
def forced_tiles(**tiles: TileConfig) -> Iterator[None]:
    """Use these tiles for the named kernels ("fwd", "dq", "dkdv") inside the block.

    For tests and tuning experiments: lets the interpreter run query tiles smaller than the
    pattern block, or kv tiles larger than the query tile, which its fixed 16x16 never does.
    """
    unknown = set(tiles) - {"fwd", "dq", "dkdv"}
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; use fwd, dq, dkdv")
    saved = dict(_forced_tiles)
    _forced_tiles.update(tiles)
    try:
        yield
    finally:
        _forced_tiles.clear()
        _forced_tiles.update(saved)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


# ---- optional autotuning (SPION_TRITON_AUTOTUNE=1): an offline tool for revising the table ----


def _prune_tiles(configs, named_args, **kwargs):
    """Keep configs whose tiles divide the pattern block (a tile never spans two blocks)."""
    pattern = named_args.get("PATTERN_BLOCK", kwargs.get("PATTERN_BLOCK"))
    head_dim = named_args.get("BLOCK_D", kwargs.get("BLOCK_D"))
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if pattern % bm or pattern % bn:
            continue
        if head_dim > 128 and bm * bn > 64 * 64:
            continue
        kept.append(cfg)
    if not kept:  # pattern block 16: only the 16x16 tile fits
        kept = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2)]
    return kept


def _autotuned(kernel_fn, specs: list[tuple[int, int, int, int]]):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in specs]
    # The sequence lengths are in the key: tiles that suit L=2048 need not suit L=16384.
    key = ["HEAD_DIM", "PATTERN_BLOCK", "IS_CAUSAL", "HAS_KPM", "HAS_DROPOUT", "H_KV", "Lq", "Lk"]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune_tiles})(
        kernel_fn
    )


if AUTOTUNE:  # pragma: no cover - needs a GPU
    _fwd_launch = _autotuned(_fwd_kernel, [
        (128, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
        (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2),
    ])
    _dkdv_launch = _autotuned(_bwd_dkdv_kernel, [
        (64, 128, 8, 3), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
        (16, 32, 4, 2),
    ])
    _dq_launch = _autotuned(_bwd_dq_kernel, [
        (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3),
        (32, 16, 4, 2),
    ])
else:
    _fwd_launch = _fwd_kernel
    _dkdv_launch = _bwd_dkdv_kernel
    _dq_launch = _bwd_dq_kernel


def _launch(kernel, kind: str, grid_rows: int, others: tuple[int, int], tiles: TileConfig,
            args: tuple, constexprs: dict) -> None:
    """Launch with the table's tiles, or let the autotuner pick (grid from its choice)."""
    if AUTOTUNE:  # pragma: no cover - needs a GPU
        split = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        kernel[lambda meta: (_cdiv(grid_rows, meta[split]), *others)](*args, **constexprs)
        return
    split = tiles.block_n if kind == "dkdv" else tiles.block_m
    kernel[(_cdiv(grid_rows, split), *others)](
        *args, **constexprs, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a ConstexprFunction: ~2 us a call on the host, here called per launch.
    return -(-a // b)


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor, q_indices: torch.Tensor,
    block_size: int, key_padding_mask: torch.Tensor | None,
    dropout_p: float, seed: torch.Tensor,
) -> None:
    # Shape/dtype checks only: nothing here may synchronise with the device. Runs on every
    # launch, so it reads each shape once and builds messages only on failure: at short
    # sequences the host time per call is what the GPU waits for.
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise ValueError("q, k, v must be 4-D [batch, heads, seq_len, head_dim]; got "
                         f"{tuple(qs)}, {tuple(ks)}, {tuple(vs)}")
    dtype = q.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q.dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"q, k, v must share a dtype, got {dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    b, h, lq, d = qs
    h_kv, lk = ks[1], ks[2]
    if ks != vs or ks[0] != b or ks[3] != d:
        raise ValueError(f"k and v must be [batch={b}, kv_heads, kv_len, head_dim={d}], got "
                         f"{tuple(ks)} and {tuple(vs)}")
    if h % h_kv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({h_kv})")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {d}")
    if block_size not in SUPPORTED_PATTERN_BLOCKS:
        raise ValueError(f"block_size must be one of {SUPPORTED_PATTERN_BLOCKS}, got {block_size}")
    for name, num, idx, rows in (("kv", kv_num_blocks, kv_indices, _cdiv(lq, block_size)),
                                 ("q", q_num_blocks, q_indices, _cdiv(lk, block_size))):
        ns, ids = num.shape, idx.shape
        if len(ns) == 3:  # batched (per-input) layout [B', H', rows]
            if ns[0] not in (1, b):
                raise ValueError(f"{name}_num_blocks of a batched layout must be [1 or {b}, "
                                 f"heads, rows], got {tuple(ns)}")
            ns, ids = ns[1:], (ids[1:] if len(ids) == 4 and ids[0] == num.shape[0] else ())
        if len(ns) != 2 or ns[0] not in (1, h) or ns[1] != rows:
            raise ValueError(f"{name}_num_blocks must be [1 or {h}, {rows}] for this sequence "
                             f"length and block_size={block_size}, got {tuple(num.shape)}")
        if len(ids) != 3 or ids[0] != ns[0] or ids[1] != ns[1]:
            raise ValueError(f"{name}_indices must be [{ns[0]}, {ns[1]}, max_blocks] (after "
                             f"{name}_num_blocks' batch dim), got {tuple(idx.shape)}")
        if idx.dtype != torch.int32:
            raise TypeError(f"{name}_indices must be int32, got {idx.dtype}")
        if num.dtype != torch.int32:
            raise TypeError("kv_num_blocks and q_num_blocks must be int32")
    if key_padding_mask is not None:
        kpm_shape = key_padding_mask.shape
        if key_padding_mask.dtype != torch.bool or len(kpm_shape) != 2 \
                or kpm_shape[0] != b or kpm_shape[1] != lk:
            raise ValueError(f"key_padding_mask must be bool [{b}, {lk}], got "
                             f"{key_padding_mask.dtype} {tuple(kpm_shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and seed.numel() != 1:
        raise ValueError("seed must be a one-element int64 tensor when dropout_p > 0")


def _layout_strides(num: torch.Tensor, idx: torch.Tensor) -> tuple[int, ...]:
    # (batch, head, row) strides of the counts, then of the indices. B' = 1 (or a layout shared
    # by the batch, 3-D) and H' = 1 broadcast through zero strides.
    if num.dim() == 2:
        num, idx = num.unsqueeze(0), idx.unsqueeze(0)
    one_input, one_head = num.shape[0] == 1, num.shape[1] == 1
    return (
        0 if one_input else num.stride(0), 0 if one_head else num.stride(1), num.stride(2),
        0 if one_input else idx.stride(0), 0 if one_head else idx.stride(1), idx.stride(2),
    )


def _prepare_layout(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A no-op for layouts already on the device with unit inner stride (what sites hold).
    if t.device != device:
        t = t.to(device=device)
    # Kernels step along the last index dim with stride 1.
    return t if t.stride(-1) == 1 else t.contiguous()


def _kpm_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    if key_padding_mask is None:
        return q, 0  # never read (HAS_KPM is False); any valid pointer will do
    kpm = key_padding_mask if key_padding_mask.device == q.device else key_padding_mask.to(q.device)
    if kpm.stride(-1) != 1:
        kpm = kpm.contiguous()
    # bool and uint8 share a layout; the kernel compares the byte to 0.
    return kpm.view(torch.uint8), kpm.stride(0)


def _seed_args(seed: torch.Tensor, dropout_p: float, q: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """(SEED pointer, seed_lo, seed_hi, SEED_IN_MEMORY).

    A seed on the CPU (what block_sparse_attention draws) is read on the host -- no device
    involved -- and passed by value; copying it to the GPU instead would be a synchronous
    host-to-device copy on every call. A seed already on the device stays there and is loaded
    by the kernel, so reading it never synchronises either.
    """
    if dropout_p == 0.0:
        return q, 0, 0, False
    if seed.device.type == "cpu" or q.device.type == "cpu":
        value = int(seed.reshape(()).item()) & ((1 << 2 * _SEED_BITS) - 1)
        mask = (1 << _SEED_BITS) - 1
        return q, value & mask, value >> _SEED_BITS, False
    return seed.reshape(1).to(torch.int64), 0, 0, True


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _head_block(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())  # next power of two, without a ConstexprFunction


def _n_allowed(
    key_padding_mask: torch.Tensor | None, b: int, lq: int, lk: int, causal: bool,
    device: torch.device,
) -> torch.Tensor:
    """Keys each query may see before the block pattern (compat_spion denominators), [B, Lq]."""
    if key_padding_mask is None:
        real = torch.ones(b, lk, dtype=torch.int32, device=device)
    else:
        real = key_padding_mask.to(device=device, dtype=torch.int32)
    if causal:
        cum = real.cumsum(-1, dtype=torch.int32)
        col = torch.arange(lq, device=device).clamp(max=lk - 1)
        return cum[:, col].contiguous()
    return real.sum(-1, dtype=torch.int32, keepdim=True).expand(b, lq).contiguous()


def triton_block_sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    block_size: int,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
    compat_spion: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention forward. Returns (out [B,H,Lq,D] in q.dtype, lse fp32 [B,H,Lq])."""
    _check_inputs(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size,
                  key_padding_mask, dropout_p, seed)
    b, h, lq, d = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    if lq == 0:
        return out, lse
    kv_num = _prepare_layout(kv_num_blocks, q.device)
    kv_idx = _prepare_layout(kv_indices, q.device)
    kpm, stride_kpmb = _kpm_arg(key_padding_mask, q)
    seed_ptr, seed_lo, seed_hi, seed_in_memory = _seed_args(seed, dropout_p, q)
    n_allowed = _n_allowed(key_padding_mask, b, lq, lk, causal, q.device) if compat_spion else lse
    tiles = tile_config("fwd", d, q.dtype, block_size, b * h * _cdiv(lq, 128),
                        _device_sms(q.device), dropout_p > 0.0)
    args = (
        q, k, v, out, lse, kv_num, kv_idx, kpm, seed_ptr, n_allowed,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1),
        *_layout_strides(kv_num, kv_idx),
        stride_kpmb,
        h, h_kv, lq, lk,
        float(scale) * LOG2E, float(dropout_p), seed_lo, seed_hi,
    )
    constexprs = dict(
        HEAD_DIM=d, BLOCK_D=_head_block(d), PATTERN_BLOCK=block_size,
        IS_CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0, SEED_IN_MEMORY=seed_in_memory, COMPAT=bool(compat_spion),
        EVEN_K=lk % block_size == 0,
        UPCAST=_upcast(q.dtype), PRECISION=_dot_precision(q.dtype),
    )
    _launch(_fwd_launch, "fwd", lq, (h, b), tiles, args, constexprs)
    return out, lse


def triton_block_sparse_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    block_size: int,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
    compat_spion: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-sparse attention backward from the saved lse. Returns (dq, dk, dv).

    Deterministic: dQ tiles are owned by query programs, dK/dV tiles by kv programs (which also
    sum over the GQA group); nothing is accumulated with atomics. compat_spion needs no special
    case here: the saved lse already holds the pruned keys' exp(0) terms and those logits are
    constants, so P = exp(s - lse) on visible entries is the whole Jacobian.
    """
    _check_inputs(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size,
                  key_padding_mask, dropout_p, seed)
    b, h, lq, d = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != (b, h, lq):
        raise ValueError("grad_out and out must match q's shape and lse must be [B, H, Lq]")
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if lq == 0 or lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.to(q.dtype)
    kv_num = _prepare_layout(kv_num_blocks, q.device)
    kv_idx = _prepare_layout(kv_indices, q.device)
    q_num = _prepare_layout(q_num_blocks, q.device)
    q_idx = _prepare_layout(q_indices, q.device)
    kpm, stride_kpmb = _kpm_arg(key_padding_mask, q)
    seed_ptr, seed_lo, seed_hi, seed_in_memory = _seed_args(seed, dropout_p, q)
    # The kernels read lse in place (natural log, converted in registers); it must be fp32 with
    # unit stride along Lq as the forward wrote it.
    lse = lse if lse.dtype == torch.float32 and lse.is_contiguous() else lse.float().contiguous()
    delta = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    sms = _device_sms(q.device)
    qk_scale = float(scale) * LOG2E
    common = dict(
        HEAD_DIM=d, BLOCK_D=_head_block(d), PATTERN_BLOCK=block_size,
        IS_CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0, SEED_IN_MEMORY=seed_in_memory,
        UPCAST=_upcast(q.dtype), PRECISION=_dot_precision(q.dtype),
    )
    # dQ first: it also writes delta, which the dK/dV kernel reads.
    dq_tiles = tile_config("dq", d, q.dtype, block_size, b * h * _cdiv(lq, 128), sms,
                           dropout_p > 0.0)
    _launch(_dq_launch, "dq", lq, (h, b), dq_tiles, (
        q, k, v, out, grad_out, dq, lse, delta, kv_num, kv_idx, kpm, seed_ptr,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(),
        *_layout_strides(kv_num, kv_idx), stride_kpmb,
        h, h_kv, lq, lk, float(scale), qk_scale, float(dropout_p), seed_lo, seed_hi,
    ), {**common, "EVEN_K": lk % block_size == 0})
    dkdv_tiles = tile_config("dkdv", d, q.dtype, block_size, b * h_kv * _cdiv(lk, 128),
                             sms, dropout_p > 0.0)
    _launch(_dkdv_launch, "dkdv", lk, (h_kv, b), dkdv_tiles, (
        q, k, v, grad_out, dk, dv, lse, delta, q_num, q_idx, kpm, seed_ptr,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *_layout_strides(q_num, q_idx), stride_kpmb,
        h, h_kv, lq, lk, float(scale), qk_scale, float(dropout_p), seed_lo, seed_hi,
    ), {**common, "EVEN_Q": lq % block_size == 0})
    return dq, dk, dv


def dropout_keep_mask(
    seed: torch.Tensor, batch: int, heads: int, q_len: int, kv_len: int, dropout_p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The keep mask (bool [B, H, Lq, Lk]) the kernels draw for this seed and shape.

    Lets a float64 reference reproduce the kernels' dropout exactly (testing, debugging).
    """
    device = torch.device(device) if device is not None else seed.device
    mask = torch.empty(batch, heads, q_len, kv_len, dtype=torch.int8, device=device)
    if mask.numel() == 0:
        return mask.bool()
    # The attention kernels use the seed modulo 2^62 (two 31-bit halves); so does the mask.
    value = seed.reshape(1).to(device=device, dtype=torch.int64) & ((1 << 2 * _SEED_BITS) - 1)
    tile = 16 if INTERPRET else 64
    grid = (_cdiv(q_len, tile), _cdiv(kv_len, tile), batch * heads)
    _dropout_mask_kernel[grid](mask, value, q_len, kv_len, float(dropout_p),
                               BLOCK_M=tile, BLOCK_N=tile)
    return mask.bool()


__all__ = [
    "INTERPRET",
    "TileConfig",
    "dropout_keep_mask",
    "forced_tiles",
    "table_tiles",
    "tile_config",
    "triton_block_sparse_bwd",
    "triton_block_sparse_fwd",
]
