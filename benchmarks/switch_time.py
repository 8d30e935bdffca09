"""The cost of going sparse on CPU: the dense phase vs the model without spion_fx, and the switch.

Two measurements on the demo model (4 layers, d 128, 2 heads, causal, AdamW, clipping):

* **dense phase vs eager**: the same model and batches trained by the same loop, (a) plain eager
  PyTorch, (b) ``torch.compile`` (inductor), (c) ``spion_fx.sparsify`` in its dense phase (no
  probe steps in the timed window); the demo model, and HF GPT-2 with its attention dropout. Steps interleaved (a, b, c, a, b, c, ...), medians of the
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


def _demo_model(config: DemoConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The demo's model and optimizer without spion_fx (same seed, so the same weights)."""
    torch.manual_seed(config.seed)
    model = ByteTransformer(config.seq_len, config.d_model, config.n_layers, config.n_heads, config.mlp_ratio)
    return model, torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))


def _gpt2(seq_len: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """HF GPT-2 (sdpa attention, its default attention dropout 0.1), 4 layers, d 256."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=seq_len, n_embd=256, n_layer=4, n_head=4)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _hf_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, lr: float) -> float:
    x, _ = batch
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def dense_phase_vs_eager(name: str, config: DemoConfig, reps: int) -> dict[str, Any]:
    """eager / torch.compile / sparsify's dense phase of one model, steps interleaved."""
    factory = (lambda: _gpt2(config.seq_len)) if name == "gpt2" else (lambda: _demo_model(config))
    step_fn = _hf_step if name == "gpt2" else train_step
    models = {"eager": factory(), "torch.compile": factory(), "sparsify (dense phase)": factory()}
    models["torch.compile"][0].compile()
    spion_fx.sparsify(models["sparsify (dense phase)"][0], "spion-cf", optimizer=models["sparsify (dense phase)"][1],
                      probe_interval=10**6, block_size=config.block_size)
    sampler = BatchSampler(load_corpus(config.data).train, config.batch_size, config.seq_len, config.seed)
    batches = [next(sampler) for _ in range(COMPILE_STEPS + reps)]
    timed: dict[str, list[float]] = {key: [] for key in models}
    for step, batch in enumerate(batches):
        for key, (model, optimizer) in models.items():
            start = time.perf_counter()
            step_fn(model, optimizer, batch, config.lr)
            if step >= COMPILE_STEPS:
                timed[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(values) for key, values in timed.items()}
    return {
        "benchmark": f"dense phase vs eager ({'HF GPT-2 4x256, dropout 0.1' if name == 'gpt2' else 'demo model'})",
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
        dense_phase_vs_eager("demo", replace(base, seq_len=2048, batch_size=2 if quick else 4), reps),
        dense_phase_vs_eager("gpt2", replace(base, seq_len=1024, batch_size=2), reps),
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
