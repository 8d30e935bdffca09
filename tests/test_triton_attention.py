"""Triton block-sparse attention vs a float64 dense masked reference.

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported
when CUDA is absent) and on CUDA when present. Shapes are tiny: the interpreter runs every program
in Python.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from spion_fx.kernels.attention.layout import BlockLayout  # noqa: E402
from spion_fx.kernels.attention.triton_attention import (  # noqa: E402
    INTERPRET,
    dropout_keep_mask,
    triton_block_sparse_bwd,
    triton_block_sparse_fwd,
)

DEVICE = "cpu" if INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("compiled Triton needs CUDA; set TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}
if DEVICE == "cuda":  # TF32 dots on GPU
    TOL[torch.float32] = (5e-3, 5e-3)


# ---------------------------------------------------------------------------------------------
# float64 reference (private, so these tests do not depend on spion_fx.kernels.attention.reference)
# ---------------------------------------------------------------------------------------------


def reference(q, k, v, layout, scale, causal, kpm=None, keep=None, dropout_p=0.0, compat=False):
    """Dense masked softmax in float64; returns (out, lse). keep: bool [B,H,Lq,Lk] or None."""
    q, k, v = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    b, h, lq, _ = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(h // h_kv, dim=1)
    vv = v.repeat_interleave(h // h_kv, dim=1)
    bs = layout.block_size
    grid = layout_grid(layout)  # [H', nQB, nKB]
    pattern = grid.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :lq, :lk]
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool).tril()
    if kpm is not None:
        allowed = allowed & kpm.cpu()[:, None, None, :]
    visible = allowed & pattern.unsqueeze(0)
    s = (q @ kk.transpose(-1, -2)) * scale
    s_vis = s.masked_fill(~visible, float("-inf"))
    if compat:  # pruned-but-allowed keys count as logit 0
        s_vis = torch.where(allowed & ~visible, torch.zeros_like(s), s_vis)
    lse = torch.logsumexp(s_vis, dim=-1)
    p = torch.exp(s_vis - lse.unsqueeze(-1)).nan_to_num(0.0) * visible
    if keep is not None:
        p = p * keep.cpu() / (1.0 - dropout_p)
    out = p @ vv
    return q, k, v, out, lse


def layout_grid(layout):
    """Boolean block grid [H', nQB, nKB], built from the compressed rows.

    (Not BlockLayout.to_dense: its scatter lets the zero padding of kv_indices clear column 0.)
    """
    num, idx = layout.kv_num_blocks.cpu(), layout.kv_indices.cpu().long()
    grid = torch.zeros(num.shape[0], num.shape[1], layout.num_kv_blocks, dtype=torch.bool)
    for h in range(num.shape[0]):
        for r in range(num.shape[1]):
            grid[h, r, idx[h, r, : num[h, r]]] = True
    return grid


def make_layout(nqb, nkb, bs, heads=1, density=0.5, seed=0, diag=True, dense=False):
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(heads, nqb, nkb, generator=g) < density
    if dense:
        grid[:] = True
    if diag:
        n = min(nqb, nkb)
        grid[:, torch.arange(n), torch.arange(n)] = True
    return BlockLayout.from_dense(grid, bs)


def run_case(
    b=1, h=2, h_kv=None, lq=64, lk=None, d=32, bs=32, dtype=torch.float32, causal=False,
    layout_heads=1, kpm=False, dropout_p=0.0, compat=False, density=0.5, dense=False, seed=0,
    layout=None, check_bwd=True,
):
    h_kv = h_kv or h
    lk = lk or lq
    torch.manual_seed(seed)
    q = torch.randn(b, h, lq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, h_kv, lk, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, h_kv, lk, d, dtype=dtype, device=DEVICE)
    if layout is None:
        layout = make_layout(math.ceil(lq / bs), math.ceil(lk / bs), bs, layout_heads, density,
                             seed=seed, dense=dense)
    mask = None
    if kpm:
        mask = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
        mask[0, lk - 7:] = False
        if b > 1:
            mask[1, 3:9] = False
    seed_t = torch.tensor(1234 + seed, dtype=torch.int64)
    scale = 1.0 / math.sqrt(d)
    lay = layout.to(DEVICE)
    args = (lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, bs, scale, causal,
            mask, dropout_p, seed_t, compat)
    out, lse = triton_block_sparse_fwd(q, k, v, *args)
    keep = dropout_keep_mask(seed_t, b, h, lq, lk, dropout_p, DEVICE) if dropout_p > 0 else None
    rq, rk, rv, rout, rlse = reference(q, k, v, layout, scale, causal, mask, keep, dropout_p, compat)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), rout.detach(), atol=atol, rtol=rtol)
    lse_ref = rlse.detach()
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.double().cpu()[finite], lse_ref[finite], atol=atol, rtol=rtol)
    if not check_bwd:
        return out, lse
    grad = torch.randn_like(out)
    dq, dk, dv = triton_block_sparse_bwd(grad, q, k, v, out, lse, *args)
    rout.backward(grad.double().cpu())
    for name, got, ref in (("dq", dq, rq.grad), ("dk", dk, rk.grad), ("dv", dv, rv.grad)):
        assert got.dtype == dtype and got.shape == ref.shape, name
        # Gradients sum over up to Lk terms; scale the tolerance with their magnitude.
        torch.testing.assert_close(got.double().cpu(), ref, atol=atol * 4, rtol=rtol * 4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    return out, lse


# ---------------------------------------------------------------------------------------------
# Forward + backward against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bs", [16, 32])
def test_basic(causal, bs):
    run_case(causal=causal, bs=bs, lq=64)


@pytest.mark.parametrize("causal", [False, True])
def test_length_not_multiple_of_block(causal):
    run_case(lq=77, bs=32, causal=causal, d=32)


def test_cross_lengths():
    run_case(lq=48, lk=80, bs=16, causal=False)


def test_key_padding_causal():
    run_case(b=2, h=1, lq=64, bs=32, causal=True, kpm=True)


def test_gqa_per_head_layout():
    # 4 query heads over 2 kv heads, a different pattern per query head: dK/dV must sum a group
    # whose members walk different q-block lists.
    run_case(h=4, h_kv=2, lq=64, bs=16, layout_heads=4, density=0.4, causal=True)


def test_gqa_shared_layout():
    run_case(h=4, h_kv=1, lq=48, bs=16, layout_heads=1)


def test_dense_pattern_matches_dense_attention():
    run_case(lq=64, bs=16, dense=True, causal=True, d=64)


def test_diagonal_only_and_empty_rows():
    # Row 0: only the diagonal block; row 1: nothing at all -> out = 0, lse = -inf, zero grads.
    grid = torch.zeros(1, 3, 3, dtype=torch.bool)
    grid[0, 0, 0] = True
    grid[0, 2, 0] = True
    grid[0, 2, 2] = True
    layout = BlockLayout.from_dense(grid, 16)
    out, lse = run_case(lq=48, bs=16, layout=layout, causal=True)
    assert torch.all(out[:, :, 16:32] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 16:32]))


def test_head_dim_padded_and_128():
    run_case(lq=32, d=24, bs=16, h=1)  # D padded to 32 inside the kernel
    run_case(lq=32, d=128, bs=16, h=1, check_bwd=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    run_case(lq=48, bs=16, dtype=dtype, causal=True, h=1, d=64)


@pytest.mark.parametrize("causal", [False, True])
def test_compat_spion(causal):
    run_case(lq=64, bs=16, compat=True, causal=causal, kpm=True, b=2, h=1, density=0.3)


def test_non_contiguous_inputs():
    torch.manual_seed(3)
    b, h, lq, d, bs = 1, 2, 48, 32, 16
    base = torch.randn(b, lq, h, d, device=DEVICE)  # [B, L, H, D] viewed as [B, H, L, D]
    q = base.transpose(1, 2)
    k = torch.randn(b, lq, h, d, device=DEVICE).transpose(1, 2)
    v = torch.randn(b, lq, h, d, device=DEVICE).transpose(1, 2)
    layout = make_layout(3, 3, bs)
    lay = layout.to(DEVICE)
    seed = torch.tensor(0)
    out, _ = triton_block_sparse_fwd(q, k, v, lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks,
                                     lay.q_indices, bs, 0.2, False, None, 0.0, seed, False)
    _, _, _, ref, _ = reference(q, k, v, layout, 0.2, False)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


def test_dropout_matches_reference_with_same_mask():
    run_case(h=2, h_kv=1, lq=48, bs=16, dropout_p=0.3, causal=True, kpm=True)


def test_dropout_determinism_and_rate():
    torch.manual_seed(0)
    b, h, lq, d, bs, p = 1, 1, 32, 16, 16, 0.25
    q, k, v = (torch.randn(b, h, lq, d, device=DEVICE) for _ in range(3))
    layout = make_layout(2, 2, bs, dense=True).to(DEVICE)
    lay = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices)

    def fwd(seed):
        return triton_block_sparse_fwd(q, k, v, *lay, bs, 0.25, False, None, p,
                                       torch.tensor(seed, dtype=torch.int64), False)[0]

    a, a2, c = fwd(7), fwd(7), fwd(8)
    assert torch.equal(a, a2)
    assert not torch.allclose(a, c)
    keep = dropout_keep_mask(torch.tensor(7), 2, 3, 96, 80, p, DEVICE)
    assert torch.equal(keep, dropout_keep_mask(torch.tensor(7), 2, 3, 96, 80, p, DEVICE))
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    other = dropout_keep_mask(torch.tensor(8), 2, 3, 96, 80, p, DEVICE)
    assert (keep != other).float().mean().item() > 0.2


# ---------------------------------------------------------------------------------------------
# Input validation, determinism, op registration
# ---------------------------------------------------------------------------------------------


def test_backward_is_deterministic():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 32, 16, device=DEVICE) for _ in range(3))
    layout = make_layout(2, 2, 16).to(DEVICE)
    args = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices, 16,
            0.25, True, None, 0.0, torch.tensor(0), False)
    out, lse = triton_block_sparse_fwd(q, k, v, *args)
    g = torch.randn_like(out)
    first = triton_block_sparse_bwd(g, q, k, v, out, lse, *args)
    second = triton_block_sparse_bwd(g, q, k, v, out, lse, *args)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_rejects_bad_inputs():
    q = torch.randn(1, 2, 32, 16, device=DEVICE)
    layout = make_layout(2, 2, 16).to(DEVICE)
    lay = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices)
    seed = torch.tensor(0)
    with pytest.raises(ValueError, match="block_size"):
        triton_block_sparse_fwd(q, q, q, *lay, 24, 1.0, False, None, 0.0, seed, False)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        triton_block_sparse_fwd(q, q, q, *lay, 32, 1.0, False, None, 0.0, seed, False)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        k = torch.randn(1, 3, 32, 16, device=DEVICE)
        triton_block_sparse_fwd(q, k, k, *lay, 16, 1.0, False, None, 0.0, seed, False)
    with pytest.raises(TypeError, match="dtype"):
        triton_block_sparse_fwd(q.double(), q.double(), q.double(), *lay, 16, 1.0, False, None,
                                0.0, seed, False)
    with pytest.raises(ValueError, match="dropout_p"):
        triton_block_sparse_fwd(q, q, q, *lay, 16, 1.0, False, None, 1.0, seed, False)


@pytest.mark.skipif(importlib.util.find_spec("spion_fx.kernels.attention.block_sparse_op") is None,
                    reason="spion_fx.kernels.attention.block_sparse_op not written yet")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA registration needs a GPU")
def test_through_registered_op():  # pragma: no cover - needs a GPU
    pytest.importorskip("spion_fx.kernels.attention.block_sparse_op")
    from spion_fx.kernels.attention.triton_registration import register_cuda_kernels

    assert register_cuda_kernels()
    assert register_cuda_kernels()  # idempotent
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 32, device="cuda") for _ in range(3))
    layout = make_layout(2, 2, 32).to("cuda")
    lay = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices)
    seed = torch.tensor(0)
    out, lse = torch.ops.spion.block_sparse_attention_fwd(q, k, v, *lay, 32, 0.2, True, None, 0.0,
                                                         seed, False)
    ref_out, ref_lse = triton_block_sparse_fwd(q, k, v, *lay, 32, 0.2, True, None, 0.0, seed,
                                               False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_registration_is_safe_without_op_module():
    from spion_fx.kernels.attention.triton_registration import register_cuda_kernels

    # Returns a bool either way and never raises (no op module yet, or no CUDA).
    assert register_cuda_kernels() in (True, False)


@pytest.mark.parametrize("compat", [False, True])
def test_agrees_with_project_reference(compat):
    """Same conventions as spion_fx.kernels.attention.reference (the CPU op's ground truth)."""
    ref_mod = pytest.importorskip("spion_fx.kernels.attention.reference")
    torch.manual_seed(5)
    b, h, lq, d, bs = 2, 2, 56, 32, 16
    q, k, v = (torch.randn(b, h, lq, d, device=DEVICE) for _ in range(3))
    layout = make_layout(4, 4, bs, heads=2, density=0.3, seed=5)
    kpm = torch.ones(b, lq, dtype=torch.bool, device=DEVICE)
    kpm[1, -9:] = False
    seed = torch.tensor(11)
    keep = dropout_keep_mask(seed, b, h, lq, lq, 0.2, DEVICE)
    lay = layout.to(DEVICE)
    out, lse = triton_block_sparse_fwd(q, k, v, lay.kv_num_blocks, lay.kv_indices,
                                       lay.q_num_blocks, lay.q_indices, bs, 0.3, True, kpm, 0.2,
                                       seed, compat)
    ref_out, ref_lse = ref_mod.reference_attention(
        q.cpu(), k.cpu(), v.cpu(), layout, 0.3, True, kpm.cpu(), compat, keep.cpu(), 0.2)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-4, rtol=2e-4)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite], atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# Tiles, run-time row bounds, seeds (the launch rules that keep a pattern switch cheap)
