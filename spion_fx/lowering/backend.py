"""The `spion` torch.compile backend.

Dynamo hands us one GraphModule per graph. We detect sites, rewrite the selected ones into calls
to runtime modules owned by a `SparsityState`, and return a runner that lowers the rewritten graph
with the inner compiler once per *variant* (the state's variant key: train/eval, grad mode, the
linear sites' modes) and caches every variant it built. Attention sites are cut out of the
compiled code and run eagerly between compiled parts (lowering/partition.py), so SPION's phases,
probe steps and HSA windows never re-lower. Switching between variants that were already built
costs a dict lookup; the step loop never re-lowers.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from spion_fx.capture import map_placeholders, size_hint, tensor_names
from spion_fx.decisions import Decision
from spion_fx.lowering.checkpoint_regions import rewrite_checkpoint_regions
from spion_fx.lowering.partition import CompileOnFirstCall, split_at_sites
from spion_fx.passes.attention_census import attention_like_ops, opaque_attention_calls
from spion_fx.passes.expand_mha import expand_multi_head_attention
from spion_fx.passes.rewrite import Rewritten, constant_value, rewrite_sites
from spion_fx.passes.sites import AttentionSite, LinearSite
from spion_fx.runtime.attention_site import AttentionCall, AttentionSpec
from spion_fx.runtime.state import SparsityState


@dataclass
class GraphRecord:
    """What the backend did with one Dynamo graph (for report() and the inspect CLI)."""

    index: int
    attention_sites: list[AttentionSite]
    linear_sites: list[LinearSite]
    rewritten: list[Rewritten]
    decisions: list[Decision] = field(default_factory=list)  # one per site seen, in build order
    graph_module: fx.GraphModule | None = None
    # attention-like ops that are not sites ("2x F.multi_head_attention_forward", ...)
    unmatched_attention: list[str] = field(default_factory=list)


class SpionCompiler:
    """A Dynamo backend bound to one SparsityState."""

    def __init__(
        self, state: SparsityState, model: nn.Module | None = None, inner: str | None = None,
        *, counts_forwards: bool = False,
    ):
        self.state = state
        # A bare torch.compile(backend="spion") has no wrapper around the model's call to count
        # steps, so the first graph's runner counts training forwards instead.
        self.counts_forwards = counts_forwards
        self.inner = inner or state.policy.inner_compiler
        self._model = model
        self._names_by_id = tensor_names(model) if model is not None else {}
        # the model's own class name names a site held by the root module itself
        self._root_name = type(model).__name__ if model is not None else None
        self._root_sites: set[str] = set()
        self._lost_reported: set[str] = set()  # dense-attention reasons already warned about
        self.records: list[GraphRecord] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        pristine = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        runner = self.build(gm, example_inputs)
        runner.counts_forwards = self.counts_forwards and len(self.records) == 1
        return InstanceDispatcher(self, pristine, example_inputs, runner)

    def build(self, gm: fx.GraphModule, example_inputs: list[Any]) -> VariantRunner:
        """Detect, rewrite and wrap one graph for the module instance whose tensors it was given."""
        from spion_fx.passes.detect import detect_sites

        if self._model is not None:  # parameters can be replaced (FSDP, to(), load): look again
            self._names_by_id = tensor_names(self._model)
        names = map_placeholders(gm, example_inputs, self._names_by_id)
        mha = expand_multi_head_attention(gm)
        attention, linear = detect_sites(gm, names)
        self._root_sites |= _qualify_site_names(attention, linear, len(self.records), self._root_name)
        record = GraphRecord(len(self.records), attention, linear, [])
        record.decisions += [  # MHAExpansion.dense_reason is prose that starts with "dense: "
            Decision.kept_dense(e.name or "model", "attention", e.dense_reason.removeprefix("dense: "))
            for e in mha if e.dense_reason]
        record.unmatched_attention = attention_like_ops(gm, {n for s in attention for n in s.nodes})
        self._linear_modules = self._linear_modules_for(gm, example_inputs, linear, record)
        rewritten = rewrite_sites(gm, [*attention, *linear], lambda s: self._module_for(s, record))
        record.rewritten = list(rewritten)
        # sites inside activation-checkpointed blocks; each block is then called eagerly, like a site
        regions = rewrite_checkpoint_regions(self, gm, names, example_inputs, record)
        record.graph_module = gm
        self._warn_if_attention_lost(record)
        self.records.append(record)
        self.state.graph_records = self.records
        if self._model is None and opaque_attention_calls(gm):
            # a bare torch.compile(backend="spion") has no end-of-forward hook: warn on evidence
            self.warn_if_no_attention()
        runner = VariantRunner(gm, example_inputs, self.state, self.inner, rewritten)
        runner.attention_targets += regions
        return runner

    attention_checked = False

    def warn_if_no_attention(self, graph_breaks: list[str] = ()) -> None:
        """Warn (once) when the policy asks for attention sparsity and no graph has a site,
        naming what was seen instead. `sparsify` calls it after the first forward."""
        if self.attention_checked:
            return
        self.attention_checked = True
        if not self.state.policy.attention.enabled or any(r.attention_sites for r in self.records):
            return
        seen = [line for r in self.records for line in [*r.unmatched_attention, *(
            f"{d.site}: {d}" for d in r.decisions if d.kind == "attention" and d.dense)]]
        if graph_breaks:
            seen.append(f"{len(graph_breaks)} graph break(s): " + "; ".join(sorted(set(graph_breaks)))[:500])
        warnings.warn(
            f"spion_fx: the policy asks for attention sparsity but no attention site was found in "
            f"{len(self.records)} captured graph(s); attention stays dense. Seen instead: "
            + ("; ".join(seen) if seen else "nothing attention-like (no softmax, SDPA or known attention op)"),
            stacklevel=4,  # the user's model(...) call, through sparsify's wrapper and nn.Module
        )

    def _warn_if_attention_lost(self, record: GraphRecord) -> None:
        """A recompiled graph (a new length, a new flag) that keeps attention dense where earlier
        graphs had a site that could be sparse: the model would silently compute densely whenever
        Dynamo picks this graph, so say so (once per reason) and record it for report().
        Attention dense by the policy, or attention-like ops no graph ever matched, are not news."""
        sparse_before = {d.site for r in self.records for d in r.decisions if d.kind == "attention" and not d.dense}
        if not sparse_before:
            return  # nothing could be sparse before: warn_if_no_attention speaks for that case
        unmatched_before = {op for r in self.records for op in r.unmatched_attention}
        lost = [*(op for op in record.unmatched_attention if op not in unmatched_before),
                *(f"{d.site}: {d}" for d in record.decisions
                  if d.kind == "attention" and d.dense and d.site in sparse_before)]
        new = sorted(set(lost) - self._lost_reported)
        if not new:
            return
        self._lost_reported |= set(new)
        self.state.events.append({"event": "attention_kept_dense", "step": int(self.state.step),
                                  "graph": record.index, "reason": "; ".join(new)})
        warnings.warn(
            f"spion_fx: graph {record.index} (a recompile: new shapes or guards) keeps attention "
            f"dense that earlier graphs ran through spion_fx sites; calls that take this graph "
            f"compute that attention densely. Seen: {'; '.join(new)}",
            stacklevel=4,
        )

    def _unresolved(self, site: AttentionSite | LinearSite, record: GraphRecord) -> bool:
        """A site whose module path does not exist in the model must not get state: its graph
        may be shared by several modules (FSDP2 blocks), which would then share one pattern."""
        if self._model is None or site.name in self._root_sites:
            return False
        try:
            self._model.get_submodule(site.name)
            return False
        except AttributeError:
            record.decisions.append(Decision.kept_dense(
                site.name, site.kind, "no unique module path (graph shared by several modules?)"))
            warnings.warn(
                f"spion_fx: site {site.name!r} has no unique module path in the model (e.g. a graph "
                "shared by FSDP2 blocks); it stays dense", stacklevel=3,
            )
            return True

    def _module_for(self, site: AttentionSite | LinearSite, record: GraphRecord) -> nn.Module | None:
        policy = self.state.policy
        if isinstance(site, AttentionSite):
            if self._unresolved(site, record):
                return None
            if not policy.attention.selects(site.name):
                record.decisions.append(Decision.kept_dense(site.name, "attention", "excluded by policy"))
                return None
            spec = attention_spec(site)
            if spec is None:
                record.decisions.append(Decision.kept_dense(site.name, "attention", "scale is computed at run time"))
                return None
            module = self.state.attention_site(spec)
            ok, why = module.can_be_sparse
            if policy.attention.method == "dense":
                record.decisions.append(Decision.kept_dense(site.name, "attention", "policy"))
            elif ok:
                record.decisions.append(Decision.sparse(site.name, "attention", f"SPION-{policy.attention.variant.upper()}"))
            else:
                record.decisions.append(Decision.kept_dense(site.name, "attention", why))
            return AttentionCall(module, spec)
        return self._linear_modules.get(site.name)

    def _linear_modules_for(self, gm, example_inputs, sites: list[LinearSite], record: GraphRecord) -> dict[str, nn.Module]:
        """Runtime modules for this graph's selected linear sites, bound to the live weights."""
        policy = self.state.policy.linear
        values = {n.name: v for n, v in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)}
        selected = []
        for site in sites:
            if not policy.enabled or not policy.selects(site.name, site.role):
                record.decisions.append(Decision.kept_dense(site.name, "linear", "policy" if site.role == "linear" else site.role))
                continue
            weight = values.get(site.weight.name)
            if self._unresolved(site, record):
                continue
            if not isinstance(weight, nn.Parameter):
                record.decisions.append(Decision.kept_dense(site.name, "linear", "weight is not a parameter"))
                continue
            selected.append((site.name, tuple(site.weight_shape), site.weight_transposed, weight))
        modules = self.state.linear_sites(selected) if selected else {}
        for name, module in modules.items():
            info = module.describe()
            record.decisions.append(
                Decision.kept_dense(name, "linear", info["dense_reason"]) if info.get("dense_reason")
                else Decision.sparse(name, "linear", info.get("pattern", policy.method)))
        return modules


