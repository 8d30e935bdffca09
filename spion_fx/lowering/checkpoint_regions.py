"""Sites inside activation-checkpointed regions.

Dynamo captures ``torch.utils.checkpoint.checkpoint(fn, ...)`` (HF's
``gradient_checkpointing_enable()``, with or without ``use_reentrant``) as one higher-order op,
``tag_activation_checkpoint(body, *operands, **kwargs)``, whose body is a GraphModule of its own
(a ``get_attr`` of the outer graph). Detection on the outer graph does not see into it, so every
site of a checkpointed block would stay dense.

Here each such call whose body holds a site is taken apart: the body is detected and rewritten
exactly as the backend rewrites an outer graph (same detection, same runtime modules, named from
the body nodes' own ``nn_module_stack``), and the op is replaced by a call to a
`CheckpointRegion`. The region runs ``torch.utils.checkpoint.checkpoint(body, *operands,
use_reentrant=False)`` around the rewritten body split at its attention sites
(lowering/partition.py: sites eager, the rest lowered by the inner compiler), so the block is
still recomputed in backward rather than kept in memory. The outer split runs the region call
eagerly, as it runs a site: the inner compiler must not trace the checkpoint.

The recomputation runs every site's forward a second time, inside the autograd engine; the site
does not probe or count kernel calls there (runtime/attention_site.py). Dropout replays: the
checkpoint restores torch's RNG state before recomputing, and the block-sparse kernel draws its
dropout seed from torch's CPU generator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

from spion_fx.capture import size_hint
from spion_fx.decisions import Decision
from spion_fx.lowering.partition import CompileOnFirstCall, split_at_sites
from spion_fx.passes.attention_census import attention_like_ops
from spion_fx.passes.expand_mha import expand_multi_head_attention
from spion_fx.passes.rewrite import rewrite_sites
from spion_fx.passes.sites import AttentionSite
from spion_fx.runtime.attention_site import AttentionCall

if TYPE_CHECKING:
    from spion_fx.lowering.backend import GraphRecord, SpionCompiler
    from spion_fx.runtime.state import SparsityState

# checkpoint() keywords a captured region may carry through; use_reentrant is always False here
# (the reentrant form would run the body under no_grad and lose the eager sites' autograd).
_CHECKPOINT_KWARGS = ("preserve_rng_state", "context_fn", "determinism_check", "debug")


def checkpoint_op() -> Any:
    return getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)


def rewrite_checkpoint_regions(
    compiler: SpionCompiler, gm: fx.GraphModule, param_names: Mapping[str, str],
    example_inputs: list[Any], record: GraphRecord,
) -> list[str]:
    """Rewrite the sites inside `gm`'s checkpointed regions; the regions' call_module targets.

    Found sites, decisions and rewrites are added to `record`. A region without a site is left
    as it is (the inner compiler lowers the op whole).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {n.name: v for n, v in zip(placeholders, example_inputs)}
    return _rewrite_regions(compiler, gm, dict(param_names), values, record)


