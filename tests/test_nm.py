"""N:M masks, SR-STE / MDGF / STE weight functions, and LinearSparsitySite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spion_fx.policy import LinearPolicy
from spion_fx.runtime.linear_site import LinearSparsitySite
from spion_fx.runtime.nm import is_nm, mdgf_weight, nm_mask, srste_weight, ste_masked_weight


def reference_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Row by row, group by group: keep the n largest |w| (direct formula)."""
    out = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], m):
            order = torch.argsort(w[r, g:g + m].abs(), descending=True)[:n]
            out[r, g + order] = True
    return out


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 8), (3, 8), (1, 16), (15, 16)])
@pytest.mark.parametrize("transposed", [False, True])
def test_nm_mask_matches_reference(n, m, transposed):
    g = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randn(6, 4 * m, generator=g)
    stored = w.t().contiguous() if transposed else w
    mask = nm_mask(stored, n, m, transposed=transposed)
    assert mask.shape == stored.shape and mask.dtype == torch.bool
    got = mask.t() if transposed else mask
    assert torch.equal(got, reference_mask(w, n, m))
    assert is_nm(mask, n, m, transposed=transposed)
    assert int(mask.sum()) == w.numel() * n // m


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(torch.randn(3, 6), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.randn(3, 8), 4, 4)


def test_srste_gradient():
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    upstream = torch.randn(5, 8, dtype=torch.float64)
    lam = 0.3
    out = srste_weight(w, mask, lam)
    assert torch.equal(out, w.detach() * mask)
    (out * upstream).sum().backward()
    expected = upstream + lam * (~mask) * w.detach()
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("lam", [2e-4, 0.0, 0.7])
def test_srste_fused_backward_is_bit_identical_to_the_formula(dtype, lam):
    # the fused backward (one addcmul) against the unfused expression it replaced
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g).to(dtype).requires_grad_(True)
    mask = nm_mask(w, 2, 4)
    upstream = torch.randn(64, 96, generator=g).to(dtype)
    srste_weight(w, mask, lam).backward(upstream)
    expected = (upstream + lam * (~mask) * w.detach()).to(dtype)
    if dtype == torch.float32:
        assert torch.equal(w.grad, expected)
    else:  # the old expression went through fp32 (λ·~M is a default-dtype tensor): λ was rounded
        # bf16: within one rounding at the scale of g and λ·W (~N(0, 1) here)
        bf16 = dtype == torch.bfloat16
        torch.testing.assert_close(w.grad, expected, atol=2e-2 if bf16 else 1e-7, rtol=2**-8 if bf16 else 0)


@pytest.mark.parametrize("alpha", [1.0, 0.37, 0.0])
def test_mdgf_forward_and_ste_gradient(alpha):
    w = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    mask = nm_mask(w, 1, 4)
    a = torch.tensor(alpha)
    out = mdgf_weight(w, mask, a)
    m = mask.double()
    torch.testing.assert_close(out, w.detach() * (m + (1 - m) * alpha))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)  # plain STE


def test_ste_masked_gradient_is_dense():
    w = torch.randn(3, 8, requires_grad=True)
    mask = nm_mask(w, 1, 4)
    out = ste_masked_weight(w, mask)
    assert torch.equal(out, w.detach() * mask)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def _site(method: str, transposed: bool = False, shape=(12, 16), **kw) -> LinearSparsitySite:
    policy = LinearPolicy(method=method, n=2, m=4, total_steps=100, **kw)
    return LinearSparsitySite("blk.fc", shape, transposed, policy)


@pytest.mark.parametrize("method", ["dense", "srste", "mdgf", "sdgf", "mst"])
@pytest.mark.parametrize("transposed", [False, True])
def test_site_semantics(method, transposed):
    torch.manual_seed(0)
    out_f, in_f = 12, 16
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    site = _site(method, transposed, shape)
    w = torch.randn(shape)
    b = torch.randn(out_f)
    x = torch.randn(3, 5, in_f)
    if method in ("srste", "mdgf", "sdgf"):
        site.refresh_mask(w)
    if method == "mdgf":
        site.alpha.fill_(0.25)
    keep = site.mask.to(w.dtype)
    eff = {"dense": w, "mst": w * keep, "srste": w * keep, "sdgf": w * keep,
           "mdgf": w * (keep + (1 - keep) * 0.25)}[method]
    ref = x @ eff + b if transposed else F.linear(x, eff, b)
    torch.testing.assert_close(site(x, w, b), ref)
    if transposed:  # addmm form (GPT-2 Conv1D) on 2-D input
        x2 = x.reshape(-1, in_f)
        torch.testing.assert_close(site(x2, w, b), torch.addmm(b, x2, eff))
    torch.testing.assert_close(site(x, w), ref - b)


def test_site_non_divisible_stays_dense():
    site = _site("srste", shape=(8, 10))
    assert not site.active
    d = site.describe()
    assert d["pattern"] == "dense" and "not a multiple of M=4" in d["dense_reason"]
    sdgf = LinearSparsitySite("x", (8, 32), False, LinearPolicy(method="sdgf", n=1, m=8, sdgf_schedule="densify"))
    assert "M=64" in sdgf.dense_reason  # densify passes through 1:64


def test_site_describe_and_variant():
    site = _site("mdgf", dense_steps=10)
    assert site.variant_key() == ("mdgf", False) and site.describe()["phase"] == "dense"
    site.sync(10)
    d = site.describe()
    assert site.variant_key() == ("mdgf", True)
    assert d["pattern"] == "2:4" and d["density"] == 0.5 and d["alpha"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["srste", "mdgf", "sdgf", "mst"])
def test_site_compiled_equals_eager(method):
    torch._dynamo.reset()
    torch.manual_seed(1)
    site = _site(method)
    w = torch.randn(12, 16, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    x = torch.randn(4, 16)
    site.refresh_mask(w)
    if method == "mst":
        site.mask.copy_(torch.rand(12, 16) < 0.4)
    if method == "mdgf":
        site.alpha.fill_(0.5)
    eager = site(x, w, b)
    gw_e, gb_e = torch.autograd.grad(eager.square().sum(), (w, b))
    compiled = torch.compile(site, backend="aot_eager", fullgraph=True)
    out = compiled(x, w, b)
    gw_c, gb_c = torch.autograd.grad(out.square().sum(), (w, b))
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gw_c, gw_e)
    torch.testing.assert_close(gb_c, gb_e)
    if method == "mdgf":  # α is a buffer: changing it in place needs no new graph
        site.alpha.fill_(0.0)
        torch.testing.assert_close(compiled(x, w, b), site(x, w, b))
