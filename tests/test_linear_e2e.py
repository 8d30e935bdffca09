"""Linear sparsity end to end: GPT-2 (Conv1D/addmm) and Llama (linear) from small configs train
under each preset with masks respected every step; finalize() matches the masked model; a
checkpoint taken mid-schedule resumes identically."""

from __future__ import annotations

import copy

import pytest
import torch

import spion_fx
from spion_fx import zoo
from spion_fx.runtime.nm import is_nm

pytest.importorskip("transformers")

PRESETS = ["nm-2:4", "pgf-mdgf-1:4", "pgf-sdgf-1:4", "mst"]
SCHEDULE = dict(total_steps=12, dense_steps=2, finetune_steps=2, mst_update_interval=3, decay_beta=0.2)


def _loss(model, kwargs):
    logits = model(**kwargs).logits
    labels = kwargs["input_ids"] % logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _effective_masks_hold(model):
    controller = model.spion_state.linear
    for site in controller.sites.values():
        if not site.active or site.dense_reason is not None:
            continue
        weight = model.get_submodule(site.name).weight
        if site.method == "mst":
            assert not (weight.detach()[~site.mask]).any(), site.name
        elif site.nm is not None:
            assert is_nm(site.mask, *site.nm, transposed=site.weight_transposed), site.name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_train(arch, preset):
    torch.manual_seed(0)
    model, kwargs = zoo.build(arch, seq_len=16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spion_fx.sparsify(model, preset, optimizer=opt, inner="eager", **SCHEDULE)
    losses = []
    for _ in range(10):
        loss = _loss(model, kwargs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        _effective_masks_hold(model)
    assert losses[-1] < losses[0]
    rows = [r for r in spion_fx.report(model, print_table=False) if r["kind"] == "linear"]
    assert rows and all("density" in r for r in rows)


@pytest.mark.parametrize("mode", ["speed", "memory"])
def test_finalize_matches_masked_model(mode, tmp_path):
    torch.manual_seed(0)
    model, kwargs = zoo.build("llama", seq_len=16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spion_fx.sparsify(model, "nm-2:4", optimizer=opt, inner="eager")
    for _ in range(3):
        _loss(model, kwargs).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        masked = model(**kwargs).logits
    done = spion_fx.finalize(model, mode=mode, tokens=32, cache=tmp_path / "kernels.json")
    if mode == "memory":
        assert all("PackedNMLinear[cpu]" in v for v in done.values() if "2:4" in v), done
    with torch.no_grad():
        final = model(**kwargs).logits
    torch.testing.assert_close(final, masked, atol=1e-4, rtol=1e-4)
    rows = [r for r in spion_fx.report(model, print_table=False) if r["kind"] == "linear" and r["kernel"]]
    assert rows and all(r["kernel"] in ("dense", "cpu") and r["vs_dense"] > 0 for r in rows)
    if mode == "memory":
        assert all(r["kernel"] == "cpu" for r in rows)


@pytest.mark.parametrize("preset", ["pgf-sdgf-1:4", "mst"])
def test_resume_mid_schedule_is_identical(preset, tmp_path):
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=16)
    fresh = copy.deepcopy(model)
    model.train(), fresh.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spion_fx.sparsify(model, preset, optimizer=opt, inner="eager", **SCHEDULE)
    for _ in range(5):
        _loss(model, kwargs).backward()
        opt.step()
        opt.zero_grad()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    spion_fx.sparsify(fresh, preset, optimizer=fresh_opt, inner="eager", **SCHEDULE)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    for _ in range(5):
        a, b = _loss(model, kwargs), _loss(fresh, kwargs)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
        for o, loss in ((opt, a), (fresh_opt, b)):
            loss.backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