def _qualify_site_names(
    attention: list[AttentionSite], linear: list[LinearSite], index: int, root_name: str | None = None,
) -> set[str]:
    """Make site names full module paths even in graphs that Dynamo started in a submodule.

    After a graph break Dynamo compiles the rest of a submodule's forward as its own frame, and
    nn_module_stack paths are then relative to that submodule (``qkv``, or ``""`` for the
    submodule itself). Parameter names are always absolute, so a linear site whose parameter is
    ``blocks.1.qkv.weight`` and whose relative name is ``qkv`` reveals the prefix ``blocks.1.``.

    A site with no module path in a graph whose parameters reveal the empty prefix is the root
    module itself (``sparsify(MyAttention())``): it is named `root_name` (the model's class
    name). Returns the names given to root sites; any other site without a path is named
    ``<graph N>`` and stays dense (its owner cannot be told).
    """
    prefixes = set()
    for site in linear:
        suffix = f"{site.name}.{site.weight_name.rsplit('.', 1)[-1]}" if site.name else site.weight_name.rsplit(".", 1)[-1]
        if site.weight_name.endswith(suffix):
            prefixes.add(site.weight_name[: len(site.weight_name) - len(suffix)])
    prefix = prefixes.pop() if len(prefixes) == 1 else None
    root_sites: set[str] = set()
    for site in [*attention, *linear]:
        if prefix and not (site.name + ".").startswith(prefix):
            site.name = f"{prefix}{site.name}".rstrip(".")
        if not site.name:
            if prefix == "" and root_name:
                site.name = root_name
                root_sites.add(root_name)
            else:
                site.name = f"<graph {index}>"
    return root_sites


