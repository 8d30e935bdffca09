"""Getting torch.fx graphs out of a model.

Dynamo (torch.compile with a backend of ours) is the path that works on Hugging Face models:
`torch.fx.symbolic_trace` trips over their decorated forwards and kwargs mutation. Dynamo hands the
backend one GraphModule per graph (more than one when the model has graph breaks) with parameters
as placeholders; we map each placeholder back to the parameter's qualified name by identity of the
example input, which is stable across Dynamo versions, unlike its mangled placeholder names.

This module knows nothing about sparsity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn


@dataclass
class CapturedGraph:
    """One Dynamo graph and what it was called with."""

    graph_module: fx.GraphModule
    example_inputs: list[Any]
    # placeholder node name -> qualified parameter/buffer name in the user's model
    param_names: dict[str, str] = field(default_factory=dict)

    def placeholder_name(self, node: fx.Node) -> str | None:
        return self.param_names.get(node.name)


@dataclass
class CaptureResult:
    graphs: list[CapturedGraph]
    graph_breaks: list[str]  # one reason per break, as Dynamo words it

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)


def tensor_names(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> qualified name, for every parameter and buffer of `model`."""
    names: dict[int, str] = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(buf), name)
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def map_placeholders(
    gm: fx.GraphModule, example_inputs: Sequence[Any], names_by_id: Mapping[int, str]
) -> dict[str, str]:
    """Placeholder node name -> qualified parameter name, for placeholders that are parameters."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mapping: dict[str, str] = {}
    for node, value in zip(placeholders, example_inputs):
        qualified = names_by_id.get(id(value)) or source_parameter_name(node)
        if qualified is not None:
            mapping[node.name] = qualified
    return mapping


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]")


def source_parameter_name(node: fx.Node) -> str | None:
    """Qualified parameter/buffer name from Dynamo's source for a placeholder, if it is one.

    Used when the model object is unknown (a bare `torch.compile(backend="spion")`): Dynamo's
    source reads ``L['self']._modules['h']._modules['0']._parameters['weight']``.
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    text = source.name if isinstance(source.name, str) else source.name()
    if not text.startswith(("L['self']", 'L["self"]')) or not re.search(r"_(parameters|buffers)\[", text):
        return None
    return normalize_module_path(text)


