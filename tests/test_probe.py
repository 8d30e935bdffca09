"""`spion::attention_probe` against a float64 mean of softmax maps, and its mask classification."""

from __future__ import annotations

import pytest
import torch

from spion_fx.kernels.attention import probe as P


def _want(q, k, scale, causal, keep=None, bias=None):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q.double() * scale) @ k.double().transpose(-1, -2)
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0).mean((0, 1))


@pytest.mark.parametrize("case", ["causal", "padding", "causal+padding", "bias", "plain"])
def test_probe_matches_reference_and_classifies_the_mask(case):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 48, 8), torch.randn(2, 2, 48, 8)
    kp = torch.ones(2, 48, dtype=torch.bool)
    kp[1, -5:] = False
    tril = torch.ones(48, 48, dtype=torch.bool).tril()
    causal, mask, kind, keep, bias, code = False, None, P.MASK_KIND_NONE, None, None, P.MASK_PADDING
    if case == "causal":
        causal, code = True, P.MASK_CAUSAL
    elif case == "padding":
        keep = kp[:, None, None, :].expand(2, 1, 48, 48)
        mask, kind = keep, P.MASK_KIND_BOOL_KEEP
    elif case == "causal+padding":
        keep = kp[:, None, None, :] & tril
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        kind, code = P.MASK_KIND_ADDITIVE, P.MASK_CAUSAL
    elif case == "bias":
        bias = mask = torch.randn(1, 1, 48, 48)
        kind, code = P.MASK_KIND_ADDITIVE, P.MASK_ARBITRARY
    accum, stats = torch.zeros(48, 48), torch.zeros(3, dtype=torch.float64)
    torch.ops.spion.attention_probe(accum, stats, q, k, mask, kind, 0.3, causal)
    torch.testing.assert_close(accum.double(), _want(q, k, 0.3, causal, keep, bias), atol=1e-6, rtol=1e-5)
    assert stats.tolist() == [1.0, 0.0, float(code)]


def test_non_finite_inputs_are_skipped():
    q = torch.randn(1, 1, 8, 4)
    q[0, 0, 3, 0] = float("nan")
    accum, stats = torch.zeros(8, 8), torch.zeros(3, dtype=torch.float64)
    torch.ops.spion.attention_probe(accum, stats, q, q, None, P.MASK_KIND_NONE, 0.5, True)
    assert stats[0] == 0 and stats[1] == 1 and not accum.any()


def test_per_head_accumulator():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 16, 4), torch.randn(2, 3, 16, 4)
    accum, stats = torch.zeros(3, 16, 16), torch.zeros(3, dtype=torch.float64)
    torch.ops.spion.attention_probe(accum, stats, q, k, None, P.MASK_KIND_NONE, 0.5, True)
    for h in range(3):
        torch.testing.assert_close(accum[h].double(), _want(q[:, h:h + 1], k[:, h:h + 1], 0.5, True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["causal", "padding", "bias", "per_head", "cross"])
def test_chunked_probe_equals_one_chunk(monkeypatch, case):
    """Row chunks (16 rows here) give the same map as one chunk: causal chunks skip the keys
    right of the diagonal, masks and biases are sliced per chunk, GQA keys are repeated."""
    torch.manual_seed(1)
    lq, lk = (70, 70) if case != "cross" else (70, 50)
    q, k = torch.randn(2, 4, lq, 8), torch.randn(2, 2, lk, 8)
    causal = case in ("causal", "per_head", "cross")
    mask, kind = None, P.MASK_KIND_NONE
    if case == "padding":
        keep = torch.ones(2, 1, lq, lk, dtype=torch.bool)
        keep[1, ..., -9:] = False
        mask, kind = keep, P.MASK_KIND_BOOL_KEEP
    elif case == "bias":
        mask, kind = torch.randn(2, 4, lq, lk), P.MASK_KIND_ADDITIVE
    shape = (4, lq, lk) if case == "per_head" else (lq, lk)

    def probe():
        accum, stats = torch.zeros(shape), torch.zeros(3, dtype=torch.float64)
        torch.ops.spion.attention_probe(accum, stats, q, k, mask, kind, 0.4, causal)
        return accum

    whole = probe()
    monkeypatch.setattr(P, "_rows_per_chunk", lambda maps, keys: 16)
    torch.testing.assert_close(probe(), whole, atol=1e-6, rtol=1e-5)
    if case == "causal":
        torch.testing.assert_close(whole.double(), _want(q, k, 0.4, True), atol=1e-6, rtol=1e-5)
