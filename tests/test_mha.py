"""nn.MultiheadAttention (and the Transformer layers / ViT blocks built on it) become SPION sites.

Dynamo keeps F.multi_head_attention_forward as one opaque call; passes/expand_mha.py replaces it
with the explicit ops. Every form is checked in float64 against the module itself: the expanded
graph's outputs, the site's own fields (assert_sites_exact), and through `sparsify` with the
dense policy, forward and gradients.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_detect import assert_sites_exact
from torch import nn

import spion_fx
from spion_fx.capture import capture
from spion_fx.decisions import decision_for
from spion_fx.passes.detect import detect_sites
from spion_fx.passes.expand_mha import expand_multi_head_attention
from spion_fx.policy import Policy
from spion_fx.runtime.state import SparsityState

E, HEADS, L, S, B = 16, 4, 8, 6, 2


class Attn(nn.Module):
    """One nn.MultiheadAttention called with `call_kwargs`; returns what the call returns, or
    only the output when `weights_unused` (Dynamo then drops the weights from the graph)."""

    def __init__(self, weights_unused: bool = False, call_kwargs: dict | None = None, **mha_kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, **mha_kwargs)
        self.weights_unused = weights_unused
        self.call_kwargs = call_kwargs or {}

    def forward(self, q, k, v, *masks):
        kwargs = dict(self.call_kwargs)
        for name, mask in zip(("key_padding_mask", "attn_mask"), masks):
            if mask is not None:
                kwargs[name] = mask
        out = self.attn(q, k, v, **kwargs)
        return out[0] if self.weights_unused else out


def _inputs(batch_first=False, kv_len=None, kdim=E, vdim=E, batched=True):
    """(x, x, x) for self-attention; (x, memory_k, memory_v) when kv_len is given."""
    g = torch.Generator().manual_seed(0)

    def seq(length, dim):
        shape = (B, length, dim) if batch_first else (length, B, dim)
        return torch.randn(shape if batched else (length, dim), generator=g, dtype=torch.float64)

    x = seq(L, E)
    return (x, x, x) if kv_len is None else (x, seq(kv_len, kdim), seq(kv_len, vdim))


def _padding(kv_len=L, dtype=torch.bool, batched=True):
    pad = torch.zeros(B, kv_len, dtype=torch.bool)
    pad[1, kv_len - 3:] = True
    pad = pad if batched else pad[1]
    return pad if dtype == torch.bool else torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, float("-inf"))


CAUSAL = torch.ones(L, L, dtype=torch.bool).triu(1)


def expanded(module: nn.Module, *args):
    """Capture, expand, detect; the graph's outputs must equal the module's (float64)."""
    module = module.double()
    with torch.no_grad():
        want = module(*args)
    graph = capture(module, args).graphs[0]
    gm = graph.graph_module
    expansions = expand_multi_head_attention(gm)
    assert not any(n.target is F.multi_head_attention_forward for n in gm.graph.nodes)
    attention, linear = detect_sites(graph)
    got = gm(*graph.example_inputs)
    want = [t for t in (want if isinstance(want, tuple) else (want,)) if t is not None]
    got = [t for t in (got if isinstance(got, (tuple, list)) else (got,)) if t is not None]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert_sites_exact(gm, graph.example_inputs, attention)
    return expansions, attention, linear


# (module, inputs, site expectations): None = no site (dense, with a reason)
FORMS = {
    "self": (lambda: Attn(True, {"need_weights": False}), lambda: _inputs(), dict(mask_kind="none")),
    "batch_first": (lambda: Attn(True, {"need_weights": False}, batch_first=True),
                    lambda: _inputs(batch_first=True), dict(mask_kind="none")),
    "bool masks": (lambda: Attn(True, {"need_weights": False}), lambda: (*_inputs(), _padding(), CAUSAL),
                   dict(mask_kind="additive", is_causal=False)),
    "float padding": (lambda: Attn(True, {"need_weights": False}),
                      lambda: (*_inputs(), _padding(dtype=torch.float64)), dict(mask_kind="additive")),
    "float 3-D attn_mask": (lambda: Attn(True, {"need_weights": False}),
                            lambda: (*_inputs(), None, torch.randn(B * HEADS, L, L, dtype=torch.float64)),
                            dict(mask_kind="additive")),
    "is_causal": (lambda: Attn(True, {"need_weights": False, "is_causal": True}),
                  lambda: (*_inputs(), None, CAUSAL), dict(mask_kind="none", is_causal=True)),
    "is_causal with padding": (lambda: Attn(True, {"need_weights": False, "is_causal": True}),
                               lambda: (*_inputs(), _padding(), CAUSAL), dict(mask_kind="additive", is_causal=False)),
    "bias_kv + zero_attn": (lambda: Attn(True, {"need_weights": False}, add_bias_kv=True, add_zero_attn=True),
                            lambda: (*_inputs(), _padding(), CAUSAL), dict(mask_kind="additive", kv_len=L + 2)),
    "kdim/vdim cross": (lambda: Attn(True, {"need_weights": False}, kdim=5, vdim=7),
                        lambda: _inputs(kv_len=S, kdim=5, vdim=7), dict(kv_len=S, cross_attention=True)),
    "no bias": (lambda: Attn(True, {"need_weights": False}, bias=False), lambda: _inputs(), dict(mask_kind="none")),
    "unbatched": (lambda: Attn(True, {"need_weights": False}), lambda: (*_inputs(batched=False), _padding(batched=False)),
                  dict(mask_kind="additive")),
    "weights unused": (lambda: Attn(True), lambda: (*_inputs(), None, CAUSAL), dict(mask_kind="additive")),
    "weights unused, is_causal": (lambda: Attn(True, {"is_causal": True}), lambda: (*_inputs(), None, CAUSAL),
                                  dict(mask_kind="additive", is_causal=False)),  # need_weights keeps the mask
    "weights": (lambda: Attn(), lambda: (*_inputs(), _padding(), CAUSAL), None),
    "per-head weights": (lambda: Attn(call_kwargs={"average_attn_weights": False}, add_bias_kv=True),
                         lambda: _inputs(), None),
    "weights unbatched": (lambda: Attn(), lambda: _inputs(batched=False), None),
}


@pytest.mark.parametrize("form", list(FORMS), ids=list(FORMS))
def test_mha_forms_expand_exactly(form):
    make, inputs, expect = FORMS[form]
    expansions, attention, _ = expanded(make(), *inputs())
    assert [e.expanded for e in expansions] == [True]
    if expect is None:
        assert attention == [] and "need_weights=True" in expansions[0].dense_reason
        return
    assert expansions[0].dense_reason is None
    (site,) = attention
    assert site.form == "sdpa" and site.rank == 4 and site.name == "attn"
    assert (site.num_heads, site.head_dim) == (HEADS, E // HEADS)
    for field, value in {"q_len": L, "kv_len": L, "cross_attention": False, **expect}.items():
        assert getattr(site, field) == value, field


def test_cross_attention_with_shared_key_value_and_decoder_layer():
    # nn.TransformerDecoderLayer's cross attention passes memory as key and value (key is value)
    layer = nn.TransformerDecoderLayer(E, HEADS, 32, dropout=0.0)
    tgt, memory, _ = _inputs(kv_len=S)
    _, attention, linear = expanded(layer, tgt, memory)
    assert [(s.name, s.cross_attention, s.kv_len) for s in attention] == [
        ("self_attn", False, L), ("multihead_attn", True, S)]
    names = {s.name for s in linear}
    assert {"self_attn", "self_attn.out_proj", "multihead_attn.out_proj", "linear1", "linear2"} <= names


def test_training_dropout_is_recorded():
    module = Attn(True, {"need_weights": False}, dropout=0.25).double().train()
    graph = capture(module, _inputs()).graphs[0]
    expand_multi_head_attention(graph.graph_module)
    (site,), _ = detect_sites(graph)
    assert site.dropout_p == 0.25 and not site.dropout_train_only


def test_a_symbolic_dropout_stays_opaque_with_a_reason():
    module = Attn(True, {"need_weights": False}).double()
    graph = capture(module, _inputs(), dynamic=True).graphs[0]
    (expansion,) = expand_multi_head_attention(graph.graph_module)
    # dynamic=True makes dropout_p a symbolic float (symbolic sizes alone expand: see below)
    assert not expansion.expanded and "dropout_p is not a constant" in expansion.dense_reason
    assert any(n.target is F.multi_head_attention_forward for n in graph.graph_module.graph.nodes)
    assert detect_sites(graph)[0] == []


@pytest.mark.parametrize("form", ["bool masks", "is_causal", "bias_kv + zero_attn", "kdim/vdim cross", "unbatched"])
def test_symbolic_lengths_expand_once_for_every_length(form):
    """A length per batch: Dynamo's second length makes the graph symbolic, and the expansion
    reads the sizes from the graph, so that one graph keeps its site at every length."""
    make, _, _ = FORMS[form]
    module = make().double()
    reference = copy.deepcopy(module)
    state = SparsityState(Policy.coerce("dense"))
    compiled = torch.compile(module, backend="spion", options={"inner": "eager", "state": state})
    g = torch.Generator().manual_seed(1)
    for length in (8, 11, 13, 5):
        batched = form != "unbatched"
        x = torch.randn((length, B, E) if batched else (length, E), generator=g, dtype=torch.float64)
        if form == "kdim/vdim cross":
            args = (x, torch.randn(length + 1, B, 5, generator=g, dtype=torch.float64),
                    torch.randn(length + 1, B, 7, generator=g, dtype=torch.float64))
        else:
            args = (x, x, x)
        pad = torch.zeros(B, length, dtype=torch.bool)
        pad[1, length - 2:] = True
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        masks = {"bool masks": (pad, causal), "is_causal": (None, causal),
                 "bias_kv + zero_attn": (pad, causal), "unbatched": (pad[1],)}.get(form, ())
        torch.testing.assert_close(compiled(*args, *masks), reference(*args, *masks), rtol=1e-10, atol=1e-10)
    records = state.compiler.records
    assert len(records) == 2, "the second length makes the graph symbolic; no graph per length after it"
    assert all(len(r.attention_sites) == 1 for r in records), [r.attention_sites for r in records]
    assert not any(r.unmatched_attention for r in records)


class SometimesWeights(nn.Module):
    """Returns the attention weights too when asked: Dynamo recompiles for the flag, and that
    graph's attention must stay dense (its probabilities are used)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS)

    def forward(self, x, with_weights: bool):
        out, weights = self.attn(x, x, x, need_weights=with_weights)
        return out.sum() + (weights.sum() if with_weights else 0)


