"""`python -m spion_fx.inspect`: show the sites spion_fx finds in a model and the rewritten graphs.

    python -m spion_fx.inspect --model gpt2 --policy spion-cf --seq-len 128
    python -m spion_fx.inspect --model /path/to/hf_model_dir --format json
    python -m spion_fx.inspect --model mypkg.models:make_model    # returns (model, example_inputs)
    python -m spion_fx.inspect --model /path/to/hf_model_dir --policy spion-p --patterns --no-graph

The model goes through the very machinery `sparsify` uses (Dynamo → detection → rewrite), with
the eager inner compiler and one no-grad forward, so what is printed is what training would run.
With ``--patterns`` (SPION policies) it also probes the example batch once and builds each site's
pattern from that map, as a switch would: the table gains the pattern's density and the share of
the map's attention mass it keeps ("mass kept"). On a trained model (a local HF directory) that
previews what SPION would drop; on the built-in configs the weights are random.
Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

import torch

from spion_fx.decisions import SiteKind, decision_for
from spion_fx.lowering.backend import GraphRecord, SpionCompiler
from spion_fx.policy import Policy
from spion_fx.reporting import build_report, percent
from spion_fx.runtime.state import SparsityState


class UsageError(Exception):
    """A problem with the user's arguments: reported in one line, exit status 2."""


def load_model(spec: str, seq_len: int, batch: int = 2) -> tuple[torch.nn.Module, tuple, dict]:
    """NAME (built-in config), PATH (local HF model directory) or module:factory."""
    from spion_fx import zoo

    if spec in zoo.names():
        model, kwargs = zoo.build(spec, seq_len=seq_len, batch=batch)
        return model, (), kwargs
    if os.path.isdir(spec):
        return _load_hf_directory(spec, seq_len, batch)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"--model {spec}: cannot import {attr!r} from {module_name!r} ({exc})") from exc
        result = factory()
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
            raise UsageError(f"--model {spec}: the factory must return (model, example_inputs)")
        model, example = result
        if isinstance(example, dict):
            return model, (), example
        return model, tuple(example) if isinstance(example, (tuple, list)) else (example,), {}
    raise UsageError(
        f"--model {spec!r} is neither a built-in model ({', '.join(zoo.names())}), "
        "a directory, nor module:factory"
    )