# ---------------------------------------------------------------------------------------------

from spion_fx.kernels.attention import triton_attention as ta  # noqa: E402


@pytest.mark.parametrize("tiles", [
    # (fwd, dq, dkdv): query tiles smaller than the pattern block, kv tiles as wide as it, and
    # the reverse -- the interpreter's default 16x16 covers neither.
    (ta.TileConfig(16, 32, 4, 1), ta.TileConfig(16, 32, 4, 1), ta.TileConfig(16, 32, 4, 1)),
    (ta.TileConfig(32, 16, 4, 1), ta.TileConfig(32, 16, 4, 1), ta.TileConfig(32, 16, 4, 1)),
])
@pytest.mark.parametrize("causal", [False, True])
def test_tiles_other_than_the_pattern_block(tiles, causal):
    fwd, dq, dkdv = tiles
    with ta.forced_tiles(fwd=fwd, dq=dq, dkdv=dkdv):
        run_case(h=2, lq=80, bs=32, d=16, causal=causal, density=0.5)


def test_tiles_with_padding_gqa_dropout():
    with ta.forced_tiles(fwd=ta.TileConfig(16, 32, 4, 1), dkdv=ta.TileConfig(16, 32, 4, 1)):
        run_case(b=2, h=4, h_kv=2, lq=64, bs=32, d=16, causal=True, kpm=True, dropout_p=0.2,
                 layout_heads=4, density=0.5)


