"""Attention sites between compiled parts (lowering/partition.py): no re-lowering at SPION's
switch, exactness against the model without spion_fx, output strides kept across kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import spion_fx
from spion_fx import zoo
from spion_fx.lowering import backend
from spion_fx.lowering.partition import (
    CompileOnFirstCall,
    EagerSite,
    partition_runners,
    split_at_sites,
)

pytest.importorskip("transformers")

SEQ, BLOCK = 32, 8


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def count_lowerings(monkeypatch):
    """Counts every call of the inner compiler: whole graphs and partitions alike."""
    calls = []
    real = backend.inner_compiler

    def counting(name):
        compile_fn = real(name)

        def wrapped(gm, example_inputs):
            calls.append(len(gm.graph.nodes))
            return compile_fn(gm, example_inputs)

        return wrapped

    monkeypatch.setattr(backend, "inner_compiler", counting)
    return calls


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_switch_and_probe_steps_lower_nothing(count_lowerings, inner):
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=SEQ, batch=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, inner=inner, block_size=BLOCK,
                      probe_interval=2, quantile=0.6, max_dense_steps=5)
    ids = kwargs["input_ids"]
    lowered_after = []
    for _ in range(8):
        loss = F.cross_entropy(_logits(model(**kwargs)).flatten(0, 1), ids.flatten() % 64)
        loss.backward()
        opt.step()
        opt.zero_grad()
        lowered_after.append(len(count_lowerings))
    sites = list(model.spion_state.attention_sites())
    assert sites and all(s.phase == "sparse" for s in sites)
    # everything was lowered by the first step: probe steps (1, 3, 4) and the switch (5) add nothing
    assert lowered_after[0] > 0 and lowered_after == [lowered_after[0]] * 8
    rows = [r for r in spion_fx.report(model, print_table=False) if r["kind"] == "attention"]
    assert all(r["switch_s"] is not None and r["switch_s"] > 0 for r in rows)


def test_inductor_parts_serve_every_length_after_one_more_lowering(count_lowerings):
    """A length per batch after the switch: the first new length makes the graph dynamic (one
    more lowering of each part, dynamic); every later length runs what was lowered. Inductor given one
    call's tensors used to assert their sizes on the next length."""
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=SEQ, batch=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, inner="inductor", block_size=BLOCK,
                      probe_interval=1, quantile=0.6, max_dense_steps=2)
    lowered = []
    for length in (SEQ, SEQ, SEQ, 40, 48, 21, 56):
        ids = torch.randint(0, 64, (2, length))
        loss = F.cross_entropy(_logits(model(input_ids=ids)).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        lowered.append(len(count_lowerings))
    state = model.spion_state
    assert all(s.phase == "sparse" and s.kernel_calls["sparse"] == 5 for s in state.attention_sites())
    assert state.eager_forwards == 0
    assert lowered[3:] == [lowered[3]] * 4  # the parts compiled once, dynamic: 48, 21, 56 lower nothing


def test_dense_phase_equals_the_model_without_spion_fx_under_inductor():
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=SEQ, batch=2)
    reference = copy.deepcopy(model)
    model.train(), reference.train()
    spion_fx.sparsify(model, "spion-cf", block_size=BLOCK, probe_interval=1000)
    for _ in range(2):
        got, want = _logits(model(**kwargs)), _logits(reference(**kwargs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got.square().mean().backward()
        want.square().mean().backward()
        for (name, p), r in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=name)
        model.zero_grad(), reference.zero_grad()


def _toy_graph() -> tuple[fx.GraphModule, str]:
    """x -> linear -> [site] -> relu -> out, with the site as a call_module node."""

    class Site(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transposed = False

        def forward(self, x):
            # two kernels with different output layouts, like dense SDPA vs block-sparse
            return x.t().contiguous().t() * 2 if self.transposed else x * 2

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 6)
            self.site = Site()

        def forward(self, x):
            return torch.relu(self.site(self.lin(x)) + 1)

    class SiteIsALeaf(fx.Tracer):
        def is_leaf_module(self, module, qualname):
            return isinstance(module, Site) or super().is_leaf_module(module, qualname)

    toy = Toy()
    return fx.GraphModule(toy, SiteIsALeaf().trace(toy)), "site"


def test_split_module_keeps_site_eager_and_strides_stable():
    gm, target = _toy_graph()
    compiled = []

    def compile_fn(part, example_inputs):
        """Like inductor: the compiled code only accepts the strides it was compiled for."""
        compiled.append(part)
        strides = [x.stride() for x in example_inputs]

        def run(*args):
            assert [x.stride() for x in args] == strides, "input strides changed"
            return part.forward(*args)

        return run

    split = split_at_sites(gm, [target], compile_fn)
    runners = partition_runners(split)
    assert [type(r) for r in runners] == [CompileOnFirstCall, EagerSite, CompileOnFirstCall]
    x = torch.randn(4, 6, requires_grad=True)
    want = gm(x)
    torch.testing.assert_close(split(x), want)
    assert len(compiled) == 2
    site = runners[1]
    first_orders = site.orders
    gm.site.transposed = True  # the site's kernel now returns another layout
    got = split(x)
    torch.testing.assert_close(got, want)
    assert site.orders == first_orders and len(compiled) == 2  # no re-lowering either
    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_eager_site_keeps_its_layout_at_another_length():
    """With dynamic shapes a site's next call may be longer: its output is laid out in the first
    call's dimension order for its own shape (the first call's stride values would overlap)."""

    class Site(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.permuted = True

        def forward(self, x):  # dense SDPA's [B, H, L, D] view of [B, L, H, D] memory, or contiguous
            return x.transpose(1, 2).contiguous().transpose(1, 2) if self.permuted else x.clone()

    site = Site()
    runner = EagerSite(site)  # any callable partition
    short = torch.randn(2, 3, 5, 4)
    first = runner(short)
    assert first.stride() == short.transpose(1, 2).contiguous().transpose(1, 2).stride()
    site.permuted = False  # the block-sparse kernel: contiguous
    long = torch.randn(2, 3, 9, 4)
    out = runner(long)
    torch.testing.assert_close(out, long)
    assert out.stride() == (9 * 3 * 4, 4, 3 * 4, 1)  # [B, L, H, D] memory for the new length


def test_split_returns_the_graph_unchanged_without_sites():
    gm, _ = _toy_graph()
    assert split_at_sites(gm, ["not_there"], lambda g, i: g.forward) is gm
