"""``python -m spion_fx.demo`` — SPION on a byte-level causal Transformer, end to end, on a CPU.

A small pre-LN Transformer learns to predict the bytes of the Python standard library's source.
``spion_fx.sparsify(model, "spion-cf", optimizer=opt)`` is the only line that differs from an
ordinary training loop: the model trains dense while SPION probes its attention maps, then every
layer switches to its own block-sparse pattern and training goes on, faster.

The model is narrow and the sequences long on purpose: a training step's speed-up is bounded by
the share of attention in it (DESIGN.md, "CPU kernel facts"), and at d_model 128, L 4096 attention
is most of the step. The dense-phase and sparse-phase step times are measured in this same run —
same model, same batch shape — so their ratio is the speed-up SPION gives, not a comparison of two
separately tuned programs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import spion_fx
from spion_fx.data import BatchSampler, fixed_batches, load_corpus

# ---- the model ------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN Transformer block; attention is a plain causal SDPA call (what SPION rewrites)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.ln1(x)).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """Vocabulary 256 (raw bytes), learned positions; ``forward(x, y)`` returns the mean loss."""

    def __init__(
        self, seq_len: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 2, mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.embed = nn.Embedding(256, d_model)
        self.position = nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.apply(_init_weights)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.ln_f(h))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ---- configuration --------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Everything a run depends on. The defaults are tuned for a 2-core CPU and ~5 minutes."""

    steps: int = 200
    seq_len: int = 4096
    batch_size: int = 2
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 2  # head dim 64: CPU SDPA is more efficient per FLOP than at 32
    mlp_ratio: int = 4
    lr: float = 2e-3
    warmup_steps: int = 10
    policy: str = "spion-cf"
    probe_interval: int = 10
    min_dense_steps: int = 30
    max_dense_steps: int | None = 40  # the switch is guaranteed here even if the maps never settle
    block_size: int = 64
    quantile: float = 0.98
    inner: str = "inductor"
    eval_every: int = 20
    eval_batches: int = 2
    device: str = "cpu"
    data: str | None = None
    seed: int = 0
    out: str = "spion_demo_out"
    # Steps left out of the medians: the first ones of each variant include its compile.
    skip_after_compile: int = 2

    def policy_overrides(self) -> dict[str, Any]:
        if self.policy == "dense" or not self.policy.startswith("spion"):
            return {"inner_compiler": self.inner}
        return {
            "probe_interval": self.probe_interval,
            # `--max-dense-steps 8` alone should just work: the minimum follows it down.
            "min_dense_steps": self.min_dense_steps if self.max_dense_steps is None
            else min(self.min_dense_steps, self.max_dense_steps),
            "max_dense_steps": self.max_dense_steps,
            "block_size": self.block_size,
            "quantile": self.quantile,
            "inner_compiler": self.inner,
        }


@dataclass
class StepRecord:
    step: int
    phase: str  # "dense" / "sparse" for the attention at the start of the step
    probe: bool
    seconds: float
    loss: float
    # Process CPU time of the step: on a shared machine it is far less inflated by other
    # processes than wall time, so it cross-checks the wall-time ratio.
    cpu_seconds: float = float("nan")


@dataclass
class DemoResult:
    config: DemoConfig
    records: list[StepRecord] = field(default_factory=list)
    validation: list[tuple[int, str, float]] = field(default_factory=list)  # (step, phase, loss)
    switches: list[dict[str, Any]] = field(default_factory=list)
    report_rows: list[dict[str, Any]] = field(default_factory=list)
    pattern_png: str | None = None
    interrupted: bool = False
    wall_seconds: float = 0.0

    def phase_times(self, attribute: str = "seconds") -> dict[str, list[float]]:
        return steady_step_times(self.records, self.config.skip_after_compile, attribute)

    def speedup(self, attribute: str = "seconds") -> float | None:
        """Median dense-phase step over median sparse-phase step (wall time by default)."""
        times = self.phase_times(attribute)
        if not times["dense"] or not times["sparse"]:
            return None
        return statistics.median(times["dense"]) / statistics.median(times["sparse"])

    def summary_dict(self) -> dict[str, Any]:
        times = self.phase_times()
        return {
            "config": asdict(self.config),
            "steps_done": len(self.records),
            "interrupted": self.interrupted,
            "wall_seconds": self.wall_seconds,
            "dense_step_median_s": statistics.median(times["dense"]) if times["dense"] else None,
            "sparse_step_median_s": statistics.median(times["sparse"]) if times["sparse"] else None,
            "dense_steps_counted": len(times["dense"]),
            "sparse_steps_counted": len(times["sparse"]),
            "speedup": self.speedup(),
            "cpu_time_speedup": self.speedup("cpu_seconds"),
            "validation": self.validation,
            "switches": self.switches,
            "pattern_png": self.pattern_png,
        }


def warm_up_steps(records: list[StepRecord], skip: int) -> list[bool]:
    """Per record, whether it is one of the first `skip` steps of its phase.

    Those include compiling the graph (and, after the switch, building the block layout and
    the kernel's first-call allocations), so they do not measure steady training.
    """
    seen = {"dense": 0, "sparse": 0}
    flags = []
    for record in records:
        seen[record.phase] += 1
        flags.append(seen[record.phase] <= skip)
    return flags


