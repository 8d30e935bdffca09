"""Split a rewritten graph at its attention sites: compiled parts around eager attention calls.

An attention site changes what it computes during training (dense → probing → block-sparse, or an
HSA window) and, on a GPU, its best kernel is an extern kernel either way (flash SDPA, the Triton
block-sparse kernel): the inner compiler cannot fuse into it. So the sites are taken out of the
compiled code, the way Dynamo handles a graph break: `split_module` cuts the graph into
partitions, every site call becomes a partition of its own that runs eagerly (the site module
reads its phase at run time), and every other partition is lowered by the inner compiler on its
first call. Consequences, which are the point:

* a phase change (the SPION switch, probe steps, the HSA window) re-lowers nothing: the switch
  costs the probe and the pattern, not minutes of compile and autotune;
* in the dense phase attention runs the very kernel eager PyTorch runs (flash SDPA with its fused
  dropout on CUDA), not the compiler's re-derivation of it;
* repeated layers give structurally identical partitions, which inductor's FX graph cache serves.

Autograd crosses partition boundaries as it crosses graph breaks: each compiled part is its own
autograd function, the eager site is ordinary autograd.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

Compile = Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]


class CompileOnFirstCall:
    """A graph lowered by the inner compiler on its first call, for every length at once.

    Its inputs are intermediate values of the model, which exist only at run time; the runner
    that owns it is built once per variant, so the first call's grad mode and train/eval mode are
    the ones it will always see. The graph is compiled through a nested ``torch.compile`` with
    the inner compiler as its backend: handing the inner compiler the real tensors of one call
    would specialise it to their sizes (inductor asserts them), and a model trained on batches
    of many lengths, or generating with a growing cache, would fail or re-lower per length.
    A graph Dynamo captured with symbolic sizes is compiled ``dynamic=True`` (activations and
    integers symbolic; parameters stay static, Dynamo's ``force_parameter_static_shapes``), so
    one compilation serves every length; a static graph is compiled static. Nothing is marked
    on the tensors: a mark would stay on the user's inputs and fail the model's own guards.
    """

    def __init__(self, gm: fx.GraphModule, compile_fn: Compile) -> None:
        self.gm = gm
        self.compile_fn = compile_fn
        self.compiled: Callable[..., Any] | None = None
        # Backends (aot_eager, compile_fx) want a graph that returns a tuple, as Dynamo's do;
        # split_module returns a partition's single value bare.
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        self.unwrap = not isinstance(output.args[0], (tuple, list))
        if self.unwrap:
            output.args = ((output.args[0],),)
            gm.recompile()
        self.dynamic = any(is_symbolic(n.meta.get("example_value")) for n in gm.graph.nodes if n.op == "placeholder")

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = self._compile()
        # Python floats (a linear site's SR-STE lambda) stay constants: as symbolic floats
        # Dynamo would have to lift them into the sites' autograd.Function, which it cannot.
        with warnings.catch_warnings(), torch._dynamo.config.patch(specialize_float=True):
            warnings.simplefilter("ignore", UserWarning)
            out = self.compiled(*args)
        return out[0] if self.unwrap else out

    def _compile(self) -> Callable[..., Any]:
        compile_fn = self.compile_fn

        def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
            return compile_fn(gm, example_inputs)

        return torch.compile(self.gm, backend=backend, dynamic=self.dynamic, fullgraph=True)


def is_symbolic(value: Any) -> bool:
    """Whether a captured example value has a symbolic size (or is a symbolic integer)."""
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int() is None
    if isinstance(value, torch.Tensor):
        return any(is_symbolic(size) for size in value.shape)
    return False


class EagerSite:
    """A site partition, run eagerly, whose outputs keep the memory layout of its first call.

    The compiled partition downstream asserts the strides it was compiled for, and a site's
    kernels differ in output layout (dense SDPA returns a permuted view, the block-sparse kernels
    a contiguous tensor): a later output in another layout is copied into the first one's
    (B·H·L·D elements, noise next to the attention itself) instead of re-lowering downstream
    code. What is kept is the *order* of the dimensions in memory, not the stride values: with
    dynamic shapes the next call may have another length, and the first call's strides would
    make its copy overlap itself.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.orders: list[tuple[int, ...] | None] | None = None

    def __call__(self, *args: Any) -> Any:
        out = self.gm(*args)
        many = isinstance(out, (tuple, list))
        values = list(out) if many else [out]
        if self.orders is None:
            self.orders = [dim_order(v) if isinstance(v, torch.Tensor) else None for v in values]
        for i, (value, order) in enumerate(zip(values, self.orders)):
            if order is None or not isinstance(value, torch.Tensor):
                continue
            stride = dense_strides(value.shape, order)
            if value.stride() != stride:
                values[i] = torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device).copy_(value)
        if not many:
            return values[0]
        return type(out)(values)


