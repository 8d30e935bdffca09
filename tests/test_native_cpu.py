"""The native CPU kernel (csrc/block_sparse_attention.cpp) on what only it does: reading strided
operands in place, splitting dK/dV over chunks, GEMM runs over consecutive blocks, its build
cache, and the fallback when it cannot be built. Its general correctness is covered, next to the
grouped kernel's, by test_block_sparse_op.py."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from spion_fx.kernels import BlockLayout, block_sparse_attention, reference_attention
from spion_fx.kernels.attention import native_cpu

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def _inputs(b, h, hkv, length, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(b, n, length, d, generator=gen, dtype=dtype).requires_grad_(True)
        for n in (h, hkv, hkv)
    )


def _layout(heads, n_blocks, block, density, seed):
    grid = torch.rand(heads, n_blocks, n_blocks, generator=torch.Generator().manual_seed(seed))
    grid = grid < density
    grid[:, torch.arange(n_blocks), torch.arange(n_blocks)] = True
    return BlockLayout.from_dense(grid, block)


def _check(q, k, v, layout, causal=False, kpm=None, tol=1e-6):
    assert native_cpu.handles(q.dtype, False)
    out = block_sparse_attention(q, k, v, layout, causal=causal, key_padding_mask=kpm)
    ref, _ = reference_attention(q, k, v, layout, None, causal, kpm)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_library_builds_here():
    assert native_cpu.library() is not None


def test_permuted_operands_read_in_place():
    # HF layouts: [B, L, H, D] viewed as [B, H, L, D]; row stride H*D, not D.
    b, length, h, d = 2, 40, 4, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(b, length, h, d, generator=gen, dtype=torch.float64)
        .transpose(1, 2)
        .requires_grad_(True)
        for _ in range(3)
    )
    assert not q.is_contiguous()
    _check(q, k, v, _layout(1, 5, 8, 0.4, seed=2), causal=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_chunked_key_gradients(threads):
    # One batch and one kv head: with 2 threads the query blocks split over chunks whose dK/dV
    # slices are summed; with 1 thread there is a single chunk.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = _inputs(1, 3, 1, 70, 8, seed=3)  # GQA 3:1, ragged last block
        kpm = torch.rand(1, 70, generator=torch.Generator().manual_seed(4)) > 0.2
        _check(q, k, v, _layout(1, 9, 8, 0.3, seed=5), causal=True, kpm=kpm)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("max_run", [8, 24, 4096])
def test_runs_of_consecutive_blocks(monkeypatch, max_run):
    # A dense band of 5 blocks is one GEMM of up to max_run keys; the split must not matter.
    monkeypatch.setattr(native_cpu, "MAX_RUN_KEYS", max_run)
    n = 8
    grid = torch.zeros(2, n, n, dtype=torch.bool)
    for off in range(-2, 3):
        idx = torch.arange(max(0, -off), min(n, n - off))
        grid[:, idx, idx + off] = True
    grid[1, 0, 7] = True  # per-head layouts differ
    q, k, v = _inputs(2, 2, 2, 61, 4, seed=6)
    _check(q, k, v, BlockLayout.from_dense(grid, 8), causal=False)


def test_float32_accuracy_of_the_exponential():
    # The kernel's own vectorised exp: float32 results within float32 rounding of float64.
    q, k, v = _inputs(1, 2, 2, 128, 16, dtype=torch.float32, seed=7)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    layout = _layout(1, 4, 32, 0.5, seed=8)
    with torch.no_grad():
        out = block_sparse_attention(q * 4, k, v, layout)  # sharper softmax: wide exp range
        ref, _ = reference_attention(q64 * 4, k64, v64, layout)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5)


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_cpu, "_state", {})
    assert native_cpu.library() is not None
    (built,) = tmp_path.glob("block_sparse_attention_*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(native_cpu, "_state", {})
    assert native_cpu.library() is not None
    assert built.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1


def test_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native_cpu, "_state", {})
    q, k, v = _inputs(1, 2, 1, 24, 8, seed=9)
    layout = _layout(1, 3, 8, 0.5, seed=10)
    with pytest.warns(RuntimeWarning, match="native CPU attention kernel unavailable"):
        out = block_sparse_attention(q, k, v, layout)
    ref, _ = reference_attention(q, k, v, layout)
    torch.testing.assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per call
        block_sparse_attention(q, k, v, layout)
    assert not native_cpu.handles(q.dtype, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_float32(dtype):
    q, k, v = _inputs(1, 4, 2, 40, 8, dtype=dtype, seed=11)
    layout = _layout(1, 5, 8, 0.4, seed=12)
    assert native_cpu.handles(q.dtype, False)
    out = block_sparse_attention(q, k, v, layout, causal=True)
    wide = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference_attention(*wide, layout, None, True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, wide, grad.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, atol=3e-2, rtol=3e-2)


def test_unwritable_cache_falls_back_to_a_temporary_directory(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(native_cpu.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(native_cpu, "_state", {})
    assert native_cpu.library() is not None
    assert list((tmp_path / "tmp").glob("spion_fx-*/block_sparse_attention_*.so"))


def test_layout_out_of_range_is_refused_not_read():
    # The op can be called directly; the kernel must never index past k/v.
    from spion_fx.kernels import block_sparse_attention_fwd

    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 16, 4, seed=13))
    layout = _layout(1, 2, 8, 1.0, seed=14)
    bad = layout.kv_indices.clone()
    bad[0, 0, 0] = 7
    seed = torch.zeros((), dtype=torch.int64)
    for kv_num, kv_idx in (
        (layout.kv_num_blocks, bad),
        (layout.kv_num_blocks + 5, layout.kv_indices),
    ):
        with pytest.raises(ValueError, match="out of range"):
            block_sparse_attention_fwd(
                q, k, v, kv_num, kv_idx, layout.q_num_blocks, layout.q_indices, 8, 0.5, False,
                None, 0.0, seed, False,
            )  # fmt: skip


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_rate_and_independence(p):
    keep = native_cpu.dropout_keep_mask(2, 3, 64, 96, p, torch.tensor(123))
    assert keep.shape == (2, 3, 64, 96)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # distinct heads, batches and seeds draw different masks; the same seed the same one
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, native_cpu.dropout_keep_mask(2, 3, 64, 96, p, torch.tensor(123)))
    assert not torch.equal(keep, native_cpu.dropout_keep_mask(2, 3, 64, 96, p, torch.tensor(124)))
    # neighbouring keys and rows are uncorrelated
    a, b = keep[..., :-1].float(), keep[..., 1:].float()
    assert abs(((a - a.mean()) * (b - b.mean())).mean().item()) < 0.01


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_and_backward_use_the_drawn_mask(causal):
    from spion_fx.kernels import block_sparse_attention_fwd

    q, k, v = _inputs(2, 4, 2, 45, 8, seed=15)  # GQA, ragged, runs of blocks
    layout = _layout(4, 6, 8, 0.5, seed=16)
    kpm = torch.rand(2, 45, generator=torch.Generator().manual_seed(17)) > 0.2
    p, seed = 0.3, torch.tensor(99)
    args = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices)
    out, _ = block_sparse_attention_fwd(q, k, v, *args, 8, 0.4, causal, kpm, p, seed, False)
    keep = native_cpu.dropout_keep_mask(2, 4, 45, 45, p, seed)
    ref, _ = reference_attention(q, k, v, layout, 0.4, causal, kpm, dropout_keep=keep, dropout_p=p)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_use_kernel_switches_and_restores(monkeypatch):
    monkeypatch.delenv("SPION_FX_CPU_KERNEL", raising=False)
    with native_cpu.use_kernel("grouped"):
        assert not native_cpu.handles(torch.float32, False)
    assert native_cpu.handles(torch.float32, False)
    with pytest.raises(ValueError, match="native' or 'grouped"):
        with native_cpu.use_kernel("fast"):
            pass


def test_preload_loads_the_kernel_once_in_a_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(native_cpu, "_state", {})
    monkeypatch.setattr(native_cpu, "_load", lambda: calls.append(1) or "lib")
    native_cpu.preload()
    native_cpu.preload()  # a second model: nothing more
    assert native_cpu.library() == "lib"  # waits for the thread's load under the same lock
    assert calls == [1]
