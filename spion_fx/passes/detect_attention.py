"""Attention-site detection: SDPA calls and the eager softmax(q kᵀ) v chain.

SDPA (`torch._C._nn.scaled_dot_product_attention`, which *is* F.scaled_dot_product_attention,
or `aten.scaled_dot_product_attention`) is one node; its arguments are the site.

Eager attention is a chain of single-input steps from the scores matmul to the output matmul.
It is described declaratively, like a regular expression over that chain (in the spirit of
torch/_inductor/pattern_matcher.py, but over a path rather than a tree), and read backwards from
each candidate output node:

    output   matmul | bmm (probs, v) | einsum "bhlm,bhmd->bhld"
    cast                                               {0,2}
    dropout  dropout                                   ?
    cast     to | float | type | type_as ...           {0,2}
    softmax  softmax over the last dim
    cast                                               {0,2}
    mask     add (+m) | masked_fill (m, c) | where     {0,3}
    scale    mul (·c | ·t) | div (/c | /t)             ?
    scores   matmul | bmm (q, kᵀ) | baddbmm (m, q, kᵀ, beta, alpha) | einsum "bhld,bhmd->bhlm"

Each `Step` names the ops it accepts, which operand(s) may carry the chain (both, for
commutative add/mul) and a `read` function that returns the step's side facts (v, mask, scale…)
or None to refuse. `match_chain` backtracks over the quantifiers and yields every complete match;
`_eager_draft` then validates the match as a whole (shapes, dims, dtypes, independence of the side
operands). Conservatism is structural:
  * every interior node of the chain must feed only the next step, so nothing else observes the
    scores/probabilities the rewrite would remove (in-place ops such as masked_fill_ therefore
    never match either: they leave the pre-mask node with a second user);
  * a candidate with more than one valid reading, or whose nodes overlap another site's, is
    dropped: a site we return is exact, anything doubtful stays dense.

What a site records beyond the obvious:
  * eager `scale` is what the chain applies: 1.0 when it has no scale step (q may have been
    scaled before the matmul — then `q` is the scaled node), 1/c for a division by a constant c;
    None (SDPA's default 1/sqrt(D)) only for SDPA calls without `scale`.
  * k/v that reached the attention through repeat_kv / repeat_interleave are recorded
    un-repeated with enable_gqa=True (the call (q, k, v, enable_gqa=True) is the same function).
  * several additive terms (T5: position bias, then the mask) give `mask` + `extra_masks`.
  * cross_attention: see `_is_cross`; name: see `_unique_names`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from spion_fx.capture import owning_module
from spion_fx.passes.detect_linear import match_linear
from spion_fx.passes.op_view import Dim, OpCall, example_value, op_call, shape_of
from spion_fx.passes.sites import AttentionSite, MaskKind

Facts = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# The chain engine


@dataclass(frozen=True)
class Step:
    name: str
    ops: frozenset[str]
    read: Callable[[OpCall, str], Facts | None]  # (call, chain operand name) -> side facts
    chain: tuple[str, ...] = ("input",)  # operands that may carry the chain, tried in order
    min: int = 1
    max: int = 1  # 0 for the terminal step: it has no chain input


@dataclass(frozen=True)
class StepMatch:
    step: Step
    call: OpCall
    facts: Facts


def match_chain(node: Any, steps: tuple[Step, ...]) -> Iterator[list[StepMatch]]:
    """Every way `node` (the outermost step) reads as `steps`, outermost first."""
    yield from _match_from(node, steps, 0, 0, None)


def _match_from(
    node: Any, steps: tuple[Step, ...], index: int, used: int, consumer: fx.Node | None
) -> Iterator[list[StepMatch]]:
    if index == len(steps):
        return
    step = steps[index]
    if used >= step.min:  # this step may stop here: try the next one on the same node
        yield from _match_from(node, steps, index + 1, 0, consumer)
    if used >= max(step.max, 1):
        return
    call = op_call(node)
    if call is None or call.op not in step.ops:
        return
    if consumer is not None and not _feeds_only(node, consumer):
        return
    terminal = step.max == 0
    for operand in step.chain:
        facts = step.read(call, operand)
        if facts is None:
            continue
        here = StepMatch(step, call, facts)
        if terminal:
            if index == len(steps) - 1:
                yield [here]
            continue
        for rest in _match_from(call.get(operand), steps, index, used + 1, node):
            yield [here, *rest]


def _feeds_only(node: fx.Node, consumer: fx.Node) -> bool:
    """`node` is used by `consumer` alone (type_as(·, node) only reads its dtype, so it is allowed)."""
    for user in node.users:
        if user is consumer:
            continue
        call = op_call(user)
        if not (user.op == "call_method" and user.target == "type_as" and call and call.get("input") is not node):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Step readers: side facts of one step, or None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar_tensor(value: Any) -> bool:
    shape = shape_of(value)
    return shape is not None and all(s == 1 for s in shape)


def _other(call: OpCall, chain: str) -> Any:
    return call.get("other" if chain == "input" else "input")


def _read_output(call: OpCall, chain: str) -> Facts | None:
    if call.op == "einsum":
        return _read_einsum_output(call, chain)
    v = call.get("other")
    return {"v": v} if isinstance(v, fx.Node) and chain == "input" else None


def _read_dropout(call: OpCall, chain: str) -> Facts | None:
    p, training = call.get("p", 0.5), call.get("training", True)
    if not _is_number(p) or not isinstance(training, bool) or call.get("inplace", False):
        return None
    return {"dropout_p": float(p), "dropout_training": training}


def _read_cast(call: OpCall, chain: str) -> Facts | None:
    return {}


def _read_softmax(call: OpCall, chain: str) -> Facts | None:
    dim, dtype = call.get("dim"), call.get("dtype")
    if not isinstance(dim, int):
        return None
    return {"softmax_dim": dim, "softmax_dtype": dtype if isinstance(dtype, torch.dtype) else None}


def _read_mask(call: OpCall, chain: str) -> Facts | None:
    if call.op == "add":
        mask = _other(call, chain)
        if not isinstance(mask, fx.Node) or call.get("alpha", 1) != 1:
            return None
        return {"mask": ("additive", mask, None)}
    if call.op == "masked_fill" and chain == "input":
        mask, fill = call.get("mask"), call.get("value")
        return {"mask": ("bool_fill", mask, float(fill))} if _is_number(fill) else None
    if call.op == "where":
        # where(keep, scores, fill) keeps where True; where(masked, fill, scores) fills where True.
        for side, fill_side, kind in (("input", "other", "bool_keep"), ("other", "input", "bool_fill")):
            fill = call.get(fill_side)
            if chain == side and _is_number(fill):
                return {"mask": (kind, call.get("condition"), float(fill))}
    return None


def _read_scale(call: OpCall, chain: str) -> Facts | None:
    factor = _other(call, chain)
    if call.op == "div" and (chain != "input" or call.get("rounding_mode") is not None):
        return None
    if _is_number(factor):
        if call.op == "div":
            return {"scale": 1.0 / factor} if factor != 0 else None
        return {"scale": float(factor)}
    if isinstance(factor, fx.Node) and _is_scalar_tensor(factor):
        return {"scale": factor, "scale_is_divisor": call.op == "div"}
    return None


def _read_scores(call: OpCall, chain: str) -> Facts | None:
    if call.op == "einsum":
        return _read_einsum_scores(call)
    q, k_t = call.get("input"), call.get("other")
    k = _untransposed_key(k_t)
    if not isinstance(q, fx.Node) or k is None:
        return None
    facts: Facts = {"q": q, "k": k, "k_t": k_t, "scores_op": call.op}
    if call.op == "baddbmm":
        beta, alpha = call.get("beta", 1), call.get("alpha", 1)
        if not (_is_number(beta) and _is_number(alpha)) or beta not in (0, 1):
            return None
        facts["alpha"] = float(alpha)
        bias = call.get("bias")
        if beta == 1:  # beta=0 ignores the (usually torch.empty) input entirely
            if not isinstance(bias, fx.Node):
                return None
            facts["bias"] = bias
    return facts


def _untransposed_key(k_t: Any) -> fx.Node | None:
    """k for a node that is k with its last two dims swapped (transpose / permute / mT)."""
    call = op_call(k_t)
    if call is None:
        return None
    k = call.get("input")
    rank = len(shape_of(k) or ())
    if not isinstance(k, fx.Node) or rank < 2:
        return None
    if call.op == "mT" or (call.op == "T" and rank == 2):
        return k
    if call.op == "transpose":
        dims = {_norm_dim(call.get("dim0"), rank), _norm_dim(call.get("dim1"), rank)}
        return k if dims == {rank - 2, rank - 1} else None
    if call.op == "permute":
        perm = [_norm_dim(d, rank) for d in call.get("dims", ())]
        swapped = [*range(rank - 2), rank - 1, rank - 2]
        return k if perm == swapped else None
    return None


def _norm_dim(dim: Any, rank: int) -> int | None:
    return dim % rank if isinstance(dim, int) and -rank <= dim < rank else None


# ---------------------------------------------------------------------------------------------
# einsum forms: a batched matmul spelled by subscripts. Batch subscripts ("b", "bh", "...") must
# be the same sequence in both operands and the output; which operand is q (or the probs) is
# read from the output's subscripts, so operand order and letter choice do not matter.
#   scores   "bhld,bhmd->bhlm" (q, k)  |  "bhld,bhdm->bhlm" (q, kᵀ), kᵀ a transpose of k
#   output   "bhlm,bhmd->bhld" (probs, v)


def _subscripts(term: str) -> list[str] | None:
    """Subscript tokens of one einsum term ("..." is one token), or None if a letter repeats."""
    tokens = ["..."] if term.startswith("...") else []
    rest = term[3:] if tokens else term
    if "." in rest or not rest.isalpha() or len(set(rest)) != len(rest):
        return None
    return tokens + list(rest)


def _einsum_terms(call: OpCall) -> tuple[list[str], list[str], list[str]] | None:
    """(first operand, second operand, output) subscripts of a two-operand einsum."""
    equation, a, b = call.get("equation"), call.get("input"), call.get("other")
    if not (isinstance(equation, str) and isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    equation = equation.replace(" ", "")
    if equation.count("->") != 1 or equation.count(",") != 1:
        return None
    inputs, output = equation.split("->")
    terms = [_subscripts(t) for t in (*inputs.split(","), output)]
    if any(t is None or len(t) < 2 for t in terms):
        return None
    return terms[0], terms[1], terms[2]


def _batched_product(left: list[str], right: list[str], out: list[str]) -> bool:
    """out[..., i, j] = sum_c left[..., i, c] * right[..., c, j]: left @ right with shared batch."""
    batch, (i, c), (c2, j) = left[:-2], left[-2:], right[-2:]
    return (right[:-2] == batch and out == [*batch, i, j] and c == c2
            and len({i, j, c}) == 3 and not {i, j, c} & set(batch))


def _read_einsum_scores(call: OpCall) -> Facts | None:
    terms = _einsum_terms(call)
    if terms is None:
        return None
    operands = (call.get("input"), call.get("other"))
    for qi in (0, 1):
        q, other = operands[qi], operands[1 - qi]
        q_sub, k_sub, out = terms[qi], terms[1 - qi], terms[2]
        if len(k_sub) < 2:
            continue
        if _batched_product(q_sub, [*k_sub[:-2], k_sub[-1], k_sub[-2]], out):  # q @ kᵀ, k given
            return {"q": q, "k": other, "k_t": None, "scores_op": "einsum"}
        if _batched_product(q_sub, k_sub, out):  # q @ kᵀ, kᵀ given: k is what it transposes
            k = _untransposed_key(other)
            if k is not None:
                return {"q": q, "k": k, "k_t": other, "scores_op": "einsum"}
    return None


def _read_einsum_output(call: OpCall, chain: str) -> Facts | None:
    terms = _einsum_terms(call)
    if terms is None:
        return None
    pi = 0 if chain == "input" else 1
    if not _batched_product(terms[pi], terms[1 - pi], terms[2]):
        return None
    return {"v": call.get("other" if chain == "input" else "input")}


_CASTS = frozenset({"cast"})

EAGER_ATTENTION: tuple[Step, ...] = (
    Step("output", frozenset({"matmul", "bmm", "einsum"}), _read_output, chain=("input", "other")),
    Step("cast_out", _CASTS, _read_cast, min=0, max=2),
    Step("dropout", frozenset({"dropout"}), _read_dropout, min=0),
    Step("cast_after", _CASTS, _read_cast, min=0, max=2),
    Step("softmax", frozenset({"softmax"}), _read_softmax),
    Step("cast_before", _CASTS, _read_cast, min=0, max=2),
    Step("mask", frozenset({"add", "masked_fill", "where"}), _read_mask,
         chain=("input", "other"), min=0, max=3),
    Step("scale", frozenset({"mul", "div"}), _read_scale, chain=("input", "other"), min=0),
    Step("scores", frozenset({"matmul", "bmm", "baddbmm", "einsum"}), _read_scores, max=0),
)

# ---------------------------------------------------------------------------------------------
# Building a site from a whole match


@dataclass
class _Draft:
    """Site fields gathered before naming (names need every site of the graph)."""

    fields: dict[str, Any]
    output: fx.Node
    nodes: list[fx.Node]


def _facts(match: list[StepMatch]) -> Facts:
    facts: Facts = {"masks": []}
    for part in match:
        masks = part.facts.get("mask")
        if masks is not None:
            facts["masks"].insert(0, masks)  # match is outermost first; masks apply innermost first
        facts.update({k: v for k, v in part.facts.items() if k != "mask"})
    return facts


def _eager_draft(match: list[StepMatch]) -> _Draft | None:
    f = _facts(match)
    q, k, v, out = f["q"], f["k"], f["v"], match[0].call.node
    scores = match[-1].call.node
    shapes = _attention_shapes(q, k, v, scores, out)
    if shapes is None or (f["scores_op"] in ("bmm", "baddbmm") and shapes["rank"] != 3):
        return None
    rank = shapes["rank"]
    if _norm_dim(f["softmax_dim"], rank) != rank - 1:
        return None
    # Side operands must come from outside the chain, or the rewrite would change their value.
    chain_nodes = [m.call.node for m in match]
    side = [m for _, m, _ in f["masks"]] + [v, f.get("bias"), f.get("scale")]
    if any(_depends_on(n, scores) for n in side if isinstance(n, fx.Node)):
        return None
    masks = ([("additive", f["bias"], None)] if "bias" in f else []) + f["masks"]
    mask_fields = _mask_fields(masks, tuple(shape_of(scores)))
    scale_fields = _scale_fields(f)
    if mask_fields is None or scale_fields is None:
        return None
    if "bias" in f and "scale" in f:
        return None  # baddbmm's bias would be scaled too: not softmax(q kᵀ·s + m)
    fields = {
        "form": "eager", "q": q, "k": k, "v": v, **shapes, **mask_fields, **scale_fields,
        "is_causal": False,
        "dropout_p": f.get("dropout_p", 0.0),
        "softmax_dtype": f["softmax_dtype"],
        "dropout_train_only": True,  # F.dropout(training=...) — Dynamo guards on the flag
    }
    k_t = f["k_t"]
    nodes = ([k_t] if k_t is not None and _feeds_only(k_t, scores) else []) + chain_nodes[::-1]
    return _Draft(fields, out, nodes)


def _mask_fields(masks: list[tuple[MaskKind, fx.Node, float | None]], scores_shape: tuple) -> Facts | None:
    for kind, mask, _ in masks:
        if not _mask_ok(kind, mask, scores_shape):
            return None
    if not masks:
        return {"mask": None, "mask_kind": "none", "mask_fill_value": None, "extra_masks": []}
    if len(masks) > 1 and any(kind != "additive" for kind, _, _ in masks):
        return None  # mixed bool/additive chains have no single-mask reading: stay dense
    kind, mask, fill = masks[0]
    return {"mask": mask, "mask_kind": kind, "mask_fill_value": fill,
            "extra_masks": [m for _, m, _ in masks[1:]]}


def _mask_ok(kind: str, mask: Any, scores_shape: tuple) -> bool:
    value, shape = example_value(mask), shape_of(mask)
    if value is None or shape is None:
        return False
    if (value.dtype == torch.bool) != (kind != "additive"):
        return False
    return _broadcasts_to(shape, scores_shape)


def _broadcasts_to(shape: tuple[Dim, ...], target: tuple[Dim, ...]) -> bool:
    """Whether `shape` broadcasts to `target` without growing it (works on symbolic dims)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(shape[::-1], target[::-1]))


