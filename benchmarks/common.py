"""Helpers shared by the benchmarks: median timing, the machine's description, markdown tables.

This machine is shared and noisy, so every benchmark reports medians over repetitions after a
warm-up, and compares ratios measured in the same run rather than absolute times across runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` without installing
    sys.path.insert(0, str(ROOT))


def median_time(fn: Callable[[], object], reps: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time of `fn` in seconds, after `warmup` untimed calls."""
    return statistics.median(times(fn, reps, warmup, device))


def times(fn: Callable[[], object], reps: int = 5, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Every timed repetition (seconds), so callers can report spread as well as the median."""
    for _ in range(warmup):
        fn()
    _sync(device)
    result = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        result.append(time.perf_counter() - start)
    return result


def interleaved_medians(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 1) -> list[float]:
    """Median seconds of each function; calls are interleaved so load spikes hit all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    buckets: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, buckets):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in buckets]


def random_qkv(b: int, h: int, length: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, L, D] (float32, requiring grad) from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=gen).requires_grad_(True) for _ in range(3))


def fwd_bwd_step(attn: Callable[..., torch.Tensor], q, k, v) -> Callable[[], None]:
    """One forward + backward of ``attn(q, k, v)`` against a fixed random output gradient."""
    grad = torch.randn_like(q)

    def step() -> None:
        torch.autograd.grad(attn(q, k, v), (q, k, v), grad)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict[str, Any]:
    """What a reader needs to interpret CPU timings."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_1min": round(load, 2),
    }


def machine_line() -> str:
    m = machine_description()
    return (
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"Python {m['python']}, {m['os']}, 1-min load {m['load_avg_1min']}"
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    """A GitHub markdown table; columns default to the union of row keys in first-seen order."""
    if not rows:
        return "_no rows_\n"
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Iterable[str] | None = None) -> None:
    """Print rows as a rich table (falls back to markdown when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown_table(rows, columns))
        return
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    Console(width=max(160, Console().width)).print(table)


def rewrite_section(text: str, body: str, begin: str, end: str) -> str:
    """Replace what lies between the markers (markers kept); append a marked section if absent.

    Everything outside the markers is returned unchanged. Every benchmark that writes
    BENCHMARKS.md owns one marked section (cpu, gpu, long_range) and writes it with this.
    """
    block = f"{begin}\n{body.rstrip()}\n{end}"
    start = text.find(begin)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    stop = text.find(end, start + len(begin))
    if stop < 0:
        raise ValueError(f"{begin} has no matching {end}; fix the file by hand")
    return text[:start] + block + text[stop + len(end):]


def marked_section(text: str, begin: str, end: str) -> str:
    """What lies between the markers ("" when they are absent)."""
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    return text[start + len(begin):stop].strip("\n") + "\n" if stop >= 0 else ""


def benchmark_main(name: str, doc: str | None, title: str, run: Callable[..., list[dict[str, Any]]],
                   threads: int | None = None) -> None:
    """The command line of a benchmark that run_cpu.py also runs: print its table, or with
    ``--write`` measure it through ``run_cpu.py --only NAME`` (its subsection of BENCHMARKS.md).
    ``threads``: the default of a ``--threads`` option passed on to ``run``, if it has one."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or name).splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help="torch threads for the table")
    parser.add_argument("--write", action="store_true",
                        help="measure through run_cpu.py and write its subsection of BENCHMARKS.md")
    args = parser.parse_args()
    if args.write:
        import run_cpu

        run_cpu.main(["--only", name, *(["--quick"] if args.quick else [])])
        return
    print(machine_line())
    print_table(title, run(args.quick, args.threads) if threads is not None else run(args.quick))
