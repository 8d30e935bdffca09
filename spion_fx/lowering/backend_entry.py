"""What ``torch.compile(model, backend="spion", options=...)`` does before the compiler runs.

The backend gets ``(gm, example_inputs)``, not the module, yet its `SparsityState` belongs to the
model it describes (``model.spion_state``, as `sparsify` attaches it), so that
``spion_fx.get_state(model)`` works and ``model.state_dict()`` carries patterns and phases. The
model is found in what Dynamo leaves reachable while it calls the backend:

1. the frame being compiled: a parameter placeholder's source (``L['self']._modules[...]
   ._parameters['weight']``, or ``G['model']...``) ends in a local or global of that frame,
   read from the translator's ``f_locals`` / ``f_globals`` (``InstructionTranslator.current_tx()``,
   checked on torch 2.13; where it is missing or differs, step 2 alone decides);
2. the Python stack: the module `torch.compile` wrapped (an ``OptimizedModule``'s ``_orig_mod``,
   or a module whose ``compile()`` set ``_compiled_call_impl``) and any module that already has a
   state, e.g. the root model while a graph break compiles one of its blocks as a frame of its own.

The first module that holds the graph's first parameter and already has a state wins, then the
module torch.compile wrapped, then the frame's own module. Nothing is cached at module level:
the state hangs off the model, its compiler off the state.

Dynamo reuses a compiled frame for every instance of a class whose guards pass (HF's decorated
``forward`` of a second GPT-2 compiled with equal options never reaches the backend), so the
returned `ModelRouter` sends each call to the dispatcher of the model whose parameters it got.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch.fx as fx
from torch import nn

from spion_fx.policy import AttentionPolicy, LinearPolicy, Policy
from spion_fx.runtime.state import SparsityState

STATE_ATTR = "spion_state"
BACKEND_KEYS = ("policy", "inner", "state")


def policy_override_names() -> list[str]:
    """Every keyword `Policy.coerce(policy, **overrides)` accepts."""
    att = {f.name for f in dataclasses.fields(AttentionPolicy)}
    lin = {f.name for f in dataclasses.fields(LinearPolicy)}
    names = {"inner_compiler", "name"} | (att ^ lin)
    names |= {f"attention_{n}" for n in att} | {f"linear_{n}" for n in lin}
    return sorted(names)


@dataclasses.dataclass
class BackendOptions:
    policy: Policy | None  # None: a state was given and no policy option
    inner: str | None
    state: SparsityState | None


def parse_options(options: dict[str, Any] | None) -> BackendOptions:
    """Check the backend's options: ``policy``, ``inner``, ``state`` and `sparsify`'s overrides."""
    options = dict(options or {})
    overrides = {k: v for k, v in options.items() if k not in BACKEND_KEYS}
    known = set(policy_override_names())
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(
            f"unknown spion backend option(s) {unknown}; known: {', '.join(BACKEND_KEYS)} and the "
            f"policy overrides {', '.join(sorted(known))}"
        )
    state, inner = options.get("state"), options.get("inner")
    if state is not None and not isinstance(state, SparsityState):
        raise TypeError(f"spion backend option 'state' must be a SparsityState, got {type(state).__name__}")
    policy = None
    if state is None or "policy" in options or overrides:
        policy = Policy.coerce(options.get("policy"), **overrides)
        if inner is not None:
            policy = Policy.coerce(policy, inner_compiler=inner)
    if state is not None and policy is not None and policy != state.policy:
        raise ValueError(
            "spion backend options 'state' and 'policy'/overrides disagree: the given state was "
            f"made for {state.policy.describe()}, the options ask for {policy.describe()}"
        )
    return BackendOptions(policy, inner, state)


def attach_backend_state(model: nn.Module, options: dict[str, Any] | BackendOptions | None = None) -> SparsityState:
    """The state ``torch.compile(model, backend="spion", options=options)`` uses, attached now.

    The backend attaches it at its first compile; attach it earlier to load a checkpoint before
    the first forward. A model that already has a state keeps it (its policy must match).
    """
    opts = options if isinstance(options, BackendOptions) else parse_options(options)
    current = getattr(model, STATE_ATTR, None)
    if current is not None and not isinstance(current, SparsityState):
        raise ValueError(f"model.{STATE_ATTR} is a {type(current).__name__}, not a SparsityState")
    if opts.state is not None:
        if current is not None and current is not opts.state:
            raise ValueError(
                f"spion backend option 'state' is not the state this model already has (model.{STATE_ATTR})")
        if current is None:
            setattr(model, STATE_ATTR, opts.state)
        return opts.state
    if current is not None:
        if opts.policy != current.policy:
            raise ValueError(
                f"this model already has a spion_fx state for {current.policy.describe()}; the "
                f"spion backend options ask for {opts.policy.describe()} (build a fresh model, or "
                "call spion_fx.desparsify(model) first)"
            )
        return current
    state = SparsityState(opts.policy).to(_device(model))
    state.train(model.training)
    state.count_steps = "forward"  # no optimizer: a training forward ends the previous step
    setattr(model, STATE_ATTR, state)
    return state


def compiler_for(state: SparsityState, inner: str | None) -> Any:
    """The state's compiler (made on first use; `sparsify` sets its own)."""
    compiler = getattr(state, "compiler", None)
    if compiler is None:
        from spion_fx.lowering.backend import SpionCompiler

        # A bare torch.compile has no wrapper around the model's call to count steps, so the
        # compiler's first graph counts training forwards (SpionCompiler.__call__).
        compiler = SpionCompiler(state, inner=inner, counts_forwards=state.count_steps == "forward")
        state.compiler = compiler
    return compiler