def test_a_recompile_that_keeps_attention_dense_is_reported():
    model = SometimesWeights().double()
    spion_fx.sparsify(model, "spion-cf", inner="eager", block_size=4)
    x = _inputs()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x, False)
        model.eval()
        model(x, False)  # a recompile (train -> eval) that keeps its site: nothing to say
        assert len(model.spion_state.graph_records) == 2
        assert not [w for w in caught if "keeps attention dense" in str(w.message)]
        model(x, True)
        model(x, True)
    (message,) = [str(w.message) for w in caught if "keeps attention dense" in str(w.message)]
    assert "need_weights=True" in message and "graph 2" in message
    rows = [r for r in spion_fx.report(model, print_table=False) if r["phase"] == "recompiled dense"]
    assert len(rows) == 1 and "need_weights=True" in rows[0]["note"]


def test_linear_sites_name_the_projections():
    _, _, linear = expanded(Attn(True, {"need_weights": False}), *_inputs())
    assert {(s.name, s.weight_name) for s in linear} == {
        ("attn", "attn.in_proj_weight"), ("attn.out_proj", "attn.out_proj.weight")}


# ---------------------------------------------------------------------------------------------
# Through sparsify: the dense policy computes exactly the unsparsified model


def _dense_equal(model: nn.Module, *args, inner="eager", train=True, **kwargs):
    torch.manual_seed(0)
    model = model.double().train(train)
    reference = copy.deepcopy(model)
    spion_fx.sparsify(model, "dense", inner=inner)
    with torch.set_grad_enabled(train):
        got, want = model(*args, **kwargs), reference(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if train:
        got.square().sum().backward()
        want.square().sum().backward()
        for (name, p), r in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-8, atol=1e-9, msg=name)
    return model


