"""Mixed Sparsity Training building blocks (ALGORITHMS.md §3): ER densities, random initial
masks, the prune / Mixed-Growing topology update, and optimizer-state surgery.

MST is unstructured, so masks are flat sets of positions in the weight's storage layout; whether
the weight is stored transposed does not matter here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


def er_densities(shapes: Mapping[str, tuple[int, int]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi densities d_i ∝ (fan_in + fan_out)/(fan_in·fan_out), scaled so that
    Σ d_i·N_i = (1 − sparsity)·Σ N_i, with layers that would exceed 1 clamped to 1 and their
    surplus redistributed over the others (the RigL procedure)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid: expected a number in [0, 1]")
    sizes = {k: int(a) * int(b) for k, (a, b) in shapes.items()}
    raw = {k: (a + b) / (a * b) for k, (a, b) in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    eps = 0.0
    while True:
        budget = (1.0 - sparsity) * total - sum(sizes[k] for k in dense)
        divisor = sum(raw[k] * sizes[k] for k in shapes if k not in dense)
        if divisor <= 0:
            break
        eps = budget / divisor
        # Marking every overflowing layer at once is safe: each mark raises eps (see RigL).
        over = {k for k in shapes if k not in dense and eps * raw[k] > 1.0}
        if not over:
            break
        dense |= over
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def random_mask(
    shape: tuple[int, ...], density: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Tensor:
    """Boolean mask with exactly round(density·numel) active positions, chosen uniformly."""
    numel = 1
    for s in shape:
        numel *= int(s)
    k = int(round(density * numel))
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:k]] = True
    return flat.reshape(shape).to(device)


@dataclass
class TopologyUpdate:
    mask: Tensor  # new boolean mask
    pruned: Tensor  # boolean: active before, removed now
    grown: Tensor  # boolean: (re)activated now; their weights must be set to 0
    n_prune: int
    n_grow: int
    n_grow_gradient: int
    n_grow_random: int


def update_counts(n_active: int, numel: int, target_sparsity: float, drop_fraction: float) -> tuple[int, int]:
    """(n_prune, n_grow) of one MST update.

    n_prune = max(⌊n_active·ζ⌋, (s_target − s_cur)·N), n_grow = n_prune − (s_target − s_cur)·N, with
    (s_target − s_cur)·N taken as the integer change of zero count the target asks for."""
    delta = int(round(target_sparsity * numel)) - (numel - n_active)
    n_prune = min(max(int(n_active * drop_fraction), delta), n_active)
    n_grow = n_prune - delta
    return n_prune, max(0, min(n_grow, numel - n_active + n_prune))


def topology_update(
    weight: Tensor,
    mask: Tensor,
    dense_grad: Tensor | None,
    target_sparsity: float,
    drop_fraction: float,
    grow_ratio: int,
    generator: torch.Generator,
) -> TopologyUpdate:
    """Prune the smallest |w| among active weights, then Mixed-Growing among inactive positions.

    Of n_grow, ⌊n_grow·r/(r+1)⌋ are grown by dense-gradient magnitude, the rest uniformly at random
    among the remaining inactive positions. Positions pruned in this very update are eligible for
    regrowth (as in RigL); without that, growth from a fully dense mask would have no candidates.
    Without a gradient (layer unused this step) all growth is random."""
    flat_w = weight.detach().reshape(-1)
    flat_m = mask.reshape(-1)
    numel = flat_m.numel()
    n_active = int(flat_m.sum())
    n_prune, n_grow = update_counts(n_active, numel, target_sparsity, drop_fraction)

    inf = torch.tensor(float("inf"), device=flat_w.device)
    new = flat_m.clone()
    if n_prune:
        score = torch.where(flat_m, flat_w.abs().float(), inf)
        new[score.topk(n_prune, largest=False).indices] = False
    pruned = flat_m & ~new

    n_grad = n_grow * grow_ratio // (grow_ratio + 1) if dense_grad is not None else 0
    n_rand = n_grow - n_grad
    grown = torch.zeros_like(flat_m)
    if n_grad:
        g = dense_grad.detach().reshape(-1).abs().float()
        score = torch.where(new, -inf, g)
        grown[score.topk(n_grad).indices] = True
    if n_rand:
        noise = torch.rand(numel, generator=generator).to(flat_w.device)
        score = torch.where(new | grown, -inf, noise)
        grown[score.topk(n_rand).indices] = True
    new |= grown
    shape = mask.shape
    return TopologyUpdate(
        mask=new.reshape(shape),
        pruned=pruned.reshape(shape),
        grown=grown.reshape(shape),
        n_prune=n_prune,
        n_grow=n_grow,
        n_grow_gradient=n_grad,
        n_grow_random=n_rand,
    )


def zero_optimizer_state(optimizer: torch.optim.Optimizer | None, param: Tensor, positions: Tensor) -> list[str]:
    """Zero every per-element state tensor of ``param`` (Adam/AdamW exp_avg, exp_avg_sq,
    max_exp_avg_sq, SGD momentum_buffer, ...) at ``positions``, so a regrown weight starts fresh
    and a pruned one carries no momentum back if it returns. Returns the keys touched."""
    if optimizer is None:
        return []
    touched = []
    for key, value in optimizer.state.get(param, {}).items():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(positions.to(value.device), 0)
            touched.append(key)
    return touched