def _scale_fields(f: Facts) -> Facts | None:
    scale = f.get("scale", 1.0)
    alpha = f.get("alpha", 1.0)
    if alpha != 1.0:
        if isinstance(scale, fx.Node):
            return None
        scale = scale * alpha
    return {"scale": scale, "scale_is_divisor": bool(f.get("scale_is_divisor", False))}


def _sdpa_draft(call: OpCall) -> _Draft | None:
    q, k, v, mask = (call.get(n) for n in ("query", "key", "value", "attn_mask"))
    is_causal, dropout_p = call.get("is_causal", False), call.get("dropout_p", 0.0)
    scale, enable_gqa = call.get("scale"), call.get("enable_gqa", False)
    if not (isinstance(is_causal, bool) and isinstance(enable_gqa, bool) and _is_number(dropout_p)):
        return None
    if not (scale is None or _is_number(scale) or isinstance(scale, fx.Node)):
        return None
    shapes = _attention_shapes(q, k, v, None, call.node, gqa=enable_gqa)
    if shapes is None:
        return None
    if mask is None:
        mask_fields = {"mask": None, "mask_kind": "none", "mask_fill_value": None, "extra_masks": []}
    else:
        value = example_value(mask)
        if value is None or not isinstance(mask, fx.Node):
            return None
        mask_fields = {"mask": mask, "mask_kind": "bool_keep" if value.dtype == torch.bool else "additive",
                       "mask_fill_value": None, "extra_masks": []}
    fields = {
        "form": "sdpa", "q": q, "k": k, "v": v, **shapes, **mask_fields,
        "is_causal": is_causal, "scale": float(scale) if _is_number(scale) else scale,
        "scale_is_divisor": False, "dropout_p": float(dropout_p),
        "dropout_train_only": False,  # SDPA applies dropout_p whenever it is called
        "enable_gqa": enable_gqa,
    }
    return _Draft(fields, call.node, [call.node])