def _attention_sites(model):
    return [s.spec.name for s in model.spion_state.attention_sites()]


def test_transformer_encoder_dense_policy_train_and_eval():
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)
    x, _, _ = _inputs(batch_first=True)
    model = _dense_equal(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), x, inner="aot_eager",
                         src_key_padding_mask=_padding())
    assert _attention_sites(model) == ["layers.0.self_attn", "layers.1.self_attn"]
    # eval under no_grad: unsparsified, PyTorch takes the fused fast path; ours the open path
    model.eval()
    reference = copy.deepcopy(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).double().eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("spion_state")})
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-9)
    records = model.spion_state.graph_records
    assert not any("_transformer_encoder_layer_fwd" in str(n.target)
                   for r in records for n in r.graph_module.graph.nodes)
    assert len(records) == 2 and all(len(r.attention_sites) == 2 for r in records)


def test_transformer_decoder_causal_dense_policy():
    layer = nn.TransformerDecoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerDecoder(layer, 1)
    tgt, memory, _ = _inputs(batch_first=True, kv_len=S)
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    model = _dense_equal(model, tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    assert _attention_sites(model) == ["layers.0.self_attn", "layers.0.multihead_attn"]


class ViTEncoderBlock(nn.Module):
    """The structure of torchvision.models.vision_transformer.EncoderBlock."""

    def __init__(self, hidden: int = E, heads: int = HEADS, mlp: int = 32):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp, hidden))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


