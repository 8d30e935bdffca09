"""Attention mass: what a block pattern keeps of a probe map, and the coverage-targeted pattern.

**Mass kept.** A probe map A (post-softmax attention averaged over the probed batches, and over
heads unless per head) holds, in every row of a real query, a distribution that sums to 1 per
sample. Rows of queries that are padding in every probed sample are all zero in the probe (the
probe zeroes fully masked rows), and a row padded in some samples sums to the share of samples in
which it is real. So we define

    mass kept = (sum of A over the kept blocks) / (sum of all of A),

the share of the attention of the real queries that the pattern keeps, each query row weighted
by how often it is real. Blocks are B x B tiles of the zero-padded map (nb = ceil(L / B)); on a
causal map the blocks above the diagonal hold nothing, so causal or not the denominator is the
whole map. A map with no mass at all has no defined share: NaN.

**Coverage pattern** (variant "p"): per layer (or per head), keep the fewest blocks whose mass
reaches ``coverage`` of the map's mass. Block masses add up, so with the diagonal forced the
greedy choice is optimal: the diagonal first, then the remaining candidates (strictly
off-diagonal; strictly below it when causal, so nothing above the diagonal is counted or kept)
by decreasing mass until the target is met (the target is `coverage` of the mass on and below
the diagonal when causal). ``max_density`` caps the number of kept blocks, as a
fraction of the pattern's cells (nb^2, or nb(nb+1)/2 when causal, as `pattern_density` counts
them); the diagonal is kept even when the cap is below it. Ties go to the lower row-major index,
so the pattern is deterministic. Blocks with no mass are never added: they would not raise it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["block_mass", "coverage_pattern", "mass_kept", "fewest_blocks_for_mass"]

# Float64 sums of a few thousand positive terms are exact to ~1e-13; a target met up to this
# relative slack is met (otherwise coverage=1.0 could miss by a rounding error and keep blocks
# that hold nothing).
_SLACK = 1e-12


def _as_stack(attn: Tensor) -> Tensor:
    if not isinstance(attn, Tensor) or not attn.is_floating_point():
        raise TypeError(f"attn must be a floating-point torch.Tensor, got {type(attn).__name__}")
    if attn.dim() not in (2, 3) or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] == 0:
        raise ValueError(f"attn must be [L, L] or [H, L, L] with L > 0, got shape {tuple(attn.shape)}")
    return attn.unsqueeze(0) if attn.dim() == 2 else attn


def block_mass(attn: Tensor, block_size: int) -> Tensor:
    """Float64 sum of each B x B block: [L, L] -> [1, nb, nb], [H, L, L] -> [H, nb, nb].

    One block row at a time is converted to float64, so the temporaries stay at B x L per head
    however long the sequence is.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    stack = _as_stack(attn)
    heads, length = stack.shape[0], stack.shape[-1]
    nb = -(-length // block_size)
    out = torch.zeros(heads, nb, nb, dtype=torch.float64, device=stack.device)
    for i in range(nb):
        rows = stack[:, i * block_size : (i + 1) * block_size].to(torch.float64).sum(1)  # [H, L]
        rows = torch.nn.functional.pad(rows, (0, nb * block_size - length))
        out[:, i] = rows.view(heads, nb, block_size).sum(-1)
    return out


def _cell_count(nb: int, causal: bool) -> int:
    return nb * (nb + 1) // 2 if causal else nb * nb


def coverage_pattern(
    mass: Tensor, coverage: float, *, causal: bool = False, max_density: float | None = None
) -> Tensor:
    """[H, nb, nb] block masses -> [H, nb, nb] bool: the fewest blocks reaching `coverage`.

    See the module docstring; each head (leading index) is chosen on its own.
    """
    if not 0.0 < float(coverage) <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    if max_density is not None and not 0.0 < float(max_density) <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density!r}")
    if mass.dim() != 3 or mass.shape[-1] != mass.shape[-2]:
        raise ValueError(f"mass must be [H, nb, nb], got shape {tuple(mass.shape)}")
    if not bool(torch.isfinite(mass).all()) or bool((mass < 0).any()):
        raise ValueError("block masses must be finite and non-negative")
    heads, nb, _ = mass.shape
    mass = mass.to(torch.float64)
    eye = torch.eye(nb, dtype=torch.bool, device=mass.device)
    candidate = torch.ones(nb, nb, dtype=torch.bool, device=mass.device).tril(-1) if causal else ~eye
    # Causal: blocks above the diagonal neither count toward the target nor are kept (a causal
    # probe map has no mass there anyway).
    total = (mass * (candidate | eye)).flatten(1).sum(1)  # [H]
    missing = coverage * total * (1.0 - _SLACK) - (mass * eye).flatten(1).sum(1)  # after the diagonal
    ranked = mass.masked_fill(~candidate, -1.0).flatten(1)
    # Stable sort: equal masses go to the lower row-major index, so the choice is deterministic.
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    sorted_mass = ranked.gather(1, order).clamp_min(0.0)
    gathered = sorted_mass.cumsum(1)
    # Number of candidates needed: the first prefix whose mass reaches what is missing.
    needed = (gathered < missing[:, None]).sum(1) + 1
    needed = torch.where(missing > 0, needed, torch.zeros_like(needed))
    needed = torch.minimum(needed, (sorted_mass > 0).sum(1))  # never add a block holding nothing
    if max_density is not None:
        budget = max(math.floor(float(max_density) * _cell_count(nb, causal)) - nb, 0)
        needed = needed.clamp_max(budget)
    take = torch.arange(order.shape[1], device=mass.device)[None, :] < needed[:, None]
    marks = torch.zeros(heads, nb * nb, dtype=torch.bool, device=mass.device)
    marks.scatter_(1, order, take)
    return marks.view(heads, nb, nb) | eye


