"""Linear-site detection (over the op view of `op_view.py`).

Linear sites (`find_linear_sites`):
  * `linear(x, W, b)`                      form "linear",  W stored [out, in]
  * `addmm(b, x, W)` (GPT-2 Conv1D)         form "addmm",   W stored [in, out] (weight_transposed)
  * `matmul(x, W)` / `x @ W` / `mm`         form "matmul",  W stored [in, out] (weight_transposed)
  * `matmul(x, W.t())` (also .T, .mT, transpose(0, 1))   form "matmul", W stored [out, in]
  * `embedding(ids, W)`                     form "embedding", role "embedding"
where W must be a parameter placeholder itself (not computed from one), so rewriting the site
means rewriting that parameter. Role "lm_head" — see `_is_lm_head`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from spion_fx.capture import owning_module
from spion_fx.passes.op_view import op_call, parameter_name, shape_of
from spion_fx.passes.sites import LinearSite

# Last path components that name an untied output projection onto the vocabulary (LLaMA's
# lm_head, GPT-NeoX's embed_out, fairseq's output_projection). zoo.expected_counts uses it too.
LM_HEAD_NAMES = frozenset({"lm_head", "embed_out", "output_projection"})

# ---------------------------------------------------------------------------------------------
# Linear matching

_WEIGHT_TRANSPOSES = {"t", "T", "mT"}


@dataclass(frozen=True)
class LinearMatch:
    form: str
    input: fx.Node
    weight: fx.Node
    weight_name: str
    bias: Any
    weight_transposed: bool


def _untransposed_weight(node: Any) -> fx.Node | None:
    """W for a 2-D `W.t()` / `W.T` / `W.mT` / `W.transpose(0, 1)` node."""
    call = op_call(node)
    if call is None:
        return None
    if call.op in _WEIGHT_TRANSPOSES:
        return call.get("input")
    if call.op == "transpose" and {call.get("dim0"), call.get("dim1")} in ({0, 1}, {-1, -2}):
        return call.get("input")
    return None


def match_linear(node: fx.Node, gm: fx.GraphModule, param_names: Mapping[str, str]) -> LinearMatch | None:
    """The linear/embedding form `node` computes with a parameter weight, or None."""
    call = op_call(node)
    if call is None:
        return None

    def named(weight: Any) -> str | None:
        return parameter_name(weight, gm, param_names)

    x, w = call.get("input"), call.get("weight", call.get("other"))
    if call.op in ("linear", "addmm") and len(shape_of(w, gm) or ()) != 2:
        return None
    if call.op == "linear" and named(w):
        return LinearMatch("linear", x, w, named(w), call.get("bias"), False)
    if call.op == "embedding" and named(w):
        return LinearMatch("embedding", x, w, named(w), None, False)
    if call.op == "addmm" and named(w) and call.get("beta", 1) == 1 and call.get("alpha", 1) == 1:
        return LinearMatch("addmm", x, w, named(w), call.get("bias"), True)
    if call.op in ("matmul", "mm") and isinstance(w, fx.Node):
        if named(w) and len(shape_of(w, gm) or ()) == 2:
            return LinearMatch("matmul", x, w, named(w), None, True)
        inner = _untransposed_weight(w)
        if inner is not None and named(inner) and len(shape_of(inner, gm) or ()) == 2:
            return LinearMatch("matmul", x, inner, named(inner), None, False)
    return None


def _is_lm_head(match: LinearMatch, module: str, embedding_weights: set[fx.Node]) -> bool:
    """The rule for role "lm_head" (zoo.expected_counts applies the same one to modules):

    * tied: the weight placeholder is also an embedding weight in this graph (GPT-2, BERT-MLM,
      T5 — Dynamo gives a tied parameter a single placeholder), or
    * named: the owning module's last path component is in LM_HEAD_NAMES (untied heads:
      LLaMA's `lm_head`, GPT-NeoX's `embed_out`), which also covers a tied head whose embedding
      call landed in another graph after a graph break.

    Shape alone (out_features == vocab) is not used: tiny configs collide (vocab 128 = 4 * 32).
    """
    return match.weight in embedding_weights or module.rsplit(".", 1)[-1] in LM_HEAD_NAMES


def find_linear_sites(gm: fx.GraphModule, param_names: Mapping[str, str]) -> list[LinearSite]:
    """Every linear / Conv1D / matmul-with-parameter / embedding site of `gm`, in graph order."""
    matches = [(node, m) for node in gm.graph.nodes if (m := match_linear(node, gm, param_names))]
    embedding_weights = {m.weight for _, m in matches if m.form == "embedding"}
    sites = []
    for node, m in matches:
        module = owning_module(node) or ""
        if m.form == "embedding":
            role = "embedding"
        else:
            role = "lm_head" if _is_lm_head(m, module, embedding_weights) else "linear"
        sites.append(
            LinearSite(
                name=module, form=m.form, output=node, input=m.input, weight=m.weight,
                weight_name=m.weight_name, weight_shape=shape_of(m.weight, gm) or (),
                bias=m.bias if isinstance(m.bias, fx.Node) else None,
                weight_transposed=m.weight_transposed, role=role,
            )
        )
    return sites
