"""Triton N:M matmul, run by the Triton interpreter on CPU (tiny shapes), against a float64 dense
masked reference."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is first decorated

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spion_fx.kernels.nm import triton_nm  # noqa: E402
from spion_fx.kernels.nm.packed import PackedNMLinear, index_bits, pack_nm  # noqa: E402
from spion_fx.runtime.nm import nm_mask  # noqa: E402

pytestmark = pytest.mark.skipif(
    not triton_nm.available() or not (triton_nm.interpreting() or torch.cuda.is_available()),
    reason="needs triton with TRITON_INTERPRET=1 or CUDA",
)
DEVICE = "cuda" if torch.cuda.is_available() and not triton_nm.interpreting() else "cpu"


@pytest.mark.parametrize("n,m,tokens,out_f,groups", [
    (2, 4, 5, 20, 12), (1, 8, 17, 16, 4), (1, 16, 3, 33, 3), (3, 8, 16, 8, 6),
])
def test_triton_nm_matches_dense(n, m, tokens, out_f, groups):
    g = torch.Generator().manual_seed(n * 31 + m)
    in_f = groups * m
    w = torch.randn(out_f, in_f, generator=g)
    mask = nm_mask(w, n, m)
    x = torch.randn(tokens, in_f, generator=g)
    values, idx = pack_nm(w * mask, n, m, mask)
    y = triton_nm.nm_matmul(x.to(DEVICE), values.to(DEVICE), idx.to(DEVICE), n, m, in_f, index_bits(m))
    ref = F.linear(x.double(), (w * mask).double())
    torch.testing.assert_close(y.double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_triton_nm_bf16():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 32, generator=g).bfloat16()
    mask = nm_mask(w, 2, 4)
    x = torch.randn(16, 32, generator=g).bfloat16()
    values, idx = pack_nm(w * mask, 2, 4, mask)
    y = triton_nm.nm_matmul(x.to(DEVICE), values.to(DEVICE), idx.to(DEVICE), 2, 4, 32, 2)
    ref = F.linear(x.double(), (w * mask).double())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double().cpu(), ref, atol=5e-2, rtol=2e-2)


def test_packed_linear_triton_backend():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(12, 32, generator=g)
    mask = nm_mask(w, 1, 8)
    b = torch.randn(12, generator=g)
    layer = PackedNMLinear.from_dense(w.to(DEVICE), b.to(DEVICE), 1, 8, mask=mask.to(DEVICE), backend="triton")
    assert layer.backend == "triton"
    x = torch.randn(2, 3, 32, generator=g)
    ref = F.linear(x.double(), (w * mask).double(), b.double())
    torch.testing.assert_close(layer(x.to(DEVICE)).double().cpu(), ref, atol=1e-4, rtol=1e-4)


def test_supports():
    assert triton_nm.supports(2, 4) is None
    assert "power of two" in triton_nm.supports(1, 12)
