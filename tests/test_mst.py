"""MST: ER densities, counts of the topology update, Mixed-Growing, optimizer state, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from spion_fx.policy import LinearPolicy
from spion_fx.runtime.linear_controller import LinearSparsityController
from spion_fx.runtime.mst import (
    er_densities,
    random_mask,
    topology_update,
    update_counts,
    zero_optimizer_state,
)
from spion_fx.runtime.schedules import mst_sparsity

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc": (3072, 768), "out": (768, 3072), "tiny": (4, 4)}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9, 0.99])
def test_er_densities_hit_global_target(sparsity):
    d = er_densities(SHAPES, sparsity)
    total = sum(a * b for a, b in SHAPES.values())
    kept = sum(d[k] * a * b for k, (a, b) in SHAPES.items())
    assert kept == pytest.approx((1 - sparsity) * total, rel=1e-9)
    assert all(0.0 <= v <= 1.0 for v in d.values())


def test_er_densities_proportional_and_clamped():
    d = er_densities(SHAPES, 0.9)
    assert d["tiny"] == 1.0  # (4+4)/16 would exceed 1: clamped, surplus redistributed
    raw = {k: (a + b) / (a * b) for k, (a, b) in SHAPES.items()}
    ratios = {k: d[k] / raw[k] for k in SHAPES if k != "tiny"}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))


def test_random_mask_exact_count():
    g = torch.Generator().manual_seed(0)
    m = random_mask((37, 53), 0.3, g)
    assert int(m.sum()) == round(0.3 * 37 * 53)


@pytest.mark.parametrize("n_active,target,zeta", [(600, 0.5, 0.3), (600, 0.7, 0.1), (600, 0.2, 0.3),
                                                   (1000, 0.05, 0.3), (300, 0.7, 0.0)])
def test_update_counts_formula(n_active, target, zeta):
    numel = 1000
    delta = round(target * numel) - (numel - n_active)
    n_prune, n_grow = update_counts(n_active, numel, target, zeta)
    assert n_prune == max(math.floor(n_active * zeta), delta)
    assert n_grow == n_prune - delta
    assert n_active - n_prune + n_grow == numel - round(target * numel)


@pytest.mark.parametrize("target,ratio", [(0.6, 3), (0.8, 3), (0.3, 1), (0.6, 0)])
def test_topology_update_exact(target, ratio):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 50, generator=g)
    mask = random_mask(w.shape, 0.5, g)
    w = w * mask
    grad = torch.randn(40, 50, generator=g)
    res = topology_update(w, mask, grad, target, 0.3, ratio, g)
    n_active = int(mask.sum())
    n_prune, n_grow = update_counts(n_active, w.numel(), target, 0.3)
    assert (res.n_prune, res.n_grow) == (n_prune, n_grow)
    assert int(res.pruned.sum()) == n_prune and int(res.grown.sum()) == n_grow
    assert int(res.mask.sum()) == w.numel() - round(target * w.numel())
    # pruned = the n_prune smallest |w| among the active weights
    active_abs = w.abs()[mask]
    cut = active_abs.sort().values[n_prune - 1] if n_prune else -1
    assert bool((w.abs()[res.pruned] <= cut).all())
    # Mixed-Growing: ⌊n·r/(r+1)⌋ by gradient = the largest |g| among inactive-after-prune positions
    n_grad = n_grow * ratio // (ratio + 1)
    assert (res.n_grow_gradient, res.n_grow_random) == (n_grad, n_grow - n_grad)
    after_prune = mask & ~res.pruned
    cand = grad.abs().masked_fill(after_prune, -1).flatten()
    top = cand.topk(n_grad).indices
    assert bool(res.grown.flatten()[top].all())
    assert not bool((res.grown & after_prune).any())


def test_mixed_growing_random_share_is_uniform():
    # With r = 1 half the growth is random: over many draws, it lands where the gradient is 0.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 2000, generator=g)
    mask = torch.zeros(1, 2000, dtype=torch.bool)
    mask[:, :1000] = True
    grad = torch.zeros(1, 2000)
    grad[:, 1000:1100] = 10.0  # 100 strong-gradient positions
    res = topology_update(w * mask, mask, grad, 0.5, 0.2, 1, g)
    assert res.n_grow == 200 and res.n_grow_gradient == 100
    assert bool(res.grown[:, 1000:1100].all())
    rand = res.grown.clone()
    rand[:, 1000:1100] = False
    assert int(rand.sum()) == 100


def test_zero_optimizer_state():
    p = nn.Parameter(torch.randn(6, 5))
    for opt in (torch.optim.AdamW([p], lr=0.1, amsgrad=True), torch.optim.SGD([p], lr=0.1, momentum=0.9)):
        p.grad = torch.randn(6, 5)
        opt.step()
        where = torch.rand(6, 5) < 0.5
        keys = zero_optimizer_state(opt, p, where)
        assert keys
        for k in keys:
            assert bool((opt.state[p][k][where] == 0).all())
            assert bool((opt.state[p][k][~where] != 0).any())


# -- controller ----------------------------------------------------------------------------------

def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))


def _policy():
    return LinearPolicy(method="mst", total_steps=60, mst_sparsity=0.8, mst_final_sparsity=0.5,
                        mst_warmup_frac=0.2, mst_ultra_frac=0.6, mst_update_interval=5)


def _controller(model, policy):
    ctl = LinearSparsityController(policy, {"0": ((32, 24), False), "2": ((8, 32), False)}, seed=7)
    ctl.bind({"0": model[0].weight, "2": model[2].weight})
    return ctl


def _run(model, ctl, opt, start, steps, check=False):
    g = torch.Generator().manual_seed(start)
    s0, s2 = ctl.site("0"), ctl.site("2")
    for step in range(start, start + steps):
        x = torch.randn(8, 24, generator=g)
        y = s2(torch.relu(s0(x, model[0].weight, model[0].bias)), model[2].weight, model[2].bias)
        y.square().mean().backward()
        ctl.before_optimizer_step(step, opt)
        if check:
            for name, site in (("0", s0), ("2", s2)):
                w = ctl._weights[name]
                assert bool((w.grad[~site.mask] == 0).all())
        opt.step()
        opt.zero_grad()
        ctl.after_optimizer_step(step, opt)
        if check:
            for name, site in (("0", s0), ("2", s2)):
                w = ctl._weights[name]
                assert bool((w[~site.mask] == 0).all())
                st = opt.state[w]
                assert bool((st["exp_avg"][~site.mask] == 0).all())
                assert bool((st["exp_avg_sq"][~site.mask] == 0).all())


def test_controller_follows_schedule_and_keeps_invariants():
    model = _model(0)
    policy = _policy()
    ctl = _controller(model, policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    total = 32 * 24 + 8 * 32
    for start in range(0, 55, 5):
        _run(model, ctl, opt, start, 5, check=True)
        step = start + 5
        target = er_densities({"0": (32, 24), "2": (8, 32)}, mst_sparsity(step, policy))
        kept = sum(int(ctl.site(k).mask.sum()) for k in ("0", "2"))
        want = sum(round(target[k] * n) for k, n in (("0", 32 * 24), ("2", 8 * 32)))
        assert kept == want, step
        assert ctl.last_update["0"]["n_grow_gradient"] == ctl.last_update["0"]["n_grow"] * 3 // 4
    assert 0.2 < kept / total < 0.6
    rep = ctl.report()
    assert rep[0]["pattern"] == "unstructured" and rep[0]["density"] < 1.0


def test_mst_controller_resume_identical():
    policy = _policy()
    a = _model(0)
    ctl_a = _controller(a, policy)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    _run(a, ctl_a, opt_a, 0, 17)
    snap = copy.deepcopy((a.state_dict(), ctl_a.state_dict(), opt_a.state_dict()))
    b = _model(1)
    ctl_b = _controller(b, policy)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    b.load_state_dict(snap[0])
    ctl_b.load_state_dict(snap[1])
    opt_b.load_state_dict(snap[2])
    _run(a, ctl_a, opt_a, 17, 25)
    _run(b, ctl_b, opt_b, 17, 25)
    for key, value in ctl_a.state_dict().items():
        assert torch.equal(value, ctl_b.state_dict()[key]), key
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_mst_training_flops():
    policy = LinearPolicy(method="mst", total_steps=100, mst_update_interval=10, mst_warmup_frac=0.0,
                          mst_ultra_frac=1.0, mst_sparsity=0.75)
    ctl = LinearSparsityController(policy, {"a": ((64, 64), False)})
    sparse, dense = ctl.training_flops(10)
    p, t = 64 * 64, 10
    assert dense == 100 * 6 * p * t
    # d = 0.25 everywhere; 9 update steps use a dense weight gradient
    assert sparse == pytest.approx(100 * 2 * p * t * 3 * 0.25 + 9 * 2 * p * t * 0.75)
    assert dense / sparse > 3
