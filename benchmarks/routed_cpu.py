"""CPU benchmark: routed (per-input) block-sparse attention vs a fixed layout of the same density
vs dense causal SDPA, fwd+bwd.

The routed step builds its layout inside the step (``routed_layout`` on the step's q and k, as a
routed site would), so its time includes the router; the router alone is timed too. The fixed
layout is shared by heads and inputs: the diagonal, the first block and random blocks left of the
diagonal, as many as the routed layout keeps. Standalone: ``python benchmarks/routed_cpu.py
[--quick] [--threads N]`` prints one table; every ratio comes from one interleaved run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fwd_bwd_step, interleaved_medians, print_table, random_qkv  # noqa: E402

from spion_fx.kernels import BlockLayout, block_sparse_attention, routed_layout  # noqa: E402


def causal_density(n_blocks: int, top_k: int, sinks: int = 1) -> float:
    """Fraction of the full block grid a causal routed layout keeps (every row full)."""
    kept = sum(min(row + 1, top_k + sinks + 1) for row in range(n_blocks))
    return kept / n_blocks**2


def top_k_for(n_blocks: int, density: float, sinks: int = 1) -> int:
    return min(range(n_blocks), key=lambda k: abs(causal_density(n_blocks, k, sinks) - density))


def fixed_causal_layout(n_blocks: int, block: int, n_kept: int, seed: int = 0) -> BlockLayout:
    """Diagonal + first block + random blocks below the diagonal: ``n_kept`` blocks in all."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.eye(n_blocks, dtype=torch.bool)
    grid[:, 0] = True
    free = (torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril() & ~grid).flatten()
    free = free.nonzero().squeeze(1)
    extra = max(n_kept - int(grid.sum()), 0)
    grid.view(-1)[free[torch.randperm(free.numel(), generator=gen)[:extra]]] = True
    return BlockLayout.from_dense(grid, block)


def bench(length: int, density: float, reps: int) -> list[dict]:
    b, h, d, block = 1, 8, 64, 64
    n_blocks = length // block
    top_k = top_k_for(n_blocks, density)
    q, k, v = random_qkv(b, h, length, d)

    def routed(q, k, v):
        layout = routed_layout(q.detach(), k.detach(), block_size=block, top_k=top_k)
        return block_sparse_attention(q, k, v, layout, causal=True)

    routed_once = routed_layout(q.detach(), k.detach(), block_size=block, top_k=top_k)
    n_kept = int(routed_once.kv_num_blocks.sum()) // h
    fixed = fixed_causal_layout(n_blocks, block, n_kept)

    def fixed_attn(q, k, v):
        return block_sparse_attention(q, k, v, fixed, causal=True)

    def prebuilt(q, k, v):
        return block_sparse_attention(q, k, v, routed_once, causal=True)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def router_only() -> None:
        routed_layout(q.detach(), k.detach(), block_size=block, top_k=top_k)

    t_dense, t_fixed, t_routed, t_prebuilt, t_router = interleaved_medians(
        [
            fwd_bwd_step(dense, q, k, v),
            fwd_bwd_step(fixed_attn, q, k, v),
            fwd_bwd_step(routed, q, k, v),
            fwd_bwd_step(prebuilt, q, k, v),
            router_only,
        ],
        reps,
    )
    return [
        {
            "case": f"fwd+bwd L={length} causal B{b} H{h} D{d} block {block}",
            "top_k": top_k,
            "density": round(routed_once.density, 4),
            "dense_ms": t_dense * 1e3,
            "fixed_ms": t_fixed * 1e3,
            "routed_ms": t_routed * 1e3,
            "router_ms": t_router * 1e3,
            "routed/dense": t_dense / t_routed,
            "routed/fixed": t_fixed / t_routed,
            "router share": t_router / t_routed,
            "prebuilt_ms": t_prebuilt * 1e3,
        }
    ]


def run(quick: bool = False) -> list[dict]:
    reps = 3 if quick else 7
    lengths = (1024, 2048) if quick else (2048, 4096)
    return [row for length in lengths for row in bench(length, 0.10, reps)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter sequences, fewer reps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_table("Routed block-sparse attention on CPU (medians, ratios from one run)", run(args.quick))
