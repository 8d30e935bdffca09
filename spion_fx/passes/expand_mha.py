"""Expand nn.MultiheadAttention's opaque call into explicit ops, so attention detection sees it.

Dynamo keeps `F.multi_head_attention_forward` (what nn.MultiheadAttention, and through it
nn.TransformerEncoder/DecoderLayer and torchvision's ViT, call) as one opaque call_function
node whose result is the tuple (attn_output, attn_weights). This pass replaces that node with the
ops the function itself runs — in-projection, split into heads, `F.scaled_dot_product_attention`
(or, when the weights are used, the explicit bmm → softmax → bmm chain), out-projection — in the
manner of torch/fx/passes: pure graph → graph, nothing runs but fake-tensor shape propagation.
Every branch of the original is mirrored in `explicit_multi_head_attention` (same ops, same
order), so the expanded graph computes the same values; the ops are emitted with
fx.Proxy over the graph itself, so the code reads like the function it mirrors.

Dynamo specializes on the Python values (training, need_weights, is_causal, which masks are
None, batch_first's transposes, num_heads), so they are constants here and each graph gets the
branch it took. Lengths and the batch size may be symbolic (a graph compiled for every sequence
length): the expansion then reads them from the graph (`query.size(0)`), so one expanded graph
serves every length. What the pass cannot expand exactly stays the opaque call, with a reason:
non-constant arguments, a symbolic embedding dimension, users of the tuple other than getitem.

When need_weights=True *and* the weights are used, the weights are the softmax probabilities:
the expansion keeps the explicit chain, whose probabilities have a second user, so detection
finds no site and the attention stays dense and exact (reason recorded). With need_weights=True
and the weights unused (``out, _ = mha(x, x, x)``, Dynamo drops the getitem), the output is
computed through SDPA with the same mask (is_causal stays a hint only, as in the original's
need_weights branch): equal to the original up to rounding, and sparsifiable.

The eval-mode fast paths (`torch._native_multi_head_attention`, which Dynamo never captures —
MHA sees it is being traced — and `torch._transformer_encoder_layer_fwd`, which it does capture
in eval under no_grad) are fused kernels; `spion_fx.sparsify` runs its compiled call under
`mha_fast_paths_off` so Dynamo captures the path above. A bare torch.compile(backend="spion")
cannot do that for the user, so the fused encoder layer is expanded too (`_expand_encoder_layer`:
layer norms, the same self-attention, FFN, residuals — checked against the fused op, whose masks
are boolean whatever their dtype: a nonzero float entry masks).
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._dispatch.python import enable_python_dispatcher
from torch.fx.experimental.symbolic_shapes import statically_known_true

from spion_fx.capture import owning_module
from spion_fx.passes.dead_code import eliminate_dead_code

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)

# Tensor-or-None parameters of F.multi_head_attention_forward, in the order they are handed to
# `explicit_multi_head_attention`.
_TENSOR_PARAMS = (
    "query", "key", "value", "in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
    "out_proj_weight", "out_proj_bias", "key_padding_mask", "attn_mask",
    "q_proj_weight", "k_proj_weight", "v_proj_weight", "static_k", "static_v",
)
_STATIC_PARAMS = {
    "embed_dim_to_check": int, "num_heads": int, "add_zero_attn": bool, "dropout_p": (int, float),
    "training": bool, "need_weights": bool, "use_separate_proj_weight": bool,
    "average_attn_weights": bool, "is_causal": bool,
}


@dataclass(frozen=True)
class MHAConfig:
    """The Python-valued facts of one call (constants in the graph)."""

    num_heads: int
    add_zero_attn: bool
    dropout_p: float
    training: bool
    need_weights: bool
    return_weights: bool  # need_weights and the graph uses them
    use_separate_proj_weight: bool
    average_attn_weights: bool
    is_causal: bool
    batched: bool
    # Sizes: ints, or (symbolic shapes) the graph's own size nodes as fx.Proxy (`_sizes_from_graph`).
    tgt_len: int | Any
    bsz: int | Any
    embed_dim: int
    src_len: int | Any  # key's (or static_k's) length, before bias_k / add_zero_attn
    self_attention: bool  # query is key is value (one node)
    key_is_value: bool
    mask_dtype: torch.dtype  # query's dtype: boolean masks become additive masks of it
    bool_attn_mask: bool
    bool_key_padding_mask: bool
    attn_mask_dim: int


@dataclass
class MHAExpansion:
    """What the pass did with one opaque call."""

    name: str  # owning module path (the nn.MultiheadAttention)
    expanded: bool
    dense_reason: str | None = None  # why its attention cannot be a site (None: it can)


def expand_multi_head_attention(gm: fx.GraphModule) -> list[MHAExpansion]:
    """Replace every expandable F.multi_head_attention_forward and fused encoder-layer call of
    `gm` in place."""
    done = []
    for node in list(gm.graph.nodes):
        expander = _expander_for(node)
        if expander is None:
            continue
        name, what = owning_module(node) or "", "nn.MultiheadAttention"
        if expander is _expand_encoder_layer:
            name, what = f"{name}.self_attn".lstrip("."), "torch._transformer_encoder_layer_fwd"
        result = expander(gm, node)
        if isinstance(result, str):
            done.append(MHAExpansion(name, False, f"dense: {what} kept opaque ({result})"))
        elif result.return_weights:
            done.append(MHAExpansion(name, True, "dense: need_weights=True and the attention weights "
                                     "are used (they are the full softmax; call it with need_weights=False to sparsify it)"))
        else:
            done.append(MHAExpansion(name, True))
    if done:
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return done


@contextmanager
def mha_fast_paths_off() -> Iterator[None]:
    """Run with `torch.backends.mha` fast paths disabled (Dynamo guards on the flag).

    In eval mode under no_grad, nn.TransformerEncoderLayer calls the fused
    torch._transformer_encoder_layer_fwd (and nn.TransformerEncoder may build nested tensors);
    with the fast path off, eval captures the same ordinary path as training, so one site
    reading serves both. The one difference from an unsparsified model in eval: the fused op reads
    a float mask as boolean (nonzero = masked) where the ordinary path adds it — the same for
    0/-inf masks, which is what nn.Transformer* builds from boolean masks.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


