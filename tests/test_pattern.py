"""SPION pattern generation: vectorised generate_pattern against the faithful original, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spion_fx.runtime.pattern import (
    block_scores,
    generate_pattern,
    pattern_density,
    resize_pattern,
)
from spion_fx.runtime.pattern_original import (
    flood_fill_original,
    generate_pattern_original,
    pooled_original,
)

PROPS = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------------
# score matrices
# --------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_softmax(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    logits = 3.0 * torch.randn(n, n, generator=_gen(seed), dtype=torch.float64)
    return torch.softmax(logits, -1).to(dtype)


def band_noise(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Attention-like: a local band, a few global key columns, a second diagonal, noise."""
    g = _gen(seed)
    i = torch.arange(n, dtype=torch.float64)
    dist = (i[:, None] - i[None, :]).abs()
    logits = -dist / 6.0 + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)
    cols = torch.randint(0, n, (3,), generator=g)
    logits[:, cols] += 4.0
    logits += 3.0 * ((i[:, None] - i[None, :] - n // 3).abs() < 4)  # off-diagonal stripe
    return torch.softmax(logits, -1).to(dtype)


def quantized(a: torch.Tensor, bits: int = 20) -> torch.Tensor:
    """Multiples of 2^-bits: every sum in both implementations is exact in float64."""
    scale = float(2**bits)
    return torch.round(a.double() * scale) / scale


def small_integers(n: int, seed: int) -> torch.Tensor:
    """Values in {0, 1, 2, 3}: exact arithmetic with lots of exactly tied pooled cells."""
    return torch.randint(0, 4, (n, n), generator=_gen(seed)).double()


def band_matrix(n: int, width: int) -> torch.Tensor:
    i = torch.arange(n)
    band = ((i[:, None] - i[None, :]).abs() <= width).double()
    return band / band.sum(-1, keepdim=True)


def original(a: torch.Tensor, block: int, variant: str, quantile: float = 0.98) -> torch.Tensor:
    return generate_pattern_original(a, block, quantile, 31 if variant == "cf" else None)


# --------------------------------------------------------------------------------------------
# exact agreement with the original
# --------------------------------------------------------------------------------------------

SIZES = [(64, 8), (64, 16), (128, 8), (128, 32), (256, 16), (256, 64)]


def _check_against_original(a: torch.Tensor, block: int, variant: str) -> None:
    pooled = pooled_original(a, block, 31 if variant == "cf" else None)  # the slow part: once
    for q in (0.8, 0.9, 0.98):
        ours = generate_pattern(a, block_size=block, variant=variant, quantile=q)
        assert torch.equal(ours, flood_fill_original(pooled, q)), (variant, block, q)


@pytest.mark.parametrize("variant", ["cf", "f"])
@pytest.mark.parametrize("n,block", SIZES)
@pytest.mark.parametrize("kind", ["softmax", "band_noise", "integers"])
def test_matches_original_exactly(variant: str, n: int, block: int, kind: str) -> None:
    if kind == "softmax":
        a = quantized(random_softmax(n, seed=n + block))
    elif kind == "band_noise":
        a = quantized(band_noise(n, seed=n * block))
    else:
        a = small_integers(n, seed=n - block)
    _check_against_original(a, block, variant)


@pytest.mark.parametrize("variant", ["cf", "f"])
def test_matches_original_exactly_512(variant: str) -> None:
    _check_against_original(quantized(band_noise(512, seed=1)), 64, variant)


@pytest.mark.parametrize("variant", ["cf", "f"])
@pytest.mark.parametrize("n,block", [(128, 16), (256, 32)])
def test_matches_original_float32(variant: str, n: int, block: int) -> None:
    # Unquantised float32: rounding differs from conv2d's, so only generic (tie-free) inputs agree.
    a = band_noise(n, seed=7, dtype=torch.float32)
    ours = generate_pattern(a, block_size=block, variant=variant, quantile=0.95)
    assert torch.equal(ours, original(a, block, variant, 0.95))


@pytest.mark.parametrize("n,block,fs", [(96, 32, 31), (64, 4, 31), (128, 8, 5), (64, 16, 1)])
def test_block_scores_match_conv_and_pool(n: int, block: int, fs: int) -> None:
    a = band_noise(n, seed=3)
    ours = block_scores(a, block_size=block, filter_size=fs)
    ref = torch.from_numpy(pooled_original(a, block, fs))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("variant", ["cf", "f"])
@pytest.mark.parametrize("n,block", [(100, 16), (200, 32), (77, 8), (300, 64)])
def test_ragged_length_is_the_original_on_zero_padded_scores(
    variant: str, n: int, block: int
) -> None:
    a = quantized(band_noise(n, seed=n))
    nb = math.ceil(n / block)
    ours = generate_pattern(a, block_size=block, variant=variant, quantile=0.9)
    assert ours.shape == (nb, nb)
    padded = F.pad(a, (0, nb * block - n, 0, nb * block - n))
    assert torch.equal(ours, original(padded, block, variant, 0.9))


def test_tie_order_diagonal_then_right_then_down() -> None:
    # A 1-block-per-token grid (block 1, no filter) makes the pooled grid the matrix itself.
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[1, 0] = a[0, 1] = a[1, 1] = 1.0  # from (0, 0): all three tied -> diagonal
    a[2, 1] = a[1, 2] = 2.0  # from (1, 1): down == right > diagonal -> right
    a[2, 3] = 2.0  # from (1, 2): down == diagonal -> diagonal (2, 3)
    ours = generate_pattern(a, block_size=1, variant="f", quantile=0.0)
    assert torch.equal(ours, original(a, 1, "f", 0.0))
    assert ours[1, 2] and ours[2, 3]


# --------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------

matrix_args = st.tuples(
    st.integers(min_value=8, max_value=160),  # L (ragged lengths included)
    st.sampled_from([4, 8, 16, 32]),  # block
    st.integers(min_value=0, max_value=10_000),  # seed
    st.booleans(),  # band+noise or random softmax
)


def _matrix(n: int, seed: int, structured: bool) -> torch.Tensor:
    return band_noise(n, seed) if structured else random_softmax(n, seed)


@PROPS
@given(args=matrix_args, variant=st.sampled_from(["cf", "f", "c", "p"]), causal=st.booleans())
def test_diagonal_always_present_and_causal_respected(args, variant: str, causal: bool) -> None:
    n, block, seed, structured = args
    density = 0.2 if variant == "c" else None
    p = generate_pattern(
        _matrix(n, seed, structured),
        block_size=block,
        variant=variant,
        density=density,
        causal=causal,
    )
    assert p.dtype == torch.bool and p.shape == (math.ceil(n / block),) * 2
    assert bool(p.diagonal().all())
    if causal:
        assert not bool(p.triu(1).any())


@PROPS
@given(args=matrix_args, q=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2))
def test_density_non_increasing_in_quantile(args, q: list[float]) -> None:
    n, block, seed, structured = args
    lo, hi = sorted(q)
    a = _matrix(n, seed, structured)
    p_lo = generate_pattern(a, block_size=block, quantile=lo)
    p_hi = generate_pattern(a, block_size=block, quantile=hi)
    # The walks do not depend on the threshold, so a higher quantile keeps a subset.
    assert not bool((p_hi & ~p_lo).any())
    assert pattern_density(p_hi) <= pattern_density(p_lo)


@PROPS
@given(args=matrix_args, density=st.floats(0.01, 1.0), causal=st.booleans())
def test_c_hits_its_block_budget_exactly(args, density: float, causal: bool) -> None:
    n, block, seed, structured = args
    p = generate_pattern(
        _matrix(n, seed, structured),
        block_size=block,
        variant="c",
        density=density,
        causal=causal,
    )
    nb = p.shape[-1]
    cells = nb * (nb + 1) // 2 if causal else nb * nb
    candidates = nb * (nb - 1) // 2 if causal else nb * (nb - 1)
    k = min(max(math.floor(cells * density - nb), 0), candidates)
    assert int(p.sum()) == k + nb
    assert int(p.sum()) - int(p.diagonal().sum()) == k


def test_c_keeps_the_largest_off_diagonal_blocks() -> None:
    a = band_noise(256, seed=11)
    p = generate_pattern(a, block_size=16, variant="c", density=0.1)
    scores = block_scores(a, block_size=16).masked_fill(torch.eye(16, dtype=torch.bool), -1.0)
    kept, dropped = scores[p & ~torch.eye(16, dtype=torch.bool)], scores[~p]
    assert kept.min() >= dropped.max()


def test_c_needs_density() -> None:
    with pytest.raises(ValueError, match="density"):
        generate_pattern(random_softmax(64, 0), block_size=8, variant="c")


@PROPS
@given(
    n=st.integers(64, 256),
    block=st.sampled_from([8, 16, 32]),
    width=st.integers(0, 40),
    variant=st.sampled_from(["cf", "f"]),
    q=st.floats(0.5, 0.99),
)
def test_band_matrix_gives_band_pattern(
    n: int, block: int, width: int, variant: str, q: float
) -> None:
    p = generate_pattern(band_matrix(n, width), block_size=block, variant=variant, quantile=q)
    nb = p.shape[-1]
    reach = (width + block - 1) // block  # block offsets that contain part of the band
    offset = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs()
    assert not bool((p & (offset > reach)).any())
    assert bool(p.diagonal().all())


@pytest.mark.parametrize("width", [8, 20, 40])
def test_band_matrix_with_c_keeps_every_band_block(width: int) -> None:
    n, block = 256, 16
    nb = n // block
    reach = (width + block - 1) // block
    offset = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs()
    off_diagonal = int(((offset >= 1) & (offset <= reach)).sum())
    density = (off_diagonal + nb + 0.5) / nb**2  # + 0.5: floor(nb^2 * density - nb) = off_diagonal
    p = generate_pattern(band_matrix(n, width), block_size=block, variant="c", density=density)
    assert torch.equal(p, offset <= reach)


@PROPS
@given(
    heads=st.integers(1, 4),
    n=st.integers(16, 128),
    block=st.sampled_from([8, 16]),
    variant=st.sampled_from(["cf", "f", "c", "p"]),
    seed=st.integers(0, 1000),
)
def test_per_head_equals_single_calls(
    heads: int, n: int, block: int, variant: str, seed: int
) -> None:
    a = torch.stack([band_noise(n, seed + h) for h in range(heads)])
    kw = {"block_size": block, "variant": variant, "density": 0.3 if variant == "c" else None}
    p = generate_pattern(a, per_head=True, **kw)
    nb = math.ceil(n / block)
    assert p.shape == (heads, nb, nb)
    for h in range(heads):
        assert torch.equal(p[h], generate_pattern(a[h], **kw))
    if variant != "p":  # P sums the heads' block masses: equal to the mean's up to rounding
        assert torch.equal(generate_pattern(a, **kw), generate_pattern(a.mean(0), **kw))


# --------------------------------------------------------------------------------------------
# resize_pattern, pattern_density
# --------------------------------------------------------------------------------------------


def test_resize_crops_top_left() -> None:
    p = torch.rand(10, 10, generator=_gen(0)) > 0.5
    assert torch.equal(resize_pattern(p, 6), p[:6, :6])
    assert torch.equal(resize_pattern(p, 10), p)


@pytest.mark.parametrize("band", [0, 1, 2])
def test_resize_extends_with_a_band(band: int) -> None:
    p = generate_pattern(band_noise(128, 5), block_size=16)
    q = resize_pattern(p, 12, band=band)
    assert q.shape == (12, 12) and torch.equal(q[:8, :8], p)
    i = torch.arange(12)
    off = i[:, None] - i[None, :]
    new = (i[:, None] >= 8) | (i[None, :] >= 8)
    assert torch.equal(q[new], ((off >= 0) & (off <= band))[new])
    sym = resize_pattern(p, 12, band=band, causal=False)
    assert torch.equal(sym[new], (off.abs() <= band)[new])
    heads = resize_pattern(torch.stack([p, p]), 12, band=band)
    assert heads.shape == (2, 12, 12) and torch.equal(heads[1], q)


def test_pattern_density() -> None:
    p = torch.eye(4, dtype=torch.bool)
    assert pattern_density(p) == pytest.approx(4 / 16)
    assert pattern_density(p, causal=True) == pytest.approx(4 / 10)
    p[0, 3] = True  # above the diagonal: ignored when causal
    assert pattern_density(p, causal=True) == pytest.approx(4 / 10)


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def test_rejects_bad_input() -> None:
    a = random_softmax(32, 0)
    with pytest.raises(ValueError, match="variant"):
        generate_pattern(a, block_size=8, variant="x")
    with pytest.raises(ValueError, match="filter_size"):
        generate_pattern(a, block_size=8, filter_size=30)
    with pytest.raises(ValueError, match="block_size"):
        generate_pattern(a, block_size=0)
    with pytest.raises(ValueError, match="attn"):
        generate_pattern(torch.rand(4, 5), block_size=2)
    with pytest.raises(TypeError):
        generate_pattern(torch.ones(8, 8, dtype=torch.int64), block_size=2)
    bad = a.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        generate_pattern(bad, block_size=8)


def test_float32_and_half_inputs() -> None:
    a = band_noise(128, 2)
    p64 = generate_pattern(a, block_size=16)
    assert torch.equal(generate_pattern(a.float(), block_size=16), p64)
    assert generate_pattern(a.bfloat16(), block_size=16).shape == p64.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["cf", "f", "c", "p"])
def test_cuda_matches_cpu(variant: str) -> None:
    a = quantized(band_noise(512, 9))
    kw = {"block_size": 32, "variant": variant, "density": 0.1 if variant == "c" else None}
    p = generate_pattern(a.cuda(), **kw)
    assert p.device.type == "cuda"
    assert torch.equal(p.cpu(), generate_pattern(a, **kw))
    heads = torch.stack([a, a.T.contiguous()]).float()
    assert torch.equal(
        generate_pattern(heads.cuda(), per_head=True, **kw).cpu(),
        generate_pattern(heads, per_head=True, **kw),
    )
