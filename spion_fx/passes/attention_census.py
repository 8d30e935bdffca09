"""What a graph holds that looks like attention but is not a site (for the "no site" warning).

Detection is conservative: anything it cannot read exactly is not a site. When a policy asks for
attention sparsity and a model yields no site at all, the user needs to know what was seen
instead, so they can change the call (need_weights=False, fast path off) or report the form.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from spion_fx.passes.op_view import op_call


def _aten_names(*packets: Any) -> dict[Any, str]:
    names = {}
    for packet in packets:
        label = f"aten.{packet._qualified_op_name.split('::')[-1]}"
        names[packet] = label
        for overload in packet.overloads():
            names[getattr(packet, overload)] = label
    return names


# Ops that compute attention as one call detection cannot see into.
OPAQUE_ATTENTION_TARGETS: dict[Any, str] = {
    F.multi_head_attention_forward: "F.multi_head_attention_forward",
    torch._native_multi_head_attention: "torch._native_multi_head_attention "
    "(nn.MultiheadAttention's fused eval path)",
    torch._transformer_encoder_layer_fwd: "torch._transformer_encoder_layer_fwd "
    "(nn.TransformerEncoderLayer's fused eval path: torch.backends.mha.set_fastpath_enabled(False) "
    "avoids it)",
    **_aten_names(
        torch.ops.aten._native_multi_head_attention, torch.ops.aten._transformer_encoder_layer_fwd,
        torch.ops.aten._scaled_dot_product_flash_attention,
        torch.ops.aten._scaled_dot_product_efficient_attention,
        torch.ops.aten._scaled_dot_product_cudnn_attention,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
    ),
}


def _target_label(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    try:
        label = OPAQUE_ATTENTION_TARGETS.get(node.target)
    except TypeError:  # unhashable target
        return None
    if label is None and "flex_attention" in getattr(node.target, "__name__", ""):
        return "flex_attention (not supported)"
    return label


def opaque_attention_calls(gm: fx.GraphModule) -> list[str]:
    """Labels of the opaque attention calls in `gm`, one per call."""
    return [label for node in gm.graph.nodes if (label := _target_label(node)) is not None]


def attention_like_ops(gm: fx.GraphModule, site_nodes: set[fx.Node] | None = None) -> list[str]:
    """One line per kind of attention-like op in `gm` that is not part of a site, with counts.

    Opaque attention calls are named; softmax and einsum calls outside every site are counted
    (an attention form detection does not know, or one it refused as not exactly readable).
    """
    site_nodes = site_nodes or set()
    seen: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node in site_nodes:
            continue
        label = _target_label(node)
        if label is None:
            call = op_call(node)
            if call is not None and call.op == "softmax":
                label = "softmax outside any attention form detection reads exactly"
            elif call is not None and call.op == "einsum":
                label = f"einsum {call.get('equation')!r} (not an attention form detection reads)"
        if label is not None:
            seen[label] += 1
    return [f"{count}x {label}" for label, count in seen.items()]
