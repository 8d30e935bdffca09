"""Turning a SparsityState into rows, a rich table and a PNG of patterns."""

from __future__ import annotations

import math
from typing import Any

import torch

from spion_fx.runtime.pattern import pattern_density
from spion_fx.runtime.state import SparsityState


def build_report(state: SparsityState) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [_attention_row(site) for site in state.attention_sites()]
    rows += _attention_kept_dense(state, {row["site"] for row in rows})
    rows += _eager_forwards(state)
    rows += _recompiles_kept_dense(state)
    if state.linear is not None:
        for entry in state.linear.report():
            rows.append({"kind": "linear", **entry})
        sparse, dense = state.linear.training_flops(1)
        if sparse > 0:
            rows.append({
                "site": "all linear layers", "kind": "summary", "phase": "whole schedule",
                "training_flops_vs_dense": sparse / dense,
                "note": f"training FLOPs {dense / sparse:.2f}x fewer than dense (analytic, per token)",
            })
    return rows


def _attention_row(site: Any) -> dict[str, Any]:
    ok, why = site.can_be_sparse
    density = 1.0
    saved = 0.0
    if site.phase == "sparse" and site.pattern.numel():
        density = pattern_density(site.pattern, causal=site.causal)
        saved = 1.0 - density
    return {
        "site": site.spec.name,
        "kind": "attention",
        "phase": site.phase,
        "switch_step": int(site.switch_step) if int(site.switch_step) >= 0 else None,
        "density": density,
        # Share of the probe map's attention mass the pattern keeps (runtime/coverage.py),
        # recorded at the switch; None while dense (nothing is dropped).
        "mass_kept": _mass_kept(site),
        "mass_kept_per_head": _mass_kept_per_head(site),
        "attention_flops_saved": saved,
        # Host seconds the switch cost this site (deciding probes, stability check, pattern,
        # first layout); nothing is re-compiled at a switch (lowering/partition.py).
        "switch_s": site.switch_seconds if site.phase == "sparse" else None,
        "checks": site.checks_done,
        "last_change": None if math.isnan(site.last_change) else site.last_change,
        # Calls per kernel since the last phase change: evidence that the sparse kernel ran.
        "kernel_calls": dict(site.kernel_calls),
        "note": "" if ok else why,
    }


def _eager_forwards(state: SparsityState) -> list[dict[str, Any]]:
    """Forwards Dynamo ran without our graphs (lowering/fallback.py): every site was dense."""
    if not state.eager_forwards:
        return []
    reasons = [e["reason"] for e in state.events if e.get("event") == "eager_fallback"]
    return [{
        "site": "whole model", "kind": "summary", "phase": "ran eagerly (dense)",
        "eager_forwards": state.eager_forwards,
        "note": f"{state.eager_forwards} forward(s) ran without spion_fx's graphs: "
                + (reasons[0] if reasons else "Dynamo fell back to eager"),
    }]


def _recompiles_kept_dense(state: SparsityState) -> list[dict[str, Any]]:
    """Graphs Dynamo recompiled whose attention stays dense while earlier graphs of the same
    model have sites (lowering/backend.py `_warn_if_attention_lost`): calls that take them are
    dense at those sites, whatever the site rows above say."""
    return [{
        "site": f"graph {e['graph']}", "kind": "summary", "phase": "recompiled dense",
        "note": f"a recompiled graph keeps attention dense: {e['reason']}",
    } for e in state.events if e.get("event") == "attention_kept_dense"]


def _attention_kept_dense(state: SparsityState, listed: set[str]) -> list[dict[str, Any]]:
    """Attention the backend saw but gave no runtime module, with the reason: nn.MultiheadAttention
    whose weights are used, a scale computed at run time, a site excluded by the policy, a graph
    shared by several modules. It runs exactly as the original, dense."""
    rows, seen = [], set(listed)
    for record in state.graph_records:
        for decision in record.decisions:
            if decision.kind != "attention" or not decision.dense or decision.site in seen:
                continue
            seen.add(decision.site)
            rows.append({
                "site": decision.site, "kind": "attention", "phase": "dense",
                "switch_step": None, "density": 1.0, "mass_kept": None, "mass_kept_per_head": None,
                "attention_flops_saved": 0.0, "switch_s": None, "checks": 0, "last_change": None,
                "note": decision.reason,
            })
    return rows


