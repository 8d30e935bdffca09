"""The cost of going sparse on CPU: SPION's dense phase against the same model without spion_fx,
and the stall of the switch itself.

Two measurements on the demo model (4 layers, d 128, 2 heads, causal, AdamW, clipping):

* **dense phase vs eager**: the same model and batches trained by the same loop, (a) plain eager
  PyTorch, (b) ``torch.compile`` (inductor), (c) ``spion_fx.sparsify`` in its dense phase (no
  probe steps in the timed window). Steps interleaved (a, b, c, a, b, c, ...), medians of the
  steps after the compile steps.
* **switch stall**: a sparsified model whose switch is forced by ``max_dense_steps``. The stall
  is what the switch step and the first sparse step cost beyond steady steps of their phase:
  (switch step − steady dense) + (first sparse step − steady sparse). Nothing is re-compiled at
  the switch (attention runs between compiled parts), so what is left is the probe of the
  deciding step, the stability check, pattern generation and the first layout build;
  ``report()``'s ``switch_s`` sums those per site.

``python benchmarks/switch_time.py [--quick]``; ``run(quick)`` returns rows for run_cpu.py.
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
from spion_fx.demo import ByteTransformer, DemoConfig, build, train_step

COMPILE_STEPS = 2  # first steps of a compiled model: compile, allocator warm-up


def _plain(config: DemoConfig, compiled: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The demo's model and optimizer without spion_fx (same seed, so the same weights)."""
    torch.manual_seed(config.seed)
    model = ByteTransformer(config.seq_len, config.d_model, config.n_layers, config.n_heads, config.mlp_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))
    if compiled:
        model.compile()
    return model, optimizer


def dense_phase_vs_eager(config: DemoConfig, reps: int) -> dict[str, Any]:
    steps = COMPILE_STEPS + reps
    sparse_config = replace(config, probe_interval=10**6, min_dense_steps=0, max_dense_steps=10**6)
    models = {
        "eager": _plain(config, compiled=False),
        "torch.compile": _plain(config, compiled=True),
        "sparsify (dense phase)": build(sparse_config),
    }
    sampler = BatchSampler(load_corpus(config.data).train, config.batch_size, config.seq_len, config.seed)
    batches = [next(sampler) for _ in range(steps)]
    timed: dict[str, list[float]] = {name: [] for name in models}
    for step, batch in enumerate(batches):
        for name, (model, optimizer) in models.items():
            start = time.perf_counter()
            train_step(model, optimizer, batch, config.lr)
            if step >= COMPILE_STEPS:
                timed[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timed.items()}
    return {
        "benchmark": "dense phase vs eager",
        "seq_len": config.seq_len,
        "batch": config.batch_size,
        "eager_step_s": medians["eager"],
        "compile_step_s": medians["torch.compile"],
        "sparsify_dense_step_s": medians["sparsify (dense phase)"],
        "sparsify_dense_vs_eager": medians["sparsify (dense phase)"] / medians["eager"],
        "reps": reps,
    }


def switch_stall(config: DemoConfig, reps: int) -> dict[str, Any]:
    switch_at = COMPILE_STEPS + reps + 1  # the forced probe step that switches
    config = replace(config, probe_interval=10**6, min_dense_steps=0, max_dense_steps=switch_at)
    model, optimizer = build(config)
    sampler = BatchSampler(load_corpus(config.data).train, config.batch_size, config.seq_len, config.seed)
    seconds = []
    for _ in range(switch_at + 1 + reps):
        start = time.perf_counter()
        train_step(model, optimizer, next(sampler), config.lr)
        seconds.append(time.perf_counter() - start)
    dense = statistics.median(seconds[COMPILE_STEPS:switch_at - 1])
    sparse = statistics.median(seconds[switch_at + 1:])
    switch_step, first_sparse = seconds[switch_at - 1], seconds[switch_at]
    rows = [r for r in spion_fx.report(model, print_table=False) if r.get("kind") == "attention"]
    return {
        "benchmark": "switch stall (forced switch)",
        "seq_len": config.seq_len,
        "batch": config.batch_size,
        "steady_dense_s": dense,
        "steady_sparse_s": sparse,
        "switch_step_extra_s": switch_step - dense,
        "first_sparse_extra_s": first_sparse - sparse,
        "stall_s": (switch_step - dense) + (first_sparse - sparse),
        "report_switch_s": sum(r["switch_s"] or 0.0 for r in rows),
        "sites": len(rows),
        "reps": reps,
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    reps = 3 if quick else 5
    base = DemoConfig()
    return [
        dense_phase_vs_eager(replace(base, seq_len=2048, batch_size=2 if quick else 4), reps),
        switch_stall(replace(base, seq_len=2048 if quick else 4096, batch_size=2), reps),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(machine_line())
    print_table("dense phase vs eager, and the switch stall (medians, same run)", run(args.quick))


if __name__ == "__main__":
    main()