def test_vit_encoder_block_structure():
    model = nn.Sequential(ViTEncoderBlock(), ViTEncoderBlock())
    x, _, _ = _inputs(batch_first=True)
    model = _dense_equal(model, x)
    assert _attention_sites(model) == ["0.self_attention", "1.self_attention"]


def test_torchvision_vit():
    models = pytest.importorskip("torchvision.models")
    from torchvision.models.vision_transformer import VisionTransformer

    # vit_b_16 itself: one site per encoder block (float32, forward only: it has 86M parameters)
    vit = models.vit_b_16(image_size=32).eval()  # 2x2 patches + class token
    graph = capture(vit, (torch.randn(1, 3, 32, 32),)).graphs[0]
    expand_multi_head_attention(graph.graph_module)
    attention, _ = detect_sites(graph)
    assert [s.name for s in attention] == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(12)]
    assert all(s.form == "sdpa" and s.num_heads == 12 and s.q_len == 5 for s in attention)
    # the same architecture at toy width: the dense policy is exact, forward and gradients
    tiny = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    model = _dense_equal(tiny, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert _attention_sites(model) == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]


# ---------------------------------------------------------------------------------------------
# Never silent


def _warnings_of(model, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(*args)
        model(*args)
    return [str(w.message) for w in caught if "no attention site" in str(w.message)]


def test_no_site_warns_once_naming_need_weights():
    model = Attn().double()  # need_weights=True (MHA's default) and the weights are returned
    spion_fx.sparsify(model, "spion-cf", inner="eager")
    (message,) = _warnings_of(model, *_inputs())
    assert "need_weights=True" in message and "attn" in message
    (record,) = model.spion_state.graph_records
    decision = decision_for(record.decisions, "attn", "attention")
    assert decision.dense and "need_weights=True" in decision.reason
    # report() lists the attention kept dense, with the reason
    (row,) = [r for r in spion_fx.report(model, print_table=False) if r["kind"] == "attention"]
    assert row["site"] == "attn" and row["phase"] == "dense" and "need_weights=True" in row["note"]


def test_no_site_warns_naming_graph_breaks_and_softmax():
    class Broken(nn.Module):
        def forward(self, x):
            x = torch.softmax(x, -1) * 2
            torch._dynamo.graph_break()
            return x + 1

    model = Broken()
    spion_fx.sparsify(model, "spion-cf", inner="eager")
    (message,) = _warnings_of(model, torch.randn(2, 4))
    assert "graph break" in message and "softmax" in message


def test_no_warning_with_sites_or_dense_policy():
    model = Attn(True, {"need_weights": False}).double()
    spion_fx.sparsify(model, "spion-cf", inner="eager")
    assert _warnings_of(model, *_inputs()) == []
    dense = Attn().double()
    spion_fx.sparsify(dense, "dense", inner="eager")
    assert _warnings_of(dense, *_inputs()) == []


@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
def test_fused_encoder_layer_is_expanded_exactly(masks, norm_first, activation):
    # eval under no_grad with the fast path on: Dynamo captures torch._transformer_encoder_layer_fwd
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True, norm_first=norm_first,
                                       activation=activation).double().eval()
    x, _, _ = _inputs(batch_first=True)
    kwargs = {"src_key_padding_mask": _padding() if masks in ("padding", "both") else None,
              "src_mask": CAUSAL if masks in ("causal", "both") else None}
    graph = capture(layer, (x,), kwargs).graphs[0]
    gm = graph.graph_module
    assert any(n.target is torch._transformer_encoder_layer_fwd for n in gm.graph.nodes)
    (expansion,) = expand_multi_head_attention(gm)
    assert expansion.expanded and expansion.name == "self_attn" and expansion.dense_reason is None
    assert not any(n.target is torch._transformer_encoder_layer_fwd for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(*graph.example_inputs)[0], layer(x, **kwargs), rtol=1e-10, atol=1e-10)
    attention, linear = detect_sites(graph)
    assert_sites_exact(gm, graph.example_inputs, attention)
    (site,) = attention
    assert site.name == "self_attn" and site.mask_kind == ("none" if masks == "none" else "additive")
    assert {s.name for s in linear} == {"self_attn", "self_attn.out_proj", "linear1", "linear2"}