def mass_kept(attn: Tensor, pattern: Tensor, block_size: int) -> tuple[float, Tensor]:
    """(share of the whole map's mass in kept blocks, per-head shares [H]) — see the docstring.

    attn [L, L] or [H, L, L]; pattern [nb, nb] or [H' , nb, nb] with H' = 1 or H. The overall
    share pools every head's mass (kept over total), so it equals the per-head mean when the
    heads' totals are equal, as they are for maps of real softmax rows. An [L, L] map gives one
    per-head value (that of the head-averaged map).
    """
    mass = block_mass(attn, block_size)
    keep = pattern.bool().to(mass.device)
    keep = keep.unsqueeze(0) if keep.dim() == 2 else keep
    if keep.shape[-1] != mass.shape[-1] or keep.shape[0] not in (1, mass.shape[0]):
        raise ValueError(
            f"pattern {tuple(pattern.shape)} does not fit a map of {tuple(attn.shape)} in blocks of {block_size}"
        )
    kept = (mass * keep).flatten(1).sum(1)
    total = mass.flatten(1).sum(1)
    per_head = torch.where(total > 0, kept / total.clamp_min(1e-300), torch.full_like(total, math.nan))
    overall = float(kept.sum() / total.sum()) if float(total.sum()) > 0 else math.nan
    return overall, per_head


def fewest_blocks_for_mass(
    attn: Tensor, share: float, block_size: int, *, causal: bool = False, diagonal: bool = False
) -> float:
    """Density of the best possible single pattern keeping `share` of the (head-averaged) map.

    The oracle for judging a pattern: greedy over every block, which is optimal because block
    masses add up. diagonal=True forces the diagonal first, as every pattern here has it (the
    best pattern among those). Density counts cells as `pattern_density` does.
    """
    grid = block_mass(attn, block_size).sum(0)
    nb = grid.shape[-1]
    target = float(share) * float(grid.sum()) * (1.0 - _SLACK)
    forced = 0
    if diagonal:
        target -= float(grid.diagonal().sum())
        grid = grid.masked_fill(torch.eye(nb, dtype=torch.bool, device=grid.device), 0.0)
        forced = nb
    ordered = torch.sort(grid.flatten(), descending=True).values
    blocks = int((ordered.cumsum(0) < target).sum()) + 1 if target > 0 else 0
    return min(forced + blocks, nb * nb) / _cell_count(nb, causal)
