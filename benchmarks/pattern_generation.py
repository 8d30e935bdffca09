"""CPU benchmark: SPION pattern generation, vectorised `generate_pattern` vs the original.

The original (`spion_fx.runtime.pattern_original`) is the authors' recipe: a 31 x 31 identity
conv2d, avg_pool2d, np.quantile and a recursive Python flood fill. Both run in one process on the
same attention-like float32 matrix; the table shows medians and their ratio (the machine is noisy,
so compare ratios, not times), and how many blocks of the two patterns differ (float32 input:
only cells whose pooled values agree to float32 rounding can differ; float64 input is exact).

    python benchmarks/pattern_generation.py [--quick]

``run(quick)`` returns the rows for ``benchmarks/run_cpu.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spion_fx.runtime.pattern import generate_pattern, pattern_density  # noqa: E402
from spion_fx.runtime.pattern_original import generate_pattern_original  # noqa: E402


def attention_like(length: int, seed: int = 0) -> torch.Tensor:
    """Row-softmax of a local band, a few global key columns, an off-diagonal stripe and noise."""
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(length, dtype=torch.float32)
    offset = i[:, None] - i[None, :]
    logits = -offset.abs() / 32.0 + 0.5 * torch.randn(length, length, generator=gen)
    logits[:, torch.randint(0, length, (8,), generator=gen)] += 3.0
    logits += 2.0 * ((offset - length // 4).abs() < 16)
    return torch.softmax(logits, dim=-1)


def _median_time(fn: Callable[[], object], reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(
    length: int, block: int, variant: str, quantile: float, reps: int, reps_original: int
) -> dict:
    attn = attention_like(length)
    generate_pattern(attn, block_size=block, variant=variant, quantile=quantile)  # warm-up
    ours_s, ours = _median_time(
        lambda: generate_pattern(attn, block_size=block, variant=variant, quantile=quantile), reps
    )
    filter_size = 31 if variant == "cf" else None
    orig_s, orig = _median_time(
        lambda: generate_pattern_original(attn, block, quantile, filter_size), reps_original
    )
    name = f"{variant.upper()} L={length} B={block} q={quantile}"
    row = {
        "name": name,
        "ours_ms": ours_s * 1e3,
        "original_ms": orig_s * 1e3,
        "ratio": orig_s / ours_s,
        "density": pattern_density(ours),
        # float32 sums in another order than conv2d/avg_pool2d: only near-tied cells may differ.
        "differing_blocks": int((ours != orig).sum()),
    }
    # The same numbers under the keys the other CPU benchmarks use, for run_cpu.py.
    row.update(case=name, baseline="original (conv2d + recursive walks)",
               baseline_ms=row["original_ms"], spion_ms=row["ours_ms"], speedup=row["ratio"])  # fmt: skip
    return row


def run(quick: bool = False) -> list[dict]:
    """Rows of one run; quick uses L=2048 and fewer reps (the original CF takes seconds)."""
    length = 2048 if quick else 4096
    reps, reps_original = (3, 1) if quick else (7, 3)
    return [
        bench(length, 64, "cf", 0.98, reps, reps_original),
        bench(length, 64, "f", 0.98, reps, reps_original),
    ]


def _print(rows: list[dict]) -> None:
    from common import machine_line, print_table

    print_table(f"pattern generation, fp32 input — {machine_line()}", rows, ("name", "density", "ours_ms", "original_ms", "ratio", "differing_blocks"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="L=2048, fewer reps")
    _print(run(parser.parse_args().quick))
