"""Bad input: each case either works (matching the dense reference where it falls back) or raises a
one-line error naming what to change. Each test is one row of the README's "Bad input" table."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spion_fx
from spion_fx import zoo

SPION = dict(inner="eager", block_size=8, probe_interval=2, quantile=0.6, filter_size=3, max_dense_steps=4)


class TinyAttention(nn.Module):
    """A plain causal self-attention block with an optional arbitrary additive mask."""

    def __init__(self, dim=32, heads=4, causal=True):
        super().__init__()
        self.qkv, self.out, self.heads, self.causal = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads, causal

    def forward(self, x, bias=None):
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if bias is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class TinyModel(nn.Module):
    def __init__(self, layers=2, dim=32):
        super().__init__()
        self.embed = nn.Embedding(64, dim)
        self.blocks = nn.ModuleList(TinyAttention(dim) for _ in range(layers))
        self.head = nn.Linear(dim, 64)

    def forward(self, ids, bias=None):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x, bias)
        return self.head(x)


def _train(model, opt, ids, steps, **kwargs):
    for _ in range(steps):
        loss = F.cross_entropy(model(ids, **kwargs).reshape(-1, 64), ids.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def _sparse_model(length=32, **policy):
    torch.manual_seed(0)
    model = TinyModel().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **{**SPION, **policy})
    ids = torch.randint(0, 64, (2, length))
    _train(model, opt, ids, 5)
    assert all(s.phase == "sparse" for s in model.spion_state.attention_sites())
    return model, opt


def test_invalid_policy_value_is_one_line_error():
    with pytest.raises(ValueError, match=r"attention\.quantile=2 is invalid") as info:
        spion_fx.sparsify(TinyModel(), "spion-cf", quantile=2)
    assert "\n" not in str(info.value)


def test_nm_with_m_not_dividing_the_layer_stays_dense_and_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "nm-1:8", optimizer=opt, inner="eager")  # 12 inputs: not a multiple of 8
    x = torch.randn(4, 12)
    model(x).sum().backward()
    opt.step()
    rows = {r["name"]: r for r in spion_fx.report(model, print_table=False) if r["kind"] == "linear"}
    assert rows["0"]["dense_reason"] and "8" in rows["0"]["dense_reason"]
    assert rows["2"]["dense_reason"] is None


def test_block_size_larger_than_sequence_works():
    model, _ = _sparse_model(length=6, block_size=64)  # one partial block: dense by construction
    ids = torch.randint(0, 64, (2, 6))
    reference = TinyModel()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("spion_state")})
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference.eval()(ids), atol=1e-5, rtol=1e-5)


def test_sequence_length_changing_between_steps():
    model, opt = _sparse_model(length=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, opt, torch.randint(0, 64, (2, 16)), 2)  # shorter: pattern cropped
        _train(model, opt, torch.randint(0, 64, (2, 48)), 2)  # longer: extended with the band
    assert any("extending it with the diagonal band" in str(w.message) for w in caught)


def test_batch_of_one_token():
    model, _ = _sparse_model()
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (1, 1)))
    assert out.shape == (1, 1, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    model, _ = _sparse_model()
    model.eval()
    ids = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        want = model(ids)
        model.to(dtype)
        got = model(ids)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_nan_in_activations_during_probing_never_switches():
    torch.manual_seed(0)
    model = TinyModel().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **{**SPION, "max_dense_steps": None})
    with torch.no_grad():
        model.embed.weight[3] = float("nan")
    ids = torch.full((2, 32), 3)
    with pytest.warns(UserWarning, match="non-finite attention probe"):
        for _ in range(6):
            model(ids).sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(s.phase == "dense" for s in model.spion_state.attention_sites())


def test_model_without_attention():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    spion_fx.sparsify(model, "spion-cf", inner="eager")
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), reference(x))
    assert [r for r in spion_fx.report(model, print_table=False) if r["kind"] == "attention"] == []


def test_arbitrary_float_mask_stays_dense_and_exact():
    torch.manual_seed(0)
    model = TinyModel().train()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
    ids = torch.randint(0, 64, (2, 32))
    bias = torch.randn(1, 1, 32, 32)  # ALiBi-like: not expressible as blocks + padding
    for _ in range(6):
        model(ids, bias).sum().backward()
        opt.step()
        opt.zero_grad()
    sites = list(model.spion_state.attention_sites())
    assert all(s.phase == "dense" for s in sites)
    assert all("arbitrary" in s.can_be_sparse[1] for s in sites)
    torch.testing.assert_close(model(ids, bias), reference(ids, bias))


def test_cross_attention_with_different_lengths_stays_dense():
    torch.manual_seed(0)
    model, kwargs = zoo.build("t5", seq_len=16)
    reference = copy.deepcopy(model)
    model.train()
    reference.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
    for _ in range(5):
        model(**kwargs).logits.sum().backward()
        opt.step()
        opt.zero_grad()
    cross = [s for s in model.spion_state.attention_sites() if s.spec.cross_attention]
    assert cross and all(s.phase == "dense" for s in cross)
    torch.testing.assert_close(model(**kwargs).logits, reference(**kwargs).logits, atol=1e-4, rtol=1e-4)


class BreakingAttention(TinyAttention):
    def forward(self, x, bias=None):
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        torch._dynamo.graph_break()
        y = torch.softmax(scores, -1) @ v
        return self.out(y.transpose(1, 2).reshape(b, length, d))


def test_graph_break_inside_attention_block_stays_dense_and_exact():
    torch.manual_seed(0)
    model = TinyModel()
    model.blocks[0] = BreakingAttention()
    reference = copy.deepcopy(model)
    spion_fx.sparsify(model, "spion-cf", **SPION)
    ids = torch.randint(0, 64, (2, 32))
    torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
    names = {s.spec.name for s in model.spion_state.attention_sites()}
    assert names == {"blocks.1"}  # the broken block is not (half-)rewritten


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(mode):
    model, _ = _sparse_model()
    ids = torch.randint(0, 64, (2, 32))
    model.eval()
    want = model(ids).detach()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        got = model(ids)
    torch.testing.assert_close(got, want)


def test_model_to_after_sparsify_moves_state():
    model, _ = _sparse_model()
    model.to(torch.float64)
    state = model.spion_state
    assert all(s.probe_accum.dtype == torch.float64 for s in state.attention_sites())
    assert all(s.pattern.dtype == torch.bool for s in state.attention_sites())
    model.eval()
    with torch.no_grad():
        assert model(torch.randint(0, 64, (2, 32))).dtype == torch.float64


def test_sparsify_twice_is_one_line_error():
    model = TinyModel()
    spion_fx.sparsify(model, "dense", inner="eager")
    with pytest.raises(ValueError, match="already sparsified") as info:
        spion_fx.sparsify(model, "spion-cf")
    assert "\n" not in str(info.value)


class BreakBeforeAttention(TinyAttention):
    def forward(self, x, bias=None):
        torch._dynamo.graph_break()  # every block resumes in a frame of its own, shared code
        return super().forward(x, bias)


def test_graph_shared_by_repeated_blocks_keeps_one_site_per_block():
    torch.manual_seed(0)
    model = TinyModel(layers=3)
    model.blocks = nn.ModuleList(BreakBeforeAttention() for _ in range(3))
    reference = copy.deepcopy(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
    ids = torch.randint(0, 64, (2, 32))
    torch.testing.assert_close(model(ids), reference(ids), atol=1e-5, rtol=1e-5)
    _train(model, opt, ids, 5)
    sites = {s.spec.name: s for s in model.spion_state.attention_sites()}
    assert set(sites) == {"blocks.0", "blocks.1", "blocks.2"}
    assert all(s.phase == "sparse" for s in sites.values())


def test_many_models_sparsified_in_one_process_all_compile():
    # Dynamo's per-code-object recompile limit is 8: sparsify must not share one code object.
    for _ in range(10):
        torch.manual_seed(0)
        model = TinyModel().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
        model.eval()
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 32)))
        model.train()
        model(torch.randint(0, 64, (2, 32))).sum().backward()
        opt.step()
        assert model.spion_state.graph_records, "the model ran without the spion backend"
