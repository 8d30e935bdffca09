"""CPU benchmark: block-sparse decode attention (one new token over a KV cache) vs dense SDPA decode.

One new token (Lq=1, B=1, H=8, D=64, fp32) attends to a cache of Lk tokens. Ours:
``block_sparse_decode_attention`` with a ``DecodeLayout`` built once per block count (its build
time is the ``layout_ms`` column, paid once per 64 generated tokens, not per token); dense:
``F.scaled_dot_product_attention`` on the whole cache. Calls are interleaved and timed in the
same run (medians of wall time, and of the calling thread's CPU time: ``*_cpu_*`` columns, only
meaningful with one thread). The pattern is SPION-like, causal and shared by the heads: a diagonal band
plus a few vertical stripes (block 0 among them, an attention sink), sized so that the new
token's block row keeps ``row_density`` of the cache's blocks (what decode reads);
``causal_density`` is the whole pattern's density over the causal triangle. ``max_abs_err``:
ours vs dense SDPA with the equivalent boolean mask. The per-head row gives every head its own
stripes.

Threads: the table runs on one torch thread (restored afterwards), like long_range.py: on this
shared 2-core machine every parallel region of a 2-thread run waits for a descheduled peer
(measured ~8-15 ms per op at load 5-7, for dense SDPA's one region and for each of our three
alike), which measures the scheduler, not the kernels. The last row repeats 8192 / 10 % with the
process's default thread count, whatever the load makes of it.

``python benchmarks/decode_attention.py [--quick] [--write]``; ``--write`` re-measures through
``run_cpu.py --only decode_attention`` (its subsection of the CPU section of BENCHMARKS.md);
``run(quick)`` returns the rows for ``benchmarks/run_cpu.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import benchmark_main  # noqa: E402

from spion_fx.kernels import DecodeLayout, block_sparse_decode_attention  # noqa: E402

B, H, D, BLOCK = 1, 8, 64, 64


def band_and_stripes(n_blocks: int, density: float, heads: int = 1, seed: int = 0) -> torch.Tensor:
    """Causal bool pattern [heads, nB, nB]: a diagonal band of w blocks plus c vertical stripes
    (block 0 always one), w + c = round(density * nB), so the last row keeps density of them."""
    gen = torch.Generator().manual_seed(seed)
    kept = max(2, round(density * n_blocks))
    width = max(1, kept // 2)
    i = torch.arange(n_blocks)
    offset = i[:, None] - i[None, :]
    band = (offset >= 0) & (offset < width)
    causal = offset >= 0
    out = torch.empty(heads, n_blocks, n_blocks, dtype=torch.bool)
    for h in range(heads):
        others = torch.randperm(n_blocks - width - 1, generator=gen)[: kept - width - 1] + 1
        stripes = torch.zeros(n_blocks, dtype=torch.bool)
        stripes[0] = True
        stripes[others] = True
        out[h] = band | (stripes[None, :] & causal)
    return out


def interleaved_wall_and_cpu(fns, reps: int, warmup: int = 3) -> list[tuple[float, float]]:
    """(median wall s, median thread CPU s) per function, calls interleaved. The thread's CPU
    time leaves out the time it sat descheduled, which on this shared machine is most of the
    noise (one thread per call here, so it is the whole cost)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, w, c in zip(fns, wall, cpu):
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            c.append(time.thread_time() - start_cpu)
            w.append(time.perf_counter() - start)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def causal_density(pattern: torch.Tensor) -> float:
    nb = pattern.shape[-1]
    return float(pattern.sum()) / (pattern.shape[0] * nb * (nb + 1) / 2)


def bench(lk: int, density: float, reps: int, per_head: bool = False) -> dict:
    """One row: ours vs dense SDPA decode at cache lk (on the current torch thread count)."""
    gen = torch.Generator().manual_seed(lk)
    q = torch.randn(B, H, 1, D, generator=gen)
    k = torch.randn(B, H, lk, D, generator=gen)
    v = torch.randn(B, H, lk, D, generator=gen)
    n_blocks = -(-lk // BLOCK)
    pattern = band_and_stripes(n_blocks, density, H if per_head else 1, seed=lk)
    start = time.perf_counter()
    layout = DecodeLayout.from_pattern(pattern, BLOCK, lk)
    layout_ms = (time.perf_counter() - start) * 1e3

    def ours() -> torch.Tensor:
        return block_sparse_decode_attention(q, k, v, layout, causal=True)

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad():
        keep = pattern[:, -1, :].repeat_interleave(BLOCK, -1)[:, :lk]  # last row, per token
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, :, None, :])
        err = float((ours() - masked).abs().max())
        (t_ours, c_ours), (t_dense, c_dense) = interleaved_wall_and_cpu([ours, dense], reps)
    return {
        "cache_len": lk,
        "threads": torch.get_num_threads(),
        "pattern": "per-head" if per_head else "shared",
        "row_density": float(pattern[:, -1].float().mean()),
        "causal_density": causal_density(pattern),
        "ours_us": t_ours * 1e6,
        "dense_sdpa_us": t_dense * 1e6,
        "speedup": t_dense / t_ours,
        "ours_cpu_us": c_ours * 1e6,
        "dense_cpu_us": c_dense * 1e6,
        "speedup_cpu": c_dense / c_ours,
        "layout_ms": layout_ms,
        "max_abs_err": err,
        "reps": reps,
    }


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    reps = 40 if quick else 200
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [bench(lk, density, reps) for lk in (2048, 4096, 8192) for density in (0.05, 0.10, 0.25)]
        rows.append(bench(8192, 0.10, reps, per_head=True))
    finally:
        torch.set_num_threads(default)
    if default != threads:
        rows.append(bench(8192, 0.10, reps))
    return rows


def main() -> None:
    benchmark_main("decode_attention", __doc__, "decode attention, Lq=1 B=1 H=8 D=64 fp32, block 64 (medians, interleaved)", run, threads=1)


if __name__ == "__main__":
    main()
