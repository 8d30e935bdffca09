"""One entry point for detection: attention sites and linear sites of a captured graph."""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from spion_fx.capture import CapturedGraph
from spion_fx.passes.detect_attention import find_attention_sites
from spion_fx.passes.detect_linear import find_linear_sites
from spion_fx.passes.sites import AttentionSite, LinearSite

Site = AttentionSite | LinearSite


def detect_sites(
    graph: fx.GraphModule | CapturedGraph, param_names: Mapping[str, str] | None = None
) -> tuple[list[AttentionSite], list[LinearSite]]:
    """Attention and linear sites of `graph`, each list in graph order.

    `graph` is a GraphModule with `param_names` (placeholder name -> qualified parameter name, as
    `capture.map_placeholders` builds it) or a `CapturedGraph`, which carries its own names.
    Detection only reads the graph.
    """
    if isinstance(graph, CapturedGraph):
        gm, names = graph.graph_module, param_names if param_names is not None else graph.param_names
    else:
        gm, names = graph, param_names or {}
    return find_attention_sites(gm, names), find_linear_sites(gm, names)