def owning_module(node: fx.Node) -> str | None:
    """Qualified name of the nn.Module an op node was traced in, from Dynamo's nn_module_stack.

    Dynamo writes paths like ``L['self'].model.layers.0.self_attn`` (or
    ``L['self'].model.layers[0]`` on some versions); we return ``model.layers.0.self_attn``.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return normalize_module_path(path)


_SELF_PREFIX = re.compile(r"^L\[['\"][^'\"]+['\"]\]|^self(?=[.\[]|$)")  # the dot stays for _SOURCE_PART


def normalize_module_path(path: str) -> str:
    path = _SELF_PREFIX.sub("", path)
    # L['self'].h[0] / ._modules['0'] / ._parameters['weight'] spellings -> dotted path
    path = _SOURCE_PART.sub(r".\1", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    path = path.strip(".")
    # modules reached through the instance dict (PEFT: self.__dict__["_modules"]["base_model"])
    path = re.sub(r"(?:^|(?<=\.))__dict__\._modules\.", "", path)
    # sparsify compiles a closure over the bound model._call_impl: its paths start at __self__
    while path == "__self__" or path.startswith("__self__."):
        path = path[len("__self__."):] if path != "__self__" else ""
    return path


def graph_break_reasons() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def capture(
    model: nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic: bool | None = False,
) -> CaptureResult:
    """Run `model(*args, **kwargs)` once under Dynamo and return the graphs it produced.

    The model is not modified. Graph breaks are returned with Dynamo's reasons, never hidden.
    """
    kwargs = dict(kwargs or {})
    names_by_id = tensor_names(model)
    graphs: list[CapturedGraph] = []

    def collect(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(
            CapturedGraph(gm, list(example_inputs), map_placeholders(gm, example_inputs, names_by_id))
        )
        return gm.forward

    breaks = run_once(model, collect, args, kwargs, dynamic=dynamic)
    return CaptureResult(graphs, breaks)


def run_once(
    model: nn.Module, backend: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
    *, dynamic: bool | None = False,
) -> list[str]:
    """Compile `model` with `backend`, run one no-grad forward, return the graph-break reasons."""
    before = graph_break_reasons()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        compiled(*args, **kwargs)
    after = graph_break_reasons()
    torch._dynamo.reset()
    return [reason for reason, count in after.items() for _ in range(count - before.get(reason, 0))]


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx.symbolic_trace, for plain modules only (HF models need `capture`)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; the message is what matters
        raise TypeError(
            f"torch.fx.symbolic_trace cannot trace {type(model).__name__} ({exc}); "
            "use spion_fx.capture.capture(model, args) instead, which goes through Dynamo"
        ) from exc


def _logging_methods() -> set[Any]:
    """Logger methods Dynamo should treat as no-ops while it traces a model.

    Dynamo graph-breaks on every `logging.Logger` call. Inside a context manager (PEFT's forward
    hooks, gradient checkpointing) it cannot resume after a break and skips the whole frame, so
    one `logger.warning_once(...)` in a model's forward (HF does this: "`loss_type=None` was set in
    the config…", "`use_cache=True` is incompatible with gradient checkpointing") would cost the
    model its sites. The price is that such messages are not printed from compiled frames, as
    with `torch._dynamo.config.ignore_logging_functions` itself.
    """
    import logging

    names = ("debug", "info", "warning", "warn", "warning_once", "info_once", "warning_advice")
    return {method for name in names if (method := getattr(logging.Logger, name, None)) is not None}


def tracing_settings(*, recompile_limit: int | None = None) -> Any:
    """A context in which Dynamo captures models for spion_fx: logger methods are no-ops while
    tracing (see `_logging_methods`), and the recompile limit is `recompile_limit` if given."""
    import torch._dynamo.config as dynamo_config

    changes: dict[str, Any] = {}
    for option in ("ignore_logging_functions", "ignore_logger_methods"):  # name by torch version
        if hasattr(dynamo_config, option):
            changes[option] = set(getattr(dynamo_config, option)) | _logging_methods()
            break
    if recompile_limit is not None:
        option = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        changes[option] = recompile_limit
    return dynamo_config.patch(**changes)


def size_hint(size: int | torch.SymInt) -> int:
    """The value a (possibly symbolic) size has in the example at hand, without a guard.

    ``int(symint)`` would specialise the graph to that value: Dynamo adds a guard and recompiles
    for the next length, which is what dynamic shapes are meant to avoid.
    """
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 0
    return int(size)


# integer inputs: token ids, labels, position ids, HF's int attention masks. Bool masks are left
# alone: their last dim is not always a sequence of tokens (e.g. a square mask); Dynamo makes
# them dynamic at their second length, as any other input.
_TOKEN_DTYPES = (torch.int64, torch.int32)


def mark_sequence_dims(args: tuple, kwargs: dict) -> None:
    """Mark the sequence dimension of token inputs as dynamic before Dynamo sees them.

    Token ids, attention masks, labels and position ids are integer tensors whose last
    dimension is the sequence: marking it (``maybe_mark_dynamic``: Dynamo may still specialise,
    e.g. a length of 1) makes the first compilation serve every length, so the first batch of a
    new length — after the switch, in a collator that pads per batch — compiles nothing. The mark
    stays on the tensor; every call goes through here, so every call's inputs carry the same
    marks and Dynamo's guards see no difference between them.
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.dtype in _TOKEN_DTYPES \
                and value.shape[-1] > 1:
            torch._dynamo.maybe_mark_dynamic(value, value.dim() - 1)
