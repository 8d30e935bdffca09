"""Long-range quality: which sparse-attention policies keep a task that needs far-away keys?

**Task: associative recall at L = 2048** (`recall_batch`). Bytes, vocabulary 256. The first
`context` positions hold key→value pairs, one byte each (``128 + 16·key + value``; a share
`pair_share` of the context positions, the rest filler byte 0); every key has one value per
sequence, drawn at random, and appears many times. Every later position is a query byte
(``16 + key``) whose target is that key's value; the loss and the score are on queries only. The
answer to a query at position p lies at least p − context + 1 positions back, so a query past
the first block after the context cannot be answered from its own or the previous block: the
pattern must keep long-range blocks, and which ones varies from sequence to sequence.

**Model** (`RecallTransformer`): the demo's pre-LN block (causal SDPA, which spion_fx rewrites),
byte embedding, no position embedding (causal attention needs none for this task).

**Protocol.** Every policy trains from the same initial weights on the same batches for the same
steps; the SPION variants probe every `probe_interval` steps and all switch at `switch_step`
(`min_dense_steps` = `max_dense_steps`: equal dense and sparse steps for all); MST's Hybrid
Sparse Attention (local+strided, 128/128) runs from `switch_step` on — MST's HSA is a
training-time window, so that model is evaluated with dense attention. Scored: query accuracy on held-out sequences (a generator of their own).
Per policy also: causal block density, the mass kept on the probe map the pattern was built from
(what `report()` shows), and — measured right after the switch on held-out sequences, with the
weights of that moment — the mass the pattern keeps of the model's own softmax maps and the
density of the best possible pattern keeping that much (`fewest_blocks_for_mass`). Step times:
after training, one training forward + backward of every trained model, the models' calls
interleaved (load from other processes hits them alike), medians; and, as a cross-check, each
run's dense-phase over sparse-phase median process CPU time per step during training.

``python benchmarks/long_range.py [--quick] [--write]``; ``run(quick)`` returns the rows;
``--write`` puts the table into BENCHMARKS.md between its own markers.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (  # benchmarks/ is on sys.path
    ROOT,
    interleaved_medians,
    machine_line,
    markdown_table,
    print_table,
    rewrite_section,
)
from torch import nn

import spion_fx
from spion_fx.demo import Block, StepRecord, steady_step_times
from spion_fx.runtime.coverage import fewest_blocks_for_mass, mass_kept
from spion_fx.runtime.pattern import pattern_density

BEGIN, END = "<!-- long_range:begin -->", "<!-- long_range:end -->"


@dataclass(frozen=True)
class RecallConfig:
    seq_len: int = 2048
    context: int = 512
    keys: int = 2  # 4 keys were not learned by dense in 600 steps; 2 are (≈100 % accuracy)
    values: int = 8
    pair_share: float = 0.25
    batch_size: int = 2
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 2
    steps: int = 600
    switch_step: int = 400
    probe_interval: int = 50
    lr: float = 3e-3
    warmup_steps: int = 10
    block_size: int = 64
    eval_batches: int = 8
    heldout_map_batches: int = 2
    inner: str = "aot_eager"
    seed: int = 0
    skip_after_compile: int = 2


def quick_config() -> RecallConfig:
    return RecallConfig(seq_len=512, context=128, steps=24, switch_step=12, probe_interval=4, eval_batches=2,
                        heldout_map_batches=1)


# ---- task and model ---------------------------------------------------------------------------


def recall_batch(config: RecallConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes [B, L], targets [B, L]) — targets are -100 except at query positions."""
    b, length, ctx = config.batch_size, config.seq_len, config.context
    x = torch.zeros(b, length, dtype=torch.long)
    y = torch.full((b, length), -100, dtype=torch.long)
    for i in range(b):
        values = torch.randint(0, config.values, (config.keys,), generator=generator)
        keys = torch.randint(0, config.keys, (ctx,), generator=generator)
        pairs = 128 + 16 * keys + values[keys]
        present = torch.rand(ctx, generator=generator) < config.pair_share
        x[i, :ctx] = torch.where(present, pairs, torch.zeros_like(pairs))
        asked = torch.randint(0, config.keys, (length - ctx,), generator=generator)
        x[i, ctx:] = 16 + asked
        y[i, ctx:] = values[asked]
    return x, y


class RecallTransformer(nn.Module):
    """Byte embedding, the demo's pre-LN blocks, no position embedding; forward returns logits."""

    def __init__(self, config: RecallConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads, 4) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