def _rewrite_regions(compiler, gm: fx.GraphModule, names: dict[str, str], values: dict[str, Any], record) -> list[str]:
    from spion_fx.lowering.backend import _qualify_site_names, inner_compiler

    op = checkpoint_op()
    targets: list[str] = []
    for node in list(gm.graph.nodes):
        if op is None or node.op != "call_function" or node.target is not op:
            continue
        body_attr, operands = node.args[0], node.args[1:]
        if not isinstance(body_attr, fx.Node) or body_attr.op != "get_attr":
            continue
        original = gm.get_submodule(body_attr.target)
        # a copy: the pristine graph InstanceDispatcher keeps for other instances shares the body
        body = fx.GraphModule(original, copy.deepcopy(original.graph))
        inner = [n for n in body.graph.nodes if n.op == "placeholder"]
        if len(inner) != len(operands):
            continue
        body_names, body_values = {}, {}
        for placeholder, operand in zip(inner, operands):
            if isinstance(operand, fx.Node):
                if operand.name in names:
                    body_names[placeholder.name] = names[operand.name]
                body_values[placeholder.name] = values.get(operand.name, placeholder.meta.get("example_value"))
        mha = expand_multi_head_attention(body)
        from spion_fx.passes.detect import detect_sites  # lazily, as the backend does
        attention, linear = detect_sites(body, body_names)
        nested = _rewrite_regions(compiler, body, body_names, body_values, record)
        if not attention and not linear and not nested:
            continue
        _qualify_site_names(attention, linear, record.index)
        record.decisions += [
            Decision.kept_dense(e.name or "model", "attention", e.dense_reason.removeprefix("dense: "))
            for e in mha if e.dense_reason]
        record.unmatched_attention += attention_like_ops(body, {n for s in attention for n in s.nodes})
        body_inputs = [body_values.get(p.name) for p in inner]
        linear_modules = compiler._linear_modules_for(body, body_inputs, linear, record)
        rewritten = rewrite_sites(body, [*attention, *linear], lambda s, modules=linear_modules: (
            compiler._module_for(s, record) if isinstance(s, AttentionSite) else modules.get(s.name)))
        record.attention_sites += attention
        record.linear_sites += linear
        record.rewritten += rewritten
        eager = [r.target for r in rewritten if isinstance(r.module, AttentionCall)] + nested
        shapes = []
        for item in rewritten:
            if isinstance(item.module, AttentionCall):
                q, k = item.site.q.meta.get("example_value"), item.site.k.meta.get("example_value")
                if q is not None and k is not None and q.dim() == 4:
                    shapes.append((item.module.site, q.shape[-2], k.shape[-2]))
        kwargs = {k: v for k, v in node.kwargs.items() if k in _CHECKPOINT_KWARGS}
        region = CheckpointRegion(body, compiler.state, inner_compiler(compiler.inner), eager, shapes, kwargs)
        target = _free_name(gm, "spion_checkpoint")
        gm.add_submodule(target, region)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(target, tuple(operands))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        if not body_attr.users:
            gm.graph.erase_node(body_attr)
            gm.delete_submodule(body_attr.target)
        targets.append(target)
    if targets:
        gm.graph.lint()
        gm.recompile()
    return targets


def _free_name(gm: fx.GraphModule, prefix: str) -> str:
    index = 0
    while hasattr(gm, f"{prefix}_{index}"):
        index += 1
    return f"{prefix}_{index}"


class CheckpointRegion(nn.Module):
    """A checkpointed block whose sites were rewritten: checkpoint(body split at its sites).

    The body is lowered once per state variant, like a whole graph (backend.VariantRunner); the
    recomputation in backward reuses the runner its forward chose.
    """

    def __init__(
        self, body: fx.GraphModule, state: SparsityState, compile_fn: Callable[..., Any],
        eager_targets: list[str], shapes: list[tuple[nn.Module, Any, Any]], checkpoint_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self.body = body
        object.__setattr__(self, "state", state)  # not a submodule: the model owns the state
        self.compile_fn = compile_fn
        self.eager_targets = eager_targets
        self.shapes = shapes
        self.checkpoint_kwargs = {"preserve_rng_state": True, **checkpoint_kwargs}
        self.runners: dict[tuple, Callable[..., Any]] = {}

    def forward(self, *operands: Any) -> Any:
        key = self.state.variant_key()
        runner = self.runners.get(key)
        if runner is None:
            runner = self.runners[key] = self._lower()
        # No early stop: it ends the recomputation by raising from a saved-tensor hook, through
        # the compiled partitions (a nested torch.compile, which then tries to trace the handler).
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return torch.utils.checkpoint.checkpoint(runner, *operands, use_reentrant=False, **self.checkpoint_kwargs)

    def _lower(self) -> Callable[..., Any]:
        for module, q_len, kv_len in self.shapes:
            module.ensure_probe_shape(size_hint(q_len), size_hint(kv_len))
        gm = fx.GraphModule(self.body, copy.deepcopy(self.body.graph))
        if self.eager_targets:
            return split_at_sites(gm, self.eager_targets, self.compile_fn)
        return CompileOnFirstCall(gm, self.compile_fn)
