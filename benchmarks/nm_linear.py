"""Packed N:M linear layers: memory and speed against dense.

CPU: bytes of the packed format vs dense for transformer-sized layers (2:4, 1:8, 1:16; fp32 and
bf16), and the tiled-unpack packed matmul vs dense ``F.linear`` (medians; CPUs have no N:M units,
so expect the packed matmul to be slower — the packed form saves memory, not time, on CPU), and
which kernel finalize's measured selection then picks (``speedup`` = its ratio to dense, ≥ 1).
Training cost of N:M masks: a whole SR-STE (``nm-2:4``) training step of a small HF GPT-2 against
the same model's dense step under the same pipeline (``sparsify`` with the dense policy), steps
interleaved so machine load hits all variants alike; also with masks recomputed every 100 steps
instead of every step, and with the previous unfused SR-STE backward (``g + λ·(~M)·W``, four
temporaries) patched back in, so the fusion's effect is measured in the same run.
GPU rows (kernel choice, decode GEMV, the GPT-2 step at L=1024 in bf16) are in benchmarks/gpu_nm.py.

    python benchmarks/nm_linear.py [--quick] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.nn.functional as F

import spion_fx
from spion_fx.kernels.nm.packed import PackedNMLinear, pack_nm, packed_linear_cpu
from spion_fx.runtime.nm import SRSTEWeight, nm_mask

PATTERNS = [(2, 4), (1, 8), (1, 16)]


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_memory(quick: bool) -> list[dict]:
    shapes = [(3072, 768), (768, 3072)] if quick else [(3072, 768), (768, 3072), (768, 768), (2304, 768)]
    rows = []
    for out_f, in_f in shapes:
        for n, m in PATTERNS:
            for dtype in (torch.float32, torch.bfloat16):
                w = torch.randn(out_f, in_f).to(dtype)
                mask = nm_mask(w, n, m)
                layer = PackedNMLinear.from_dense(w, None, n, m, mask=mask)
                dense = layer.dense_bytes()
                packed = layer.memory_bytes()
                rows.append({
                    "kind": "memory", "shape": f"{out_f}x{in_f}", "pattern": f"{n}:{m}",
                    "dtype": str(dtype).replace("torch.", ""), "dense_bytes": dense,
                    "packed_bytes": packed, "packed/dense": packed / dense,
                    "packed/ideal": packed / (dense * n / m),
                })
    return rows


def cpu_time(quick: bool) -> list[dict]:
    tokens = 256 if quick else 1024
    reps = 5 if quick else 15
    out_f, in_f = 3072, 768
    rows = []
    x = torch.randn(tokens, in_f)
    for n, m in PATTERNS:
        w = torch.randn(out_f, in_f)
        mask = nm_mask(w, n, m)
        values, idx = pack_nm(w * mask, n, m, mask)
        wm = w * mask
        t_dense = _median_s(lambda wm=wm: F.linear(x, wm), reps)
        t_packed = _median_s(
            lambda v=values, i=idx, n=n, m=m: packed_linear_cpu(x, v, i, n, m, in_f), reps)
        rows.append({"kind": "cpu_time", "shape": f"{tokens}x{in_f} -> {out_f}", "pattern": f"{n}:{m}",
                     "dtype": "float32", "dense_ms": t_dense * 1e3, "packed_ms": t_packed * 1e3,
                     "speedup": t_dense / t_packed})
    return rows


def cpu_finalize_pick(quick: bool) -> list[dict]:
    """What finalize's measured selection picks on this CPU (dense unless a packed path is faster)."""
    import tempfile

    from spion_fx.lowering import nm_select

    tokens = 256 if quick else 1024
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = nm_select.TimingCache(Path(tmp) / "t.json")
        for n, m in PATTERNS:
            w = torch.randn(3072, 768)
            mask = nm_mask(w, n, m)
            choice, _ = nm_select.choose_kernel(w * mask, None, n, m, mask, tokens=tokens, cache=cache)
            rows.append({"kind": "finalize_pick", "shape": f"{tokens}x768 -> 3072", "pattern": f"{n}:{m}",
                         "dtype": "float32", "dense_ms": choice.times_ms["dense"],
                         "packed_ms": choice.times_ms.get("cpu"), "picked": choice.kernel,
                         "speedup": choice.vs_dense})
    return rows


def gpt2(n_embd: int, n_layer: int, n_head: int, n_positions: int, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg).train()


@contextlib.contextmanager
def unfused_srste_backward() -> Iterator[None]:
    """The SR-STE backward as it was before the fusion, for a same-run comparison."""
    fused = SRSTEWeight.backward

    def unfused(ctx, grad):
        weight, mask = ctx.saved_tensors
        return grad + ctx.lam * (~mask) * weight, None, None

    SRSTEWeight.backward = staticmethod(unfused)
    try:
        yield
    finally:
        SRSTEWeight.backward = staticmethod(fused)