def test_rows_longer_than_one_count_chunk():
    # A causal row and a column of 36 blocks (> ROW_CHUNK = 32): the diagonal split is counted
    # over two chunks in the forward/dQ (last row) and in dK/dV (first column); the other rows
    # hold 1 or 2 blocks, so short and long rows share one launch.
    n = ta.ROW_CHUNK + 4
    grid = torch.eye(n, dtype=torch.bool)
    grid[-1, :] = True
    grid[:, 0] = True
    layout = BlockLayout.from_dense(grid, 16)
    run_case(h=1, lq=16 * n - 5, bs=16, d=16, causal=True, layout=layout)


def test_rows_of_different_lengths_non_causal():
    grid = torch.zeros(1, 4, 4, dtype=torch.bool)
    grid[0, 0, :] = True        # 4 blocks
    grid[0, 1, 2] = True        # 1 block, off the diagonal
    grid[0, 3, [0, 3]] = True   # 2 blocks; row 2 stays empty
    run_case(h=2, lq=60, bs=16, d=16, layout=BlockLayout.from_dense(grid, 16), causal=False)


def test_a_new_pattern_launches_the_same_specialisation(monkeypatch):
    # Nothing derived from the pattern (its longest row, its density) may reach the kernels'
    # compile-time parameters: a switch, or another layer's pattern, must reuse compiled code.
    launches = []

    def specialisation(kernel, kind, args):
        # Triton's rule for integer arguments: a variant per value 1 / divisible by 16 / width,
        # except for the names the kernel opts out of.
        skip = set(ta.UNSPECIALISED[kind])
        return tuple((v == 1, v % 16 == 0, -(2**31) <= v < 2**31)
                     for name, v in zip(kernel.arg_names, args)
                     if isinstance(v, int) and not isinstance(v, bool) and name not in skip)

    def spy(kernel, kind, rows, others, tiles, args, constexprs):
        launches.append((kind, rows, others, tiles, specialisation(kernel, kind, args),
                         tuple(sorted(constexprs.items()))))

    monkeypatch.setattr(ta, "_launch", spy)
    q = torch.randn(1, 2, 64, 16, device=DEVICE)
    # Longest rows 1 and 4 blocks (kv_indices widths, hence strides, 1 and 4); seeds whose
    # halves are 1 and 16.
    for density, seed in ((0.0, 1), (1.0, 16 + (16 << 31))):
        lay = make_layout(4, 4, 16, heads=2, seed=seed, dense=density == 1.0,
                          density=density).to(DEVICE)
        args = (lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, 16, 0.25,
                True, None, 0.1, torch.tensor(seed), False)
        out, lse = triton_block_sparse_fwd(q, q, q, *args)
        triton_block_sparse_bwd(q, q, q, q, out, lse, *args)
    assert len(launches) == 6
    assert launches[:3] == launches[3:]