def attention_spec(site: AttentionSite) -> AttentionSpec | None:
    scale = site.scale
    if isinstance(scale, fx.Node):
        scale = constant_value(scale)
        if scale is None:
            return None
        if getattr(site, "scale_is_divisor", False):
            scale = 1.0 / scale
    return AttentionSpec(
        name=site.name,
        form=site.form,
        mask_kind=site.mask_kind,
        mask_fill_value=site.mask_fill_value,
        is_causal=site.is_causal,
        scale=scale,
        dropout_p=site.dropout_p,
        dropout_train_only=site.dropout_train_only,
        enable_gqa=site.enable_gqa,
        softmax_dtype=site.softmax_dtype,
        cross_attention=site.cross_attention,
        q_len=site.q_len,
        kv_len=site.kv_len,
        num_heads=site.num_heads,
    )


def inner_compiler(name: str) -> Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]:
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    raise ValueError(f"inner compiler {name!r} is invalid: expected 'inductor', 'eager' or 'aot_eager'")


class VariantRunner:
    """Calls the rewritten graph, lowering it once per state variant."""

    def __init__(self, gm, example_inputs, state: SparsityState, inner: str, rewritten: list[Rewritten]):
        self.gm = gm
        self.example_inputs = example_inputs
        self.state = state
        self.compile = inner_compiler(inner)
        self.cache: dict[tuple, Callable[..., Any]] = {}
        self.shapes = []
        self.attention_targets = []
        # the linear sites this graph calls: its variants depend on their modes only
        self.linear_sites = [item.module for item in rewritten if not isinstance(item.module, AttentionCall)]
        for item in rewritten:
            if isinstance(item.module, AttentionCall):
                self.attention_targets.append(item.target)
                q = item.site.q.meta.get("example_value")
                k = item.site.k.meta.get("example_value")
                if q is not None and k is not None and q.dim() == 4:
                    self.shapes.append((item.module.site, size_hint(q.shape[-2]), size_hint(k.shape[-2])))

    counts_forwards = False

    def __call__(self, *args):
        self.state.graph_calls += 1
        if self.counts_forwards and self.state.training and torch.is_grad_enabled():
            self.state.on_training_forward()
        key = self.state.variant_key(self.linear_sites)
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self._lower()
            self.cache[key] = compiled
        return compiled(*args)

    def _lower(self) -> Callable[..., Any]:
        for module, q_len, kv_len in self.shapes:
            module.ensure_probe_shape(q_len, kv_len)
        # Inductor's passes may edit the graph in place: give each variant its own graph object
        # (submodules, i.e. the runtime state, stay shared).
        gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
        if self.attention_targets:
            # Attention sites run eagerly between compiled parts (lowering/partition.py), so
            # their phase changes never reach the variant key and never re-lower.
            return split_at_sites(gm, self.attention_targets, self.compile)
        return CompileOnFirstCall(gm, self.compile)


