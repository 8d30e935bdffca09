"""Per-input (batched) block layouts and the routed layout built on the device.

Every kernel that takes a batched layout [B', H', nQB, ...] is fuzzed against the float64 dense
reference restricted to each input's own blocks: the native CPU kernel, the grouped CPU fallback
and the Triton kernels (under the interpreter on CPU). The routed layout is checked for its
guarantees (diagonal and sinks kept, causal respected, exactly min(top_k, candidates) picks,
halves consistent) and traced with ``fullgraph=True`` (no ``.item()``, no ``nonzero``).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from spion_fx.kernels import BlockLayout, block_sparse_attention, reference_attention
from spion_fx.kernels.attention import block_sparse_cpu, native_cpu
from spion_fx.kernels.attention.block_sparse_op import (
    block_sparse_attention_bwd,
    block_sparse_attention_fwd,
)
from spion_fx.kernels.attention.routing import routed_blocks, routed_layout

if not torch.cuda.is_available():  # Triton runs under its interpreter (set before it is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _case(seed: int, block: int = 8, max_len: int = 45):
    rng = random.Random(seed)
    b = rng.choice((1, 2))
    hkv = rng.choice((1, 2))
    h = hkv * rng.choice((1, 2))
    lq = rng.randint(block + 1, max_len)
    lk = lq if rng.random() < 0.7 else rng.randint(block + 1, max_len)
    causal = rng.random() < 0.5
    padding = rng.random() < 0.5
    b_layout = b if rng.random() < 0.8 else 1
    h_layout = h if rng.random() < 0.6 else 1
    return b, h, hkv, lq, lk, causal, padding, b_layout, h_layout


def _inputs(b, h, hkv, lq, lk, d, dtype, seed, padding):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=dtype)
    kpm = None
    if padding:
        kpm = torch.ones(b, lk, dtype=torch.bool)
        kpm[-1, lk - max(1, lk // 3) :] = False
    return q, k, v, kpm


def _random_batched_layout(bl, hl, nqb, nkb, block, seed) -> BlockLayout:
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(bl, hl, nqb, nkb, generator=gen) < 0.45
    grid |= torch.eye(nqb, nkb, dtype=torch.bool)
    return BlockLayout.from_dense(grid, block)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _check_against_reference(q, k, v, layout, causal, kpm, run, keep=None, p=0.0, tol=1e-6):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = run(*leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want, _ = reference_attention(
        *ref_leaves, layout, causal=causal, key_padding_mask=kpm, dropout_keep=keep, dropout_p=p
    )
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    grad = torch.randn_like(want)
    got = _grads(out, leaves, grad.to(out.dtype))
    expected = _grads(want, ref_leaves, grad)
    for g, w in zip(got, expected):
        # the op keeps lse in float32, so float64 gradients agree to ~1e-7
        torch.testing.assert_close(g.double(), w, atol=max(tol, 2e-6), rtol=max(tol, 2e-6))


@pytest.mark.parametrize("kernel", ["native", "grouped"])
@pytest.mark.parametrize("seed", range(8))
def test_cpu_kernels_take_batched_layouts(kernel, seed):
    b, h, hkv, lq, lk, causal, padding, bl, hl = _case(seed)
    block = 8
    q, k, v, kpm = _inputs(b, h, hkv, lq, lk, 8, torch.float64, seed, padding)
    layout = _random_batched_layout(bl, hl, -(-lq // block), -(-lk // block), block, seed)
    assert layout.batched and layout.num_batch == bl
    with native_cpu.use_kernel(kernel):
        _check_against_reference(
            q, k, v, layout, causal, kpm,
            lambda q, k, v: block_sparse_attention(
                q, k, v, layout, causal=causal, key_padding_mask=kpm
            ),
        )  # fmt: skip


@pytest.mark.parametrize("kernel", ["native", "grouped"])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_kernels_dropout_with_batched_layouts(kernel, causal):
    b, h, hkv, lq, lk, block, p = 2, 4, 2, 37, 37, 8, 0.3
    q, k, v, kpm = _inputs(b, h, hkv, lq, lk, 8, torch.float64, 5, True)
    layout = _random_batched_layout(b, h, 5, 5, block, 9)
    seed = torch.tensor(1234, dtype=torch.int64)
    tensors = layout._tensors()
    with native_cpu.use_kernel(kernel):
        keep = block_sparse_cpu.dropout_keep_mask(
            q.shape, k.shape, tensors[0], tensors[1], block, causal, p, seed
        )

        def run(q, k, v):
            return _DropoutOp.apply(q, k, v, tensors, block, causal, kpm, p, seed)

        _check_against_reference(q, k, v, layout, causal, kpm, run, keep=keep, p=p)


class _DropoutOp(torch.autograd.Function):
    """The op with a fixed seed (the public function draws a fresh one per call)."""

    @staticmethod
    def forward(ctx, q, k, v, tensors, block, causal, kpm, p, seed):
        out, lse = block_sparse_attention_fwd(
            q, k, v, *tensors, block, q.shape[-1] ** -0.5, causal, kpm, p, seed, False
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (tensors, block, causal, kpm, p, seed)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        tensors, block, causal, kpm, p, seed = ctx.args
        dq, dk, dv = block_sparse_attention_bwd(
            grad.contiguous(), q, k, v, out, lse, *tensors, block, q.shape[-1] ** -0.5, causal,
            kpm, p, seed, False,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None


def test_shared_and_batched_forms_agree():
    q, k, v, _ = _inputs(2, 2, 2, 40, 40, 8, torch.float32, 3, False)
    shared = _random_batched_layout(1, 2, 5, 5, 8, 4).select_batch(0)
    assert not shared.batched
    a = block_sparse_attention(q, k, v, shared, causal=True)
    b = block_sparse_attention(q, k, v, shared.as_batched(), causal=True)
    expanded = BlockLayout.from_dense(shared.to_dense().expand(2, -1, -1, -1).contiguous(), 8)
    c = block_sparse_attention(q, k, v, expanded, causal=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_batched_layout_validation():
    q, k, v, _ = _inputs(2, 2, 2, 16, 16, 8, torch.float32, 3, False)
    wrong_batch = _random_batched_layout(3, 2, 2, 2, 8, 0)
    with pytest.raises(ValueError, match="B'"):
        block_sparse_attention(q, k, v, wrong_batch)
    good = _random_batched_layout(2, 2, 2, 2, 8, 1)
    kv_num, kv_idx, q_num, q_idx = (t.clone() for t in good._tensors())
    q_num[1, 0, 0] = 0  # the q columns of input 1 drop a block the kv rows keep
    q_idx[1, 0, 0] = q_idx[1, 0, 1]
    with pytest.raises(ValueError, match="batch 1, head 0"):
        BlockLayout(kv_num, kv_idx, q_num, q_idx, 8).check()
    BlockLayout(*(t.clone() for t in good._tensors()), 8).check()


def test_opcheck_with_a_batched_layout():
    q, k, v, kpm = _inputs(2, 2, 1, 20, 20, 4, torch.float32, 7, True)
    layout = _random_batched_layout(2, 2, 3, 3, 8, 2)
    args = (q, k, v, *layout._tensors(), 8, 0.5, True, kpm, 0.0, torch.tensor(0), False)
    torch.library.opcheck(block_sparse_attention_fwd, args)


# ----------------------------------------------------------------------------- routed layout


@pytest.mark.parametrize("seed", range(6))
def test_routed_layout_properties(seed):
    rng = random.Random(100 + seed)
    b, h, hkv, lq, _, causal, padding, _, _ = _case(100 + seed, block=8, max_len=70)
    lk = lq
    block, top_k, sinks = 8, rng.randint(0, 3), rng.randint(0, 2)
    kv_group = rng.random() < 0.5
    q, k, _, kpm = _inputs(b, h, hkv, lq, lk, 8, torch.float32, seed, padding)
    layout, chosen, scores = routed_layout(
        q, k, block_size=block, top_k=top_k, sink_blocks=sinks, causal=causal,
        key_padding_mask=kpm, kv_group=kv_group, return_scores=True,
    )  # fmt: skip
    nqb, nkb = -(-lq // block), -(-lk // block)
    assert layout.batched and layout.num_batch == b and layout.num_heads in (1, h)
    assert layout.kv_indices.shape[-1] == min(top_k + sinks + 1, nkb)
    BlockLayout(*(t.clone() for t in layout._tensors()), block).check()  # halves agree
    grid = layout.to_dense()  # [B, H', nQB, nKB]
    qb = torch.arange(nqb).view(-1, 1)
    kb = torch.arange(nkb).view(1, -1)
    diag = kb == qb
    assert bool(grid[..., diag].all()), "diagonal kept"
    visible = kb <= qb if causal else torch.ones(nqb, nkb, dtype=torch.bool)
    sink = (kb < sinks) & visible
    assert bool(grid[..., sink].all()), "sinks kept"
    if causal:
        assert not bool(grid[..., ~visible].any()), "nothing right of the diagonal"
    # exactly min(top_k, candidates) picks per row
    real_block = torch.ones(b, nkb, dtype=torch.bool)
    if kpm is not None:
        real_block = torch.nn.functional.pad(kpm, (0, nkb * block - lk)).view(b, nkb, block).any(-1)
    candidates = (visible & ~diag & ~sink)[None] & real_block[:, None, :]  # [B, nQB, nKB]
    want = candidates.sum(-1).clamp(max=top_k)  # [B, nQB]
    assert torch.equal(chosen.sum(-1), want[:, None].expand_as(chosen.sum(-1)))
    assert not bool((chosen & ~candidates[:, None]).any())
    extra = (grid & ~(diag | sink)).sum(-1)
    assert torch.equal(extra, want[:, None].expand_as(extra))
    # the picks are the best-scored candidates
    masked = scores.masked_fill(~candidates[:, None], float("-inf"))
    worst_pick = masked.masked_fill(~chosen, float("inf")).amin(-1)
    best_left = masked.masked_fill(chosen, float("-inf")).amax(-1)
    has_pick = chosen.any(-1)
    assert bool((worst_pick[has_pick] >= best_left[has_pick]).all())


def test_routed_layout_has_no_host_sync():
    torch._dynamo.reset()
    q, k, _, kpm = _inputs(2, 4, 2, 50, 50, 8, torch.float32, 0, True)
    kwargs = dict(block_size=8, top_k=2, sink_blocks=1, causal=True, key_padding_mask=kpm)
    traced = torch.compile(routed_blocks, fullgraph=True, backend="eager")
    for got, want in zip(traced(q, k, **kwargs), routed_blocks(q, k, **kwargs)):
        assert torch.equal(got, want)
    traced_layout = torch.compile(routed_layout, fullgraph=True, backend="eager")(q, k, **kwargs)
    eager = routed_layout(q, k, **kwargs)
    for got, want in zip(traced_layout._tensors(), eager._tensors()):
        assert torch.equal(got, want)


def test_routed_attention_end_to_end_fwd_bwd():
    q, k, v, kpm = _inputs(2, 4, 2, 45, 45, 8, torch.float64, 11, True)
    layout = routed_layout(q, k, block_size=8, top_k=2, causal=True, key_padding_mask=kpm)
    _check_against_reference(
        q, k, v, layout, True, kpm,
        lambda q, k, v: block_sparse_attention(q, k, v, layout, causal=True, key_padding_mask=kpm),
    )  # fmt: skip


def test_routed_attention_compiles_in_one_graph():
    torch._dynamo.reset()
    q, k, v, _ = _inputs(1, 2, 2, 32, 32, 8, torch.float32, 2, False)

    def step(q, k, v):
        layout = routed_layout(q.detach(), k.detach(), block_size=8, top_k=1, causal=True)
        return block_sparse_attention(q, k, v, layout, causal=True).square().sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(step(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------- Triton


def _triton():
    pytest.importorskip("triton")
    from spion_fx.kernels.attention import triton_attention

    if not triton_attention.INTERPRET and not torch.cuda.is_available():
        pytest.skip("compiled Triton needs CUDA; set TRITON_INTERPRET=1")
    return triton_attention


@pytest.mark.parametrize("seed", range(3))
def test_triton_takes_batched_layouts(seed):
    ta = _triton()
    device = "cpu" if ta.INTERPRET else "cuda"
    b, h, hkv, lq, lk, causal, padding, bl, hl = _case(200 + seed, block=16, max_len=40)
    block = 16
    q, k, v, kpm = _inputs(b, h, hkv, lq, lk, 16, torch.float32, seed, padding)
    if seed == 0:  # the routed layout itself
        layout = routed_layout(q, k, block_size=block, top_k=1, causal=causal, key_padding_mask=kpm)
    else:
        layout = _random_batched_layout(bl, hl, -(-lq // block), -(-lk // block), block, seed)
    q, k, v = (t.to(device) for t in (q, k, v))
    kpm_d = None if kpm is None else kpm.to(device)
    tensors = [t.to(device) for t in layout._tensors()]
    zero = torch.zeros((), dtype=torch.int64)
    scale = 16**-0.5
    out, lse = ta.triton_block_sparse_fwd(
        q, k, v, *tensors, block, scale, causal, kpm_d, 0.0, zero, False
    )
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    want, _ = reference_attention(*ref_leaves, layout, causal=causal, key_padding_mask=kpm)
    tol = 2e-4 if ta.INTERPRET else 5e-3
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    grad = torch.randn_like(want)
    got = ta.triton_block_sparse_bwd(
        grad.float().to(device), q, k, v, out, lse, *tensors, block, scale, causal, kpm_d, 0.0,
        zero, False,
    )  # fmt: skip
    expected = torch.autograd.grad(want, ref_leaves, grad)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), w, atol=tol * 5, rtol=tol * 5)