# ---------------------------------------------------------------------------------------------
# One call


def _expand(gm: fx.GraphModule, node: fx.Node) -> MHAConfig | str:
    """Expand `node`; returns the config it was expanded with, else why it was left as it is."""
    try:
        bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as exc:
        return f"unexpected arguments: {exc}"
    bound.apply_defaults()
    params = dict(bound.arguments)
    for key, kinds in _STATIC_PARAMS.items():
        if not isinstance(params[key], kinds):
            return f"{key} is not a constant"
    tensors = {key: params[key] for key in _TENSOR_PARAMS}
    if params["query"] is None or params["out_proj_weight"] is None:
        return "query/out_proj_weight missing"
    for key, value in tensors.items():
        if value is not None and not (isinstance(value, fx.Node) and _fake(value) is not None):
            return f"{key} is not a tensor of the graph"
    if any(user.op != "call_function" or user.target is not operator.getitem for user in node.users):
        return "its result tuple is used whole"
    values = {key: _fake(n) for key, n in tensors.items() if n is not None}
    weights_used = _weights_used(node)
    if weights_used and not params["need_weights"]:
        return "its None weights are used"
    config = _config(params, tensors, values, weights_used)
    if isinstance(config, str):
        return config
    # The example values' own mode: a backend may run inside another tracing context's mode.
    modes = {id(v.fake_mode): v.fake_mode for v in values.values() if hasattr(v, "fake_mode")}
    if len(modes) > 1:
        return "example values from several fake modes"
    fake_mode = next(iter(modes.values()), None)
    graph = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)
    before = set(graph.nodes)
    with graph.inserting_before(node):
        proxies = [fx.Proxy(n, tracer) if n is not None else None for n in tensors.values()]
        config = _sizes_from_graph(config, values, dict(zip(tensors, proxies)))
        output, weights = explicit_multi_head_attention(config, *proxies)
    new_nodes = [n for n in graph.nodes if n not in before]
    stack = dict(node.meta.get("nn_module_stack") or {})
    out_proj = {tensors["out_proj_weight"]: _child(stack, "out_proj", nn.Linear)} if _owned_by(
        stack, nn.MultiheadAttention) else None
    _annotate(new_nodes, node, stack, fake_mode, out_proj)
    for user in list(node.users):
        result = output if user.args[1] == 0 else weights
        if result is not None:  # None: weights without need_weights, unused (checked above)
            user.replace_all_uses_with(result.node)
    return config