def compile_graph(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None) -> Callable[..., Any]:
    """The `spion` backend: find the model, its state and compiler, compile, route calls."""
    opts = parse_options(options)
    pristine = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    param = first_parameter(example_inputs)
    owner = find_owner(param, _frame_modules(gm))
    if owner is None and opts.state is None:
        raise ValueError(
            "the spion backend keeps its state on the module it compiles, and found no module for "
            "this graph; compile an nn.Module (torch.compile(model, backend='spion', options=...)), "
            "use spion_fx.sparsify(model, ...), or pass options={'state': SparsityState(policy)}"
        )
    state = attach_backend_state(owner, opts) if owner is not None else opts.state
    dispatcher = compiler_for(state, opts.inner)(gm, example_inputs)
    return ModelRouter(opts, pristine, example_inputs, state, dispatcher)


class ModelRouter:
    """Sends each call of one Dynamo graph to the dispatcher of the model it serves.

    Dynamo reuses a compiled frame for another instance of the same class when the guards pass
    (two GPT-2s compiled with equal options share HF's decorated ``forward``); the second model's
    calls then arrive here with its own parameters. They are routed by the graph's first
    parameter to that model's state, found on the stack and attached if new. A graph without
    parameters is routed by the stack on every call, if it has attention sites.
    """

    MAX_PARAMETERS = 256

    def __init__(self, options: BackendOptions, pristine: fx.GraphModule, example_inputs, state: SparsityState, dispatcher):
        self.options = options
        self.pristine = pristine
        self.position = next((i for i, x in enumerate(example_inputs) if isinstance(x, nn.Parameter)), None)
        self.state = state
        self.primary = dispatcher
        self.primary_param = weakref.ref(example_inputs[self.position]) if self.position is not None else None
        # this graph's dispatchers of other models' states, and parameters seen (id -> (ref, dispatcher))
        self.by_state: weakref.WeakKeyDictionary[SparsityState, Callable[..., Any]] = weakref.WeakKeyDictionary()
        self.seen: dict[int, tuple[weakref.ref, Callable[..., Any]]] = {}
        runner = getattr(dispatcher, "primary", None)
        self.stack_routed = self.position is None and bool(getattr(runner, "attention_targets", None))

    def __call__(self, *args):
        if self.position is None:
            return (self._route(None, args) if self.stack_routed else self.primary)(*args)
        param = args[self.position]
        if self.primary_param() is param:
            return self.primary(*args)
        hit = self.seen.get(id(param))
        if hit is None or hit[0]() is not param:
            if len(self.seen) >= self.MAX_PARAMETERS:  # ever-new parameters (sharded): stop looking;
                return self.primary(*args)  # InstanceDispatcher then runs the graph dense
            hit = self.seen[id(param)] = (weakref.ref(param), self._route(param, args))
        return hit[1](*args)

    def _route(self, param, args) -> Callable[..., Any]:
        if self.options.state is not None:
            return self.primary  # one state given for every model: shared on purpose
        owner = find_owner(param, [])
        if owner is None or getattr(owner, STATE_ATTR, None) is self.state:
            return self.primary  # this model (another block instance: InstanceDispatcher's job)
        state = attach_backend_state(owner, self.options)
        dispatcher = self.by_state.get(state)
        if dispatcher is None:
            graph = fx.GraphModule(self.pristine, copy.deepcopy(self.pristine.graph))
            dispatcher = self.by_state[state] = compiler_for(state, self.options.inner)(graph, list(args))
        return dispatcher