# ---------------------------------------------------------------------------------------------
# Shapes, heads, GQA


def _attention_shapes(
    q: Any, k: Any, v: Any, scores: fx.Node | None, out: fx.Node, *, gqa: bool = False
) -> Facts | None:
    """Check q [*b, L, D], k [*b, S, D], v [*b, S, Dv] (→ out [*b, L, Dv]) and read the sizes."""
    if not all(isinstance(n, fx.Node) for n in (q, k, v)):
        return None
    qs, ks, vs, os_ = shape_of(q), shape_of(k), shape_of(v), shape_of(out)
    if None in (qs, ks, vs, os_) or not (len(qs) == len(ks) == len(vs) in (3, 4)):
        return None
    rank = len(qs)
    (*qb, L, D), (*kb, S, Dk), (*vb, Sv, Dv) = qs, ks, vs
    # Keys and values of a dynamic-length cache get sizes Dynamo cannot prove equal (separate
    # symbols for the cached keys and values): attention itself requires them equal at run time.
    if Dk != D or not _may_equal(Sv, S) or kb != vb or tuple(os_) != (*qb, L, Dv):
        return None
    if kb != qb:
        # Only GQA may differ, and only in the head dim: H_q a multiple of H_kv.
        heads = (qb[-1], kb[-1]) if rank == 4 else (None, None)
        if not (gqa and kb[0] == qb[0] and _ints(*heads) and heads[0] % heads[1] == 0):
            return None
    if scores is not None and shape_of(scores) != (*qb, L, S):
        return None
    heads, kv_heads = (qb[-1], kb[-1]) if rank == 4 else (_folded_heads(q, D), None)
    if rank == 3 and heads is not None:
        kv_heads = heads
    return {"rank": rank, "num_heads": _int_or_none(heads), "num_kv_heads": _int_or_none(kv_heads),
            "head_dim": _int_or_none(D), "q_len": _int_or_none(L), "kv_len": _int_or_none(S)}


