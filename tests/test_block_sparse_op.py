"""spion::block_sparse_attention on CPU against the float64 dense reference."""

from __future__ import annotations

import pytest
import torch

from spion_fx.kernels import (
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_bwd,
    block_sparse_attention_fwd,
    dense_block_mask,
    reference_attention,
)
from spion_fx.kernels.attention import native_cpu
from spion_fx.kernels.attention.block_sparse_cpu import dropout_keep_mask
from spion_fx.kernels.attention.reference import layout_block_grid

BLOCK = 4


@pytest.fixture(autouse=True, params=["native", "grouped"])
def cpu_kernel(request, monkeypatch):
    """Every test runs on both CPU kernels: the native one (fp32/fp64 without dropout or compat)
    and the grouped one built from PyTorch ops (everything else, and the fallback)."""
    if request.param == "native" and native_cpu.library() is None:
        pytest.skip("no C++ compiler: the native CPU kernel is unavailable")
    monkeypatch.setenv("SPION_FX_CPU_KERNEL", request.param)
    return request.param


def random_layout(heads: int, nqb: int, nkb: int, density: float, seed: int) -> BlockLayout:
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(heads, nqb, nkb, generator=gen) < density
    diag = torch.arange(min(nqb, nkb))
    grid[:, diag, diag] = True
    return BlockLayout.from_dense(grid, BLOCK)


def make_inputs(b, h, hkv, lq, lk, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=dtype).requires_grad_(True)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype).requires_grad_(True)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype).requires_grad_(True)
    return q, k, v


def nblocks(length: int) -> int:
    return -(-length // BLOCK)


def grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def assert_matches_reference(q, k, v, layout, *, causal=False, kpm=None, compat=None, tol=1e-6):
    out = block_sparse_attention(
        q, k, v, layout, causal=causal, key_padding_mask=kpm, compat=compat
    )
    ref, _ = reference_attention(q, k, v, layout, None, causal, kpm, compat == "spion")
    grad = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for got, want in zip(grads(out, (q, k, v), grad), grads(ref, (q, k, v), grad)):
        # lse is stored in float32, so float64 gradients agree to ~1e-7 only.
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "kpm"])
@pytest.mark.parametrize("compat", [None, "spion"])
def test_matches_reference(shared, causal, padding, compat):
    b, h, hkv, length, d = 2, 4, 2, 19, 8  # GQA, length not a multiple of the block
    q, k, v = make_inputs(b, h, hkv, length, length, d)
    layout = random_layout(1 if shared else h, nblocks(length), nblocks(length), 0.4, seed=1)
    kpm = None
    if padding:
        kpm = torch.rand(b, length, generator=torch.Generator().manual_seed(2)) > 0.3
        kpm[1, :10] = False  # left padding: early rows see nothing under causal
    assert_matches_reference(q, k, v, layout, causal=causal, kpm=kpm, compat=compat)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0], ids=["diagonal", "sparse", "dense"])
@pytest.mark.parametrize("causal", [False, True])
def test_densities(density, causal):
    q, k, v = make_inputs(1, 2, 2, 16, 16, 8)
    layout = random_layout(2, 4, 4, density, seed=3)
    assert_matches_reference(q, k, v, layout, causal=causal)


def test_no_gqa_rectangular_and_scale():
    q, k, v = make_inputs(1, 3, 3, 10, 14, 4)
    layout = random_layout(1, nblocks(10), nblocks(14), 0.5, seed=4)
    out = block_sparse_attention(q, k, v, layout, scale=0.3)
    ref, _ = reference_attention(q, k, v, layout, 0.3)
    torch.testing.assert_close(out, ref)


def test_lse_and_empty_rows():
    q, k, v = make_inputs(1, 2, 1, 12, 12, 4)
    grid = torch.zeros(1, 3, 3, dtype=torch.bool)
    grid[0, 0, 0] = True
    grid[0, 2, 1] = True  # row 1 has no blocks at all; row 2 one off-diagonal block
    layout = BlockLayout.from_dense(grid, BLOCK)
    kpm = torch.ones(1, 12, dtype=torch.bool)
    kpm[0, 4:8] = False  # row 2's only block is padding -> those rows see nothing
    args = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices)
    seed = torch.zeros((), dtype=torch.int64)
    out, lse = block_sparse_attention_fwd(q, k, v, *args, BLOCK, 0.5, False, kpm, 0.0, seed, False)
    ref_out, ref_lse = reference_attention(q, k, v, layout, 0.5, False, kpm)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert torch.isneginf(lse[..., 4:]).all() and (out[..., 4:, :] == 0).all()
    dq, dk, dv = block_sparse_attention_bwd(
        torch.randn_like(out), q, k, v, out, lse, *args, BLOCK, 0.5, False, kpm, 0.0, seed, False
    )
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[..., 4:, :] == 0).all()