def _sizes_from_graph(config: MHAConfig, values: dict, proxies: dict) -> MHAConfig:
    """`config` with each symbolic length or batch size replaced by its size read in the graph.

    A graph compiled for every length has SymInt sizes; emitting them as constants would bake in
    the example's length. `query.size(0)` etc. are graph nodes, so the views that use them
    follow the call's real length (Dynamo's own graphs read sizes the same way).
    """
    def read(name: str, dim: int, size: Any) -> Any:
        return size if isinstance(size, int) else proxies[name].size(dim)

    static_k = values.get("static_k") is not None
    return replace(
        config,
        tgt_len=read("query", 0, config.tgt_len),
        bsz=read("query", 1, config.bsz) if config.batched else config.bsz,
        src_len=read("static_k", 1, config.src_len) if static_k else read("key", 0, config.src_len),
    )


def _weights_used(node: fx.Node) -> bool:
    return any(user.args[1] == 1 and user.users for user in node.users
               if user.op == "call_function" and user.target is operator.getitem)


def _config(params: dict, tensors: dict, values: dict, weights_used: bool) -> MHAConfig | str:
    query = values["query"]
    batched = query.dim() == 3
    if query.dim() not in (2, 3):
        return "query is not 2-D or 3-D"
    tgt_len, bsz, embed_dim = query.shape if batched else (query.shape[0], 1, query.shape[1])
    if not isinstance(embed_dim, int):
        return "a symbolic embedding dimension"
    heads = params["num_heads"]
    if embed_dim != params["embed_dim_to_check"] or heads <= 0 or embed_dim % heads:
        return "embed_dim does not match num_heads"
    attn_mask, kpm = values.get("attn_mask"), values.get("key_padding_mask")
    for mask in (attn_mask, kpm):
        if mask is not None and not (mask.dtype == torch.bool or mask.is_floating_point()):
            return "a mask is neither boolean nor floating point"
    if params["is_causal"] and attn_mask is None:
        return "is_causal without attn_mask (PyTorch raises)"
    if (tensors["bias_k"] is None) != (tensors["bias_v"] is None):
        return "only one of bias_k / bias_v"
    static_k = values.get("static_k")
    if static_k is not None and tensors["bias_k"] is not None:
        return "bias_k with static_k (PyTorch raises)"
    src_len = static_k.shape[1] if static_k is not None else values["key"].shape[0]
    return MHAConfig(
        num_heads=heads, add_zero_attn=params["add_zero_attn"], dropout_p=float(params["dropout_p"]),
        training=params["training"], need_weights=params["need_weights"],
        return_weights=params["need_weights"] and weights_used,
        use_separate_proj_weight=params["use_separate_proj_weight"],
        average_attn_weights=params["average_attn_weights"], is_causal=params["is_causal"],
        batched=batched, tgt_len=tgt_len, bsz=bsz, embed_dim=embed_dim, src_len=src_len,
        self_attention=tensors["query"] is tensors["key"] is tensors["value"],
        key_is_value=tensors["key"] is tensors["value"],
        mask_dtype=query.dtype,
        bool_attn_mask=attn_mask is not None and attn_mask.dtype == torch.bool,
        bool_key_padding_mask=kpm is not None and kpm.dtype == torch.bool,
        attn_mask_dim=attn_mask.dim() if attn_mask is not None else 0,
    )


def _fake(node: Any) -> Any:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _annotate(nodes: list[fx.Node], original: fx.Node, stack: dict, fake_mode: Any,
              linear_stacks: dict[fx.Node, dict] | None = None) -> None:
    """Give the new nodes what Dynamo's nodes carry: example values and the module stack.

    `linear_stacks` attributes a linear (by its weight) to the submodule owning the weight
    (out_proj, linear1…), so its linear site is named like that module.
    """
    for node in nodes:
        for meta_key in ("stack_trace", "source_fn_stack"):
            if meta_key in original.meta:
                node.meta[meta_key] = original.meta[meta_key]
        node.meta["nn_module_stack"] = stack
        if node.target is F.linear and linear_stacks and node.args[1] in linear_stacks:
            node.meta["nn_module_stack"] = linear_stacks[node.args[1]]
        node.meta["example_value"] = _run_fake(node, fake_mode)


