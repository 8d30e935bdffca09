"""The `spion` torch.compile backend keeps its state with the model it compiles (issue 18 item 6,
issue 21 item 5): options take `sparsify`'s policy overrides, the state is ``model.spion_state``
(so ``get_state`` and ``state_dict`` work and a resumed run keeps patterns and phases), and two
models compiled with the same options never share a state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spion_fx
from spion_fx.api import attach_state
from spion_fx.lowering.backend_entry import parse_options

pytest.importorskip("transformers")

OPTIONS = {"policy": "spion-cf", "block_size": 16, "probe_interval": 1, "max_dense_steps": 3, "inner": "eager"}
IDS = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    return GPT2LMHeadModel(cfg).train()


def _step(compiled) -> None:
    compiled(input_ids=IDS, labels=IDS).loss.backward()


def _sites(model):
    return list(spion_fx.get_state(model).attention_sites())


@pytest.fixture(scope="module")
def trained():
    """A GPT-2 compiled with the bare backend and trained past the switch (forced at step 3)."""
    model = _gpt2()
    compiled = torch.compile(model, backend="spion", options=dict(OPTIONS))
    for _ in range(5):
        _step(compiled)
    return model, compiled


def test_options_take_policy_overrides_and_the_state_is_the_models(trained):
    model, compiled = trained
    state = spion_fx.get_state(model)
    assert spion_fx.get_state(compiled) is state is model.spion_state
    att = state.policy.attention
    assert (att.block_size, att.probe_interval, att.max_dense_steps) == (16, 1, 3)
    assert state.policy.inner_compiler == "eager"
    assert [s.spec.name for s in state.attention_sites()] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert int(state.step) == 4  # the first graph counts training forwards: 5 forwards end 4 steps
    assert all(s.phase == "sparse" for s in state.attention_sites())
    keys = model.state_dict()
    assert "spion_state.attention.transformer__h__0__attn.pattern" in keys
    assert keys["spion_state.attention.transformer__h__0__attn.pattern"].numel() > 0


def test_a_resumed_run_keeps_patterns_and_phases(trained):
    model, _ = trained
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    patterns = [s.pattern.clone() for s in _sites(model)]

    before = _gpt2()  # loaded before the first forward: attach the backend's state first
    attach_state(before, OPTIONS)
    before.load_state_dict(checkpoint)
    _step(torch.compile(before, backend="spion", options=dict(OPTIONS)))

    after = _gpt2()  # loaded after the first forward (which ran dense)
    compiled = torch.compile(after, backend="spion", options=dict(OPTIONS))
    _step(compiled)
    after.load_state_dict(checkpoint)
    for site in _sites(after):
        site.kernel_calls = dict.fromkeys(site.kernel_calls, 0)
    _step(compiled)

    for resumed in (before, after):
        sites = _sites(resumed)
        assert [s.phase for s in sites] == ["sparse", "sparse"]
        assert all(torch.equal(s.pattern, p) for s, p in zip(sites, patterns))
        assert all(s.kernel_calls["sparse"] == 1 and s.kernel_calls["dense"] == 0 for s in sites)


def test_two_models_compiled_alike_never_share_a_state(trained):
    first, _ = trained
    second = _gpt2()  # Dynamo reuses the first model's compiled frame for it
    _step(torch.compile(second, backend="spion", options=dict(OPTIONS)))
    a, b = spion_fx.get_state(first), spion_fx.get_state(second)
    assert a is not b
    assert [s.spec.name for s in b.attention_sites()] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert not {id(s) for s in a.attention_sites()} & {id(s) for s in b.attention_sites()}
    assert int(b.step) == 0 and all(s.phase == "dense" for s in b.attention_sites())
    assert all(s.phase == "sparse" for s in a.attention_sites()) and int(a.step) == 4


def test_unknown_option_raises_a_value_error_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown spion backend option\(s\) \['bogus'\].*block_size"):
        parse_options({"policy": "spion-cf", "bogus": 1})
    with pytest.raises(Exception, match="unknown spion backend option") as caught:  # noqa: B017
        torch.compile(nn.Linear(4, 4), backend="spion", options={"bogus": 1})(torch.randn(2, 4))
    assert isinstance(getattr(caught.value, "inner_exception", caught.value), ValueError)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 64, 3, 4, 8).permute(2, 0, 3, 1, 4)
        torch._dynamo.graph_break()  # the attention graph has no parameter: routed by the stack
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(2, 64, 32))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_graph_breaks_keep_one_state_on_the_root_per_model():
    torch.manual_seed(0)
    nets = [_Net(), _Net()]
    compiled = [torch.compile(n, backend="spion", options=dict(OPTIONS)) for n in nets]
    x = torch.randn(2, 64, 32)
    for _ in range(5):
        compiled[0](x).sum().backward()
    compiled[1](x).sum().backward()
    first, second = (spion_fx.get_state(n) for n in nets)
    assert not any(hasattr(b, "spion_state") for n in nets for b in n.blocks)
    assert len(first.attention) == len(second.attention) == 2
    assert all(s.phase == "sparse" for s in first.attention_sites())
    assert all(s.phase == "dense" for s in second.attention_sites()) and int(second.step) == 0
