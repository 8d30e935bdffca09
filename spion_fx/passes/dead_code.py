"""Dead-code elimination that keeps in-place writes.

`fx.Graph.eliminate_dead_code` treats a `call_method` as pure, so a Dynamo graph's in-place
updates whose result is unused — ``keys.index_copy_(2, cache_position, k)`` (HF's static
key-value cache), ``operator.setitem`` — are removed with the dead nodes. A model would then
generate from a cache that is never written. Both passes that remove nodes use this instead.
"""

from __future__ import annotations

import operator

import torch.fx as fx


def mutates(node: fx.Node) -> bool:
    """Whether a node writes into one of its inputs (or elsewhere): never dead."""
    if node.is_impure():
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function":
        if node.target is operator.setitem or "out" in node.kwargs:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("__")
    return False


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove nodes without users that neither return anything nor write anywhere."""
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.nodes):
            if node.op in ("placeholder", "output") or node.users or mutates(node):
                continue
            graph.erase_node(node)
            changed = True
