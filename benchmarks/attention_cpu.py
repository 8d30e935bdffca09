"""CPU benchmark: spion block-sparse attention vs dense SDPA (and compiled FlexAttention).

Standalone: ``python benchmarks/attention_cpu.py [--quick]`` prints a table of ratios measured in
one run (medians; the machine is noisy, so compare ratios, not times). ``run(quick)`` returns the
rows for ``benchmarks/run_cpu.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fwd_bwd_step, interleaved_medians, random_qkv  # noqa: E402

from spion_fx.kernels import (  # noqa: E402
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_fwd,
)
from spion_fx.kernels.attention import native_cpu  # noqa: E402


def spion_like_layout(n_blocks: int, block: int, density: float, seed: int = 0) -> BlockLayout:
    """Diagonal band (width 3) plus random blocks up to ``density`` of the grid, shared by heads."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for offset in (-1, 0, 1):
        grid |= torch.diag(torch.ones(n_blocks - abs(offset), dtype=torch.bool), offset)
    extra = int(density * n_blocks * n_blocks) - int(grid.sum())
    free = (~grid).flatten().nonzero().squeeze(1)
    if extra > 0:
        pick = free[torch.randperm(free.numel(), generator=gen)[:extra]]
        grid.view(-1)[pick] = True
    return BlockLayout.from_dense(grid, block)


def _on_grouped_kernel(step):
    """The same step on the grouped kernel (PyTorch fused-attention ops), the native kernel's
    fallback: what the C++ kernel buys, measured in the same run."""

    def grouped_step() -> None:
        with native_cpu.use_kernel("grouped"):
            step()

    return grouped_step


def bench_training(
    length: int, density: float, causal: bool, reps: int, dropout_p: float = 0.0
) -> list[dict]:
    b, h, d, block = 1, 8, 64, 64
    layout = spion_like_layout(length // block, block, density)
    q, k, v = random_qkv(b, h, length, d)
    sparse_step = fwd_bwd_step(
        lambda q, k, v: block_sparse_attention(
            q, k, v, layout, causal=causal, dropout_p=dropout_p
        ),
        q, k, v,
    )  # fmt: skip
    dense, sparse, grouped = interleaved_medians(
        [
            fwd_bwd_step(
                lambda q, k, v: F.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, dropout_p=dropout_p
                ),
                q,
                k,
                v,
            ),
            sparse_step,
            _on_grouped_kernel(sparse_step),
        ],
        reps,
    )
    case = f"fwd+bwd L={length} {'causal' if causal else 'non-causal'}"
    baseline = "causal SDPA" if causal else "SDPA"
    if dropout_p:
        case += f" dropout={dropout_p}"
        baseline += f" dropout={dropout_p}"
    common = {
        "density": round(layout.density, 4),
        "baseline": baseline,
        "baseline_ms": dense * 1e3,
    }
    return [
        {"case": case, **common, "spion_ms": sparse * 1e3, "speedup": dense / sparse},
        {"case": case + " (grouped kernel)", **common, "spion_ms": grouped * 1e3,
         "speedup": dense / grouped},
    ]  # fmt: skip


def bench_inference_vs_flex(length: int, density: float, reps: int) -> list[dict]:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, h, d, block = 1, 8, 64, 64
    layout = spion_like_layout(length // block, block, density)
    q, k, v = (t.detach() for t in random_qkv(b, h, length, d))
    # FlexAttention reads the number of kv blocks from the width of kv_indices.
    kv_indices = F.pad(layout.kv_indices, (0, layout.num_kv_blocks - layout.kv_indices.shape[-1]))
    block_mask = BlockMask.from_kv_blocks(
        layout.kv_num_blocks[None].expand(b, h, -1).contiguous(),
        kv_indices[None].expand(b, h, -1, -1).contiguous(),
        BLOCK_SIZE=block,
    )
    flex = torch.compile(flex_attention, fullgraph=True)
    seed = torch.zeros((), dtype=torch.int64)
    layout_args = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices)

    def op_kernel() -> None:  # the op's own CPU kernel, bypassing the no-grad FlexAttention route
        block_sparse_attention_fwd(
            q, k, v, *layout_args, block, d**-0.5, False, None, 0.0, seed, False
        )

    with torch.no_grad():
        flex_ms, dense_ms, public_ms, op_ms = interleaved_medians(
            [
                lambda: flex(q, k, v, block_mask=block_mask),
                lambda: F.scaled_dot_product_attention(q, k, v),
                lambda: block_sparse_attention(q, k, v, layout),
                op_kernel,
            ],
            reps,
            warmup=2,
        )
    density = round(layout.density, 4)
    case = f"no-grad fwd L={length}"
    return [
        {"case": case + " (public)", "baseline": "compiled FlexAttention", "density": density,
         "baseline_ms": flex_ms * 1e3, "spion_ms": public_ms * 1e3, "speedup": flex_ms / public_ms},
        {"case": case + " (op kernel)", "baseline": "compiled FlexAttention", "density": density,
         "baseline_ms": flex_ms * 1e3, "spion_ms": op_ms * 1e3, "speedup": flex_ms / op_ms},
        {"case": case + " (public)", "baseline": "SDPA", "density": density,
         "baseline_ms": dense_ms * 1e3, "spion_ms": public_ms * 1e3, "speedup": dense_ms / public_ms},
    ]  # fmt: skip


def run(quick: bool = False, threads: int | None = None) -> list[dict]:
    """Rows of one benchmark run; quick uses shorter sequences and fewer reps.

    threads=1 gives steadier ratios on a shared, oversubscribed machine: with several threads
    every op can wait a scheduler slice for its second thread, which penalises the many
    small ops of a sparse kernel far more than one big dense call.
    """
    if threads:
        torch.set_num_threads(threads)
    reps = 3 if quick else 7
    length = 2048 if quick else 4096
    rows = [
        *bench_training(length, 0.10, causal=False, reps=reps),
        *bench_training(length, 0.10, causal=True, reps=reps),
        # HF models train with attention dropout (GPT-2, BERT: 0.1); SDPA then runs unfused on CPU
        *bench_training(length // 2, 0.10, causal=True, reps=reps, dropout_p=0.1),
    ]
    rows += bench_inference_vs_flex(1024 if quick else 2048, 0.10, reps=reps)
    return rows


def _print(rows: list[dict]) -> None:
    from common import machine_line, print_table

    print_table(
        f"block-sparse attention, fp32, B=1 H=8 D=64 block 64 — {machine_line()}",
        rows,
        ("case", "density", "baseline", "baseline_ms", "spion_ms", "speedup"),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter sequences, fewer reps")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads; 1 gives steadier ratios on a shared, oversubscribed machine",
    )  # fmt: skip
    args = parser.parse_args()
    _print(run(args.quick, args.threads))
