"""Schedules as pure functions of the optimizer step (ALGORITHMS.md §2–3).

``step`` is the number of optimizer steps already taken, i.e. the value that governs the next
forward pass. Nothing here keeps state, so a resumed run recomputes exactly the same values.

PGF phases: dense for ``dense_steps``; then the decay region up to
``total_steps - finetune_steps`` (MDGF α decays / SDGF stages advance); then fine-tune with the
binary target mask.
"""

from __future__ import annotations

import math
from typing import Literal

from spion_fx.policy import LinearPolicy

Phase = Literal["dense", "decay", "finetune"]

# Geometric / densify schedules start this many halvings of M above the target
# (1:8 -> 8:64 / 1:64), the depth of the examples in the PGF paper.
SDGF_LEVELS = 3


def pgf_phase(step: int, policy: LinearPolicy) -> Phase:
    if step < policy.dense_steps:
        return "dense"
    if step >= policy.total_steps - policy.finetune_steps:
        return "finetune"
    return "decay"


def mdgf_alpha(step: int, policy: LinearPolicy) -> float:
    """Weight of pruned entries in MDGF: 1 while dense, decaying, 0 (binary mask) in fine-tune."""
    phase = pgf_phase(step, policy)
    if phase == "dense":
        return 1.0
    if phase == "finetune":
        return 0.0
    t = step - policy.dense_steps  # steps since the dense phase ended
    if policy.decay == "linear":
        return max(0.0, 1.0 - policy.decay_beta * t)
    return math.exp(-policy.decay_beta * t)


def sdgf_stages(n: int, m: int, schedule: str) -> list[tuple[int, int]]:
    """The N:M ratios an SDGF run passes through, ending with the target n:m."""
    if schedule == "stepwise":
        stages = [(m - 1, m)]
        i = 1
        while (m >> i) > n:
            stages.append((m >> i, m))
            i += 1
        stages.append((n, m))
    elif schedule == "geometric":  # constant density n/m, shrinking M
        stages = [(n << k, m << k) for k in range(SDGF_LEVELS, -1, -1)]
    elif schedule == "densify":  # constant N, shrinking M: sparse -> denser
        stages = [(n, m << k) for k in range(SDGF_LEVELS, -1, -1)]
    else:
        raise ValueError(
            f"linear.sdgf_schedule={schedule!r} is invalid: expected 'stepwise', 'geometric' or 'densify'"
        )
    out: list[tuple[int, int]] = []
    for s in stages:  # (m-1):m == m/2:m when m == 2
        if not out or out[-1] != s:
            out.append(s)
    return out


def sdgf_stage_index(step: int, policy: LinearPolicy) -> int | None:
    """Index into ``sdgf_stages`` for ``step``; None in the dense phase.

    All stages, the target included, get equal shares of the decay region (as the authors'
    comment describes; their code gives the target no share when finetune_steps is 0)."""
    phase = pgf_phase(step, policy)
    count = len(sdgf_stages(policy.n, policy.m, policy.sdgf_schedule))
    if phase == "dense":
        return None
    if phase == "finetune":
        return count - 1
    region = policy.total_steps - policy.finetune_steps - policy.dense_steps
    return min(count - 1, (step - policy.dense_steps) * count // region)


def sdgf_nm(step: int, policy: LinearPolicy) -> tuple[int, int] | None:
    """The N:M ratio in force at ``step`` (None = dense phase)."""
    idx = sdgf_stage_index(step, policy)
    if idx is None:
        return None
    return sdgf_stages(policy.n, policy.m, policy.sdgf_schedule)[idx]


def mst_sparsity(step: int, policy: LinearPolicy) -> float:
    """MST sparsity variation: warm-up 0 -> mst_sparsity (linear), held (ultra-sparse phase), then
    linear restoration towards mst_final_sparsity, reached at total_steps."""
    total = policy.total_steps
    warm_end = policy.mst_warmup_frac * total
    ultra_end = policy.mst_ultra_frac * total
    peak, final = policy.mst_sparsity, policy.mst_final_sparsity
    if step < warm_end:
        return peak * step / warm_end
    if step < ultra_end:
        return peak
    if step >= total or ultra_end >= total:
        return final
    return peak + (final - peak) * (step - ultra_end) / (total - ultra_end)


def mst_drop_fraction(step: int, policy: LinearPolicy) -> float:
    """Cosine-annealed drop fraction ζ(t) = ζ/2·(1 + cos(π·t/T))."""
    t = min(max(step, 0), policy.total_steps)
    return policy.mst_drop_fraction / 2 * (1 + math.cos(math.pi * t / policy.total_steps))
