"""Block-sparse decode attention (queries at the end of a KV cache) against the full-length op's
rows and the float64 dense reference."""

from __future__ import annotations

import random

import pytest
import torch

from spion_fx.kernels import (
    BlockLayout,
    DecodeLayout,
    block_sparse_attention,
    block_sparse_decode_attention,
    reference_attention,
)


def nblocks(length: int, bs: int) -> int:
    return -(-length // bs)


def random_pattern(heads: int, nb: int, density: float, gen: torch.Generator, diagonal=True):
    grid = torch.rand(heads, nb, nb, generator=gen) < density
    if diagonal:
        i = torch.arange(nb)
        grid[:, i, i] = True
    return grid


def left_padding(b: int, lk: int, gen: torch.Generator) -> torch.Tensor:
    """bool [B, Lk], True = real key; sample i has a random number of leading pad tokens."""
    pads = torch.randint(0, lk, (b,), generator=gen)
    return torch.arange(lk)[None, :] >= pads[:, None]


def full_rows(q_full, k, v, pattern, bs, lq, *, scale, causal, kpm):
    """(rows of the full-length op, rows of the float64 reference) for the last lq queries."""
    nkb = nblocks(k.shape[2], bs)
    layout = BlockLayout.from_dense(pattern[:, :nkb, :nkb].contiguous(), bs)
    with torch.no_grad():
        op = block_sparse_attention(
            q_full, k, v, layout, scale=scale, causal=causal, key_padding_mask=kpm
        )
        ref, _ = reference_attention(
            q_full.double(), k.double(), v.double(), layout, scale, causal, kpm
        )
    return op[:, :, -lq:], ref[:, :, -lq:]


def _case(seed: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    bs = rng.choice([2, 4, 8])
    hkv = rng.choice([1, 2])
    h = hkv * rng.choice([1, 2, 3])
    lq = rng.choice([1, 3, bs + 2])
    lk = rng.randint(lq, 5 * bs + 3)
    b, d = rng.choice([1, 2]), rng.choice([4, 8])
    per_head = rng.random() < 0.5
    extra = rng.choice([0, 0, 2])  # a pattern for a longer length is cropped
    nb = nblocks(lk, bs) + extra
    pattern = random_pattern(h if per_head else 1, nb, rng.choice([0.1, 0.3, 0.6]), gen,
                             diagonal=rng.random() < 0.8)
    causal = rng.random() < 0.6
    kpm = left_padding(b, lk, gen) if rng.random() < 0.4 else None
    scale = rng.choice([None, 0.3])
    kv_heads = hkv if per_head and rng.random() < 0.5 else None
    q_full = torch.randn(b, h, lk, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d, generator=gen)
    return dict(bs=bs, lq=lq, lk=lk, pattern=pattern, causal=causal, kpm=kpm, scale=scale,
                kv_heads=kv_heads, q_full=q_full, k=k, v=v)


@pytest.mark.parametrize("path", ["inference", "autograd"])
@pytest.mark.parametrize("seed", range(60))
def test_fuzz_matches_full_op_rows(seed, path):
    """Without and with inputs needing grad, the full op's rows."""
    c = _case(seed)
    lq, lk = c["lq"], c["lk"]
    layout = DecodeLayout.from_pattern(c["pattern"], c["bs"], lk, lq, num_kv_heads=c["kv_heads"])
    q = c["q_full"][:, :, lk - lq:]
    k, v = c["k"], c["v"]
    if path == "autograd":
        q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = block_sparse_decode_attention(
        q, k, v, layout, scale=c["scale"], causal=c["causal"], key_padding_mask=c["kpm"]
    ).detach()
    op, ref = full_rows(c["q_full"], c["k"], c["v"], c["pattern"], c["bs"], lq,
                        scale=c["scale"], causal=c["causal"], kpm=c["kpm"])
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, op, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_layout_serves_every_length_of_its_block_count(causal):
    """Built once per block count: every Lk in it and every Lq <= max_lq gives the right rows."""
    gen = torch.Generator().manual_seed(1)
    bs, h, d = 4, 2, 8
    pattern = random_pattern(h, 6, 0.3, gen)
    layout = DecodeLayout.from_pattern(pattern, bs, 17, max_lq=bs + 2)  # 5 blocks: Lk 17..20
    for lk in range(17, 21):
        q_full = torch.randn(1, h, lk, d, generator=gen)
        k, v = torch.randn(2, 1, h, lk, d, generator=gen)
        for lq in (1, 2, 3, bs + 2):
            out = block_sparse_decode_attention(q_full[:, :, lk - lq:], k, v, layout, causal=causal)
            op, ref = full_rows(q_full, k, v, pattern, bs, lq, scale=None, causal=causal, kpm=None)
            torch.testing.assert_close(out, op, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_reads_only_kept_blocks():
    """NaN in every key block the query's row prunes changes nothing; the gather is that small."""
    gen = torch.Generator().manual_seed(2)
    bs, lk, h, d = 8, 8 * 12 + 5, 4, 16
    nkb = nblocks(lk, bs)
    pattern = torch.zeros(1, nkb, nkb, dtype=torch.bool)
    pattern[0, -1, [0, 3, 7, nkb - 2, nkb - 1]] = True
    layout = DecodeLayout.from_pattern(pattern, bs, lk)
    assert layout.gathered_tokens == 5 * bs
    q = torch.randn(1, h, 1, d, generator=gen)
    k, v = torch.randn(2, 1, 2, lk, d, generator=gen)
    expected = block_sparse_decode_attention(q, k, v, layout)
    pruned = torch.ones(lk, dtype=torch.bool)
    for j in (0, 3, 7, nkb - 2, nkb - 1):
        pruned[j * bs:(j + 1) * bs] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, pruned] = float("nan")
    v2[:, :, pruned] = float("nan")
    torch.testing.assert_close(block_sparse_decode_attention(q, k2, v2, layout), expected)


def test_gqa_per_head_reads_once_per_kv_head():
    gen = torch.Generator().manual_seed(3)
    bs, lk, h, hkv, d = 4, 30, 6, 2, 8
    pattern = random_pattern(h, nblocks(lk, bs), 0.3, gen)
    per_kv = DecodeLayout.from_pattern(pattern, bs, lk, num_kv_heads=hkv)
    per_q = DecodeLayout.from_pattern(pattern, bs, lk)
    assert per_kv.num_index_heads == hkv and per_q.num_index_heads == h
    q = torch.randn(2, h, 1, d, generator=gen)
    k, v = torch.randn(2, 2, hkv, lk, d, generator=gen)
    a = block_sparse_decode_attention(q, k, v, per_kv)
    torch.testing.assert_close(block_sparse_decode_attention(q, k, v, per_q), a, atol=1e-6, rtol=1e-6)
    q_full = torch.cat([torch.randn(2, h, lk - 1, d, generator=gen), q], 2)
    op, _ = full_rows(q_full, k, v, pattern, bs, 1, scale=None, causal=True, kpm=None)
    torch.testing.assert_close(a, op, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["static_cache_slice", "transposed", "per_head_transposed"])
def test_strided_caches(kind):
    """A static cache's prefix view, and K/V kept as [B, L, H, D] transposed."""
    gen = torch.Generator().manual_seed(4)
    bs, lk, h, hkv, d, lq = 4, 21, 4, 2, 8, 3
    per_head = kind == "per_head_transposed"
    pattern = random_pattern(h if per_head else 1, nblocks(lk, bs), 0.4, gen)
    q_full = torch.randn(1, h, lk, d, generator=gen)
    if kind == "static_cache_slice":
        k_buf, v_buf = torch.randn(2, 1, hkv, 40, d, generator=gen)
        k, v = k_buf[:, :, :lk], v_buf[:, :, :lk]
    else:
        k_buf, v_buf = torch.randn(2, 1, lk, hkv, d, generator=gen)
        k, v = k_buf.transpose(1, 2), v_buf.transpose(1, 2)
    layout = DecodeLayout.from_pattern(pattern, bs, lk, lq, num_kv_heads=hkv if per_head else None)
    out = block_sparse_decode_attention(q_full[:, :, -lq:], k, v, layout, causal=True)
    op, _ = full_rows(q_full, k.contiguous(), v.contiguous(), pattern, bs, lq, scale=None,
                      causal=True, kpm=None)
    torch.testing.assert_close(out, op, atol=1e-5, rtol=1e-5)


def test_per_head_strided_static_cache():
    """Per-kv-head gather over a static cache prefix (head stride larger than Lk rows)."""
    gen = torch.Generator().manual_seed(5)
    bs, lk, h, hkv, d = 4, 13, 4, 2, 8
    pattern = random_pattern(h, nblocks(lk, bs), 0.5, gen)
    k_buf, v_buf = torch.randn(2, 2, hkv, 32, d, generator=gen)
    k, v = k_buf[:, :, :lk], v_buf[:, :, :lk]
    q_full = torch.randn(2, h, lk, d, generator=gen)
    layout = DecodeLayout.from_pattern(pattern, bs, lk, num_kv_heads=hkv)
    out = block_sparse_decode_attention(q_full[:, :, -1:], k, v, layout)
    op, _ = full_rows(q_full, k.contiguous(), v.contiguous(), pattern, bs, 1, scale=None,
                      causal=True, kpm=None)
    torch.testing.assert_close(out, op, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_gradients_match_reference(seed):
    """Inputs that need grad get the reference's gradients, also through rows that see nothing."""
    c = _case(100 + seed)
    lq, lk = c["lq"], c["lk"]
    kpm = c["kpm"]
    if kpm is None:  # make sure some query row sees no key at all
        kpm = torch.ones(c["k"].shape[0], lk, dtype=torch.bool)
        kpm[0, :] = False
    layout = DecodeLayout.from_pattern(c["pattern"], c["bs"], lk, lq, num_kv_heads=c["kv_heads"])
    q = c["q_full"][:, :, lk - lq:].double().requires_grad_(True)
    k = c["k"].double().requires_grad_(True)
    v = c["v"].double().requires_grad_(True)
    grad = torch.randn_like(q)
    out = block_sparse_decode_attention(q, k, v, layout, scale=c["scale"], causal=c["causal"],
                                        key_padding_mask=kpm)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    nkb = nblocks(lk, c["bs"])
    full = BlockLayout.from_dense(c["pattern"][:, :nkb, :nkb].contiguous(), c["bs"])
    q_full = torch.cat([c["q_full"][:, :, :lk - lq].double(), q], 2)
    ref, _ = reference_attention(q_full, k, v, full, c["scale"], c["causal"], kpm)
    rq, rk, rv = torch.autograd.grad(ref[:, :, lk - lq:], (q, k, v), grad)
    for ours, theirs in ((out, ref[:, :, lk - lq:]), (dq, rq), (dk, rk), (dv, rv)):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types(dtype):
    gen = torch.Generator().manual_seed(6)
    bs, lk, h, d = 8, 37, 2, 16
    pattern = random_pattern(1, nblocks(lk, bs), 0.4, gen)
    q_full = torch.randn(1, h, lk, d, generator=gen)
    k, v = torch.randn(2, 1, h, lk, d, generator=gen)
    layout = DecodeLayout.from_pattern(pattern, bs, lk)
    out = block_sparse_decode_attention(q_full[:, :, -1:].to(dtype), k.to(dtype), v.to(dtype), layout)
    assert out.dtype == dtype
    _, ref = full_rows(q_full.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(),
                       pattern, bs, 1, scale=None, causal=True, kpm=None)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_bad_input():
    pattern = torch.ones(1, 4, 4, dtype=torch.bool)
    layout = DecodeLayout.from_pattern(pattern, 4, 16)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="key blocks"):
        block_sparse_decode_attention(q, k[:, :, :11], k[:, :, :11], layout)
    with pytest.raises(ValueError, match="max_lq"):
        block_sparse_decode_attention(torch.randn(1, 2, 2, 8), k, k, layout)
    with pytest.raises(ValueError, match="resize_pattern"):
        DecodeLayout.from_pattern(pattern, 4, 17)
    with pytest.raises(ValueError, match="key_padding_mask"):
        block_sparse_decode_attention(q, k, k, layout, key_padding_mask=torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        DecodeLayout.from_pattern(pattern.float(), 4, 16)
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecodeLayout.from_pattern(torch.ones(4, 4, 4, dtype=torch.bool), 4, 16, num_kv_heads=3)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(7)
    bs, lk, h, hkv, d, lq = 16, 100, 4, 2, 32, 3
    pattern = random_pattern(h, nblocks(lk, bs), 0.3, gen)
    q = torch.randn(2, h, lq, d, generator=gen)
    k, v = torch.randn(2, 2, hkv, lk, d, generator=gen)
    kpm = left_padding(2, lk, gen)
    cpu = DecodeLayout.from_pattern(pattern, bs, lk, lq, num_kv_heads=hkv)
    gpu = DecodeLayout.from_pattern(pattern.cuda(), bs, lk, lq, num_kv_heads=hkv)
    expected = block_sparse_decode_attention(q, k, v, cpu, key_padding_mask=kpm)
    out = block_sparse_decode_attention(q.cuda(), k.cuda(), v.cuda(), gpu, key_padding_mask=kpm.cuda())
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_rows_that_see_nothing_are_zero(grad):
    """A sample whose keys are all padding, and a pattern row keeping no block: zero rows."""
    bs, lk, h, d = 4, 10, 2, 8
    pattern = torch.zeros(1, 3, 3, dtype=torch.bool)
    pattern[0, 2, 0] = True  # the decode row keeps block 0 only
    q, k, v = torch.randn(2, h, 1, d), torch.randn(2, h, lk, d), torch.randn(2, h, lk, d)
    if grad:
        q.requires_grad_(True)
    kpm = torch.ones(2, lk, dtype=torch.bool)
    kpm[0] = False
    kpm[1, :4] = False  # sample 1: block 0 is all padding too
    layout = DecodeLayout.from_pattern(pattern, bs, lk)
    out = block_sparse_decode_attention(q, k, v, layout, key_padding_mask=kpm)
    assert torch.equal(out, torch.zeros_like(out))
    empty = DecodeLayout.from_pattern(torch.zeros(1, 3, 3, dtype=torch.bool), bs, lk)
    assert empty.may_have_empty_rows == (True, True)
    out = block_sparse_decode_attention(q, k, v, empty)
    assert torch.equal(out, torch.zeros_like(out))


def test_density_is_the_gathered_fraction():
    pattern = torch.zeros(1, 10, 10, dtype=torch.bool)
    pattern[0, 9, [0, 8, 9]] = True
    layout = DecodeLayout.from_pattern(pattern, 4, 38)
    assert layout.gathered_tokens == 12 and layout.density == pytest.approx(12 / 40)