def _load_hf_directory(path: str, seq_len: int, batch: int) -> tuple[torch.nn.Module, tuple, dict]:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as exc:
        raise UsageError("loading a model directory needs transformers: pip install spion-fx[hf]") from exc
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {path}: not a loadable Hugging Face model directory ({exc})") from exc
    vocab = getattr(config, "vocab_size", 1000)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return model.eval(), (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def inspect_model(model: torch.nn.Module, args: tuple, kwargs: dict, policy: Policy) -> tuple[list[GraphRecord], list[str]]:
    """Run the spion machinery once (no grad, eager inner compiler) and return its records."""
    from spion_fx.capture import run_once

    compiler = SpionCompiler(SparsityState(policy), model=model, inner="eager")
    breaks = run_once(model, compiler, args, kwargs)
    return compiler.records, breaks


def probe_patterns(model: torch.nn.Module, args: tuple, kwargs: dict, policy: Policy) -> dict[str, dict[str, Any]]:
    """Probe one no-grad forward, build every site's pattern from that map as a switch would.

    Returns {site name: report row} (density, mass kept, per-head mass kept, phase).
    """
    state = SparsityState(policy).eval()
    compiler = SpionCompiler(state, model=model, inner="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)  # creates the sites
            sites = [s for s in state.attention_sites() if s.can_be_sparse[0]]
            for site in sites:
                site.probing = True  # read by the (eagerly run) site at the next call
            compiled(*args, **kwargs)
        for site in sites:
            site.probing = False
            count = float(site.probe_stats[0])
            if count == 0:
                continue  # the probe skipped this site (non-finite activations)
            site.sync_from_buffers()
            site.previous_map = site.probe_accum / count
            state._switch_to_sparse(site, 0, forced=False)
    finally:
        torch._dynamo.reset()
    return {row["site"]: row for row in build_report(state) if row["kind"] == "attention"}


def site_rows(records: list[GraphRecord], patterns: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        for site in record.attention_sites:
            rows.append({
                "graph": record.index, "site": site.name, "kind": "attention", "form": site.form,
                "shape": _shape(site.q), "heads": site.num_heads, "kv_heads": site.num_kv_heads,
                "causal": site.is_causal, "mask": site.mask_kind, "cross": site.cross_attention,
                "decision": _decision_text(record, site.name, "attention"),
            })
            if patterns is not None:
                probed = patterns.get(site.name, {})
                sparse = probed.get("phase") == "sparse"
                rows[-1].update({
                    "density": probed.get("density") if sparse else None,
                    "mass_kept": probed.get("mass_kept"),
                    "mass_kept_per_head": probed.get("mass_kept_per_head"),
                })
        for site in record.linear_sites:
            rows.append({
                "graph": record.index, "site": site.name, "kind": site.role, "form": site.form,
                "shape": list(site.weight_shape), "weight": site.weight_name,
                "decision": _decision_text(record, site.name, "linear"),
            })
    return rows


def _decision_text(record: GraphRecord, site: str, kind: SiteKind) -> str:
    decision = decision_for(record.decisions, site, kind)
    return "" if decision is None else str(decision)


def _shape(node: Any) -> list[int] | None:
    value = getattr(node, "meta", {}).get("example_value")
    return list(value.shape) if value is not None else None


def print_text(rows: list[dict[str, Any]], records: list[GraphRecord], breaks: list[str], show_graph: bool) -> None:
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=f"spion_fx sites ({len(records)} graph(s), {len(breaks)} graph break(s))")
    probed = any("mass_kept" in row for row in rows)
    columns = ["graph", "site", "kind", "form", "shape", "heads", "causal", "decision"]
    for column in columns + (["density", "mass kept"] if probed else []):
        table.add_column(column, overflow="fold")
    for row in rows:
        heads = "" if row.get("heads") is None else f"{row['heads']}/{row.get('kv_heads') or row['heads']}"
        cells = [
            str(row["graph"]), row["site"], row["kind"], row["form"], str(row["shape"]), heads,
            "" if "causal" not in row else str(row["causal"]), row["decision"],
        ]
        if probed:
            cells += [percent(row.get("density")), percent(row.get("mass_kept"))]
        table.add_row(*cells)
    console.print(table)
    for reason in breaks:
        console.print(f"[yellow]graph break:[/yellow] {reason}")
    if not show_graph:
        return
    for record in records:
        rewritten = {r.target for r in record.rewritten}
        code = record.graph_module.code if record.graph_module is not None else ""
        console.rule(f"graph {record.index} (rewritten nodes highlighted)")
        lines = [i + 1 for i, line in enumerate(code.splitlines()) if any(t in line for t in rewritten)]
        console.print(Syntax(code, "python", highlight_lines=set(lines), line_numbers=True, word_wrap=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spion_fx.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="built-in NAME, a HF model directory, or module:factory")
    parser.add_argument("--policy", default="spion-cf", help="preset name, e.g. spion-cf, nm-2:4, spion-cf+nm-2:4")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--no-graph", action="store_true", help="print only the table of sites")
    parser.add_argument(
        "--patterns", action="store_true",
        help="SPION policies: probe the example batch and show each site's pattern density and mass kept",
    )
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed a one-line usage error
        return int(exc.code or 0)
    try:
        if ns.seq_len < 1:
            raise UsageError(f"--seq-len must be >= 1, got {ns.seq_len}")
        try:
            policy = Policy.coerce(ns.policy, inner_compiler="eager")
        except ValueError as exc:
            raise UsageError(f"--policy: {exc}") from exc
        model, args, kwargs = load_model(ns.model, ns.seq_len)
    except UsageError as exc:
        print(f"spion_fx.inspect: error: {exc}", file=sys.stderr)
        return 2
    if ns.patterns and policy.attention.method != "spion":
        print(f"spion_fx.inspect: error: --patterns needs a SPION policy, got {ns.policy!r}", file=sys.stderr)
        return 2
    records, breaks = inspect_model(model, args, kwargs, policy)
    patterns = probe_patterns(model, args, kwargs, policy) if ns.patterns else None
    rows = site_rows(records, patterns)
    if ns.format == "json":
        payload = {
            "model": ns.model, "policy": policy.name, "graphs": len(records), "graph_breaks": breaks,
            "sites": rows,
            "rewritten_graphs": [r.graph_module.code for r in records if r.graph_module is not None],
        }
        print(json.dumps(payload, indent=2, default=str))
    else:
        print_text(rows, records, breaks, show_graph=not ns.no_graph)
    return 0


if __name__ == "__main__":
    sys.exit(main())