def _child(stack: dict, name: str, module_type: type) -> dict:
    """`stack` with the submodule `name` of its last module appended."""
    if not stack:
        return stack
    key, (path, _) = list(stack.items())[-1]
    return {**stack, f"{key}_{name}": (f"{path}.{name}", module_type)}


def _owned_by(stack: dict, module_type: type) -> bool:
    last = list(stack.values())[-1][1] if stack else None
    return isinstance(last, type) and issubclass(last, module_type)


def _run_fake(node: fx.Node, fake_mode: Any) -> Any:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("example_value"))
    # The Python dispatcher, as Dynamo's own fake runs: composite ops (F.pad's C++ path) then
    # decompose in Python with symbolic sizes instead of calling int() on them, which would
    # add a guard that specialises the graph to this call's length.
    with _maybe(fake_mode), enable_python_dispatcher():
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


@contextmanager
def _maybe(mode: Any) -> Iterator[None]:
    if mode is None:
        yield
    else:
        with mode:
            yield


# ---------------------------------------------------------------------------------------------
# The explicit computation (mirrors torch.nn.functional.multi_head_attention_forward)


def explicit_multi_head_attention(
    c: MHAConfig, query, key, value, in_proj_weight, in_proj_bias, bias_k, bias_v,
    out_proj_weight, out_proj_bias, key_padding_mask, attn_mask,
    q_proj_weight, k_proj_weight, v_proj_weight, static_k, static_v,
):
    """F.multi_head_attention_forward for the branch `c` selects, op for op.

    Written over fx.Proxy (no data-dependent Python; every size comes from `c`), so calling it
    emits the graph. Returns (attn_output, attn_weights or None).
    """
    heads, tgt_len, bsz, embed_dim = c.num_heads, c.tgt_len, c.bsz, c.embed_dim
    head_dim = embed_dim // heads
    if not c.batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if key_padding_mask is not None and c.bool_key_padding_mask:
        key_padding_mask = _additive(key_padding_mask, c.mask_dtype)
    is_causal = c.is_causal
    if is_causal and key_padding_mask is None and not c.need_weights:
        attn_mask = None
    else:
        if attn_mask is not None and c.bool_attn_mask:
            attn_mask = _additive(attn_mask, c.mask_dtype)
        if key_padding_mask is not None:
            is_causal = False

    if not c.use_separate_proj_weight:
        q, k, v = _in_projection_packed(c, query, key, value, in_proj_weight, in_proj_bias)
    else:
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q = F.linear(query, q_proj_weight, b_q)
        k = F.linear(key, k_proj_weight, b_k)
        v = F.linear(value, v_proj_weight, b_v)

    if attn_mask is not None and c.attn_mask_dim == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    src_len = c.src_len + (1 if bias_k is not None and static_k is None else 0)
    q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.view(src_len, bsz * heads, head_dim).transpose(0, 1) if static_k is None else static_k
    v = v.view(src_len, bsz * heads, head_dim).transpose(0, 1) if static_v is None else static_v

    if c.add_zero_attn:
        k = torch.cat([k, k.new_zeros((bsz * heads, 1, head_dim))], dim=1)
        v = torch.cat([v, v.new_zeros((bsz * heads, 1, head_dim))], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len += 1

    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

    dropout_p = c.dropout_p if c.training else 0.0

    if c.return_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, embed_dim)
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if c.average_attn_weights:
            weights = weights.mean(dim=1)
        if not c.batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights

    if attn_mask is not None:
        # [1, L, S] (a 2-D mask) broadcasts over batch and heads; anything else is per (b, h).
        if c.attn_mask_dim == 2 and key_padding_mask is None:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, heads, -1, src_len)
    q = q.view(bsz, heads, tgt_len, head_dim)
    k = k.view(bsz, heads, src_len, head_dim)
    v = v.view(bsz, heads, src_len, head_dim)
    # The need_weights branch never passes is_causal on (the mask was kept): neither do we.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal and not c.need_weights)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, embed_dim)
    if not c.batched:
        out = out.squeeze(1)
    return out, None


