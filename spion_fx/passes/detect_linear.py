"""Linear-site detection, and the spelling-independent view of op nodes both detectors share.

Dynamo graphs spell one operation many ways: `x @ w` is `operator.matmul`, `torch.matmul(x, w)`
is `torch.matmul`, `x.matmul(w)` is a `call_method`, and an AOT graph says `aten.matmul.default`;
argument positions differ between spellings too (`F.softmax`'s third positional is `_stacklevel`,
`torch.embedding` takes the weight first). `op_call(node)` folds every spelling we know into one
`OpCall(op, params)` with canonical parameter names, so matchers are written once per operation.
A spelling we do not know yields None, which every matcher treats as "not this op": unknown
spellings are never guessed at (in-place variants such as `masked_fill_` deliberately included).

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

import builtins
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from spion_fx.capture import owning_module
from spion_fx.passes.sites import LinearSite

# Last path components that name an untied output projection onto the vocabulary (LLaMA's
# lm_head, GPT-NeoX's embed_out, fairseq's output_projection). zoo.expected_counts uses it too.
LM_HEAD_NAMES = frozenset({"lm_head", "embed_out", "output_projection"})

# ---------------------------------------------------------------------------------------------
# Spelling-independent op view

VARARGS = "*dims"  # marks a method whose trailing positionals form one tuple (view, permute, ...)


@dataclass(frozen=True)
class Spelling:
    op: str
    params: tuple[str, ...]  # canonical names of the positional parameters, in order
    kw_alias: tuple[tuple[str, str], ...] = ()  # spelling's keyword name -> canonical name


@dataclass(frozen=True)
class OpCall:
    op: str
    node: fx.Node
    params: Mapping[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)


def _s(op: str, *params: str, **kw_alias: str) -> Spelling:
    return Spelling(op, params, tuple(kw_alias.items()))


_aten = torch.ops.aten
_MATMUL = _s("matmul", "input", "other")
_BMM = _s("bmm", "input", "other", mat2="other")
_MM = _s("mm", "input", "other", mat2="other")
_BADDBMM = _s("baddbmm", "bias", "input", "other", "beta", "alpha",
              input="bias", self="bias", batch1="input", batch2="other")
_ADDMM = _s("addmm", "bias", "input", "other", "beta", "alpha",
            input="bias", self="bias", mat1="input", mat2="other")
_MUL = _s("mul", "input", "other")
_DIV = _s("div", "input", "other")
_ADD = _s("add", "input", "other")
_TORCH_SOFTMAX = _s("softmax", "input", "dim", "dtype")
_ATEN_SOFTMAX = _s("softmax", "input", "dim", "half_to_float", self="input")
_F_DROPOUT = _s("dropout", "input", "p", "training", "inplace")
_TORCH_DROPOUT = _s("dropout", "input", "p", "training", train="training")
_WHERE = _s("where", "condition", "input", "other", self="input")
_MASKED_FILL = _s("masked_fill", "input", "mask", "value", self="input")
_TRANSPOSE = _s("transpose", "input", "dim0", "dim1", self="input")
_LINEAR = _s("linear", "input", "weight", "bias")
_SDPA = _s("sdpa", "query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
           "enable_gqa")

FUNCTION_SPELLINGS: dict[Any, Spelling] = {
    torch.matmul: _MATMUL, operator.matmul: _MATMUL, _aten.matmul.default: _MATMUL,
    torch.bmm: _BMM, _aten.bmm.default: _BMM,
    torch.mm: _MM, _aten.mm.default: _MM,
    torch.baddbmm: _BADDBMM, _aten.baddbmm.default: _BADDBMM,
    torch.addmm: _ADDMM, _aten.addmm.default: _ADDMM,
    operator.mul: _MUL, torch.mul: _MUL, _aten.mul.Tensor: _MUL,
    operator.truediv: _DIV, torch.div: _DIV, torch.true_divide: _DIV, _aten.div.Tensor: _DIV,
    operator.add: _ADD, torch.add: _ADD, _aten.add.Tensor: _ADD,
    torch.softmax: _TORCH_SOFTMAX, torch.special.softmax: _TORCH_SOFTMAX,
    F.softmax: _s("softmax", "input", "dim", "_stacklevel", "dtype"),
    _aten.softmax.int: _s("softmax", "input", "dim", "dtype", self="input"),
    _aten._softmax.default: _ATEN_SOFTMAX,
    F.dropout: _F_DROPOUT, torch.dropout: _TORCH_DROPOUT, _aten.dropout.default: _TORCH_DROPOUT,
    torch.where: _WHERE, _aten.where.self: _WHERE,
    torch.masked_fill: _MASKED_FILL, _aten.masked_fill.Scalar: _MASKED_FILL,
    _aten.masked_fill.Tensor: _MASKED_FILL,
    torch.transpose: _TRANSPOSE, _aten.transpose.int: _TRANSPOSE,
    torch.permute: _s("permute", "input", "dims"), _aten.permute.default: _s("permute", "input", "dims"),
    torch.t: _s("t", "input"), _aten.t.default: _s("t", "input", self="input"),
    F.linear: _LINEAR, _aten.linear.default: _LINEAR,
    F.embedding: _s("embedding", "input", "weight", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse"),
    torch.embedding: _s("embedding", "weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),
    _aten.embedding.default: _s("embedding", "weight", "input", "padding_idx", "scale_grad_by_freq",
                                "sparse", indices="input"),
    F.scaled_dot_product_attention: _SDPA,
    _aten.scaled_dot_product_attention.default: _SDPA,
    torch.repeat_interleave: _s("repeat_interleave", "input", "repeats", "dim"),
    operator.getitem: _s("getitem", "input", "index"),
}

# Dynamo keeps `torch.ops.aten.x(...)` as the overload packet; it reads like the default overload.
FUNCTION_SPELLINGS.update({
    key.overloadpacket: spelling for key, spelling in list(FUNCTION_SPELLINGS.items())
    if isinstance(key, torch._ops.OpOverload) and key.overloadpacket not in FUNCTION_SPELLINGS
})

# call_method spellings; "input" is the tensor the method is called on.
METHOD_SPELLINGS: dict[str, Spelling] = {
    "matmul": _MATMUL, "bmm": _BMM, "mm": _MM,
    "baddbmm": _s("baddbmm", "bias", "input", "other", "beta", "alpha",
                  batch1="input", batch2="other"),
    "mul": _MUL, "div": _DIV, "add": _ADD,
    "softmax": _TORCH_SOFTMAX,
    "masked_fill": _MASKED_FILL,
    "transpose": _TRANSPOSE,
    "permute": _s("permute", "input", VARARGS),
    "t": _s("t", "input"),
    "view": _s("view", "input", VARARGS), "reshape": _s("reshape", "input", VARARGS),
    "expand": _s("expand", "input", VARARGS),
    "contiguous": _s("contiguous", "input"),
    "repeat_interleave": _s("repeat_interleave", "input", "repeats", "dim"),
    # dtype/device casts: value-preserving for attention purposes
    **{name: _s("cast", "input", VARARGS) for name in
       ("to", "float", "half", "bfloat16", "double", "type", "type_as")},
}

# getattr(x, "mT") etc.: Dynamo records tensor properties as builtins.getattr calls.
ATTRIBUTE_OPS = {"mT": "mT", "T": "T"}


def op_call(node: Any) -> OpCall | None:
    """The canonical view of an op node, or None for anything we do not know how to read."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        spelling = METHOD_SPELLINGS.get(node.target)
    elif node.op == "call_function" and node.target is builtins.getattr:
        attr = node.args[1] if len(node.args) == 2 else None
        return OpCall(ATTRIBUTE_OPS[attr], node, {"input": node.args[0]}) if attr in ATTRIBUTE_OPS else None
    elif node.op == "call_function":
        try:
            spelling = FUNCTION_SPELLINGS.get(node.target)
        except TypeError:  # unhashable target
            spelling = None
    else:
        spelling = None
    if spelling is None:
        return None
    params = _bind(spelling, node.args, node.kwargs)
    return None if params is None else OpCall(spelling.op, node, params)