# (row name, policy, policy overrides, run the step with the unfused backward)
STEP_VARIANTS = (
    ("dense", "dense", {}, False),
    ("nm-2:4 SR-STE, mask every step", "nm-2:4", {}, False),
    ("nm-2:4 SR-STE, mask every 100 steps", "nm-2:4", {"update_interval": 100}, False),
    ("nm-2:4 SR-STE, previous unfused backward", "nm-2:4", {}, True),
)


def step_times(
    base: torch.nn.Module, ids: torch.Tensor, variants=STEP_VARIANTS, *, reps: int, warmup: int = 3,
    device: str = "cpu", autocast: torch.dtype | None = None, fused_adamw: bool = False,
    inner: str | None = "eager", deadline: float = float("inf"), models: dict | None = None,
    cpu_ms: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Interleaved training-step wall times (ms) of each variant of ``base`` under ``sparsify``
    (``inner=None``: the policy's default inner compiler). ``models`` receives the trained models
    and each variant's last loss, for checks after timing; ``cpu_ms`` the process CPU time of
    each step, which other processes' load on a shared machine inflates less than wall time."""
    runs: dict[str, tuple[Callable[[], None], bool]] = {}
    losses: dict[str, float] = {}
    for name, policy, overrides, unfused in variants:
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw or None)
        spion_fx.sparsify(model, policy, optimizer=opt, inner=inner, **overrides)

        def step(model=model, opt=opt, name=name) -> None:
            with torch.autocast(device.split(":")[0], dtype=autocast, enabled=autocast is not None):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name] = loss.detach()

        runs[name] = (step, unfused)
        if models is not None:
            models[name] = model

    def timed(step: Callable[[], None], unfused: bool, name: str | None = None) -> float:
        ctx = unfused_srste_backward() if unfused else contextlib.nullcontext()
        with ctx:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if name is not None and cpu_ms is not None:
                cpu_ms.setdefault(name, []).append((time.process_time() - c0) * 1e3)
            return (time.perf_counter() - t0) * 1e3

    for step, unfused in runs.values():
        for _ in range(warmup):
            timed(step, unfused)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        if time.perf_counter() > deadline:
            break
        for name, (step, unfused) in runs.items():
            samples[name].append(timed(step, unfused, name))
    if models is not None:
        models["losses"] = {name: float(loss) for name, loss in losses.items()}
    return samples


def step_rows(samples: dict[str, list[float]], cpu_ms: dict[str, list[float]], what: str) -> list[dict[str, Any]]:
    dense = statistics.median(samples["dense"])
    dense_cpu = statistics.median(cpu_ms["dense"])
    rows = []
    for name, times in samples.items():
        if name == "dense" or not times:
            continue
        ms, cpu = statistics.median(times), statistics.median(cpu_ms[name])
        rows.append({"kind": "train_step", "shape": what, "pattern": name, "dtype": "float32",
                     "dense_ms": dense, "packed_ms": ms, "step/dense": ms / dense,
                     "step/dense (CPU time)": cpu / dense_cpu})
    return rows


def cpu_train_step(quick: bool) -> list[dict]:
    n_embd, n_layer, seq = (128, 2, 128) if quick else (256, 4, 256)
    base = gpt2(n_embd, n_layer, 4, seq)
    ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(0))
    cpu_ms: dict[str, list[float]] = {}
    # One thread: on a small shared machine, OpenMP threads wait for each other whenever another
    # process deschedules one of them, which swamps the differences measured here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = step_times(base, ids, reps=4 if quick else 12, cpu_ms=cpu_ms)
    finally:
        torch.set_num_threads(threads)
    return step_rows(samples, cpu_ms, f"GPT-2 d{n_embd} {n_layer} layers, B=2 L={seq}, AdamW (eager inner, 1 thread)")


def run(quick: bool) -> list[dict]:
    return cpu_memory(quick) + cpu_time(quick) + cpu_finalize_pick(quick) + cpu_train_step(quick)


def _print(rows: list[dict]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind]
        keys = list(dict.fromkeys(k for r in sel for k in r if k != "kind"))
        print(f"\n## {kind}  (device: {'cuda' if torch.cuda.is_available() else 'cpu'}, "
              f"threads: {torch.get_num_threads()})")
        print(" | ".join(keys))
        for r in sel:
            print(" | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))


def write_section(path: Path, rows: list[dict], seconds: float, quick: bool) -> None:
    """Replace this benchmark's ``### nm_linear`` subsection of the CPU section in BENCHMARKS.md,
    as ``run_cpu.py --only nm_linear`` would; the other subsections stay."""
    from run_cpu import cpu_section
    from run_cpu import write_section as write_cpu_section

    title = (__doc__ or "").strip().splitlines()[0]
    result = {"name": "nm_linear", "status": "ok", "rows": rows, "seconds": seconds, "title": title}
    write_cpu_section(path, cpu_section([result], quick))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--write", type=Path, help="rewrite the nm_linear subsection of this file")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = run(args.quick)
    _print(rows)
    if args.write:
        write_section(args.write, rows, time.perf_counter() - start, args.quick)


if __name__ == "__main__":
    main()
