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


def _packed_case(n, m, out_f, in_f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = nm_mask(w, n, m)
    wm = (w * mask).to(dtype)
    values, idx = pack_nm(wm, n, m, mask)
    return wm, values, idx


# decode (GEMV) kernel: tokens 1..16, ragged output rows and group counts, both dtypes
@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (1, 16)])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_gemv_matches_dense(n, m, tokens, dtype, tol):
    out_f, in_f = 37, 11 * m
    wm, values, idx = _packed_case(n, m, out_f, in_f, dtype, seed=n * 7 + m + tokens)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    y = triton_nm.nm_gemv(x.to(DEVICE), values.to(DEVICE), idx.to(DEVICE), n, m, in_f, index_bits(m))
    ref = F.linear(x.double(), wm.double())
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    torch.testing.assert_close(y.double().cpu(), ref, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("split", [1, 3])
def test_gemv_split_k(split):
    # explicit tiles: several k-chunks per split, a ragged last split, several token blocks
    n, m, tokens, out_f, in_f = 2, 4, 5, 24, 4 * 40
    wm, values, idx = _packed_case(n, m, out_f, in_f, torch.float32, seed=split)
    x = torch.randn(tokens, in_f)
    cfg = {"BLOCK_T": 4, "BLOCK_O": 8, "BLOCK_K": 16, "SPLIT": split, "k_per_split": 32 if split > 1 else 80}
    y = triton_nm.nm_gemv(x.to(DEVICE), values.to(DEVICE), idx.to(DEVICE), n, m, in_f, 2, config=cfg)
    torch.testing.assert_close(y.double().cpu(), F.linear(x.double(), wm.double()), atol=1e-4, rtol=1e-4)


def test_gemv_config_fills_the_gpu_and_bounds_registers():
    few_rows = triton_nm.gemv_config(tokens=1, out=256, n_kept=2048, n=2, sms=132)
    assert few_rows["SPLIT"] > 1  # 256 rows alone would leave most SMs idle
    assert few_rows["k_per_split"] % few_rows["BLOCK_K"] == 0
    assert few_rows["SPLIT"] * few_rows["k_per_split"] >= 2048
    for tokens in (1, 4, 16, 64):
        cfg = triton_nm.gemv_config(tokens=tokens, out=4096, n_kept=2048, n=2, sms=132)
        assert cfg["BLOCK_T"] * cfg["BLOCK_O"] * cfg["BLOCK_K"] <= 8192 and cfg["BLOCK_T"] <= 16


def test_nm_linear_routes_by_token_count(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_nm, "nm_gemv", lambda *a, **k: calls.append("gemv"))
    monkeypatch.setattr(triton_nm, "nm_matmul", lambda *a, **k: calls.append("matmul"))
    for tokens in (1, triton_nm.DECODE_MAX_TOKENS, triton_nm.DECODE_MAX_TOKENS + 1):
        triton_nm.nm_linear(torch.zeros(tokens, 8), None, None, 2, 4, 8, 2)
    assert calls == ["gemv", "gemv", "matmul"]


def test_packed_linear_triton_decode_path():
    wm, values, idx = _packed_case(1, 8, 20, 48, torch.float32, seed=3)
    mask = wm != 0
    layer = PackedNMLinear.from_dense(wm.to(DEVICE), None, 1, 8, mask=mask.to(DEVICE), backend="triton")
    x = torch.randn(2, 48)  # 2 tokens: the GEMV kernel
    torch.testing.assert_close(layer(x.to(DEVICE)).double().cpu(), F.linear(x.double(), wm.double()),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (3, 16), (1, 2)])
@pytest.mark.parametrize("transposed", [False, True])
def test_triton_mask_matches_topk_mask(n, m, transposed):
    g = torch.Generator().manual_seed(m * 10 + n)
    shape = (7 * m, 9) if transposed else (9, 7 * m)
    w = torch.randn(shape, generator=g)
    got = triton_nm.nm_mask(w.to(DEVICE), n, m, transposed=transposed).cpu()
    assert got.dtype == torch.bool and torch.equal(got, nm_mask(w, n, m, transposed=transposed))


def test_triton_mask_ties_go_to_the_earlier_position():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    got = triton_nm.nm_mask(w.to(DEVICE), 2, 4).cpu()
    assert got.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="multiple of m=4"):
        triton_nm.nm_mask(torch.randn(2, 6).to(DEVICE), 2, 4)