def test_fused_encoder_layer_masks_are_boolean_whatever_their_dtype():
    # the fused op masks every nonzero entry of a float mask (not additive): so must its expansion
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True).double().eval()
    x, _, _ = _inputs(batch_first=True)
    mask = torch.zeros(B, HEADS, L, L, dtype=torch.float64).masked_fill(CAUSAL, 5.0)
    fused = Fused(layer)
    graph = capture(fused, (x, mask)).graphs[0]
    expand_multi_head_attention(graph.graph_module)
    with torch.no_grad():
        want = fused(x, mask)
        additive = layer(x, src_mask=mask.masked_fill(mask != 0, float("-inf")).view(B * HEADS, L, L))
        torch.testing.assert_close(graph.graph_module(*graph.example_inputs)[0], want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(want, additive, rtol=1e-10, atol=1e-10)


class Fused(nn.Module):
    """Calls the fused op directly, by default with a float mask of type 2 (what merge_masks
    hands it)."""

    def __init__(self, layer: nn.TransformerEncoderLayer, mask_type: int | None = 2):
        super().__init__()
        self.layer = layer
        self.mask_type = mask_type

    def forward(self, x, mask):
        layer, attn = self.layer, self.layer.self_attn
        return torch._transformer_encoder_layer_fwd(
            x, E, HEADS, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
            False, layer.norm_first, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
            layer.norm2.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
            mask, self.mask_type)


def test_bare_backend_finds_the_fused_layer_and_names_what_stays_opaque():
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True).eval()
    state = SparsityState(Policy.coerce("spion-cf"))
    options = {"inner": "eager", "state": state}
    x = torch.randn(B, L, E)
    with torch.no_grad():
        torch.compile(layer, backend="spion", options=options)(x)  # fused eval path, expanded
    assert [s.spec.name for s in state.attention_sites()] == ["self_attn"]
    # dynamic=True (a symbolic dropout_p) keeps nn.MultiheadAttention opaque: the warning names it and why
    torch._dynamo.reset()
    module = Attn(True, {"need_weights": False}).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = {"inner": "eager", "state": SparsityState(Policy.coerce("spion-cf"))}  # warns once per state
        torch.compile(module, backend="spion", dynamic=True, options=fresh)(*_inputs())
    (message,) = [str(w.message) for w in caught if "no attention site" in str(w.message)]
    assert "F.multi_head_attention_forward" in message and "kept opaque" in message