def _mass_kept(site: Any) -> float | None:
    value = float(site.mass_kept)
    return None if site.phase != "sparse" or math.isnan(value) else value


def _mass_kept_per_head(site: Any) -> list[float] | None:
    if _mass_kept(site) is None or site.mass_kept_per_head.numel() == 0:
        return None
    return [float(v) for v in site.mass_kept_per_head]


def percent(value: float | None) -> str:
    """A share as a table cell ("" when unknown)."""
    return "" if value is None else f"{value:.1%}"


def _phase_cell(row: dict[str, Any]) -> str:
    phase = row.get("phase", "")
    if row["kind"] == "linear":
        return f"{row.get('pattern', row.get('method', ''))} ({phase})"
    return str(phase)


def _kernel_cell(row: dict[str, Any]) -> str:
    """Attention: calls per kernel since the last phase change. N:M layers after finalize: the
    kernel each got and its measured speed relative to dense."""
    calls = row.get("kernel_calls")
    if calls is not None:
        return ", ".join(f"{name} {count}" for name, count in calls.items() if count)
    kernel, ratio = row.get("kernel"), row.get("vs_dense")
    if not kernel:
        return ""
    return kernel if ratio is None else f"{kernel} ({ratio:.2f}x dense)"


# (header, cell of a row) in display order: add a column here and every table shows it.
COLUMNS: list[tuple[str, Any]] = [
    ("site", lambda r: str(r.get("site", r.get("name", "")))),
    ("kind", lambda r: r["kind"]),
    ("phase / pattern", _phase_cell),
    ("switch step", lambda r: "" if r.get("switch_step") is None else str(r["switch_step"])),
    ("switch s", lambda r: "" if r.get("switch_s") is None else f"{r['switch_s']:.2f}"),
    ("density", lambda r: percent(r.get("density"))),
    ("mass kept", lambda r: percent(r.get("mass_kept"))),
    ("saved", lambda r: percent(r.get("attention_flops_saved"))),
    ("kernel", _kernel_cell),
    ("note", lambda r: str(r.get("note") or r.get("dense_reason") or "")),
]


def print_report(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="spion_fx sites")
    for header, _ in COLUMNS:
        table.add_column(header, **({"overflow": "fold"} if header == "site" else {}))
    for row in rows:
        table.add_row(*(cell(row) for _, cell in COLUMNS))
    Console(width=max(Console().width, 120)).print(table)


def patterns_png(sites: list[tuple[str, torch.Tensor]], path: str, cell: int = 4) -> str:
    """A grid of block patterns (one panel per site and head), white = computed block."""
    from PIL import Image, ImageDraw

    panels = [(name, grid[h]) for name, grid in sites for h in range(grid.shape[0])]
    if not panels:
        Image.new("RGB", (200, 40), "white").save(path)
        return path
    nb = max(p.shape[-1] for _, p in panels)
    side = nb * cell
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    label = 14
    image = Image.new("RGB", (cols * (side + 10) + 10, rows * (side + label + 10) + 10), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    for i, (name, grid) in enumerate(panels):
        x0 = 10 + (i % cols) * (side + 10)
        y0 = 10 + (i // cols) * (side + label + 10)
        draw.text((x0, y0), name[-(side // 6 or 1):], fill=(220, 220, 220))
        pixels = grid.to(torch.uint8).mul(255).cpu()
        tile = Image.fromarray(pixels.numpy(), mode="L").resize(
            (grid.shape[-1] * cell, grid.shape[-2] * cell), Image.NEAREST
        )
        image.paste(tile.convert("RGB"), (x0, y0 + label))
    image.save(path)
    return path