def _may_equal(a: Any, b: Any) -> bool:
    """Equal sizes, or sizes of which one is symbolic (unknown until run time)."""
    return a == b or isinstance(a, str) or isinstance(b, str)


def _ints(*dims: Any) -> bool:
    return all(isinstance(d, int) for d in dims)


def _int_or_none(dim: Any) -> int | None:
    """Static sizes only: a symbolic length is unknown until run time."""
    return dim if isinstance(dim, int) else None


_VIEW_OPS = frozenset({"view", "reshape"})
_LAYOUT_OPS = frozenset({"transpose", "contiguous", "permute"})


def _folded_heads(q3: fx.Node, head_dim: int) -> int | None:
    """H for a 3-D [B*H, L, D] operand, when the reshape that folded the heads is in the graph.

    Recognizes [B, H, L, D] → view(B*H, L, D) (HF-style) and [L, B, H*D] → view(L, B*H, D)
    → transpose(0, 1) (nn.MultiheadAttention-style), through layout ops and scalar scaling of q.
    Anything else: unknown (None).
    """
    bh = shape_of(q3)[0]
    if not _ints(bh, head_dim):
        return None
    node = q3
    for _ in range(6):
        call = op_call(node)
        if call is None:
            return None
        if call.op in _VIEW_OPS:
            src = shape_of(call.get("input"))
            if src is None or not _ints(*src):
                return None
            if len(src) == 4 and src[-1] == head_dim and src[0] * src[1] == bh:
                return src[1]
            if len(src) == 3 and src[-1] % head_dim == 0:
                heads = src[-1] // head_dim
                if bh in (src[0] * heads, src[1] * heads):
                    return heads
            return None
        scalar_op = call.op in ("mul", "div") and _is_number(call.get("other"))
        if call.op not in _LAYOUT_OPS and not scalar_op:
            return None
        node = call.get("input")
    return None