def test_large_seed_matches_keep_mask():
    # Seeds beyond 32 bits travel as two 31-bit halves; the kernels and dropout_keep_mask must
    # agree on the value they use.
    torch.manual_seed(0)
    b, h, lq, d, bs, p = 1, 1, 32, 16, 16, 0.3
    q, k, v = (torch.randn(b, h, lq, d, device=DEVICE) for _ in range(3))
    layout = make_layout(2, 2, bs, dense=True)
    lay = layout.to(DEVICE)
    seed = torch.tensor(2**40 + 12345, dtype=torch.int64)
    out, _ = triton_block_sparse_fwd(q, k, v, lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks,
                                     lay.q_indices, bs, 0.25, False, None, p, seed, False)
    keep = dropout_keep_mask(seed, b, h, lq, lq, p, DEVICE)
    *_, ref, _ = reference(q, k, v, layout, 0.25, False, keep=keep, dropout_p=p)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=atol, rtol=rtol)
    other, _ = triton_block_sparse_fwd(q, k, v, lay.kv_num_blocks, lay.kv_indices,
                                       lay.q_num_blocks, lay.q_indices, bs, 0.25, False, None, p,
                                       seed + 2**31, False)
    assert not torch.equal(out, other)  # the high half reaches the generator


def test_tile_table_rules():
    bf16 = torch.bfloat16
    tiles = ta.table_tiles
    # Enough programs: the table's tiles.
    assert tiles("fwd", 64, bf16, 128, programs=1024, sm_count=132) \
        == ta._TILE_TABLE[("fwd", 64, True)]
    # Short sequence: 256 programs < 2 per SM -> 64-row query tiles within the 128 block.
    small = tiles("fwd", 64, bf16, 128, programs=256, sm_count=132)
    assert (small.block_m, small.block_n, small.num_warps) == (64, 128, 4)
    # dK/dV splits its kv tile instead.
    dkdv = tiles("dkdv", 128, bf16, 128, programs=256, sm_count=132)
    assert dkdv.block_n == 64 and dkdv.block_m == ta._TILE_TABLE[("dkdv", 128, True)].block_m
    # Pattern block 64 clamps both tiles; D=256 and fp32 use their own entries.
    clamped = tiles("fwd", 64, bf16, 64, programs=10**6, sm_count=132)
    assert (clamped.block_m, clamped.block_n, clamped.num_warps) == (64, 64, 4)
    assert tiles("fwd", 200, bf16, 128, 10**6, 132) == ta._TILE_TABLE[("fwd", 256, True)]
    assert tiles("fwd", 64, torch.float32, 16, 10**6, 132).block_n == 16
    # Dropout narrows the tiles that would spill; small pattern blocks get one warpgroup.
    assert tiles("fwd", 64, bf16, 128, 10**6, 132, dropout=True) == ta._DROPOUT_TILES[("fwd", 64)]
    assert tiles("dq", 64, bf16, 128, 10**6, 132, dropout=True) == ta._TILE_TABLE[("dq", 64, True)]
    assert tiles("dkdv", 128, bf16, 32, 10**6, 132).num_warps == 4
    # Every table entry fits every supported pattern block at every grid size.
    for (kernel, dim, sixteen) in ta._TILE_TABLE:
        dtype = bf16 if sixteen else torch.float32
        for block in ta.SUPPORTED_PATTERN_BLOCKS:
            for programs in (1, 10**6):
                for dropout in (False, True):
                    t = tiles(kernel, dim, dtype, block, programs, 132, dropout)
                    assert block % t.block_m == 0 and block % t.block_n == 0
                    assert t.block_m >= 16 and t.block_n >= 16 and t.num_warps in (4, 8)
    # The launchers use the table on a GPU, the interpreter's fixed tile under it.
    expected = ta._INTERPRET_TILES if ta.INTERPRET else tiles("fwd", 64, bf16, 128, 1024, 132)
    assert ta.tile_config("fwd", 64, bf16, 128, 1024, 132) == expected


