"""Does SPION keep the model's quality? Same model, data, seed and step budget for every policy.

Each policy trains the demo's byte-level Transformer from the same initial weights on the same
batches for the same number of steps; the final validation loss (fixed held-out windows of the
stdlib corpus, by file) and the training time are compared with dense training. Target: SPION's
validation loss within 2 % of dense while its training time is lower.

Training time is reported twice: wall time of the whole loop (includes every compile, which a
short benchmark cannot amortise), and the sum of steady step times (each compiled variant's first
steps replaced by that phase's median), which is what a long run converges to.

``python benchmarks/quality.py [--quick] [--inner inductor]``; ``run(quick)`` returns rows.
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
from spion_fx.data import BatchSampler, fixed_batches, load_corpus
from spion_fx.demo import (
    DemoConfig,
    StepRecord,
    attention_phase,
    build,
    is_probing,
    learning_rate,
    steady_step_times,
    train_step,
    validation_loss,
    warm_up_steps,
)

POLICIES = ("dense", "spion-cf", "spion-c", "spion-f")


def quality_config(quick: bool, inner: str) -> DemoConfig:
    """L=2048 keeps four full trainings within ~10 minutes on a 2-core CPU."""
    if quick:
        return DemoConfig(
            steps=24, seq_len=1024, batch_size=2, probe_interval=4, min_dense_steps=0,
            max_dense_steps=8, warmup_steps=4, inner=inner, eval_batches=4,
        )
    return DemoConfig(
        steps=100, seq_len=2048, batch_size=2, probe_interval=10, min_dense_steps=30,
        max_dense_steps=40, inner=inner, eval_batches=8,
    )


def steady_total(records: list[StepRecord], skip: int, attribute: str = "seconds") -> float:
    """Sum of step times with each phase's compile/warm-up steps replaced by its median."""
    steady = steady_step_times(records, skip, attribute)
    medians = {phase: statistics.median(t) for phase, t in steady.items() if t}
    total = 0.0
    for record, warm_up in zip(records, warm_up_steps(records, skip)):
        replace_it = warm_up and not record.probe and record.phase in medians
        total += medians[record.phase] if replace_it else getattr(record, attribute)
    return total


def train_policy(config: DemoConfig, policy: str) -> dict[str, Any]:
    config = replace(config, policy=policy)
    corpus = load_corpus(config.data)
    model, optimizer = build(config)
    sampler = BatchSampler(corpus.train, config.batch_size, config.seq_len, seed=config.seed)
    val = fixed_batches(corpus.validation, config.eval_batches, config.batch_size, config.seq_len)
    records: list[StepRecord] = []
    start = time.perf_counter()
    for step in range(config.steps):
        phase, probe = attention_phase(model), is_probing(model)
        began, began_cpu = time.perf_counter(), time.process_time()
        loss = train_step(model, optimizer, next(sampler), learning_rate(config, step))
        seconds, cpu = time.perf_counter() - began, time.process_time() - began_cpu
        records.append(StepRecord(step, phase, probe, seconds, loss, cpu))
    wall = time.perf_counter() - start
    val_loss = validation_loss(model, val, config.device)
    switches = [e for e in model.spion_state.events if e.get("event") == "switch"]
    rows = [r for r in spion_fx.report(model, print_table=False) if r.get("kind") == "attention"]
    sparse_rows = [r for r in rows if r["phase"] == "sparse"]
    return {
        "policy": policy,
        "steps": config.steps,
        "seq_len": config.seq_len,
        "val_loss": val_loss,
        "train_wall_s": wall,
        "train_steady_s": steady_total(records, config.skip_after_compile),
        "train_steady_cpu_s": steady_total(records, config.skip_after_compile, "cpu_seconds"),
        "switch_step": switches[0]["step"] if switches else None,
        "causal_density": statistics.mean(r["density"] for r in sparse_rows) if sparse_rows else 1.0,
    }


def run(quick: bool = False, inner: str = "aot_eager") -> list[dict[str, Any]]:
    config = quality_config(quick, inner)
    rows = [train_policy(config, policy) for policy in POLICIES]
    dense = rows[0]
    for row in rows:
        row["val_loss_vs_dense_pct"] = 100.0 * (row["val_loss"] / dense["val_loss"] - 1.0)
        row["wall_vs_dense"] = row["train_wall_s"] / dense["train_wall_s"]
        row["steady_vs_dense"] = row["train_steady_s"] / dense["train_steady_s"]
        row["steady_cpu_vs_dense"] = row["train_steady_cpu_s"] / dense["train_steady_cpu_s"]
        row["inner"] = inner
        row["benchmark"] = "quality"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(machine_line())
    columns = ("policy", "steps", "seq_len", "switch_step", "causal_density", "val_loss",
               "val_loss_vs_dense_pct", "train_wall_s", "wall_vs_dense", "train_steady_s", "steady_vs_dense",
               "steady_cpu_vs_dense")
    print_table("quality: same model, data, seed and steps", run(args.quick, args.inner), columns)


if __name__ == "__main__":
    main()