def steady_step_times(
    records: list[StepRecord], skip: int, attribute: str = "seconds"
) -> dict[str, list[float]]:
    """Per phase, the step times that measure steady training.

    Left out: each phase's first `skip` steps (see `warm_up_steps`) and probe steps (they run a
    different graph that also averages attention maps; benchmarks/probe_overhead.py measures them).
    """
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for record, warm_up in zip(records, warm_up_steps(records, skip)):
        if not (warm_up or record.probe):
            times[record.phase].append(getattr(record, attribute))
    return times


# ---- the training loop ----------------------------------------------------------------------


def build(config: DemoConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer, sparsified by the one spion_fx call this demo is about."""
    torch.manual_seed(config.seed)
    model = ByteTransformer(config.seq_len, config.d_model, config.n_layers, config.n_heads, config.mlp_ratio)
    model.to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))
    spion_fx.sparsify(model, config.policy, optimizer=optimizer, **config.policy_overrides())
    return model, optimizer


def learning_rate(config: DemoConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10 % — keeps the loss falling through the switch."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def attention_phase(model: nn.Module) -> str:
    sites = list(model.spion_state.attention_sites())
    if not sites:
        return "dense"
    return "sparse" if all(site.phase == "sparse" for site in sites) else "dense"


def is_probing(model: nn.Module) -> bool:
    return any(site.probing for site in model.spion_state.attention_sites())


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    model.eval()
    try:
        losses = [float(model(x.to(device), y.to(device))) for x, y in batches]
    finally:
        model.train()
    return sum(losses) / len(losses)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], lr: float
) -> float:
    """One ordinary training step; spion_fx counts it through the optimizer's step hook."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y = batch
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _progress(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    )


def _announce_switches(model: nn.Module, result: DemoResult, console: Any) -> None:
    """Print each layer's switch once, with its causal density from the state's report."""
    events = [e for e in model.spion_state.events if e.get("event") == "switch"]
    if len(events) == len(result.switches):
        return
    densities = {row["site"]: row["density"] for row in spion_fx.report(model, print_table=False)
                 if row.get("kind") == "attention"}
    for event in events[len(result.switches):]:
        density = densities.get(event["site"], event["density"])
        why = "max_dense_steps reached" if event.get("forced") else "attention maps stable"
        console.print(
            f"[bold green]switch[/] {event['site']}: dense → sparse at step {event['step']} "
            f"({why}), {density:.1%} of causal blocks kept"
        )
        result.switches.append({**event, "causal_density": density})


def run(
    config: DemoConfig,
    *,
    console: Any = None,
    step_hook: Callable[[int], None] | None = None,
) -> DemoResult:
    """Train, then print the summary. Ctrl-C ends training early and still prints it.

    `step_hook(step)` runs inside the loop after each step (tests use it to raise
    KeyboardInterrupt as a real Ctrl-C would).
    """
    from rich.console import Console

    console = console or Console()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(config.data)
    console.print(f"[bold]spion_fx demo[/] — {corpus.describe()}")
    model, optimizer = build(config)
    console.print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, d_model "
        f"{config.d_model}, {config.n_layers} layers × {config.n_heads} heads, L={config.seq_len}, "
        f"batch {config.batch_size}; policy: {model.spion_state.policy.describe()}, inner compiler "
        f"{config.inner}"
    )
    sampler = BatchSampler(corpus.train, config.batch_size, config.seq_len, seed=config.seed)
    val_batches = fixed_batches(corpus.validation, config.eval_batches, config.batch_size, config.seq_len)
    result = DemoResult(config)
    start = time.perf_counter()
    try:
        _train(model, optimizer, sampler, val_batches, config, result, console, step_hook)
    except KeyboardInterrupt:
        result.interrupted = True
        console.print("[yellow]interrupted — summarising the steps done so far[/]")
    result.wall_seconds = time.perf_counter() - start
    _finish(model, result, out, console)
    return result


def _train(model, optimizer, sampler, val_batches, config, result, console, step_hook) -> None:
    def evaluate(step: int) -> None:
        loss = validation_loss(model, val_batches, config.device)
        phase = attention_phase(model)
        result.validation.append((step, phase, loss))
        console.print(f"step {step:4d}  validation loss {loss:.4f}  ({phase} attention)")

    tokens = config.batch_size * config.seq_len
    with _progress(console) as progress:
        task = progress.add_task("train", total=config.steps, info="compiling the dense graph…")
        evaluate(0)
        for step in range(config.steps):
            phase, probe = attention_phase(model), is_probing(model)
            x, y = next(sampler)
            batch = (x.to(config.device), y.to(config.device))
            _sync(config.device)
            began, began_cpu = time.perf_counter(), time.process_time()
            loss = train_step(model, optimizer, batch, learning_rate(config, step))
            _sync(config.device)
            seconds = time.perf_counter() - began
            cpu = time.process_time() - began_cpu
            result.records.append(StepRecord(step, phase, probe, seconds, loss, cpu))
            _announce_switches(model, result, progress.console)
            info = f"loss {loss:.3f}  {tokens / seconds:,.0f} tok/s  {phase}{' (probe)' if probe else ''}"
            progress.update(task, advance=1, info=info)
            if not progress.console.is_terminal and (step % 10 == 0 or step + 1 == config.steps):
                # Without a terminal the bar only renders at the end: log a line now and then.
                progress.console.print(f"step {step + 1:4d}/{config.steps}  {info}  ({seconds:.2f} s)")
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                evaluate(step + 1)
            if step_hook is not None:
                step_hook(step)


