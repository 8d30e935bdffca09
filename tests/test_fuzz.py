"""Property tests (hypothesis) for the block-sparse attention kernels and pattern generation.

- the CPU op `block_sparse_attention` (both CPU kernels: native and grouped) against
  `reference_attention` in float64, forward and gradients, over random batch / heads / GQA groups /
  lengths (not multiples of the block) / head dims / block sizes / block densities (empty rows,
  diagonal only, random, dense) / causal / key padding (fully padded batch rows included: their
  outputs must be 0) / attention dropout (reference given the keep mask the kernel drew);
- the Triton launchers under the interpreter (TRITON_INTERPRET=1 is set by conftest.py when
  there is no GPU) against the same float64 reference, on tiny shapes;
- `generate_pattern` on random matrices: shape, dtype, diagonal, causal, determinism.

Nothing here changes global state: every tensor comes from a local torch.Generator.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spion_fx.kernels import BlockLayout, reference_attention
from spion_fx.runtime.pattern import generate_pattern

FUZZ = settings(
    max_examples=25, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRITON_FUZZ = settings(FUZZ, max_examples=10)


# ----------------------------------------------------------------------------------- cases


@st.composite
def attention_cases(draw, block_sizes=(4, 8, 16), max_len=40, head_dims=(1, 4, 8, 16)):
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    h = hkv * draw(st.integers(1, 3))  # GQA: H is a multiple of Hkv
    bs = draw(st.sampled_from(block_sizes))
    length = draw(st.integers(1, max_len))
    d = draw(st.sampled_from(head_dims))
    nb = -(-length // bs)
    layout_heads = draw(st.sampled_from([1, h]))
    kind = draw(st.sampled_from(["diagonal", "dense", "random", "random_no_diag"]))
    causal = draw(st.booleans())
    padding = draw(st.sampled_from(["none", "random", "with_empty_row"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense":
        grid = torch.ones(layout_heads, nb, nb, dtype=torch.bool)
    elif kind == "diagonal":
        grid = torch.eye(nb, dtype=torch.bool).expand(layout_heads, nb, nb).clone()
    else:
        density = draw(st.floats(0.0, 1.0))
        grid = torch.rand(layout_heads, nb, nb, generator=gen) < density
        if kind == "random":
            grid |= torch.eye(nb, dtype=torch.bool)
    kpm = None
    if padding != "none":
        kpm = torch.rand(b, length, generator=gen) < 0.7
        kpm[:, 0] = True  # at least one real key per row...
        if padding == "with_empty_row":
            kpm[draw(st.integers(0, b - 1))] = False  # ...except one fully padded batch row
    return dict(b=b, h=h, hkv=hkv, length=length, d=d, bs=bs, grid=grid, causal=causal,
                kpm=kpm, seed=seed)


def _inputs(case, dtype):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, length, d = case["b"], case["h"], case["hkv"], case["length"], case["d"]
    q = torch.randn(b, h, length, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(b, h, length, d, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, grad


def _reference(q, k, v, layout, case):
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, lse = reference_attention(q, k, v, layout, None, case["causal"], case["kpm"])
    return (q, k, v), out, lse


def _assert_empty_rows_zero(out, layout, case):
    """Rows that see no key at all (padding, causal, empty pattern rows) must output exactly 0."""
    from spion_fx.kernels.attention.reference import dense_block_mask

    lq = out.shape[2]
    visible = dense_block_mask(layout, lq, lq, case["causal"], case["kpm"])
    visible = visible.expand(out.shape[0], out.shape[1], lq, lq)
    empty = ~visible.any(-1)
    if case["kpm"] is not None and bool((~case["kpm"].any(-1)).any()):
        assert empty.any(), "a fully padded batch row must give empty rows"
    assert bool((out[empty] == 0).all()), "rows with no visible key must be 0"
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------- CPU op


def _cpu_kernel(name: str):
    """Run on one CPU kernel (a context, not monkeypatch: hypothesis forbids function fixtures)."""
    from spion_fx.kernels.attention import native_cpu

    if name == "native" and native_cpu.library() is None:
        pytest.skip("no C++ compiler: the native CPU kernel is unavailable")
    return native_cpu.use_kernel(name)


@pytest.mark.parametrize("kernel", ["native", "grouped"])
@FUZZ
@given(case=attention_cases(), dropout_p=st.sampled_from([0.0, 0.0, 0.3]))
def test_cpu_op_matches_reference(kernel, case, dropout_p):
    from spion_fx.kernels import block_sparse_attention_fwd
    from spion_fx.kernels.attention.block_sparse_cpu import dropout_keep_mask

    q, k, v, grad = _inputs(case, torch.float64)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    layout = BlockLayout.from_dense(case["grid"], case["bs"])
    seed = torch.tensor(case["seed"], dtype=torch.int64)
    with _cpu_kernel(kernel):
        out, _ = block_sparse_attention_fwd(
            q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks,
            layout.q_indices, case["bs"], q.shape[-1] ** -0.5, case["causal"], case["kpm"],
            dropout_p, seed, False,
        )  # fmt: skip
        keep = None
        if dropout_p:
            keep = dropout_keep_mask(
                tuple(q.shape), tuple(k.shape), layout.kv_num_blocks, layout.kv_indices,
                case["bs"], case["causal"], dropout_p, seed,
            )  # fmt: skip
        got = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, _ = reference_attention(
        rq, rk, rv, layout, None, case["causal"], case["kpm"], dropout_keep=keep,
        dropout_p=dropout_p,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    _assert_empty_rows_zero(out.detach(), layout, case)
    want = torch.autograd.grad(ref, (rq, rk, rv), grad)
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        # lse is kept in float32, so float64 gradients agree to ~1e-7 only
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


# ----------------------------------------------------------------------------------- Triton



def _triton():
    pytest.importorskip("triton")
    from spion_fx.kernels.attention import triton_attention

    if not triton_attention.INTERPRET and not torch.cuda.is_available():
        pytest.skip("compiled Triton needs CUDA; TRITON_INTERPRET=1 is not set")
    return triton_attention


@TRITON_FUZZ
@given(attention_cases(block_sizes=(16, 32), max_len=40, head_dims=(8, 16, 32)))
def test_triton_launchers_match_reference(case):
    ta = _triton()
    device = "cpu" if ta.INTERPRET else "cuda"
    q, k, v, grad = (t.to(device) for t in _inputs(case, torch.float32))
    layout = BlockLayout.from_dense(case["grid"], case["bs"])
    lay = layout.to(device)
    kpm = None if case["kpm"] is None else case["kpm"].to(device)
    scale = 1.0 / math.sqrt(case["d"])
    args = (lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, case["bs"], scale,
            case["causal"], kpm, 0.0, torch.zeros((), dtype=torch.int64), False)
    out, lse = ta.triton_block_sparse_fwd(q, k, v, *args)
    (rq, rk, rv), ref, ref_lse = _reference(q.cpu(), k.cpu(), v.cpu(), layout, case)
    tol = 2e-4 if ta.INTERPRET else 5e-3  # TF32 dots on GPU
    torch.testing.assert_close(out.double().cpu(), ref.double(), atol=tol, rtol=tol)
    _assert_empty_rows_zero(out.cpu(), layout, case)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite], atol=tol, rtol=tol)
    dq, dk, dv = ta.triton_block_sparse_bwd(grad, q, k, v, out, lse, *args)
    want = torch.autograd.grad(ref, (rq, rk, rv), grad.double().cpu())
    for name, g, w in zip("qkv", (dq, dk, dv), want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g.double().cpu(), w, atol=4 * tol, rtol=4 * tol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


# ----------------------------------------------------------------------------------- patterns


@st.composite
def pattern_cases(draw):
    length = draw(st.integers(1, 70))
    bs = draw(st.integers(1, 16))
    heads = draw(st.sampled_from([None, 1, 3]))
    variant = draw(st.sampled_from(["cf", "f", "c"]))
    kwargs = dict(block_size=bs, variant=variant, causal=draw(st.booleans()),
                  filter_size=draw(st.sampled_from([1, 3, 5, 31])))
    if variant == "c":
        kwargs["density"] = draw(st.floats(0.01, 1.0))
    else:
        kwargs["quantile"] = draw(st.floats(0.0, 1.0))
    if heads is not None:
        kwargs["per_head"] = draw(st.booleans())
    form = draw(st.sampled_from(["softmax", "uniform", "constant", "sparse"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (length, length) if heads is None else (heads, length, length)
    if form == "softmax":
        attn = torch.softmax(3.0 * torch.randn(shape, generator=gen, dtype=torch.float64), -1)
    elif form == "uniform":
        attn = torch.rand(shape, generator=gen, dtype=torch.float64)
    elif form == "constant":
        attn = torch.full(shape, 1.0 / length, dtype=torch.float64)
    else:
        attn = torch.rand(shape, generator=gen, dtype=torch.float64) * (
            torch.rand(shape, generator=gen) < 0.1)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return attn.to(dtype), kwargs


@settings(FUZZ, max_examples=25)
@given(pattern_cases())
def test_generate_pattern_properties(case):
    attn, kwargs = case
    before = attn.clone()
    pattern = generate_pattern(attn, **kwargs)
    nb = -(-attn.shape[-1] // kwargs["block_size"])
    per_head = kwargs.get("per_head", False)
    want_shape = (attn.shape[0], nb, nb) if per_head else (nb, nb)
    assert pattern.dtype == torch.bool and tuple(pattern.shape) == want_shape
    eye = torch.eye(nb, dtype=torch.bool)
    assert bool(pattern[..., eye].all()), "the block diagonal must always be kept"
    if kwargs["causal"]:
        assert not bool(pattern[..., ~torch.ones(nb, nb, dtype=torch.bool).tril()].any())
    if kwargs["variant"] == "c":
        # the budget counts the diagonal; never more off-diagonal cells than it allows
        cells = nb * (nb + 1) // 2 if kwargs["causal"] else nb * nb
        off = pattern[..., ~eye].reshape(-1, nb * nb - nb).sum(-1) if nb > 1 else torch.zeros(1)
        assert int(off.max()) <= max(math.floor(cells * kwargs["density"] - nb), 0)
    assert torch.equal(generate_pattern(attn, **kwargs), pattern), "must be deterministic"
    assert torch.equal(attn, before), "the input must not be modified"
