"""SPION end to end on HF GPT-2 (causal) and BERT (padding mask), CPU.

Dense phase must equal the unsparsified model; the switch must happen; the sparse phase must
equal an independent dense reference that applies each layer's block pattern as a mask (plugged
into the HF model through its attention-function registry, so it shares none of our wiring); and
training must keep lowering the loss after the switch.
"""

from __future__ import annotations

import copy

import pytest
import torch

import spion_fx
from spion_fx import zoo

transformers = pytest.importorskip("transformers")

SEQ, BLOCK = 32, 8


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _register_block_reference(patterns: dict[int, torch.Tensor]) -> str:
    """An HF attention function: float64 dense attention masked by the block pattern."""

    def block_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        q, k, v = query.double(), key.double(), value.double()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = q @ k.transpose(-1, -2) * scale
        lq, lk = scores.shape[-2:]
        visible = torch.ones(lq, lk, dtype=torch.bool)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                visible = visible & attention_mask
            else:
                visible = visible & (attention_mask > torch.finfo(attention_mask.dtype).min / 2)
        elif causal and lq > 1:
            visible = visible & torch.ones(lq, lk, dtype=torch.bool).tril()
        grid = patterns.get(id(module))
        if grid is not None:
            element = grid[0].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:lq, :lk]
            visible = visible & element
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        out = (probs @ v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    transformers.AttentionInterface.register("spion_block_reference", block_reference)
    # without a mask function of its own, HF builds no padding mask for a custom implementation
    AttentionMaskInterface.register("spion_block_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return "spion_block_reference"


def _train(model, kwargs, opt, steps, labels):
    losses = []
    for _ in range(steps):
        out = _output(model(**kwargs))
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_spion_end_to_end(name):
    torch.manual_seed(0)
    model, kwargs = zoo.build(name, seq_len=SEQ, batch=2, padding=(name == "bert"))
    reference = copy.deepcopy(model)
    model.train()
    reference.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    spion_fx.sparsify(
        model, "spion-cf", optimizer=opt, inner="aot_eager", block_size=BLOCK, probe_interval=2,
        quantile=0.6, filter_size=3, max_dense_steps=6,
    )
    ids = kwargs["input_ids"]
    # a learnable toy task: predict the token itself (identity through attention + MLP)
    labels = ids.clone() % _output(reference(**kwargs)).shape[-1]

    # dense phase: identical to the unsparsified model, step for step
    for _ in range(3):
        got = _output(model(**kwargs))
        want = _output(reference(**kwargs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for out in (got, want):
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
            loss.backward()
        for p, r in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4)
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()

    losses = _train(model, kwargs, opt, 5, labels)
    state = model.spion_state
    sites = list(state.attention_sites())
    assert sites and all(s.phase == "sparse" for s in sites), [s.phase for s in sites]
    assert any(e["event"] == "switch" for e in state.events)
    assert all(s.pattern.shape[-1] == SEQ // BLOCK for s in sites)
    assert any(not bool(s.pattern.all()) for s in sites), "patterns should be sparse"

    # sparse phase == dense attention with each layer's block mask (independent reference)
    checker = copy.deepcopy(reference)
    checker.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("spion_state")})
    patterns = {id(checker.get_submodule(s.spec.name)): s.pattern for s in sites}
    checker.set_attn_implementation(_register_block_reference(patterns))
    model.eval()
    checker.eval()
    with torch.no_grad():
        got = _output(model(**kwargs))
        want = _output(checker(**kwargs))
    if "attention_mask" in kwargs:  # padded query rows are never used; compare real tokens
        keep = kwargs["attention_mask"].bool()
        got, want = got[keep], want[keep]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # training goes on in the sparse phase and the loss keeps falling
    model.train()
    later = _train(model, kwargs, opt, 12, labels)
    assert later[-1] < losses[-1]

    rows = spion_fx.report(model, print_table=False)
    assert {r["site"] for r in rows if r["kind"] == "attention"} == {s.spec.name for s in sites}
    assert all(r["phase"] == "sparse" and 0 < r["density"] < 1 for r in rows if r["kind"] == "attention")


def test_checkpoint_after_switch_round_trips(tmp_path):
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=SEQ, batch=2)
    model.train()
    fresh = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    policy = dict(inner="aot_eager", block_size=BLOCK, probe_interval=2, quantile=0.6, max_dense_steps=4)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **policy)
    labels = kwargs["input_ids"] % 64
    _train(model, kwargs, opt, 6, labels)
    assert all(s.phase == "sparse" for s in model.spion_state.attention_sites())
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    spion_fx.sparsify(fresh, "spion-cf", optimizer=fresh_opt, **policy)
    ckpt = torch.load(path)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(_output(fresh(**kwargs)), _output(model(**kwargs)))
    assert [s.phase for s in fresh.spion_state.attention_sites()] == ["sparse"] * 2
    model.train(), fresh.train()
    a = _train(model, kwargs, opt, 3, labels)
    b = _train(fresh, kwargs, fresh_opt, 3, labels)
    assert a == pytest.approx(b, rel=1e-5)


def test_per_head_patterns():
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=SEQ, batch=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, inner="eager", block_size=BLOCK,
                      probe_interval=2, quantile=0.6, max_dense_steps=4, per_head=True)
    labels = kwargs["input_ids"] % 64
    _train(model, kwargs, opt, 6, labels)
    heads = model.config.n_head
    for site in model.spion_state.attention_sites():
        assert site.phase == "sparse" and site.pattern.shape == (heads, SEQ // BLOCK, SEQ // BLOCK)
        assert all(site.pattern[h].diagonal().all() for h in range(heads))
    model.eval()
    with torch.no_grad():
        out = _output(model(**kwargs))
    assert torch.isfinite(out).all()


def test_llama_gqa_under_bf16_autocast_through_the_switch():
    """HF Llama's rotary embedding gives float32 q/k next to a bf16 v under autocast; the sparse
    site casts them as SDPA would (the autocast dtype) instead of refusing mixed dtypes."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        attention_dropout=0.1, use_cache=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, inner="eager", block_size=BLOCK,
                      probe_interval=2, quantile=0.6, max_dense_steps=3)
    ids = torch.randint(1, 64, (2, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -5:] = 0
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert all(s.phase == "sparse" for s in model.spion_state.attention_sites())
