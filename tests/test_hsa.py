"""Hybrid Sparse Attention (MST): the sparse computation equals a float64 dense masked reference,
forward and gradients, strided and local+strided, with and without key padding, GQA, and any L."""

from __future__ import annotations

import pytest
import torch

from spion_fx.kernels.attention.hsa import hsa_mask, hybrid_sparse_attention


def _reference(q, k, v, visible, scale):
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("length", [16, 37, 64])
@pytest.mark.parametrize("stride, local", [(4, 0), (8, 0), (4, 4), (4, 8), (8, 4), (5, 6)])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_dense_reference(length, stride, local, padded):
    torch.manual_seed(length + stride + local)
    b, h, hkv, d = 2, 4, 2, 8
    q = torch.randn(b, h, length, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, length, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, length, d, dtype=torch.float64, requires_grad=True)
    kp = None
    visible = hsa_mask(length, stride, local)[None, None]
    if padded:
        kp = torch.ones(b, length, dtype=torch.bool)
        kp[1, length - 5:] = False
        visible = visible & kp[:, None, None, :]
    out = hybrid_sparse_attention(q, k, v, stride=stride, local=local, scale=0.3, key_padding_mask=kp)
    want = _reference(q, k, v, visible, 0.3)
    # the block-sparse op's log-sum-exp is float32 by contract, hence 1e-6 rather than float64's
    tol = dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, want, **tol)
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for got, exp in zip(got_grads, want_grads):
        torch.testing.assert_close(got, exp, **tol)


def test_device_generic_parts_match_reference(monkeypatch):
    """Off CPU the window and strided parts run on the block-sparse op (lower-triangular layout,
    several blocks at this length); that route is exercised here on CPU."""
    import spion_fx.kernels.attention.hsa as hsa

    monkeypatch.setattr(hsa, "_fused_cpu", lambda q: False)
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = hybrid_sparse_attention(q, k, v, stride=4, local=8, scale=0.3)
    want = _reference(q, k, v, hsa_mask(300, 4, 8)[None, None], 0.3)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(out)
    for got, exp in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)


def _dense_keep(out, q, k):
    """The dense [B, H, L, L] dropout keep-mask a local+strided call drew (diagonal blocks from the
    op's seeded generator, the two other parts from the masks the backward node holds)."""
    from spion_fx.kernels.attention import block_sparse_cpu

    node = out.grad_fn
    seed = node.saved_tensors[-1]
    b, h, length, _ = q.shape
    layout = node.layout
    keep = block_sparse_cpu.dropout_keep_mask(
        tuple(q.shape), tuple(k.shape), layout.kv_num_blocks, layout.kv_indices, node.local, True,
        node.dropout_p, seed,
    ).clone()
    ids = (torch.arange(h).view(1, h, 1, 1) * length + torch.arange(length).view(1, 1, length, 1))
    ids = ids.expand(b, h, length, 1).double()
    for part, part_keep in zip(node.parts, node.keeps):
        q_ids = part.gather_q(ids, -1.0)[..., 0].long()  # [B, H', rows]
        k_ids = part.gather_kv(ids)[..., 0].long()  # [B, H', keys]
        for bi in range(b):
            rows_ok = q_ids[bi] >= 0
            hh = (q_ids[bi] // length)[:, :, None].expand(-1, -1, k_ids.shape[-1])
            qi = (q_ids[bi] % length)[:, :, None].expand_as(hh)
            ki = (k_ids[bi] % length)[:, None, :].expand_as(hh)
            sel = rows_ok[:, :, None].expand_as(hh) & torch.ones_like(hh, dtype=torch.bool).tril()
            keep[bi, hh[sel], qi[sel], ki[sel]] = part_keep[bi][sel]
    return keep


@pytest.mark.parametrize("padded", [False, True])
def test_dropout_matches_reference_with_the_same_keep_mask(padded):
    """Dropout on the joint probabilities: output and gradients equal a dense reference that
    applies the keep-mask the call drew (all three parts)."""
    torch.manual_seed(1)
    p = 0.3
    q, k, v = (torch.randn(2, 2, 37, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    visible = hsa_mask(37, 4, 6)[None, None]
    kp = None
    if padded:
        kp = torch.ones(2, 37, dtype=torch.bool)
        kp[1, -5:] = False
        visible = visible & kp[:, None, None, :]
    out = hybrid_sparse_attention(q, k, v, stride=4, local=6, scale=0.3, key_padding_mask=kp, dropout_p=p)
    keep = _dense_keep(out, q, k)
    qd, kd, vd = (t.double() for t in (q, k, v))
    scores = (qd @ kd.transpose(-1, -2) * 0.3).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    want = (probs * keep / (1 - p)) @ vd
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    exp = torch.autograd.grad(want, (q, k, v), grad)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_block_level_part_runs_on_the_block_sparse_op(monkeypatch):
    import spion_fx.kernels.attention.block_sparse_op as op

    calls = []
    original = op.block_sparse_attention_fwd

    def spy(*args):
        calls.append(args[7])  # block size
        return original(*args)

    monkeypatch.setattr(op, "block_sparse_attention_fwd", spy)
    q = torch.randn(1, 2, 32, 8)
    hybrid_sparse_attention(q, q, q, stride=4, local=8)
    assert calls == [8]


def test_rejects_bad_arguments():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="stride"):
        hybrid_sparse_attention(q, q, q, stride=0)
    with pytest.raises(ValueError, match="lengths"):
        hybrid_sparse_attention(q, q[:, :, :4], q[:, :, :4], stride=2)


def test_hsa_window_in_training():
    import copy

    import spion_fx
    from spion_fx import zoo

    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=32)
    model.train()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    spion_fx.sparsify(model, "mst-hsa", optimizer=opt, inner="eager", hsa_window=(1, 3), hsa_stride=4,
                      hsa_mode="local+strided", hsa_local=4, total_steps=10)
    outs = []
    for _ in range(4):
        out = model(**kwargs).logits
        outs.append(out.detach())
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    sites = list(model.spion_state.attention_sites())
    assert sites and all(s.supports_hsa for s in sites)
    with torch.no_grad():
        dense = reference(**kwargs).logits
    # steps 0 and 3 are outside the window (dense causal); steps 1 and 2 use the HSA mask
    torch.testing.assert_close(outs[0], dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[3], dense, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[1], dense, atol=1e-3)


def test_hsa_window_under_aot_autograd_with_dropout():
    """The HSA window traced by AOT autograd (what the default inductor inner compiler does):
    layouts are built by traceable ops, dropout's keep masks and seeds are drawn in the graph."""
    import spion_fx
    from spion_fx import zoo

    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=32)
    for module in model.modules():
        if hasattr(module, "attn_dropout"):
            module.attn_dropout.p = 0.1
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "mst-hsa", optimizer=opt, inner="aot_eager", hsa_window=(0, 5),
                      hsa_stride=4, hsa_mode="local+strided", hsa_local=4, total_steps=10)
    for _ in range(2):
        out = model(**kwargs).logits
        assert torch.isfinite(out).all()
        out.float().pow(2).mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad()
    sites = list(model.spion_state.attention_sites())
    assert sites and all(s.hsa_active for s in sites)
