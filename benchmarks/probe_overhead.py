"""What SPION's stability probe costs during the dense phase, averaged over training.

A probe step runs a graph that also accumulates the batch- and head-averaged attention map of
every layer, and its optimizer hook compares that map with the previous check. Only one step in
``probe_interval`` probes, so the cost spread over training is

    overhead = (probe step − plain dense step) / probe_interval / plain dense step.

Target: ≤ 5 % at the paper's interval (200) and at the demo's. Measured on one model that probes
every other step and never switches, so plain and probe steps interleave under the same load.

``python benchmarks/probe_overhead.py [--quick]``; ``run(quick)`` returns rows for run_cpu.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

from common import machine_line, print_table  # benchmarks/ is on sys.path when run as a script

from spion_fx.data import BatchSampler, load_corpus
from spion_fx.demo import DemoConfig, build, train_step

PAPER_INTERVAL = 200
WARMUP_PAIRS = 2  # first plain and probe steps compile their variants


def plain_and_probe_times(config: DemoConfig, pairs: int) -> tuple[list[float], list[float]]:
    """Step times of plain dense steps and of probe steps, interleaved (odd steps probe)."""
    config = replace(config, probe_interval=2, min_dense_steps=10**9, max_dense_steps=None)
    model, optimizer = build(config)
    sampler = BatchSampler(load_corpus(config.data).train, config.batch_size, config.seq_len, config.seed)
    plain: list[float] = []
    probe: list[float] = []
    for step in range(2 * (WARMUP_PAIRS + pairs)):
        probing = any(site.probing for site in model.spion_state.attention_sites())
        start = time.perf_counter()
        train_step(model, optimizer, next(sampler), config.lr)
        seconds = time.perf_counter() - start
        if step >= 2 * WARMUP_PAIRS:
            (probe if probing else plain).append(seconds)
    if not probe or not plain:
        raise RuntimeError("probe_overhead: expected alternating plain and probe steps")
    return plain, probe


def run(quick: bool = False) -> list[dict[str, Any]]:
    base = DemoConfig()
    config = replace(base, seq_len=2048, batch_size=2) if quick else base
    plain, probe = plain_and_probe_times(config, pairs=3 if quick else 5)
    plain_s, probe_s = statistics.median(plain), statistics.median(probe)
    extra = probe_s - plain_s
    rows = []
    for interval in sorted({PAPER_INTERVAL, base.probe_interval}, reverse=True):
        rows.append({
            "benchmark": "probe_overhead (demo model, inductor)",
            "seq_len": config.seq_len,
            "batch": config.batch_size,
            "plain_step_s": plain_s,
            "probe_step_s": probe_s,
            "probe_interval": interval,
            "overhead_pct": 100.0 * extra / interval / plain_s,
            "target_pct": 5.0,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(machine_line())
    print_table("SPION probe cost averaged over the dense phase", run(args.quick))


if __name__ == "__main__":
    main()
