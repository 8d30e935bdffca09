"""Replace detected sites with `call_module` nodes to runtime modules.

Pure graph surgery, in the manner of torch.fx.passes: the caller supplies a factory that turns a
site into an nn.Module (or None to leave the site alone); this pass adds the module to the
GraphModule, inserts the call where the site's output was, reroutes its users and removes the
nodes that became dead. It never runs a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from spion_fx.passes.dead_code import eliminate_dead_code
from spion_fx.passes.sites import AttentionSite, LinearSite

Site = AttentionSite | LinearSite


@dataclass
class Rewritten:
    site: Site
    target: str  # submodule path inside the GraphModule
    node: fx.Node  # the new call_module node
    module: nn.Module


def rewrite_sites(
    gm: fx.GraphModule,
    sites: list[Site],
    make_module: Callable[[Site], nn.Module | None],
    *,
    prefix: str = "spion",
) -> list[Rewritten]:
    done: list[Rewritten] = []
    for index, site in enumerate(sites):
        module = make_module(site)
        if module is None:
            continue
        target = f"{prefix}_{site.kind}_{index}"
        gm.add_submodule(target, module)
        with gm.graph.inserting_before(site.output):
            args, kwargs = _call_arguments(gm.graph, site)
            node = gm.graph.call_module(target, args, kwargs)
        node.meta.update(site.output.meta)
        node.meta["spion_site"] = site.name
        site.output.replace_all_uses_with(node)
        done.append(Rewritten(site, target, node, module))
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return done


def _call_arguments(graph: fx.Graph, site: Site) -> tuple[tuple, dict]:
    if isinstance(site, AttentionSite):
        kwargs = {}
        if isinstance(site.scale, fx.Node):
            kwargs["scale"] = site.scale
        mask = site.mask
        # Further additive terms (T5: position bias + mask) fold into one additive mask, in the
        # order the original chain added them.
        for extra in getattr(site, "extra_masks", None) or ():
            mask = extra if mask is None else graph.call_function(torch.add, (mask, extra))
        return (site.q, site.k, site.v, mask), kwargs
    return (site.input, site.weight, site.bias), {}


def constant_value(node: fx.Node | float | None) -> float | None:
    """Evaluate a scalar node built only from constants (e.g. ``torch.full([], 8.0)``)."""
    if node is None or isinstance(node, (int, float)):
        return node
    if node.op != "call_function":
        return None
    if any(isinstance(a, fx.Node) for a in (*node.args, *node.kwargs.values())):
        inner = [constant_value(a) if isinstance(a, fx.Node) else a for a in node.args]
        if any(isinstance(a, fx.Node) for a in node.args) and None in inner:
            return None
        args = inner
    else:
        args = list(node.args)
    try:
        value = node.target(*args, **node.kwargs)
    except Exception:  # noqa: BLE001 - anything that does not evaluate is simply not constant
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None
