"""GPU benchmark: SPION block-sparse attention (Triton) vs FlexAttention vs dense flash SDPA.

    python benchmarks/attention_gpu.py [--write BENCHMARKS.md] [--quick] [--causal]

B=1, H=16, bf16, D in {64, 128}, L in {2048, 4096, 8192, 16384}, SPION-like block patterns
(diagonal band + random blocks) at ~5 / 10 / 25 % block density. Times are medians of
triton.testing.do_bench; every ratio in the table is measured in the same run on the same GPU.
FlexAttention gets the same pattern as a BlockMask (interior blocks marked full, so it skips its
mask_mod there) and is torch.compile'd; dense is SDPA restricted to the flash backend.

The full grid, by hand. ``benchmarks/gpu_suite.py`` (``make bench-gpu``) measures a trimmed grid
within a time budget together with the end-to-end rows, and writes BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def spion_like_grid(nb: int, density: float, seed: int) -> torch.Tensor:
    """Diagonal band plus random blocks, ~density of the nb x nb grid (at least the diagonal)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.zeros(nb, nb, dtype=torch.bool)
    idx = torch.arange(nb)
    grid[idx, idx] = True
    per_row = max(1, round(density * nb))
    if per_row >= 3:  # SPION's flood fill keeps the neighbourhood of the diagonal
        grid[idx[1:], idx[:-1]] = True
        grid[idx[:-1], idx[1:]] = True
    for r in range(nb):
        missing = per_row - int(grid[r].sum())
        if missing > 0:
            free = (~grid[r]).nonzero().flatten()
            pick = free[torch.randperm(free.numel(), generator=g)[:missing]]
            grid[r, pick] = True
    return grid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="append the markdown table to PATH")
    parser.add_argument("--block", type=int, default=128, choices=(64, 128))
    parser.add_argument("--causal", action="store_true", help="causal masks (decoder attention)")
    parser.add_argument("--quick", action="store_true", help="L in {2048, 8192}, D=64 only")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("attention_gpu.py needs a CUDA GPU; none is available here, so nothing was measured. "
              "Correctness of the kernels is covered on CPU by tests/test_triton_attention.py "
              "(TRITON_INTERPRET=1).")
        return 0

    import torch.nn.functional as F
    import triton
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from spion_fx.kernels.attention.blockmask import layout_to_block_mask
    from spion_fx.kernels.attention.layout import BlockLayout
    from spion_fx.kernels.attention.triton_attention import (
        triton_block_sparse_bwd,
        triton_block_sparse_fwd,
    )

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    flex = torch.compile(flex_attention, dynamic=False)
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    b, h, bs = 1, 16, args.block
    head_dims = (64,) if args.quick else (64, 128)
    lengths = (2048, 8192) if args.quick else (2048, 4096, 8192, 16384)
    densities = (0.05, 0.10, 0.25)
    causal = args.causal
    gpu = torch.cuda.get_device_name()

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def time_dense(q, k, v, g) -> tuple[float, float]:
        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            fwd().backward(g)

        return bench(fwd), bench(fwd_bwd)

    def time_sparse(q, k, v, g, op_args, bm, scale) -> dict[str, float]:
        qd, kd, vd = q.detach(), k.detach(), v.detach()

        def ours_fwd():
            return triton_block_sparse_fwd(qd, kd, vd, *op_args)

        def ours_fb():
            out, lse = triton_block_sparse_fwd(qd, kd, vd, *op_args)
            return triton_block_sparse_bwd(g, qd, kd, vd, out, lse, *op_args)

        def flex_fwd():
            return flex(qd, kd, vd, block_mask=bm, scale=scale)

        def flex_fb():
            q.grad = k.grad = v.grad = None
            flex(q, k, v, block_mask=bm, scale=scale).backward(g)

        # Cross-check before timing: a fast wrong kernel is worth nothing.
        diff = (ours_fwd()[0].float() - flex_fwd().float()).abs().max().item()
        if diff > 5e-2:
            print(f"WARNING: ours vs flex max |diff| = {diff:.3g}")
        return {"ours_f": bench(ours_fwd), "ours_fb": bench(ours_fb),
                "flex_f": bench(flex_fwd), "flex_fb": bench(flex_fb)}

    rows = []
    t_start = time.time()
    for d in head_dims:
        scale = 1.0 / math.sqrt(d)
        for length in lengths:
            q, k, v = (torch.randn(b, h, length, d, device=dev, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            g = torch.randn_like(q)
            seed = torch.zeros((), dtype=torch.int64, device=dev)
            t_dense_f, t_dense_fb = time_dense(q, k, v, g)
            nb = triton.cdiv(length, bs)
            for density in densities:
                grid = spion_like_grid(nb, density, seed=length + int(density * 100))
                lay = BlockLayout.from_dense(grid, bs).to(dev)
                op_args = (lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, bs,
                           scale, causal, None, 0.0, seed, False)
                bm = layout_to_block_mask(lay, b, h, length, length, causal=causal,
                                          pattern_in_mask_mod=False)
                t = time_sparse(q, k, v, g, op_args, bm, scale)
                real_density = float(grid.float().mean())
                rows.append((d, length, density, real_density, t, t_dense_f, t_dense_fb))
                print(f"D={d} L={length} density={real_density:.3f}: ours {t['ours_f']:.3f}/"
                      f"{t['ours_fb']:.3f} ms, flex {t['flex_f']:.3f}/{t['flex_fb']:.3f} ms, dense "
                      f"{t_dense_f:.3f}/{t_dense_fb:.3f} ms  [{time.time() - t_start:.0f}s]",
                      flush=True)
            torch.cuda.empty_cache()

    mode = "causal" if causal else "non-causal"
    lines = [
        f"### Block-sparse attention on {gpu} (B={b}, H={h}, bf16, block {bs}, {mode})",
        "",
        "Times in ms (median). `x flex` / `x dense` = speed-up of ours over FlexAttention "
        "(torch.compile) / dense flash SDPA; > 1 means ours is faster.",
        "",
        "| D | L | density | ours fwd | flex fwd | dense fwd | x flex | x dense "
        "| ours f+b | flex f+b | dense f+b | x flex | x dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, length, _, real, t, tdf, tdfb in rows:
        lines.append(
            f"| {d} | {length} | {real:.1%} | {t['ours_f']:.3f} | {t['flex_f']:.3f} | {tdf:.3f} "
            f"| {t['flex_f'] / t['ours_f']:.2f} | {tdf / t['ours_f']:.2f} | {t['ours_fb']:.3f} "
            f"| {t['flex_fb']:.3f} | {tdfb:.3f} | {t['flex_fb'] / t['ours_fb']:.2f} "
            f"| {tdfb / t['ours_fb']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as f:
            f.write("\n" + table)
        print(f"appended to {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