def _finish(model: nn.Module, result: DemoResult, out: Path, console: Any) -> None:
    result.report_rows = spion_fx.report(model, print_table=False)
    console.print(_sites_table(result.report_rows))
    if any(site.pattern.numel() for site in model.spion_state.attention_sites()):
        result.pattern_png = spion_fx.save_patterns(model, str(out / "patterns.png"))
    console.print(_step_time_table(result))
    speedup = result.speedup()
    cpu_speedup = result.speedup("cpu_seconds")
    console.print(
        "sparse-phase speed-up of a whole training step: "
        + (f"[bold]{speedup:.2f}×[/] wall time" if speedup else "n/a (a phase has no steady steps)")
        + (f", {cpu_speedup:.2f}× process CPU time" if cpu_speedup and cpu_speedup == cpu_speedup else "")
        + " (probe steps and each phase's first steps, which compile, excluded)"
    )
    if result.validation:
        console.print("validation loss: " + ", ".join(f"{s}:{loss:.3f} ({p})" for s, p, loss in result.validation))
    console.print(f"patterns: {result.pattern_png or 'none (no layer switched)'}")
    summary = out / "summary.json"
    summary.write_text(json.dumps(result.summary_dict(), indent=2, default=str))
    console.print(f"summary: {summary}  wall time {result.wall_seconds:.0f} s")


def _sites_table(rows: list[dict[str, Any]]) -> Any:
    """spion_fx.report's rows, printed on the demo's console."""
    from rich.table import Table

    table = Table(title="attention layers (spion_fx.report)")
    columns = ("site", "phase", "switch step", "switch s", "causal density", "mass kept", "attention FLOPs saved", "note")
    for column in columns:
        table.add_column(column)
    for row in rows:
        if row.get("kind") != "attention":
            continue
        switch_s, mass = row.get("switch_s"), row.get("mass_kept")
        table.add_row(
            row["site"], row["phase"], "" if row["switch_step"] is None else str(row["switch_step"]),
            "" if switch_s is None else f"{switch_s:.2f}",
            f"{row['density']:.1%}", "" if mass is None else f"{mass:.1%}",
            f"{row['attention_flops_saved']:.1%}", row.get("note", ""),
        )
    return table


def _step_time_table(result: DemoResult) -> Any:
    from rich.table import Table

    table = Table(title="training step time, dense vs sparse phase of this run (medians)")
    for column in ("phase", "steps counted", "median step", "tokens/s", "CPU time / step"):
        table.add_column(column)
    tokens = result.config.batch_size * result.config.seq_len
    cpu = result.phase_times("cpu_seconds")
    for phase, times in result.phase_times().items():
        if not times:
            table.add_row(phase, "0", "—", "—", "—")
            continue
        median = statistics.median(times)
        table.add_row(phase, str(len(times)), f"{median:.3f} s", f"{tokens / median:,.0f}",
                      f"{statistics.median(cpu[phase]):.3f} s")
    return table


# ---- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="python -m spion_fx.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--d-model", type=int, default=defaults.d_model)
    parser.add_argument("--layers", type=int, default=defaults.n_layers)
    parser.add_argument("--heads", type=int, default=defaults.n_heads)
    parser.add_argument("--policy", default=defaults.policy, help="a spion_fx preset, e.g. spion-cf, spion-f, dense")
    parser.add_argument("--probe-interval", type=int, default=defaults.probe_interval)
    parser.add_argument("--min-dense-steps", type=int, default=defaults.min_dense_steps)
    parser.add_argument("--max-dense-steps", type=int, default=defaults.max_dense_steps)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--quantile", type=float, default=defaults.quantile)
    parser.add_argument("--inner", default=defaults.inner, choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--data", default=None, help="a local text file or folder (default: Python stdlib source)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=defaults.out, help="folder for patterns.png and summary.json")
    args = parser.parse_args(argv)
    return DemoConfig(
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, d_model=args.d_model,
        n_layers=args.layers, n_heads=args.heads, policy=args.policy, probe_interval=args.probe_interval,
        min_dense_steps=args.min_dense_steps, max_dense_steps=args.max_dense_steps,
        block_size=args.block_size, quantile=args.quantile, inner=args.inner,
        eval_every=args.eval_every, device=args.device, data=args.data, seed=args.seed, out=args.out,
    )


def main(argv: list[str] | None = None) -> DemoResult:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