def test_tile_config_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="kernel"):
        ta.tile_config("bwd", 64, torch.bfloat16, 128, 1, 1)
    with pytest.raises(ValueError, match="unknown kernels"):
        with ta.forced_tiles(bwd=ta.TileConfig(16, 16, 4, 1)):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device-resident seed needs CUDA")
def test_device_seed_equals_host_seed():  # pragma: no cover - needs a GPU
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 32, device="cuda") for _ in range(3))
    lay = make_layout(2, 2, 32, dense=True).to("cuda")
    base = (lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, 32, 0.2, True,
            None, 0.25)
    host = torch.tensor(2**62 + 2**33 + 7)  # bit 62 is dropped on both paths
    a, lse = triton_block_sparse_fwd(q, k, v, *base, host, False)
    b, _ = triton_block_sparse_fwd(q, k, v, *base, host.cuda(), False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    g = torch.randn_like(a)
    for x, y in zip(triton_block_sparse_bwd(g, q, k, v, a, lse, *base, host, False),
                    triton_block_sparse_bwd(g, q, k, v, a, lse, *base, host.cuda(), False)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test compiles for real")
def test_kernels_compile_for_sm90_without_spilling():
    """The interpreter accepts code the compiler rejects (e.g. a plain-int global): compile the
    causal + padding + dropout variant (every code path) for sm_90 ahead of time, as a launch
    would, and check ptxas fits it in registers."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "triton_aot.py"), "--quick"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "spill_stack=" in line]
    assert [line.split()[0] for line in lines] == ["fwd", "dq", "dkdv"], result.stdout
    for line in lines:
        assert int(re.search(r"spill_stack=(\d+)", line).group(1)) == 0, line
        assert int(re.search(r"async_copies=(\d+)", line).group(1)) > 0, line  # pipelined
