"""The user-facing entry points: `sparsify`, `report`, `save_patterns`."""

from __future__ import annotations

import types
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from spion_fx.capture import graph_break_reasons, mark_sequence_dims, tracing_settings
from spion_fx.ddp import DDPBufferGuard
from spion_fx.lowering.backend import SpionCompiler
from spion_fx.lowering.backend_entry import STATE_ATTR, attach_backend_state
from spion_fx.lowering.fallback import check_forward, recompile_limit
from spion_fx.passes.expand_mha import mha_fast_paths_off
from spion_fx.policy import Policy
from spion_fx.runtime.state import SparsityState


def sparsify(
    model: nn.Module,
    policy: Policy | str | dict | None = "spion-cf",
    *,
    optimizer: torch.optim.Optimizer | None = None,
    inner: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Sparsify `model` in place and return it.

    The model is compiled through the `spion` backend (Dynamo capture → site detection →
    rewrite → inner compiler). A `SparsityState` is attached as ``model.spion_state``, so
    ``model.state_dict()`` carries patterns, phases, masks and schedules. Steps are counted by
    the optimizer's step hook when `optimizer` is given (gradient accumulation stays right),
    otherwise by training-mode forwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, STATE_ATTR):
        raise ValueError(
            "this model is already sparsified (it has model.spion_state); build a fresh model, or "
            "call spion_fx.desparsify(model) first"
        )
    policy = Policy.coerce(policy, **overrides)
    if inner is not None:
        policy = Policy.coerce(policy, inner_compiler=inner)
    device = _model_device(model)
    state = SparsityState(policy).to(device)
    state.train(model.training)
    setattr(model, STATE_ATTR, state)
    compiler = SpionCompiler(state, model=model)
    state.compiler = compiler
    call_impl = model._call_impl

    def run_model(*args: Any, **kwargs: Any) -> Any:
        # A frame of ours at the top: Dynamo skips frames whose code lives in torch itself
        # (nn.Sequential.forward, ...) but inlines into them from here.
        return call_impl(*args, **kwargs)

    own_run_model = _own_code(run_model, id(state))
    compiled_code = own_run_model.__code__
    # dynamic=None: the first call compiles for its shapes; a second length makes the changed
    # dimensions symbolic, and from then on one graph serves every length (and cache length).
    compiled_call = torch.compile(own_run_model, backend=compiler, dynamic=None)
    _LIVE_STATES.add(state)
    ddp_buffers = DDPBufferGuard(state)
    state.count_steps = "optimizer" if optimizer is not None else "forward"

    def call(*args: Any, **kwargs: Any) -> Any:
        if state.step.is_meta:
            raise RuntimeError(
                "spion_fx: this model is on the meta device; materialize it before running it: "
                "model.to_empty(device=...), then initialize the weights (or load a checkpoint)"
            )
        if state.count_steps == "forward" and state.training and torch.is_grad_enabled():
            state.on_training_forward()
        try:
            # mha_fast_paths_off: Dynamo then captures nn.TransformerEncoderLayer's open path
            with mha_fast_paths_off(), tracing_settings(recompile_limit=_recompile_limit()):
                calls_before = state.graph_calls
                mark_sequence_dims(args, kwargs)
                if compiler.attention_checked:
                    result = compiled_call(*args, **kwargs)
                else:
                    breaks_before = graph_break_reasons()
                    result = compiled_call(*args, **kwargs)
                    compiler.warn_if_no_attention(_new_graph_breaks(breaks_before))
                check_forward(state, calls_before, compiled_code, type(model).__name__)
                ddp_buffers.after_forward()
                return result
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            # our own user-facing errors (bad checkpoint, bad policy) surface as themselves
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, (ValueError, TypeError)):
                raise inner from None
            raise

    model._compiled_call_impl = call
    if optimizer is not None:
        state.attach_optimizer(optimizer)
    return model


# Sparsified models alive in this process, only counted: frames Dynamo shares between models
# (the decorated wrappers of HF forwards, the rest of a forward after a graph break) keep one
# compiled entry per model, and Dynamo's recompile limit (8 per code object) would leave the
# ninth model of a notebook or a sweep without sites.
_LIVE_STATES: weakref.WeakSet = weakref.WeakSet()


def _recompile_limit() -> int:
    return max(recompile_limit(), 4 * (len(_LIVE_STATES) + 1))


def _new_graph_breaks(before: dict[str, int]) -> list[str]:
    after = graph_break_reasons()
    return [reason for reason, count in after.items() for _ in range(count - before.get(reason, 0))]


def _own_code(function: Any, tag: int) -> Any:
    """A copy of `function` with a code object of its own.

    Dynamo keeps its compiled entries (and its recompile limit, 8 by default) per code object;
    without this, every model sparsified in one process would share one code object and the
    ninth would silently run uncompiled, i.e. dense.
    """
    code = function.__code__.replace(co_name=f"{function.__name__}_{tag:x}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


def desparsify(model: nn.Module) -> nn.Module:
    """Undo `sparsify`: drop the state and the compiled call (weights stay as trained)."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        state.detach_optimizer()
        delattr(model, STATE_ATTR)
    model._compiled_call_impl = None
    return model


def get_state(model: nn.Module) -> SparsityState:
    """The model's `SparsityState` (``model.spion_state``), from `sparsify` or the `spion` backend
    (attached at its first compile); a ``torch.compile`` wrapper is looked through."""
    state = getattr(getattr(model, "_orig_mod", model), STATE_ATTR, None)
    if not isinstance(state, SparsityState):
        raise ValueError(
            "model is not sparsified: call spion_fx.sparsify(model, policy) first (or run the "
            "model once after torch.compile(model, backend='spion', options=...))"
        )
    return state


def attach_state(model: nn.Module, options: dict[str, Any] | None = None) -> SparsityState:
    """Attach now the state ``torch.compile(model, backend="spion", options=options)`` attaches at
    its first compile, so a checkpoint can be loaded before the first forward::

        spion_fx.api.attach_state(model, options)
        model.load_state_dict(checkpoint)
        compiled = torch.compile(model, backend="spion", options=options)
    """
    return attach_backend_state(model, options)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def report(model: nn.Module, *, print_table: bool = True) -> list[dict[str, Any]]:
    """Per-site phase, switch step, density and attention FLOPs saved; printed with rich."""
    from spion_fx.reporting import build_report, print_report

    rows = build_report(get_state(model))
    if print_table:
        print_report(rows)
    return rows


def save_patterns(model: nn.Module, path: str) -> str:
    """Write a PNG grid of every attention site's block pattern; returns the path."""
    from spion_fx.reporting import patterns_png

    state = get_state(model)
    sites = [(s.spec.name, s.pattern) for s in state.attention_sites() if s.pattern.numel()]
    if not sites:
        warnings.warn("spion_fx.save_patterns: no site has a pattern yet (still dense)", stacklevel=2)
    return patterns_png(sites, path)