def test_float32_and_bfloat16():
    q, k, v = make_inputs(1, 2, 2, 16, 16, 8, dtype=torch.float32)
    layout = random_layout(1, 4, 4, 0.5, seed=5)
    out = block_sparse_attention(q, k, v, layout, causal=True)
    ref, _ = reference_attention(q, k, v, layout, None, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    out_bf = block_sparse_attention(qb, kb, vb, layout, causal=True)
    assert out_bf.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf.float(), ref, atol=3e-2, rtol=3e-2)


def test_dense_block_mask_matches_layout():
    layout = random_layout(2, 3, 3, 0.5, seed=6)
    mask = dense_block_mask(layout, 10, 10)
    grid = layout_block_grid(layout)
    assert mask.shape == (1, 2, 10, 10)
    assert torch.equal(mask[0, :, ::BLOCK, ::BLOCK], grid)


def test_layout_grid_keeps_column_zero():
    # Padding slots in kv_indices are 0; they must not clear a real block in column 0.
    grid = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    layout = BlockLayout.from_dense(grid, BLOCK)
    assert torch.equal(layout_block_grid(layout)[0], grid)


# ----------------------------------------------------------------------------- dropout


def _dropout_call(q, k, v, layout, seed, p=0.5, causal=False):
    return block_sparse_attention_fwd(
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices,
        BLOCK, q.shape[-1] ** -0.5, causal, None, p, torch.tensor(seed), False,
    )[0]  # fmt: skip


def test_dropout_reproducible_and_seeded():
    q, k, v = make_inputs(1, 2, 2, 16, 16, 4)
    layout = random_layout(1, 4, 4, 0.5, seed=7)
    a = _dropout_call(q, k, v, layout, 11)
    b = _dropout_call(q, k, v, layout, 11)
    c = _dropout_call(q, k, v, layout, 12)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_dropout_keep_rate():
    layout = random_layout(1, 8, 8, 0.5, seed=8)
    keep = dropout_keep_mask(
        (2, 4, 32, 8), (2, 4, 32, 8), layout.kv_num_blocks, layout.kv_indices, BLOCK, False, 0.3,
        torch.tensor(5),
    )  # fmt: skip
    visible = dense_block_mask(layout, 32, 32).expand_as(keep)
    rate = keep[visible].float().mean().item()
    assert abs(rate - 0.7) < 0.03


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_with_same_mask(causal):
    q, k, v = make_inputs(1, 4, 2, 14, 14, 4)
    layout = random_layout(4, nblocks(14), nblocks(14), 0.5, seed=9)
    p, seed = 0.4, 21
    out = _dropout_call(q, k, v, layout, seed, p, causal)
    keep = dropout_keep_mask(
        tuple(q.shape), tuple(k.shape), layout.kv_num_blocks, layout.kv_indices, BLOCK, causal, p,
        torch.tensor(seed),
    )  # fmt: skip
    ref, _ = reference_attention(q, k, v, layout, None, causal, dropout_keep=keep, dropout_p=p)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for got, want in zip(grads(out, (q, k, v), grad), grads(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_public_dropout_draws_fresh_seeds():
    q, k, v = make_inputs(1, 2, 2, 16, 16, 4)
    layout = random_layout(1, 4, 4, 0.5, seed=10)
    a = block_sparse_attention(q, k, v, layout, dropout_p=0.5)
    b = block_sparse_attention(q, k, v, layout, dropout_p=0.5)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- tracing


def test_opcheck():
    q, k, v = make_inputs(1, 2, 1, 10, 10, 4, dtype=torch.float32)
    layout = random_layout(1, nblocks(10), nblocks(10), 0.5, seed=11)
    kpm = torch.ones(1, 10, dtype=torch.bool)
    kpm[0, -2:] = False
    args = (
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices,
        BLOCK, 0.5, True, kpm, 0.0, torch.tensor(0), False,
    )  # fmt: skip
    torch.library.opcheck(block_sparse_attention_fwd, args)
    out, lse = block_sparse_attention_fwd(*args)
    bwd_args = (
        torch.randn_like(out),
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse,
    ) + args[3:]
    torch.library.opcheck(block_sparse_attention_bwd, bwd_args)


def test_torch_compile_fullgraph_fwd_bwd():
    torch._dynamo.reset()
    q, k, v = make_inputs(1, 4, 2, 16, 16, 8, dtype=torch.float32)
    layout = random_layout(1, 4, 4, 0.5, seed=12)

    def fn(q, k, v):
        out = block_sparse_attention(q, k, v, layout, causal=True)
        return (out * out).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    got = grads(compiled(q, k, v), (q, k, v), torch.tensor(1.0))
    want = grads(fn(q, k, v), (q, k, v), torch.tensor(1.0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.randn(2, 8, 4)), "q must be a 4-D"),
        (dict(k=torch.randn(1, 3, 16, 8)), "multiple of k/v heads"),
        (dict(key_padding_mask=torch.ones(1, 16)), "key_padding_mask"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(compat="flash"), "compat"),
        (dict(layout=random_layout(1, 3, 4, 0.5, 0)), "query blocks"),
        (dict(layout=random_layout(3, 4, 4, 0.5, 0)), "1 or 4 heads"),
    ],
)
def test_validation(change, match):
    q, k, v = (t.detach().float() for t in make_inputs(1, 4, 2, 16, 16, 8))
    kwargs = dict(q=q, k=k, v=v, layout=random_layout(1, 4, 4, 0.5, 0))
    kwargs.update(change)
    if "k" in change:
        kwargs["v"] = kwargs["k"]
    opts = {n: kwargs.pop(n) for n in ("key_padding_mask", "dropout_p", "compat") if n in kwargs}
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["layout"], **opts)


