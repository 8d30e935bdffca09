"""Kill a run at any point — dense phase, right after a switch, mid-MST — and resume from the last
state_dict checkpoint (model + optimizer + spion state): the continued run matches an
uninterrupted one step for step. A checkpoint for another model or policy is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

import spion_fx
from spion_fx import zoo

POLICY = dict(inner="eager", block_size=8, probe_interval=2, quantile=0.6, filter_size=3, max_dense_steps=8)


def _run(model, opt, kwargs, steps):
    losses = []
    for _ in range(steps):
        logits = model(**kwargs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), kwargs["input_ids"].reshape(-1) % 64)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _fresh(base, preset, **policy):
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, preset, optimizer=opt, **policy)
    return model, opt


@pytest.mark.parametrize(
    "preset, policy, kill_at",
    [
        ("spion-cf", POLICY, 3),  # dense phase, between probe checks
        ("spion-cf", POLICY, 8),  # right after the switch
        ("spion-p", dict(POLICY, coverage=0.8, per_head=True), 8),  # the coverage variant, per head
        ("mst", dict(inner="eager", total_steps=12, mst_update_interval=3), 5),  # mid-MST phase
        ("spion-cf+pgf-sdgf-1:4", dict(POLICY, total_steps=12, dense_steps=2), 5),
    ],
)
def test_resume_matches_uninterrupted_run(preset, policy, kill_at, tmp_path):
    torch.manual_seed(0)
    base, kwargs = zoo.build("gpt2", seq_len=32)
    total = 12
    model, opt = _fresh(base, preset, **policy)
    uninterrupted = _run(model, opt, kwargs, total)

    first, first_opt = _fresh(base, preset, **policy)
    before = _run(first, first_opt, kwargs, kill_at)
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, tmp_path / "ckpt.pt")
    del first, first_opt  # the run is killed

    resumed, resumed_opt = _fresh(base, preset, **policy)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    after = _run(resumed, resumed_opt, kwargs, total - kill_at)
    assert before + after == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6)
    for a, b in zip(model.spion_state.attention_sites(), resumed.spion_state.attention_sites()):
        assert a.phase == b.phase and torch.equal(a.pattern, b.pattern)
        assert torch.allclose(a.mass_kept, b.mass_kept, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(a.mass_kept_per_head, b.mass_kept_per_head)


def test_checkpoint_for_another_policy_names_the_site(tmp_path):
    torch.manual_seed(0)
    base, kwargs = zoo.build("gpt2", seq_len=32)
    model, opt = _fresh(base, "spion-cf", **POLICY)
    _run(model, opt, kwargs, 10)
    state = model.state_dict()
    other, _ = _fresh(base, "spion-cf", **{**POLICY, "block_size": 16})
    other.load_state_dict(state)  # sites not built yet: checked when they appear
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn.*block_size=16"):
        other(**kwargs)


def test_checkpoint_for_another_model_is_an_error():
    torch.manual_seed(0)
    base, kwargs = zoo.build("gpt2", seq_len=32)
    model, opt = _fresh(base, "spion-cf", **POLICY)
    _run(model, opt, kwargs, 3)
    foreign = {k.replace("transformer__h__", "encoder__layer__"): v for k, v in model.state_dict().items()}
    other, other_opt = _fresh(base, "spion-cf", **POLICY)
    other.load_state_dict(foreign)
    with pytest.raises(ValueError, match="sites this model does not have: attention.encoder__layer__0"):
        _run(other, other_opt, kwargs, 1)