def _unrepeated_kv(node: fx.Node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(kv, n_rep, repeat nodes) when `node` is HF's repeat_kv(kv, n_rep) or repeat_interleave."""
    call = op_call(node)
    if call is None:
        return None
    if call.op == "repeat_interleave":
        kv, reps = call.get("input"), call.get("repeats")  # reps: a python int, never a tensor
        shape = shape_of(kv)
        if shape is None or len(shape) != 4 or not isinstance(reps, int) or _norm_dim(call.get("dim"), 4) != 1:
            return None
        return kv, reps, [node]
    if call.op != "reshape" and call.op != "view":
        return None
    expand = op_call(call.get("input"))
    if expand is None or expand.op != "expand":
        return None
    item = op_call(expand.get("input"))
    if item is None or item.op != "getitem" or not _is_new_axis_index(item.get("index")):
        return None
    kv = item.get("input")
    src, mid, dst = shape_of(kv), shape_of(expand.node), shape_of(node)
    if src is None or mid is None or dst is None or len(src) != 4 or len(mid) != 5:
        return None
    b, h, s, d = src
    n = mid[2]
    if not _ints(h, n) or shape_of(item.node) != (b, h, 1, s, d) or mid != (b, h, n, s, d) or dst != (b, h * n, s, d):
        return None
    for inner in (item.node, expand.node):
        if len(inner.users) != 1:
            return None
    return kv, n, [item.node, expand.node, node]


def _is_new_axis_index(index: Any) -> bool:
    """x[:, :, None] and its spellings: full slices / Ellipsis around exactly one None."""
    if not isinstance(index, tuple) or sum(i is None for i in index) != 1:
        return False
    return all(i is None or i is Ellipsis or i == slice(None) for i in index)


def _look_through_repeat(draft: _Draft) -> None:
    """Record GQA by its un-repeated k/v when both went through the same repeat."""
    f = draft.fields
    if f.get("enable_gqa") or f["rank"] != 4:
        return
    rk, rv = _unrepeated_kv(f["k"]), _unrepeated_kv(f["v"])
    if rk is None or rv is None or rk[1] != rv[1] or rk[1] < 2:
        return
    # The repeated tensors must not be used elsewhere, or removing the repeat changes nothing.
    if len(f["k"].users) != 1 or len(f["v"].users) != 1:
        return
    f.update(k=rk[0], v=rv[0], enable_gqa=True, num_kv_heads=f["num_heads"] // rk[1],
             kv_repeat_nodes=rk[2] + rv[2])


# ---------------------------------------------------------------------------------------------
# Cross-attention


def _sources(node: fx.Node, gm: fx.GraphModule, param_names: Mapping[str, str], limit: int = 400) -> set[fx.Node]:
    """Inputs of the nearest projections (linear sites) above a q/k operand.

    Graph inputs reached without a projection say nothing: separate q/k/v arguments of an
    attention function may well be views of one sequence.
    """
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = [node]
    while stack and len(seen) < limit:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        linear = match_linear(current, gm, param_names)
        if linear is not None and linear.form != "embedding":
            found.add(linear.input)
            continue
        stack.extend(current.all_input_nodes)
    return found


def _is_cross(draft: _Draft, gm: fx.GraphModule, param_names: Mapping[str, str]) -> bool:
    """kv from another sequence than q.

    Decided by provenance when both sides have one: disjoint projection inputs = cross
    (T5 EncDecAttention); a shared input = self-attention, even with q_len != kv_len (a KV cache
    appended to this step's keys). Without provenance, q_len != kv_len means cross.
    """
    f = draft.fields
    q_src, k_src = _sources(f["q"], gm, param_names), _sources(f["k"], gm, param_names)
    if q_src and k_src:
        return not (q_src & k_src)
    return f["q_len"] != f["kv_len"]


# ---------------------------------------------------------------------------------------------
# Graph helpers


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    """Whether `target` is an ancestor of `node`."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if current in seen or current.op == "placeholder":
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


# ---------------------------------------------------------------------------------------------
# Entry point


def _drafts(gm: fx.GraphModule) -> list[_Draft]:
    drafts = []
    for node in gm.graph.nodes:
        call = op_call(node)
        if call is None:
            continue
        if call.op == "sdpa":
            draft = _sdpa_draft(call)
        elif call.op in ("matmul", "bmm", "einsum"):
            draft = _only_reading(node)
        else:
            continue
        if draft is not None:
            drafts.append(draft)
    return _without_overlaps(drafts)


def _only_reading(node: fx.Node) -> _Draft | None:
    """The eager site ending at `node`, if exactly one distinct reading validates.

    Readings that differ only in which quantified step took a cast (cast after softmax vs cast
    before the output) describe the same site and count once.
    """
    readings: dict[str, _Draft] = {}
    for match in match_chain(node, EAGER_ATTENTION):
        draft = _eager_draft(match)
        if draft is not None:
            readings[repr((draft.nodes, sorted(draft.fields.items())))] = draft
    return next(iter(readings.values())) if len(readings) == 1 else None


def _without_overlaps(drafts: list[_Draft]) -> list[_Draft]:
    owner: dict[fx.Node, int] = {}
    clash: set[int] = set()
    for i, draft in enumerate(drafts):
        for node in draft.nodes:
            if node in owner:
                clash.update({i, owner[node]})
            owner[node] = i
    return [d for i, d in enumerate(drafts) if i not in clash]


def _unique_names(drafts: list[_Draft]) -> list[str]:
    """Owning module path; a module with several attention calls gets name, name#1, name#2…"""
    bases = [owning_module(d.output) or "" for d in drafts]
    seen: dict[str, int] = {}
    names = []
    for base in bases:
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base}#{count}")
    return names


def find_attention_sites(gm: fx.GraphModule, param_names: Mapping[str, str]) -> list[AttentionSite]:
    """Every attention computation of `gm` that can be read exactly, in graph order."""
    drafts = _drafts(gm)
    sites = []
    for draft, name in zip(drafts, _unique_names(drafts)):
        _look_through_repeat(draft)
        fields = dict(draft.fields)
        fields["cross_attention"] = _is_cross(draft, gm, param_names)
        sites.append(AttentionSite(name=name, output=draft.output, nodes=draft.nodes, **fields))
    return sites