class InstanceDispatcher:
    """Routes each call to the rewrite made for the module instance it serves.

    Dynamo reuses one compiled graph for every instance of a module whose code it compiled as a
    frame of its own (after a graph break inside a repeated block, or FSDP2's per-block graphs),
    passing that instance's parameters as inputs. Sites carry per-layer state, so each instance
    (told apart by the identity of its first parameter) gets its own rewrite of the graph.
    """

    MAX_INSTANCES = 64

    def __init__(self, compiler: SpionCompiler, pristine: fx.GraphModule, example_inputs, primary: VariantRunner):
        self.compiler = compiler
        self.pristine = pristine
        self.primary = primary
        self.position = next((i for i, x in enumerate(example_inputs) if isinstance(x, nn.Parameter)), None)
        self.primary_key = id(example_inputs[self.position]) if self.position is not None else None
        self.instances: dict[int, Callable[..., Any]] = {}
        self.dense: Callable[..., Any] | None = None

    def __call__(self, *args):
        if self.position is None or id(args[self.position]) == self.primary_key:
            return self.primary(*args)
        key = id(args[self.position])
        runner = self.instances.get(key)
        if runner is None:
            if len(self.instances) < self.MAX_INSTANCES:
                graph = fx.GraphModule(self.pristine, copy.deepcopy(self.pristine.graph))
                runner = self.instances[key] = self.compiler.build(graph, list(args))
            else:  # parameters that change identity every call (sharded): never guess, run dense
                if self.dense is None:
                    warnings.warn("spion_fx: a graph is called with ever-new parameters; running it dense", stacklevel=2)
                    self.dense = inner_compiler(self.compiler.inner)(self.pristine, list(args))
                runner = self.dense
        return runner(*args)


def spion_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
    """Entry point for ``torch.compile(model, backend="spion", options={"policy": ...})``.

    Options: ``policy`` (Policy, preset name or dict), every override `sparsify` takes
    (``block_size``, ``probe_interval``, ...), ``inner`` ("inductor" | "eager" | "aot_eager"),
    ``state`` (a SparsityState to use). The state is attached to the compiled module as
    ``model.spion_state`` (lowering/backend_entry.py says how the module is found).
    """
    from spion_fx.lowering.backend_entry import compile_graph

    return compile_graph(gm, example_inputs, kwargs.get("options"))