def _additive(mask, dtype: torch.dtype):
    """F._canonical_mask of a boolean mask: 0 where kept, -inf where masked."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def _in_projection_packed(c: MHAConfig, q, k, v, w, b):
    """F._in_projection_packed, with `is` decided by the graph (one node = one tensor)."""
    embed_dim = c.embed_dim
    if c.key_is_value:
        if c.self_attention:
            proj = F.linear(q, w, b)
            proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        w_q, w_kv = w.split([embed_dim, embed_dim * 2])
        b_q, b_kv = (None, None) if b is None else b.split([embed_dim, embed_dim * 2])
        q_proj = F.linear(q, w_q, b_q)
        kv_proj = F.linear(k, w_kv, b_kv)
        kv_proj = kv_proj.unflatten(-1, (2, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return q_proj, kv_proj[0], kv_proj[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return F.linear(q, w_q, b_q), F.linear(k, w_k, b_k), F.linear(v, w_v, b_v)


# ---------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer's fused eval path (torch._transformer_encoder_layer_fwd)

_ENCODER_LAYER_PARAMS = (
    "src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
    "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2",
    "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type",
)
_ENCODER_LAYER_TENSORS = ("src", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "norm_weight_1", "norm_bias_1",
                          "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2",
                          "ffn_bias_2", "mask")
_ENCODER_LAYER_TARGETS = (torch._transformer_encoder_layer_fwd, torch.ops.aten._transformer_encoder_layer_fwd.default)


def _may_be_shape(shape: tuple, expected: tuple) -> bool:
    """False when the shapes are known to differ; decided without adding a guard.

    Symbolic sizes of different inputs (a mask's length, src's length) are separate symbols to
    Dynamo until an op relates them. The expansion's views and broadcasts relate them (a guard
    that they are equal, as the fused op itself requires), so a possible match is enough here.
    """
    return len(shape) == len(expected) and not any(statically_known_true(a != b) for a, b in zip(shape, expected))


def _expand_encoder_layer(gm: fx.GraphModule, node: fx.Node) -> MHAConfig | str:
    """Replace one fused encoder-layer call with its ops; the config of its self-attention."""
    if len(node.args) > len(_ENCODER_LAYER_PARAMS):
        return "unexpected arguments"
    params: dict[str, Any] = {"mask": None, "mask_type": None, **dict(zip(_ENCODER_LAYER_PARAMS, node.args)),
                              **node.kwargs}
    if set(params) != set(_ENCODER_LAYER_PARAMS):
        return "unexpected arguments"
    if not (isinstance(params["embed_dim"], int) and isinstance(params["num_heads"], int)
            and isinstance(params["use_gelu"], bool) and isinstance(params["norm_first"], bool)
            and isinstance(params["eps"], float) and params["mask_type"] in (None, 0, 1, 2)):
        return "a configuration argument is not a constant"
    tensors = {key: params[key] for key in _ENCODER_LAYER_TENSORS}
    values = {key: _fake(n) for key, n in tensors.items() if n is not None}
    if len(values) != sum(n is not None for n in tensors.values()) or values["src"].dim() != 3:
        return "a tensor argument has no example value, or src is not [B, L, E]"
    bsz, length, embed_dim = values["src"].shape
    heads, mask_type, mask = params["num_heads"], params["mask_type"], values.get("mask")
    if not isinstance(embed_dim, int) or embed_dim != params["embed_dim"] or embed_dim % heads:
        return "embed_dim does not match num_heads"
    expected = {0: (length, length), 1: (bsz, length), 2: (bsz, heads, length, length)}
    if mask is not None and (mask_type is None or not _may_be_shape(mask.shape, expected[mask_type])):
        return "a mask whose shape does not match its mask_type"
    modes = {id(v.fake_mode): v.fake_mode for v in values.values() if hasattr(v, "fake_mode")}
    if len(modes) > 1:
        return "example values from several fake modes"
    fake_mode = next(iter(modes.values()), None)
    config = MHAConfig(
        num_heads=heads, add_zero_attn=False, dropout_p=0.0, training=False, need_weights=False,
        return_weights=False, use_separate_proj_weight=False, average_attn_weights=True, is_causal=False,
        batched=True, tgt_len=length, bsz=bsz, embed_dim=embed_dim, src_len=length, self_attention=True,
        key_is_value=True, mask_dtype=values["src"].dtype, bool_attn_mask=False, bool_key_padding_mask=False,
        attn_mask_dim=3 if mask_type == 2 else 2,
    )
    layer_stack = dict(node.meta.get("nn_module_stack") or {})
    attn_stack = _child(layer_stack, "self_attn", nn.MultiheadAttention)
    linear_stacks = {tensors["proj_weight"]: _child(attn_stack, "out_proj", nn.Linear),
                     tensors["ffn_weight_1"]: _child(layer_stack, "linear1", nn.Linear),
                     tensors["ffn_weight_2"]: _child(layer_stack, "linear2", nn.Linear)}
    graph = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)
    t = {key: fx.Proxy(n, tracer) if n is not None else None for key, n in tensors.items()}
    eps, norm = params["eps"], (embed_dim,)

    def emitted(stack: dict, emit: Callable[[], Any]) -> Any:
        before = set(graph.nodes)
        with graph.inserting_before(node):
            result = emit()
        _annotate([n for n in graph.nodes if n not in before], node, stack, fake_mode, linear_stacks)
        return result

    # Symbolic sizes are read from src [B, L, E] in the graph (see _sizes_from_graph).
    bsz, length = emitted(attn_stack, lambda: [
        d if isinstance(d, int) else t["src"].size(i) for i, d in enumerate((bsz, length))])
    config = replace(config, bsz=bsz, tgt_len=length, src_len=length)

    def attention() -> Any:
        x = t["src"]
        if params["norm_first"]:
            x = F.layer_norm(x, norm, t["norm_weight_1"], t["norm_bias_1"], eps)
        x = x.transpose(0, 1)  # the batch_first transpose of nn.MultiheadAttention
        # The fused op reads every mask as boolean (nonzero = masked), whatever its dtype.
        masked = None if t["mask"] is None else t["mask"] if mask.dtype == torch.bool else t["mask"] != 0
        additive = None if masked is None else _additive(masked, config.mask_dtype)
        kpm = additive if mask_type == 1 else None
        attn_mask = None
        if mask_type == 0:
            attn_mask = additive
        elif mask_type == 2:
            attn_mask = additive.reshape(bsz * heads, length, length)
        out, _ = explicit_multi_head_attention(
            config, x, x, x, t["qkv_weight"], t["qkv_bias"], None, None, t["proj_weight"], t["proj_bias"],
            kpm, attn_mask, None, None, None, None, None)
        return out.transpose(0, 1)

    def feed_forward(attended: Any) -> Any:
        x = attended + t["src"]
        if not params["norm_first"]:
            x = F.layer_norm(x, norm, t["norm_weight_1"], t["norm_bias_1"], eps)
        residual = x
        if params["norm_first"]:
            x = F.layer_norm(x, norm, t["norm_weight_2"], t["norm_bias_2"], eps)
        hidden = F.linear(x, t["ffn_weight_1"], t["ffn_bias_1"])
        hidden = F.gelu(hidden) if params["use_gelu"] else F.relu(hidden)
        x = F.linear(hidden, t["ffn_weight_2"], t["ffn_bias_2"]) + residual
        if not params["norm_first"]:
            x = F.layer_norm(x, norm, t["norm_weight_2"], t["norm_bias_2"], eps)
        return x

    attended = emitted(attn_stack, attention)
    output = emitted(layer_stack, lambda: feed_forward(attended))
    node.replace_all_uses_with(output.node)
    return config


_EXPANDERS: dict[Any, Callable[[fx.GraphModule, fx.Node], MHAConfig | str]] = {
    F.multi_head_attention_forward: _expand,
    **{target: _expand_encoder_layer for target in _ENCODER_LAYER_TARGETS},
}


def _expander_for(node: fx.Node) -> Callable[[fx.GraphModule, fx.Node], MHAConfig | str] | None:
    if node.op != "call_function":
        return None
    try:
        return _EXPANDERS.get(node.target)
    except TypeError:  # unhashable target
        return None
