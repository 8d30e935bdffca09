"""Zoo models: detected site counts equal the models' true counts, with real names."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache

import pytest
import torch
from test_detect import assert_sites_exact
from torch import nn

from spion_fx import zoo
from spion_fx.capture import capture
from spion_fx.passes.detect import detect_sites
from spion_fx.passes.sites import AttentionSite, LinearSite

CASES = [(name, attn) for name in zoo.names() for attn in ("sdpa", "eager")] + [("minilm", "sdpa")]


@cache
def detected(name: str, attn: str, padding: bool = False):
    """(model, example, attention sites, linear sites), captured once per case."""
    if name == "minilm":
        model, example = zoo.load_minilm(padding=padding)
    else:
        model, example = zoo.build(name, attn_implementation=attn, padding=padding)
    result = capture(model, (), example)
    assert result.graph_breaks == []
    attention: list[AttentionSite] = []
    linear: list[LinearSite] = []
    for graph in result.graphs:
        a, lin = detect_sites(graph)
        assert_sites_exact(graph.graph_module, graph.example_inputs, a)
        attention += a
        linear += lin
    return model, example, attention, linear


def counts(attention: list[AttentionSite], linear: list[LinearSite]) -> dict[str, int]:
    roles = Counter(site.role for site in linear)
    return {"attention": len(attention), "linear": roles["linear"], "embedding": roles["embedding"],
            "lm_head": roles["lm_head"]}


@pytest.mark.parametrize("name,attn", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_site_counts_and_names(name, attn):
    model, example, attention, linear = detected(name, attn)
    assert counts(attention, linear) == zoo.expected_counts(name, model, example)
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters(remove_duplicate=False))
    names = [site.name for site in attention]
    assert len(set(names)) == len(names)
    for site in attention:
        assert re.sub(r"#\d+$", "", site.name) in modules, site.name
        assert site.form == attn or name == "minilm"
    for site in linear:
        assert site.name in modules, site.name
        assert site.weight_name.endswith(".weight") and site.weight_name in parameters
        assert tuple(parameters[site.weight_name].shape) == site.weight_shape


def test_expected_counts_by_hand():
    # Independent of the hooks: GPT-2 has c_attn, c_proj, c_fc, c_proj per layer, wte/wpe and a
    # head tied to wte; T5's decoder layers have a self- and a cross-attention each.
    model, example, _, _ = detected("gpt2", "sdpa")
    assert zoo.expected_counts("gpt2", model, example) == {"attention": 2, "linear": 8, "embedding": 2, "lm_head": 1}
    model, example, _, _ = detected("t5", "sdpa")
    assert zoo.expected_counts("t5", model, example)["attention"] == 2 + 2 * 2


def test_hf_attention_facts():
    _, _, attention, _ = detected("llama", "sdpa")
    assert [s.name for s in attention] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s.enable_gqa and (s.num_heads, s.num_kv_heads) == (4, 2) and s.is_causal for s in attention)
    _, _, attention, _ = detected("gpt2", "sdpa")
    assert all(s.mask_kind == "bool_keep" and not s.is_causal for s in attention)
    _, _, attention, _ = detected("llama", "eager")
    assert all(s.enable_gqa and s.num_kv_heads == 2 and s.kv_repeat_nodes for s in attention)
    assert all(s.mask_kind == "additive" and s.scale == pytest.approx(8 ** -0.5) for s in attention)
    for attn in ("sdpa", "eager"):
        _, _, attention, _ = detected("t5", attn)
        cross = {s.name: s.cross_attention for s in attention}
        assert [n for n, c in cross.items() if c] == [f"decoder.block.{i}.layer.1.EncDecAttention" for i in (0, 1)]
        assert all((s.q_len, s.kv_len) == (8, 16) for s in attention if s.cross_attention)
        assert all(s.scale == 1.0 for s in attention)  # T5 does not scale scores


def test_gpt2_sites():
    _, _, attention, linear = detected("gpt2", "eager")
    assert [s.name for s in attention] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    conv = [s for s in linear if s.form == "addmm"]
    assert len(conv) == 8 and all(s.weight_transposed for s in conv)
    head = next(s for s in linear if s.role == "lm_head")
    assert head.name == "lm_head" and head.weight_name == "transformer.wte.weight"


def test_padding_mask_and_gqa_through_repeat_kv():
    model, example, attention, _ = detected("llama", "sdpa", padding=True)
    mask = example["attention_mask"]
    assert (mask == 0).any() and (mask == 1).all(dim=1).any()
    # With a mask HF repeats k/v instead of enable_gqa; the site still records GQA.
    assert all(s.mask is not None and s.enable_gqa and s.num_kv_heads == 2 and len(s.kv_repeat_nodes) == 6
               for s in attention)


def test_zoo_models_are_deterministic_and_validated():
    assert set(zoo.names()) >= {"gpt2", "bert", "llama", "vit", "t5"}
    model, example = zoo.build("bert", seq_len=8, batch=1)
    assert example["input_ids"].shape == (1, 8)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))
    with torch.no_grad():
        assert torch.equal(model(**example).logits, model(**example).logits)
    with pytest.raises(ValueError, match="name"):
        zoo.build("nope")
    with pytest.raises(ValueError, match="attn_implementation"):
        zoo.build("gpt2", attn_implementation="flash")
    _, t5_example = zoo.build("t5")
    assert "decoder_input_ids" in t5_example
