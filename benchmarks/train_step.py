"""End-to-end training step time of the demo model: dense phase vs SPION's sparse phase.

One model per sequence length, trained by an ordinary loop under ``spion_fx.sparsify``: its dense
steps are timed first (no probing: the probe interval is set beyond the timed window), then the
switch is forced at ``max_dense_steps`` (a real probe → pattern → re-lowering), then its sparse steps
are timed. Same model, same batch shape, same compiled code except the attention: the ratio is what
SPION buys for a whole step (forward, backward, clipping, AdamW).

``python benchmarks/train_step.py [--quick]``; ``run(quick)`` returns rows for run_cpu.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from common import machine_line, print_table  # benchmarks/ is on sys.path when run as a script

import spion_fx
from spion_fx.data import BatchSampler, load_corpus
from spion_fx.demo import DemoConfig, build, train_step

WARMUP = 2  # first steps of each variant: compile, layout building, allocator warm-up


def phase_step_times(config: DemoConfig, reps: int) -> dict[str, Any]:
    """Median dense-phase and sparse-phase step times of one model, measured back to back."""
    dense_steps = WARMUP + reps + 1  # the last one is the forced probe step that switches
    config = replace(config, probe_interval=10**6, min_dense_steps=0, max_dense_steps=dense_steps)
    model, optimizer = build(config)
    sampler = BatchSampler(load_corpus(config.data).train, config.batch_size, config.seq_len, config.seed)
    timed: dict[str, list[float]] = {"dense": [], "sparse": []}
    cpu: dict[str, list[float]] = {"dense": [], "sparse": []}
    total = dense_steps + WARMUP + reps
    for step in range(total):
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(model, optimizer, next(sampler), config.lr)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        phase = "dense" if WARMUP <= step < dense_steps - 1 else "sparse" if step >= dense_steps + WARMUP else None
        if phase is not None:
            timed[phase].append(seconds)
            cpu[phase].append(cpu_seconds)
    densities = [e["density"] for e in model.spion_state.events if e.get("event") == "switch"]
    rows = [r for r in spion_fx.report(model, print_table=False) if r.get("kind") == "attention"]
    dense = statistics.median(timed["dense"])
    sparse = statistics.median(timed["sparse"])
    return {
        "seq_len": config.seq_len,
        "batch": config.batch_size,
        "d_model": config.d_model,
        "layers": config.n_layers,
        "causal_density": statistics.mean(r["density"] for r in rows) if rows else float("nan"),
        "grid_density": statistics.mean(densities) if densities else float("nan"),
        "dense_step_s": dense,
        "sparse_step_s": sparse,
        "speedup": dense / sparse,
        # Process CPU time is much less inflated by other processes on a shared machine.
        "cpu_time_speedup": statistics.median(cpu["dense"]) / statistics.median(cpu["sparse"]),
        "reps": reps,
    }


def configs(quick: bool) -> list[DemoConfig]:
    """The demo model at L=2048 and 4096 with the same tokens per step (8192)."""
    base = DemoConfig()
    if quick:
        return [replace(base, seq_len=2048, batch_size=2)]
    return [replace(base, seq_len=2048, batch_size=4), replace(base, seq_len=4096, batch_size=2)]


def run(quick: bool = False) -> list[dict[str, Any]]:
    reps = 3 if quick else 5
    rows = []
    for config in configs(quick):
        row = phase_step_times(config, reps)
        rows.append({"benchmark": "train_step (demo model, inductor)", **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(machine_line())
    print_table("training step: dense phase vs SPION sparse phase (medians, same run)", run(args.quick))


if __name__ == "__main__":
    main()
