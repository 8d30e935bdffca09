"""Run every CPU benchmark and rewrite the CPU section of BENCHMARKS.md (``make bench``).

Each benchmark module in this folder exposes ``run(quick: bool) -> list[dict]``. Modules written by
others may be missing or broken while the library is being finished, so each is imported and run
defensively: a failure is recorded in the report instead of stopping the others. Only the text
between ``<!-- cpu:begin -->`` and ``<!-- cpu:end -->`` is replaced; a GPU section stays as it is.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    machine_description,
    markdown_table,
    marked_section,
    print_table,
    rewrite_section,
)

BEGIN, END = "<!-- cpu:begin -->", "<!-- cpu:end -->"
# Kernel-level first, then whole-model: the order the report reads best in.
MODULES = (
    "attention_cpu", "hsa_cpu", "decode_attention", "routed_cpu", "pattern_generation", "nm_linear", "train_step",
    "switch_time", "workflows", "probe_overhead", "quality",
)  # long_range.py writes its own section (`python benchmarks/long_range.py --write`)


def run_module(name: str, quick: bool) -> dict[str, Any]:
    """Import benchmarks/<name>.py and call its run(quick); never raises."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name == name:
            return {"name": name, "status": "missing", "rows": [], "seconds": 0.0}
        return _failed(name, start)
    except Exception:
        return _failed(name, start)
    if not callable(getattr(module, "run", None)):
        return {"name": name, "status": "no run(quick) function", "rows": [], "seconds": 0.0}
    try:
        rows = list(module.run(quick))
    except Exception:
        return _failed(name, start)
    doc = (module.__doc__ or "").strip().splitlines()
    return {"name": name, "status": "ok", "rows": rows, "seconds": time.perf_counter() - start,
            "title": doc[0] if doc else name}


def _failed(name: str, start: float) -> dict[str, Any]:
    error = traceback.format_exc(limit=3).strip().splitlines()[-1]
    print(f"[run_cpu] {name} failed: {error}", file=sys.stderr)
    return {"name": name, "status": f"failed: {error}", "rows": [], "seconds": time.perf_counter() - start}


def cpu_section(results: list[dict[str, Any]], quick: bool) -> str:
    """The markdown between the markers: machine, versions, then one table per benchmark."""
    machine = machine_description()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## CPU",
        "",
        f"Last run {stamp}{' (--quick)' if quick else ''} with `python benchmarks/run_cpu.py`"
        " (each subsection says when it was measured; `--only` re-measures some and keeps the others).",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads",
        f"- torch {machine['torch']}, Python {machine['python']}, {machine['os']}",
        f"- 1-minute load average at the end: {machine['load_avg_1min']} (a shared machine is noisy: "
        "read the ratios, which are measured within one run, rather than absolute times)",
        "",
    ]
    for result in results:
        lines.append(f"### {result['name']}")
        lines.append("")
        if result["status"] != "ok":
            lines += [f"_not measured: {result['status']}_", ""]
            continue
        lines += [result.get("title", ""), "", markdown_table(result["rows"]).rstrip(), "",
                  f"_{result['seconds']:.0f} s, measured {stamp}_", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_section(path: Path, section: str) -> None:
    """Write the CPU section between the markers, or append one; keep everything else.

    Benchmarks measured before and not re-run now (``--only``) keep their subsections: the new
    section's header replaces the old one, its ``### name`` subsections replace those of the same
    name, and the other old subsections follow in their order.
    """
    text = path.read_text() if path.exists() else "# spion_fx benchmarks\n"
    old = marked_section(text, BEGIN, END)
    path.write_text(rewrite_section(text, merge_sections(old, section) if old else section, BEGIN, END))


def merge_sections(old: str, new: str) -> str:
    """`new`'s header and subsections, then `old`'s subsections that `new` does not have."""
    new_head, new_parts = _subsections(new)
    _, old_parts = _subsections(old)
    fresh = {name for name, _ in new_parts}
    kept = [(name, body) for name, body in old_parts if name not in fresh]
    order = [name for name in MODULES]
    parts = sorted([*new_parts, *kept], key=lambda p: order.index(p[0]) if p[0] in order else len(order))
    return new_head + "".join(body for _, body in parts)


def _subsections(section: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first ``### `` heading, [(name, text of that subsection)])."""
    pieces = section.split("\n### ")
    head, parts = pieces[0] + "\n", []
    for piece in pieces[1:]:
        name = piece.split("\n", 1)[0].strip()
        parts.append((name, "### " + piece.rstrip("\n") + "\n\n"))
    return head, parts


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="much shorter runs of every benchmark")
    parser.add_argument("--only", nargs="*", default=None, help="module names to run (default: all)")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    results = []
    for name in args.only or MODULES:
        print(f"[run_cpu] {name} …", flush=True)
        result = run_module(name, args.quick)
        if result["rows"]:
            print_table(f"{name} ({result['seconds']:.0f} s)", result["rows"])
        else:
            print(f"[run_cpu] {name}: {result['status']}")
        results.append(result)
    write_section(Path(args.output), cpu_section(results, args.quick))
    print(f"[run_cpu] wrote the CPU section of {args.output}")
    return results


if __name__ == "__main__":
    main()
