"""The spelling-independent view of op nodes that every pass reads graphs through.

Dynamo graphs spell one operation many ways: `x @ w` is `operator.matmul`, `torch.matmul(x, w)`
is `torch.matmul`, `x.matmul(w)` is a `call_method`, and an AOT graph says `aten.matmul.default`;
argument positions differ between spellings too (`F.softmax`'s third positional is `_stacklevel`,
`torch.embedding` takes the weight first). `op_call(node)` folds every spelling we know into one
`OpCall(op, params)` with canonical parameter names, so matchers are written once per operation.
A spelling we do not know yields None, which every matcher treats as "not this op": unknown
spellings are never guessed at (in-place variants such as `masked_fill_` deliberately included).

Every spelling is declared in the tables below, so what a pass sees does not depend on which
other passes were imported first. `shape_of` and `parameter_name` read the other two facts
matchers need: a node's (possibly symbolic) shape, and the parameter a node *is*.
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
    # einsum(equation, a, b) with the operands as positionals (the list form is not read)
    torch.einsum: _s("einsum", "equation", "input", "other"),
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