@pytest.mark.parametrize("mask_type", [None, 1, 2])
def test_fused_encoder_layer_at_every_length(mask_type):
    """The fused eval op, symbolic after a second length, expands once and keeps its site."""
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True).double().eval()
    module = Fused(layer, mask_type)
    state = SparsityState(Policy.coerce("spion-cf"))
    compiled = torch.compile(module, backend="spion", options={"inner": "eager", "state": state})
    g = torch.Generator().manual_seed(2)
    for length in (8, 11, 13):
        x = torch.randn(B, length, E, generator=g, dtype=torch.float64)
        mask = {None: None, 1: torch.zeros(B, length, dtype=torch.bool).index_fill(1, torch.tensor([length - 1]), True),
                2: torch.randn(B, HEADS, length, length, generator=g, dtype=torch.float64) > 1}[mask_type]
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, mask), module(x, mask), rtol=1e-10, atol=1e-10)
    records = state.compiler.records
    assert len(records) == 2 and all(len(r.attention_sites) == 1 for r in records)


class EinsumAttention(nn.Module):
    """Attention written with einsum (the forms of test_detect.EINSUM_FORMS) between projections."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        probs = torch.softmax(torch.einsum("bhld,bhmd->bhlm", q, k) * (E // HEADS) ** -0.5, dim=-1)
        return self.out(torch.einsum("bhlm,bhmd->bhld", probs, v).transpose(1, 2).flatten(2))


def test_einsum_attention_dense_policy():
    x, _, _ = _inputs(batch_first=True)
    model = _dense_equal(nn.Sequential(EinsumAttention(), EinsumAttention()), x)
    assert _attention_sites(model) == ["0", "1"]


# ---------------------------------------------------------------------------------------------
# examples/transformer_encoder_spion.py


def test_transformer_encoder_example_reaches_the_sparse_phase():
    path = Path(__file__).resolve().parents[1] / "examples" / "transformer_encoder_spion.py"
    spec = importlib.util.spec_from_file_location("example_transformer_encoder_spion", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Dynamo looks the model's module up by name
    spec.loader.exec_module(module)
    assert "examples/transformer_encoder_spion.py" in module.__doc__
    model = module.main(["--seq-len", "64", "--batch-size", "2", "--steps", "6", "--layers", "2", "--d-model", "32",
                         "--heads", "2", "--block-size", "16", "--probe-interval", "2", "--max-dense-steps", "4",
                         "--inner", "eager"])
    sites = list(model.spion_state.attention_sites())
    assert [s.spec.name for s in sites] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert all(s.phase == "sparse" and int(s.switch_step) == 4 for s in sites)
    assert all(s.spec.is_causal for s in sites)  # the causal mask + is_causal hint reached the site
    assert any(not bool(s.pattern.all()) for s in sites), "patterns should be sparse"