def dim_order(value: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of `value` from outermost to innermost in memory."""
    return tuple(sorted(range(value.dim()), key=lambda i: (-value.stride(i), -i)))


def dense_strides(shape: torch.Size, order: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a non-overlapping, dense tensor of `shape` laid out in `order`."""
    strides = [0] * len(shape)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(int(shape[dim]), 1)
    return tuple(strides)


def split_at_sites(gm: fx.GraphModule, site_targets: Iterable[str], compile_fn: Compile) -> fx.GraphModule:
    """A GraphModule equivalent to `gm` whose site calls run eagerly between compiled parts.

    `site_targets` are the `call_module` targets to leave eager (the attention runtime modules).
    Without any such call in the graph, `gm` is returned unchanged (callers compile it whole).
    """
    targets = set(site_targets)
    site_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in targets]
    if not site_nodes:
        return gm
    for node in site_nodes:
        _materialise_grad_views(gm.graph, node)
    is_site = set(site_nodes)
    partition_of: dict[fx.Node, int] = {}
    part = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node in is_site:
            part += 1
            partition_of[node] = part
            part += 1
        else:
            partition_of[node] = part
    eager_parts = {partition_of[n] for n in site_nodes}
    split = split_module(gm, gm, lambda node: partition_of[node], keep_original_order=True)
    for name, child in list(split.named_children()):
        index = _partition_index(name)
        if index is None:
            continue
        runner = EagerSite(child) if index in eager_parts else CompileOnFirstCall(child, compile_fn)
        # A plain attribute (not a submodule): the split module's code calls it like one.
        delattr(split, name)
        object.__setattr__(split, name, runner)
    return split


def _materialise_grad_views(graph: fx.Graph, site: fx.Node) -> None:
    """Give a site fresh tensors where it would receive views that need gradients.

    A compiled partition cannot return a view of its own intermediate as such: AOT autograd
    returns the base and replays the view eagerly, and the eager view's backward then builds a
    zero-filled gradient of the whole base per view (q, k, v sliced from one fused qkv
    projection: three base-sized fills and copies per layer). A clone inside the partition is
    one fused copy of B·L·D elements and keeps the gradient plumbing inside compiled code.
    Masks and other inputs without gradients are left alone (an expanded L×L mask would be
    costly to materialise).
    """
    for arg in site.all_input_nodes:
        value = arg.meta.get("example_value")
        if arg.op == "placeholder" or not isinstance(value, torch.Tensor):
            continue
        if not (value.requires_grad and value._is_view()):
            continue
        with graph.inserting_before(site):
            fresh = graph.call_function(torch.clone, (arg,))
        fresh.meta.update(arg.meta)
        site.replace_input_with(arg, fresh)


def partition_runners(split: fx.GraphModule) -> list[EagerSite | CompileOnFirstCall]:
    """The partitions of a split module in call order (for inspect and tests)."""
    runners = [(i, v) for k, v in vars(split).items() if (i := _partition_index(k)) is not None]
    return [v for _, v in sorted(runners, key=lambda item: item[0])]


def _partition_index(name: str) -> int | None:
    prefix = "submod_"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        return None
    return int(name[len(prefix):])
