"""BlockLayout <-> FlexAttention BlockMask conversion."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from spion_fx.kernels.attention.blockmask import (
    block_mask_to_layout,
    layout_grid,
    layout_to_block_mask,
)
from spion_fx.kernels.attention.layout import BlockLayout


def random_layout(heads: int, nqb: int, nkb: int, bs: int, seed: int = 0) -> BlockLayout:
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(heads, nqb, nkb, generator=g) < 0.4
    n = min(nqb, nkb)
    grid[:, torch.arange(n), torch.arange(n)] = True
    grid[:, :, 0] |= torch.rand(heads, nqb, generator=g) < 0.5  # column 0 next to padding
    return BlockLayout.from_dense(grid, bs)


def assert_same_layout(a: BlockLayout, b: BlockLayout) -> None:
    assert a.block_size == b.block_size
    assert torch.equal(layout_grid(a), layout_grid(b))
    for name in ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("heads,layout_heads", [(4, 1), (3, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_round_trip(heads, layout_heads, causal):
    layout = random_layout(layout_heads, 5, 4, 16, seed=heads)
    bm = layout_to_block_mask(layout, batch=2, heads=heads, q_len=70, kv_len=60, causal=causal)
    assert bm.BLOCK_SIZE == (16, 16)
    assert bm.kv_num_blocks.shape == (2, heads, 5)
    back = block_mask_to_layout(bm)
    if causal:  # blocks right of the diagonal see nothing and are dropped
        grid = layout_grid(layout) & torch.ones(5, 4, dtype=torch.bool).tril()
        layout = BlockLayout.from_dense(grid, 16)
    if layout_heads == 1:
        # Shared pattern broadcast by expand: no per-head copy.
        assert bm.kv_num_blocks.stride(1) == 0 and bm.kv_indices.stride(1) == 0
        assert back.num_heads == heads
        back = BlockLayout.from_dense(layout_grid(back)[:1].contiguous(), back.block_size)
    assert_same_layout(layout, back)


def test_full_and_partial_split_for_causal():
    layout = BlockLayout.from_dense(torch.ones(4, 4, dtype=torch.bool).tril(), 32)
    bm = layout_to_block_mask(layout, 1, 1, 128, 128, causal=True)
    assert bm.kv_num_blocks[0, 0].tolist() == [1, 1, 1, 1]  # the diagonal blocks
    assert bm.full_kv_num_blocks[0, 0].tolist() == [0, 1, 2, 3]


def test_from_flex_create_block_mask():
    def sliding(b, h, q, kv):
        return (q - kv).abs() <= 20

    bm = create_block_mask(sliding, 1, 1, 96, 96, device="cpu", BLOCK_SIZE=32)
    layout = block_mask_to_layout(bm)
    expected = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(layout_grid(layout)[0], expected)


def test_rejects_batch_dependent_pattern():
    grid = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    grid[1, 0, 0, 1] = False
    num = grid.sum(-1, dtype=torch.int32)
    idx = torch.sort((~grid).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    from torch.nn.attention.flex_attention import BlockMask

    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16, seq_lengths=(32, 32))
    with pytest.raises(ValueError, match="per batch element"):
        block_mask_to_layout(bm)


def test_rejects_wrong_lengths():
    layout = random_layout(1, 2, 2, 16)
    with pytest.raises(ValueError, match="blocks"):
        layout_to_block_mask(layout, 1, 1, 64, 32)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("layout_heads", [1, 2])
def test_flex_attention_matches_reference(layout_heads):
    torch.manual_seed(0)
    b, h, lq, d, bs = 2, 2, 80, 16, 16
    layout = random_layout(layout_heads, 5, 5, bs, seed=7)
    q, k, v = (torch.randn(b, h, lq, d) for _ in range(3))
    bm = layout_to_block_mask(layout, b, h, lq, lq, causal=True)
    out = flex_attention(q, k, v, block_mask=bm)

    grid = layout_grid(layout)
    pattern = grid.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :lq, :lq]
    visible = pattern & torch.ones(lq, lq, dtype=torch.bool).tril()
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    ref = p @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_traceable_constructors_equal_from_dense(n):
    grids = {
        "diagonal": torch.eye(n, dtype=torch.bool),
        "lower_triangular": torch.ones(n, n, dtype=torch.bool).tril(),
    }
    for kind, grid in grids.items():
        built, want = getattr(BlockLayout, kind)(n, 4), BlockLayout.from_dense(grid, 4)
        for field in ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices"):
            got, exp = getattr(built, field), getattr(want, field)
            assert got.dtype == exp.dtype and torch.equal(got, exp), (kind, field)