@torch.no_grad()
def attention_maps(model: RecallTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's causal softmax map, mean over the batch, per head: [H, L, L] per layer."""
    return block_maps(model.blocks, model.embed(x))


@torch.no_grad()
def block_maps(blocks: nn.ModuleList, h: torch.Tensor) -> list[torch.Tensor]:
    """Causal softmax maps [H, L, L] (batch mean) of a stack of demo `Block`s fed with `h`.

    Computed from the blocks' own weights, eagerly and densely, whatever phase the model is in.
    """
    maps = []
    for block in blocks:
        b, length, width = h.shape
        qkv = block.qkv(block.ln1(h)).view(b, length, 3, block.n_heads, width // block.n_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        maps.append(torch.softmax(scores.masked_fill(causal, -math.inf), -1).mean(0))
        h = block(h)
    return maps


# ---- policies ---------------------------------------------------------------------------------


def policies(config: RecallConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (preset, overrides)."""
    spion = {
        # Every variant switches at the same step (after dense has learned the task).
        "probe_interval": config.probe_interval, "min_dense_steps": config.switch_step,
        "max_dense_steps": config.switch_step,
        "block_size": config.block_size,
    }
    # The window stays open after training so the timing below measures HSA's steps too.
    hsa = {"hsa_window": (config.switch_step, config.steps + 10**6), "hsa_mode": "local+strided",
           "hsa_stride": 128, "hsa_local": 128}
    return {
        "dense": ("dense", {}),
        "spion-cf": ("spion-cf", spion),
        "spion-c": ("spion-c", spion),
        "spion-f": ("spion-f", spion),
        "spion-p": ("spion-p", spion),
        "spion-p per-head": ("spion-p", {**spion, "per_head": True}),
        "mst-hsa (local+strided)": ("dense", hsa),
    }


def _sparse_now(model: nn.Module) -> bool:
    sites = list(model.spion_state.attention_sites())
    return bool(sites) and all(s.phase == "sparse" or s.hsa_active for s in sites)


def _probing(model: nn.Module) -> bool:
    return any(site.probing for site in model.spion_state.attention_sites())


def _layer(site_name: str) -> int:
    match = re.search(r"blocks\.(\d+)", site_name)
    return int(match.group(1)) if match else 0


def _learning_rate(config: RecallConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    try:
        hits = total = 0
        for x, y in batches:
            asked = y >= 0
            hits += int((model(x).argmax(-1) == y)[asked].sum())
            total += int(asked.sum())
    finally:
        model.train()
    return hits / total


# ---- held-out mass at the switch --------------------------------------------------------------


def _hsa_keep(length: int, stride: int, local: int) -> torch.Tensor:
    distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    return (distance >= 0) & ((distance < local) | (distance % stride == 0))


def heldout_mass(model: RecallTransformer, batches: list[torch.Tensor], config: RecallConfig) -> dict[str, float]:
    """Mass kept on held-out maps by every site's pattern, and the best density for that mass.

    Per site and head: share = mass of the map in kept blocks; best = density of the fewest
    blocks reaching that share (any blocks; and with the diagonal forced, as every pattern here
    keeps it). Averages over sites (and heads).
    """
    maps = [torch.stack(m).mean(0) for m in zip(*(attention_maps(model, x) for x in batches))]
    shares, densities, best, best_diagonal = [], [], [], []
    for site in model.spion_state.attention_sites():
        layer_map = maps[_layer(site.spec.name)]  # [H, L, L]
        if site.hsa_active:
            keep = _hsa_keep(config.seq_len, site.policy.hsa_stride, site.policy.hsa_local)
            a = layer_map.mean(0).double()
            shares.append(float((a * keep).sum() / a.sum()))
            densities.append(float(keep.sum()) / (config.seq_len * (config.seq_len + 1) / 2))
            continue
        pattern = site.pattern  # [1 or H, nb, nb]
        heads = [(layer_map.mean(0), pattern[0])] if pattern.shape[0] == 1 else list(zip(layer_map, pattern))
        for head_map, head_pattern in heads:
            share, _ = mass_kept(head_map, head_pattern, config.block_size)
            shares.append(share)
            densities.append(pattern_density(head_pattern, causal=True))
            best.append(fewest_blocks_for_mass(head_map, share, config.block_size, causal=True))
            best_diagonal.append(
                fewest_blocks_for_mass(head_map, share, config.block_size, causal=True, diagonal=True))
    result = {"heldout_mass_kept": statistics.mean(shares), "heldout_density": statistics.mean(densities)}
    if best:
        result["best_density_same_mass"] = statistics.mean(best)
        result["density_vs_best"] = result["heldout_density"] / result["best_density_same_mass"]
        result["density_vs_best_with_diagonal"] = result["heldout_density"] / statistics.mean(best_diagonal)
    return result


# ---- held-out maps of the demo model (the issue's setting) -----------------------------------


def demo_heldout_mass(switch: int = 40, seq_len: int = 2048, probe_batches: int = 2, heldout_batches: int = 4) -> list[dict[str, Any]]:
    """Patterns of every variant from the demo model's probe maps at its switch, scored on held-out maps.

    The demo's byte-level model (4 layers, d 128, 2 heads) trains dense on the stdlib corpus for
    `switch` steps with the demo's optimizer and schedule; the probe map is the mean of the maps
    of the next `probe_batches` training batches (what the probe accumulates at a switch), the
    held-out map the mean over `heldout_batches` validation batches. Rows average over layers.
    """
    from spion_fx.data import BatchSampler, fixed_batches, load_corpus
    from spion_fx.demo import ByteTransformer, DemoConfig, learning_rate
    from spion_fx.runtime.pattern import generate_pattern

    config = DemoConfig(steps=100, seq_len=seq_len, max_dense_steps=switch)
    torch.manual_seed(config.seed)
    model = ByteTransformer(seq_len, config.d_model, config.n_layers, config.n_heads, config.mlp_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))
    corpus = load_corpus(None)
    sampler = BatchSampler(corpus.train, config.batch_size, seq_len, seed=config.seed)
    for step in range(switch):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        x, y = next(sampler)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def maps(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        per_batch = [block_maps(model.blocks, model.embed(x) + model.position[:seq_len]) for x in xs]
        return [torch.stack(m).mean(0) for m in zip(*per_batch)]

    probe = maps([next(sampler)[0] for _ in range(probe_batches)])
    heldout = maps([x for x, _ in fixed_batches(corpus.validation, heldout_batches, config.batch_size, seq_len)])
    variants = {
        "spion-cf": {"variant": "cf"}, "spion-c": {"variant": "c", "density": 0.05}, "spion-f": {"variant": "f"},
        "spion-p": {"variant": "p"}, "spion-p per-head": {"variant": "p", "per_head": True},
    }
    rows = []
    for name, kwargs in variants.items():
        cells: dict[str, list[float]] = {k: [] for k in ("density", "probe", "heldout", "best", "diagonal")}
        for probe_map, heldout_map in zip(probe, heldout):
            per_head = kwargs.get("per_head", False)
            source = probe_map if per_head else probe_map.mean(0)
            pattern = generate_pattern(source, block_size=64, causal=True, **kwargs)
            pairs = zip(probe_map, heldout_map, pattern) if per_head else [(probe_map.mean(0), heldout_map.mean(0), pattern)]
            for p_map, h_map, head_pattern in pairs:
                share, _ = mass_kept(h_map, head_pattern, 64)
                cells["density"].append(pattern_density(head_pattern, causal=True))
                cells["probe"].append(mass_kept(p_map, head_pattern, 64)[0])
                cells["heldout"].append(share)
                cells["best"].append(fewest_blocks_for_mass(h_map, share, 64, causal=True))
                cells["diagonal"].append(fewest_blocks_for_mass(h_map, share, 64, causal=True, diagonal=True))
        density, best = statistics.mean(cells["density"]), statistics.mean(cells["best"])
        rows.append({
            "policy": name, "density": density, "mass_kept_probe": statistics.mean(cells["probe"]),
            "heldout_mass_kept": statistics.mean(cells["heldout"]), "best_density_same_mass": best,
            "density_vs_best": density / best,
            "density_vs_best_with_diagonal": density / statistics.mean(cells["diagonal"]),
        })
    return rows


DEMO_COLUMNS = ("policy", "density", "mass_kept_probe", "heldout_mass_kept", "best_density_same_mass",
                "density_vs_best", "density_vs_best_with_diagonal")


# ---- one training run -------------------------------------------------------------------------


def train_policy(
    config: RecallConfig, name: str, preset: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any], nn.Module]:
    torch.manual_seed(config.seed)
    model = RecallTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    spion_fx.sparsify(model, preset, optimizer=optimizer, inner_compiler=config.inner, **overrides)
    train_gen = torch.Generator().manual_seed(config.seed + 1)
    eval_gen = torch.Generator().manual_seed(config.seed + 2)
    evaluation = [recall_batch(config, eval_gen) for _ in range(config.eval_batches)]
    heldout_x = [recall_batch(config, eval_gen)[0] for _ in range(config.heldout_map_batches)]
    records: list[StepRecord] = []
    at_switch: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(config.steps):
        phase = "sparse" if _sparse_now(model) else "dense"
        probe = _probing(model)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        x, y = recall_batch(config, train_gen)
        began, began_cpu = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append(StepRecord(step, phase, probe, time.perf_counter() - began, loss.item(),
                                  time.process_time() - began_cpu))
        if not at_switch and _sparse_now(model):  # the first step after the switch
            at_switch = {"switch_at": step + 1, **heldout_mass(model, heldout_x, config)}
    wall = time.perf_counter() - start
    rows = [r for r in spion_fx.report(model, print_table=False) if r.get("kind") == "attention"]
    sparse_rows = [r for r in rows if r["phase"] == "sparse"]
    dense_ms, sparse_ms = _phase_medians(records, config, "seconds")
    dense_cpu, sparse_cpu = _phase_medians(records, config, "cpu_seconds")
    heads = {tuple(p.flatten().tolist()) for s in model.spion_state.attention_sites() for p in s.pattern}
    return {
        "policy": name,
        "accuracy": accuracy(model, evaluation),
        "final_loss": statistics.mean(r.loss for r in records[-10:]),
        "switch_at": at_switch.get("switch_at"),
        "density": statistics.mean(r["density"] for r in sparse_rows) if sparse_rows else at_switch.get(
            "heldout_density", 1.0),
        "mass_kept_probe": statistics.mean(r["mass_kept"] for r in sparse_rows) if sparse_rows else None,
        "heldout_mass_kept": at_switch.get("heldout_mass_kept"),
        "best_density_same_mass": at_switch.get("best_density_same_mass"),
        "density_vs_best": at_switch.get("density_vs_best"),
        "density_vs_best_with_diagonal": at_switch.get("density_vs_best_with_diagonal"),
        "distinct_patterns": len(heads) or None,
        "dense_step_ms": dense_ms,
        "sparse_step_ms": sparse_ms,
        "sparse_speedup": dense_ms / sparse_ms if sparse_ms == sparse_ms else None,
        "sparse_speedup_cpu": dense_cpu / sparse_cpu if sparse_cpu == sparse_cpu else None,
        "wall_s": wall,
    }, model


def interleaved_step_ms(models: dict[str, nn.Module], config: RecallConfig, reps: int = 10) -> dict[str, float]:
    """Median ms of one training forward + backward of every trained model, calls interleaved.

    Interleaving puts every model in the same time window, so load from other processes hits
    them alike: the least noisy comparison between policies on a shared machine.
    """
    x, y = recall_batch(config, torch.Generator().manual_seed(config.seed + 3))

    def step(model: nn.Module):
        def call() -> None:
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            model.zero_grad(set_to_none=True)
        return call

    medians = interleaved_medians([step(m) for m in models.values()], reps=reps, warmup=2)
    return {name: 1e3 * t for name, t in zip(models, medians)}


def _phase_medians(records: list[StepRecord], config: RecallConfig, attribute: str) -> tuple[float, float]:
    """Median steady step time (ms) of the dense and of the sparse phase."""
    times = steady_step_times(records, config.skip_after_compile, attribute)
    return tuple(1e3 * statistics.median(times[p]) if times[p] else math.nan for p in ("dense", "sparse"))


def run(quick: bool = False, config: RecallConfig | None = None) -> list[dict[str, Any]]:
    config = config or (quick_config() if quick else RecallConfig())
    rows, models = [], {}
    for name, (preset, overrides) in policies(config).items():
        torch._dynamo.reset()
        row, models[name] = train_policy(config, name, preset, overrides)
        rows.append(row)
        print(f"[long_range] {name}: accuracy {row['accuracy']:.3f} ({row['wall_s']:.0f} s)", flush=True)
    step_ms = interleaved_step_ms(models, config, reps=3 if quick else 10)
    dense = rows[0]
    for row in rows:
        row["accuracy_vs_dense_pts"] = 100.0 * (row["accuracy"] - dense["accuracy"])
        row["step_ms"] = step_ms[row["policy"]]
        row["speedup_vs_dense"] = step_ms[dense["policy"]] / step_ms[row["policy"]]
    return rows


COLUMNS = ("policy", "accuracy", "accuracy_vs_dense_pts", "density", "mass_kept_probe", "heldout_mass_kept",
           "best_density_same_mass", "density_vs_best", "density_vs_best_with_diagonal", "distinct_patterns",
           "step_ms", "speedup_vs_dense", "sparse_speedup_cpu", "switch_at", "wall_s")


def section(rows: list[dict[str, Any]], config: RecallConfig, seconds: float,
            demo_rows: list[dict[str, Any]] | None = None) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    chance = 1.0 / config.values
    lines = [
        "## Long-range quality (associative recall, CPU)",
        "",
        f"Measured {stamp} with `python benchmarks/long_range.py --write` in {seconds / 60:.1f} min on "
        f"{machine_line()}.",
        "",
        f"Task: L={config.seq_len}; key→value pair bytes in the first {config.context} positions "
        f"({config.keys} key(s), {config.values} values, {config.pair_share:.0%} of the context), queries "
        f"at every later position; chance accuracy {chance:.3f}. Model: {config.n_layers} layer(s), "
        f"d_model {config.d_model}, {config.n_heads} heads, no position embedding; batch "
        f"{config.batch_size}, {config.steps} steps, every variant switching at step {config.switch_step}, "
        f"block {config.block_size}. Densities are causal block densities; `mass_kept_probe` is what "
        "`report()` shows; `heldout_*` are measured at the switch on held-out sequences; "
        "`density_vs_best*` divide by the density of the best pattern keeping the same held-out mass (any "
        "blocks / with the diagonal forced, as every pattern here keeps it); `distinct_patterns` counts "
        "different head patterns (per-head patterns can coincide); `step_ms` is the median training "
        "forward + backward of each trained model (sparse phase; HSA window open), all models' calls "
        "interleaved after training so that load hits them alike, and `speedup_vs_dense` its ratio to "
        "dense; `sparse_speedup_cpu` is the run's dense-phase over sparse-phase median process CPU time "
        "per step during training (a cross-check; wall times during training are too noisy here). MST's HSA is a training-time window: that model is evaluated with dense "
        "attention, and its density is the element share of causal keys it keeps.",
        "",
        markdown_table(rows, COLUMNS).rstrip(),
        "",
    ]
    if demo_rows:
        lines += [
            "### Held-out mass on the demo model",
            "",
            "The demo's byte-level model (4 layers, d 128) trained dense for 40 steps at L=2048 on the "
            "stdlib corpus; each variant's pattern built from the probe map of the next training batches "
            "and scored on validation maps of the same weights (mean over layers and heads).",
            "",
            markdown_table(demo_rows, DEMO_COLUMNS).rstrip(),
            "",
        ]
    return "\n".join(lines)


def write_section(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace this benchmark's section between its markers (or append it); keep the rest."""
    current = path.read_text() if path.exists() else "# spion_fx benchmarks\n"
    path.write_text(rewrite_section(current, text, BEGIN, END))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run at L=512 (a smoke test)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--switch-step", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see main())")
    parser.add_argument("--skip-demo-maps", action="store_true", help="leave out the demo model's held-out maps")
    parser.add_argument("--only-demo-maps", action="store_true", help="only the demo model's held-out maps")
    args = parser.parse_args()
    config = quick_config() if args.quick else RecallConfig()
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.switch_step is not None:
        config = replace(config, switch_step=args.switch_step)
    # One thread by default: this model is small, and on a shared 2-core machine two threads spent
    # most of each step waiting for each other (~0.5 s per step at any L; 75 ms at L=2048 on one).
    torch.set_num_threads(args.threads)
    print(machine_line())
    start = time.perf_counter()
    rows = [] if args.only_demo_maps else run(args.quick, config=config)
    if rows:
        print_table("long-range recall: same model, data, seed and steps", rows, COLUMNS)
    demo_rows = None
    if not (args.skip_demo_maps or args.quick):
        demo_rows = demo_heldout_mass()
        print_table("held-out mass on the demo model (L=2048, 40 dense steps)", demo_rows, DEMO_COLUMNS)
    if args.write and rows:
        write_section(section(rows, config, time.perf_counter() - start, demo_rows))
        print("[long_range] wrote its section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