def _bind(spelling: Spelling, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    names = spelling.params
    params: dict[str, Any] = {}
    if names and names[-1] == VARARGS:
        fixed = len(names) - 1
        rest = args[fixed:]
        params["dims"] = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)
        args, names = args[:fixed], names[:fixed]
    if len(args) > len(names):
        return None  # more positionals than we understand: do not guess
    params.update(zip(names, args))
    alias = dict(spelling.kw_alias)
    for key, value in kwargs.items():
        params[alias.get(key, key)] = value
    return params


def example_value(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


Dim = int | str  # a static size, or a symbolic one as its sympy expression text ("s0", "4*s1")


def shape_of(node: Any, gm: fx.GraphModule | None = None) -> tuple[Dim, ...] | None:
    """Shape from Dynamo's fake example value (or, for get_attr, the attribute itself).

    Symbolic sizes (dynamic shapes) are kept as expression text, never forced to an int: int()
    on a SymInt would specialize the graph (a guard), and two different symbols with equal hints
    must not compare equal. Equal text means provably equal; anything else compares unequal.
    """
    value = example_value(node)
    if value is None and gm is not None and isinstance(node, fx.Node) and node.op == "get_attr":
        value = _get_attr(gm, node)
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tuple(_dim(s) for s in shape)


def _dim(size: Any) -> Dim:
    if isinstance(size, torch.SymInt):
        concrete = size.node.maybe_as_int()
        return int(concrete) if concrete is not None else str(size.node.expr)
    return int(size)


def _get_attr(gm: fx.GraphModule, node: fx.Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
    return obj


# ---------------------------------------------------------------------------------------------
# Parameters


def parameter_name(node: Any, gm: fx.GraphModule, param_names: Mapping[str, str]) -> str | None:
    """Qualified name of the parameter `node` *is* (not one computed from it), else None.

    Dynamo lifts parameters and buffers to placeholders; capture.py maps both to names, so the
    fake example value is checked to be an nn.Parameter (buffers such as rotary inv_freq are not
    weights). symbolic_trace graphs hold parameters as get_attr nodes instead.
    """
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        name = param_names.get(node.name)
        value = example_value(node)
        if name is None or (value is not None and not isinstance(value, nn.Parameter)):
            return None
        return name
    if node.op == "get_attr":
        return str(node.target) if isinstance(_get_attr(gm, node), nn.Parameter) else None
    return None


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