def first_parameter(values: list[Any]) -> nn.Parameter | None:
    return next((x for x in values if isinstance(x, nn.Parameter)), None)


def find_owner(param: nn.Parameter | None, frame_modules: list[nn.Module]) -> nn.Module | None:
    """The model a graph with first parameter `param` belongs to (see the module docstring)."""
    stack = list(_stack_modules())
    if param is not None:
        holds = [m for m in (*frame_modules, *(m for m, _ in stack)) if _holds(m, param)]
        wrapped = [m for m, is_root in stack if is_root and _holds(m, param)]
    else:
        holds = [*frame_modules, *(m for m, _ in stack)]
        wrapped = [m for m, is_root in stack if is_root]
    for module in holds:
        if isinstance(getattr(module, STATE_ATTR, None), SparsityState):
            return module
    if wrapped:
        return wrapped[0]
    framed = [m for m in frame_modules if param is None or _holds(m, param)]
    return framed[0] if framed else None


def _holds(module: nn.Module | None, param: nn.Parameter) -> bool:
    return module is not None and any(p is param for p in module.parameters())


def _frame_modules(gm: fx.GraphModule) -> list[nn.Module]:
    """Modules the graph's placeholders were read from: the roots of their Dynamo sources,
    looked up in the compiled frame's locals."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        root = getattr(getattr(tx, "output", None), "root_tx", None) or tx
        scopes = {"local": getattr(root, "f_locals", None) or {}, "global": getattr(root, "f_globals", None) or {}}
    except Exception:  # another torch version: the stack still finds the module
        return []
    found: list[nn.Module] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        scope, name = _root_name(getattr(node.meta.get("grapharg"), "source", None))
        value = scopes[scope].get(name) if name else None
        value = getattr(value, "_orig_mod", value)
        if isinstance(value, nn.Module) and all(value is not m for m in found):
            found.append(value)
    return found


def _root_name(source: Any) -> tuple[str, str | None]:
    """("local" | "global", name) of the variable a Dynamo source starts from (``L['self']``,
    ``G['model']``), following ``.base`` through attribute and item sources."""
    seen = 0
    while getattr(source, "base", None) is not None and seen < 100:
        source, seen = source.base, seen + 1
    for scope, attr in (("local", "local_name"), ("global", "global_name")):
        name = getattr(source, attr, None)
        if isinstance(name, str):
            return scope, name
    return "local", None


def _stack_modules() -> Iterator[tuple[nn.Module, bool]]:
    """(module, torch.compile wrapped it) for the `self` of each frame on the stack, innermost
    first."""
    frame = sys._getframe(1)
    seen: set[int] = set()
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, nn.Module):
            wrapped = hasattr(owner, "_orig_mod") and type(owner).__name__ == "OptimizedModule"
            module = owner._orig_mod if wrapped else owner
            is_root = wrapped or getattr(owner, "_compiled_call_impl", None) is not None
            if id(module) not in seen or is_root:
                seen.add(id(module))
                yield module, is_root
        frame = frame.f_back


def _device(model: nn.Module):
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
