"""PGF / MST schedules as pure functions, and PGF controllers resuming from a state_dict."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from spion_fx.policy import LinearPolicy
from spion_fx.runtime import schedules as S
from spion_fx.runtime.linear_controller import LinearSparsityController


@pytest.mark.parametrize("decay", ["linear", "exp"])
def test_mdgf_alpha(decay):
    p = LinearPolicy(method="mdgf", total_steps=1000, dense_steps=100, finetune_steps=200,
                     decay=decay, decay_beta=0.004)
    for step in range(0, 1000, 7):
        t = step - 100
        if step < 100:
            want = 1.0
        elif step >= 800:
            want = 0.0
        elif decay == "linear":
            want = max(0.0, 1 - 0.004 * t)
        else:
            want = math.exp(-0.004 * t)
        assert S.mdgf_alpha(step, p) == pytest.approx(want)
    assert S.mdgf_alpha(100, p) == 1.0  # t = 0 at the first decay step


@pytest.mark.parametrize("n,m,schedule,want", [
    (1, 16, "stepwise", [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]),
    (2, 4, "stepwise", [(3, 4), (2, 4)]),
    (1, 8, "stepwise", [(7, 8), (4, 8), (2, 8), (1, 8)]),
    (3, 16, "stepwise", [(15, 16), (8, 16), (4, 16), (3, 16)]),
    (1, 2, "stepwise", [(1, 2)]),
    (1, 8, "geometric", [(8, 64), (4, 32), (2, 16), (1, 8)]),
    (1, 8, "densify", [(1, 64), (1, 32), (1, 16), (1, 8)]),
])
def test_sdgf_stages(n, m, schedule, want):
    assert S.sdgf_stages(n, m, schedule) == want


def test_geometric_keeps_density():
    assert {n / m for n, m in S.sdgf_stages(2, 8, "geometric")} == {0.25}


def test_sdgf_stage_boundaries():
    # decay region [100, 600) split into 5 equal stages of 100 steps; fine-tune at the target.
    p = LinearPolicy(method="sdgf", n=1, m=16, total_steps=1000, dense_steps=100, finetune_steps=400)
    assert S.sdgf_stage_index(99, p) is None and S.sdgf_nm(99, p) is None
    expected = {100: 0, 199: 0, 200: 1, 299: 1, 300: 2, 400: 3, 500: 4, 599: 4, 600: 4, 999: 4}
    for step, idx in expected.items():
        assert S.sdgf_stage_index(step, p) == idx, step
    assert S.sdgf_nm(250, p) == (8, 16) and S.sdgf_nm(700, p) == (1, 16)
    assert S.pgf_phase(600, p) == "finetune" and S.pgf_phase(599, p) == "decay"


def test_mst_sparsity_schedule():
    p = LinearPolicy(method="mst", total_steps=1000, mst_sparsity=0.9, mst_final_sparsity=0.6,
                     mst_warmup_frac=0.1, mst_ultra_frac=0.7)
    assert S.mst_sparsity(0, p) == 0.0
    assert S.mst_sparsity(50, p) == pytest.approx(0.45)
    assert S.mst_sparsity(100, p) == pytest.approx(0.9)
    assert S.mst_sparsity(699, p) == pytest.approx(0.9)
    assert S.mst_sparsity(850, p) == pytest.approx(0.75)
    assert S.mst_sparsity(1000, p) == pytest.approx(0.6)
    p0 = LinearPolicy(method="mst", total_steps=1000, mst_warmup_frac=0.0)
    assert S.mst_sparsity(0, p0) == p0.mst_sparsity


def test_mst_drop_fraction_cosine():
    p = LinearPolicy(method="mst", total_steps=800, mst_drop_fraction=0.3)
    for t in (0, 100, 400, 799, 800):
        assert S.mst_drop_fraction(t, p) == pytest.approx(0.15 * (1 + math.cos(math.pi * t / 800)))
    assert S.mst_drop_fraction(0, p) == pytest.approx(0.3) and S.mst_drop_fraction(800, p) == pytest.approx(0)


# -- PGF controllers -----------------------------------------------------------------------------

def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 8))


def _run(model, ctl, opt, steps, start):
    sites = {"0": ctl.site("0"), "2": ctl.site("2")}
    g = torch.Generator().manual_seed(start)
    for step in range(start, start + steps):
        x = torch.randn(4, 32, generator=g)
        h = torch.tanh(sites["0"](x, model[0].weight, model[0].bias))
        loss = sites["2"](h, model[2].weight, model[2].bias).square().mean()
        loss.backward()
        ctl.before_optimizer_step(step, opt)
        opt.step()
        opt.zero_grad()
        ctl.after_optimizer_step(step, opt)


def _controller(policy, model):
    layers = {"0": ((16, 32), False), "2": ((8, 16), False)}
    ctl = LinearSparsityController(policy, layers)
    ctl.bind({"0": model[0].weight, "2": model[2].weight})
    return ctl


@pytest.mark.parametrize("method", ["mdgf", "sdgf", "srste"])
def test_pgf_controller_resume_identical(method):
    policy = LinearPolicy(method=method, n=1, m=8, total_steps=40, dense_steps=4, finetune_steps=8,
                          decay="linear", decay_beta=0.05, update_interval=2)
    a = _model(0)
    ctl_a = _controller(policy, a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    _run(a, ctl_a, opt_a, 13, 0)
    snap = ({k: v.clone() for k, v in a.state_dict().items()},
            {k: v.clone() for k, v in ctl_a.state_dict().items()},
            copy.deepcopy(opt_a.state_dict()))
    b = _model(1)  # different weights, overwritten by the checkpoint
    ctl_b = _controller(policy, b)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    b.load_state_dict(snap[0])
    ctl_b.load_state_dict(snap[1])
    opt_b.load_state_dict(snap[2])
    assert ctl_b.variant_key() == ctl_a.variant_key() and ctl_b.report() == ctl_a.report()
    _run(a, ctl_a, opt_a, 20, 13)
    _run(b, ctl_b, opt_b, 20, 13)
    for key, value in ctl_a.state_dict().items():
        assert torch.equal(value, ctl_b.state_dict()[key]), key
    assert ctl_b.report() == ctl_a.report()
    assert int(ctl_b.step) == 33


def test_sdgf_controller_walks_stages():
    policy = LinearPolicy(method="sdgf", n=1, m=8, total_steps=40, dense_steps=4, finetune_steps=4)
    model = _model(0)
    ctl = _controller(policy, model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = []
    for step in range(40):
        _run(model, ctl, opt, 1, step)
        site = ctl.site("0")
        seen.append(site.describe()["pattern"])
        if site.active:
            n, m = site.nm
            counts = site.mask.reshape(16, -1, m).sum(-1)
            assert bool((counts == n).all())
    assert seen[2] == "dense" and seen[3] == "7:8"  # state after step 3 = step 4's forward
    assert seen[-1] == "1:8" and {"4:8", "2:8"} <= set(seen)


def test_variant_key_changes_only_at_phase_change():
    policy = LinearPolicy(method="mdgf", n=2, m=4, total_steps=20, dense_steps=5, finetune_steps=5)
    model = _model(0)
    ctl = _controller(policy, model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    keys = []
    for step in range(20):
        keys.append(ctl.variant_key())
        _run(model, ctl, opt, 1, step)
    assert len(set(keys)) == 2  # dense -> sparse; decay -> fine-tune only moves α


def test_training_flops_pgf():
    policy = LinearPolicy(method="srste", n=1, m=4, total_steps=10, dense_steps=2)
    ctl = LinearSparsityController(policy, {"a": ((16, 32), False)})
    sparse, dense = ctl.training_flops(tokens_per_step=100)
    p, t = 16 * 32, 100
    assert dense == 10 * 6 * p * t
    assert sparse == 2 * 6 * p * t + 8 * 2 * p * t * (2 * 0.25 + 1)