@pytest.mark.parametrize("length", [32, 30], ids=["whole", "ragged"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 2, 1), (4, 4, 4)], ids=["shared_gqa", "per_head"])
def test_band_path(length, causal, heads):
    # A full tri-diagonal band takes the strided-window path (no gather) for interior rows.
    from spion_fx.kernels.attention.block_sparse_cpu import get_plan

    h, hkv, hp = heads
    nb = nblocks(length)
    grid = torch.rand(hp, nb, nb, generator=torch.Generator().manual_seed(13)) < 0.2
    for offset in (-1, 0, 1):
        rows = torch.arange(max(0, -offset), min(nb, nb - offset))
        grid[:, rows, rows + offset] = True
    layout = BlockLayout.from_dense(grid, BLOCK)
    plan = get_plan(
        layout.kv_num_blocks, layout.kv_indices, BLOCK, length, length, causal, h // hkv, True
    )
    assert plan.band is not None and plan.band.lo == -1 and plan.band.hi == (0 if causal else 1)
    q, k, v = make_inputs(2, h, hkv, length, length, 8)
    assert_matches_reference(q, k, v, layout, causal=causal)


def test_no_grad_flex_route_matches_reference(monkeypatch):
    import spion_fx.kernels.attention.block_sparse_op as op_module

    monkeypatch.setattr(op_module, "FLEX_NO_GRAD_MIN_ELEMENTS", 0)
    torch._dynamo.reset()
    length, block = 64, 16
    grid = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(14)) < 0.4
    grid[:, 1] = False  # a row with no blocks outputs 0
    layout = BlockLayout.from_dense(grid, block)
    q, k, v = (t.detach().float() for t in make_inputs(2, 4, 2, length, length, 8))
    kpm = torch.rand(2, length, generator=torch.Generator().manual_seed(15)) > 0.3
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, layout, causal=True, key_padding_mask=kpm)
    ref, _ = reference_attention(q, k, v, layout, None, True, kpm)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_workspace_reuse_across_inference_mode_and_size_cap(monkeypatch):
    """Gathers go through a per-thread scratch workspace: results must not depend on whether it
    is reused, first allocated under inference mode, or bypassed above its size cap."""
    from spion_fx.kernels.attention import block_sparse_cpu

    monkeypatch.setattr(block_sparse_cpu, "_WORKSPACE", block_sparse_cpu._Workspace())
    layout = random_layout(1, nblocks(37), nblocks(37), 0.4, seed=3)
    q, k, v = make_inputs(2, 4, 2, 37, 37, 8, dtype=torch.float32, seed=3)
    with torch.inference_mode():
        first = block_sparse_attention(q, k, v, layout)
    second = block_sparse_attention(q, k, v, layout)  # reuses inference-mode-created buffers
    torch.testing.assert_close(second, first)
    assert_matches_reference(q, k, v, layout, tol=1e-5)
    monkeypatch.setattr(block_sparse_cpu._Workspace, "MAX_RETAINED_BYTES", 0)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), first)
    assert_matches_reference(q, k, v, layout, tol=1e-5)
